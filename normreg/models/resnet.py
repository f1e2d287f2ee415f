"""ResNet-20 for CIFAR (He et al. 2016) with a choice of normalization.

A stem ``conv3x3(w) -> norm -> ReLU``, then three stages of three
basic blocks (:class:`BasicBlock`) with widths ``(w, 2w, 4w)``, stride 2 at the first block
of stages 2 and 3, global average pooling and a ``nnx.Linear`` classifier:
``1 + 3 * 3 * 2 + 1 = 20`` weight layers. A block computes

.. math::

  y = \\mathrm{ReLU}\\Big(\\mathrm{norm}_2\\big(W_2 * \\mathrm{ReLU}(
      \\mathrm{norm}_1(W_1 * x))\\big) + s(x)\\Big)

with ``s(x) = x`` when the shape is kept and ``s(x) = norm_s(W_s * x)``, a
strided 1x1 projection with the same kind of normalization, when it changes.
(The paper's CIFAR networks use parameter-free zero-padding shortcuts, its
option A; we use projections, option B, as most reimplementations do, so that
every conv is followed by the same kind of normalization.)

References:
  He, Zhang, Ren & Sun, *Deep Residual Learning for Image Recognition*,
  CVPR 2016 (arXiv 1512.03385), sec. 4.2.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from normreg.models import norms as norms_lib

Dtype = jnp.dtype


class BasicBlock(nnx.Module):
  """Two 3x3 ``conv -> norm`` with a residual connection and ReLU after the add.

  Params: ``conv1``, ``norm1``, ``conv2``, ``norm2``, and ``shortcut_conv``,
  ``shortcut_norm`` (a strided 1x1 projection) when ``strides != 1`` or the
  width changes.

  Args:
    in_features: input channels.
    out_features: output channels.
    strides: stride of ``conv1`` and of the projection.
    norm: one of :data:`normreg.models.NORMS`.
    dtype: computation dtype.
    param_dtype: dtype of all params.
    epsilon: the normalizations' epsilon (default
      :data:`normreg.models.norms.EPSILON`).
    rngs: ``nnx.Rngs`` with a ``params`` stream.
  """

  def __init__(self, in_features: int, out_features: int, *, strides: int = 1,
               norm: str = "batch", dtype: Optional[Dtype] = None,
               param_dtype: Dtype = jnp.float32, epsilon: Optional[float] = None,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, epsilon=epsilon, rngs=rngs)
    self.conv1, self.norm1 = norms_lib.conv_norm(norm, in_features, out_features, 3,
                                                 strides=strides, **kw)
    self.conv2, self.norm2 = norms_lib.conv_norm(norm, out_features, out_features, 3, **kw)
    self.projection = strides != 1 or in_features != out_features
    if self.projection:
      self.shortcut_conv, self.shortcut_norm = norms_lib.conv_norm(
          norm, in_features, out_features, 1, strides=strides, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = nnx.relu(self.norm1(self.conv1(x)))
    y = self.norm2(self.conv2(y))
    if self.projection:
      x = self.shortcut_norm(self.shortcut_conv(x))
    return nnx.relu(y + x)


class ResNet20(nnx.Module):
  """CIFAR ResNet-20 (He et al. 2016): stem, 3 x 3 BasicBlocks, GAP, Linear.

  Params (``"/"``-joined paths): ``stem_conv``, ``stem_norm``,
  ``blocks/{0..8}/{conv1,norm1,conv2,norm2}`` and
  ``blocks/{3,6}/{shortcut_conv,shortcut_norm}``, ``head/kernel``,
  ``head/bias``; a conv holds ``kernel`` (and ``bias`` for ``norm='none'``) or
  ``v``, ``g``, ``bias`` for ``norm='weight'``.

  Called as ``model(x)`` with ``x`` of shape ``(N, H, W, in_channels)``;
  returns logits ``(N, num_classes)`` in the compute dtype. Training mode
  (batch statistics) by default; ``model.eval()`` / ``model.train()`` switch.

  Args:
    num_classes: number of logits.
    norm: one of :data:`normreg.models.NORMS`.
    width: channels of the stem and first stage (16 in the paper); the other
      stages have ``2 * width`` and ``4 * width``.
    in_channels: channels of the input images.
    dtype: computation dtype (``None``: float32 for float32 inputs).
    param_dtype: dtype of all params.
    epsilon: the normalizations' epsilon (default
      :data:`normreg.models.norms.EPSILON`).
    rngs: ``nnx.Rngs`` with a ``params`` stream.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> model = ResNet20(num_classes=10, norm='group', width=4, rngs=nnx.Rngs(0))
    >>> model(jnp.ones((2, 8, 8, 3))).shape
    (2, 10)
  """

  def __init__(self, *, num_classes: int = 10, norm: str = "batch", width: int = 16,
               in_channels: int = 3, dtype: Optional[Dtype] = None,
               param_dtype: Dtype = jnp.float32, epsilon: Optional[float] = None,
               rngs: nnx.Rngs):
    norms_lib.check_norm(norm)
    kw = dict(dtype=dtype, param_dtype=param_dtype, epsilon=epsilon, rngs=rngs)
    self.stem_conv, self.stem_norm = norms_lib.conv_norm(norm, in_channels, width, 3, **kw)
    blocks, c_in = [], width
    for stage, c_out in enumerate((width, 2 * width, 4 * width)):
      for i in range(3):
        strides = 2 if stage > 0 and i == 0 else 1
        blocks.append(BasicBlock(c_in, c_out, strides=strides, norm=norm, **kw))
        c_in = c_out
    self.blocks = norms_lib.List(blocks)
    self.head = nnx.Linear(c_in, num_classes, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm = norm

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.stem_norm(self.stem_conv(x)))
    for block in self.blocks:
      x = block(x)
    return self.head(jnp.mean(x, axis=(1, 2)))

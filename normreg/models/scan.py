"""A CNN whose residual blocks are stacked on a leading axis and run by ``nnx.scan``.

The layout of scanned models (``nnx.scan``/``nnx.vmap`` over layers,
``linen.scan``, maxtext-style transformers): every block's parameters live in
one leaf with a leading ``depth`` axis, ``blocks/conv/kernel`` of shape
``(depth, 3, 3, width, width)``. With a normalization after each block's conv,
the scale-invariant unit is ``(block, output channel)``: ``normreg`` groups it
as ``unit(stack=1)`` (``tensor(stack=1)`` for LayerNorm and GroupNorm), so each
block keeps its own norm and effective learning rate.

.. math::

  h_0 = \\mathrm{ReLU}(\\mathrm{norm}(W_s * x)), \\quad
  h_{\\ell+1} = \\mathrm{ReLU}\\big(h_\\ell + \\mathrm{norm}(W_\\ell * h_\\ell)\\big), \\quad
  \\mathrm{logits} = \\mathrm{mean}_{H,W}(h_D)\\, W_{\\mathrm{head}} + b_{\\mathrm{head}}

with the stem strided by 2.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from normreg.models import norms as norms_lib

Dtype = jnp.dtype


class Block(nnx.Module):
  """One residual block: ``ReLU(x + norm(conv3x3(x)))`` at constant width."""

  def __init__(self, width: int, norm: str, *, dtype: Optional[Dtype] = None,
               param_dtype: Dtype = jnp.float32, epsilon: Optional[float] = None,
               rngs: nnx.Rngs):
    self.conv, self.norm = norms_lib.conv_norm(norm, width, width, 3, dtype=dtype,
                                               param_dtype=param_dtype, epsilon=epsilon,
                                               rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return nnx.relu(x + self.norm(self.conv(x)))


class ScanCNN(nnx.Module):
  """Stem, ``depth`` residual blocks scanned over a stacked axis, GAP, Linear.

  Params: ``stem_conv``, ``stem_norm``, ``blocks/conv/...`` and
  ``blocks/norm/...`` (every leaf with a leading ``depth`` axis), ``head``.

  Args:
    num_classes: number of logits.
    norm: one of :data:`normreg.models.NORMS`.
    width: channels of every block.
    depth: number of scanned blocks.
    in_channels: channels of the input images.
    dtype: computation dtype.
    param_dtype: dtype of all params.
    epsilon: the normalizations' epsilon.
    rngs: ``nnx.Rngs`` with a ``params`` stream.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> model = ScanCNN(width=4, depth=3, rngs=nnx.Rngs(0))
    >>> model(jnp.ones((2, 8, 8, 3))).shape
    (2, 10)
    >>> nnx.state(model, nnx.Param)["blocks"]["conv"]["kernel"].shape
    (3, 3, 3, 4, 4)
  """

  def __init__(self, *, num_classes: int = 10, norm: str = "batch", width: int = 16,
               depth: int = 4, in_channels: int = 3, dtype: Optional[Dtype] = None,
               param_dtype: Dtype = jnp.float32, epsilon: Optional[float] = None,
               rngs: nnx.Rngs):
    norms_lib.check_norm(norm)
    kw = dict(dtype=dtype, param_dtype=param_dtype, epsilon=epsilon)
    self.stem_conv, self.stem_norm = norms_lib.conv_norm(norm, in_channels, width, 3,
                                                         strides=2, rngs=rngs, **kw)

    @nnx.split_rngs(splits=depth)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(rngs):
      return Block(width, norm, rngs=rngs, **kw)

    self.blocks = make_blocks(rngs)
    self.head = nnx.Linear(width, num_classes, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm = norm
    self.depth = depth

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.stem_norm(self.stem_conv(x)))

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def forward(x, block):
      return block(x)

    x = forward(x, self.blocks)
    return self.head(jnp.mean(x, axis=(1, 2)))

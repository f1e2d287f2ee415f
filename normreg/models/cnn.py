"""A small VGG-style CNN with a choice of normalization.

Three stages of widths ``(w, 2w, 4w)``; each stage is two 3x3 convs, each
``conv -> norm -> ReLU``, followed by 2x2 max pooling; then global average
pooling over ``(H, W)`` and a ``nnx.Linear`` classifier, the "last layer",
which no normalization follows (so it is never scale-invariant):

.. math::

  h_{\\ell+1} = \\mathrm{ReLU}\\big(\\mathrm{norm}(W_\\ell * h_\\ell)\\big), \\qquad
  \\mathrm{logits} = \\mathrm{mean}_{H,W}(h_6)\\, W_{\\mathrm{head}} + b_{\\mathrm{head}}

with max pooling after layers 2, 4 and 6. This is the kind of network of van
Laarhoven 2017 (sec. 5) and of Simonyan & Zisserman 2015 (arXiv 1409.1556).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from normreg.models import norms as norms_lib

Dtype = jnp.dtype


class CNN(nnx.Module):
  """VGG-style CNN: 3 stages x 2 (conv3x3 -> norm -> ReLU), max pool, GAP, Linear.

  Params (``"/"``-joined paths): ``convs/{0..5}/kernel`` (or ``v``, ``g``,
  ``bias`` for ``norm='weight'``, ``kernel``, ``bias`` for ``norm='none'``),
  ``norms/{0..5}/scale``, ``norms/{0..5}/bias`` (BatchNorm's running
  ``mean``/``var`` are ``nnx.BatchStat``), ``head/kernel``, ``head/bias``.

  Called as ``model(x)`` with ``x`` of shape ``(N, H, W, in_channels)``,
  ``H, W >= 8``; returns logits ``(N, num_classes)`` in the compute dtype.
  Training mode (batch statistics) by default; ``model.eval()`` switches
  BatchNorm to its running statistics and ``model.train()`` back.

  Args:
    num_classes: number of logits.
    norm: one of :data:`normreg.models.NORMS`.
    width: channels of the first stage; the others have ``2 * width`` and
      ``4 * width``.
    in_channels: channels of the input images.
    dtype: computation dtype (``None``: float32 for float32 inputs).
    param_dtype: dtype of all params.
    epsilon: the normalizations' epsilon (default
      :data:`normreg.models.norms.EPSILON`).
    rngs: ``nnx.Rngs`` with a ``params`` stream.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> model = CNN(num_classes=10, norm='batch', width=4, rngs=nnx.Rngs(0))
    >>> model(jnp.ones((2, 16, 16, 3))).shape
    (2, 10)
  """

  def __init__(self, *, num_classes: int = 10, norm: str = "batch", width: int = 64,
               in_channels: int = 3, dtype: Optional[Dtype] = None,
               param_dtype: Dtype = jnp.float32, epsilon: Optional[float] = None,
               rngs: nnx.Rngs):
    norms_lib.check_norm(norm)
    kw = dict(dtype=dtype, param_dtype=param_dtype, epsilon=epsilon, rngs=rngs)
    features = [width, width, 2 * width, 2 * width, 4 * width, 4 * width]
    convs, norms = [], []
    for c_in, c_out in zip([in_channels] + features[:-1], features):
      conv, norm_layer = norms_lib.conv_norm(norm, c_in, c_out, 3, **kw)
      convs.append(conv)
      norms.append(norm_layer)
    self.convs = norms_lib.List(convs)
    self.norms = norms_lib.List(norms)
    self.head = nnx.Linear(features[-1], num_classes, dtype=dtype, param_dtype=param_dtype,
                           rngs=rngs)
    self.norm = norm

  def __call__(self, x: jax.Array) -> jax.Array:
    for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
      x = nnx.relu(norm(conv(x)))
      if i % 2 == 1:
        x = nnx.max_pool(x, (2, 2), strides=(2, 2))
    return self.head(jnp.mean(x, axis=(1, 2)))

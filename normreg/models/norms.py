"""Convolution + normalization pairs for the kinds of normalization we compare.

Every conv layer of :class:`~normreg.models.CNN` and
:class:`~normreg.models.ResNet20` is built by :func:`conv` and followed by the
layer that :func:`norm_layer` builds. Which weights become scale-invariant
(DESIGN.md, sec. 2):

=========  ================================================  ================
``norm``   layers                                            invariant kernel
=========  ================================================  ================
batch      ``nnx.Conv`` (no bias) -> ``nnx.BatchNorm``       per unit (UNIT)
layer      ``nnx.Conv`` (no bias) -> LayerNorm over (H,W,C)  whole (TENSOR)
group      ``nnx.Conv`` (no bias) -> ``nnx.GroupNorm``       whole (TENSOR)
weight     ``WeightNormConv`` (``v``, ``g``, ``bias``)       ``v`` per unit
none       ``nnx.Conv`` with bias                            none
=========  ================================================  ================

A bias just before a normalization would be cancelled by it (zero gradient), so
those convs have none. BatchNorm keeps running statistics with momentum 0.9
(``ra <- 0.9 ra + 0.1 batch``, PyTorch's default); every normalization uses
``epsilon = 1e-5``. GroupNorm uses :func:`group_count` groups.

References:
  Ioffe & Szegedy 2015 (BatchNorm, arXiv 1502.03167); Ba et al. 2016
  (LayerNorm, arXiv 1607.06450); Wu & He 2018 (GroupNorm, arXiv 1803.08494);
  Salimans & Kingma 2016 (WeightNorm, arXiv 1602.07868).
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from normreg.models.weight_norm import WeightNormConv

NORMS = ("batch", "layer", "group", "weight", "none")
"""The normalizations a model's ``norm`` argument accepts (see :func:`norm_layer`)."""

EPSILON = 1e-5
"""The default epsilon of :func:`norm_layer`: added to the variance of every normalization."""
BATCH_NORM_MOMENTUM = 0.9
MAX_GROUPS = 8

# nnx.List holds submodules as graph nodes from flax 0.12 on; before that a plain
# list did the same.
List = getattr(nnx, "List", list)

Dtype = jnp.dtype


def check_norm(norm: str) -> str:
  """Returns ``norm`` if it is one of :data:`NORMS`, else raises ``ValueError``."""
  if norm not in NORMS:
    raise ValueError(f"Unknown norm={norm!r}; `norm` must be one of {NORMS}.")
  return norm


def group_count(channels: int) -> int:
  """Number of GroupNorm groups for ``channels`` channels.

  The largest divisor of ``channels`` that is at most ``min(8, channels // 2)``
  (and at least 1): at most 8 groups, so each group pools enough channels to be
  a stable estimate on the small CIFAR widths (16 to 64 channels: 8 groups of 2
  to 8), and at least 2 channels per group whenever ``channels >= 2``, so that
  GroupNorm never degenerates into InstanceNorm (one channel per group), whose
  invariance would be per unit rather than per tensor.

  Examples:
    >>> [group_count(c) for c in (1, 3, 4, 6, 16, 64)]
    [1, 1, 2, 3, 8, 8]
  """
  limit = max(1, min(MAX_GROUPS, channels // 2))
  return max(d for d in range(1, limit + 1) if channels % d == 0)


class Identity(nnx.Module):
  """The identity, standing in for "no normalization" (``weight``, ``none``)."""

  def __call__(self, x: jax.Array) -> jax.Array:
    return x


def conv(norm: str, in_features: int, out_features: int, kernel_size: int = 3, *,
         strides: int = 1, dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
         rngs: nnx.Rngs) -> nnx.Module:
  """The conv layer (``'SAME'`` padding, NHWC) that comes before ``norm_layer(norm)``.

  ``nnx.Conv`` without bias for ``batch``/``layer``/``group``, ``WeightNormConv``
  for ``weight`` and ``nnx.Conv`` with bias for ``none``.

  Examples:
    >>> from flax import nnx
    >>> type(conv('weight', 3, 4, rngs=nnx.Rngs(0))).__name__
    'WeightNormConv'
  """
  check_norm(norm)
  if norm == "weight":
    return WeightNormConv(in_features, out_features, kernel_size, strides=strides,
                          padding="SAME", dtype=dtype, param_dtype=param_dtype, rngs=rngs)
  return nnx.Conv(in_features, out_features, (kernel_size, kernel_size),
                  strides=(strides, strides), padding="SAME", use_bias=norm == "none",
                  dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def norm_layer(norm: str, channels: int, *, dtype: Optional[Dtype] = None,
               param_dtype: Dtype = jnp.float32, epsilon: Optional[float] = None,
               rngs: nnx.Rngs) -> nnx.Module:
  """The normalization that follows ``conv(norm, ...)``, over NHWC activations.

  - ``batch``: ``nnx.BatchNorm`` over ``(N, H, W)`` per channel, in training
    mode (batch statistics) until ``model.eval()``.
  - ``layer``: ``nnx.LayerNorm`` over ``(H, W, C)`` per example, with a scale
    and shift per channel.
  - ``group``: ``nnx.GroupNorm`` with :func:`group_count` groups.
  - ``weight``, ``none``: :class:`Identity`.

  ``epsilon`` (default :data:`EPSILON`) is added to the variance. It makes the
  normalization invariant to the scale of its input only up to about
  ``epsilon / var``; a negligible value (``1e-30``) makes it exact, which the
  reproduction's exact-equivalence runs use.

  Examples:
    >>> from flax import nnx
    >>> norm_layer('group', 16, rngs=nnx.Rngs(0)).num_groups
    8
  """
  check_norm(norm)
  kw = dict(epsilon=EPSILON if epsilon is None else epsilon, dtype=dtype,
            param_dtype=param_dtype, rngs=rngs)
  if norm == "batch":
    return nnx.BatchNorm(channels, momentum=BATCH_NORM_MOMENTUM, **kw)
  if norm == "layer":
    return nnx.LayerNorm(channels, reduction_axes=(-3, -2, -1), feature_axes=-1, **kw)
  if norm == "group":
    return nnx.GroupNorm(channels, num_groups=group_count(channels), **kw)
  return Identity()


def conv_norm(norm: str, in_features: int, out_features: int, kernel_size: int = 3, *,
              strides: int = 1, dtype: Optional[Dtype] = None,
              param_dtype: Dtype = jnp.float32, epsilon: Optional[float] = None,
              rngs: nnx.Rngs) -> Tuple[nnx.Module, nnx.Module]:
  """``(conv(...), norm_layer(...))`` for one conv -> norm pair."""
  kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
  return (conv(norm, in_features, out_features, kernel_size, strides=strides, **kw),
          norm_layer(norm, out_features, epsilon=epsilon, **kw))

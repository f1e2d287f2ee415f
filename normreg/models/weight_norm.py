"""Weight normalization as a pure reparameterization (Salimans & Kingma 2016).

A layer stores a direction ``v`` and a per-unit length ``g`` and rebuilds its
weight on every call:

.. math::

  w_{\\ldots, j} = g_j \\, \\frac{v_{\\ldots, j}}{\\lVert v_{\\ldots, j} \\rVert}

where :math:`j` indexes output units, the LAST axis of the Flax kernel layout
``(..., in, out)``, and the norm reduces over every other axis (the receptive
field and the input features). The output is therefore invariant to a positive
rescaling of ``v`` per unit, ``v[..., j] -> a_j v[..., j]``: ``v`` is a
``normreg.UNIT`` scale group, while ``g`` and ``bias`` are not scale-invariant.

The layers are pure in the sense of equinox's ``nn.WeightNorm``: ``v`` and
``g`` are ``nnx.Param``s, the weight is a function of them, and nothing is
written back. We do not build on ``nnx.WeightNorm`` (flax 0.12): it writes the
normalized kernel back into the wrapped layer after every call, so ``v``
changes under the optimizer's feet, and its scale is not a trainable parameter
(flax issues 5576 and 5577).

References:
  Salimans & Kingma, *Weight Normalization: A Simple Reparameterization to
  Accelerate Training of Deep Neural Networks*, NeurIPS 2016
  (arXiv 1602.07868).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes

Dtype = jnp.dtype
PaddingLike = Union[str, int, Sequence[Tuple[int, int]]]

# Lower bound on ||v|| per unit (as torch.nn.functional.normalize's eps): a unit
# with v = 0 gives w = 0 and a finite (if large, g / MIN_NORM) gradient instead
# of 0/0. Units with ||v|| > MIN_NORM are untouched.
MIN_NORM = 1e-12


def _compute_dtype(dtype: Dtype) -> Dtype:
  # float32, or wider; written without jnp.promote_types, which raises under
  # jax_numpy_dtype_promotion='strict'.
  return dtype if jnp.finfo(dtype).bits >= 32 else jnp.dtype(jnp.float32)


def _unit_norms(v: jax.Array) -> jax.Array:
  """``||v[..., j]||`` per output unit ``j`` (over all axes but the last), guarded.

  ``optax.safe_norm`` of the ``(-1, out)`` reshape (``jnp.linalg.norm``, which
  it calls, takes at most two axes), floored at ``MIN_NORM``, with a zero
  rather than NaN gradient where the floor is active.
  """
  return optax.safe_norm(jnp.reshape(v, (-1, v.shape[-1])), MIN_NORM, axis=0)


def weight_from_direction(v: jax.Array, g: jax.Array) -> jax.Array:
  """Rebuilds ``w = g * v / ||v||``, the norm over all axes but the last.

  The arithmetic runs in at least float32 and the result is cast back to
  ``v.dtype``, so bf16 params stay bf16.

  Args:
    v: direction, shape ``(..., out)``.
    g: length per output unit, shape ``(out,)``.

  Returns:
    The weight, shape and dtype of ``v``.

  Examples:
    >>> import jax.numpy as jnp
    >>> v = jnp.array([[3., 0.], [4., 2.]])
    >>> weight_from_direction(v, jnp.array([1., 5.]))
    Array([[0.6, 0. ],
           [0.8, 5. ]], dtype=float32)
  """
  vc = v.astype(_compute_dtype(v.dtype))
  scale = g.astype(vc.dtype) / _unit_norms(vc)
  return (vc * jnp.reshape(scale, (1,) * (v.ndim - 1) + scale.shape)).astype(v.dtype)


def _init_direction_and_length(key: jax.Array, shape: Tuple[int, ...],
                               param_dtype: Dtype) -> Tuple[jax.Array, jax.Array]:
  v = nnx.initializers.lecun_normal()(key, shape, param_dtype)
  g = _unit_norms(v.astype(_compute_dtype(v.dtype)))
  return v, g.astype(param_dtype)


def _add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
  return y + jnp.reshape(bias, (1,) * (y.ndim - 1) + bias.shape)


class WeightNormLinear(nnx.Module):
  """Dense layer with weight normalization: ``y = x (g * v / ||v||) + bias``.

  ``v`` has the Flax kernel shape ``(in_features, out_features)`` and is
  initialized like ``nnx.Linear``'s kernel (``lecun_normal``); ``g`` (shape
  ``(out_features,)``) starts at ``||v||`` per unit, so the initial weight is
  ``v`` itself; ``bias`` starts at zero. See the module docstring for the maths.

  Args:
    in_features: size of the last input axis.
    out_features: number of output units.
    dtype: computation dtype (``None``: promote inputs and params).
    param_dtype: dtype of ``v``, ``g`` and ``bias``.
    rngs: ``nnx.Rngs`` with a ``params`` stream.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> layer = WeightNormLinear(3, 2, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((5, 3))).shape
    (5, 2)
    >>> bool(jnp.allclose(layer.weight(), layer.v[...], atol=1e-6))
    True
  """

  def __init__(self, in_features: int, out_features: int, *,
               dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs):
    v, g = _init_direction_and_length(rngs.params(), (in_features, out_features), param_dtype)
    self.v = nnx.Param(v)
    self.g = nnx.Param(g)
    self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype))
    self.in_features = in_features
    self.out_features = out_features
    self.dtype = dtype
    self.param_dtype = param_dtype

  def weight(self) -> jax.Array:
    """The rebuilt weight ``g * v / ||v||``, shape ``(in, out)``."""
    return weight_from_direction(self.v[...], self.g[...])

  def __call__(self, x: jax.Array) -> jax.Array:
    x, w, b = nnx_dtypes.promote_dtype((x, self.weight(), self.bias[...]), dtype=self.dtype)
    y = jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))
    return _add_bias(y, b)


def _pair(x: Union[int, Sequence[int]], name: str) -> Tuple[int, int]:
  if isinstance(x, int):
    return (x, x)
  x = tuple(x)
  if len(x) != 2:
    raise ValueError(f"`{name}` must be an int or a pair for a 2D conv, got {x!r}.")
  return x


class WeightNormConv(nnx.Module):
  """2D convolution with weight normalization: ``y = conv(x, g * v / ||v||) + bias``.

  Inputs are ``NHWC`` and ``v`` is ``HWIO`` (``(kh, kw, in, out)``, the
  ``nnx.Conv`` kernel layout); the norm of each output unit reduces over
  ``(kh, kw, in)``. ``v`` is initialized like ``nnx.Conv``'s kernel
  (``lecun_normal``), ``g`` to ``||v||`` per unit (so the initial weight is
  ``v``), ``bias`` to zero. See the module docstring for the maths.

  Args:
    in_features: input channels.
    out_features: output channels (units).
    kernel_size: ``k`` or ``(kh, kw)``.
    strides: ``s`` or ``(sh, sw)``.
    padding: ``'SAME'``, ``'VALID'``, an int ``p`` (``p`` on every side) or
      ``((top, bottom), (left, right))``.
    dtype: computation dtype (``None``: promote inputs and params).
    param_dtype: dtype of ``v``, ``g`` and ``bias``.
    rngs: ``nnx.Rngs`` with a ``params`` stream.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> conv = WeightNormConv(3, 8, 3, strides=2, rngs=nnx.Rngs(0))
    >>> conv(jnp.ones((2, 8, 8, 3))).shape
    (2, 4, 4, 8)
    >>> conv.v.shape, conv.g.shape
    ((3, 3, 3, 8), (8,))
  """

  def __init__(self, in_features: int, out_features: int,
               kernel_size: Union[int, Sequence[int]], *,
               strides: Union[int, Sequence[int]] = 1, padding: PaddingLike = "SAME",
               dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs):
    kernel_size = _pair(kernel_size, "kernel_size")
    shape = kernel_size + (in_features, out_features)
    v, g = _init_direction_and_length(rngs.params(), shape, param_dtype)
    self.v = nnx.Param(v)
    self.g = nnx.Param(g)
    self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype))
    self.in_features = in_features
    self.out_features = out_features
    self.kernel_size = kernel_size
    self.strides = _pair(strides, "strides")
    if isinstance(padding, int):
      padding = ((padding, padding), (padding, padding))
    elif not isinstance(padding, str):
      padding = tuple(tuple(p) for p in padding)
    self.padding = padding
    self.dtype = dtype
    self.param_dtype = param_dtype

  def weight(self) -> jax.Array:
    """The rebuilt kernel ``g * v / ||v||``, shape ``(kh, kw, in, out)``."""
    return weight_from_direction(self.v[...], self.g[...])

  def __call__(self, x: jax.Array) -> jax.Array:
    x, w, b = nnx_dtypes.promote_dtype((x, self.weight(), self.bias[...]), dtype=self.dtype)
    y = jax.lax.conv_general_dilated(x, w, window_strides=self.strides, padding=self.padding,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return _add_bias(y, b)

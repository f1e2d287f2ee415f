"""Per-unit norms, effective learning rates and angular updates.

Pure functions of params and a groups pytree (see :mod:`normreg.groups`), safe
to call inside ``jax.jit``. Each returns a pytree shaped like the params whose
leaves are arrays of shape ``(out,)`` for ``UNIT`` leaves (one value per output
unit, the last axis of a Flax kernel), ``()`` for ``TENSOR`` leaves, and
``None`` for ungrouped leaves.

Mathematics (van Laarhoven 2017, eqs. 9-12): for a weight ``w`` whose function
is invariant to its scale, the gradient scales as ``grad L(a w) = grad L(w)/a``
and is orthogonal to ``w``. A step of plain SGD with learning rate ``eta``
therefore turns the direction ``w/||w||`` as a step of size

.. math::

  \\eta_{\\mathrm{eff}} = \\eta / \\|w\\|^2

on the unit sphere would; for Adam, whose step does not scale with the
gradient, ``eta_eff = eta / ||w||``. ``power`` selects 2 (SGD) or 1 (Adam).

References:
  van Laarhoven, 2017 (arXiv 1706.05350); Hoffer et al., *Norm matters*, 2018.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from normreg import groups as groups_lib

# Smallest squared norm a unit may have before we treat it as zero: the square
# root's gradient at 0 is inf, so we clamp with jnp.where (as optax.safe_norm).
_TINY = 1e-30


def compute_dtype(dtype: Any) -> Any:
  """float32 for low-precision params (bf16, f16): norms are summed in float32."""
  return jnp.dtype(dtype) if jnp.finfo(dtype).bits >= 32 else jnp.dtype(jnp.float32)


def group_norm(group: groups_lib.Invariance, x: jax.Array, keepdims: bool = True) -> jax.Array:
  """The L2 norm of each unit (UNIT) or of the whole tensor (TENSOR), float32+.

  Safe at zero: returns ``sqrt(tiny)`` there, with a zero (not NaN) gradient.
  """
  x = x.astype(compute_dtype(x.dtype))
  sq = jnp.sum(jnp.square(x), axis=groups_lib.reduction_axes(group, x.ndim), keepdims=keepdims)
  safe = jnp.where(sq > _TINY, sq, jnp.ones_like(sq))
  return jnp.where(sq > _TINY, jnp.sqrt(safe), jnp.sqrt(jnp.asarray(_TINY, sq.dtype)))


def group_dot(group: groups_lib.Invariance, x: jax.Array, y: jax.Array) -> jax.Array:
  """``<x, y>`` per unit (UNIT) or over the whole tensor (TENSOR), keepdims."""
  dtype = compute_dtype(x.dtype)
  return jnp.sum(x.astype(dtype) * y.astype(dtype),
                 axis=groups_lib.reduction_axes(group, x.ndim), keepdims=True)


def _flat(group, x):
  """A keepdims per-group value reshaped to ``(out,)`` for UNIT or ``()``."""
  return x.reshape(x.shape[-1:]) if group is groups_lib.UNIT and x.ndim >= 1 else x.reshape(())


def unit_norms(params: Any, groups: groups_lib.GroupsOrFn) -> Any:
  """``||w||`` per unit (UNIT leaves, shape ``(out,)``) or per tensor (``()``).

  Example:

    >>> import jax.numpy as jnp, normreg
    >>> params = {"kernel": jnp.array([[3., 0.], [4., 2.]]), "bias": jnp.ones(2)}
    >>> norms = normreg.unit_norms(params, {"kernel": normreg.UNIT, "bias": None})
    >>> norms["kernel"], norms["bias"]
    (Array([5., 2.], dtype=float32), None)
  """
  groups = groups_lib.resolve(groups, params, "unit_norms")
  return jax.tree.map(
      lambda g, w: None if g is None else _flat(g, group_norm(g, w)),
      groups, params, is_leaf=groups_lib._is_none)


def effective_learning_rate(learning_rate: Any, params: Any, groups: groups_lib.GroupsOrFn,
                            power: float = 2) -> Any:
  """``eta / ||w||**power`` per unit: the step size of the direction ``w/||w||``.

  Args:
    learning_rate: ``eta``, a scalar (the value of a schedule at this step).
    params: the current params.
    groups: the groups pytree, or a callable ``params -> groups``.
    power: 2 for SGD (van Laarhoven 2017, eq. 12), 1 for Adam.

  Returns:
    A pytree shaped like ``params``: ``(out,)`` arrays for UNIT leaves, scalars
    for TENSOR leaves, ``None`` elsewhere.
  """
  norms = unit_norms(params, groups)
  lr = jnp.asarray(learning_rate, jnp.float32)
  return jax.tree.map(lambda n: lr / n ** jnp.asarray(power, n.dtype), norms)


def angular_update(before: Any, after: Any, groups: groups_lib.GroupsOrFn) -> Any:
  """The angle (radians) each unit's weight turned between two sets of params.

  Computed as ``2 atan2(||u - v||, ||u + v||)`` with ``u, v`` the unit vectors,
  which is exact for small and large angles alike (``arccos`` of the cosine
  loses all precision below about 1e-4 rad in float32).
  """
  groups = groups_lib.resolve(groups, before, "angular_update")

  def angle(g, a, b):
    if g is None:
      return None
    u = a.astype(compute_dtype(a.dtype)) / group_norm(g, a)
    v = b.astype(compute_dtype(b.dtype)) / group_norm(g, b)
    axes = groups_lib.reduction_axes(g, a.ndim)
    diff = jnp.sqrt(jnp.sum(jnp.square(u - v), axis=axes, keepdims=True))
    summ = jnp.sqrt(jnp.sum(jnp.square(u + v), axis=axes, keepdims=True))
    return _flat(g, 2 * jnp.arctan2(diff, summ))

  return jax.tree.map(angle, groups, before, after, is_leaf=groups_lib._is_none)

"""Per-unit norms, effective learning rates and angular updates.

Pure functions of params and a groups pytree (see :mod:`normreg.groups`), safe
to call inside ``jax.jit``. Each returns a pytree shaped like the params whose
leaves hold one value per group: shape ``(out,)`` for ``UNIT`` leaves (one value
per output unit, the last axis of a Flax kernel), ``()`` for ``TENSOR`` leaves,
with the stack axes in front for stacked groups (``(layers, out)`` for a
scanned kernel), and ``None`` for ungrouped leaves. The members of a joint group
all hold the joint value.

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
from normreg import reductions
from normreg import slicing

compute_dtype = reductions.compute_dtype


def _per_leaf(values: dict, params: Any) -> Any:
  return jax.tree_util.tree_map_with_path(
      lambda path, _: values.get(groups_lib.path_str(path)), params,
      is_leaf=groups_lib._leaf_or_masked)


def _split(groups: groups_lib.GroupsOrFn, caller: str, params: Any, *more: Any):
  """``(groups, resolved, split trees, back)``: per-slice groups split into leaves
  (:mod:`normreg.slicing`), and ``back(values)`` the per-group values in ``params``'
  structure (a tuple of per-slice values at a sliced leaf)."""
  groups, resolved, trees = slicing.resolve(groups, params, *more, caller=caller)
  back = lambda values: slicing.merge(groups, _per_leaf(values, trees[0]), params, stack=False)
  return resolved, trees, back


def _norms(params: Any, groups: groups_lib.GroupsOrFn, caller: str) -> Any:
  resolved, (flat,), back = _split(groups, caller, params)
  return back(reductions.norms(resolved, flat))


def unit_norms(params: Any, groups: groups_lib.GroupsOrFn) -> Any:
  """``||w||`` per group: shape ``(out,)`` (UNIT), ``()`` (TENSOR), stack axes first.

  Examples:
    >>> import jax.numpy as jnp, normreg
    >>> params = {"kernel": jnp.array([[3., 0.], [4., 2.]]), "bias": jnp.ones(2)}
    >>> norms = normreg.unit_norms(params, {"kernel": normreg.UNIT, "bias": None})
    >>> norms["kernel"], norms["bias"]
    (Array([5., 2.], dtype=float32), None)
  """
  return _norms(params, groups, "unit_norms")


def effective_learning_rate(learning_rate: Any, params: Any, groups: groups_lib.GroupsOrFn,
                            power: float = 2) -> Any:
  """``eta / ||w||**power`` per group: the step size of the direction ``w/||w||``.

  Args:
    learning_rate: ``eta``, a scalar (the value of a schedule at this step).
    params: the current params.
    groups: the groups pytree, or a callable ``params -> groups``.
    power: 2 for SGD (van Laarhoven 2017, eq. 12), 1 for Adam.

  Returns:
    A pytree shaped like ``params``, with the shapes of :func:`unit_norms`.

  Examples:
    >>> import jax.numpy as jnp, normreg
    >>> params = {"kernel": jnp.array([[3., 0.], [4., 2.]])}
    >>> normreg.effective_learning_rate(0.1, params, {"kernel": normreg.UNIT})["kernel"]
    Array([0.004, 0.025], dtype=float32)
  """
  norms = _norms(params, groups, "effective_learning_rate")
  lr = jnp.asarray(learning_rate, jnp.float32)
  return jax.tree.map(lambda n: lr / n ** jnp.asarray(power, n.dtype), norms)


def angular_update(before: Any, after: Any, groups: groups_lib.GroupsOrFn) -> Any:
  """The angle (radians) each group's weight turned between two sets of params.

  Computed as ``2 atan2(||u - v||, ||u + v||)`` with ``u, v`` the unit vectors
  of the group (over all members of a joint group), which is exact for small
  and large angles alike (``arccos`` of the cosine loses all precision below
  about 1e-4 rad in float32).

  Examples:
    >>> import jax.numpy as jnp, normreg
    >>> a, b = {"w": jnp.array([1., 0.])}, {"w": jnp.array([1., 1.])}
    >>> round(float(normreg.angular_update(a, b, {"w": normreg.TENSOR})["w"]), 6)
    0.785398
  """
  resolved, (before, after), back = _split(groups, "angular_update", before, after)
  n_before = reductions.norms(resolved, before)
  n_after = reductions.norms(resolved, after)

  def direction(norms):
    return lambda path, group, w: (
        w.astype(compute_dtype(w.dtype)) / reductions.expand(group, norms[path], w.shape))

  u = reductions.map_groups(direction(n_before), resolved, before)
  v = reductions.map_groups(direction(n_after), resolved, after)
  diff = reductions.group_sums(resolved, lambda a, b: jnp.square(a - b), u, v)
  summ = reductions.group_sums(resolved, lambda a, b: jnp.square(a + b), u, v)
  angles = {p: 2 * jnp.arctan2(jnp.sqrt(diff[p]), jnp.sqrt(summ[p])) for p in diff}
  return back(angles)

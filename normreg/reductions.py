"""Norms and inner products per scale-invariance group, across leaves and stack axes.

For a group ``g`` (see :mod:`normreg.groups`) and a leaf ``x`` of shape
``(s_1, ..., s_k, ..., out)`` with ``k = g.stack`` stack axes, the per-group sum
of an elementwise ``f`` is

.. math::

  S_g[i_1..i_k, j] = \\sum_{\\text{reduced axes}} f(x)[i_1..i_k, \\ldots, j]
  \\quad (\\text{UNIT}), \\qquad
  S_g[i_1..i_k] = \\sum_{\\text{all other axes}} f(x)[i_1..i_k, \\ldots]
  \\quad (\\text{TENSOR}),

and for a joint group the sums of its members (leaves with the same tag) are
added. Every function here returns ``{path: array}`` keyed by the
``"/"``-joined path of each grouped leaf, the members of a joint group sharing
one value. Sums run in float32 at least (bf16 and f16 leaves are upcast), so
the norms of low-precision params do not lose their digits.

Norms are safe at zero (``sqrt`` of a tiny floor, with a zero rather than NaN
gradient), as ``optax.safe_norm``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from normreg import groups as groups_lib
from normreg import slicing

# Smallest squared norm a unit may have before we treat it as zero: the square
# root's gradient at 0 is inf, so we clamp with jnp.where (as optax.safe_norm).
_TINY = 1e-30


def compute_dtype(dtype: Any) -> Any:
  """float32 for low-precision params (bf16, f16): norms are summed in float32."""
  return jnp.dtype(dtype) if jnp.finfo(dtype).bits >= 32 else jnp.dtype(jnp.float32)


def _by_path(tree: Any) -> dict[str, Any]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=groups_lib._leaf_or_masked)
  return {groups_lib.path_str(p): x for p, x in leaves}


def group_sums(resolved: groups_lib.Resolved, fn: Callable[..., jax.Array],
               *trees: Any) -> dict[str, jax.Array]:
  """``{path: S}``: ``fn`` of the trees' leaves summed over each group (shape ``g.group_shape``).

  ``fn`` is elementwise and gets the leaves upcast to at least float32. Joint
  members share the sum over all of them. A leaf that is ``None`` or
  ``optax.MaskedNode`` in the first tree is skipped; a joint group with some
  members masked and others not is an error (its norm would be wrong).
  """
  flats = [_by_path(t) for t in trees]
  partial = {}
  for path, group in resolved.by_path.items():
    leaves = [flat.get(path) for flat in flats]
    if groups_lib._leaf_or_masked(leaves[0]):
      continue
    dtype = compute_dtype(leaves[0].dtype)
    value = fn(*(jnp.asarray(x).astype(dtype) for x in leaves))
    partial[path] = jnp.sum(value, axis=group.reduced_axes(value.ndim))
  totals: dict[str, jax.Array] = {}
  for tag, members in resolved.members.items():
    present = [p for p in members if p in partial]
    if present and len(present) != len(members):
      raise ValueError(f"joint group {tag!r} is split: {sorted(set(members) - set(present))} "
                       f"are masked out or None while {present} are not; a mask must take "
                       "all members of a joint group or none.")
    if present:
      totals[tag] = sum(partial[p] for p in present[1:]) + partial[present[0]]
  return {path: totals[resolved.by_path[path].joint] if resolved.by_path[path].joint
          else value for path, value in partial.items()}


def expand(group: groups_lib.Group, values: jax.Array, shape) -> jax.Array:
  """Per-group ``values`` reshaped to broadcast against a leaf of ``shape``."""
  return values.reshape(group.keepdims_shape(shape))


def safe_sqrt(sq: jax.Array) -> jax.Array:
  """``sqrt(sq)``, ``sqrt(tiny)`` where ``sq <= tiny``, with a finite gradient everywhere."""
  ok = sq > _TINY
  return jnp.where(ok, jnp.sqrt(jnp.where(ok, sq, jnp.ones_like(sq))),
                   jnp.sqrt(jnp.asarray(_TINY, sq.dtype)))


def norms(resolved: groups_lib.Resolved, tree: Any) -> dict[str, jax.Array]:
  """``{path: ||w||}`` per group, in the per-group shape (float32 at least)."""
  return {p: safe_sqrt(sq) for p, sq in group_sums(resolved, jnp.square, tree).items()}


def dots(resolved: groups_lib.Resolved, a: Any, b: Any) -> dict[str, jax.Array]:
  """``{path: <a, b>}`` per group, in the per-group shape (float32 at least)."""
  return group_sums(resolved, jnp.multiply, a, b)


def map_groups(fn: Callable[..., Any], resolved: groups_lib.Resolved, tree: Any,
               *rest: Any) -> Any:
  """``fn(path, group, leaf, *rest_leaves)`` on the grouped leaves of ``tree``; the others
  (ungrouped, ``None``, ``optax.MaskedNode``) pass through. ``rest`` has ``tree``'s
  structure."""

  def f(key_path, leaf, *others):
    path = groups_lib.path_str(key_path)
    group = resolved.by_path.get(path)
    if group is None or groups_lib._leaf_or_masked(leaf):
      return leaf
    return fn(path, group, leaf, *others)

  return jax.tree_util.tree_map_with_path(f, tree, *rest, is_leaf=groups_lib._leaf_or_masked)


def rescale_groups(params: Any, groups: groups_lib.GroupsOrFn,
                   factor: Any) -> Any:
  """``params`` with every group multiplied by ``factor`` (its function is unchanged).

  Args:
    params: the params.
    groups: their groups.
    factor: a scalar, or ``factor(shape) -> array`` called once per group with
      its per-group shape (``stack + (out,)`` or ``stack``), e.g. a random
      positive factor per unit and copy; joint members get the same factor.

  Returns:
    ``params`` with the grouped leaves rescaled, dtypes kept.

  Examples:
    >>> import numpy as np, jax.numpy as jnp, normreg
    >>> params = {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}
    >>> groups = {"kernel": normreg.UNIT, "bias": None}
    >>> scaled = normreg.rescale_groups(params, groups, lambda shape: np.arange(1., 4.))
    >>> scaled["kernel"].tolist(), scaled["bias"].tolist()
    ([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], [1.0, 1.0, 1.0])
  """
  groups, resolved, (flat,) = slicing.resolve(groups, params, caller="rescale_groups")
  drawn = {}

  def scale(path, group, w):
    key = resolved.key(path)
    if key not in drawn:
      drawn[key] = jnp.asarray(factor(resolved.group_shapes[path]) if callable(factor)
                               else factor, jnp.float32)
    f = drawn[key]
    f = expand(group, jnp.broadcast_to(f, resolved.group_shapes[path]), w.shape)
    return (w.astype(compute_dtype(w.dtype)) * f).astype(w.dtype)

  return slicing.merge(groups, map_groups(scale, resolved, flat), params)


def tangential(resolved: groups_lib.Resolved, updates: Any, params: Any,
               eps: float = 0.0) -> Any:
  """``u - <u, w>/(||w|| + eps)^2 w`` per group on the grouped leaves of ``updates`` (others
  pass through).

  With ``eps = 0``, the part of the update that turns ``w`` (to first order) without
  changing its norm; ``eps > 0`` is AdamP's ``w_hat = w / (||w|| + eps)``.
  """
  dot = dots(resolved, updates, params)
  norm = norms(resolved, params)

  def one(path, group, u, w):
    w = w.astype(compute_dtype(w.dtype))
    coef = expand(group, dot[path] / jnp.square(norm[path] + eps), w.shape)
    return (u.astype(w.dtype) - coef * w).astype(u.dtype)

  return map_groups(one, resolved, updates, params)


def group_means(resolved: groups_lib.Resolved, tree: Any) -> dict[str, jax.Array]:
  """``{path: mean of the group's elements}`` (over all members of a joint group)."""
  sums = group_sums(resolved, lambda x: x, tree)
  counts = group_sums(resolved, jnp.ones_like, tree)
  return {p: sums[p] / counts[p] for p in sums}


def project_to_radius(resolved: groups_lib.Resolved, tree: Any,
                      radius: dict[str, Any]) -> Any:
  """Each group of ``tree`` rescaled to norm ``radius[path]`` (per group, float32 at least)."""
  norm = norms(resolved, tree)

  def one(path, group, x):
    x32 = x.astype(compute_dtype(x.dtype))
    return (x32 * expand(group, radius[path] / norm[path], x.shape)).astype(x.dtype)

  return map_groups(one, resolved, tree)

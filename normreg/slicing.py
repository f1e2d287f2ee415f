"""Per-slice groups: a fused leaf read as one leaf per slice.

A fused kernel holds slices whose invariances differ: q/k/v stacked as
``(3, heads, d, head_dim)`` behind QK-norm (q and k per head, v not at all,
or as a whole behind a post-norm), gate/up as ``(2, hidden, d)`` (the gate
feeds a non-linearity, up is invariant behind a post-norm). Its group is a
:class:`normreg.groups.Sliced`: one group (or ``None``) per slice
``w.take(i, axis)``.

Every public transform and metric reads such groups the same way: the trees
it is given are *split*, each sliced leaf becoming a tuple of its slices (paths
``"path/0"``, ``"path/1"``, ...) in a flat ``{path: leaf}`` dict, and the
transform then runs on that as on any params; its updates are stacked back
along the axis (:func:`merge`). So a slice is, for every norm, projection,
decay, optimizer state and metric, exactly a leaf of its own, and an ungrouped
slice (the gate) gets what an ungrouped leaf gets (the base optimizer's step).
Groups with no :class:`~normreg.groups.Sliced` leaf are never split: those
transforms are the very same objects as before.

The split is a few ``jnp.take``/``jnp.stack`` per fused leaf inside the
jitted step; XLA fuses them into the update.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from normreg import groups as groups_lib

Sliced = groups_lib.Sliced

__all__ = ("has_slices", "split", "merge", "expanded", "resolve", "honours_slices")


def has_slices(groups: Any) -> bool:
  """Whether a groups pytree holds a :class:`~normreg.groups.Sliced` leaf."""
  return any(isinstance(g, Sliced)
             for g in jax.tree.leaves(groups, is_leaf=groups_lib._is_none))


def _flat(tree: Any) -> dict[str, Any]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=groups_lib._leaf_or_masked)
  return {groups_lib.path_str(p): x for p, x in leaves}


def split(groups: groups_lib.Groups, *trees: Any, caller: str) -> tuple[Any, ...]:
  """``(groups', *trees')``: flat ``{path: leaf}`` dicts in which each sliced leaf is a tuple
  of its slices (and its group the tuple of their groups).

  Groups without slices come back unchanged, with the trees. A leaf that is ``None`` or
  ``optax.MaskedNode`` is repeated once per slice. Raises ``ValueError`` naming
  ``caller`` and the leaf where a :class:`~normreg.groups.Sliced` spec does not fit the
  first tree's shape.
  """
  if not has_slices(groups):
    return (groups, *trees)
  by_path = groups_lib.groups_by_path(groups, caller)
  flats = [_flat(t) for t in trees]
  for path, spec in by_path.items():
    if isinstance(spec, Sliced):
      for flat in flats:
        if path in flat and not groups_lib._leaf_or_masked(flat[path]):
          spec.check_shape(jnp.shape(flat[path]), f"{caller}: {path!r}")

  def cut(path, x):
    spec = by_path.get(path)
    if not isinstance(spec, Sliced):
      return x
    if groups_lib._leaf_or_masked(x):
      return tuple(x for _ in spec.groups)
    axis = spec.slice_axis(jnp.ndim(x))
    x = jnp.reshape(x, spec.viewed(jnp.shape(x)))
    return tuple(jnp.take(x, i, axis) for i in range(len(spec.groups)))

  flat_groups = {p: g.groups if isinstance(g, Sliced) else g for p, g in by_path.items()}
  return (flat_groups, *({p: cut(p, x) for p, x in flat.items()} for flat in flats))


def merge(groups: groups_lib.Groups, flat: dict[str, Any], like: Any,
          stack: bool = True) -> Any:
  """``flat`` (as :func:`split` gives) put back in ``like``'s structure.

  With ``stack``, each sliced leaf's slices are stacked back along its axis (updates,
  params); without, the tuple is kept (per-slice metrics of different shapes). A sliced
  leaf whose slices are all ``None``/``optax.MaskedNode`` comes back as ``like``'s leaf.
  """
  if not has_slices(groups):
    return flat
  by_path = groups_lib.groups_by_path(groups, "merge")
  leaves, treedef = jax.tree_util.tree_flatten_with_path(like, is_leaf=groups_lib._leaf_or_masked)
  out = []
  for p, x in leaves:
    path = groups_lib.path_str(p)
    value = flat[path]
    spec = by_path.get(path)
    if isinstance(spec, Sliced) and stack:
      if all(groups_lib._leaf_or_masked(v) for v in value):
        value = x
      else:
        value = jnp.stack(value, spec.slice_axis(jnp.ndim(x))).reshape(jnp.shape(x))
    out.append(value)
  return treedef.unflatten(out)


def expanded(groups: groups_lib.Groups, params: Any, caller: str) -> groups_lib.Groups:
  """The groups of the split params: ``groups`` itself without slices, else the flat
  ``{path: group}`` with a tuple per sliced leaf (for code that walks groups by path)."""
  return split(groups, params, caller=caller)[0]


def resolve(groups: groups_lib.GroupsOrFn, params: Any, *more: Any, caller: str,
            at_init: bool = False) -> tuple[Any, groups_lib.Resolved, list]:
  """``(groups, resolved, [params', *more'])``: ``groups`` (called on ``params`` if it is a
  function), :func:`normreg.groups.resolve`-d on the :func:`split` trees
  (:func:`normreg.groups.resolve_at_init` with ``at_init``), and those trees;
  ``merge(groups, ..., like)`` takes values on them back to the original structure."""
  groups = groups(params) if groups_lib.is_function(groups) else groups
  flat_groups, *trees = split(groups, params, *more, caller=caller)
  how = groups_lib.resolve_at_init if at_init else groups_lib.resolve
  return groups, how(flat_groups, trees[0], caller), trees


def honours_slices(factory: Callable[..., optax.GradientTransformation]
                   ) -> Callable[..., optax.GradientTransformationExtraArgs]:
  """Wraps a transform factory with a ``groups`` argument so that it takes per-slice groups.

  Where the groups hold no :class:`~normreg.groups.Sliced` leaf, the factory's own
  transform is returned unchanged. A function of the params is called once per ``init``
  and ``update`` (on the updates where no params are given), and the factory's
  transform is built with what it returns. Where there are slices, ``init`` and
  ``update`` run the factory's transform, built with the split groups, on the
  :func:`split` trees, and ``update`` stacks the updates back (:func:`merge`): the state
  is the split trees'. Builds on
  ``optax.GradientTransformationExtraArgs``: extra arguments pass through. A factory
  whose ``heuristic`` argument is true (AdamP's cosine test, which ignores ``groups``)
  is left as it is.
  """
  signature = inspect.signature(factory)
  name = factory.__name__

  @functools.wraps(factory)
  def wrapped(*args, **kwargs):
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    groups = bound.arguments["groups"]
    plain = optax.with_extra_args_support(factory(*args, **kwargs))
    dynamic = groups_lib.is_function(groups)
    if (not dynamic and not has_slices(groups)) or bound.arguments.get("heuristic"):
      return plain

    built: dict = {}  # the factory's transform per set of groups (one, as a rule)

    def parts(tree):
      """``(groups or None, transform)``: the groups (``groups(tree)`` for a function,
      called once) and the factory's transform built with them, split if sliced."""
      g = groups(tree) if dynamic else groups
      sliced = has_slices(g)
      given = expanded(g, tree, name) if sliced else g
      key = (sliced, tuple(sorted(groups_lib.groups_by_path(given, name).items())))
      if key not in built:
        arguments = dict(bound.arguments, groups=given)
        call = signature.bind(**arguments)
        built[key] = optax.with_extra_args_support(factory(*call.args, **call.kwargs))
      return (g if sliced else None), built[key]

    def init_fn(params):
      g, tx = parts(params)
      return tx.init(params if g is None else split(g, params, caller=name)[1])

    def update_fn(updates, state, params=None, **extra_args):
      # A groups function may be called on the updates, as optax.masked's mask is.
      g, tx = parts(params if params is not None else updates)
      if g is None:
        return tx.update(updates, state, params, **extra_args)
      if params is None:
        (_, flat_updates), flat_params = split(g, updates, caller=name), None
      else:
        _, flat_updates, flat_params = split(g, updates, params, caller=name)
      new, state = tx.update(flat_updates, state, flat_params, **extra_args)
      return merge(g, new, updates), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)

  return wrapped

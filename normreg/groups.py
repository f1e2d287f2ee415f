"""Scale-invariance groups: which parameters feed a normalization, and how.

A *groups* pytree has the structure of the params and one leaf per parameter:

- ``UNIT``: invariant per output unit. The unit is a slice along the LAST axis
  (Flax kernels are laid out ``(..., in, out)``), and its norm reduces over all
  other axes: ``f(x; w * a[None, ..., :]) = f(x; w)`` for every ``a > 0``.
  This is a Conv or Dense kernel followed by BatchNorm, or a WeightNorm ``v``.
- ``TENSOR``: invariant only as a whole: ``f(x; a w) = f(x; w)``. A Dense kernel
  followed by LayerNorm, a Conv kernel followed by GroupNorm.
- ``None``: not scale-invariant (norm scales and shifts, biases, the last
  layer, embeddings). Every normreg transform leaves these leaves alone.

Every transform, mask and metric in normreg reads this one pytree, whether it
was written by hand, matched from path rules (:func:`groups_from_rules`, in the
style of big_vision's ``(regex, value)`` lists) or found by automatic
differentiation (:func:`normreg.find_scale_invariant`).

Paths are ``"/"``-joined strings built from Linen dicts and NNX ``State`` alike:
``"conv/kernel"``, ``"blocks/0/conv1/kernel"`` (list indices are ``str``-ed, and
NNX's trailing ``.value`` attribute is dropped).

References:
  van Laarhoven, *L2 Regularization versus Batch and Weight Normalization*,
  2017 (arXiv 1706.05350).
"""

from __future__ import annotations

import enum
import re
from typing import Any, Callable, Sequence, Tuple, Union

import jax
import optax
from absl import logging

from normreg import _checks


class Invariance(str, enum.Enum):
  """How a parameter is scale-invariant: per output unit or as a whole."""

  UNIT = "unit"
  TENSOR = "tensor"

  def __repr__(self) -> str:
    return f"normreg.{self.name}"

  __str__ = __repr__


UNIT = Invariance.UNIT
TENSOR = Invariance.TENSOR

Group = Union[Invariance, None]
Groups = Any  # A pytree shaped like the params with ``Group`` leaves.
GroupsOrFn = Union[Groups, Callable[[Any], Groups]]
Rules = Sequence[Tuple[str, Group]]


def _is_none(x: Any) -> bool:
  return x is None


def _key_str(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_str(path: Sequence[Any]) -> str:
  """Joins a jax key path into ``"a/b/0/c"``; drops NNX's trailing ``value``."""
  keys = list(path)
  if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
    keys = keys[:-1]
  return "/".join(_key_str(k) for k in keys)


def param_paths(params: Any) -> list[str]:
  """The ``"/"``-joined path of every leaf of ``params``, in flattening order."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_none)
  return [path_str(p) for p, _ in leaves]


def _check_group(value: Any, where: str) -> Group:
  if value is None or isinstance(value, Invariance):
    return value
  if isinstance(value, str) and value in ("unit", "tensor"):
    return Invariance(value)
  raise ValueError(
      f"{where}: a group must be normreg.UNIT, normreg.TENSOR or None, got {value!r}.")


def groups_from_rules(params: Any, rules: Rules, *, log: bool = True) -> Groups:
  """Builds the groups pytree from ordered ``(regex, group)`` rules.

  Each parameter's ``"/"``-joined path is matched with ``re.fullmatch`` against
  the patterns in order; the first match wins (big_vision's convention for
  per-parameter settings). Every match is logged with absl.

  Args:
    params: the params pytree (Linen dict or NNX ``State``).
    rules: ordered ``(pattern, group)`` pairs, ``group`` one of ``UNIT``,
      ``TENSOR``, ``None``. End with ``(".*", None)`` to leave the rest alone.
    log: log which rule each parameter matched.

  Returns:
    A pytree shaped like ``params`` with ``UNIT``/``TENSOR``/``None`` leaves.

  Raises:
    ValueError: a pattern that matches no parameter, a parameter that no rule
      covers, or a group value that is none of the three; the message names
      them.

  Example:

    >>> import jax.numpy as jnp, normreg
    >>> params = {"conv": {"kernel": jnp.ones((3, 3, 3, 8))},
    ...           "bn": {"scale": jnp.ones(8), "bias": jnp.zeros(8)}}
    >>> g = normreg.groups_from_rules(params, [(".*kernel", normreg.UNIT), (".*", None)])
    >>> g["conv"]["kernel"], g["bn"]["scale"]
    (normreg.UNIT, None)
  """
  rules = [(pattern, _check_group(group, f"rule {pattern!r}")) for pattern, group in rules]
  compiled = []
  for pattern, group in rules:
    try:
      compiled.append((re.compile(pattern), group))
    except re.error as e:
      raise ValueError(f"groups_from_rules: rule {pattern!r} is not a valid regex: {e}") from e
  used = [False] * len(rules)
  uncovered = []

  def pick(path, leaf):
    name = path_str(path)
    for i, (regex, group) in enumerate(compiled):
      if regex.fullmatch(name):
        used[i] = True
        if log:
          logging.info("normreg groups: %-40s %-8s (rule %r)", name,
                       group.value if group else "None", rules[i][0])
        return group
    uncovered.append(name)
    return None

  groups = jax.tree_util.tree_map_with_path(pick, params)
  unused = [pattern for (pattern, _), u in zip(rules, used) if not u]
  if unused:
    raise ValueError(
        f"groups_from_rules: rule(s) {unused} match no parameter. "
        f"Parameter paths are: {param_paths(params)}")
  if uncovered:
    raise ValueError(
        f"groups_from_rules: no rule covers parameter(s) {uncovered}; "
        "add a rule for them, or end the rules with ('.*', None).")
  return groups


def resolve(groups: GroupsOrFn, params: Any, caller: str) -> Groups:
  """Returns the groups pytree (calling ``groups(params)`` if callable), checked.

  Checks that ``groups`` has exactly the structure of ``params`` (``None`` and
  ``optax.MaskedNode`` leaves of ``params`` count as leaves) and raises a
  ``ValueError`` naming ``caller`` and the first path that differs.
  """
  if callable(groups) and not isinstance(groups, (dict, list, tuple)) and not hasattr(
      groups, "items"):
    groups = groups(params)
  check_structure(groups, params, caller)
  return groups


def _leaf_or_masked(x: Any) -> bool:
  return x is None or type(x).__name__ == "MaskedNode"


def check_structure(groups: Groups, params: Any, caller: str) -> None:
  """Raises ``ValueError`` unless ``groups`` and ``params`` have the same paths."""
  g_leaves, g_def = jax.tree_util.tree_flatten_with_path(groups, is_leaf=_is_none)
  p_leaves, p_def = jax.tree_util.tree_flatten_with_path(params, is_leaf=_leaf_or_masked)
  g_paths = [path_str(p) for p, _ in g_leaves]
  p_paths = [path_str(p) for p, _ in p_leaves]
  if g_paths != p_paths:
    missing = [p for p in p_paths if p not in set(g_paths)]
    extra = [p for p in g_paths if p not in set(p_paths)]
    raise ValueError(
        f"{caller}: the groups pytree does not match the params: "
        f"params have {len(p_paths)} leaves, groups {len(g_paths)}; "
        f"paths in params but not in groups: {missing[:5]}; "
        f"in groups but not in params: {extra[:5]}. Build groups from these "
        "very params (normreg.find_scale_invariant or normreg.groups_from_rules).")
  for path, g in g_leaves:
    _check_group(g, f"{caller}: groups leaf {path_str(path)!r}")


def as_mask(groups: Groups) -> Any:
  """The boolean mask (``True`` where grouped) for ``optax.masked`` and friends.

  Example, decoupled weight decay on the scale-invariant weights only (optax's
  own transform; this is PyTorch's ``weight_decay`` convention, ``+wd*w``):

    >>> import jax.numpy as jnp, optax, normreg
    >>> params = {"kernel": jnp.ones((2, 3)), "scale": jnp.ones(3)}
    >>> groups = {"kernel": normreg.UNIT, "scale": None}
    >>> tx = optax.add_decayed_weights(1e-4, mask=normreg.as_mask(groups))
    >>> normreg.as_mask(groups)
    {'kernel': True, 'scale': False}
  """
  return jax.tree.map(lambda g: g is not None, groups, is_leaf=_is_none)


def map_grouped(fn: Callable[..., Any], groups: Groups, tree: Any, *rest: Any) -> Any:
  """``fn(group, leaf, *rest_leaves)`` on grouped leaves; other leaves pass through.

  ``tree`` leaves that are ``None`` or ``optax.MaskedNode`` (as inside
  ``optax.masked``) are passed through untouched, as are leaves whose group is
  ``None``. Leaves are matched by tree structure, never by position.
  """

  def f(group, leaf, *others):
    if group is None or _leaf_or_masked(leaf):
      return leaf
    return fn(group, leaf, *others)

  return jax.tree.map(f, groups, tree, *rest, is_leaf=_is_none)


def stateless_on_groups(caller: str, groups: GroupsOrFn,
                        fn: Callable[..., Any]) -> optax.GradientTransformationExtraArgs:
  """A stateless transform applying ``fn(group, update, param)`` to grouped leaves.

  Builds on ``optax.stateless`` (empty state, ``update(updates, state, params)``)
  with ``optax.with_extra_args_support``; adds the params check, the groups
  resolution and :func:`map_grouped`.
  """
  def f(updates, params):
    _checks.require_params(params, caller)
    return map_grouped(fn, resolve(groups, params, caller), updates, params)

  return optax.with_extra_args_support(optax.stateless(f))


def reduction_axes(group: Invariance, ndim: int) -> tuple[int, ...]:
  """Axes a group's norm reduces over: all but the last for UNIT, all for TENSOR."""
  if group is UNIT and ndim >= 1:
    return tuple(range(ndim - 1))
  return tuple(range(ndim))


def summary(groups: Groups) -> str:
  """A one-line-per-parameter table of the groups, for logs."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(groups, is_leaf=_is_none)
  return "\n".join(f"{path_str(p):48s} {g.value if g else '-'}" for p, g in leaves)

"""Scale-invariance groups: which parameters feed a normalization, and how.

A *groups* pytree has the structure of the params and one leaf per parameter:
a :class:`Group` or ``None``. A group has a kind, and optionally stack axes and
a joint tag:

- ``UNIT``: invariant per output unit. The unit is a slice along the LAST axis
  (Flax kernels are laid out ``(..., in, out)``), and its norm reduces over all
  other axes: ``f(x; w * a[None, ..., :]) = f(x; w)`` for every ``a > 0``.
  This is a Conv or Dense kernel followed by BatchNorm, or a WeightNorm ``v``.
- ``axis=a`` (:func:`unit`): the unit is a slice along axis ``a`` instead, counted
  after the stack axes (negative from the end). Output-first layouts need it:
  equinox and every PyTorch port store ``Conv2d`` weights ``(out, in, kh, kw)`` and
  ``Linear`` weights ``(out, in)``, so their units are ``unit(axis=0)``.
- ``TENSOR``: invariant only as a whole: ``f(x; a w) = f(x; w)``. A Dense kernel
  followed by LayerNorm, a Conv kernel followed by GroupNorm.
- ``None``: not scale-invariant (norm scales and shifts, biases, the last
  layer, embeddings). Every normreg transform leaves these leaves alone.
- ``stack=k`` (:func:`unit`, :func:`tensor`): the first ``k`` axes index
  independent copies, as in layers stacked by ``nnx.scan``/``nnx.vmap``/
  ``linen.scan`` (``(layers, ..., in, out)``) or heads stored on an axis. The
  unit is then per copy and per output unit (UNIT), or per copy (TENSOR): norms
  never reduce over stack axes, so each layer keeps its own norm and effective
  learning rate.
- ``joint="tag"``: every leaf carrying the same tag belongs to ONE group, whose
  norm is taken over all of them: a Dense kernel and its bias before a
  LayerNorm are invariant only together, ``f(a W, a b) = f(W, b)``. Members
  must agree on kind and stack axes, and their per-group shapes must match.

Every transform, mask and metric in normreg reads this one pytree, whether it
was written by hand, matched from path rules (:func:`groups_from_rules`, in the
style of big_vision's ``(regex, value)`` lists) or found by automatic
differentiation (:func:`normreg.find_scale_invariant`).

Leaves are matched by their ``"/"``-joined *path*, never by position or
container type: ``"conv/kernel"``, ``"blocks/0/conv1/kernel"`` (list indices are
``str``-ed, NNX's trailing ``.value`` attribute is dropped). So groups built on
an NNX ``State`` of ``Variable`` boxes apply to the raw arrays that
``nnx.Optimizer`` hands to optax, to a Linen dict with the same paths, and so on.

References:
  van Laarhoven, *L2 Regularization versus Batch and Weight Normalization*,
  2017 (arXiv 1706.05350).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import jax
import optax
from absl import logging

from normreg import _checks


class Invariance(str, enum.Enum):
  """How a parameter is scale-invariant: per output unit or as a whole."""

  UNIT = "unit"
  TENSOR = "tensor"

  def __repr__(self) -> str:
    return f"normreg.Invariance.{self.name}"


@dataclasses.dataclass(frozen=True)
class Group:
  """How one parameter leaf is scale-invariant (a leaf of the groups pytree).

  Attributes:
    kind: ``Invariance.UNIT`` (per output unit) or ``Invariance.TENSOR`` (per tensor).
    stack: number of leading axes that index independent copies (layers
      stacked by scan or vmap, heads): the norm is per copy.
    joint: a tag shared by leaves that are invariant only together (a kernel
      and its bias before LayerNorm); their norm is taken over all of them.
    axis: for ``UNIT``, the axis of the output units, counted after the ``stack``
      axes (negative from the end): -1 (Flax, ``(..., in, out)``) or 0 (equinox
      and PyTorch ports, ``(out, in, ...)``).
  """

  kind: Invariance
  stack: int = 0
  joint: Optional[str] = None
  axis: int = -1

  def __post_init__(self):
    object.__setattr__(self, "kind", Invariance(self.kind))
    if not isinstance(self.stack, int) or isinstance(self.stack, bool) or self.stack < 0:
      raise ValueError(f"a group's stack must be an integer >= 0, got {self.stack!r}.")
    if self.joint is not None and (not isinstance(self.joint, str) or not self.joint):
      raise ValueError(f"a group's joint tag must be a non-empty string, got {self.joint!r}.")
    if not isinstance(self.axis, int) or isinstance(self.axis, bool):
      raise ValueError(f"a group's axis must be an integer, got {self.axis!r}.")
    if self.kind is Invariance.TENSOR and self.axis != -1:
      raise ValueError(f"a tensor group has no unit axis, got axis={self.axis!r}.")

  @property
  def value(self) -> str:
    """``"unit"`` or ``"tensor"``."""
    return self.kind.value

  @property
  def plain(self) -> bool:
    """No stack axes, no joint tag, the last axis: ``UNIT`` or ``TENSOR`` itself."""
    return self.stack == 0 and self.joint is None and self.axis == -1

  def _options(self) -> list[tuple[str, Any]]:
    return ([("axis", self.axis)] if self.axis != -1 else []) + (
        [("stack", self.stack)] if self.stack else []) + (
        [("joint", self.joint)] if self.joint is not None else [])

  def __repr__(self) -> str:
    if self.plain:
      return f"normreg.{self.kind.name}"
    args = ", ".join(f"{k}={v!r}" for k, v in self._options())
    return f"normreg.{self.kind.value}({args})"

  def __str__(self) -> str:
    """One short line: ``unit``, ``unit axis=0``, ``unit stack=1``, ``tensor joint=dense``."""
    return " ".join([self.kind.value] + [f"{k}={v}" for k, v in self._options()])

  # --------------------------------------------------------------- geometry

  def check_shape(self, shape: Sequence[int], where: str) -> None:
    """Raises ``ValueError`` if a leaf of ``shape`` cannot carry this group."""
    if self.kind is Invariance.UNIT:
      per_copy = len(shape) - self.stack
      if not -per_copy <= self.axis < per_copy:
        need = self.stack + (self.axis + 1 if self.axis >= 0 else -self.axis)
        raise ValueError(
            f"{where}: a {self} group needs at least {need} axes ({self.stack} stack axes, "
            f"then unit axis {self.axis}), the leaf has shape {tuple(shape)}.")
    elif len(shape) < self.stack:
      raise ValueError(f"{where}: a {self} group needs at least {self.stack} axes, the leaf "
                       f"has shape {tuple(shape)}.")

  def unit_axis(self, ndim: int) -> int:
    """The index of the unit axis in a leaf of ``ndim`` axes (``UNIT`` only)."""
    return self.stack + self.axis % (ndim - self.stack)

  def reduced_axes(self, ndim: int) -> tuple[int, ...]:
    """Axes the norm sums over: all but the stack axes and, for UNIT, the unit axis."""
    skip = self.unit_axis(ndim) if self.kind is Invariance.UNIT else None
    return tuple(a for a in range(self.stack, ndim) if a != skip)

  def group_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
    """Shape of the per-group values of a leaf: ``stack + (out,)`` or ``stack``."""
    shape = tuple(shape)
    unit = (shape[self.unit_axis(len(shape))],) if self.kind is Invariance.UNIT else ()
    return shape[:self.stack] + unit

  def keepdims_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
    """``shape`` with the reduced axes set to 1: per-group values broadcast from it."""
    reduced = set(self.reduced_axes(len(shape)))
    return tuple(1 if a in reduced else n for a, n in enumerate(shape))


def unit(stack: int = 0, joint: Optional[str] = None, axis: int = -1) -> Group:
  """A per-output-unit group, with ``stack`` leading copy axes, an optional joint tag and
  the unit's ``axis`` (counted after the stack axes; -1, the last, is Flax's layout).

  Examples:
    >>> unit(stack=1)
    normreg.unit(stack=1)
    >>> unit(axis=0)  # equinox / PyTorch layouts: (out, in, kh, kw)
    normreg.unit(axis=0)
    >>> unit() == UNIT
    True
  """
  return _intern(Group(Invariance.UNIT, stack, joint, axis))


def tensor(stack: int = 0, joint: Optional[str] = None) -> Group:
  """A whole-tensor group (per copy with ``stack``), with an optional joint tag.

  Examples:
    >>> tensor(joint="dense")
    normreg.tensor(joint='dense')
  """
  return _intern(Group(Invariance.TENSOR, stack, joint))


_PLAIN: dict = {}


def _intern(group: Group) -> Group:
  """The one ``UNIT``/``TENSOR`` object for a plain group (so ``g is normreg.UNIT`` works)."""
  return _PLAIN.setdefault(group.kind, group) if group.plain else group


UNIT = unit()
TENSOR = tensor()


@dataclasses.dataclass(frozen=True)
class Sliced:
  """Different groups for the slices of one leaf along an axis (a fused kernel).

  Slice ``i`` is ``w.take(i, axis)``, the axis dropped, and ``groups[i]`` is its
  group (or ``None``), written for the slice's shape. A fused q/k/v kernel
  ``(3, heads, d, head_dim)`` behind QK-norm with no post-norm is
  ``sliced(tensor(stack=1), tensor(stack=1), None)``: q and k per head, v not
  invariant; a fused gate/up kernel ``(2, hidden, d)`` before a post-norm is
  ``sliced(None, TENSOR)``. Every normreg transform, metric and rule reads it: the
  slices are then leaves of their own, ``"path/0"``, ``"path/1"``, ... (see
  :mod:`normreg.slicing`).

  Slices concatenated along one axis, as PyTorch ports and timm store q/k/v (a
  ``(3 * heads * head_dim, d)`` weight, each head a block of ``head_dim`` rows), are read
  through ``view``: that axis is reshaped to ``view`` first (``(3, heads, head_dim)``), and
  the slices lie along its first entry; each slice's shape then holds the rest of the
  view (``(heads, head_dim, d)``: q per head is ``unit(axis=0)``).

  Attributes:
    groups: one ``Group`` or ``None`` per slice.
    axis: the axis the slices lie along (0, the leading axis, by default;
      ``1`` behind a layer axis stacked by scan).
    view: ``None``, or the shape ``axis`` is read in (its product is the axis' length,
      its first entry the number of slices).
  """

  groups: Tuple[Optional[Group], ...]
  axis: int = 0
  view: Optional[Tuple[int, ...]] = None

  def __post_init__(self):
    groups = tuple(as_group(g, f"sliced: slice {i}") if not isinstance(g, Sliced) else g
                   for i, g in enumerate(self.groups))
    if any(isinstance(g, Sliced) for g in groups):
      raise ValueError("sliced: a slice's group cannot itself be sliced; slice along one axis.")
    if not groups:
      raise ValueError("sliced: give one group (or None) per slice, got none.")
    if not isinstance(self.axis, int) or isinstance(self.axis, bool):
      raise ValueError(f"sliced: axis must be an integer, got {self.axis!r}.")
    if self.view is not None:
      view = tuple(self.view)
      if not view or any(not isinstance(n, int) or n < 1 for n in view) or (
          view[0] != len(groups)):
        raise ValueError(f"sliced: view={self.view!r} must be positive integers whose first is "
                         f"the number of slices, {len(groups)}.")
      object.__setattr__(self, "view", view)
    object.__setattr__(self, "groups", groups)

  def slice_axis(self, ndim: int) -> int:
    """The slicing axis of a leaf of ``ndim`` axes (``axis`` made non-negative)."""
    return self.axis % ndim

  def viewed(self, shape: Sequence[int]) -> tuple[int, ...]:
    """The shape a leaf of ``shape`` is sliced in: its axis replaced by ``view``."""
    shape = tuple(shape)
    if self.view is None:
      return shape
    axis = self.slice_axis(len(shape))
    return shape[:axis] + self.view + shape[axis + 1:]

  def check_shape(self, shape: Sequence[int], where: str) -> None:
    """Raises ``ValueError`` naming ``where`` unless a leaf of ``shape`` has one slice per
    group along ``axis`` (through ``view``) and each group fits the slice."""
    shape = tuple(shape)
    in_range = -len(shape) <= self.axis < len(shape)
    if self.view is not None and in_range and math.prod(self.view) != shape[self.axis]:
      raise ValueError(
          f"{where}: {self} reads axis {self.axis} as {self.view}, but the leaf has shape "
          f"{shape}; the view's product must be that axis' length.")
    full = self.viewed(shape) if in_range else shape
    if not in_range or full[self.axis % len(shape)] != len(self.groups):
      raise ValueError(
          f"{where}: {self} gives {len(self.groups)} slices along axis {self.axis}, but the "
          f"leaf has shape {shape}; give one group (or None) per slice along that axis.")
    axis = self.slice_axis(len(shape))
    part = full[:axis] + full[axis + 1:]
    for i, g in enumerate(self.groups):
      if g is not None:
        g.check_shape(part, f"{where} slice {i}")

  def __repr__(self) -> str:
    args = [repr(g) if g is not None else "None" for g in self.groups]
    args += [f"axis={self.axis}"] if self.axis else []
    args += [f"view={self.view}"] if self.view is not None else []
    return f"normreg.sliced({', '.join(args)})"

  def __str__(self) -> str:
    """One line: ``sliced(tensor stack=1 | tensor stack=1 | -)``."""
    parts = " | ".join(str(g) if g is not None else "-" for g in self.groups)
    options = ([f"axis={self.axis}"] if self.axis else []) + (
        [f"view={'x'.join(map(str, self.view))}"] if self.view is not None else [])
    return f"sliced({parts}{'; ' + ' '.join(options) if options else ''})"


def sliced(*groups: Any, axis: int = 0, view: Optional[Sequence[int]] = None) -> Sliced:
  """Per-slice groups of a fused leaf: ``groups[i]`` for ``w.take(i, axis)`` (the axis read
  as ``view`` first, if given: see :class:`Sliced`).

  Examples:
    >>> qkv = sliced(tensor(stack=1), tensor(stack=1), TENSOR)  # (3, heads, d, head_dim)
    >>> print(qkv)
    sliced(tensor stack=1 | tensor stack=1 | tensor)
    >>> sliced(None, TENSOR)  # gate/up (2, hidden, d): the gate feeds a GeLU
    normreg.sliced(None, normreg.TENSOR)
    >>> print(sliced(unit(axis=0), unit(axis=0), None, view=(3, 4, 8)))  # (96, d): q/k/v rows
    sliced(unit axis=0 | unit axis=0 | -; view=3x4x8)
  """
  return Sliced(tuple(groups), axis, None if view is None else tuple(view))


GroupLeaf = Optional[Group]
Groups = Any  # A pytree shaped like the params with ``Group``/``None`` leaves.
GroupsOrFn = Union[Groups, Callable[[Any], Groups]]
Rules = Sequence[Tuple[str, Any]]


def _is_none(x: Any) -> bool:
  return x is None


def _leaf_or_masked(x: Any) -> bool:
  return x is None or type(x).__name__ == "MaskedNode"


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
  leaves, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=_leaf_or_masked)
  return [path_str(p) for p, _ in leaves]


def as_group(value: Any, where: str) -> GroupLeaf:
  """``value`` as a :class:`Group` or ``None``; accepts ``Invariance`` and ``"unit"``/
  ``"tensor"`` too. Raises ``ValueError`` naming ``where`` otherwise."""
  if value is None or isinstance(value, Sliced):
    return value
  if isinstance(value, Group):
    return _intern(value)
  if isinstance(value, (Invariance, str)) and value in ("unit", "tensor"):
    return _intern(Group(Invariance(value)))
  raise ValueError(
      f"{where}: a group must be normreg.UNIT, normreg.TENSOR, normreg.unit(...), "
      f"normreg.tensor(...), normreg.sliced(...) or None, got {value!r}.")


# ------------------------------------------------------------------------ rules


def groups_from_rules(params: Any, rules: Rules, *, log: bool = True) -> Groups:
  """Builds the groups pytree from ordered ``(regex, group)`` rules.

  Each parameter's ``"/"``-joined path is matched with ``re.fullmatch`` against
  the patterns in order; the first match wins (big_vision's convention for
  per-parameter settings). Every match is logged with absl. A group's joint
  tag is expanded with the match (``re.Match.expand``), so one rule can name a
  joint group per module: ``(r"(blocks/\\d+/dense)/(kernel|bias)",
  normreg.tensor(joint=r"\\1"))``.

  Args:
    params: the params pytree (Linen dict or NNX ``State``).
    rules: ordered ``(pattern, group)`` pairs, ``group`` one of ``UNIT``,
      ``TENSOR``, ``unit(stack=..., joint=...)``, ``tensor(...)``, ``None``.
      End with ``(".*", None)`` to leave the rest alone.
    log: log which rule each parameter matched.

  Returns:
    A pytree shaped like ``params`` with ``Group``/``None`` leaves.

  Raises:
    ValueError: a pattern that matches no parameter, a parameter that no rule
      covers, a group value that is none of the above, a group that does not
      fit its leaf's shape, or a joint group whose members disagree; the
      message names them.

  Examples:
    >>> import jax.numpy as jnp, normreg
    >>> params = {"conv": {"kernel": jnp.ones((3, 3, 3, 8))},
    ...           "bn": {"scale": jnp.ones(8), "bias": jnp.zeros(8)}}
    >>> g = normreg.groups_from_rules(params, [(".*kernel", normreg.UNIT), (".*", None)])
    >>> g["conv"]["kernel"], g["bn"]["scale"]
    (normreg.UNIT, None)
  """
  rules = [(pattern, as_group(group, f"rule {pattern!r}")) for pattern, group in rules]
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
      match = regex.fullmatch(name)
      if match:
        used[i] = True
        group = _expand_joint(group, match)
        if log:
          logging.info("normreg groups: %-40s %-8s (rule %r)", name,
                       str(group) if group else "None", rules[i][0])
        return group
    uncovered.append(name)
    return None

  groups = jax.tree_util.tree_map_with_path(pick, params, is_leaf=_leaf_or_masked)
  unused = [pattern for (pattern, _), u in zip(rules, used) if not u]
  if unused:
    raise ValueError(
        f"groups_from_rules: rule(s) {unused} match no parameter. "
        f"Parameter paths are: {param_paths(params)}")
  if uncovered:
    raise ValueError(
        f"groups_from_rules: no rule covers parameter(s) {uncovered}; "
        "add a rule for them, or end the rules with ('.*', None).")
  from normreg import slicing  # pylint: disable=g-import-not-at-top (it imports this module)
  resolve(*slicing.split(groups, params, caller="groups_from_rules"), "groups_from_rules")
  return groups


def _expand_joint(group: Any, match: re.Match) -> Any:
  """``group`` with its joint tag (each slice's, for :class:`Sliced`) expanded by ``match``."""
  if isinstance(group, Sliced):
    return dataclasses.replace(group, groups=tuple(_expand_joint(g, match) for g in group.groups))
  if group is not None and group.joint is not None:
    return dataclasses.replace(group, joint=match.expand(group.joint))
  return group


# -------------------------------------------------------------------- resolving


@dataclasses.dataclass(frozen=True)
class Resolved:
  """A groups pytree checked against a params tree: the group of each path.

  Attributes:
    by_path: ``{path: Group}`` for every grouped leaf.
    members: ``{joint tag: (paths...)}`` for every joint group.
    group_shapes: ``{path: shape of its per-group values}``.
  """

  by_path: dict
  members: dict
  group_shapes: dict

  def key(self, path: str) -> str:
    """The group a path belongs to: its joint tag, or the path itself."""
    joint = self.by_path[path].joint
    return path if joint is None else "joint:" + joint


def groups_by_path(groups: Groups, caller: str) -> dict[str, GroupLeaf]:
  """``{path: Group or None}`` of a groups pytree (any container types)."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(groups, is_leaf=_is_none)
  return {path_str(p): as_group(g, f"{caller}: groups leaf {path_str(p)!r}") for p, g in leaves}


def is_function(groups: GroupsOrFn) -> bool:
  """Whether ``groups`` is a function of the params (as ``optax.masked``'s mask) rather
  than a groups pytree. A pytree is data and is never called, even when its container
  is callable: an equinox ``Module`` (the groups :func:`normreg.find_scale_invariant`
  returns for an equinox model) defines ``__call__`` as the model's forward pass."""
  return callable(groups) and jax.tree_util.treedef_is_leaf(jax.tree.structure(groups))


def resolve(groups: GroupsOrFn, params: Any, caller: str) -> Resolved:
  """The groups of ``params`` (``groups(params)`` if it is a function), checked.

  ``groups`` and ``params`` must have the same ``"/"``-joined paths (``None``
  and ``optax.MaskedNode`` leaves of ``params`` count as leaves); their
  containers may differ (NNX ``State`` with or without ``Variable`` boxes,
  dicts). Each group must fit its leaf's shape, and the members of a joint
  group must agree on kind, stack axes and per-group shape. Raises a
  ``ValueError`` naming ``caller`` and the first thing that differs.
  """
  if is_function(groups):  # as optax.masked's mask: a pytree or a function of the params
    groups = groups(params)
  by_path = groups_by_path(groups, caller)
  p_leaves, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=_leaf_or_masked)
  shapes = {path_str(p): (None if _leaf_or_masked(x) else tuple(getattr(x, "shape", ())))
            for p, x in p_leaves}
  if set(by_path) != set(shapes):
    missing = [p for p in shapes if p not in by_path]
    extra = [p for p in by_path if p not in shapes]
    raise ValueError(
        f"{caller}: the groups pytree does not match the params: "
        f"params have {len(shapes)} leaves, groups {len(by_path)}; "
        f"paths in params but not in groups: {missing[:5]}; "
        f"in groups but not in params: {extra[:5]}. Build groups from these "
        "very params (normreg.find_scale_invariant or normreg.groups_from_rules).")
  grouped, group_shapes, members = {}, {}, {}
  for path, group in by_path.items():
    if group is None:
      continue
    if isinstance(group, Sliced):
      raise ValueError(
          f"{caller}: {path!r} is grouped per slice, {group}, and {caller} reads whole-leaf "
          "groups; split the slices into leaves first (normreg.slicing.split), as every "
          "public normreg transform and metric does.")
    grouped[path] = group
    if group.joint is not None:
      members.setdefault(group.joint, []).append(path)
    shape = shapes[path]
    if shape is not None:
      group.check_shape(shape, f"{caller}: {path!r}")
      group_shapes[path] = group.group_shape(shape)
  for tag, paths in members.items():
    first = grouped[paths[0]]
    for path in paths[1:]:
      g = grouped[path]
      if (g.kind, g.stack) != (first.kind, first.stack):
        raise ValueError(f"{caller}: joint group {tag!r} mixes {first} ({paths[0]!r}) and {g} "
                         f"({path!r}); its members must share kind and stack axes.")
      if path in group_shapes and paths[0] in group_shapes and (
          group_shapes[path] != group_shapes[paths[0]]):
        raise ValueError(f"{caller}: joint group {tag!r}: {path!r} has per-group shape "
                         f"{group_shapes[path]} but {paths[0]!r} has "
                         f"{group_shapes[paths[0]]}; members must share their stack axes "
                         "and, for UNIT, their output axis.")
  return Resolved(grouped, {k: tuple(v) for k, v in members.items()}, group_shapes)


_WARNED_EMPTY: set = set()


def resolve_at_init(groups: GroupsOrFn, params: Any, caller: str) -> Resolved:
  """:func:`resolve` at a transform's ``init``, with one warning line if no leaf is
  grouped (once per ``groups`` object): the transform would then do nothing, and a
  run would train as its base optimizer without a word. Detection returns no group for
  a normalization in evaluation mode, a batch of one, or a forward that returns its
  state too."""
  resolved = resolve(groups, params, caller)
  if not resolved.by_path and id(groups) not in _WARNED_EMPTY:
    _WARNED_EMPTY.add(id(groups))
    logging.warning(
        "normreg: %s was given groups with no scale-invariant leaf among %d parameters: it "
        "acts as its base optimizer. (find_scale_invariant finds none for a normalization in "
        "evaluation mode, a batch of one, or a forward that returns its state too.)",
        caller, len(param_paths(params)))
  return resolved


def as_mask(groups: Groups) -> Any:
  """The boolean mask (``True`` where grouped) for ``optax.masked`` and friends.

  The example decays the scale-invariant weights only, by optax's own
  transform (PyTorch's ``weight_decay`` convention, ``+wd*w``).

  Examples:
    >>> import jax.numpy as jnp, optax, normreg
    >>> params = {"kernel": jnp.ones((2, 3)), "scale": jnp.ones(3)}
    >>> groups = {"kernel": normreg.UNIT, "scale": None}
    >>> mask = normreg.as_mask(groups)
    >>> mask
    {'kernel': True, 'scale': False}
    >>> tx = optax.add_decayed_weights(0.5, mask=mask)
    >>> updates, _ = tx.update({"kernel": jnp.zeros((2, 3)), "scale": jnp.zeros(3)},
    ...                        tx.init(params), params)
    >>> float(updates["kernel"][0, 0]), float(updates["scale"][0])
    (0.5, 0.0)
  """
  def leaf(path, g):
    if isinstance(g, Sliced):
      raise ValueError(
          f"as_mask: {path_str(path)!r} is grouped per slice, {g}; a boolean mask takes or "
          "leaves whole leaves. Decay the grouped slices with normreg.add_decayed_weights(wd, "
          "groups) (optax's convention, +wd*w) or normreg.add_l2_penalty(lam, groups).")
    return g is not None

  return jax.tree_util.tree_map_with_path(leaf, groups, is_leaf=_is_none)


def mask_like(groups: GroupsOrFn, tree: Any) -> Any:
  """The boolean mask of :func:`as_mask`, with ``tree``'s structure (matched by path).

  For ``optax.masked`` when the groups use other containers than the updates
  (an NNX ``State`` of ``Variable`` boxes against the raw arrays that
  ``nnx.Optimizer`` passes): ``optax.masked(tx, lambda t: mask_like(groups, t))``.
  """
  resolved = resolve(groups, tree, "mask_like")
  return jax.tree_util.tree_map_with_path(
      lambda path, _: path_str(path) in resolved.by_path, tree, is_leaf=_leaf_or_masked)


def map_grouped(fn: Callable[..., Any], groups: GroupsOrFn, tree: Any, *rest: Any) -> Any:
  """``fn(group, leaf, *rest_leaves)`` on grouped leaves; other leaves pass through.

  ``tree`` leaves that are ``None`` or ``optax.MaskedNode`` (as inside
  ``optax.masked``) are passed through untouched, as are leaves whose group is
  ``None``. Leaves are matched by path, never by position: ``groups`` may use
  other containers than ``tree`` (``rest`` must have ``tree``'s structure).
  Leafwise only: for norms over groups see :mod:`normreg.reductions`.
  """
  groups = groups(tree) if is_function(groups) else groups
  from normreg import slicing  # pylint: disable=g-import-not-at-top (it imports this module)
  if slicing.has_slices(groups):  # each sliced leaf as leaves of its own, stacked back after
    flat_groups, *flat = slicing.split(groups, tree, *rest, caller="map_grouped")
    return slicing.merge(groups, map_grouped(fn, flat_groups, *flat), tree)
  by_path = groups_by_path(groups, "map_grouped")

  def f(path, leaf, *others):
    group = by_path.get(path_str(path))
    if group is None or _leaf_or_masked(leaf):
      return leaf
    return fn(group, leaf, *others)

  return jax.tree_util.tree_map_with_path(f, tree, *rest, is_leaf=_leaf_or_masked)


def transform_on_groups(caller: str, groups: GroupsOrFn,
                        fn: Callable[[Resolved, Any, Any], Any]
                        ) -> optax.GradientTransformationExtraArgs:
  """A stateless transform ``updates -> fn(resolved, updates, params)``.

  Builds on ``optax.stateless`` (empty state, ``update(updates, state, params)``)
  with ``optax.with_extra_args_support``, and adds the params check, the groups
  resolution (:func:`resolve`) at ``init`` (so mismatched groups fail there)
  and at every ``update``.
  """
  def f(updates, params):
    _checks.require_params(params, caller)
    return fn(resolve(groups, params, caller), updates, params)

  return checked_at_init(caller, groups, optax.stateless(f))


def checked_at_init(caller: str, groups: GroupsOrFn, tx: optax.GradientTransformation
                    ) -> optax.GradientTransformationExtraArgs:
  """``tx`` whose ``init`` first checks ``groups`` against the params (:func:`resolve`),
  so that mismatched groups fail there, under ``caller``'s name."""
  tx = optax.with_extra_args_support(tx)

  def init_fn(params):
    resolve_at_init(groups, params, caller)
    return tx.init(params)

  return optax.GradientTransformationExtraArgs(init_fn, tx.update)


def stateless_on_groups(caller: str, groups: GroupsOrFn,
                        fn: Callable[..., Any]) -> optax.GradientTransformationExtraArgs:
  """A stateless transform applying ``fn(group, update, param)`` to grouped leaves (leafwise:
  no norm over a group). See :func:`transform_on_groups`."""
  return transform_on_groups(
      caller, groups,
      lambda resolved, updates, params: map_grouped(fn, resolved.by_path, updates, params))


def reduction_axes(group: GroupLeaf, ndim: int) -> tuple[int, ...]:
  """Axes a group's norm reduces over within one leaf (see :meth:`Group.reduced_axes`)."""
  group = as_group(group, "reduction_axes")
  if isinstance(group, Sliced):
    raise ValueError(f"reduction_axes: {group} reduces per slice, over other axes in each; "
                     "ask each slice's group (its .groups).")
  return group.reduced_axes(ndim)


def summary(groups: Groups) -> str:
  """A one-line-per-parameter table of the groups, for logs."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(groups, is_leaf=_is_none)
  return "\n".join(f"{path_str(p):48s} {as_group(g, 'summary') or '-'}" for p, g in leaves)


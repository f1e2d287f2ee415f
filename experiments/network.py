"""The launcher's network: a task's model at init, its scale-invariance groups.

``init_model`` builds the task's NNX model (``Task.create_model``), splits it once
into ``graphdef`` and two ``State``s (``params``, ``rest``), finds the groups
(``normreg.find_scale_invariant`` on a probe batch, or ``--group_rules``) and applies
``--init_scale`` to the grouped weights, rescaling BatchNorm's running statistics
with them so that the network's function is unchanged. Shared by ``experiments.trainer``, ``experiments.sweep`` and
the benchmarks (re-exported by ``experiments.trainer`` under the same names).
"""

from __future__ import annotations

import hashlib
import re
from typing import TYPE_CHECKING, Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import normreg
from experiments import errors
from experiments import tasks as tasks_lib

if TYPE_CHECKING:
  from experiments.config import Config


_RULE = re.compile(r"(?P<pattern>.+)=(?P<kind>unit|tensor|none)(?:\((?P<options>[^()]*)\))?",
                   re.DOTALL)


def _split_top_level(text: str) -> list[str]:
  """``text`` split at the commas outside parentheses (regex groups, rule options)."""
  items, depth, start, escaped = [], 0, 0, False
  for i, ch in enumerate(text):
    if escaped:
      escaped = False
    elif ch == "\\":
      escaped = True
    elif ch == "(":
      depth += 1
    elif ch == ")":
      depth -= 1
    elif ch == "," and depth == 0:
      items.append(text[start:i])
      start = i + 1
  return [s.strip() for s in items + [text[start:]] if s.strip()]


def parse_group_rules(text: str) -> list[tuple[str, Optional[normreg.Group]]]:
  """``--group_rules`` text as ``normreg.groups_from_rules`` rules.

  ``REGEX=unit|tensor|none`` items, comma-separated (commas inside parentheses
  belong to the item), first match wins; ``unit`` and ``tensor`` take options
  in parentheses: ``stack=K`` leading copy axes, ``joint=TAG`` (``\\1`` expands
  to the regex's first group), and ``unit`` ``axis=A``, the unit's axis after the stack
  axes (0 for output-first layouts). Example:
  ``"convs/.*/kernel=unit,(dense)/(kernel|bias)=tensor(joint=\\1),.*=none"``.
  """
  rules = []
  for item in _split_top_level(text):
    match = _RULE.fullmatch(item)
    if not match:
      raise errors.InputError(f"--group_rules: {item!r} is not REGEX=unit|tensor|none, with "
                       "optional (stack=K, joint=TAG, axis=A) after unit or tensor.")
    kind, options = match["kind"], {}
    for option in filter(None, (o.strip() for o in (match["options"] or "").split(","))):
      key, sep, value = option.partition("=")
      allowed = ("stack", "joint", "axis") if kind == "unit" else ("stack", "joint")
      if not sep or key.strip() not in allowed or kind == "none":
        raise errors.InputError(f"--group_rules: {item!r}: option {option!r} is not stack=K, "
                         "joint=TAG or (unit only) axis=A, after unit or tensor.")
      key = key.strip()
      try:
        options[key] = int(value) if key in ("stack", "axis") else value.strip()
      except ValueError:
        raise errors.InputError(f"--group_rules: {item!r}: {key} must be an integer, got "
                         f"{value!r}.") from None
    group = None if kind == "none" else (normreg.unit if kind == "unit" else normreg.tensor)(
        **options)
    rules.append((match["pattern"], group))
  return rules


def find_groups(config: "Config", graphdef, params, rest, probe: Any) -> Any:
  """The groups pytree: from ``--group_rules`` or found by autodiff on ``probe`` (the
  model's input on a few training examples).

  Detection is a deterministic function of the model, its initial state, the probe
  batch and the seed, and takes seconds: in one process (a reproduction, a comparison,
  a sweep, the tests) a second run of the same model on the same data reuses the
  first's answer (:data:`_FOUND`, keyed by all of those, values included).
  """
  if config.group_rules:
    try:
      return normreg.groups_from_rules(params, parse_group_rules(config.group_rules))
    except ValueError as e:
      raise errors.InputError(f"--group_rules: {e}") from e
  key = (graphdef, config.seed, _fingerprint((params, rest, probe)))
  if key not in _FOUND:
    fn = lambda p, x: nnx.merge(graphdef, p, rest, copy=True)(x)
    _FOUND[key] = normreg.find_scale_invariant(fn, params, probe, seed=config.seed)
  return _FOUND[key]


# Detection's answers in this process, by (graphdef, seed, fingerprint of the inputs).
_FOUND: dict = {}


def _fingerprint(tree: Any) -> str:
  """SHA-256 of every leaf's path, shape, dtype and bytes: equal only for equal trees."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    array = np.asarray(jax.device_get(leaf))
    digest.update(f"{jax.tree_util.keystr(path)}:{array.shape}:{array.dtype};".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()


class Model(NamedTuple):
  """A model at init, split (``nnx.split(model, nnx.Param, ...)``), with its groups."""

  graphdef: Any  # training mode: BatchNorm on batch statistics
  eval_graphdef: Any  # evaluation mode: BatchNorm on its running statistics
  params: Any
  rest: Any
  groups: Any


PROBE_SIZE = 64  # the examples the groups are found on


def probe_batch(config: "Config", data, task: tasks_lib.Task, stats: Any = None) -> Any:
  """The model's input on the first :data:`PROBE_SIZE` training examples, prepared by
  the task without augmentation (``stats``: the task's, by default)."""
  train, _ = task.arrays(data)
  stats = task.stats(data) if stats is None else stats
  return task.prepare(config, jax.tree.map(lambda a: jnp.asarray(a[:PROBE_SIZE]), train),
                      stats, None)


def init_model(config: "Config", data, task: Optional[tasks_lib.Task] = None,
               stats: Any = None) -> Model:
  """``config``'s model at init for ``data``, split, with its scale-invariance groups.

  The model is ``task.create_model`` (``task``: ``config``'s); the groups come from
  :func:`find_groups` on :func:`probe_batch`. Then ``--init_scale`` multiplies the
  grouped weights: the network's function is unchanged, only the norms (hence the
  effective learning rate) change. Shared by :func:`train_and_evaluate`,
  ``experiments.sweep`` and the benchmarks, so every run of a recipe starts from the
  same point.
  """
  task = task or tasks_lib.of(config)
  model = task.create_model(config, data)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  probe = probe_batch(config, data, task, stats)
  groups = find_groups(config, graphdef, params, rest, probe)
  if config.init_scale != 1.0:
    scaled = normreg.groups.map_grouped(lambda _, w: w * jnp.asarray(config.init_scale, w.dtype),
                                        groups, params)
    rest = rescale_running_statistics(graphdef, params, scaled, rest, probe)
    params = scaled
  model.eval()
  return Model(graphdef, nnx.split(model, nnx.Param, ...)[0], params, rest, groups)


def rescale_running_statistics(graphdef, params, scaled, rest, batch):
  """``rest`` with each BatchNorm's running statistics scaled as its input is by ``scaled``.

  Rescaling the weights before a BatchNorm by ``c`` scales its input, and so its batch
  mean by ``c`` and its batch variance by ``c^2``; the running statistics, which
  evaluation divides by, must start at ``(c * 0, c^2 * 1)`` for the two networks to be
  the same in evaluation mode too (van Laarhoven 2017's equivalence, at every step).
  Which channel's input scales by how much is measured, not assumed: one forward pass
  in training mode on ``batch`` with each BatchNorm's momentum at 0 (so its running
  statistics become the batch's), for ``params`` and for ``scaled``; the variance of
  each channel is multiplied by the ratio of the two, the mean by its square root.
  """
  def batch_statistics(p):
    model = nnx.merge(graphdef, p, rest, copy=True)
    model.train()
    for _, module in nnx.iter_graph(model):
      if isinstance(module, nnx.BatchNorm):
        module.momentum = 0.0
    model(batch)
    return nnx.split(model, nnx.Param, ...)[2]

  path_str = normreg.groups.path_str
  before = {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(
      batch_statistics(params))}
  after = {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(
      batch_statistics(scaled))}
  # Per channel, var_scaled / var: c^2 where the input scales by c, 1 where it does not.
  ratio = {p: jnp.where(v > 0, after[p] / jnp.where(v > 0, v, 1), 1)
           for p, v in before.items() if p.endswith("/var")}

  def one(path, x):
    name = path_str(path)
    if name in ratio:
      return (x * ratio[name]).astype(x.dtype)
    if name.endswith("/mean") and name[:-len("mean")] + "var" in ratio:
      return (x * jnp.sqrt(ratio[name[:-len("mean")] + "var"])).astype(x.dtype)
    return x

  return jax.tree_util.tree_map_with_path(one, rest)



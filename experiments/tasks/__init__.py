"""The launcher's tasks: one :class:`Task` entry per kind of model, in :data:`REGISTRY`.

A task is everything that depends on what is learned: the data, the model, what
happens to a batch inside the jitted step, the loss and the metrics. The trainer,
the sweep, the records, TensorBoard, the figures, the run cache and the launcher's
last line read only what the task declares, so that a new kind of model is one
entry, as a new optimizer recipe is one entry of ``experiments.methods``.

The design follows the anchors' single door: levanter hands its trainer a loss
function and lets each model family register a config with ``build()``;
big_vision picks the model, the loss and the evaluators by name from the config.

What a task says (the methods of :class:`Task`):

- its flags: :attr:`Task.options`, settings of its own with their defaults and
  help texts (``experiments.config`` gives each task with options a ``Config``
  subclass that holds them, and the launcher an absl flag each), and
  :attr:`Task.flags`, the ``Config`` fields only it reads (image classification's,
  which predate the registry); both are checked by :meth:`Task.validate`;
- its data (:meth:`Task.load`), an object only the task reads. The trainer sees it
  through :meth:`Task.arrays` (the training and test sets as pytrees of host arrays
  whose leaves share a leading example axis) and :meth:`Task.stats` (host arrays
  every step reads, e.g. a normalization's mean and standard deviation);
- its model (:meth:`Task.create_model`, an ``nnx.Module`` called on what
  :meth:`Task.prepare` returns);
- how a batch becomes the model's input inside the jitted step
  (:meth:`Task.prepare`: augmentation, normalization, packing), with a PRNG key
  in training and ``None`` in evaluation;
- its loss and training metrics (:meth:`Task.loss`, :meth:`Task.train_metrics`),
  traced inside the step;
- its evaluation: sums over a batch (:meth:`Task.eval_sums`, weighted so that
  padding counts for nothing) and their final form (:meth:`Task.eval_metrics`,
  e.g. a root mean square error or bits per byte);
- its headline metric (:attr:`Task.headline`, what the launcher's last line and
  the figures report), whether higher is better, the level of a model that
  learned nothing (:meth:`Task.chance`, a diverged run's score) and what its
  throughput counts (:attr:`Task.unit`, :meth:`Task.units`: ``"tokens"``, a
  sequence's length each, gives ``tokens_per_sec``).

Adding a task: subclass :class:`Task`, fill in the methods, :func:`register` an
instance (or add it to :data:`REGISTRY`) in a module of your own, and name that
module to the command line with ``--task_module=MODULE`` (it is imported before
the flags are parsed, so that its options are flags); docs/experiments.md,
"Adding a task", walks through one. ``tests/test_tasks.py`` registers a toy task
in one place (``tests/toy_task.py``) and trains it through the launcher (library
and command line), a resume, the sweep, the figures and the run cache.

Every method takes the run's ``Config`` (``experiments.config``) first. This package
stands below the config: it imports nothing of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator, Optional

import jax
import numpy as np

from experiments import errors


@dataclasses.dataclass(frozen=True)
class Option:
  """A setting of one task: its default, its flag's help text and, where the default does
  not say it (``None``), its type (``int``, ``float``, ``bool`` or ``str``)."""

  default: Any
  help: str
  type: Optional[type] = None

  @property
  def kind(self) -> type:
    kind = self.type or type(self.default)
    if kind not in (int, float, bool, str):
      raise TypeError(f"an option's type is int, float, bool or str, got {kind}.")
    return kind


class Task:
  """One kind of model (a subclass per kind; see the module docstring).

  Attributes:
    name: the ``--task`` value.
    options: ``{name: Option}``: the task's own settings, each a field of its
      ``Config`` (``config.config_class``) and a flag of the launcher; another
      task refuses them when they differ from their defaults.
    flags: ``{Config field: help text}`` of the fields of ``Config`` itself that
      only this task reads (refused by the others in the same way).
    headline: the ``eval_metrics`` key that sums a run up (``"bits_per_byte"``).
    higher_is_better: whether a larger ``headline`` is better.
    unit: what the throughput counts (``"tokens"``: the test records'
      ``tokens_per_sec``); :meth:`units` says how many an example holds.
    help: one line for ``--task``'s help.
  """

  name: str = ""
  options: dict[str, Option] = {}
  flags: dict[str, str] = {}
  headline: str = "loss"
  higher_is_better: bool = False
  unit: str = "examples"
  help: Optional[str] = None

  # ------------------------------------------------------------------ settings, data

  def validate(self, config) -> None:
    """Raises ``errors.InputError`` naming the flag at fault (before anything is read)."""
    del config

  def load(self, config) -> Any:
    """The run's data, read into host memory (an object only this task reads)."""
    raise NotImplementedError

  def data_key(self, config) -> Any:
    """What :meth:`load` reads depends on, hashable: runs with one key share their data
    (a sweep loads it once). Default: the task's flags, ``data_dir`` and the seed."""
    return (tuple(getattr(config, f) for f in (*self.flags, *self.options)), config.data_dir,
            config.seed)

  def arrays(self, data) -> tuple[Any, Any]:
    """``(train, test)``: pytrees of host arrays, every leaf with the examples first."""
    raise NotImplementedError

  def stats(self, data) -> Any:
    """Host arrays every step reads as constants (default: none)."""
    del data
    return {}

  def chance(self, data) -> float:
    """:attr:`headline` of a model that learned nothing (a diverged run's score)."""
    raise NotImplementedError

  def describe(self, data) -> dict[str, Any]:
    """What the run's folder records about its data (``data.json``; default: nothing,
    and no file)."""
    del data
    return {}

  def matrix_axes(self, config, params) -> Any:
    """Per parameter, how ``--optimizer=muon`` sees it as matrices: an
    ``optax.contrib.MuonDimensionNumbers`` (reduction and output axes; the others are
    batch axes), or ``None`` for Adam. Default: every 2-D leaf a matrix (optax's own
    rule), a 4-D convolution kernel ``(h, w, in, out)`` one ``(h*w*in, out)`` matrix,
    the rest Adam."""
    del config
    from optax import contrib  # pylint: disable=g-import-not-at-top

    def axes(x):
      if x.ndim == 2:
        return contrib.MuonDimensionNumbers(0, 1)
      if x.ndim == 4:
        return contrib.MuonDimensionNumbers((0, 1, 2), 3)
      return None

    return jax.tree.map(axes, params)

  def units(self, config) -> int:
    """How many :attr:`unit` one example holds (default 1; a sequence's tokens)."""
    del config
    return 1

  # ------------------------------------------------------------------------ the model

  def create_model(self, config, data) -> Any:
    """The ``nnx.Module`` of ``config`` for ``data``, at init (seeded by ``config.seed``)."""
    raise NotImplementedError

  def prepare(self, config, batch, stats, key: Optional[jax.Array]) -> Any:
    """The model's input of ``batch`` inside the jitted step: ``key`` in training (for
    augmentation), ``None`` in evaluation and for the groups' probe batch."""
    raise NotImplementedError

  def loss(self, config, outputs, batch) -> jax.Array:
    """The scalar training loss of the model's ``outputs`` on ``batch``."""
    raise NotImplementedError

  def train_metrics(self, config, outputs, batch) -> dict[str, jax.Array]:
    """Scalars recorded beside the loss at each logged step (default: none)."""
    del config, outputs, batch
    return {}

  def eval_sums(self, config, outputs, batch, weights) -> dict[str, jax.Array]:
    """Sums over the batch, each example weighted by ``weights`` (0 for padding)."""
    raise NotImplementedError

  def eval_metrics(self, config, sums: dict[str, float], n: int) -> dict[str, float]:
    """The test record's metrics from the sums over the ``n`` test examples; they must
    hold :attr:`headline`."""
    raise NotImplementedError


REGISTRY: dict[str, Task] = {}
DEFAULT = "classification"


def names() -> tuple[str, ...]:
  """The ``--task`` values, in the registry's order."""
  return tuple(REGISTRY)


def get(name: Optional[str]) -> Task:
  """The entry of ``name`` (``None``: the default task); ``errors.InputError`` naming
  ``--task`` if there is none."""
  if (name or DEFAULT) not in REGISTRY:
    raise errors.InputError(
        f"--task={name!r} is not one of {', '.join(REGISTRY)}; a task of your own is "
        "registered by its module: name it with --task_module=MODULE.")
  return REGISTRY[name or DEFAULT]


def of(config) -> Task:
  """The task of a ``Config`` or of a ``config.json`` dict (``task`` absent: the default)."""
  name = config.get("task") if isinstance(config, dict) else getattr(config, "task", None)
  return get(name)


def register(task: Task) -> Task:
  """Adds ``task`` to :data:`REGISTRY` (its name must be new); returns it."""
  if task.name in REGISTRY:
    raise ValueError(f"--task={task.name} is already registered.")
  for name, option in task.options.items():
    option.kind  # pylint: disable=pointless-statement  (raises for a type flags cannot hold)
  for other in REGISTRY.values():
    for name in task.options:
      if name in other.options and other.options[name] != task.options[name]:
        raise ValueError(f"--task={task.name}: option --{name} is --task={other.name}'s "
                         "too, with another default or help; rename it.")
  REGISTRY[task.name] = task
  return task


@contextlib.contextmanager
def registered(task: Task) -> Iterator[Task]:
  """:func:`register` for the duration of a ``with`` block (tests)."""
  register(task)
  try:
    yield task
  finally:
    del REGISTRY[task.name]


def all_flags() -> dict[str, str]:
  """Every task's ``{flag: help}``: the ``Config`` fields that belong to one task, and
  the tasks' options."""
  out = {}
  for task in REGISTRY.values():
    out.update(task.flags)
    out.update({name: option.help for name, option in task.options.items()})
  return out


def help_text() -> str:
  """``--task``'s help: every entry with its :attr:`Task.help`."""
  return ("Kind of model: " + ", ".join(t.name if t.help is None else f"{t.name} ({t.help})"
                                        for t in REGISTRY.values()) + ".")


def num_examples(tree: Any) -> int:
  """The examples in a data pytree: the leading size its leaves share."""
  sizes = {np.shape(leaf)[0] for leaf in jax.tree.leaves(tree)}
  if len(sizes) != 1:
    raise ValueError(f"a task's data must have one leading example axis, got sizes {sizes}.")
  return sizes.pop()


# The built-in tasks register themselves.
from experiments.tasks import classification, lm  # pylint: disable=wrong-import-position,unused-import

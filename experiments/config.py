"""Settings of one training run: the absl flags and the checked Config they make.

``Config`` is a frozen dataclass; ``validate()`` rejects bad settings before any
data is read or any step is taken, with one line that names the flag and the
fix. ``define_flags()`` declares one absl flag per field, so that the launcher
and the sweep share them.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import sys
from typing import Any, Optional, Sequence

from absl import flags

from experiments import errors
from experiments import methods as methods_lib
from experiments import tasks as tasks_lib

ADAM_EPS = 1e-8  # optax's default
OPTIMIZERS = ("sgd", "adam", "muon")
SCHEDULES = ("constant", "cosine", "step")
DTYPES = ("float32", "bfloat16")
# The default of --lam, for the methods that take it (experiments.methods: Method.lam).
DEFAULT_LAM = 5e-4


@dataclasses.dataclass(frozen=True)
class Config:
  """One run. Field docs are the flags' help texts (see ``define_flags``); the fields
  that only one task reads are named, with their help, by its entry in
  ``experiments.tasks``.

  A task with options of its own (``Task.options``) has a subclass that adds them as
  fields (:func:`config_class`); ``Config(task=NAME, ...)`` makes an instance of it, so
  ``config.OPTION``, ``dataclasses.replace`` and ``config.json`` work as for the
  fields here.
  """

  def __new__(cls, *args, **kwargs):
    del args
    if cls is Config and kwargs.get("task") not in (None, tasks_lib.DEFAULT):
      cls = config_class(kwargs["task"])
    return super().__new__(cls)

  task: str = tasks_lib.DEFAULT
  dataset: str = "digits"
  data_dir: Optional[str] = None
  train_size: Optional[int] = None
  test_size: Optional[int] = None
  model: str = "cnn"
  norm: str = "batch"
  width: Optional[int] = None
  method: str = "l2"
  optimizer: str = "sgd"
  lr: float = 0.1
  momentum: float = 0.9
  lam: Optional[float] = None
  schedule: str = "constant"
  epochs: int = 10
  steps: Optional[int] = None
  eval_every: int = 0
  batch_size: int = 128
  seed: int = 0
  group_rules: Optional[str] = None
  log_every: int = 50
  checkpoint_every: int = 0
  augment: bool = True
  dtype: str = "float32"
  init_scale: float = 1.0
  ungrouped_lr: Optional[float] = None
  norm_eps: Optional[float] = None
  corrected_decay: bool = False
  decay_all_matrices: bool = False
  adamp_cosine: bool = False
  adam_eps: float = ADAM_EPS

  @property
  def lam_value(self) -> float:
    """``lam`` with its default filled in for the methods that use it."""
    if not methods_lib.takes_lam(self.method):
      return 0.0
    return DEFAULT_LAM if self.lam is None else self.lam

  def validate(self) -> "Config":
    """Raises ``ValueError`` naming the flag at fault; returns ``self``."""

    def choice(name, choices):
      value = getattr(self, name)
      if value not in choices:
        raise errors.InputError(f"--{name}={value!r} is not one of {', '.join(choices)}.")

    choice("task", tasks_lib.names())
    task = tasks_lib.get(self.task)
    if type(self) is not config_class(self.task):
      raise errors.InputError(f"--task={self.task} needs its own settings class, "
                              f"experiments.config.config_class({self.task!r}); got "
                              f"{type(self).__name__} (make it with Config(task=...)).")
    defaults = Config()
    for owner in tasks_lib.REGISTRY.values():  # the flags that only one task reads
      for flag in owner.flags:
        if owner is not task and flag not in task.flags and (
            getattr(self, flag) != getattr(defaults, flag)):
          raise errors.InputError(f"--{flag} belongs to --task={owner.name}; drop it with "
                                  f"--task={self.task}.")
    task.validate(self)
    for name, choices in (("method", methods_lib.names()), ("optimizer", OPTIMIZERS),
                          ("schedule", SCHEDULES), ("dtype", DTYPES)):
      choice(name, choices)
    if not self.lr > 0:
      raise errors.InputError(f"--lr must be > 0, got {self.lr}.")
    if not self.batch_size > 0:
      raise errors.InputError(f"--batch_size must be > 0, got {self.batch_size}.")
    if not self.epochs > 0:
      raise errors.InputError(f"--epochs must be > 0, got {self.epochs}.")
    if self.steps is not None and not self.steps > 0:
      raise errors.InputError(f"--steps must be > 0 (or unset: --epochs decides), "
                              f"got {self.steps}.")
    if not self.eval_every >= 0:
      raise errors.InputError(f"--eval_every must be >= 0 (0: at each epoch's end), "
                              f"got {self.eval_every}.")
    if not self.log_every > 0:
      raise errors.InputError(f"--log_every must be > 0, got {self.log_every}.")
    if not self.checkpoint_every >= 0:
      raise errors.InputError(f"--checkpoint_every must be >= 0 (0: at each epoch's end), "
                              f"got {self.checkpoint_every}.")
    if not 0 <= self.momentum < 1:
      raise errors.InputError(f"--momentum must be in [0, 1), got {self.momentum}.")
    if not self.init_scale > 0:
      raise errors.InputError(f"--init_scale must be > 0, got {self.init_scale}.")
    if self.norm_eps is not None and not self.norm_eps > 0:
      raise errors.InputError(f"--norm_eps must be > 0, got {self.norm_eps}.")
    if self.ungrouped_lr is not None and not self.ungrouped_lr > 0:
      raise errors.InputError(f"--ungrouped_lr must be > 0, got {self.ungrouped_lr}.")
    method = methods_lib.get(self.method)
    for owner in methods_lib.REGISTRY.values():  # the flags that only one method takes
      for flag, what in owner.options:
        if getattr(self, flag) and self.method != owner.name:
          raise errors.InputError(f"--{flag} {what}; it needs --method={owner.name}, "
                                  f"got --method={self.method}.")
    if self.corrected_decay and self.decay_all_matrices:
      raise errors.InputError("--corrected_decay decays the scale-invariant weights only; "
                              "drop --decay_all_matrices with it.")
    if self.optimizer == "muon" and not method.muon:
      raise errors.InputError(f"--method={self.method} has no Muon form yet; use "
                              "--optimizer=sgd or adam, or a method that takes Muon's "
                              "direction as it is: " + ", ".join(
                                  m.name for m in methods_lib.REGISTRY.values() if m.muon)
                              + ".")
    if not (self.adam_eps > 0 and math.isfinite(self.adam_eps)):
      raise errors.InputError(f"--adam_eps must be > 0 and finite, got {self.adam_eps}.")
    if self.adam_eps != ADAM_EPS and (self.optimizer == "sgd" or not method.muon):
      raise errors.InputError(
          f"--adam_eps={self.adam_eps} is the epsilon of --optimizer=adam's or muon's own "
          f"direction; --optimizer={self.optimizer} --method={self.method} does not use it "
          "(methods that do: " + ", ".join(m.name for m in methods_lib.REGISTRY.values()
                                          if m.muon) + ").")
    if method.optimizer is not None and self.optimizer != method.optimizer:
      raise errors.InputError(f"--method={self.method} {method.optimizer_reason}; it needs "
                              f"--optimizer={method.optimizer}, got --optimizer={self.optimizer}.")
    if not method.ungrouped_lr and self.ungrouped_lr is not None:
      raise errors.InputError(f"--method={self.method} has one learning rate for every "
                              "parameter: drop --ungrouped_lr.")
    if method.schedule is not None and self.schedule != method.schedule:
      raise errors.InputError(f"--method={self.method} {method.schedule_reason}; it needs "
                              f"--schedule={method.schedule}, got --schedule={self.schedule}.")
    if self.lam is not None:
      if not method.lam:
        raise errors.InputError(
            f"--lam={self.lam} has no meaning with --method={self.method}: "
            f"{self.method} keeps no L2 coefficient. Drop --lam, or use --method=l2 "
            "or --method=decoupled.")
      if not self.lam >= 0:
        raise errors.InputError(f"--lam must be >= 0, got {self.lam}.")
    return self

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> "Config":
    """The config of a ``config.json``'s dict (of its task's class)."""
    known = {f.name for f in dataclasses.fields(config_class(values.get("task")))}
    unknown = set(values) - known
    if unknown:
      raise ValueError(f"unknown config keys {sorted(unknown)}; known: {sorted(known)}")
    return Config(**values)


_CLASSES: dict[tuple[str, tuple], type] = {}


def config_class(task: Optional[str]) -> type:
  """The ``Config`` class of ``--task=task``: ``Config`` itself, or for a task with
  options (``Task.options``) a subclass with one field per option (made once); an
  unknown ``task`` is ``tasks.get``'s one line."""
  entry = tasks_lib.get(task)
  if not entry.options:
    return Config
  key = (entry.name, tuple(entry.options.items()))
  if key not in _CLASSES:
    taken = {f.name for f in dataclasses.fields(Config)}
    for name in entry.options:
      if name in taken:
        raise ValueError(f"--task={entry.name}: option --{name} is a field of Config; "
                         "rename it.")
    fields = [("task", str, dataclasses.field(default=entry.name))] + [
        (name, Optional[option.kind] if option.default is None else option.kind,
         dataclasses.field(default=option.default)) for name, option in entry.options.items()]
    name = "".join(part.capitalize() for part in entry.name.split("_")) + "Config"
    cls = dataclasses.make_dataclass(name, fields, bases=(Config,), frozen=True)
    cls.__module__ = __name__
    globals()[name] = cls  # where pickle looks for it (the latest class of that name)
    _CLASSES[key] = cls
  return _CLASSES[key]


_HELP = {
    "task": tasks_lib.help_text(),
    "data_dir": "The task's data folder: for classification the image folder (train/<class>/*, "
                "test/<class>/*) of --dataset=folder, or tfds' data_dir for catalog data sets.",
    "task_module": "Modules to import before the flags are parsed, comma-separated: tasks of "
                   "your own register there (experiments.tasks), and their options become "
                   "flags.",
    "method": methods_lib.help_text(),
    "optimizer": f"Base optimizer: one of {', '.join(OPTIMIZERS)} (optax.contrib.muon: "
                 "orthogonalized Nesterov momentum, beta 0.95, on the matrices, Adam on the "
                 "rest; --momentum is SGD's).",
    "lr": "Peak learning rate (> 0).",
    "momentum": "Heavy-ball momentum for SGD (Adam uses its own b1).",
    "lam": f"L2 coefficient (lam*||w||^2) for --method=l2, exp_lr and rotational (whose "
           f"angle is L2's equilibrium), or decoupled decay (+lam*w, times lr) for decoupled "
           f"and adamp; default {DEFAULT_LAM}.",
    "schedule": "Learning-rate schedule: constant, cosine (to 0), step (x0.1 at 50% and 75%).",
    "epochs": "Epochs to train (unless --steps is given).",
    "steps": "Steps to train; default: --epochs' worth. Data order and augmentation go on "
             "epoch after epoch as with --epochs, and a run resumes exactly from any step.",
    "eval_every": "Evaluate on the test set (and save a checkpoint) every this many steps, "
                  "and at the last one; 0: at each epoch's end.",
    "batch_size": "Global batch size.",
    "seed": "Random seed (init, data order, augmentation).",
    "group_rules": "Scale-invariance groups as ordered REGEX=unit|tensor|none rules, "
                   "comma-separated (first match wins); default: found by autodiff.",
    "log_every": "Log train metrics every this many steps.",
    "checkpoint_every": "Also save a checkpoint every this many steps (0: only at each "
                        "evaluation). A run resumes from its last checkpoint, mid-epoch "
                        "included, exactly; it may change between launches of one run.",
    "dtype": "Compute dtype of the network (params and optimizer state stay float32).",
    "decay_all_matrices": "With --method=decoupled: decay every parameter of two or more "
                          "dimensions (every matrix and kernel, the embeddings included), "
                          "as AdamW is usually run, instead of exactly the scale-invariant "
                          "weights.",
    "corrected_decay": "With --method=decoupled: decay scaled by lr_t/lr_max (Defazio 2025), "
                       "so that the equilibrium follows a decaying --schedule.",
    "adam_eps": "Epsilon of --optimizer=adam's direction (optax.scale_by_adam) and of "
                "--optimizer=muon's (its orthogonalization and its Adam), for the methods "
                "that take that direction as it is; default 1e-8. It breaks the "
                "c-rescaling equivalence where gradients are near it (experiments."
                "reproduce_lm).",
    "adamp_cosine": "With --method=adamp: AdamP's cosine heuristic decides, at every step, "
                    "which weights to project (instead of the exact groups).",
    "norm_eps": "Epsilon of the normalization layers (default 1e-5). It breaks their scale "
                "invariance at about eps/var; 1e-30 makes it exact (the reproduction's "
                "exact-equivalence runs).",
    "init_scale": "Multiply the scale-invariant weights by this factor at init (the "
                  "function is unchanged; only the norms, hence the effective lr, change).",
    "ungrouped_lr": "Peak learning rate of the parameters outside the groups (norm scales and "
                    "shifts, biases, the last layer), on the same schedule; default --lr. With "
                    "--method=spherical --lr is an angle rate, so the two are tuned apart; with "
                    "l2 it keeps the rest of the network fixed when (lr, lam) is rescaled.",
}


# The help of the flags that belong to one task comes from its entry (experiments.tasks).
_HELP.update(tasks_lib.all_flags())


def _flag_fields() -> dict[str, dataclasses.Field]:
  """Every field of ``Config`` and of the registered tasks' classes, once each."""
  out = {f.name: f for f in dataclasses.fields(Config)}
  for name in tasks_lib.names():
    out.update({f.name: f for f in dataclasses.fields(config_class(name)) if f.name not in out})
  return out


def import_task_modules(argv: Sequence[str]) -> None:
  """Imports the modules named by ``--task_module=A,B`` in ``argv``, before absl parses it
  (their tasks' options must be flags by then). A module that fails to import is
  reported by :func:`flag_values`, in one line."""
  names = []
  for i, arg in enumerate(argv):
    if arg.startswith("--task_module="):
      names += arg.partition("=")[2].split(",")
    elif arg == "--task_module" and i + 1 < len(argv):
      names += argv[i + 1].split(",")
  for name in filter(None, (n.strip() for n in names)):
    try:
      importlib.import_module(name)
    except Exception as e:  # pylint: disable=broad-except  (said in one line, at parse time)
      _IMPORT_ERRORS.append(f"--task_module={name}: cannot import it ({type(e).__name__}: {e}).")


_IMPORT_ERRORS: list[str] = []


def define_flags() -> None:
  """Declares one absl flag per Config field and task option (idempotent), and
  ``--task_module``, whose modules are imported first (:func:`import_task_modules`)."""
  if "method" in flags.FLAGS:
    return
  import_task_modules(sys.argv)
  flags.DEFINE_list("task_module", [], _HELP["task_module"])
  helps = {**_HELP, **tasks_lib.all_flags()}
  for field in _flag_fields().values():
    default, help_ = field.default, helps[field.name]
    kind = field.type if isinstance(field.type, str) else str(field.type)
    if "bool" in kind:
      flags.DEFINE_bool(field.name, default, help_)
    elif "int" in kind:
      flags.DEFINE_integer(field.name, default, help_)
    elif "float" in kind:
      flags.DEFINE_float(field.name, default, help_)
    else:
      flags.DEFINE_string(field.name, default, help_)


def from_flags() -> Config:
  """The Config of the parsed absl flags, validated."""
  return Config(**flag_values()).validate()


def flag_values(exclude: Sequence[str] = ()) -> dict[str, Any]:
  """The parsed absl flags of ``--task``'s settings (:func:`config_class`) but
  ``exclude``. A task option given with another task is refused."""
  if _IMPORT_ERRORS:
    raise errors.InputError(_IMPORT_ERRORS[0])
  task = model_task()
  tasks_lib.get(task)  # an unknown --task: one line naming it
  mine = {f.name: f for f in dataclasses.fields(config_class(task))}
  given = {"model": mine["model"].default} if flags.FLAGS.model == task else {}
  for name, field in _flag_fields().items():
    if name not in mine and name in flags.FLAGS and getattr(flags.FLAGS, name) != field.default:
      owner = next(t for t in tasks_lib.names() if name in tasks_lib.get(t).options)
      raise errors.InputError(f"--{name} belongs to --task={owner}; drop it with "
                              f"--task={task}.")
  # A task registered after the flags were defined has no flags: its defaults hold.
  values = {name: getattr(flags.FLAGS, name) if name in flags.FLAGS else field.default
            for name, field in mine.items() if name not in exclude}
  values.update({k: v for k, v in given.items() if k in values})
  return values | ({"task": task} if "task" in values else {})


def model_task() -> str:
  """``--task``, or the task ``--model`` names: ``--model=lm`` is ``--task=lm`` (a model
  name that is another task's). Given with a different ``--task``, it is refused."""
  task, model = flags.FLAGS.task, flags.FLAGS.model
  if model != tasks_lib.DEFAULT and model in tasks_lib.names():
    if flags.FLAGS["task"].present and task != model:
      raise errors.InputError(f"--model={model} is --task={model}; it cannot go with "
                              f"--task={task}.")
    return model
  return task

"""A cache of training runs: each ``Config`` trained once into ``WORKDIR/name``.

Shared by ``experiments.reproduce`` and ``experiments.compare``, which train many
small runs through the launcher's ``trainer.train_and_evaluate`` and must not lose
them to an interruption: a finished run (every epoch's test record, its final
params and timing) is read back instead of trained again; a run whose settings
changed is moved aside and trained anew; a run whose loss became NaN or inf is a
result (``diverged.txt``, scored at its task's chance level), not a crash. Runs are
scored by their task's headline metric (``experiments.tasks``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from absl import logging
from flax import nnx

from experiments import errors
from experiments import plot as plot_lib
from experiments import tasks as tasks_lib
from experiments import trainer
from experiments.config import Config

DIVERGED = "diverged.txt"


class RunCache:
  """Trains configs once each (cached by name in ``workdir``) on one data set.

  Args:
    workdir: the folder of the runs.
    dataset: the data every run trains on (``base``'s task's, ``Task.load``).
    base: the settings every run starts from (``config(**overrides)``).
    seeds: the seeds of :meth:`seeds_of`.
  """

  def __init__(self, workdir: str, dataset, base: Config, seeds: Sequence[int]):
    self.workdir, self.dataset, self.base = workdir, dataset, base
    self.task = tasks_lib.of(base)
    self.seeds = list(seeds)
    self.used: dict[str, float] = {}  # run name -> its training seconds

  @property
  def steps_per_epoch(self) -> int:
    return trainer.budget(self.base, self.dataset).steps_per_epoch

  @property
  def total_steps(self) -> int:
    return trainer.budget(self.base, self.dataset).total_steps

  @property
  def chance(self) -> float:
    """The headline metric of a model that learned nothing (a diverged run's score)."""
    return self.task.chance(self.dataset)

  def final_score(self, run: plot_lib.Run) -> float:
    """:func:`final_score` of a run of this cache."""
    return final_score(run, self.chance)

  def config(self, **overrides) -> Config:
    return dataclasses.replace(self.base, **overrides)

  def train(self, name: str, config: Config,
            on_step: Optional[Callable[[str], Callable]] = None,
            extra_files: Sequence[str] = ()) -> plot_lib.Run:
    """Trains ``config`` into ``workdir/name`` unless it is there already.

    ``on_step(path)``, if given, makes the run's ``on_step`` callback and is
    called with ``workdir/name``; the callback's ``save()`` runs after training,
    which must write ``extra_files`` (checked on a cached run).
    """
    workdir = os.path.join(self.workdir, name)
    if trainer.changed_settings(workdir, config):
      aside = f"{workdir}.stale-{time.strftime('%Y%m%d-%H%M%S')}"
      logging.warning("%s holds other settings; moved to %s", workdir, aside)
      os.rename(workdir, aside)
    evaluations = len(trainer.budget(config, self.dataset).eval_steps())
    if not complete(workdir, config, extra_files, evaluations):
      logging.info("training %s", name)
      if os.path.isdir(os.path.join(workdir, "checkpoints")) and on_step is not None:
        # A callback must see every step: start an interrupted run over.
        os.rename(workdir, f"{workdir}.partial-{time.strftime('%Y%m%d-%H%M%S')}")
      callback = on_step(workdir) if on_step is not None else None
      start = time.perf_counter()
      try:
        state = trainer.train_and_evaluate(config, workdir, dataset=self.dataset,
                                           progress=False, on_step=callback)
      except trainer.NonFiniteLossError as e:
        logging.warning("%s diverged: %s", name, e)
        state = None
        with open(os.path.join(workdir, DIVERGED), "w") as f:
          f.write(f"{e}\n")
      with open(os.path.join(workdir, "timing.json"), "w") as f:
        json.dump({"train_seconds": time.perf_counter() - start}, f)
      if state is not None:
        if callback is not None:
          callback.save()
        save_params(workdir, state)
    with open(os.path.join(workdir, "timing.json")) as f:
      self.used[name] = json.load(f)["train_seconds"]
    return plot_lib.read_run(workdir, label_keys=("method", "lr", "lam"))

  def seed_runs(self, name: str, **overrides) -> list[tuple[str, Config]]:
    """``(run name, config)`` of every seed of a recipe: what :meth:`seeds_of` trains."""
    return [(f"{name}_s{s}", self.config(seed=s, **overrides)) for s in self.seeds]

  def seeds_of(self, name: str, **overrides) -> list[plot_lib.Run]:
    return [self.train(n, c) for n, c in self.seed_runs(name, **overrides)]

  def model_of(self, run: plot_lib.Run):
    """``(graphdef, params, rest)`` of a run's trained model (train mode), from its params."""
    config = Config.from_dict(run.config)
    model = self.task.create_model(config, self.dataset)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    with np.load(os.path.join(run.workdir, "final_params.npz")) as f:
      leaves = [jnp.asarray(f[f"{i:05d}"]) for i in range(len(f.files))]
    params = jax.tree.unflatten(jax.tree.structure(params), leaves)
    return graphdef, params, rest


def complete(workdir: str, config: Config, extra_files: Sequence[str] = (),
             evaluations: Optional[int] = None) -> bool:
  """Whether ``workdir`` holds the whole run (config.json, every evaluation's test record
  (``evaluations``; default one per epoch), the final params, the timing,
  ``extra_files``), or a diverged run's note and timing."""
  if os.path.exists(os.path.join(workdir, DIVERGED)) and os.path.exists(
      os.path.join(workdir, "timing.json")):
    return True
  try:
    run = plot_lib.read_run(workdir)
  except (OSError, ValueError):
    return False
  files = ["final_params.npz", "timing.json", *extra_files]
  evaluations = config.epochs if evaluations is None else evaluations
  return bool(run.config) and len(run.test) == evaluations and all(
      os.path.exists(os.path.join(workdir, f)) for f in files)


def save_params(workdir: str, state) -> None:
  leaves = jax.tree.leaves(state.params)
  np.savez(os.path.join(workdir, "final_params.npz"),
           **{f"{i:05d}": np.asarray(x) for i, x in enumerate(leaves)})


def diverged(run: plot_lib.Run) -> bool:
  return os.path.exists(os.path.join(run.workdir, DIVERGED))


def final_score(run: plot_lib.Run, chance: float) -> float:
  """The last test record's headline metric (the run's task's); ``chance`` for a run whose
  loss diverged."""
  if diverged(run) or not run.test:
    return chance
  return run.test[-1][plot_lib.headline(run)]


def scores(runs: Sequence[plot_lib.Run], chance: float) -> tuple[float, float]:
  """Mean and standard deviation (ddof=0) of the runs' :func:`final_score`."""
  values = [final_score(r, chance) for r in runs]
  return float(np.mean(values)), float(np.std(values))


def environment() -> dict:
  """The machine and library versions a report names (its header)."""
  import platform  # pylint: disable=g-import-not-at-top

  def version(module):
    try:
      return __import__(module).__version__
    except (ImportError, AttributeError):
      return "?"

  device = jax.devices()[0]
  return {"machine": f"{jax.device_count()} x {device.device_kind} ({device.platform}, "
                     f"{os.cpu_count()} CPU cores, {platform.machine()})",
          "versions": {"python": platform.python_version(), "jax": jax.__version__,
                       "flax": version("flax"), "optax": version("optax"),
                       "numpy": np.__version__}}


def write_json(results: dict, cache: RunCache, path: str) -> None:
  """Adds the runs' count and training time to ``results`` and writes them to ``path``."""
  results["runs"] = len(cache.used)
  results["train_seconds"] = sum(cache.used.values())
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump(results, f, indent=1)


# ------------------------------------------------ the command line of the reports


def define_report_flags(workdir: str, workdir_help: str, report_help: str) -> None:
  """``--data_dir``, ``--workdir`` and ``--report_dir`` of the commands that write a
  report from cached runs (``experiments.reproduce``, ``experiments.compare``)."""
  flags.DEFINE_string("data_dir", os.environ.get("NORMREG_CIFAR10_DIR"),
                      "The extracted CIFAR-10 copy (default $NORMREG_CIFAR10_DIR).")
  flags.DEFINE_string("workdir", workdir, workdir_help)
  flags.DEFINE_string("report_dir", None, report_help)


def report_dir_for(workdir: str, size: str, report_dir: Optional[str]) -> str:
  """``--report_dir``, default ``WORKDIR/SIZE/report`` (never the committed report)."""
  return report_dir or os.path.join(workdir, size, "report")


def report_paths(program: str, argv: Sequence[str]) -> tuple[str, str, str]:
  """Checks a report command's arguments and ``--data_dir``; returns the runs' folder
  ``WORKDIR/SIZE``, the report folder and the command line to print in the report
  (``--data_dir`` shown as ``DIR``)."""
  fl = flags.FLAGS
  if len(argv) > 1:
    raise errors.InputError(f"unexpected arguments: {argv[1:]}")
  if fl.data_dir and not os.path.isdir(fl.data_dir):
    raise errors.MissingInputError(f"--data_dir={fl.data_dir} is not a folder.")
  command = f"python -m {program} " + " ".join(
      a if not a.startswith("--data_dir") else "--data_dir=DIR" for a in sys.argv[1:])
  return (os.path.join(fl.workdir, fl.size), report_dir_for(fl.workdir, fl.size, fl.report_dir),
          command.strip())

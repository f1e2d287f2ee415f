"""A grid of recipes as one jitted program: ``python -m experiments.sweep``.

::

  python -m experiments.sweep --workdir=DIR --lr=0.05,0.1 --lam=1e-4,5e-4 --seed=0,1 \\
      [--method=l2,spherical] [any other flag of experiments.train]

trains every combination of ``--method x --lr x --lam x --seed`` (comma-separated
lists; every other flag is the launcher's and is shared by all runs). The runs
of one method are stacked on a leading axis and trained together by ONE jitted
step (``jax.vmap`` of ``trainer.make_train_step``); methods, whose optax chains
differ in structure, run one after another.

How it builds on the single-run trainer (``experiments.trainer``):

- ``lr`` and ``lam`` are optimizer *state*, not constants: the chain of
  ``trainer.make_optimizer`` is wrapped in ``optax.inject_hyperparams``
  (:func:`recipe`), so one chain, one trace and one compiled program serve every
  run; under ``jax.vmap`` each run reads its own ``lr``/``lam`` from its slice of
  the state. The schedule is rebuilt inside from the run's peak ``lr``
  (``trainer.make_schedule``), so the step computes the very same numbers.
- Each run's initial params come from its own ``--seed``
  (``trainer.create_model``); its data order and augmentation keys are derived
  exactly as in ``trainer.train_and_evaluate``: ``key = jax.random.key(seed)``,
  the step key ``fold_in(key, 1)`` (then ``fold_in(., step)`` inside the step)
  and epoch ``e``'s order ``epoch_permutation(fold_in(key, 1000 + e))``. So every
  run of a sweep ends where the same ``Config`` trained alone by
  ``trainer.train_and_evaluate`` ends, to float tolerance (tests/test_sweep.py).
- Each run gets its own folder ``WORKDIR/method=l2_lr=0.1_lam=0.0005_seed=0``
  with ``config.json`` and ``metrics.jsonl`` in the launcher's format (per-layer
  metrics from ``trainer.layer_metrics``, test records from
  ``trainer.make_eval_step``, both vmapped), so ``python -m experiments.plot``
  draws them. ``images_per_sec`` is per run (the sweep as a whole processes the
  chunk size times that). No checkpoints are written.
- Inside the step the runs are vectorized by ``jax.vmap``, all at once by
  default, or ``--vmap_size`` at a time with the groups looped by
  ``jax.lax.map`` in the same program (:func:`over_runs`). On a 2-core CPU both
  are slower per run than separate runs (README, "Performance": XLA compiles
  a vmapped convolution with per-run kernels to a grouped convolution); the
  vmapped grid is meant for accelerators.
- A grid too big for the device is split into chunks of at most
  ``--max_runs_per_chunk`` runs, trained one after another. Where the device
  reports its free memory (GPU, TPU), the chunk is also shrunk until XLA's
  compiled memory analysis of the step fits in it; on CPU the flag alone
  decides (default 16). All chunks of a program have one size (the last one is
  padded with copies of a real run, discarded), so the step compiles once.
- A rerun on the same workdir skips the runs whose metrics are complete (a
  test record for the last epoch, or a ``diverged.txt``) and trains the
  others from scratch; a run folder holding other settings is refused.
- A run whose loss becomes NaN or inf does not stop the others: it gets a
  ``diverged.txt`` naming the step, and no further records.
- Bad input (an empty or repeated grid value, a non-positive ``--lr``, ``--lam``
  with a method that has none, a batch larger than the data, ...) stops before
  any training with one line naming the flag (``Config.validate`` on every run).

Library use::

  configs = sweep.grid(Config(method="l2", epochs=10), lrs=[0.05, 0.1],
                       lams=[1e-4, 5e-4], seeds=[0, 1])
  states = sweep.train_grid(configs, "runs/sweep")  # one TrainState per run
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import sys
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app
from absl import flags
from absl import logging

import normreg

from experiments import config as config_lib
from experiments import data as data_lib
from experiments import trainer
from experiments.config import Config

# The Config fields a sweep lists; the other fields must agree within one vmapped program.
GRID_FIELDS = ("method", "lr", "lam", "seed")
DEFAULT_MAX_RUNS_PER_CHUNK = 16
DIVERGED = "diverged.txt"
# Fraction of the device's free memory a chunk may plan to use.
MEMORY_FRACTION = 0.9


# -------------------------------------------------------------------------- the grid


def _check_axis(flag: str, values: Sequence[Any]) -> None:
  if not values:
    raise ValueError(f"--{flag} is empty: give at least one value (comma-separated).")
  for value in values:
    if list(values).count(value) > 1:
      raise ValueError(f"--{flag} lists {value!r} more than once; list each value once.")


def grid(config: Config, lrs: Sequence[float], lams: Optional[Sequence[Optional[float]]] = None,
         seeds: Optional[Sequence[int]] = None,
         methods: Optional[Sequence[str]] = None) -> list[Config]:
  """Every ``(method, lr, lam, seed)`` combination of ``config``, validated.

  Args:
    config: the settings all runs share (its ``lr``, ``lam``, ``seed`` and
      ``method`` are the defaults of the axes left out).
    lrs: peak learning rates.
    lams: L2 coefficients (``None`` in the list: the default,
      ``config_lib.DEFAULT_LAM``); default ``[config.lam]``. They apply to the
      methods that have one (``l2``, ``decoupled``); the other methods of a
      mixed ``methods`` list get one run per ``(lr, seed)``. ``lams`` with only
      methods that have no ``lam`` is an error naming ``--lam``.
    seeds: seeds (init, data order, augmentation); default ``[config.seed]``.
    methods: default ``[config.method]``.

  Returns:
    The Configs, method-major then lr, lam, seed (the runs of one method are
    contiguous).

  Raises:
    ValueError: an empty or repeated axis value, or a run ``Config.validate``
      refuses; the message names the flag.
  """
  lams = [config.lam] if lams is None else list(lams)
  seeds = [config.seed] if seeds is None else list(seeds)
  methods = [config.method] if methods is None else list(methods)
  for flag, values in (("method", methods), ("lr", lrs), ("lam", lams), ("seed", seeds)):
    _check_axis(flag, values)
  any_lam_method = any(m in config_lib.LAM_METHODS for m in methods)
  configs = []
  for method in methods:
    # Methods without lam: one run per (lr, seed), unless no method has a lam (then the
    # lams go through to validate(), which names --lam).
    method_lams = lams if method in config_lib.LAM_METHODS or not any_lam_method else [None]
    for lr, lam, seed in itertools.product(lrs, method_lams, seeds):
      configs.append(dataclasses.replace(config, method=method, lr=lr, lam=lam, seed=seed))
  for c in configs:
    c.validate()
    if c.method == "exp_lr":
      raise ValueError("--method=exp_lr cannot be swept: its grouped learning rate is fixed "
                       "when the chain is built, not injected; run it with "
                       "experiments.train.")
  return configs


def _format(value: Any) -> str:
  return repr(float(value)) if isinstance(value, float) else str(value)


def run_names(configs: Sequence[Config]) -> list[str]:
  """Folder names: ``method=l2_lr=0.1_lam=0.0005_seed=0`` (no lam for methods without).

  Any other field that differs between the configs is appended (``_width=8``).
  """
  varying = [f.name for f in dataclasses.fields(Config)
             if f.name not in GRID_FIELDS and len({getattr(c, f.name) for c in configs}) > 1]
  names = []
  for c in configs:
    parts = [f"method={c.method}", f"lr={_format(float(c.lr))}"]
    if c.method in config_lib.LAM_METHODS:
      parts.append(f"lam={_format(float(c.lam_value))}")
    parts.append(f"seed={c.seed}")
    parts += [f"{name}={_format(getattr(c, name))}" for name in varying]
    names.append("_".join(parts).replace(os.sep, "-"))
  return names


def program_key(config: Config) -> Config:
  """The settings that must agree for runs to share one vmapped program."""
  return dataclasses.replace(config, lr=1.0, lam=None, seed=0)


# ------------------------------------------------------------------------- the recipe


def recipe(config: Config, groups: Any, total_steps: int) -> Callable[..., Any]:
  """``optax.inject_hyperparams`` over ``trainer.make_optimizer``: lr and lam as state.

  Returns a function ``(learning_rate, lam=None) -> GradientTransformation``
  whose ``init`` stores ``learning_rate`` (the peak rate) and, for the methods
  that have one, ``lam`` in the optimizer state (``InjectHyperparamsState``);
  ``update`` rebuilds the chain from the values in the state it is given. So one
  transformation updates every run of a vmapped state with the run's own
  values. Inside, the chain is exactly ``trainer.make_optimizer`` of ``config``
  with ``lr`` and ``lam`` replaced, and the schedule
  ``trainer.make_schedule(config with lr=learning_rate)``: a constant ``lr``, a
  cosine ``lr * (1 + cos(pi t / T)) / 2`` or the step schedule, evaluated at
  the optimizer's own step count, as in the single run.
  ``make_optimizer`` and ``make_schedule`` accept traced values; no
  ``Config.validate()`` is called on the Config that holds them.
  """

  def factory(learning_rate, lam=None):
    run = dataclasses.replace(config, lr=learning_rate, lam=lam)
    return trainer.make_optimizer(run, groups, trainer.make_schedule(run, total_steps))

  return optax.inject_hyperparams(factory)


def recipe_for(config: Config, groups: Any, total_steps: int) -> optax.GradientTransformation:
  """The injected chain holding ``config.lr`` and (if the method has it) its lam."""
  make = recipe(config, groups, total_steps)
  if config.method in config_lib.LAM_METHODS:
    return make(learning_rate=float(config.lr), lam=float(config.lam_value))
  return make(learning_rate=float(config.lr))


# ------------------------------------------------------------------------- a program


@dataclasses.dataclass
class Program:
  """What the runs of one vmapped program share (one method and all other settings).

  Built by :func:`make_program` from the first run: the NNX graph definitions,
  the scale-invariance groups and the injected optax chain (whose numbers come
  from each run's state).
  """
  config: Config
  graphdef: Any
  eval_graphdef: Any
  groups: Any
  tx: optax.GradientTransformation
  n_train: int
  steps_per_epoch: int
  total_steps: int
  # Runs vectorized together by jax.vmap inside a step; None: all of the chunk.
  vmap_size: Optional[int] = None
  # (seed, id(dataset)) -> the seed's initial (params, rest).
  initial: dict = dataclasses.field(default_factory=dict, repr=False)
  _jitted: dict = dataclasses.field(default_factory=dict, repr=False)

  def jitted(self, name: str, per_run_data: bool) -> Callable:
    """The jitted train step, eval step or layer metrics, built once per program: every
    chunk of the program reuses one trace and one compiled executable."""
    key = (name, per_run_data)
    if key not in self._jitted:
      if name == "train_step":
        fn = jax.jit(make_vmapped_step(self, per_run_data=per_run_data),
                     donate_argnums=() if jax.default_backend() == "cpu" else 0)
      elif name == "eval_step":
        fn = jax.jit(make_vmapped_eval_step(self, per_run_data=per_run_data))
      else:
        fn = jax.jit(make_vmapped_layer_metrics(self))
      self._jitted[key] = fn
    return self._jitted[key]


def _same_groups(a: Any, b: Any) -> bool:
  is_none = lambda x: x is None
  return (jax.tree.structure(a, is_leaf=is_none) == jax.tree.structure(b, is_leaf=is_none)
          and jax.tree.leaves(a, is_leaf=is_none) == jax.tree.leaves(b, is_leaf=is_none))


def make_program(configs: Sequence[Config], datasets: Sequence[data_lib.Dataset],
                 vmap_size: Optional[int] = None) -> Program:
  """The shared program of ``configs`` (one ``program_key``), ``datasets[i]`` run i's data.

  Per distinct seed, the model is built by ``trainer.init_model``, as
  ``train_and_evaluate`` builds it (groups found on the first 64 normalized
  training images, ``--init_scale`` applied), and kept as the seed's initial
  variables. The groups decide the optimizer's structure, so they must agree
  across seeds; they do for the models here, invariance being a property of
  the architecture.
  """
  config, dataset = configs[0], datasets[0]
  n_train = dataset.train_images.shape[0]
  steps_per_epoch = n_train // config.batch_size
  total_steps = steps_per_epoch * config.epochs
  first, initial = None, {}
  for c, ds in zip(configs, datasets):
    if (c.seed, id(ds)) in initial:
      continue
    model = trainer.init_model(c, ds.num_classes, ds.train_images,
                               *data_lib.channel_stats(ds.train_images))
    if first is None:
      first = model
    elif not _same_groups(model.groups, first.groups):
      raise ValueError(f"--seed={c.seed} finds other scale-invariant groups than "
                       f"--seed={config.seed}; give them with --group_rules.")
    initial[(c.seed, id(ds))] = (model.params, model.rest)
  groups = first.groups
  logging.info("scale-invariant groups:\n%s", normreg.groups.summary(groups))
  return Program(config=config, graphdef=first.graphdef, eval_graphdef=first.eval_graphdef,
                 groups=groups, tx=recipe_for(config, groups, total_steps), n_train=n_train,
                 steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                 vmap_size=vmap_size, initial=initial)


def init_state(program: Program, config: Config,
               dataset: data_lib.Dataset) -> trainer.TrainState:
  """Run ``config``'s initial state: its seed's params and BatchNorm statistics (built
  by :func:`make_program` from the program's configs and datasets), and the injected
  chain's ``init`` (lr and lam in the state)."""
  params, rest = program.initial[(config.seed, id(dataset))]
  opt_state = recipe_for(config, program.groups, program.total_steps).init(params)
  return trainer.TrainState(jnp.int32(0), params, rest, opt_state, jnp.int32(-1))


def stack(trees: Sequence[Any]) -> Any:
  """The runs' pytrees stacked on a new leading axis (``jnp.stack`` per leaf)."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree: Any, n: int) -> list[Any]:
  return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(n)]


def over_runs(fn: Callable, in_axes: Sequence[Optional[int]],
              vmap_size: Optional[int]) -> Callable:
  """``fn`` over a leading run axis of the arguments whose ``in_axes`` is 0.

  ``vmap_size=None``: ``jax.vmap(fn, in_axes)``, every run at once. Otherwise
  ``jax.lax.map`` over the runs, ``vmap_size`` of them vectorized at a time
  (1: a loop, one run after another inside the same compiled program). Same
  numbers either way; the choice is speed and memory: XLA turns a vmapped
  convolution with per-run kernels into a grouped convolution, fast on GPUs
  and TPUs, several times slower than separate convolutions on CPUs
  (``python -m benchmarks.step_overhead --tables=grid``; on a 2-core CPU the
  ``lax.map`` loop measured slower still than the vmapped step).
  """
  if vmap_size is None:
    return jax.vmap(fn, in_axes=tuple(in_axes))

  def mapped(*args):
    per_run = tuple(a for a, axis in zip(args, in_axes) if axis == 0)

    def one(xs):
      it = iter(xs)
      return fn(*(next(it) if axis == 0 else a for a, axis in zip(args, in_axes)))

    return jax.lax.map(one, per_run, batch_size=None if vmap_size == 1 else vmap_size)

  return mapped


def make_vmapped_step(program: Program, *, per_run_data: bool = False) -> Callable:
  """``step(states, images, labels, idx, keys, mean, std) -> (states, metrics)``, to jit.

  ``trainer.make_train_step`` over the runs (:func:`over_runs`): ``states``,
  ``idx`` (``(runs, batch)``) and ``keys`` (each run's ``fold_in(key(seed), 1)``)
  carry a leading run axis; the data (``images``, ``labels``, ``mean``, ``std``)
  is shared, or per run with ``per_run_data`` (subsets drawn per seed).
  """
  config = program.config

  def one(state, images, labels, idx, key, mean, std):
    step = trainer.make_train_step(program.graphdef, program.tx, mean, std,
                                   augment=config.augment, key=key)
    return step(state, images, labels, idx)

  data = 0 if per_run_data else None
  return over_runs(one, (0, data, data, 0, 0, data, data), program.vmap_size)


def make_vmapped_eval_step(program: Program, *, per_run_data: bool = False) -> Callable:
  """``trainer.make_eval_step`` over the runs: per-run sums of loss and of correct."""

  def one(params, rest, images, labels, weights, mean, std):
    return trainer.make_eval_step(program.eval_graphdef, mean, std)(params, rest, images,
                                                                    labels, weights)

  data = 0 if per_run_data else None
  return over_runs(one, (0, 0, data, data, None, data, data), program.vmap_size)


def make_vmapped_layer_metrics(program: Program) -> Callable:
  """``jax.vmap`` of ``trainer.layer_metrics``, ``learning_rate`` per run."""
  metrics = trainer.make_layer_metrics(program.config, program.groups)
  return jax.vmap(lambda before, after, lr: metrics(before, after, learning_rate=lr))


# ------------------------------------------------------------------------ chunking


def check_chunking(max_runs_per_chunk: Optional[int], vmap_size: Optional[int]) -> None:
  """Raises ``ValueError`` naming ``--max_runs_per_chunk`` or ``--vmap_size`` if out of range."""
  if max_runs_per_chunk is not None and not max_runs_per_chunk > 0:
    raise ValueError(f"--max_runs_per_chunk must be > 0, got {max_runs_per_chunk}.")
  if vmap_size is not None and vmap_size < 0:
    raise ValueError(f"--vmap_size must be >= 0 (0: every run of a chunk), got {vmap_size}.")


def device_free_bytes(device: Optional[jax.Device] = None) -> Optional[int]:
  """Free memory of ``device`` from ``memory_stats()``; ``None`` where unknown (CPU)."""
  device = device or jax.devices()[0]
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  if not stats or "bytes_limit" not in stats:
    return None
  return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def compiled_bytes(compiled: Any) -> Optional[int]:
  """Bytes a compiled executable needs: arguments + outputs + temporaries - aliased."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def fit_chunk(start: int, bytes_for: Callable[[int], Optional[int]],
              budget: Optional[int]) -> int:
  """The largest chunk size ``<= start`` whose ``bytes_for(size)`` fits ``budget``.

  Shrinks in proportion to the overshoot, ``size * budget / need``, and
  measures again (XLA's estimate is not exactly linear in the size). Without a
  budget or a measurement, ``start``. A single run that does not fit is tried
  anyway (XLA will say how much it lacks).
  """
  size = start
  while budget is not None and size > 1:
    need = bytes_for(size)
    if need is None or need <= budget:
      break
    size = max(1, min(size - 1, int(size * budget / need)))
    logging.info("a chunk needs %.2f GiB, %.2f GiB free: trying %d runs per chunk",
                 need / 2**30, budget / 2**30, size)
  return size


def plan_chunks(n_runs: int, size: int) -> list[range]:
  """``n_runs`` in consecutive chunks of one common size ``<= size``, as even as can be.

  E.g. 17 runs with at most 16 per chunk: two chunks of 9 (the second padded).
  """
  n_chunks = math.ceil(n_runs / size)
  size = math.ceil(n_runs / n_chunks)
  return [range(i, min(i + size, n_runs)) for i in range(0, n_runs, size)]


# ------------------------------------------------------------------------- the data


def _load_datasets(configs: Sequence[Config],
                   dataset: Optional[data_lib.Dataset]) -> list[data_lib.Dataset]:
  """Each run's data: ``dataset`` for all, or loaded as ``train_and_evaluate`` loads it.

  A subset (``train_size``/``test_size``) is drawn with the run's seed, so it is
  loaded once per seed; the whole set once.
  """
  if dataset is not None:
    return [dataset] * len(configs)
  cache = {}
  out = []
  for c in configs:
    subset = c.train_size is not None or c.test_size is not None
    key = (c.dataset, c.data_dir, c.train_size, c.test_size, c.seed if subset else None)
    if key not in cache:
      cache[key] = data_lib.load(c.dataset, data_dir=c.data_dir, train_size=c.train_size,
                                 test_size=c.test_size, seed=c.seed)
    out.append(cache[key])
  return out


@dataclasses.dataclass
class _ChunkData:
  """A chunk's data on the device: shared (no run axis) or stacked per run."""
  per_run: bool
  train_images: jax.Array
  train_labels: jax.Array
  test_images: jax.Array
  test_labels: jax.Array
  mean: jax.Array
  std: jax.Array


def _chunk_data(datasets: Sequence[data_lib.Dataset],
                per_run: Optional[bool] = None) -> _ChunkData:
  """Shared when every run has the same dataset object (unless ``per_run``), else stacked."""
  def arrays(ds):
    mean, std = data_lib.channel_stats(ds.train_images)
    return (ds.train_images, ds.train_labels, ds.test_images, ds.test_labels, mean, std)

  if per_run is None:
    per_run = any(ds is not datasets[0] for ds in datasets)
  if not per_run:
    return _ChunkData(False, *jax.device_put(arrays(datasets[0])))
  per_run = [arrays(ds) for ds in datasets]
  return _ChunkData(True, *(jax.device_put(np.stack(a)) for a in zip(*per_run)))


# --------------------------------------------------------------------- the training


def _check_run_config(run_dir: str, config: Config) -> None:
  """Refuses a run folder whose ``config.json`` holds other settings (as the launcher)."""
  diff = trainer.changed_settings(run_dir, config)
  if diff:
    raise ValueError(f"--workdir: {run_dir} holds a run with other settings {diff} "
                     "(old, new); sweep with the same flags or use a new --workdir.")


def _is_complete(run_dir: str, config: Config) -> bool:
  if os.path.exists(os.path.join(run_dir, DIVERGED)):
    return True
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return False
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  return any(r.get("kind") == "test" and r.get("epoch") == config.epochs for r in records)


def _evaluate(eval_step, params, rest, data: _ChunkData, batch_size: int,
              n_runs: int) -> list[dict[str, float]]:
  """``trainer.evaluate`` per run: the last batch padded and masked, sums in Python floats."""
  axis = 1 if data.per_run else 0
  n = data.test_labels.shape[axis]
  loss, correct = [0.0] * n_runs, [0.0] * n_runs
  for x, y, w in trainer.eval_batches(data.test_images, data.test_labels, batch_size, axis):
    sums = jax.device_get(eval_step(params, rest, x, y, w, data.mean, data.std))
    for r in range(n_runs):
      loss[r] += float(sums[0][r])
      correct[r] += float(sums[1][r])
  return [{"loss": loss[r] / n, "accuracy": correct[r] / n} for r in range(n_runs)]


def _step_bytes(program: Program, state: trainer.TrainState, data: _ChunkData
                ) -> Callable[[int], Optional[int]]:
  """``n -> bytes`` the compiled vmapped step needs for ``n`` runs like ``state`` (one run,
  no run axis), by XLA's memory analysis of ``jit(...).lower(...).compile()``."""
  step = program.jitted("train_step", data.per_run)

  def spec(x, runs, has_run_axis):
    shape = x.shape[1:] if has_run_axis else x.shape
    return jax.ShapeDtypeStruct(shape if runs is None else (runs,) + shape, x.dtype)

  def bytes_for(n: int) -> Optional[int]:
    data_spec = [spec(a, n if data.per_run else None, data.per_run)
                 for a in (data.train_images, data.train_labels, data.mean, data.std)]
    args = (jax.tree.map(lambda x: spec(x, n, False), state), *data_spec[:2],
            jax.ShapeDtypeStruct((n, program.config.batch_size), jnp.int32),
            jax.ShapeDtypeStruct((n,), jax.random.key(0).dtype), *data_spec[2:])
    return compiled_bytes(step.lower(*args).compile())

  return bytes_for


def _train_chunk(program: Program, configs: Sequence[Config], datasets, run_dirs,
                 size: int, progress: bool) -> list[trainer.TrainState]:
  """Trains ``configs`` (at most ``size``) together, padded to ``size`` runs."""
  config = program.config
  n_real = len(configs)
  configs = list(configs) + [configs[-1]] * (size - n_real)  # padding: copies, discarded
  datasets = list(datasets) + [datasets[-1]] * (size - n_real)
  data = _chunk_data(datasets)
  state = stack([init_state(program, c, ds) for c, ds in zip(configs, datasets)])
  keys = [jax.random.key(c.seed) for c in configs]
  step_keys = jnp.stack([jax.random.fold_in(k, 1) for k in keys])
  schedules = [trainer.make_schedule(c, program.total_steps) for c in configs[:n_real]]
  train_step = program.jitted("train_step", data.per_run)
  eval_step = program.jitted("eval_step", data.per_run)
  metrics_fn = program.jitted("layer_metrics", False)
  donated = jax.default_backend() != "cpu"
  metrics_paths = [os.path.join(d, "metrics.jsonl") for d in run_dirs]
  alive = [True] * n_real

  bar = trainer.progress_bar(program.total_steps, progress, desc=f"{n_real} runs")
  step = 0
  for epoch in range(config.epochs):
    order = np.stack([
        np.asarray(data_lib.epoch_permutation(jax.random.fold_in(k, 1000 + epoch),
                                              program.n_train, config.batch_size))
        for k in keys])  # (runs, steps, batch)
    t0, images_seen = time.perf_counter(), 0
    for i in range(program.steps_per_epoch):
      log_now = (step + 1) % config.log_every == 0 or i == program.steps_per_epoch - 1
      before = (jax.tree.map(jnp.copy, state.params) if donated else state.params
                ) if log_now else None
      state, m = train_step(state, data.train_images, data.train_labels,
                            jnp.asarray(order[:, i]), step_keys, data.mean, data.std)
      step += 1
      images_seen += config.batch_size
      if log_now:
        lrs = [float(s(step - 1)) for s in schedules]  # the rate each run's step used
        lrs_all = jnp.asarray(lrs + [lrs[-1]] * (size - n_real), jnp.float32)
        layers, m, bad = jax.device_get(
            (metrics_fn(before, state.params, lrs_all), m, state.first_bad_step))
        for r in range(n_real):
          if not alive[r]:
            continue
          if bad[r] >= 0:
            alive[r] = False
            message = trainer.non_finite_message(int(bad[r]), epoch, configs[r].lr)
            with open(os.path.join(run_dirs[r], DIVERGED), "w") as f:
              f.write(message + "\n")
            logging.warning("%s: %s", os.path.basename(run_dirs[r]), message)
            continue
          trainer.append_record(metrics_paths[r], trainer.train_record(
              step, program.steps_per_epoch, {k: float(v[r]) for k, v in m.items()}, lrs[r],
              jax.tree.map(lambda a, r=r: float(a[r]), layers)))
      bar.update(1)
    jax.block_until_ready(state.params)
    seconds = time.perf_counter() - t0
    tests = _evaluate(eval_step, state.params, state.rest, data, config.batch_size, n_real)
    for r in range(n_real):
      if alive[r]:
        trainer.append_record(metrics_paths[r], {
            "kind": "test", "step": step, "epoch": epoch + 1, **tests[r],
            "images_per_sec": images_seen / seconds})
    logging.info("epoch %d of %d runs: test accuracy %s, %.0f images/s per run", epoch + 1,
                 n_real, " ".join(f"{t['accuracy']:.3f}" for t in tests),
                 images_seen / seconds)
  bar.close()
  return unstack(state, n_real)


def _chunk_size(program: Program, configs, datasets, max_runs: Optional[int]) -> int:
  """Runs per chunk: ``max_runs`` (default 16 where the free memory is unknown), shrunk
  until XLA's memory analysis of the step fits the device's free memory."""
  budget = device_free_bytes()
  if max_runs is None:
    max_runs = len(configs) if budget is not None else DEFAULT_MAX_RUNS_PER_CHUNK
  start = min(max_runs, len(configs))
  if budget is None:
    return start
  per_run = any(ds is not datasets[0] for ds in datasets)
  data = _chunk_data(datasets[:1], per_run=per_run)
  bytes_for = _step_bytes(program, init_state(program, configs[0], datasets[0]), data)
  return fit_chunk(start, bytes_for, int(budget * MEMORY_FRACTION))


def train_grid(configs: Sequence[Config], workdir: str, *,
               dataset: Optional[data_lib.Dataset] = None,
               max_runs_per_chunk: Optional[int] = None,
               vmap_size: Optional[int] = None,
               progress: bool = True) -> list[Optional[trainer.TrainState]]:
  """Trains every config, vmapped per program, each into ``workdir/<run name>``.

  Args:
    configs: the runs (e.g. from :func:`grid`); runs that differ only in
      ``lr``, ``lam`` and ``seed`` share one jitted, vmapped program, the
      others (another method, say) run one program after another.
    workdir: the sweep's folder; each run writes ``config.json`` and
      ``metrics.jsonl`` into its subfolder (:func:`run_names`).
    dataset: an already loaded dataset for every run (tests); default: loaded
      per run as ``trainer.train_and_evaluate`` does (once per seed for subsets).
    max_runs_per_chunk: most runs trained at once; default: as many as fit the
      device's free memory, or 16 where that is unknown (CPU).
    vmap_size: runs vectorized together by ``jax.vmap`` inside a step, the
      others looped by ``jax.lax.map`` in the same program (:func:`over_runs`);
      0 or ``None`` (default): every run of a chunk.
    progress: show a progress bar per chunk.

  Returns:
    Per config, in order, its final ``trainer.TrainState`` (``opt_state`` is
    the ``optax.inject_hyperparams`` state), or ``None`` for a run skipped as
    already complete.

  Raises:
    ValueError: a bad config, repeated run, a batch larger than the data or a
      run folder holding other settings; raised before any training.
  """
  configs = [c.validate() for c in configs]
  if not configs:
    raise ValueError("the grid is empty: give at least one value per axis.")
  check_chunking(max_runs_per_chunk, vmap_size)
  names = run_names(configs)
  for name in names:
    if names.count(name) > 1:
      raise ValueError(f"run {name} is in the grid twice (with other settings); "
                       "give each run once.")
  run_dirs = [os.path.join(workdir, name) for name in names]
  for c, run_dir in zip(configs, run_dirs):
    _check_run_config(run_dir, c)
  todo = [i for i, (c, run_dir) in enumerate(zip(configs, run_dirs))
          if not _is_complete(run_dir, c)]
  for i in sorted(set(range(len(configs))) - set(todo)):
    logging.info("%s is complete: skipped", names[i])
  datasets = _load_datasets([configs[i] for i in todo], dataset)
  datasets = dict(zip(todo, datasets))
  for i in todo:
    n_train = datasets[i].train_images.shape[0]
    if configs[i].batch_size > n_train:
      raise ValueError(f"--batch_size={configs[i].batch_size} is larger than the training set "
                       f"({n_train} images); lower --batch_size or raise --train_size.")
  # Checked: now write. An unfinished run starts over.
  for i, run_dir in enumerate(run_dirs):
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
      f.write(configs[i].to_json())
    for stale in ("metrics.jsonl", DIVERGED) if i in todo else ():
      if os.path.exists(os.path.join(run_dir, stale)):
        os.remove(os.path.join(run_dir, stale))

  results: list[Optional[trainer.TrainState]] = [None] * len(configs)
  programs: dict[Config, list[int]] = {}
  for i in todo:
    programs.setdefault(program_key(configs[i]), []).append(i)
  for members in programs.values():
    p_configs = [configs[i] for i in members]
    p_datasets = [datasets[i] for i in members]
    program = make_program(p_configs, p_datasets, vmap_size=vmap_size or None)
    size = _chunk_size(program, p_configs, p_datasets, max_runs_per_chunk)
    chunks = plan_chunks(len(members), size)
    logging.info("%s: %d runs in %d chunk(s) of %d", program.config.method, len(members),
                 len(chunks), len(chunks[0]))
    for chunk in chunks:
      finals = _train_chunk(program, [p_configs[j] for j in chunk],
                            [p_datasets[j] for j in chunk],
                            [run_dirs[members[j]] for j in chunk], len(chunks[0]), progress)
      for j, final in zip(chunk, finals):
        results[members[j]] = final
  return results


# ------------------------------------------------------------------------ launcher


def _parse(flag: str, values: Optional[Sequence[str]], kind: Callable[[str], Any]) -> list:
  out = []
  for text in values or []:
    try:
      out.append(kind(text.strip()))
    except ValueError:
      raise ValueError(f"--{flag}: {text!r} is not a valid {kind.__name__}.") from None
  return out


def define_flags() -> None:
  """The launcher's flags (``config.define_flags``), with the grid axes as lists.

  Called by ``python -m experiments.sweep`` only, not on import, so that this
  module can be imported beside ``experiments.train``.
  """
  config_lib.define_flags()
  for name in GRID_FIELDS:
    help_ = flags.FLAGS[name].help
    default = flags.FLAGS[name].default
    delattr(flags.FLAGS, name)
    flags.DEFINE_list(name, None if default is None else str(default),
                      f"Comma-separated list, one run per value. {help_}")
  flags.DEFINE_string("workdir", None, "Folder of the sweep; one subfolder per run.")
  flags.DEFINE_integer("vmap_size", None,
                       "Runs vectorized by jax.vmap at a time inside the one jitted step (the "
                       "others are looped by jax.lax.map in the same program); 0: every run "
                       "of a chunk (default).")
  flags.DEFINE_integer("max_runs_per_chunk", None,
                       "Most runs trained at once; default: what fits the device's free "
                       f"memory, or {DEFAULT_MAX_RUNS_PER_CHUNK} where it is unknown (CPU).")
  flags.mark_flag_as_required("workdir")


def configs_from_flags() -> list[Config]:
  """The grid of the parsed flags (raises ``ValueError`` naming the flag)."""
  f = flags.FLAGS
  base = Config(**{field.name: getattr(f, field.name) for field in dataclasses.fields(Config)
                   if field.name not in GRID_FIELDS})
  lams = None if f.lam is None else _parse("lam", f.lam, float)
  return grid(base, lrs=_parse("lr", f.lr, float), lams=lams,
              seeds=_parse("seed", f.seed, int), methods=_parse("method", f.method, str))


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    configs = configs_from_flags()
    check_chunking(flags.FLAGS.max_runs_per_chunk, flags.FLAGS.vmap_size)
  except ValueError as e:
    sys.exit(f"experiments.sweep: {e}")  # one line naming the flag, exit status 1
  logging.info("%d runs:\n%s", len(configs), "\n".join(run_names(configs)))
  train_grid(configs, flags.FLAGS.workdir, max_runs_per_chunk=flags.FLAGS.max_runs_per_chunk,
             vmap_size=flags.FLAGS.vmap_size)


if __name__ == "__main__":
  define_flags()
  app.run(main)

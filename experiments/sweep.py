"""A grid of recipes as one jitted program: ``python -m experiments.sweep``.

::

  python -m experiments.sweep --workdir=DIR --lr=0.05,0.1 --lam=1e-4,5e-4 --seed=0,1 \\
      [--method=l2,spherical] [any other flag of experiments.train]

trains every combination of ``--method x --lr x --lam x --seed`` (comma-separated
lists; every other flag is the launcher's and is shared by all runs). The runs
of one method share ONE compiled program, since ``lr`` and ``lam`` live in the
optimizer state; methods, whose optax chains differ in structure, run one
program after another. The program serves the runs of a chunk in one of two
ways (``--strategy``): ``vmap`` stacks them on a leading axis and trains them
by one ``jax.vmap``-ed step (fast on accelerators), ``sequential`` runs the
one jitted single-run step over them one after another (what each run costs
alone, without recompiling: fast on CPUs, where XLA compiles a vmapped
convolution with per-run kernels to a slow grouped convolution); ``auto``
(default) times a few steps of both on the first chunk and keeps the faster.

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
- With ``vmap``, the runs are vectorized all at once by default, or
  ``--vmap_size`` at a time with the groups looped by ``jax.lax.map`` in the
  same program (:func:`over_runs`). On a 2-core CPU both are slower per run
  than separate runs (docs/performance.md), and ``auto`` picks
  ``sequential`` there.
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
from experiments import distributed
from experiments import errors
from experiments import records
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
    raise errors.InputError(f"--{flag} is empty: give at least one value (comma-separated).")
  for value in values:
    if list(values).count(value) > 1:
      raise errors.InputError(f"--{flag} lists {value!r} more than once; list each value once.")


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
      methods that have one (``config_lib.LAM_METHODS``: ``l2``, ``decoupled``,
      ``exp_lr``, ``rotational``, ``adamp``); the other methods of a
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
    if c.method in ("exp_lr", "rotational"):
      raise errors.InputError(f"--method={c.method} cannot be swept: its grouped rate is "
                              "computed from --lr and --lam when the chain is built, not "
                              "injected; run it with experiments.train.")
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

  # The strategy the sweep chose for it ("vmap" or "sequential").
  strategy: Optional[str] = None
  # How many times each jitted function was traced (tests check "compiles once").
  traces: dict = dataclasses.field(default_factory=dict, repr=False)

  def jitted(self, name: str, per_run_data: bool, vmapped: bool = True) -> Callable:
    """The jitted train step, eval step or layer metrics, built once per program: every
    chunk of the program reuses one trace and one compiled executable. ``vmapped=False``
    gives the single-run function of the sequential strategy (:class:`_SequentialChunk`),
    also one trace for every run: the runs differ only in the values of their state."""
    key = (name, per_run_data, vmapped)
    if key not in self._jitted:
      one = {"train_step": run_step, "eval_step": run_eval_step,
             "layer_metrics": run_layer_metrics}[name](self)
      if vmapped:
        in_axes = {"train_step": (0, 0, 0, 0, 0, 0, 0), "eval_step": (0, 0, 0, 0, None, 0, 0),
                   "layer_metrics": (0, 0, 0)}[name]
        if name != "layer_metrics" and not per_run_data:
          data = (1, 2, 5, 6) if name == "train_step" else (2, 3, 5, 6)
          in_axes = tuple(None if i in data else a for i, a in enumerate(in_axes))
        one = (jax.vmap(one, in_axes=in_axes) if name == "layer_metrics"
               else over_runs(one, in_axes, self.vmap_size))

      def counted(*args, _fn=one, _key=key):
        self.traces[_key] = self.traces.get(_key, 0) + 1  # runs at trace time only
        return _fn(*args)

      donate = name == "train_step" and jax.default_backend() != "cpu"
      self._jitted[key] = jax.jit(counted, donate_argnums=0 if donate else ())
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
      raise errors.InputError(f"--seed={c.seed} finds other scale-invariant groups than "
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


def run_step(program: Program) -> Callable:
  """One run's ``step(state, images, labels, idx, key, mean, std) -> (state, metrics)``.

  ``trainer.make_train_step`` with the step key and the data as arguments, so that one
  trace serves every run: vmapped over a leading run axis (``state``, ``idx``, ``key``
  and, with per-run data, the data) by :meth:`Program.jitted`, or called run after run.
  """
  config = program.config

  def one(state, images, labels, idx, key, mean, std):
    step = trainer.make_train_step(program.graphdef, program.tx, mean, std,
                                   augment=config.augment, key=key,
                                   **data_lib.augment_options(config.dataset))
    return step(state, images, labels, idx)

  return one


def run_eval_step(program: Program) -> Callable:
  """One run's ``trainer.make_eval_step``: sums of loss and of correct over a batch."""

  def one(params, rest, images, labels, weights, mean, std):
    return trainer.make_eval_step(program.eval_graphdef, mean, std)(params, rest, images,
                                                                    labels, weights)

  return one


def run_layer_metrics(program: Program) -> Callable:
  """One run's ``trainer.layer_metrics(before, after, learning_rate)``."""
  metrics = trainer.make_layer_metrics(program.config, program.groups)
  return lambda before, after, lr: metrics(before, after, learning_rate=lr)


# ------------------------------------------------------------------------ chunking


def check_strategy(strategy: str) -> None:
  if strategy not in ("auto", *STRATEGIES):
    raise errors.InputError(f"--strategy={strategy!r} is not one of auto, "
                            f"{', '.join(STRATEGIES)}.")


def check_chunking(max_runs_per_chunk: Optional[int], vmap_size: Optional[int]) -> None:
  """Raises ``ValueError`` naming ``--max_runs_per_chunk`` or ``--vmap_size`` if out of range."""
  if max_runs_per_chunk is not None and not max_runs_per_chunk > 0:
    raise errors.InputError(f"--max_runs_per_chunk must be > 0, got {max_runs_per_chunk}.")
  if vmap_size is not None and vmap_size < 0:
    raise errors.InputError(f"--vmap_size must be >= 0 (0: every run of a chunk), got {vmap_size}.")


def device_free_bytes(device: Optional[jax.Device] = None) -> Optional[int]:
  """Free memory of ``device`` from ``memory_stats()``; ``None`` where unknown (CPU)."""
  device = device or jax.local_devices()[0]
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
    raise errors.InputError(f"--workdir: {run_dir} holds a run with other settings {diff} "
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


class _VmappedChunk:
  """The runs of a chunk stacked on a leading axis and trained by ONE vmapped step."""

  def __init__(self, program: Program, states: list, datasets: list, keys: jax.Array):
    self.program, self.n = program, len(states)
    self.data = _chunk_data(datasets)
    self.state = stack(states)
    self.keys = keys
    self._step = program.jitted("train_step", self.data.per_run)
    self._eval = program.jitted("eval_step", self.data.per_run)
    self._metrics = program.jitted("layer_metrics", False)

  def step(self, idx: np.ndarray) -> Any:
    d = self.data
    self.state, metrics = self._step(self.state, d.train_images, d.train_labels,
                                     jnp.asarray(idx), self.keys, d.mean, d.std)
    return metrics

  def params(self, copy: bool) -> Any:
    return jax.tree.map(jnp.copy, self.state.params) if copy else self.state.params

  def layers(self, before: Any, lrs: list[float]) -> Any:
    return self._metrics(before, self.state.params, jnp.asarray(lrs, jnp.float32))

  def first_bad(self) -> list[int]:
    return [int(b) for b in jax.device_get(self.state.first_bad_step)]

  def evaluate(self, batch_size: int) -> list[dict[str, float]]:
    """``trainer.evaluate`` per run: the last batch padded and masked."""
    d = self.data
    axis = 1 if d.per_run else 0
    n = d.test_labels.shape[axis]
    loss, correct = np.zeros(self.n), np.zeros(self.n)
    for x, y, w in trainer.eval_batches(d.test_images, d.test_labels, batch_size, axis):
      sums = jax.device_get(self._eval(self.state.params, self.state.rest, x, y, w, d.mean,
                                       d.std))
      loss += np.asarray(sums[0], np.float64)
      correct += np.asarray(sums[1], np.float64)
    return [{"loss": float(loss[r] / n), "accuracy": float(correct[r] / n)}
            for r in range(self.n)]

  def block(self) -> None:
    jax.block_until_ready(self.state.params)

  def finals(self) -> list[trainer.TrainState]:
    return unstack(self.state, self.n)


class _SequentialChunk:
  """The runs of a chunk trained one after another by ONE jitted single-run step.

  The step, eval step and metrics are the single-run functions of :func:`run_step` &
  co., jitted once for the whole grid (``lr`` and ``lam`` are state, the key and the
  data arguments), so each run costs what it costs alone, without recompiling.
  """

  def __init__(self, program: Program, states: list, datasets: list, keys: jax.Array):
    self.program, self.n = program, len(states)
    shared = _chunk_data(datasets[:1], per_run=False)
    self.data = [shared if ds is datasets[0] else _chunk_data([ds], per_run=False)
                 for ds in datasets]
    # Copies: the step donates its state, and the runs' initial states may share buffers
    # (the same init for every learning rate), which a donation would delete.
    self.states = [jax.tree.map(jnp.copy, s) for s in states]
    self.keys = keys
    self._step = program.jitted("train_step", False, vmapped=False)
    self._eval = program.jitted("eval_step", False, vmapped=False)
    self._metrics = program.jitted("layer_metrics", False, vmapped=False)

  def step(self, idx: np.ndarray) -> Any:
    metrics = []
    for r in range(self.n):
      d = self.data[r]
      self.states[r], m = self._step(self.states[r], d.train_images, d.train_labels,
                                     jnp.asarray(idx[r]), self.keys[r], d.mean, d.std)
      metrics.append(m)
    return stack(metrics)

  def params(self, copy: bool) -> Any:
    return [jax.tree.map(jnp.copy, s.params) if copy else s.params for s in self.states]

  def layers(self, before: Any, lrs: list[float]) -> Any:
    return stack([self._metrics(b, s.params, jnp.float32(lr))
                  for b, s, lr in zip(before, self.states, lrs)])

  def first_bad(self) -> list[int]:
    return [int(b) for b in jax.device_get([s.first_bad_step for s in self.states])]

  def evaluate(self, batch_size: int) -> list[dict[str, float]]:
    out = []
    for s, d in zip(self.states, self.data):
      out.append(trainer.evaluate(
          lambda p, r, x, y, w, d=d: self._eval(p, r, x, y, w, d.mean, d.std),
          s.params, s.rest, d.test_images, d.test_labels, batch_size))
    return out

  def block(self) -> None:
    jax.block_until_ready([s.params for s in self.states])

  def finals(self) -> list[trainer.TrainState]:
    return list(self.states)


STRATEGIES = {"vmap": _VmappedChunk, "sequential": _SequentialChunk}
# Steps timed per strategy when --strategy=auto chooses (after one compiling step).
AUTO_TIMING_STEPS = 3


def _chunk_start(program: Program, configs: Sequence[Config], datasets, size: int):
  """The chunk's configs and data padded to ``size`` runs (copies, discarded), its initial
  states and step keys (``fold_in(key(seed), 1)``, as in the single run)."""
  n_real = len(configs)
  configs = list(configs) + [configs[-1]] * (size - n_real)
  datasets = list(datasets) + [datasets[-1]] * (size - n_real)
  states = [init_state(program, c, ds) for c, ds in zip(configs, datasets)]
  keys = [jax.random.key(c.seed) for c in configs]
  step_keys = jnp.stack([jax.random.fold_in(k, 1) for k in keys])
  return configs, datasets, states, keys, step_keys


def choose_strategy(program: Program, configs: Sequence[Config], datasets, size: int,
                    steps: int = AUTO_TIMING_STEPS) -> tuple[str, dict[str, float]]:
  """Times ``steps`` steps of each strategy on the first chunk (after a compiling step,
  from copies of the initial states: the runs themselves are not advanced) and returns
  the faster one, with the seconds per run-step of each."""
  configs, datasets, states, keys, step_keys = _chunk_start(program, configs, datasets, size)
  order = np.stack([np.asarray(data_lib.epoch_permutation(
      jax.random.fold_in(k, 1000), program.n_train, program.config.batch_size)) for k in keys])
  seconds = {}
  for name, cls in STRATEGIES.items():
    chunk = cls(program, [jax.tree.map(jnp.copy, s) for s in states], datasets, step_keys)
    chunk.step(order[:, 0])
    chunk.block()
    start = time.perf_counter()
    for i in range(1, steps + 1):
      chunk.step(order[:, i % order.shape[1]])
    chunk.block()
    seconds[name] = (time.perf_counter() - start) / (steps * size)
  best = min(seconds, key=seconds.get)
  logging.info("sweep strategy: %s (per run-step: %s)", best,
               ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in seconds.items()))
  return best, seconds


def _train_chunk(program: Program, configs: Sequence[Config], datasets, run_dirs,
                 size: int, progress: bool, strategy: str) -> list[trainer.TrainState]:
  """Trains ``configs`` (at most ``size``) together, padded to ``size`` runs."""
  config = program.config
  n_real = len(configs)
  configs, datasets, states, keys, step_keys = _chunk_start(program, configs, datasets, size)
  chunk = STRATEGIES[strategy](program, states, datasets, step_keys)
  schedules = [trainer.make_schedule(c, program.total_steps) for c in configs[:n_real]]
  donated = jax.default_backend() != "cpu"
  logs = [records.RunLog(d) for d in run_dirs]
  alive = [True] * n_real

  bar = trainer.progress_bar(program.total_steps, progress, desc=f"{n_real} runs ({strategy})")
  step = 0
  for epoch in range(config.epochs):
    order = np.stack([
        np.asarray(data_lib.epoch_permutation(jax.random.fold_in(k, 1000 + epoch),
                                              program.n_train, config.batch_size))
        for k in keys])  # (runs, steps, batch)
    t0, images_seen = time.perf_counter(), 0
    for i in range(program.steps_per_epoch):
      log_now = (step + 1) % config.log_every == 0 or i == program.steps_per_epoch - 1
      before = chunk.params(copy=donated) if log_now else None
      m = chunk.step(order[:, i])
      step += 1
      images_seen += config.batch_size
      if log_now:
        lrs = [float(s(step - 1)) for s in schedules]  # the rate each run's step used
        lrs_all = lrs + [lrs[-1]] * (size - n_real)
        layers, m = jax.device_get((chunk.layers(before, lrs_all), m))
        bad = chunk.first_bad()
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
          logs[r].write(trainer.train_record(
              step, program.steps_per_epoch, {k: float(v[r]) for k, v in m.items()}, lrs[r],
              jax.tree.map(lambda a, r=r: float(a[r]), layers)))
      bar.update(1)
    chunk.block()
    seconds = time.perf_counter() - t0
    tests = chunk.evaluate(config.batch_size)
    for r in range(n_real):
      if alive[r]:
        logs[r].write({"kind": "test", "step": step, "epoch": epoch + 1, **tests[r],
                       "images_per_sec": images_seen / seconds})
        logs[r].flush()
    logging.info("epoch %d of %d runs: test accuracy %s, %.0f images/s per run", epoch + 1,
                 n_real, " ".join(f"{t['accuracy']:.3f}" for t in tests[:n_real]),
                 images_seen / seconds)
  bar.close()
  for log in logs:
    log.close()
  return chunk.finals()[:n_real]


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
               strategy: str = "auto",
               progress: bool = True) -> list[Optional[trainer.TrainState]]:
  """Trains every config, one compiled program per method, each into ``workdir/<run name>``.

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
    strategy: ``"vmap"`` (the runs of a chunk stacked and vmapped in one step),
      ``"sequential"`` (one jitted single-run step serving the runs one after
      another: what each run costs alone, compiled once for the grid) or
      ``"auto"`` (default: time a few steps of both on the program's first
      chunk, keep the faster, log the choice).
    progress: show a progress bar per chunk.

  Returns:
    Per config, in order, its final ``trainer.TrainState`` (``opt_state`` is
    the ``optax.inject_hyperparams`` state), or ``None`` for a run skipped as
    already complete (or, in a multi-host sweep, trained by another process:
    process ``p`` of ``P`` trains the runs ``p, p+P, ...``).

  Raises:
    ValueError: a bad config, repeated run, a batch larger than the data or a
      run folder holding other settings; raised before any training.
  """
  configs = [c.validate() for c in configs]
  if not configs:
    raise errors.InputError("the grid is empty: give at least one value per axis.")
  check_chunking(max_runs_per_chunk, vmap_size)
  check_strategy(strategy)
  names = run_names(configs)
  for name in names:
    if names.count(name) > 1:
      raise errors.InputError(f"run {name} is in the grid twice (with other settings); "
                       "give each run once.")
  run_dirs = [os.path.join(workdir, name) for name in names]
  for c, run_dir in zip(configs, run_dirs):
    _check_run_config(run_dir, c)
  todo = [i for i, (c, run_dir) in enumerate(zip(configs, run_dirs))
          if not _is_complete(run_dir, c)]
  for i in sorted(set(range(len(configs))) - set(todo)):
    logging.info("%s is complete: skipped", names[i])
  # Multi-host: the runs are independent; process p of P trains runs p, p+P, ... alone.
  mine = [i for i in range(len(configs)) if i % jax.process_count() == jax.process_index()]
  todo = [i for i in todo if i in mine]
  datasets = _load_datasets([configs[i] for i in todo], dataset)
  datasets = dict(zip(todo, datasets))
  for i in todo:
    n_train = datasets[i].train_images.shape[0]
    if configs[i].batch_size > n_train:
      raise errors.InputError(f"--batch_size={configs[i].batch_size} is larger than the training set "
                       f"({n_train} images); lower --batch_size or raise --train_size.")
  # Checked: now write (each process its own runs). An unfinished run starts over.
  for i, run_dir in enumerate(run_dirs):
    if i not in mine:
      continue
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
    if strategy == "sequential":  # one run at a time: no vmapped program to fit in memory
      size = min(max_runs_per_chunk or len(members), len(members))
    else:
      size = _chunk_size(program, p_configs, p_datasets, max_runs_per_chunk)
    chunks = plan_chunks(len(members), size)
    chosen = strategy
    if strategy == "auto":
      chosen, _ = choose_strategy(program, [p_configs[j] for j in chunks[0]],
                                  [p_datasets[j] for j in chunks[0]], len(chunks[0]))
    program.strategy = chosen
    logging.info("%s: %d runs in %d chunk(s) of %d, %s", program.config.method, len(members),
                 len(chunks), len(chunks[0]), chosen)
    for chunk in chunks:
      finals = _train_chunk(program, [p_configs[j] for j in chunk],
                            [p_datasets[j] for j in chunk],
                            [run_dirs[members[j]] for j in chunk], len(chunks[0]), progress,
                            chosen)
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
      raise errors.InputError(f"--{flag}: {text!r} is not a valid {kind.__name__}.") from None
  return out


def define_flags() -> None:
  """The launcher's flags (``config.define_flags``, ``distributed.define_flags``), with the
  grid axes as lists.

  Called by ``python -m experiments.sweep`` only, not on import, so that this
  module can be imported beside ``experiments.train``.
  """
  config_lib.define_flags()
  distributed.define_flags()
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
  flags.DEFINE_enum("strategy", "auto", ["auto", "vmap", "sequential"],
                    "How the runs of a chunk share the one compiled step: vmap (stacked, one "
                    "vmapped step), sequential (one single-run step, run after run) or auto "
                    "(time both on the first chunk, keep the faster).")
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
  with errors.one_line("experiments.sweep"):
    if len(argv) > 1:
      raise errors.InputError(f"unexpected arguments: {argv[1:]}")
    configs = configs_from_flags()
    check_chunking(flags.FLAGS.max_runs_per_chunk, flags.FLAGS.vmap_size)
    distributed.initialize_from_flags()
    logging.info("%d runs:\n%s", len(configs), "\n".join(run_names(configs)))
    train_grid(configs, flags.FLAGS.workdir, max_runs_per_chunk=flags.FLAGS.max_runs_per_chunk,
               vmap_size=flags.FLAGS.vmap_size, strategy=flags.FLAGS.strategy)


if __name__ == "__main__":
  define_flags()
  app.run(main)

"""The two execution strategies of a chunk, :data:`STRATEGIES`: ``vmap`` (the runs
stacked and trained by one vmapped step) and ``sequential`` (the one jitted single-run
step over the runs one after another, each through the launcher's own training loop,
``experiments.loop.train``); ``auto`` times both (:func:`choose_strategy`).
"""

from __future__ import annotations

import os
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from experiments import errors
from experiments import loop as loop_lib
from experiments import records
from experiments import steps as steps_lib
from experiments import trainer
from experiments.config import Config
from experiments.sweep.grid import DIVERGED
from experiments.sweep.program import Program, init_state, stack, unstack
from experiments.sweep.chunks import _chunk_data


class _VmappedChunk:
  """The runs of a chunk stacked on a leading axis and trained by ONE vmapped step."""

  def __init__(self, program: Program, states: list, datasets: list, keys: jax.Array):
    self.program, self.n = program, len(states)
    self.data = _chunk_data(datasets, task=program.task)
    self.state = stack(states)
    self.keys = keys
    self._step = program.jitted("train_step", self.data.per_run)
    self._eval = program.jitted("eval_step", self.data.per_run)
    self._metrics = program.jitted("layer_metrics", False)

  def step(self, idx: np.ndarray) -> Any:
    d = self.data
    self.state, metrics = self._step(self.state, d.train, jnp.asarray(idx), self.keys, d.stats)
    return metrics

  def params(self, copy: bool) -> Any:
    return jax.tree.map(jnp.copy, self.state.params) if copy else self.state.params

  def layers(self, before: Any, lrs: list[float]) -> Any:
    return self._metrics(before, self.state.params, jnp.asarray(lrs, jnp.float32))

  def first_bad(self) -> list[int]:
    return [int(b) for b in jax.device_get(self.state.first_bad_step)]

  def evaluate(self, batch_size: int) -> list[dict[str, float]]:
    """``steps.evaluate`` per run: the last batch padded and masked."""
    d, task = self.data, self.program.task
    axis = 1 if d.per_run else 0
    n = jax.tree.leaves(d.test)[0].shape[axis]
    totals: dict[str, np.ndarray] = {}
    for batch, w in steps_lib.eval_batches(d.test, batch_size, axis):
      sums = jax.device_get(self._eval(self.state.params, self.state.rest, batch, w, d.stats))
      for name, value in sums.items():
        totals[name] = totals.get(name, 0.0) + np.asarray(value, np.float64)
    return [task.eval_metrics(self.program.config, {k: float(v[r]) for k, v in totals.items()},
                              n) for r in range(self.n)]

  def block(self) -> None:
    jax.block_until_ready(self.state.params)

  def finals(self) -> list[trainer.TrainState]:
    return unstack(self.state, self.n)


class _SequentialChunk:
  """The runs of a chunk trained one after another by ONE jitted single-run step.

  The step, eval step and metrics are the single-run functions of :func:`run_step` &
  co., jitted once for the whole grid (``lr`` and ``lam`` are state, the key and the
  data arguments), so each run costs what it costs alone, without recompiling. Each run
  trains through the launcher's loop (:meth:`train_run`, ``experiments.loop.train``);
  :meth:`step` advances every run by one step (``--strategy=auto`` times it).
  """

  def __init__(self, program: Program, states: list, datasets: list, keys: jax.Array):
    self.program, self.n = program, len(states)
    shared = _chunk_data(datasets[:1], per_run=False, task=program.task)
    self.data = [shared if ds is datasets[0] else
                 _chunk_data([ds], per_run=False, task=program.task) for ds in datasets]
    # Copies: the step donates its state, and the runs' initial states may share buffers
    # (the same init for every learning rate), which a donation would delete.
    self.states = [jax.tree.map(jnp.copy, s) for s in states]
    self.keys = keys
    self._step = program.jitted("train_step", False, vmapped=False)
    self._eval = program.jitted("eval_step", False, vmapped=False)
    self._metrics = program.jitted("layer_metrics", False, vmapped=False)

  def run_step(self, r: int, state, idx: np.ndarray):
    """Run ``r``'s step from ``state`` on the batch ``idx``."""
    d = self.data[r]
    return self._step(state, d.train, jnp.asarray(idx), self.keys[r], d.stats)

  def step(self, idx: np.ndarray) -> Any:
    metrics = []
    for r in range(self.n):
      self.states[r], m = self.run_step(r, self.states[r], idx[r])
      metrics.append(m)
    return stack(metrics)

  def block(self) -> None:
    jax.block_until_ready([s.params for s in self.states])

  def train_run(self, r: int, config: Config, run_dir: str, progress) -> Any:
    """Trains run ``r`` to its end through ``loop.train``; its records go to ``run_dir``.
    Returns its final state, or ``None`` if its loss became NaN or inf (``diverged.txt``
    says at which step)."""
    program, d = self.program, self.data[r]
    log = records.RunLog(run_dir)
    run = loop_lib.Run(
        task=program.task, config=config, budget=program.budget,
        key=jax.random.key(config.seed), n_train=program.n_train,
        step=lambda s, idx: self.run_step(r, s, idx),
        evaluate=lambda s: steps_lib.evaluate(
            lambda p, rest, b, w: self._eval(p, rest, b, w, d.stats), program.task, config,
            s.params, s.rest, d.test, config.batch_size),
        layer_metrics=lambda before, after, lr: self._metrics(before, after, jnp.float32(lr)),
        rate=trainer.grouped_schedule(config, trainer.make_schedule(config,
                                                                    program.total_steps)),
        log=log, copy_before=jax.default_backend() != "cpu",
        note=lambda line: logging.info("%s: %s", os.path.basename(run_dir), line))
    try:
      return loop_lib.train(run, self.states[r], 0, loop_lib.Hooks(progress=progress))
    except loop_lib.NonFiniteLossError as e:
      _write_diverged(run_dir, str(e))
      return None
    finally:
      log.close()


def _write_diverged(run_dir: str, message: str) -> None:
  with open(os.path.join(run_dir, DIVERGED), "w") as f:
    f.write(message + "\n")
  logging.warning("%s: %s", os.path.basename(run_dir), message)


STRATEGIES = {"vmap": _VmappedChunk, "sequential": _SequentialChunk}


def check_strategy(strategy: str) -> None:
  if strategy not in ("auto", *STRATEGIES):
    raise errors.InputError(f"--strategy={strategy!r} is not one of auto, "
                            f"{', '.join(STRATEGIES)}.")


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
  order = np.stack([loop_lib.epoch_order(k, 0, program.n_train, program.config.batch_size)
                    for k in keys])
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
                 size: int, progress: bool, strategy: str) -> list[Optional[Any]]:
  """Trains ``configs`` (at most ``size``) together, padded to ``size`` runs; the final
  state of each, ``None`` for a run whose loss became non-finite."""
  n_real = len(configs)
  configs, datasets, states, keys, step_keys = _chunk_start(program, configs, datasets, size)
  bar = trainer.progress_bar(program.total_steps * (n_real if strategy == "sequential" else 1),
                             progress, desc=f"{n_real} runs ({strategy})")
  try:
    if strategy == "sequential":  # the launcher's loop, run after run (no padding needed)
      chunk = _SequentialChunk(program, states[:n_real], datasets[:n_real],
                               step_keys[:n_real])
      return [chunk.train_run(r, configs[r], run_dirs[r], lambda *_: bar.update(1))
              for r in range(n_real)]
    chunk = STRATEGIES[strategy](program, states, datasets, step_keys)
    return _train_vmapped(program, chunk, configs, keys, run_dirs, n_real, size, bar)
  finally:
    bar.close()


def _train_vmapped(program: Program, chunk: "_VmappedChunk", configs, keys, run_dirs,
                   n_real: int, size: int, bar) -> list[Optional[Any]]:
  """The loop of the vmapped strategy: every run of the chunk advances by one step of ONE
  vmapped program; records and evaluations as ``loop.train`` makes them, per run."""
  config, budget = program.config, program.budget
  rates = [trainer.grouped_schedule(c, trainer.make_schedule(c, program.total_steps))
           for c in configs[:n_real]]
  donated = jax.default_backend() != "cpu"
  logs = [records.RunLog(d) for d in run_dirs]
  alive = [True] * n_real
  step, order_of, order = 0, None, None
  t0, seen = time.perf_counter(), 0
  while step < budget.total_steps:
    epoch, i = divmod(step, budget.steps_per_epoch)
    if order_of != epoch:
      order = np.stack([loop_lib.epoch_order(k, epoch, program.n_train, config.batch_size)
                        for k in keys])  # (runs, steps, batch)
      order_of = epoch
    log_now = budget.logs(step + 1)
    before = chunk.params(copy=donated) if log_now else None
    m = chunk.step(order[:, i])
    step += 1
    seen += config.batch_size * program.task.units(config)
    if log_now:
      lrs = [float(rate(step - 1)) for rate in rates]  # the rate each run's step used
      lrs_all = lrs + [lrs[-1]] * (size - n_real)
      layers, m = jax.device_get((chunk.layers(before, lrs_all), m))
      bad = chunk.first_bad()
      for r in range(n_real):
        if not alive[r]:
          continue
        if bad[r] >= 0:
          alive[r] = False
          _write_diverged(run_dirs[r], loop_lib.non_finite_message(int(bad[r]), epoch,
                                                                   configs[r].lr))
          continue
        logs[r].write(loop_lib.train_record(
            step, budget.steps_per_epoch, {k: float(v[r]) for k, v in m.items()}, lrs[r],
            jax.tree.map(lambda a, r=r: float(a[r]), layers)))
    bar.update(1)
    if budget.evaluates(step):
      chunk.block()
      seconds = time.perf_counter() - t0
      tests = chunk.evaluate(config.batch_size)
      for r in range(n_real):
        if alive[r]:
          logs[r].write(loop_lib.test_record(program.task, budget, step, tests[r],
                                             seen / seconds))
          logs[r].flush()
      head = program.task.headline
      logging.info("step %d of %d runs: test %s %s, %.0f %s/s per run", step, n_real, head,
                   " ".join(f"{t[head]:.3f}" for t in tests[:n_real]), seen / seconds,
                   program.task.unit)
      t0, seen = time.perf_counter(), 0
  for log in logs:
    log.close()
  return [state if ok else None for state, ok in zip(chunk.finals()[:n_real], alive)]

"""The two execution strategies of a chunk, :data:`STRATEGIES`: ``vmap`` (the runs
stacked and trained by one vmapped step) and ``sequential`` (the one jitted single-run
step over the runs one after another); ``auto`` times both (:func:`choose_strategy`).
"""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from experiments import data as data_lib
from experiments import errors
from experiments import records
from experiments import trainer
from experiments.config import Config
from experiments.sweep.grid import DIVERGED
from experiments.sweep.program import Program, init_state, stack, unstack
from experiments.sweep.chunks import _chunk_data


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

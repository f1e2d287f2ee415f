"""How a grid is cut into chunks: the flags' checks, the device's free memory against
XLA's compiled memory analysis of the step (:func:`fit_chunk`), and the data a chunk
trains on.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from experiments import errors
from experiments import tasks as tasks_lib
from experiments import trainer
from experiments.config import Config
from experiments.sweep.program import Program


# ------------------------------------------------------------------------ chunking


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


def _load_datasets(configs: Sequence[Config], dataset: Optional[Any]) -> list[Any]:
  """Each run's data: ``dataset`` for all, or loaded as ``train_and_evaluate`` loads it
  (``Task.load``), once per distinct ``Task.data_key`` (e.g. once per seed for subsets,
  once for a whole set)."""
  if dataset is not None:
    return [dataset] * len(configs)
  cache = {}
  out = []
  for c in configs:
    task = tasks_lib.of(c)
    key = (task.name, task.data_key(c))
    if key not in cache:
      cache[key] = task.load(c)
    out.append(cache[key])
  return out


@dataclasses.dataclass
class _ChunkData:
  """A chunk's data on the device, the task's pytrees: shared (no run axis) or stacked per
  run."""
  per_run: bool
  train: Any
  test: Any
  stats: Any


def _chunk_data(datasets: Sequence[Any], per_run: Optional[bool] = None,
                task: Optional[tasks_lib.Task] = None) -> _ChunkData:
  """Shared when every run has the same dataset object (unless ``per_run``), else stacked.
  ``task``: the runs' (default: the default task's)."""
  task = task or tasks_lib.get(None)

  def arrays(ds):
    train, test = task.arrays(ds)
    return train, test, task.stats(ds)

  if per_run is None:
    per_run = any(ds is not datasets[0] for ds in datasets)
  if not per_run:
    return _ChunkData(False, *jax.device_put(arrays(datasets[0])))
  trees = [arrays(ds) for ds in datasets]
  return _ChunkData(True, *(jax.device_put(jax.tree.map(lambda *a: np.stack(a), *parts))
                            for parts in zip(*trees)))


def _step_bytes(program: Program, state: trainer.TrainState, data: _ChunkData
                ) -> Callable[[int], Optional[int]]:
  """``n -> bytes`` the compiled vmapped step needs for ``n`` runs like ``state`` (one run,
  no run axis), by XLA's memory analysis of ``jit(...).lower(...).compile()``."""
  step = program.jitted("train_step", data.per_run)

  def spec(x, runs, has_run_axis):
    shape = x.shape[1:] if has_run_axis else x.shape
    return jax.ShapeDtypeStruct(shape if runs is None else (runs,) + shape, x.dtype)

  def bytes_for(n: int) -> Optional[int]:
    train, stats = (jax.tree.map(lambda a: spec(a, n if data.per_run else None, data.per_run),
                                 tree) for tree in (data.train, data.stats))
    args = (jax.tree.map(lambda x: spec(x, n, False), state), train,
            jax.ShapeDtypeStruct((n, program.config.batch_size), jnp.int32),
            jax.ShapeDtypeStruct((n,), jax.random.key(0).dtype), stats)
    return compiled_bytes(step.lower(*args).compile())

  return bytes_for

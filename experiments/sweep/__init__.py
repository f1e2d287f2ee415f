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
by one ``jax.vmap``-ed step (fast on accelerators), ``sequential`` trains them
one after another through the launcher's own loop (``experiments.loop.train``)
with the one jitted single-run step (what each run costs alone, without
recompiling: fast on CPUs, where XLA compiles a vmapped convolution with
per-run kernels to a slow grouped convolution); ``auto``
(default) times a few steps of both on the first chunk and keeps the faster.

How it builds on the single-run trainer (``experiments.trainer``):

- ``lr`` and ``lam`` are optimizer *state*, not constants: the chain of
  ``trainer.make_optimizer`` is wrapped in ``optax.inject_hyperparams``
  (:func:`recipe`), so one chain, one trace and one compiled program serve every
  run; under ``jax.vmap`` each run reads its own ``lr``/``lam`` from its slice of
  the state. The schedule is rebuilt inside from the run's peak ``lr``
  (``trainer.make_schedule``), so the step computes the very same numbers.
- Each run's initial params come from its own ``--seed``
  (its task's ``create_model``); its data order and augmentation keys are derived
  exactly as in ``trainer.train_and_evaluate``: ``key = jax.random.key(seed)``,
  the step key ``fold_in(key, 1)`` (then ``fold_in(., step)`` inside the step)
  and epoch ``e``'s order ``epoch_permutation(fold_in(key, 1000 + e))``. So every
  run of a sweep ends where the same ``Config`` trained alone by
  ``trainer.train_and_evaluate`` ends, to float tolerance (tests/test_sweep.py).
- Each run gets its own folder ``WORKDIR/method=l2_lr=0.1_lam=0.0005_seed=0``
  with ``config.json`` and ``metrics.jsonl`` in the launcher's format (per-layer
  metrics from ``steps.layer_metrics``, test records from the task's
  ``steps.make_task_eval_step``, both vmapped), so ``python -m experiments.plot``
  draws them. The throughput (the task's ``<unit>_per_sec``) is per run (the
  sweep as a whole processes the chunk size times that). No checkpoints are
  written.
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

# Layout: grid (the runs, their names, the injected chain), program (what the runs of one
# method share), chunks (memory fitting and chunking), strategies (vmap, sequential, auto),
# cli and __main__ (the command line). train_grid and the chunk size live here, reading
# device_free_bytes from this module; every name is re-exported here.

from __future__ import annotations

import json
import os
from typing import Any, Optional, Sequence

import jax
from absl import logging

from experiments import errors
from experiments import trainer
from experiments.config import Config
from experiments.sweep.grid import (  # pylint: disable=unused-import
    GRID_FIELDS,
    DEFAULT_MAX_RUNS_PER_CHUNK,
    DIVERGED,
    MEMORY_FRACTION,
    _check_axis,
    grid,
    _format,
    run_names,
    program_key,
    recipe,
    recipe_for)
from experiments.sweep.program import (  # pylint: disable=unused-import
    Program,
    _same_groups,
    make_program,
    init_state,
    stack,
    unstack,
    over_runs,
    run_step,
    run_eval_step,
    run_layer_metrics)
from experiments.sweep.chunks import (  # pylint: disable=unused-import
    check_chunking,
    device_free_bytes,
    compiled_bytes,
    fit_chunk,
    plan_chunks,
    _load_datasets,
    _ChunkData,
    _chunk_data,
    _step_bytes)
from experiments.sweep.strategies import (  # pylint: disable=unused-import
    _VmappedChunk,
    _SequentialChunk,
    STRATEGIES,
    check_strategy,
    AUTO_TIMING_STEPS,
    _chunk_start,
    choose_strategy,
    _train_chunk,
    _train_vmapped)

# --------------------------------------------------------------------- the training


def _check_run_config(run_dir: str, config: Config) -> None:
  """Refuses a run folder whose ``config.json`` holds other settings (as the launcher)."""
  diff = trainer.changed_settings(run_dir, config)
  if diff:
    raise errors.InputError(f"--workdir: {run_dir} holds a run with other settings {diff} "
                     "(old, new); sweep with the same flags or use a new --workdir.")


def _is_complete(run_dir: str, config: Config) -> bool:
  """A ``diverged.txt``, or the test record of the run's last step (``--steps``) or last
  epoch (``--epochs``)."""
  if os.path.exists(os.path.join(run_dir, DIVERGED)):
    return True
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return False
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  last = ("step", config.steps) if config.steps else ("epoch", config.epochs)
  return any(r.get("kind") == "test" and r.get(last[0]) == last[1] for r in records)


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
  data = _chunk_data(datasets[:1], per_run=per_run, task=program.task)
  bytes_for = _step_bytes(program, init_state(program, configs[0], datasets[0]), data)
  return fit_chunk(start, bytes_for, int(budget * MEMORY_FRACTION))


def train_grid(configs: Sequence[Config], workdir: str, *,
               dataset: Optional[Any] = None,
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
    dataset: already loaded data for every run (its task's, ``Task.load``; tests);
      default: loaded per run as ``trainer.train_and_evaluate`` does (once per
      ``Task.data_key``: once per seed for subsets).
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
    the ``optax.inject_hyperparams`` state), or ``None`` for a run whose loss
    became non-finite (``diverged.txt``), a run skipped as already complete
    (or, in a multi-host sweep, trained by another process: process ``p`` of
    ``P`` trains the runs ``p, p+P, ...``).

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
    trainer.check_batch_size(configs[i], datasets[i])
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

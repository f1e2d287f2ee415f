"""How much a normreg recipe costs per training step: ``python -m benchmarks.step_overhead``.

Prints three tables, measured in one process on the default JAX device:

1. *Step overhead*: the median time of the jitted train step
   (``experiments.trainer.make_train_step``, augmentation on) of the base
   optimizer alone (``--method=none``: ``optax.sgd``, momentum 0.9) and of each
   normreg recipe (``--recipes``; default l2, decoupled, spherical,
   elr_rescale, tangent) on the same model and data, and ``ratio = recipe / base``. Targets: ratio <= 1.02 on
   GPU, <= 1.05 on CPU.
2. *Throughput*: training images per second (batch / median step time) of the
   paper's CNN (width 64) and ResNet-20 (width 16) at ``--throughput_batch``.
3. *Grid*: one step of a grid of ``--grid_size`` recipes trained together by
   ``experiments.sweep`` (one jitted step over optimizer states that hold each
   run's lr and lam via ``optax.inject_hyperparams``; the runs all ``jax.vmap``-ed,
   or looped by ``jax.lax.map`` inside the program) against the trainer's
   single-run ``l2`` step (the one table 1 times) applied to as many states
   one after another from Python.

Methodology: every step function is called ``--warmup`` times before timing
(the first call compiles); then the recipes are interleaved in rounds (one timed step of
each per round, the order rotated every round), so that drift of the machine
(clock, other work) spreads over all of them alike; every timed step ends with
``jax.block_until_ready``; the median over the rounds is reported, with the
interquartile range. Data: random uint8 32x32x3 images, 10 classes, on the
device; BatchNorm.

The defaults fit a small CPU (a few minutes); the full version::

  python -m benchmarks.step_overhead --batch_sizes=128,512 --steps=50 --throughput_steps=20 \\
      --grid_rounds=10
"""

from __future__ import annotations

import os
import platform
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from absl import logging

from benchmarks.timing import Timed
from benchmarks.timing import interleave
from benchmarks.timing import loop_seconds
from benchmarks.timing import print_table
from benchmarks.timing import warm_up
from experiments import data as data_lib
from experiments import sweep
from experiments import tasks
from experiments import trainer
from experiments.config import Config

RECIPES = ("l2", "decoupled", "spherical", "elr_rescale", "tangent")
BASE = "none"
IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
TARGETS = {"gpu": 1.02, "tpu": 1.02, "cpu": 1.05}
DEFAULT_WIDTH = {"cnn": 64, "resnet20": 16}

def define_flags() -> None:
  """This command's flags: defined when it runs, not on import (flag names repeat)."""
  flags.DEFINE_list("batch_sizes", ["128"], "Batch sizes of the overhead table.")
  flags.DEFINE_integer("steps", 10, "Timed steps (rounds) per recipe and batch size.")
  flags.DEFINE_integer("warmup", 2, "Untimed calls of each step before timing (the "
                       "first one compiles).")
  flags.DEFINE_enum("model", "resnet20", ["resnet20", "cnn"],
                    "Model of the overhead and grid tables.")
  flags.DEFINE_integer("width", None, "Model width; default the model's (16 for "
                       "resnet20, 64 for the cnn).")
  flags.DEFINE_integer("throughput_batch", 128, "Batch of the throughput "
                       "table.")
  flags.DEFINE_integer("throughput_steps", 3, "Timed steps per model of the "
                       "throughput table.")
  flags.DEFINE_integer("grid_size", 8, "Recipes in the grid table (lr x lam of l2).")
  flags.DEFINE_integer("grid_rounds", 2, "Timed rounds of the grid table.")
  flags.DEFINE_list("recipes", list(RECIPES), "--method of each recipe of the "
                     "overhead table (METHOD:adam for --optimizer=adam), e.g. "
                     "rotational,adamp,nero,hyperball:adam.")
  flags.DEFINE_list("tables", ["overhead", "throughput", "grid"], "Tables to print.")


# ---------------------------------------------------------------------- building


def random_dataset(n: int, seed: int = 0) -> data_lib.Dataset:
  """``n`` random uint8 images (train and test) with random labels."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n,) + IMAGE_SHAPE, dtype=np.uint8)
  labels = rng.integers(0, NUM_CLASSES, n).astype(np.int32)
  return data_lib.Dataset(images, labels, images[:8], labels[:8], NUM_CLASSES,
                          tuple(map(str, range(NUM_CLASSES))), "random")


def base_config(model: str, width, batch_size: int, method: str = BASE,
                dtype: str = "float32") -> Config:
  """``method`` is ``--method``, or ``METHOD:adam`` for ``--optimizer=adam``; ``dtype`` the
  network's compute dtype (``--dtype``)."""
  method, _, optimizer = method.partition(":")
  return Config(dataset="cifar10", model=model, width=width, norm="batch", method=method,
                optimizer=optimizer or "sgd", momentum=0.9, lr=0.1, batch_size=batch_size,
                augment=True, dtype=dtype).validate()


def single_run(config: Config, ds: data_lib.Dataset, device_data: tuple,
               model: trainer.Model | None = None) -> Timed:
  """``trainer.make_train_step`` of ``config``'s recipe, jitted as the trainer jits it.

  ``model`` (``trainer.init_model``'s, groups found) is built from ``config`` if not
  given; its variables are copied, so that several steps may share one model and each
  donate its own state.
  """
  images, labels, mean, std = device_data
  if model is None:
    model = trainer.init_model(config, ds.num_classes, images, mean, std)
  model = model._replace(params=jax.tree.map(jnp.copy, model.params),
                        rest=jax.tree.map(jnp.copy, model.rest))
  tx = trainer.make_optimizer(config, model.groups, trainer.make_schedule(config, 10_000))
  step = jax.jit(trainer.make_train_step(model.graphdef, tx, mean, std, augment=config.augment,
                                         key=jax.random.key(1)),
                 donate_argnums=() if jax.default_backend() == "cpu" else 0)
  state = trainer.TrainState(jnp.int32(0), model.params, model.rest, tx.init(model.params),
                             jnp.int32(-1))
  idx = jnp.arange(config.batch_size, dtype=jnp.int32)
  name = config.method + (":adam" if config.optimizer == "adam" else "")
  return Timed(name, step, state, (images, labels, idx))


_BUILT: dict = {}


def built(model: str, width, batch: int, method: str, dtype: str = "float32") -> Timed:
  """The :func:`single_run` of a recipe, built once per process (tables share it)."""
  width = width or DEFAULT_WIDTH[model]
  key = (model, width, batch, method, dtype)
  if key not in _BUILT:
    ds = random_dataset(max(batch, 64))
    _BUILT[key] = single_run(base_config(model, width, batch, method, dtype), ds,
                             device_data(ds))
  return _BUILT[key]


def device_data(ds: data_lib.Dataset) -> tuple:
  mean, std = data_lib.channel_stats(ds.train_images)
  return jax.device_put((ds.train_images, ds.train_labels, mean, std))


def program_data(ds: data_lib.Dataset) -> tuple:
  """``(train, stats)`` on the device as a sweep's program steps take them: the
  classification task's pytrees (``experiments.tasks``)."""
  task = tasks.get("classification")
  return jax.device_put((task.arrays(ds)[0], task.stats(ds)))


# ------------------------------------------------------------------------ tables


def overhead_table(model: str, width, batch_sizes: Sequence[int], steps: int,
                   warmup: int, recipes: Sequence[str] = RECIPES) -> None:
  target = TARGETS.get(jax.default_backend(), 1.05)
  rows = []
  for batch in batch_sizes:
    timed = [built(model, width, batch, m) for m in (BASE, *recipes)]
    warm_up(timed, warmup)
    interleave(timed, steps)
    base = timed[0].median
    for t in timed:
      ratio = t.median / base
      rows.append([t.name if t.name != BASE else "none (base: optax.sgd, momentum 0.9)",
                   batch, f"{1e3 * t.median:.2f}", f"{1e3 * t.iqr:.2f}", f"{ratio:.3f}",
                   "-" if t.name == BASE else ("ok" if ratio <= target else "over")])
  print_table(f"1. step overhead: {model} (width {width or DEFAULT_WIDTH[model]}), BatchNorm, "
               f"augmentation on, median of {steps} interleaved steps; target ratio <= {target}"
               f" on {jax.default_backend()} (<= 1.02 on GPU, <= 1.05 on CPU)",
               ["recipe", "batch", "median ms", "IQR ms", "ratio", "target"], rows)


def throughput_table(batch: int, steps: int, warmup: int) -> None:
  models = (("cnn", 64), ("resnet20", 16))
  timed = {(m, w, r): built(m, w, batch, r) for m, w in models for r in (BASE, "l2")}
  fresh = [t for t in timed.values() if len(t.times) < steps]
  warm_up(fresh, warmup)
  interleave(fresh, steps)
  rows = [[f"{m} w{w}", r, batch, len(t.times), f"{1e3 * t.median:.1f}",
           f"{batch / t.median:.0f}"] for (m, w, r), t in timed.items()]
  print_table(f"2. training throughput at batch {batch}",
               ["model", "recipe", "batch", "steps", "median ms", "images/s"], rows)


GRID_HOWS = ("vmap", "lax_map", "sequential", "auto", "separate")


def grid_measure(model: str, width, batch: int, size: int, rounds: int, warmup: int,
                 hows: Sequence[str] = GRID_HOWS) -> list[dict]:
  """Median seconds of one step of every run of a grid of ``size`` l2 recipes, by each of
  ``hows``: ``[{"how", "label", "seconds", "runs"}]``, ``separate`` last (the reference)."""
  ds = random_dataset(max(batch, 64))
  lrs = [0.025 * 2 ** i for i in range((size + 1) // 2)]
  configs = sweep.grid(base_config(model, width, batch, "l2"), lrs=lrs, lams=[1e-4, 5e-4])[:size]
  n = len(configs)
  train, stats = program_data(ds)
  idx = jnp.tile(jnp.arange(batch, dtype=jnp.int32), (n, 1))
  keys = jnp.stack([jax.random.fold_in(jax.random.key(c.seed), 1) for c in configs])
  labels_of = {
      "vmap": f"vmap: {n} runs in one vmapped step (--strategy=vmap)",
      "lax_map": "vmap, looped by lax.map (--strategy=vmap --vmap_size=1)",
      "sequential": "sequential: one single-run step, run after run (--strategy=sequential)",
      "separate": f"{n} separate runs (the trainer's single-run step, as experiments.train)"}
  swept = []
  for vmap_size, how in ((None, "vmap"), (1, "lax_map")):
    if how not in hows:
      continue
    program = sweep.make_program(configs, [ds] * n, vmap_size=vmap_size)
    states = [sweep.init_state(program, c, ds) for c in configs]
    swept.append(Timed(how, program.jitted("train_step", False), sweep.stack(states),
                       (train, idx, keys, stats)))
  warm_up(swept, warmup)
  for _ in range(rounds):
    for t in swept:
      t.timed()
  seconds = {t.name: t.median for t in swept}
  program = sweep.make_program(configs, [ds] * n)
  if "sequential" in hows or "auto" in hows:
    # sequential: the sweep's one single-run step (lr, lam in the state), run after run.
    step = program.jitted("train_step", False, vmapped=False)
    seq_states = [sweep.init_state(program, c, ds) for c in configs]
    args = lambda i: (train, idx[i], keys[i], stats)
    loop_seconds(step, seq_states, args, max(warmup, 1))
    seconds["sequential"], _ = loop_seconds(step, seq_states, args, rounds)
  if "auto" in hows:
    chosen, _ = sweep.choose_strategy(program, configs, [ds] * n, n)
    labels_of["auto"] = f"auto (--strategy=auto, the default) chose {chosen}"
    seconds["auto"] = seconds["sequential"] if chosen == "sequential" else seconds["vmap"]
  if "separate" in hows:
    # Separate runs: the trainer's own l2 step (as experiments.train runs it), n states.
    single = built(model, width, batch, "l2")
    alone_states = [jax.tree.map(jnp.copy, single.state) for _ in range(n)]
    loop_seconds(single.step, alone_states, lambda i: single.args, max(warmup, 1))
    seconds["separate"], _ = loop_seconds(single.step, alone_states, lambda i: single.args,
                                          rounds)
  return [{"how": how, "label": labels_of[how], "seconds": seconds[how], "runs": n}
          for how in GRID_HOWS if how in hows]


def grid_table(model: str, width, batch: int, size: int, rounds: int, warmup: int) -> None:
  rows = grid_measure(model, width, batch, size, rounds, warmup)
  n, alone = rows[-1]["runs"], rows[-1]["seconds"]
  print_table(f"3. a grid of {n} l2 recipes (lr x lam), {model}, batch {batch}: "
              f"one step of every run (median of {rounds} rounds)",
              ["how", "ms per grid step", "ms per run-step", "speed-up"],
              [[r["label"], f"{1e3 * r['seconds']:.1f}", f"{1e3 * r['seconds'] / n:.1f}",
                f"{alone / r['seconds']:.2f}"] for r in rows])


def header() -> None:
  print(f"normreg step overhead benchmark   jax {jax.__version__}   "
        f"platform {jax.default_backend()}   devices {jax.devices()}")
  print(f"host: {platform.platform()}, python {platform.python_version()}, "
        f"{os.cpu_count()} CPU cores")
  sys.stdout.flush()


FLAGS = flags.FLAGS


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    batch_sizes = [int(b) for b in FLAGS.batch_sizes]
  except ValueError:
    raise app.UsageError(f"--batch_sizes: {FLAGS.batch_sizes} are not integers") from None
  if not batch_sizes or min(batch_sizes) <= 0 or FLAGS.steps <= 0:
    raise app.UsageError("--batch_sizes and --steps must be positive")
  unknown = set(FLAGS.tables) - {"overhead", "throughput", "grid"}
  if unknown:
    raise app.UsageError(f"--tables: unknown {sorted(unknown)}")
  for recipe in FLAGS.recipes:
    try:
      base_config(FLAGS.model, FLAGS.width, batch_sizes[0], recipe)
    except ValueError as e:
      raise app.UsageError(f"--recipes: {recipe!r}: {e}") from None
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # the tables only (-v 0 for the groups found)
  header()
  t0 = time.perf_counter()
  if "overhead" in FLAGS.tables:
    overhead_table(FLAGS.model, FLAGS.width, batch_sizes, FLAGS.steps, FLAGS.warmup,
                   FLAGS.recipes)
  if "throughput" in FLAGS.tables:
    throughput_table(FLAGS.throughput_batch, FLAGS.throughput_steps, FLAGS.warmup)
  if "grid" in FLAGS.tables:
    grid_table(FLAGS.model, FLAGS.width, batch_sizes[0], FLAGS.grid_size,
               FLAGS.grid_rounds, FLAGS.warmup)
  print(f"\ntotal wall time {time.perf_counter() - t0:.0f} s (compilation included)")


if __name__ == "__main__":
  define_flags()
  app.run(main)

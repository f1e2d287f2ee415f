"""Every accelerator figure in one command, within a time budget.

::

  python -m benchmarks.accelerator --out=DIR [--budget_s=480] [--size=full|tiny]
      [--data_dir=CIFAR10_DIR] [--workdir=RUNS_DIR] [--parts=a,b,c,d,e,f,g]

measures, on the default JAX device, and writes ``DIR/results.json`` and
``DIR/results.md`` (the same figures as markdown tables):

a. *Step-time ratio* of every launcher method (``experiments.methods.REGISTRY``;
   ``hyperball`` on Adam, against ``none:adam``) against its base optimizer
   (``--method=none``: SGD with momentum 0.9, or Adam), the train step of
   ``experiments.trainer``, on ResNet-20 (width 16, batch 512, BatchNorm) in
   float32 and bfloat16, and on a transformer of about 85M parameters
   (``benchmarks.transformer``: 12 blocks of width 768, QK-norm and a
   normalized MLP; its groups found by ``normreg.find_scale_invariant``), with
   its blocks unscanned (48 grouped leaves) and scanned (4, ``stack=1``).
   Steps of one table are interleaved (``benchmarks.timing``): median and IQR.
b. *The sweep*: one step of every run of a grid of 8 and of 32 ``l2`` recipes
   of the paper's CNN at width 16, batch 128, vmapped (``--strategy=vmap``),
   one single-run step run after run (``--strategy=sequential``) and as
   separate runs (the trainer's own step), per run-step
   (``benchmarks.step_overhead.grid_measure``).
c. *Training throughput* (images/s, base optimizer) of the paper's CNN (width
   64) and ResNet-20 (width 16) at batch 512.
d. *Detection*: the first ``find_scale_invariant`` call on the transformer
   (tracing, compiling and running its vmapped ``jax.vjp``, the numpy tests),
   against the first call (compile and run) and the median step of one jitted
   forward-backward pass of the same model and batch.
e. *Claims 2 and 3 of the reproduction at full size* (50,000 CIFAR-10 images,
   width 64, 30 epochs; ``experiments.reproduce``) trained through the vmapped
   sweep (``experiments.sweep.train_grid``, ``--strategy=vmap``), as much of
   them as the budget left allows, in this order: seed 0 of the five SGD+L2
   recipes (claim 2's norm ratio, claim 3's SGD+momentum angles), the other
   claim-3 families (SGD, SGDW, AdamW: claims 3 and 3b), the other seeds
   (claim 2's accuracy comparison). Verdicts by ``experiments.reproduce``'s own
   criteria. Needs ``--data_dir`` (the extracted CIFAR-10 JPEG copy, read with
   pillow); ``--size=tiny`` uses the reproduction's smoke size on random images.
f. *The LM*: the launcher's byte-level language model (``--task=lm``,
   ``experiments.tasks.lm``: 6 blocks of width 512, 8 heads, QK-norm and
   post-norms, sequences of 256 bytes, batch 64, float32), the trainer's step
   (``experiments.steps.make_task_train_step``) on random bytes: the training
   throughput (tokens/s, ``batch * seq_len`` per step) of its base optimizers
   (``--method=none``: SGD with momentum 0.9, Adam, Muon), and the step-time
   ratio of every launcher method against its base, as in part a: each on the
   optimizer it is defined for (SGD, or Adam for ``hyperball``) and on Muon
   (against ``none:muon``) wherever ``Config.validate`` takes it; the
   combinations it refuses are listed with its reason under ``skipped``.
g. *The LM reproduction's larger size* (``experiments.reproduce_lm``, size
   ``large``: its four claims, ``reproduce_lm.planned_steps`` train steps),
   run only if its estimate fits the time left: part f's Adam step (or, without
   it, a probe of the reproduction's own model), scaled by the models' FLOPs
   where the reproduction's is the larger, times the planned steps (x1.2 for the
   evaluations and logs), plus three of part f's first calls (train, eval and
   metrics steps) per run. Its report (``RESULTS.md``, ``results.json``,
   figures) goes to ``DIR/reproduce_lm``, its runs to ``--workdir``'s
   ``reproduce_lm/SIZE``; the verdicts go to ``results.json`` and the table.
   It takes far more than the default budget: give it a second call
   (``--parts=g --budget_s=...``).

Parts a-d and f run on random uint8 images and tokens (part g reads the Python
standard library's sources, offline). TensorFlow is never imported.

Budget: every part first builds and times the cheapest thing it needs (a
probe: a model, its base step), estimates what the rest costs (compiles and
timed steps, from the probe) and runs only what fits in the time left, less a
reserve for the parts after it (what each needs at least, ``Size.least_s``); the
claims (e) and the LM reproduction (g) get whatever is left. The parts run in the
order a (with d), b, c, f, e, g. Whatever is skipped is listed, with the estimate
and the time left, in ``results.json["skipped"]`` and in the table. The budget
counts from the start of the process (imports and JAX's start included).

``--size=tiny`` runs every part on small models (the CNN at width 4, a
2-block transformer of width 16, a grid of 2 runs, a 1-block LM of width 16 on
sequences of 16 bytes, batch 4, and the LM reproduction's ``tiny`` size; every
method on the unscanned transformer, a few elsewhere), with XLA's optimizations
mostly off (``jax_disable_most_optimizations``, to compile faster): a test of
the command, not a measurement.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Optional, Sequence

_START = time.perf_counter()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import logging  # pylint: disable=g-import-not-at-top,wrong-import-position

from benchmarks import step_overhead  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import timing  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import transformer as tf_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import cache as cache_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import data as data_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import methods as methods_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import network  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import reproduce  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import reproduce_lm  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import sweep  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import tasks as tasks_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import text  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import trainer  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments.config import Config  # pylint: disable=g-import-not-at-top,wrong-import-position

# Every launcher method but the base itself, on the optimizer it is defined for (its entry's
# Method.optimizer: hyperball, AdamH, needs Adam).
METHODS = tuple(m.name if m.optimizer in (None, "sgd") else f"{m.name}:{m.optimizer}"
                for m in methods_lib.REGISTRY.values() if m.name != "none")
# (f) The LM's candidates: METHODS, and every method on Muon; Config.validate keeps those it
# takes (the methods with Method.muon) and refuses the rest, with its reason.
LM_METHODS = METHODS + tuple(f"{m}:muon" for m in methods_lib.REGISTRY if m != "none")
LM_BASES = ("none", "none:adam", "none:muon")
# (f) Peak learning rate of each base optimizer on the LM (experiments.reproduce_lm's).
LM_LR = {"sgd": 0.1, "adam": 3e-3, "muon": 0.02}
# (g) The planned steps are multiplied by this for the evaluations and the logged steps (the
# held-angle runs log every step); fixed seconds for reading the corpus, the figures, the report.
LM_STEP_OVERHEAD = 1.2
LM_FIXED_S = 15.0
TARGET_RATIO = {"gpu": 1.02, "tpu": 1.02, "cpu": 1.05}
# Estimates are multiplied by this before they are compared with the time left.
SAFETY = 1.2


@dataclasses.dataclass(frozen=True)
class Size:
  """What each part measures at one ``--size``."""
  image_model: str  # (a), the image model of the step-time ratios
  image_width: int
  batch: int  # (a) and (c)
  rounds: int  # interleaved rounds of (a) and (c)
  warmup: int
  methods: dict  # (a): table -> its methods (None: every one of METHODS)
  transformer: dict  # benchmarks.transformer.Transformer's arguments, and batch
  sweep: dict  # (b): width, batch, runs, rounds
  throughput: tuple  # (c): (model, width)
  claims: str  # (e): experiments.reproduce's size
  lm: dict  # (f): the LM (layers, width, heads, seq_len, batch) and its methods (None: all)
  lm_reproduction: str  # (g): experiments.reproduce_lm's size
  least_s: dict  # table or part -> the seconds it needs at least (kept for it by those before)
  fast_compile: bool = False  # jax_disable_most_optimizations: a check, not a measurement


TABLES = ("a_float32", "a_bfloat16", "a_unscanned", "a_scanned")
PARTS = ("a", "b", "c", "d", "e", "f", "g")
SIZES = {
    "full": Size("resnet20", 16, 512, 20, 2, dict.fromkeys(TABLES),
                 dict(layers=12, width=768, heads=12, seq_len=256, batch=16),
                 dict(width=16, batch=128, runs=(8, 32), rounds=5),
                 (("cnn", 64), ("resnet20", 16)), "full",
                 dict(layers=6, width=512, heads=8, seq_len=256, batch=64, methods=None),
                 "large",
                 dict(a_float32=60, a_bfloat16=50, a_unscanned=90, a_scanned=70, b=50, c=15,
                      f=60)),
    # Subsets of the methods where a table's compiles are slow on a CPU; the unscanned
    # transformer (joint groups, many leaves) takes every method.
    "tiny": Size("cnn", 4, 8, 2, 1, dict(a_float32=("spherical",), a_bfloat16=("l2",),
                                         a_unscanned=None, a_scanned=("adamp",)),
                 dict(layers=2, width=16, heads=2, seq_len=8, batch=2),
                 dict(width=4, batch=8, runs=(2,), rounds=2),
                 (("cnn", 8), ("cnn", 4)), "smoke",
                 # hyperball:muon: a combination Config.validate refuses (listed, not run).
                 dict(layers=1, width=16, heads=2, seq_len=16, batch=4,
                      methods=("l2", "decoupled:muon", "hyperball:adam", "hyperball:muon")),
                 "tiny",
                 dict(a_float32=10, a_bfloat16=5, a_unscanned=15, a_scanned=10, b=10, c=5,
                      f=10, g=120),
                 fast_compile=True),
}


# ------------------------------------------------------------------------ budget


class Budget:
  """Seconds left until the budget, counted from the process start; the skipped work."""

  def __init__(self, seconds: float):
    self.end = _START + seconds
    self.skipped: list[dict] = []

  def left(self) -> float:
    return self.end - time.perf_counter()

  def fits(self, estimate_s: float, reserve_s: float = 0.0) -> bool:
    return SAFETY * estimate_s <= self.left() - reserve_s

  def skip(self, part: str, what: str, why: str) -> None:
    logging.warning("skipped %s: %s (%s)", part, what, why)
    self.skipped.append({"part": part, "what": what, "why": why})

  def reason(self, estimate_s: float, reserve_s: float = 0.0) -> str:
    return (f"estimated {SAFETY * estimate_s:.0f} s (x{SAFETY} safety), {self.left():.0f} s "
            f"left" + (f", {reserve_s:.0f} s of them kept for the parts after" if reserve_s
                       else ""))


def how_many_fit(budget: Budget, each_s: float, n: int, fixed_s: float = 0.0,
                 reserve_s: float = 0.0) -> int:
  """The largest ``k <= n`` with ``fixed_s + k * each_s`` within the budget."""
  room = (budget.left() - reserve_s) / SAFETY - fixed_s
  return max(0, min(n, int(room // each_s))) if each_s > 0 else n


def base_of(method: str) -> str:
  """``none`` on the method's optimizer: ``l2`` -> ``none``, ``hyperball:adam`` ->
  ``none:adam``, ``l2:muon`` -> ``none:muon``."""
  optimizer = method.partition(":")[2]
  return f"none:{optimizer}" if optimizer not in ("", "sgd") else "none"


def first_call(t: timing.Timed, warmup: int) -> float:
  """Seconds of the first call (compile and run), then ``warmup - 1`` more untimed calls."""
  t0 = time.perf_counter()
  t.run()
  seconds = time.perf_counter() - t0
  if warmup > 1:
    timing.warm_up([t], warmup - 1)
  return seconds


def ratio_table(part: str, title: str, make, methods: Sequence[str], size: Size,
                budget: Budget, reserve_s: float, bases: Sequence[str] = ()
                ) -> tuple[dict, dict]:
  """Builds the base step (the probe), as many methods as fit, then times them all in
  interleaved rounds. ``make(method) -> Timed``. The other bases (``bases``, and each
  method's) are built first. Returns the table and the timed steps."""
  base = make("none")
  compile_s = first_call(base, size.warmup)
  timing.interleave([base], 1)
  each = compile_s + (size.warmup + size.rounds) * base.median
  timed = {"none": base}
  first_s = {"none": compile_s}
  wanted = list(methods)
  wanted = [b for b in dict.fromkeys([*bases, *map(base_of, wanted)])
            if b != "none" and b not in wanted] + wanted
  k = how_many_fit(budget, each, len(wanted), size.rounds * base.median, reserve_s)
  for method in wanted[:k]:
    timed[method] = make(method)
    first_s[method] = first_call(timed[method], size.warmup)
  if wanted[k:]:
    budget.skip(part, f"{title}: {', '.join(wanted[k:])}",
                budget.reason(each * (len(wanted) - k), reserve_s))
  everything = list(timed.values())
  base.times.clear()  # the probe's step: only the interleaved rounds count
  timing.interleave(everything, size.rounds)
  target = TARGET_RATIO.get(jax.default_backend(), 1.05)
  rows = []
  for method, t in timed.items():
    if method.startswith("none"):
      continue
    b = timed.get(base_of(method))
    if b is None:
      continue
    ratio = t.median / b.median
    rows.append({"method": method, "base": base_of(method), "median_ms": 1e3 * t.median,
                 "iqr_ms": 1e3 * t.iqr, "base_median_ms": 1e3 * b.median,
                 "base_iqr_ms": 1e3 * b.iqr, "ratio": ratio, "target": target,
                 "ok": ratio <= target})
  return {"table": part, "title": title, "rounds": size.rounds, "rows": rows,
          "base_ms": {m: 1e3 * t.median for m, t in timed.items() if m.startswith("none")},
          "base_first_call_s": compile_s, "first_call_s": first_s}, timed


# ---------------------------------------------------------------- (a) image models


def image_maker(model: str, width: int, batch: int, dtype: str):
  """``make(method) -> Timed``: the trainer's step of one model, its groups found once."""
  ds = step_overhead.random_dataset(max(batch, 64))
  data = step_overhead.device_data(ds)
  images, _, mean, std = data
  shared = trainer.init_model(step_overhead.base_config(model, width, batch, "none", dtype),
                              ds.num_classes, images, mean, std)

  def make(method):
    config = step_overhead.base_config(model, width, batch, method, dtype)
    return step_overhead.single_run(config, ds, data, model=shared)

  return make


def part_image_ratios(size: Size, budget: Budget, dtype: str, reserve: float
                      ) -> tuple[dict, dict]:
  part = f"a_{dtype}"
  title = f"{size.image_model} width {size.image_width}, batch {size.batch}, {dtype}"
  make = image_maker(size.image_model, size.image_width, size.batch, dtype)
  return ratio_table(part, title, make, size.methods[part] or METHODS, size, budget, reserve)


# ---------------------------------------------------------------- (a), (d) transformer


def transformer_config(method: str) -> Config:
  """The optimizer settings of a transformer run: SGD (momentum 0.9, lr 0.01) or Adam
  (lr 1e-3), ``lam`` at its default."""
  method, _, optimizer = method.partition(":")
  return Config(method=method, optimizer=optimizer or "sgd", momentum=0.9,
                lr=1e-3 if optimizer else 1e-2).validate()


def build_transformer(spec: dict, scan: bool) -> dict:
  """The transformer, its tokens and groups, and part d's figures (``["detection"]``)."""
  built = tf_lib.detected(scan=scan, **spec)
  times = []
  for _ in range(3):
    t0 = time.perf_counter()
    jax.block_until_ready(built["grad"](built["params"]))
    times.append(time.perf_counter() - t0)
  built["detection"] = {
      "model": f"transformer {'scanned' if scan else 'unscanned'}, "
               f"{spec['layers']} x {spec['width']}",
      "params": built["params_count"], "leaves": built["leaves"], "grouped": built["grouped"],
      "detection_s": built["detection_s"], "fwd_bwd_first_s": built["fwd_bwd_first_s"],
      "fwd_bwd_step_ms": 1e3 * timing.median(times),
      "ratio_to_first_fwd_bwd": built["detection_s"] / built["fwd_bwd_first_s"]}
  return built


def transformer_maker(built: dict):
  donate = () if jax.default_backend() == "cpu" else 0

  def make(method):
    config = transformer_config(method)
    tx = trainer.make_optimizer(config, built["groups"], trainer.make_schedule(config, 10_000))
    params = built["params"]
    # Copies: a donated state must not share a buffer with another step's, or with itself.
    state = jax.tree.map(jnp.copy, (params, tx.init(params)))
    step = jax.jit(tf_lib.make_lm_step(built["graphdef"], tx), donate_argnums=donate)
    return timing.Timed(method, step, state, (built["tokens"],))

  return make


def part_transformer(size: Size, budget: Budget, scan: bool, reserve: float,
                     ratios: bool = True) -> tuple[Optional[dict], dict]:
  """Part d on the transformer, and part a's table on it if ``ratios``."""
  part = "a_scanned" if scan else "a_unscanned"
  built = build_transformer(size.transformer, scan)
  if not ratios:
    return None, built["detection"]
  spec = size.transformer
  title = (f"transformer {'scanned' if scan else 'unscanned'}, {spec['layers']} x "
           f"{spec['width']}, {built['detection']['params'] / 1e6:.1f}M params, "
           f"batch {spec['batch']} x {spec['seq_len']} tokens, float32")
  table, _ = ratio_table(part, title, transformer_maker(built), size.methods[part] or METHODS,
                         size, budget, reserve)
  return table, built["detection"]


# ---------------------------------------------------------------- (b), (c)


def part_sweep(size: Size, budget: Budget, reserve: float) -> list[dict]:
  spec = size.sweep
  out = []
  for runs in spec["runs"]:
    t0 = time.perf_counter()
    if out and not budget.fits(out[-1]["seconds"] * runs / out[-1]["runs"], reserve):
      budget.skip("b_sweep", f"{runs} runs", budget.reason(
          out[-1]["seconds"] * runs / out[-1]["runs"], reserve))
      continue
    rows = step_overhead.grid_measure("cnn", spec["width"], spec["batch"], runs,
                                      spec["rounds"], size.warmup,
                                      hows=("vmap", "sequential", "separate"))
    separate = rows[-1]["seconds"]
    out.append({"runs": runs, "width": spec["width"], "batch": spec["batch"],
                "seconds": time.perf_counter() - t0,
                "rows": [{"how": r["how"], "label": r["label"],
                          "ms_per_grid_step": 1e3 * r["seconds"],
                          "ms_per_run_step": 1e3 * r["seconds"] / runs,
                          "speedup_vs_separate": separate / r["seconds"]} for r in rows]})
  return out


def part_throughput(size: Size, budget: Budget, reserve: float, reuse: dict,
                    first_s: float) -> list[dict]:
  """Images/s of each model's base step; ``reuse`` maps ``(model, width)`` to an already
  timed base step at the same batch (part a's), whose first call took ``first_s``."""
  rows = []
  for model, width in size.throughput:
    t = reuse.get((model, width))
    if t is None:
      estimate = first_s + (size.warmup + size.rounds) * max(
          [r["median_ms"] / 1e3 for r in rows] or [0.0])
      if not budget.fits(estimate, reserve):
        budget.skip("c_throughput", f"{model} width {width}", budget.reason(estimate, reserve))
        continue
      t = image_maker(model, width, size.batch, "float32")("none")
      first = first_call(t, size.warmup)
      timing.interleave([t], size.rounds)
    else:
      first = None
    rows.append({"model": model, "width": width, "batch": size.batch, "rounds": len(t.times),
                 "median_ms": 1e3 * t.median, "iqr_ms": 1e3 * t.iqr,
                 "images_per_s": size.batch / t.median, "first_s": first or 0.0,
                 "from": "part a" if first is None else "measured here"})
  return rows


# ---------------------------------------------------------------- (e) claims 2 and 3


def claim_units(runner: reproduce.Runner) -> list[tuple[str, list[tuple[str, Config]]]]:
  """The claims' runs in the order they are trained: ``[(what, [(run name, config)])]``."""
  l2 = [reproduce.l2_recipe_runs(runner, lr, runner.lam(lam))
        for lr, lam in reproduce.L2_RECIPES]
  families = reproduce.effective_lr_recipes(runner)
  return [
      ("seed 0 of the five SGD+L2 recipes", [runs[0] for runs in l2]),
      ("SGD, SGDW and AdamW recipes (claims 3, 3b)",
       [(name, config) for recipes in families.values() for _, name, config in recipes]),
      ("the other seeds of the SGD+L2 recipes (claim 2's accuracy)",
       [run for runs in l2 for run in runs[1:]]),
  ]


def train_unit(runner: reproduce.Runner, runs: list[tuple[str, Config]], scratch: str) -> None:
  """Trains ``runs`` through the vmapped sweep and files each as ``runner`` caches it."""
  configs = [c for _, c in runs]
  start = time.perf_counter()
  states = sweep.train_grid(configs, scratch, dataset=runner.dataset, strategy="vmap",
                            progress=False)
  seconds = (time.perf_counter() - start) / len(runs)
  for (name, _), folder, state in zip(runs, sweep.run_names(configs), states):
    target = os.path.join(runner.workdir, name)
    shutil.rmtree(target, ignore_errors=True)
    shutil.move(os.path.join(scratch, folder), target)
    if state is not None:  # None: diverged (sweep wrote diverged.txt)
      cache_lib.save_params(target, state)
    with open(os.path.join(target, "timing.json"), "w") as f:
      json.dump({"train_seconds": seconds, "trained_by": "experiments.sweep (vmap)"}, f)


def probe_run_step(runner: reproduce.Runner, runs: list[tuple[str, Config]]
                   ) -> tuple[float, float]:
  """``(compile_s, seconds of one vmapped step of all runs)`` of the unit's program."""
  configs = [c for _, c in runs]
  ds = runner.dataset
  program = sweep.make_program(configs, [ds] * len(configs))
  state = sweep.stack([sweep.init_state(program, c, ds) for c in configs])
  train, stats = step_overhead.program_data(ds)
  idx = jnp.tile(jnp.arange(configs[0].batch_size, dtype=jnp.int32), (len(configs), 1))
  keys = jnp.stack([jax.random.fold_in(jax.random.key(c.seed), 1) for c in configs])
  t = timing.Timed("probe", program.jitted("train_step", False), state,
                   (train, idx, keys, stats))
  compile_s = first_call(t, 1)
  timing.interleave([t], 3)
  return compile_s, t.median


def part_claims(size: Size, budget: Budget, data_dir: Optional[str], workdir: str,
                reserve: float = 0.0) -> dict:
  rsize = size.claims
  s = reproduce.SIZES[rsize]
  if data_dir:
    dataset = data_lib.load("folder", data_dir=data_dir, train_size=s["train_size"],
                            test_size=s["test_size"], seed=0)
  elif rsize == "smoke":
    dataset = reproduce._random_dataset(s["train_size"], s["test_size"])  # pylint: disable=protected-access
  else:
    budget.skip("e_claims", "claims 2 and 3", "no --data_dir: the claims need the CIFAR-10 "
                "images (the extracted JPEG copy)")
    return {}
  runner = reproduce.Runner(rsize, workdir, dataset, data_dir)
  reproduce.check_recipes(runner)
  units = claim_units(runner)
  compile_s, grid_s = probe_run_step(runner, units[0][1])
  per_run_step = grid_s / len(units[0][1])
  steps = runner.total_steps
  done = []
  out = {"size": rsize, "data": dataset.name, "train_images": int(dataset.train_images.shape[0]),
         "steps_per_run": steps, "probe": {"compile_s": compile_s,
                                           "ms_per_run_step": 1e3 * per_run_step,
                                           "runs": len(units[0][1])}, "units": []}
  scratch = tempfile.mkdtemp(prefix="sweep-", dir=workdir)
  for what, runs in units:
    if not runs:
      continue
    programs = len({sweep.program_key(c) for _, c in runs})
    # Every program compiles a train, an eval and a metrics step (~3 probe compiles); the
    # eval of the test set and the logging add about 15% to the steps.
    estimate = programs * 3 * compile_s + 1.15 * steps * per_run_step * max(
        len(runs), 0.5 * len(units[0][1]) * programs)
    if not budget.fits(estimate, reserve):
      budget.skip("e_claims", what, budget.reason(estimate, reserve))
      continue
    t0 = time.perf_counter()
    train_unit(runner, runs, scratch)
    out["units"].append({"what": what, "runs": len(runs), "estimated_s": estimate,
                         "seconds": time.perf_counter() - t0})
    done.append(what)
  shutil.rmtree(scratch, ignore_errors=True)
  out["verdicts"] = claim_verdicts(runner, units, done)
  return out


def claim_verdicts(runner: reproduce.Runner, units, done: list[str]) -> dict:
  """Claims 2, 3 and 3b from the trained units, by ``experiments.reproduce``'s criteria
  (claim 2 over the seeds trained; claim 3 needs every family). A run too short or still
  settling is refused by ``experiments.reproduce``: no verdict, the refusal as the reason."""
  names = [what for what, _ in units]
  if names[0] not in done:
    return {}
  if names[2] not in done:
    runner.seeds = runner.seeds[:1]
  verdicts = {}
  try:
    l2 = reproduce.claim_no_regularization(runner)
    verdicts["2"] = reproduce.verdict_no_regularization(l2, len(runner.seeds))
    if names[1] in done:
      verdicts["3"], verdicts["3b"] = reproduce.verdicts_effective_lr(
          reproduce.claim_effective_lr(runner, l2))
  except reproduce.TooShortError as e:
    for claim in ("2", "3", "3b") if names[1] in done else ("2",):
      verdicts.setdefault(claim, (None, f"refused by experiments.reproduce: {e}"))
  return {k: {"holds": v[0], "why": v[1], "criterion": reproduce.CRITERIA[k],
              "seeds": len(runner.seeds)} for k, v in verdicts.items()}


# ---------------------------------------------------------------- (f), (g) the LM


def lm_config(spec: dict, method: str) -> Config:
  """The launcher's ``--task=lm`` run of ``spec`` (``Size.lm``'s keys) and ``method``
  (``METHOD[:OPTIMIZER]``, SGD by default): momentum 0.9, the optimizer's rate
  (:data:`LM_LR`), a constant schedule, float32; validated (``errors.InputError``)."""
  method, _, optimizer = method.partition(":")
  optimizer = optimizer or "sgd"
  return Config(task="lm", seq_len=spec["seq_len"], d_model=spec["width"],
                n_layers=spec["layers"], n_heads=spec["heads"], batch_size=spec["batch"],
                method=method, optimizer=optimizer, momentum=0.9,
                lr=LM_LR[optimizer]).validate()


def lm_flops(spec: dict) -> float:
  """Approximate FLOPs of one train step of the LM (forward and backward: 6 per parameter
  and token for the blocks' 12 d^2 and the byte embedding and head, 12 seq d per token and
  block for the attention), to scale a measured step from one LM to another."""
  d, layers, seq, batch = spec["width"], spec["layers"], spec["seq_len"], spec["batch"]
  vocab = 256
  return batch * seq * (6 * (12 * layers * d * d + 2 * vocab * d) + 12 * layers * seq * d)


def lm_maker(spec: dict):
  """``make(method) -> Timed``: the trainer's step of the LM on random bytes (its groups
  found once, on ``none``'s model, and shared), as ``image_maker``'s for the images."""
  task = tasks_lib.get("lm")
  n = max(spec["batch"], network.PROBE_SIZE)
  tokens = np.random.default_rng(0).integers(0, 256, (n, spec["seq_len"] + 1), dtype=np.uint8)
  data = text.TextData(tokens, tokens[:8], "random bytes", tokens.size, tokens[:8].size, 0, 0)
  shared = network.init_model(lm_config(spec, "none"), data, task)
  train, stats = jax.device_put((task.arrays(data)[0], task.stats(data)))
  idx = jnp.arange(spec["batch"], dtype=jnp.int32)
  donate = () if jax.default_backend() == "cpu" else 0

  def make(method):
    config = lm_config(spec, method)
    tx = trainer.make_optimizer(config, shared.groups, trainer.make_schedule(config, 10_000))
    step = jax.jit(trainer.make_task_train_step(shared.graphdef, tx, task, config, stats,
                                                key=jax.random.key(1)),
                   donate_argnums=donate)
    # Copies: a donated state must not share a buffer with another step's, or with itself
    # (an optimizer state that keeps the initial weights).
    params, rest, opt_state = jax.tree.map(
        jnp.copy, (shared.params, shared.rest, tx.init(shared.params)))
    state = trainer.TrainState(jnp.int32(0), params, rest, opt_state, jnp.int32(-1))
    return timing.Timed(method, step, state, (train, idx))

  make.params = int(sum(x.size for x in jax.tree.leaves(shared.params)))
  return make


def lm_candidates(size: Size, budget: Budget) -> list[str]:
  """Part f's methods that ``Config.validate`` takes; the others are listed as skipped."""
  kept = []
  for method in size.lm["methods"] or LM_METHODS:
    try:
      lm_config(size.lm, method)
    except ValueError as e:  # errors.InputError: its one line
      budget.skip("f_lm", method, f"Config.validate refuses it: {e}")
      continue
    kept.append(method)
  return kept


def part_lm(size: Size, budget: Budget, reserve: float) -> dict:
  """(f): the LM's base optimizers' tokens/s, and every method's step-time ratio."""
  spec = size.lm
  methods = lm_candidates(size, budget)
  make = lm_maker(spec)
  params = f"{make.params / 1e6:.1f}M" if make.params >= 1e5 else f"{make.params:,}"
  title = (f"LM {spec['layers']} x {spec['width']}, {spec['heads']} heads, {params} params, "
           f"batch {spec['batch']} x {spec['seq_len']} bytes, float32")
  table, timed = ratio_table("f_lm", title, make, methods, size, budget, reserve,
                             bases=LM_BASES)
  tokens = spec["batch"] * spec["seq_len"]
  throughput = [{"optimizer": (base.partition(":")[2] or "sgd"), "base": base,
                 "rounds": len(timed[base].times), "median_ms": 1e3 * timed[base].median,
                 "iqr_ms": 1e3 * timed[base].iqr, "tokens_per_step": tokens,
                 "tokens_per_s": tokens / timed[base].median,
                 "first_call_s": table["first_call_s"][base]}
                for base in LM_BASES if base in timed]
  model = {k: v for k, v in spec.items() if k != "methods"}
  return {"model": {**model, "params": make.params, "dtype": "float32"}, "title": title,
          "throughput": throughput, "ratios": table}


def lm_reproduction_runs(size: str) -> int:
  """Runs of ``experiments.reproduce_lm`` at ``size`` (claim 4's first grids, as
  ``planned_steps`` counts them: three rates on seed 0, then the other seeds)."""
  s = reproduce_lm.SIZES[size]
  return (len(reproduce_lm.EQUILIBRIUM) + 3 * len(reproduce_lm.RESCALE)
          + len(reproduce_lm.HOLD)
          + len(s["methods"] or reproduce_lm.COMPARED) * (3 + s["seeds"] - 1))


def lm_reproduction_spec(size: str) -> dict:
  s = reproduce_lm.SIZES[size]
  return dict(layers=s["n_layers"], width=s["d_model"], heads=s["n_heads"],
              seq_len=s["seq_len"], batch=s["batch_size"])


def lm_reproduction_estimate(size: str, adam: dict) -> dict:
  """Seconds ``experiments.reproduce_lm.run(size)`` should take, from ``adam``: the
  median step (``median_ms``) and first call (``first_call_s``) of Adam's step on the LM
  ``adam["model"]``. Where the reproduction's model takes more FLOPs the step is scaled
  up by their ratio; where it takes fewer, the measured step stands (a bound: a small
  model's step is not faster in proportion). Each run compiles a train, an eval and a
  metrics step: three first calls (scaled by the blocks where the reproduction has more)."""
  spec = lm_reproduction_spec(size)
  steps, runs = reproduce_lm.planned_steps(size), lm_reproduction_runs(size)
  scale = max(1.0, lm_flops(spec) / lm_flops(adam["model"]))
  step_s = adam["median_ms"] / 1e3 * scale
  compile_s = 3 * adam["first_call_s"] * max(1.0, spec["layers"] / adam["model"]["layers"])
  seconds = LM_FIXED_S + LM_STEP_OVERHEAD * steps * step_s + runs * compile_s
  return {"planned_steps": steps, "runs": runs, "model": spec, "from": adam["from"],
          "flops_scale": scale, "step_ms": 1e3 * step_s, "compile_s_per_run": compile_s,
          "estimated_s": seconds}


def adam_figures(size: str, lm: Optional[dict]) -> dict:
  """Part f's Adam step, or, without it, a probe of Adam's step on the reproduction's own
  model (its first call and 3 timed steps)."""
  for row in (lm or {}).get("throughput", []):
    if row["optimizer"] == "adam":
      return {"model": lm["model"], "median_ms": row["median_ms"],
              "first_call_s": row["first_call_s"], "from": "part f"}
  spec = lm_reproduction_spec(size)
  t = lm_maker(spec)("none:adam")
  first = first_call(t, 1)
  timing.interleave([t], 3)
  return {"model": spec, "median_ms": 1e3 * t.median, "first_call_s": first,
          "from": "a probe of its own model"}


def part_lm_reproduction(size: Size, budget: Budget, reserve: float, lm: Optional[dict],
                         workdir: str, out: str, keep_runs: bool = True) -> dict:
  """(g): ``experiments.reproduce_lm.run`` at the size's reproduction size, if its estimate
  fits; its verdicts and where its report went (its runs: ``keep_runs``, or removed with a
  temporary ``workdir``)."""
  rsize = size.lm_reproduction
  estimate = lm_reproduction_estimate(rsize, adam_figures(rsize, lm))
  result = {"size": rsize, "estimate": estimate}
  if not budget.fits(estimate["estimated_s"], reserve):
    budget.skip("g_reproduce_lm", f"the LM reproduction, size {rsize} "
                f"({estimate['planned_steps']} steps, {estimate['runs']} runs)",
                budget.reason(estimate["estimated_s"], reserve))
    return result
  runs = os.path.join(workdir, "reproduce_lm", rsize)
  report = os.path.join(out, "reproduce_lm")
  t0 = time.perf_counter()
  try:
    r = reproduce_lm.run(rsize, runs, report,
                         command=f"experiments.reproduce_lm.run({rsize!r}) (accelerator g)")
  except Exception as e:  # pylint: disable=broad-except  (recorded: the other parts stand)
    logging.exception("part g: experiments.reproduce_lm.run failed")
    result["error"] = f"{type(e).__name__}: {e}"
    r = {}
  result.update(seconds=time.perf_counter() - t0,
                runs_dir=runs if keep_runs else "removed (a temporary --workdir)")
  if r:
    result["report"] = os.path.join(report, "RESULTS.md")
    result["verdicts"] = {k: {**v, "criterion": reproduce_lm.CRITERIA[k]}
                          for k, v in r["verdicts"].items()}
  return result


# ---------------------------------------------------------------- report


def _f(x: float, digits: int = 2) -> str:
  return f"{x:.{digits}f}"


def markdown(results: dict) -> str:
  """The results as markdown tables, one section per part."""
  out = [f"# Accelerator benchmark ({results['size']})", "",
         f"`{results['command']}`", "",
         f"{results['machine']}; jax {results['versions']['jax']}; "
         f"{results['seconds']:.0f} s of a {results['budget_s']:.0f} s budget.", ""]
  parts = results["parts"]
  out += ["## a. Step-time ratio against the base optimizer (median of interleaved steps)", ""]
  rows = []
  for table in parts.get("a_step_overhead", []):
    for r in table["rows"]:
      rows.append([table["title"], r["method"], r["base"], _f(r["median_ms"]), _f(r["iqr_ms"]),
                   _f(r["base_median_ms"]), _f(r["ratio"], 3),
                   ("ok" if r["ok"] else "over") + f" (<= {r['target']})"])
  out += [timing.markdown_table(["model", "method", "base", "median ms", "IQR ms",
                                 "base ms", "ratio", "target"], rows), ""]
  out += ["## b. Sweep: one step of every run", ""]
  rows = [[g["runs"], r["label"], _f(r["ms_per_grid_step"], 1), _f(r["ms_per_run_step"], 2),
           _f(r["speedup_vs_separate"])] for g in parts.get("b_sweep", []) for r in g["rows"]]
  out += [timing.markdown_table(["runs", "how", "ms per grid step", "ms per run-step",
                                 "speed-up vs separate"], rows), ""]
  out += ["## c. Training throughput (base optimizer)", ""]
  rows = [[f"{r['model']} width {r['width']}", r["batch"], _f(r["median_ms"]),
           f"{r['images_per_s']:.0f}"] for r in parts.get("c_throughput", [])]
  out += [timing.markdown_table(["model", "batch", "median ms", "images/s"], rows), ""]
  out += ["## d. Detection (find_scale_invariant, first call)", ""]
  rows = [[d["model"], f"{d['params'] / 1e6:.1f}M", d["leaves"], d["grouped"],
           _f(d["detection_s"]), _f(d["fwd_bwd_first_s"]), _f(d["fwd_bwd_step_ms"]),
           _f(d["ratio_to_first_fwd_bwd"])] for d in parts.get("d_detection", [])]
  out += [timing.markdown_table(["model", "params", "leaves", "grouped", "detection s",
                                 "fwd-bwd first call s", "fwd-bwd step ms",
                                 "detection / first fwd-bwd"], rows), ""]
  claims = parts.get("e_claims", {})
  out += [f"## e. Reproduction claims 2 and 3 ({claims.get('size', '-')} size) through the "
          "vmapped sweep", ""]
  rows = [[k, {True: "holds", False: "fails", None: "no verdict"}[v["holds"]], v["why"],
           v["criterion"]] for k, v in claims.get("verdicts", {}).items()]
  out += [timing.markdown_table(["claim", "verdict", "why", "criterion"], rows), ""]
  lm = parts.get("f_lm", {})
  out += [f"## f. The byte-level LM: {lm.get('title', '-')}", "",
          "Training throughput (base optimizers, the trainer's step):", ""]
  rows = [[r["optimizer"], _f(r["median_ms"]), _f(r["iqr_ms"]), r["tokens_per_step"],
           f"{r['tokens_per_s']:.0f}", _f(r["first_call_s"], 1)]
          for r in lm.get("throughput", [])]
  out += [timing.markdown_table(["base optimizer", "median ms", "IQR ms", "tokens per step",
                                 "tokens/s", "first call s"], rows), "",
          "Step-time ratio against the base optimizer (median of interleaved steps):", ""]
  rows = [[r["method"], r["base"], _f(r["median_ms"]), _f(r["iqr_ms"]),
           _f(r["base_median_ms"]), _f(r["ratio"], 3),
           ("ok" if r["ok"] else "over") + f" (<= {r['target']})"]
          for r in lm.get("ratios", {}).get("rows", [])]
  out += [timing.markdown_table(["method", "base", "median ms", "IQR ms", "base ms", "ratio",
                                 "target"], rows), ""]
  g = parts.get("g_reproduce_lm", {})
  est = g.get("estimate", {})
  out += [f"## g. The LM reproduction ({g.get('size', '-')} size)", ""]
  if est:
    out += [f"Estimated {est['estimated_s']:.0f} s: {est['planned_steps']} steps of "
            f"{est['step_ms']:.1f} ms (Adam, from {est['from']}, x{est['flops_scale']:.2f} "
            f"FLOPs, x{LM_STEP_OVERHEAD} for evaluations and logs) and {est['runs']} runs of "
            f"{est['compile_s_per_run']:.1f} s of compiles."
            + (f" Ran in {g['seconds']:.0f} s." if "seconds" in g else "")
            + (f" Report: `{g['report']}`." if "report" in g else ""), ""]
  if "error" in g:
    out += [f"Failed: {g['error']}", ""]
  rows = [[k, "holds" if v["holds"] else "does not hold", v["summary"], v["criterion"]]
          for k, v in g.get("verdicts", {}).items()]
  out += [timing.markdown_table(["claim", "verdict", "summary", "criterion"], rows), ""]
  out += ["## Skipped", ""]
  rows = [[s["part"], s["what"], s["why"]] for s in results["skipped"]]
  out += [timing.markdown_table(["part", "what", "why"], rows or [["-", "nothing", "-"]]), ""]
  return "\n".join(out)


# ---------------------------------------------------------------- main


def define_flags() -> None:
  """This command's flags: defined when it runs, not on import. ``experiments.plot``
  (imported by ``experiments.reproduce``) defines its own ``--out`` on import: replaced."""
  if "out" in flags.FLAGS:
    delattr(flags.FLAGS, "out")
  flags.DEFINE_string("out", None, "Folder for results.json and results.md.")
  flags.DEFINE_float("budget_s", 480, "Seconds the whole command may take (from its start).")
  flags.DEFINE_enum("size", "full", list(SIZES), "full: the accelerator's figures; tiny: "
                    "small models, a check of the command (about a minute on a CPU).")
  flags.DEFINE_string("data_dir", os.environ.get("NORMREG_CIFAR10_DIR"),
                      "The extracted CIFAR-10 JPEG copy, for part e (default "
                      "$NORMREG_CIFAR10_DIR).")
  flags.DEFINE_string("workdir", None, "Folder for part e's and part g's runs (default: a "
                      "temporary one, removed at the end).")
  flags.DEFINE_list("parts", list(PARTS), "Parts to run (a: step-time ratios, b: sweep, c: "
                    "throughput, d: detection, e: claims 2 and 3, f: the LM, g: the LM "
                    "reproduction), e.g. --parts=e for a second call with the device time "
                    "left.")
  flags.mark_flag_as_required("out")


FLAGS = flags.FLAGS


def run(size_key: str, budget_s: float, out: str, data_dir: Optional[str] = None,
        workdir: Optional[str] = None, command: str = "",
        selected: Sequence[str] = PARTS) -> dict:
  """Runs every part of ``selected`` that fits ``budget_s``; writes ``out/results.json`` and
  ``out/results.md``."""
  size = SIZES[size_key]
  budget = Budget(budget_s)
  os.makedirs(out, exist_ok=True)
  own_workdir = workdir is None
  workdir = workdir or tempfile.mkdtemp(prefix="normreg-accelerator-")
  if size.fast_compile:
    jax.config.update("jax_disable_most_optimizations", True)
  if not jax.config.jax_compilation_cache_dir:
    # JAX's persistent cache: the claims' sweep then loads the program its probe compiled.
    jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
  parts: dict[str, Any] = {"a_step_overhead": [], "b_sweep": [], "c_throughput": [],
                           "d_detection": [], "e_claims": {}, "f_lm": {},
                           "g_reproduce_lm": {}}
  tables = parts["a_step_overhead"]
  reuse, first_s = {}, 0.0

  def image(dtype, reserve):
    nonlocal reuse, first_s
    table, timed = part_image_ratios(size, budget, dtype, reserve)
    tables.append(table)
    if dtype == "float32":
      reuse = {(size.image_model, size.image_width): timed["none"]}
      first_s = table["base_first_call_s"]

  def transformer(scan, reserve):
    table, detection = part_transformer(size, budget, scan, reserve, ratios="a" in selected)
    if table:
      tables.append(table)
    parts["d_detection"].append(detection)

  steps = [  # (name, needed by, what, run(reserve))
      ("a_float32", "a", "a: image model, float32", lambda r: image("float32", r)),
      ("a_bfloat16", "a", "a: image model, bfloat16", lambda r: image("bfloat16", r)),
      ("a_unscanned", "ad", "a, d: transformer, unscanned", lambda r: transformer(False, r)),
      ("a_scanned", "ad", "a, d: transformer, scanned", lambda r: transformer(True, r)),
      ("b", "b", "b: sweep", lambda r: parts.update(b_sweep=part_sweep(size, budget, r))),
      ("c", "c", "c: throughput", lambda r: parts.update(
          c_throughput=part_throughput(size, budget, r, reuse, first_s))),
      ("f", "f", "f: the LM", lambda r: parts.update(f_lm=part_lm(size, budget, r))),
      ("e", "e", "e: claims 2 and 3", lambda r: parts.update(
          e_claims=part_claims(size, budget, data_dir, workdir, r))),
      ("g", "g", "g: the LM reproduction", lambda r: parts.update(
          g_reproduce_lm=part_lm_reproduction(size, budget, r, parts["f_lm"], workdir, out,
                                              keep_runs=not own_workdir))),
  ]
  steps = [st for st in steps if set(st[1]) & set(selected)]
  for i, (name, _, what, fn) in enumerate(steps):
    # Kept for the parts after: what each needs at least.
    reserve = sum(size.least_s.get(later[0], 0.0) for later in steps[i + 1:])
    if budget.left() <= reserve:
      budget.skip(name, "the whole part", f"{budget.left():.0f} s left, {reserve:.0f} s of "
                  "them kept for the parts after")
      continue
    t0 = time.perf_counter()
    print(f"[{t0 - _START:6.0f} s] {what} ...", flush=True)
    fn(reserve)
    print(f"[{time.perf_counter() - _START:6.0f} s] {what}: done in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
  if own_workdir:
    shutil.rmtree(workdir, ignore_errors=True)
  results = {"size": size_key, "command": command, "budget_s": budget_s,
             "parts_selected": list(selected),
             **cache_lib.environment(), "load_average": os.getloadavg(),
             "parts": parts, "skipped": budget.skipped,
             "seconds": time.perf_counter() - _START,
             "tensorflow_imported": "tensorflow" in sys.modules}
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(markdown(results))
  return results


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.budget_s > 0:
    raise app.UsageError(f"--budget_s must be > 0, got {FLAGS.budget_s}")
  unknown = set(FLAGS.parts) - set(PARTS)
  if unknown or not FLAGS.parts:
    raise app.UsageError(f"--parts: {sorted(unknown) or 'none'} not among {', '.join(PARTS)}")
  if FLAGS.data_dir and not os.path.isdir(FLAGS.data_dir):
    raise app.UsageError(f"--data_dir={FLAGS.data_dir} is not a folder")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  command = "python -m benchmarks.accelerator " + " ".join(
      a if not a.startswith("--data_dir") else "--data_dir=DIR" for a in sys.argv[1:])
  print(f"jax {jax.__version__}, {jax.default_backend()}, {jax.devices()}", flush=True)
  results = run(FLAGS.size, FLAGS.budget_s, FLAGS.out, FLAGS.data_dir, FLAGS.workdir,
                command.strip(), FLAGS.parts)
  print(markdown(results))


if __name__ == "__main__":
  define_flags()
  app.run(main)

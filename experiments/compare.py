"""The angular-update optimizers against the paper's recipes, on the same data.

``python -m experiments.compare --size=cpu --data_dir=DIR [--report_dir=DIR]`` trains
every method of :data:`METHODS` on the paper's BatchNorm CNN and on ResNet-20, on the
CIFAR-10 copy, through the launcher (``trainer.train_and_evaluate``, runs cached by
``experiments.cache``), and writes ``COMPARISON.md`` with figures:

- each method's learning rate is tuned over the same relative grid, its base rate
  times :data:`LR_GRID` (one seed), then the best rate is trained with two more seeds;
- the table gives the best test accuracy (mean over 3 seeds, with its standard
  error), the measured angle per step against the angle the method targets or
  reaches at equilibrium (``normreg.theory``; the middle half of training, mean over
  layers), and the step time relative to the base optimizer (``--method=none``);
- AdamP's cosine heuristic is compared with the exact groups along an SGDP run;
- decoupled weight decay with and without Defazio's correction: the gradient norm
  at the end of the cosine schedule.

Every run uses a cosine schedule (the common budget, and what the correction is for).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from absl import logging
from flax import nnx
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import normreg
from normreg import theory
from experiments import cache as cache_lib
from experiments import data as data_lib
from experiments import errors
from experiments import plot as plot_lib
from experiments import trainer
from experiments.config import Config

SIZES = {
    # images, batch, seeds at the best rate, the lr grid, and (model, width, epochs).
    # The smoke size checks the plumbing only: one rate, not tuned (no interior best).
    "smoke": dict(train_size=256, test_size=128, batch_size=32, seeds=2, grid=(1.0,),
                  models=(("cnn", 4, 2),)),
    "cpu": dict(train_size=10000, test_size=2000, batch_size=64, seeds=3,
                grid=(1 / 3, 1.0, 3.0), models=(("cnn", 8, 4), ("resnet20", 8, 2))),
    "full": dict(train_size=None, test_size=None, batch_size=128, seeds=3,
                 grid=(1 / 3, 1.0, 3.0), models=(("cnn", 64, 30), ("resnet20", 16, 30))),
}
LR_GRID = SIZES["cpu"]["grid"]
MAX_EXTENSIONS = 4  # x3 steps past an edge of the grid before the comparison gives up
MOMENTUM = 0.9
L2 = 5e-4
WD = 1e-2  # SGDW's decay: lr * wd = 1e-3 a step at lr 0.1, as L2's 2 * lam * lr / (1 - mu)

# name -> (launcher settings, base learning rate, target angle(lr_t, lr_max) or None)
METHODS: dict[str, tuple[dict[str, Any], float, Optional[Callable[[float, float], float]]]] = {
    "none": (dict(method="none"), 0.1, None),
    "l2": (dict(method="l2", lam=L2), 0.1,
           lambda lr, peak: theory.equilibrium_angle_sgd(lr, 2 * L2, MOMENTUM)),
    "decoupled": (dict(method="decoupled", lam=WD), 0.1,
                  lambda lr, peak: theory.equilibrium_angle_sgdw(lr, WD, MOMENTUM)),
    "corrected": (dict(method="decoupled", lam=WD, corrected_decay=True), 0.1,
                  lambda lr, peak: theory.equilibrium_angle_sgdw(lr, WD * lr / peak, MOMENTUM)),
    "spherical": (dict(method="spherical", ungrouped_lr=0.1), 0.03, None),
    "rotational": (dict(method="rotational", lam=L2), 0.1,
                   lambda lr, peak: math.atan(theory.equilibrium_angle_sgd(
                       peak, 2 * L2, MOMENTUM) * lr / peak)),
    "sgdp": (dict(method="adamp", lam=L2), 0.1,
             lambda lr, peak: theory.equilibrium_angle_sgdp(lr, L2, MOMENTUM)),
    "nero": (dict(method="nero"), 0.01, lambda lr, peak: theory.angle_nero(lr)),
    "hyperball": (dict(method="hyperball", optimizer="adam"), 0.01,
                  lambda lr, peak: theory.angle_adamh(lr)),
}


# name -> the rate (1 / time constant, per step) at which its norm approaches equilibrium at
# learning rate lr_t (peak lr_max), for the methods that reach an equilibrium rather than set
# their angle. SGDP: SGDW's with its decay wd * wd_ratio / (1 - mu).
SETTLE = 4  # time constants before an equilibrium is measured (as experiments.reproduce)
RELAXATION: dict[str, Callable[[float, float], float]] = {
    "l2": lambda lr, peak: 1 / theory.time_constant_sgd(lr, 2 * L2, MOMENTUM),
    "decoupled": lambda lr, peak: 1 / theory.time_constant_sgdw(lr, WD),
    "corrected": lambda lr, peak: 1 / theory.time_constant_sgdw(lr, WD * lr / peak),
    "sgdp": lambda lr, peak: 1 / theory.time_constant_sgdw(lr, L2 * 0.1 / (1 - MOMENTUM)),
}


def method_config(cache: cache_lib.RunCache, model: tuple, name: str, factor: float,
                  seed: int) -> Config:
  """``(model, width, epochs)``'s run of method ``name`` at its base rate times ``factor``."""
  settings, lr, _ = METHODS[name]
  model, width, epochs = model
  return cache.config(model=model, width=width, epochs=epochs, seed=seed,
                      lr=float(f"{lr * factor:.5g}"), **settings)


def run_name(model: str, name: str, lr: float, seed: int) -> str:
  return f"{model}_{name}_lr{lr:g}_s{seed}"


def _window_records(run: plot_lib.Run) -> list[dict]:
  last = run.train[-1]["step"]
  return [r for r in run.train if 0.25 * last < r["step"] <= 0.75 * last]


def time_constants_before_window(run: plot_lib.Run, name: str) -> Optional[float]:
  """Time constants of ``name``'s approach to equilibrium elapsed before the measurement
  window (the sum over steps of ``1 / tau(lr_t)``, at the logged rates); ``None`` for the
  methods that set their angle from the first step (or have no equilibrium)."""
  if name not in RELAXATION or not run.train:
    return None
  start, peak = 0.25 * run.train[-1]["step"], run.config["lr"]
  total, prev = 0.0, 0
  for r in run.train:
    if r["step"] > start:
      break
    lr = r["learning_rate"]
    total += (RELAXATION[name](lr, peak) if lr > 0 else 0.0) * (r["step"] - prev)
    prev = r["step"]
  return total


def angle_ratio(run: plot_lib.Run, name: str) -> tuple[float, float, Optional[float]]:
  """Measured angle per step (mean over layers and the middle half of training), the
  target at each step's learning rate, and their mean ratio (None without a target).
  For an equilibrium method the ratio tests the theory only after :data:`SETTLE` time
  constants (:func:`time_constants_before_window`); before, it measures a transient."""
  target = METHODS[name][2]
  records = _window_records(run)
  measured = [np.mean([l["angle"] for l in r["layers"].values()]) for r in records]
  if target is None or cache_lib.diverged(run):
    return float(np.mean(measured)) if measured else float("nan"), float("nan"), None
  peak = run.config["lr"]
  # The launcher logs the grouped weights' rate; rotational's is its target angle.
  rate = lambda r: r["learning_rate"] * (peak / trainer.rotational_target(
      Config.from_dict(run.config))) if name == "rotational" else r["learning_rate"]
  targets = [target(rate(r), peak) for r in records]
  ratios = [m / t for m, t in zip(measured, targets)]
  return float(np.mean(measured)), float(np.mean(targets)), float(np.mean(ratios))


def images_per_sec(run: plot_lib.Run) -> float:
  """Median training throughput over the epochs after the first (which compiles)."""
  speeds = [r["images_per_sec"] for r in run.test[1:]] or [r["images_per_sec"]
                                                            for r in run.test]
  return float(np.median(speeds)) if speeds else float("nan")


class EdgeOfGridError(errors.InputError):
  """A method's best learning rate stays at the edge of its grid: its rank is not measured."""


def tune(cache: cache_lib.RunCache, model: tuple, name: str, grid,
         interior: bool) -> dict[float, float]:
  """``{lr: test accuracy}`` of seed 0 over the method's base rate times ``grid``.

  With ``interior``, the grid is extended by its own ratio (x3) past whichever edge holds
  the best rate, until the best is interior, that is, beaten on both sides: a best rate
  at an edge says only that the optimum lies beyond it, and ranks methods by how well
  their base rate was guessed. After :data:`MAX_EXTENSIONS` steps the comparison stops
  with :class:`EdgeOfGridError`, naming the method.
  """
  factors = sorted(grid)
  ratio = factors[1] / factors[0] if len(factors) > 1 else 3.0
  tuned: dict[float, float] = {}
  for factor in factors:
    config = method_config(cache, model, name, factor, 0)
    tuned[config.lr] = cache_lib.final_accuracy(
        cache.train(run_name(model[0], name, config.lr, 0), config))
  for _ in range(MAX_EXTENSIONS):
    lrs, best = sorted(tuned), max(tuned, key=tuned.get)
    if not interior or lrs[0] < best < lrs[-1]:
      return tuned
    factor = (best * ratio if best == lrs[-1] else best / ratio) / METHODS[name][1]
    config = method_config(cache, model, name, factor, 0)
    logging.info("compare: %s's best lr %g is at the edge of %s; trying %g", name, best,
                 lrs, config.lr)
    tuned[config.lr] = cache_lib.final_accuracy(
        cache.train(run_name(model[0], name, config.lr, 0), config))
  lrs, best = sorted(tuned), max(tuned, key=tuned.get)
  if interior and not lrs[0] < best < lrs[-1]:
    raise EdgeOfGridError(
        f"{model[0]}: {name}'s best learning rate {best:g} is still at the edge of "
        f"{[float(f'{x:g}') for x in lrs]} after {MAX_EXTENSIONS} extensions; its rank "
        "would not be measured (widen METHODS' base rate or the grid).")
  return tuned


def compare_method(cache: cache_lib.RunCache, model: tuple, name: str,
                   grid, interior: bool = True) -> dict[str, Any]:
  """The lr grid (seed 0, extended until the best is interior), then the best rate with
  the other seeds."""
  tuned = tune(cache, model, name, grid, interior)
  best_lr = max(tuned, key=tuned.get)
  factor = best_lr / METHODS[name][1]
  runs = []
  for seed in cache.seeds:
    config = method_config(cache, model, name, factor, seed)
    runs.append(cache.train(run_name(model[0], name, config.lr, seed), config))
  accs = [cache_lib.final_accuracy(r) for r in runs]
  measured, target, ratio = angle_ratio(runs[0], name)
  settled = time_constants_before_window(runs[0], name)
  return {"grid": {str(k): v for k, v in sorted(tuned.items())}, "best_lr": best_lr,
          "acc": float(np.mean(accs)),
          "acc_se": float(np.std(accs, ddof=1) / math.sqrt(len(accs))) if len(accs) > 1
          else float("nan"),
          "accs": accs, "diverged": sum(map(cache_lib.diverged, runs)),
          "angle": measured, "target": target, "angle_ratio": ratio,
          "time_constants": settled,
          "images_per_sec": float(np.median([images_per_sec(r) for r in runs])),
          "workdir": runs[0].workdir}


class _HeuristicProbe:
  """``on_step``: at every logged step, AdamP's cosine test on the gradient of a fixed
  training batch against the exact groups, per leaf with two or more axes."""

  def __init__(self, cache: cache_lib.RunCache, config: Config, workdir: str):
    model = trainer.init_model(config, cache.dataset.num_classes, cache.dataset.train_images,
                               *data_lib.channel_stats(cache.dataset.train_images))
    self.exact = normreg.groups.groups_by_path(model.groups, "compare")
    mean, std = data_lib.channel_stats(cache.dataset.train_images)
    x = data_lib.normalize(jnp.asarray(cache.dataset.train_images[:128]), mean, std)
    y = jnp.asarray(cache.dataset.train_labels[:128])
    graphdef = model.graphdef

    def loss(params, rest):
      logits = nnx.merge(graphdef, params, rest, copy=True)(x)
      return trainer.cross_entropy(logits, y)

    self.grad = jax.jit(jax.grad(loss))
    self.every = config.log_every
    self.path = os.path.join(workdir, "heuristic.json")
    self.counts: dict[str, list[int]] = {}

  def __call__(self, step: int, state: trainer.TrainState) -> None:
    if step == 0 or step % self.every:
      return
    params = jax.device_get(state.params)
    found = normreg.groups.groups_by_path(
        normreg.cosine_groups(jax.device_get(self.grad(state.params, state.rest)), params),
        "compare")
    leaves = dict(zip(normreg.param_paths(params), jax.tree.leaves(params)))
    for path, group in found.items():
      if np.ndim(leaves[path]) < 2:
        continue
      agree = (group is None) == (self.exact[path] is None) and (
          group is None or group.kind == self.exact[path].kind)
      self.counts.setdefault(path, [0, 0])
      self.counts[path][0] += int(not agree)
      self.counts[path][1] += 1

  def save(self) -> None:
    with open(self.path, "w") as f:
      json.dump({"counts": self.counts,
                 "exact": {p: (str(g) if g else None) for p, g in self.exact.items()}}, f)


def heuristic_disagreement(cache: cache_lib.RunCache, model: tuple) -> dict[str, Any]:
  config = method_config(cache, model, "sgdp", 1.0, 0)
  run = cache.train(f"{model[0]}_heuristic_probe", config, extra_files=["heuristic.json"],
                    on_step=lambda path: _HeuristicProbe(cache, config, path))
  with open(os.path.join(run.workdir, "heuristic.json")) as f:
    data = json.load(f)
  counts = data["counts"]
  wrong = sum(c[0] for c in counts.values())
  total = sum(c[1] for c in counts.values())
  return {"disagree": wrong / max(total, 1), "decisions": total,
          "per_leaf": {p: c[0] / c[1] for p, c in counts.items() if c[1]},
          "exact": data["exact"]}


# --------------------------------------------------------------------------- run


def run(size: str, workdir: str, out: str, data_dir: Optional[str],
        command: Optional[str] = None) -> dict[str, Any]:
  if size not in SIZES:
    raise errors.InputError(f"--size={size!r} is not one of {', '.join(SIZES)}.")
  s = SIZES[size]
  if not data_dir:
    raise errors.InputError("--data_dir (or NORMREG_CIFAR10_DIR) is needed: the CIFAR-10 "
                            "copy, extracted.")
  dataset = data_lib.load("folder", data_dir=data_dir, train_size=s["train_size"],
                          test_size=s["test_size"], seed=0)
  steps_per_epoch = dataset.train_images.shape[0] // s["batch_size"]
  base = Config(dataset="folder", data_dir=data_dir, norm="batch",
                batch_size=s["batch_size"], train_size=s["train_size"],
                test_size=s["test_size"], momentum=MOMENTUM, schedule="cosine",
                log_every=max(1, steps_per_epoch // 8))
  cache = cache_lib.RunCache(workdir, dataset, base, range(s["seeds"]))
  start = time.perf_counter()
  results: dict[str, Any] = {
      "size": size, "command": command or f"python -m experiments.compare --size={size}",
      **cache_lib.environment(),
      "train_images": int(dataset.train_images.shape[0]),
      "test_images": int(dataset.test_images.shape[0]), "steps_per_epoch": steps_per_epoch,
      "base": dataclasses.asdict(base), "grid": list(s["grid"]), "models": {}}
  for model in s["models"]:
    rows = {name: compare_method(cache, model, name, s["grid"], interior=len(s["grid"]) > 1)
            for name in METHODS}
    base_speed = rows["none"]["images_per_sec"]
    for row in rows.values():
      row["step_time"] = base_speed / row["images_per_sec"]
    results["models"][f"{model[0]} (width {model[1]}, {model[2]} epochs)"] = {
        "methods": rows, "heuristic": heuristic_disagreement(cache, model)}
  results["seconds"] = time.perf_counter() - start
  cache_lib.write_json(results, cache, os.path.join(out, "comparison.json"))
  figures = make_figures(cache, results, os.path.join(out, "figures", "comparison"))
  write_report(results, figures, os.path.join(out, "COMPARISON.md"))
  return results


# ------------------------------------------------------------------------ figures


def _save(fig: Figure, path: str) -> str:
  FigureCanvasAgg(fig)
  fig.savefig(path, dpi=80)
  return path


def make_figures(cache: cache_lib.RunCache, results: dict[str, Any], out: str) -> list[str]:
  os.makedirs(out, exist_ok=True)
  paths = []
  models = list(results["models"])
  fig = Figure(figsize=(10, 3.4), layout="constrained")
  axes = fig.subplots(1, len(models))
  for ax, model in zip(np.atleast_1d(axes), models):
    rows = results["models"][model]["methods"]
    names = list(rows)
    ax.errorbar(range(len(names)), [rows[n]["acc"] for n in names],
                yerr=[0 if math.isnan(rows[n]["acc_se"]) else rows[n]["acc_se"] for n in names],
                fmt="o", capsize=3)
    ax.set_xticks(range(len(names)), names, rotation=30, fontsize=7)
    ax.set_title(f"{model}: best test accuracy (s.e.)", fontsize=9)
  paths.append(_save(fig, os.path.join(out, "accuracy.png")))

  fig = Figure(figsize=(10, 3.4), layout="constrained")
  axes = fig.subplots(1, len(models))
  for ax, model in zip(np.atleast_1d(axes), models):
    for name, row in results["models"][model]["methods"].items():
      run = plot_lib.read_run(row["workdir"])
      steps = [r["step"] for r in run.train]
      angle = [np.mean([l["angle"] for l in r["layers"].values()]) for r in run.train]
      ax.plot(steps, angle, label=name, lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(f"{model}: angle per step (mean over layers)", fontsize=9)
  np.atleast_1d(axes)[0].legend(fontsize=6)
  paths.append(_save(fig, os.path.join(out, "angles.png")))

  fig = Figure(figsize=(10, 3.4), layout="constrained")
  axes = fig.subplots(1, len(models))
  for ax, model in zip(np.atleast_1d(axes), models):
    for name in ("decoupled", "corrected"):
      run = plot_lib.read_run(results["models"][model]["methods"][name]["workdir"])
      ax.plot([r["step"] for r in run.train], [r["grad_norm"] for r in run.train], label=name)
    ax.set_xlabel("step")
    ax.set_title(f"{model}: gradient norm, cosine schedule", fontsize=9)
    ax.legend(fontsize=7)
  paths.append(_save(fig, os.path.join(out, "grad_norm.png")))
  return paths


def grad_norm_rise(run: plot_lib.Run) -> float:
  """Mean gradient norm over the last tenth of training over its mean in the middle."""
  last = run.train[-1]["step"]
  end = [r["grad_norm"] for r in run.train if r["step"] > 0.9 * last]
  middle = [r["grad_norm"] for r in run.train if 0.4 * last < r["step"] <= 0.6 * last]
  return float(np.mean(end) / np.mean(middle))


def write_report(results: dict[str, Any], figures: list[str], path: str) -> None:
  r = results
  rel = [os.path.relpath(p, os.path.dirname(path)) for p in figures]
  versions = ", ".join(f"{k} {v}" for k, v in r["versions"].items())
  lines = [
      "# The angular-update optimizers, compared", "",
      f"- Command: `{r['command']}`",
      f"- Machine: {r['machine']}; {versions}.",
      f"- Wall time: {r['train_seconds'] / 60:.0f} minutes of training for {r['runs']} runs "
      f"(each timed when trained; cached), {r['seconds'] / 60:.1f} minutes for this "
      "invocation.",
      f"- Data: {r['train_images']} training and {r['test_images']} test images of the "
      f"CIFAR-10 copy; batch {r['base']['batch_size']} ({r['steps_per_epoch']} steps an "
      f"epoch, epochs per model below), cosine schedule to 0, SGD momentum {MOMENTUM} where "
      f"SGD is the base, BatchNorm.",
      f"- Each method's learning rate: its base rate times {', '.join(f'{g:.3g}' for g in r['grid'])} "
      "(seed 0), the grid extended by x3 past an edge until the best rate is interior "
      "(beaten on both sides; enforced: the comparison stops otherwise), then the best with "
      f"{len(r['models'][next(iter(r['models']))]['methods']['none']['accs'])} "
      "seeds. Accuracy: mean (standard error of the mean).",
      "- Angle: measured per step, mean over layers and over the middle half of "
      "training, against the angle the method targets (rotational, nero, hyperball) or "
      "reaches at equilibrium (l2, decoupled, corrected, sgdp) at each step's learning rate "
      "(`normreg.theory`); spherical SGD and plain SGD have none. *tau*: the time constants "
      "of the approach to equilibrium elapsed before that window; an equilibrium ratio is a "
      f"test of the theory only after {SETTLE} of them, and is marked *transient* before. "
      "Step time: the method's training throughput against plain SGD's (`none`), same "
      "model, measured while the runs trained. The runs were trained at different times "
      "on a machine shared with other work, so a step-time ratio within about 2x says "
      "nothing about the method: the interleaved timings of docs/performance.md are the "
      "ones to read.", "",
      "| method | settings | base lr |", "| --- | --- | --- |"]
  transient = sorted({n for m in r["models"].values() for n, v in m["methods"].items()
                      if v.get("time_constants") is not None
                      and v["time_constants"] < SETTLE})
  if transient:
    lines[-3:-3] = [
        f"- **Read with care**: at this budget {', '.join(transient)} never reach their "
        "equilibrium; they are compared in their transient, with an effective learning rate "
        "still set by their initial norms, against methods that turn by their target angle "
        "from the first step. The accuracy ranking is a fact about this budget, not about "
        "the methods at equilibrium."]
  for name, (settings, lr, _) in METHODS.items():
    text = " ".join(f"--{k}={v}" for k, v in settings.items())
    lines.append(f"| {name} | `{text}` | {lr:g} |")
  lines.append("")
  for model, m in r["models"].items():
    rows = m["methods"]
    lines += [f"## {model}", "",
              "| method | lrs tried | best lr | test acc | measured angle | target | ratio | "
              "tau | step time |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, v in sorted(rows.items(), key=lambda kv: -kv[1]["acc"]):
      tau = v.get("time_constants")
      ratio = "-" if v["angle_ratio"] is None else f"{v['angle_ratio']:.2f}" + (
          " (transient)" if tau is not None and tau < SETTLE else "")
      target = "-" if v["angle_ratio"] is None else f"{v['target']:.3g}"
      div = f", {v['diverged']} diverged" if v["diverged"] else ""
      tried = sorted(float(x) for x in v["grid"])
      lines.append(f"| {name} | {tried[0]:.3g} .. {tried[-1]:.3g} ({len(tried)}) | "
                   f"{v['best_lr']:g} | {v['acc']:.3f} ({v['acc_se']:.3f}{div}) | "
                   f"{v['angle']:.3g} | {target} | {ratio} | "
                   f"{'-' if tau is None else f'{tau:.2g}'} | {v['step_time']:.2f} |")
    best = max(rows, key=lambda n: rows[n]["acc"])
    lines += ["", f"Best: **{best}** at {rows[best]['acc']:.3f}; against it: " + ", ".join(
        f"{n} {rows[n]['acc'] - rows[best]['acc']:+.3f} "
        f"({(rows[n]['acc'] - rows[best]['acc']) / max(math.hypot(rows[n]['acc_se'], rows[best]['acc_se']), 1e-9):+.1f} s.e.)"
        for n in rows if n != best) + ".", ""]
    if best != "spherical":
      d = rows["spherical"]["acc"] - rows[best]["acc"]
      se = max(math.hypot(rows["spherical"]["acc_se"], rows[best]["acc_se"]), 1e-9)
      rank = sorted(rows, key=lambda n: -rows[n]["acc"]).index("spherical") + 1
      lines += [f"The paper's own proposal, spherical SGD, ranks {rank} of {len(rows)}: "
                f"{d:+.3f} ({d / se:+.1f} s.e.) against {best}.", ""]
    h = m["heuristic"]
    lines += [f"AdamP's cosine test against the exact groups, along an SGDP run: it disagrees "
              f"on {100 * h['disagree']:.1f}% of {h['decisions']} decisions (leaves with two "
              "or more axes, every logged step). " + (("Per leaf: " + ", ".join(
                  f"`{p}` {100 * f:.0f}% (exact: {h['exact'][p] or 'none'})"
                  for p, f in h["per_leaf"].items() if f > 0) + ".")
                  if any(f > 0 for f in h["per_leaf"].values())
                  else "It agrees with them on every leaf."), ""]
    dec = plot_lib.read_run(rows["decoupled"]["workdir"])
    cor = plot_lib.read_run(rows["corrected"]["workdir"])
    lines += [f"Gradient norm over the last tenth of the cosine schedule against its middle: "
              f"decoupled decay x{grad_norm_rise(dec):.2f}, corrected x{grad_norm_rise(cor):.2f}."
              + (f" The decay had acted for {rows['decoupled']['time_constants']:.2g} time "
                 f"constants, fewer than {SETTLE}: the norms were still far from the "
                 "equilibrium whose loss at the end of the schedule the correction is about, "
                 "so this budget cannot show the effect either way."
                 if (rows["decoupled"].get("time_constants") or SETTLE) < SETTLE else ""),
              ""]
  lines += ["## Figures", ""] + [f"![{os.path.basename(p)}]({p})" for p in rel] + [""]
  with open(path, "w") as f:
    f.write("\n".join(lines))


# --------------------------------------------------------------------------- main

def define_flags() -> None:
  """The command line of ``python -m experiments.compare``.

  Defined when the module runs, not when it is imported, so that the
  experiments can be imported side by side (they share flag names).
  """
  flags.DEFINE_enum("size", "cpu", list(SIZES), "smoke (a test), cpu (about an hour on "
                    "a 2-core CPU), full (50,000 images; a GPU).")
  cache_lib.define_report_flags("runs/compare", "Where the runs go (cached).",
                                "Where COMPARISON.md and figures go; default "
                                "WORKDIR/SIZE/report (the committed one: "
                                "--report_dir=experiments).")


FLAGS = flags.FLAGS


def main(argv):
  with errors.one_line("experiments.compare"):
    workdir, report_dir, command = cache_lib.report_paths("experiments.compare", argv)
    run(FLAGS.size, workdir, report_dir, FLAGS.data_dir, command=command)
  print(f"report: {os.path.join(report_dir, 'COMPARISON.md')}")


if __name__ == "__main__":
  define_flags()
  app.run(main)

"""The comparison as a whole: :func:`run` trains and measures every method, then writes
``comparison.json``, the figures and ``COMPARISON.md``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Optional

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from experiments import cache as cache_lib
from experiments import data as data_lib
from experiments import errors
from experiments import plot as plot_lib
from experiments.config import Config
from experiments.compare.recipes import (
    DECAY_PAIR, METHODS, MOMENTUM, PAPERS_RECIPE, SETTLE, SIZES, compare_method,
    heuristic_disagreement)


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
    for name in DECAY_PAIR:
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
    if best != PAPERS_RECIPE:
      d = rows[PAPERS_RECIPE]["acc"] - rows[best]["acc"]
      se = max(math.hypot(rows[PAPERS_RECIPE]["acc_se"], rows[best]["acc_se"]), 1e-9)
      rank = sorted(rows, key=lambda n: -rows[n]["acc"]).index(PAPERS_RECIPE) + 1
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
    decoupled, corrected = DECAY_PAIR
    dec = plot_lib.read_run(rows[decoupled]["workdir"])
    cor = plot_lib.read_run(rows[corrected]["workdir"])
    lines += [f"Gradient norm over the last tenth of the cosine schedule against its middle: "
              f"decoupled decay x{grad_norm_rise(dec):.2f}, corrected x{grad_norm_rise(cor):.2f}."
              + (f" The decay had acted for {rows[decoupled]['time_constants']:.2g} time "
                 f"constants, fewer than {SETTLE}: the norms were still far from the "
                 "equilibrium whose loss at the end of the schedule the correction is about, "
                 "so this budget cannot show the effect either way."
                 if (rows[decoupled].get("time_constants") or SETTLE) < SETTLE else ""),
              ""]
  lines += ["## Figures", ""] + [f"![{os.path.basename(p)}]({p})" for p in rel] + [""]
  with open(path, "w") as f:
    f.write("\n".join(lines))

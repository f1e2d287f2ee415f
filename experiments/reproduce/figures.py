"""The reproduction's figures: one PNG per claim that has a curve to show.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from normreg import theory
from experiments import plot as plot_lib
from experiments.reproduce.recipes import (
    BASE, L2_RECIPES, MOMENTUM, Runner, WINDOW_START, _series)
from experiments.reproduce.claims import l2_runs


# ------------------------------------------------------------------ figures


def _save(fig: Figure, path: str) -> str:
  FigureCanvasAgg(fig)
  fig.savefig(path, dpi=80)
  return path


def _log_axes(axes, titles) -> None:
  for ax, title in zip(axes, titles):
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step")
    ax.set_yscale("log")


def make_figures(runner: Runner, results: dict[str, Any], out_dir: str) -> list[str]:
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  window = WINDOW_START * runner.total_steps

  fig = Figure(figsize=(11, 3.4), layout="constrained")
  axes = fig.subplots(1, 3)
  for lr, lam in L2_RECIPES:
    lam = runner.lam(lam)
    r = l2_runs(runner, lr, lam)[0]
    for ax, key in zip(axes, ("norm", "elr", "angle")):
      ax.plot(*_series(r, key), label=f"lr={lr:g}, lam={lam:g}")
    axes[2].axhline(theory.equilibrium_angle_sgd(lr, 2 * lam, MOMENTUM), ls=":", lw=1,
                    color=axes[2].lines[-1].get_color())
  for ax in axes:
    ax.axvspan(window, runner.total_steps, color="0.9", zorder=0)
  _log_axes(axes, ("mean unit norm ||w||", "effective lr eta/||w||^2",
                   "angular update (rad/step); dotted: theory"))
  axes[0].legend(fontsize=7)
  paths.append(_save(fig, os.path.join(out_dir, "l2_equilibrium.png")))

  fig = Figure(figsize=(5, 4.2), layout="constrained")
  ax = fig.subplots()
  e = results["3_effective_lr"]
  for family, marker in (("sgd_momentum", "o"), ("sgd", "s"), ("sgdw", "^"), ("adamw", "D")):
    predicted = [v["predicted"] for v in e[family].values()]
    measured = [v["measured"] for v in e[family].values()]
    ax.scatter(predicted, measured, marker=marker, label=family)
  lo = min(v["predicted"] for f in ("sgd_momentum", "sgd", "sgdw", "adamw")
           for v in e[f].values()) / 1.5
  hi = max(v["predicted"] for f in ("sgd_momentum", "sgd", "sgdw", "adamw")
           for v in e[f].values()) * 1.5
  grid = np.geomspace(lo, hi, 10)
  ax.plot(grid, grid, "k-", lw=1)
  ax.fill_between(grid, grid * 0.85, grid * 1.15, color="0.85", zorder=0)
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("predicted angle per step (normreg.theory)")
  ax.set_ylabel("measured (last quarter, mean over layers)")
  ax.set_title("equilibrium angle; band: +-15%", fontsize=9)
  ax.legend(fontsize=7)
  paths.append(_save(fig, os.path.join(out_dir, "angles_vs_theory.png")))

  fig = Figure(figsize=(8, 3.2), layout="constrained")
  axes = fig.subplots(1, 2)
  for scale in (1.0, 4.0):
    r = runner.train(f"none_init{scale:g}", runner.config(method="none", lr=0.1,
                                                         init_scale=scale))
    for ax, key in zip(axes, ("norm", "elr")):
      ax.plot(*_series(r, key), label=f"no L2, init x{scale:g}")
  _log_axes(axes, ("mean unit norm", "effective lr eta/||w||^2"))
  for ax in axes:
    ax.legend(fontsize=7)
  paths.append(_save(fig, os.path.join(out_dir, "no_l2_growth.png")))

  fig = Figure(figsize=(7, 3.2), layout="constrained")
  ax = fig.subplots()
  l2 = results["2_no_regularization"]
  sph = results["5_spherical"]["lr_grid"]
  names = list(l2) + [f"spherical lr={lr}" for lr in sph]
  means = [l2[k]["acc"] for k in l2] + [g["acc"] for g in sph.values()]
  stds = [l2[k]["acc_std"] for k in l2] + [g["acc_std"] for g in sph.values()]
  ax.errorbar(range(len(names)), means, yerr=stds, fmt="o", capsize=3)
  ax.set_xticks(range(len(names)), names, rotation=20, fontsize=7)
  ax.set_ylabel("test accuracy")
  ax.set_title("SGD+L2 (the first three share eta*lam) and spherical SGD", fontsize=9)
  paths.append(_save(fig, os.path.join(out_dir, "accuracy.png")))

  fig = Figure(figsize=(11, 3.4), layout="constrained")
  axes = fig.subplots(1, 2)
  floor = 1e-9
  for key, v in results["8_equivalence"].items():
    axes[0].plot(v["steps"], np.maximum(v["deviation"], floor), label=key)
  for key, v in results["9_exponential_lr"].items():
    line, = axes[1].plot(v["steps"], np.maximum(v["twin"], floor), label=f"{key}: twin")
    axes[1].plot(v["steps"], np.maximum(v["control"], floor), ls="--",
                 color=line.get_color(), label=f"{key}: 1-ulp control")
  _log_axes(axes, (f"(c^2 eta, lam/c^2, c w0) vs (eta, lam, w0); 0 drawn at {floor:g}",
                   "exp_lr twin vs SGD+L2 (eps 1e-30)"))
  for ax in axes:
    ax.set_xscale("symlog", linthresh=10)
    ax.set_xlim(left=0)
    ax.set_ylabel("max rel. difference of logits")
    ax.legend(fontsize=7)
  paths.append(_save(fig, os.path.join(out_dir, "equivalences.png")))

  lr, lam = BASE[0], runner.lam(BASE[1])
  run_dir = l2_runs(runner, lr, lam)[0].workdir
  for path in plot_lib.plot_runs([plot_lib.read_run(run_dir)], os.path.join(out_dir, "run")):
    if os.path.basename(path) in ("effective_lr.png", "accuracy.png"):
      paths.append(path)
    else:
      os.remove(path)
  return paths

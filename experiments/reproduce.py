"""Reproduce van Laarhoven (2017) on real images and check it against normreg.theory.

``python -m experiments.reproduce --size=smoke|medium|full [--data_dir=DIR]``
trains the set of runs below through the launcher's ``train_and_evaluate``,
writes ``RESULTS.md`` and PNG figures into ``--report_dir`` (default ``experiments/``),
and returns the numbers as a dict (``run(...)``) so that the smoke size is
checked as a test (``tests/test_reproduce.py``).

Claims, one section each:

1. invariance: output and loss unchanged when grouped weights are rescaled,
   measured on trained networks of every norm kind;
2. no regularizing effect: SGD+L2 runs with equal ``eta*lam`` reach equal
   accuracy; ``lam`` alone does not;
3. effective learning rate: measured ``eta/||w||^2`` and angular update per
   layer against the equilibrium of ``normreg.theory``, for SGD, SGD with
   momentum and Adam (whose ``eta/||w||`` still depends on ``lam``);
4. without L2 the norm grows and the effective learning rate decays, from a
   start set by the initial scale;
5. the fix: spherical SGD, tuned over one learning rate (the rate mapped from
   the best SGD+L2 recipe and two lower ones; the ungrouped parameters keep
   that recipe's rate, ``--ungrouped_lr``), reaches the best SGD+L2 accuracy
   with no ``lam``;
6. the same on the WeightNorm network;
7. BatchNorm's gamma and beta: scaling an inner layer's pair leaves the output
   unchanged (ReLU and a normalized layer follow), the last one's does not;
   and what L2 on them does to accuracy.

Data: the CIFAR-10 JPEG copy (``--data_dir``, default ``$NORMREG_CIFAR10_DIR``);
without it, random images (only the smoke size allows that, as a test of the
code: on random labels the equilibrium angle of claim 3 measures about a
quarter of the prediction, the other checks hold).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Optional

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
from experiments import data as data_lib
from experiments import plot as plot_lib
from experiments import trainer
from experiments.config import Config

SIZES = {
    # train/test images, CNN width, epochs, batch, seeds for accuracy comparisons
    "smoke": dict(train_size=512, test_size=256, width=4, epochs=3, batch_size=32, seeds=1),
    "medium": dict(train_size=4000, test_size=2000, width=16, epochs=6, batch_size=128,
                   seeds=2),
    "full": dict(train_size=None, test_size=None, width=64, epochs=30, batch_size=128,
                 seeds=3),
}
MOMENTUM = 0.9
# (lr, lam) of claim 2: the first three share eta*lam, the last two do not.
L2_RECIPES = [(0.2, 1e-3), (0.1, 2e-3), (0.05, 4e-3), (0.1, 2.5e-4), (0.1, 1.6e-2)]
BASE = L2_RECIPES[1]


# ------------------------------------------------------------------------ runs


class Runner:
  """Trains configs once each (cached by name in ``workdir``) on one data set."""

  def __init__(self, size: str, workdir: str, dataset: data_lib.Dataset,
               data_dir: Optional[str]):
    self.size, self.workdir, self.dataset = size, workdir, dataset
    s = SIZES[size]
    self.base = Config(dataset="folder", data_dir=data_dir or "random", model="cnn",
                       norm="batch",
                       width=s["width"], epochs=s["epochs"], batch_size=s["batch_size"],
                       train_size=s["train_size"], test_size=s["test_size"],
                       momentum=MOMENTUM, log_every=max(1, self.steps_per_epoch // 8))
    self.seeds = list(range(s["seeds"]))

  @property
  def steps_per_epoch(self) -> int:
    return self.dataset.train_images.shape[0] // SIZES[self.size]["batch_size"]

  def config(self, **overrides) -> Config:
    return dataclasses.replace(self.base, **overrides)

  def train(self, name: str, config: Config) -> plot_lib.Run:
    workdir = os.path.join(self.workdir, name)
    if trainer.changed_settings(workdir, config):
      # The reproduction's recipe for this name changed: keep the old run aside, train anew.
      aside = f"{workdir}.stale-{time.strftime('%Y%m%d-%H%M%S')}"
      logging.warning("reproduce: %s holds other settings; moved to %s", workdir, aside)
      os.rename(workdir, aside)
    if not _complete(workdir, config):
      logging.info("reproduce: training %s", name)
      state = trainer.train_and_evaluate(config, workdir, dataset=self.dataset,
                                         progress=False)
      _save_params(workdir, state)
    return plot_lib.read_run(workdir, label_keys=("method", "lr", "lam"))

  def seeds_of(self, name: str, **overrides) -> list[plot_lib.Run]:
    return [self.train(f"{name}_s{s}", self.config(seed=s, **overrides)) for s in self.seeds]

  def model_of(self, run: plot_lib.Run):
    """The trained model (train mode) of a run, rebuilt from its saved params."""
    config = Config.from_dict(run.config)
    model = trainer.create_model(config, self.dataset.num_classes,
                                 self.dataset.train_images.shape[-1])
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    with np.load(os.path.join(run.workdir, "final_params.npz")) as f:
      leaves = [jnp.asarray(f[f"{i:05d}"]) for i in range(len(f.files))]
    params = jax.tree.unflatten(jax.tree.structure(params), leaves)
    return graphdef, params, rest


def _complete(workdir: str, config: Config) -> bool:
  """Whether ``workdir`` (its settings already checked by ``Runner.train``) holds the whole
  run: its config.json, every epoch's test record and the final params."""
  try:
    run = plot_lib.read_run(workdir)
  except (OSError, ValueError):
    return False
  return bool(run.config) and len(run.test) == config.epochs and os.path.exists(
      os.path.join(workdir, "final_params.npz"))


def _save_params(workdir: str, state) -> None:
  leaves = jax.tree.leaves(state.params)
  np.savez(os.path.join(workdir, "final_params.npz"),
           **{f"{i:05d}": np.asarray(x) for i, x in enumerate(leaves)})


def _acc(runs: list[plot_lib.Run]) -> tuple[float, float]:
  accs = [r.test[-1]["accuracy"] for r in runs]
  return float(np.mean(accs)), float(np.std(accs))


def _tail(run: plot_lib.Run, key: str, frac: float = 0.25) -> float:
  """Mean over layers and over the last ``frac`` of the train records."""
  records = run.train[-max(1, int(len(run.train) * frac)):]
  return float(np.mean([np.mean([l[key] for l in r["layers"].values()]) for r in records]))


def _series(run: plot_lib.Run, key: str) -> tuple[np.ndarray, np.ndarray]:
  steps = np.array([r["step"] for r in run.train])
  return steps, np.array([np.mean([l[key] for l in r["layers"].values()]) for r in run.train])


# --------------------------------------------------------------------- claims


def claim_invariance(runner: Runner, trained: dict[str, plot_lib.Run]) -> dict[str, Any]:
  """Max relative change of logits and loss when grouped weights are rescaled."""
  x = data_lib.normalize(jnp.asarray(runner.dataset.test_images[:256]),
                         *data_lib.channel_stats(runner.dataset.train_images))
  y = jnp.asarray(runner.dataset.test_labels[:256])
  rng = np.random.default_rng(0)
  out = {}
  for norm, run in trained.items():
    graphdef, params, rest = runner.model_of(run)
    forward = jax.jit(lambda p: nnx.merge(graphdef, p, rest, copy=True)(x))
    groups = trainer.find_groups(Config.from_dict(run.config), graphdef, params, rest, x[:64])

    def factor(group, w):
      shape = (1,) * (w.ndim - 1) + w.shape[-1:] if group is normreg.UNIT else ()
      return w * jnp.asarray(rng.uniform(0.25, 4.0, shape), w.dtype)

    scaled = normreg.groups.map_grouped(factor, groups, params)
    a, b = forward(params), forward(scaled)
    loss = lambda logits: float(trainer.cross_entropy(logits, y))
    out[norm] = {"logits_rel_change": float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a))),
                 "loss": loss(a), "loss_change": abs(loss(a) - loss(b)),
                 "grouped_leaves": len([g for g in jax.tree.leaves(groups) if g is not None])}
  return out


def claim_no_regularization(runner: Runner) -> dict[str, Any]:
  out = {}
  for lr, lam in L2_RECIPES:
    runs = runner.seeds_of(f"l2_lr{lr}_lam{lam}", method="l2", lr=lr, lam=lam)
    mean, std = _acc(runs)
    out[f"lr={lr}, lam={lam}"] = {"lr": lr, "lam": lam, "eta_lam": lr * lam, "acc": mean,
                                  "acc_std": std, "angle": _tail(runs[0], "angle"),
                                  "elr": _tail(runs[0], "elr"), "norm": _tail(runs[0], "norm")}
  return out


def claim_effective_lr(runner: Runner, l2: dict[str, Any]) -> dict[str, Any]:
  """Measured vs predicted equilibrium angle (SGD, SGD+momentum), and Adam's lam-dependence."""
  out = {"sgd_momentum": {}, "sgd": {}, "adam": {}}
  for key, rec in l2.items():
    predicted = theory.equilibrium_angle_sgd(rec["lr"], 2 * rec["lam"], MOMENTUM)
    out["sgd_momentum"][key] = {"measured": rec["angle"], "predicted": predicted,
                                "ratio": rec["angle"] / predicted}
  for lam in (2e-3, 8e-3):
    run = runner.train(f"sgd_plain_lam{lam}", runner.config(method="l2", lr=0.1, lam=lam,
                                                           momentum=0.0))
    predicted = theory.equilibrium_angle_sgd(0.1, 2 * lam, 0.0)
    out["sgd"][f"lr=0.1, lam={lam}"] = {"measured": _tail(run, "angle"),
                                        "predicted": predicted,
                                        "ratio": _tail(run, "angle") / predicted}
  for lam in (5e-4, 5e-3):
    run = runner.train(f"adam_l2_lam{lam}", runner.config(method="l2", optimizer="adam",
                                                         lr=1e-3, lam=lam))
    out["adam"][f"lr=0.001, lam={lam}"] = {"elr": _tail(run, "elr"), "norm": _tail(run, "norm"),
                                           "angle": _tail(run, "angle"),
                                           "acc": run.test[-1]["accuracy"]}
  return out


def claim_growth_without_l2(runner: Runner) -> dict[str, Any]:
  out = {}
  for scale in (1.0, 4.0):
    run = runner.train(f"none_init{scale}", runner.config(method="none", lr=0.1,
                                                         init_scale=scale))
    steps, norms = _series(run, "norm")
    _, elrs = _series(run, "elr")
    out[f"init_scale={scale}"] = {"norm_first": float(norms[0]), "norm_last": float(norms[-1]),
                                  "elr_first": float(elrs[0]), "elr_last": float(elrs[-1]),
                                  "acc": run.test[-1]["accuracy"]}
  return out


# Spherical SGD's learning rates: the mapped eta_s times these (claim 5 tunes one number).
SPHERICAL_LR_FACTORS = (1.0, 1 / 3, 1 / 9)


def claim_spherical(runner: Runner, l2: dict[str, Any], norm: str = "batch") -> dict[str, Any]:
  """Spherical SGD (no lam) on a 1-D lr grid around the best L2 recipe's mapped eta_s.

  ``eta_s`` = the equilibrium ``eta/||w||^2`` of the best L2 recipe
  (``normreg.theory.spherical_learning_rate``); the grid is ``eta_s`` times
  ``SPHERICAL_LR_FACTORS``, since a short run's L2 recipe spends its first
  epochs below the equilibrium effective lr. The parameters outside the
  groups keep the L2 recipe's rate. The claim compares the best of this one
  hyperparameter with the best of the L2 recipes' two.
  """
  best_key = max(l2, key=lambda k: l2[k]["acc"])
  best = l2[best_key]
  # theory.spherical_learning_rate(eta, lam_wd, G, mu) = eta/||w_eq||^2: with G
  # estimated from the run's equilibrium norm it is the measured effective lr.
  grad_norm = best["norm"] ** 2 * math.sqrt(2 * 2 * best["lam"] * (1 - MOMENTUM) / best["lr"])
  eta_s = theory.spherical_learning_rate(best["lr"], 2 * best["lam"], grad_norm, MOMENTUM)
  grid, mapped_runs = {}, None
  for factor in SPHERICAL_LR_FACTORS:
    overrides = dict(method="spherical", lr=round(eta_s * factor, 5), norm=norm,
                     ungrouped_lr=best["lr"])
    suffix = "" if factor == 1.0 else f"_lr{overrides['lr']}"
    runs = runner.seeds_of(f"spherical_{norm}{suffix}", **overrides)
    mean, std = _acc(runs)
    grid[overrides["lr"]] = {"acc": mean, "acc_std": std, "angle": _tail(runs[0], "angle")}
    if factor == 1.0:
      mapped_runs, mapped = runs, overrides
  best_lr = max(grid, key=lambda lr: grid[lr]["acc"])
  at_mapped = grid[mapped["lr"]]
  return {"overrides": mapped, "best_l2": best_key, "best_l2_acc": best["acc"],
          "best_l2_acc_std": best["acc_std"],
          "eta_s": eta_s, "spherical_acc": at_mapped["acc"],
          "spherical_acc_std": at_mapped["acc_std"],
          "spherical_norm": _tail(mapped_runs[0], "norm"), "spherical_angle": at_mapped["angle"],
          "predicted_angle": theory.equilibrium_angle_sgd(best["lr"], 2 * best["lam"], MOMENTUM),
          "lr_grid": {str(lr): g for lr, g in grid.items()},
          "best_lr": best_lr, "best_acc": grid[best_lr]["acc"],
          "best_acc_std": grid[best_lr]["acc_std"]}


def claim_weight_norm(runner: Runner) -> dict[str, Any]:
  l2 = {}
  for lr, lam in L2_RECIPES[:3]:
    runs = runner.seeds_of(f"wn_l2_lr{lr}_lam{lam}", method="l2", lr=lr, lam=lam, norm="weight")
    mean, std = _acc(runs)
    l2[f"lr={lr}, lam={lam}"] = {"lr": lr, "lam": lam, "acc": mean, "acc_std": std,
                                 "norm": _tail(runs[0], "norm"), "angle": _tail(runs[0], "angle")}
  return {"l2": l2, "spherical": claim_spherical(runner, l2, norm="weight")}


def claim_gamma_beta(runner: Runner, bn_run: plot_lib.Run) -> dict[str, Any]:
  graphdef, params, rest = runner.model_of(bn_run)
  x = data_lib.normalize(jnp.asarray(runner.dataset.test_images[:256]),
                         *data_lib.channel_stats(runner.dataset.train_images))
  forward = jax.jit(lambda p: nnx.merge(graphdef, p, rest, copy=True)(x))
  ref = forward(params)

  def scaled(layer, a):
    return jax.tree_util.tree_map_with_path(
        lambda path, w: w * a if normreg.groups.path_str(path) in (
            f"norms/{layer}/scale", f"norms/{layer}/bias") else w, params)

  change = {layer: float(jnp.max(jnp.abs(forward(scaled(layer, 3.0)) - ref))
                         / jnp.max(jnp.abs(ref))) for layer in range(6)}
  rules = r"convs/\d+/kernel=unit,norms/\d+/(scale|bias)=tensor,.*=none"
  lr, lam = BASE
  runs = runner.seeds_of("l2_on_gamma_beta", method="l2", lr=lr, lam=lam, group_rules=rules)
  base_runs = runner.seeds_of(f"l2_lr{lr}_lam{lam}", method="l2", lr=lr, lam=lam)
  return {"output_change_when_scaling_layer": change,
          "acc_l2_on_gamma_beta": _acc(runs), "acc_baseline": _acc(base_runs)}


# ------------------------------------------------------------------ the report


def run(size: str, workdir: str, out: str, data_dir: Optional[str] = None) -> dict[str, Any]:
  """Runs every claim at ``size``; writes RESULTS.md and figures into ``out``."""
  if size not in SIZES:
    raise ValueError(f"--size={size!r} is not one of {', '.join(SIZES)}.")
  s = SIZES[size]
  if data_dir:
    dataset = data_lib.load("folder", data_dir=data_dir, train_size=s["train_size"],
                            test_size=s["test_size"], seed=0)
  elif size == "smoke":
    dataset = _random_dataset(s["train_size"], s["test_size"])
  else:
    raise ValueError("--data_dir (or NORMREG_CIFAR10_DIR) is needed for --size="
                     f"{size}: the CIFAR-10 copy, extracted.")
  runner = Runner(size, workdir, dataset, data_dir)
  start = time.perf_counter()
  device = jax.devices()[0]
  results: dict[str, Any] = {"size": size, "data": dataset.name,
                             "machine": f"{jax.device_count()} x {device.device_kind} "
                                        f"({device.platform}, {os.cpu_count()} CPU cores, "
                                        f"jax {jax.__version__})",
                             "train_images": int(dataset.train_images.shape[0]),
                             "test_images": int(dataset.test_images.shape[0]),
                             "steps_per_epoch": runner.steps_per_epoch,
                             "config": dataclasses.asdict(runner.base)}
  l2 = claim_no_regularization(runner)
  results["2_no_regularization"] = l2
  results["3_effective_lr"] = claim_effective_lr(runner, l2)
  results["4_growth_without_l2"] = claim_growth_without_l2(runner)
  results["5_spherical"] = claim_spherical(runner, l2)
  results["6_weight_norm"] = claim_weight_norm(runner)
  lr, lam = BASE
  bn_run = runner.seeds_of(f"l2_lr{lr}_lam{lam}", method="l2", lr=lr, lam=lam)[0]
  trained = {"batch": bn_run,
             "weight": runner.train("spherical_weight_s0", runner.config(
                 seed=0, **results["6_weight_norm"]["spherical"]["overrides"]))}
  for norm in ("layer", "group"):
    trained[norm] = runner.train(f"l2_{norm}", runner.config(method="l2", lr=lr, lam=lam,
                                                             norm=norm))
  results["1_invariance"] = claim_invariance(runner, trained)
  results["7_gamma_beta"] = claim_gamma_beta(runner, bn_run)
  results["seconds"] = time.perf_counter() - start
  os.makedirs(out, exist_ok=True)
  figures = make_figures(runner, results, os.path.join(out, "figures"))
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  write_report(results, figures, os.path.join(out, "RESULTS.md"))
  return results


def _random_dataset(n_train: int, n_test: int) -> data_lib.Dataset:
  rng = np.random.default_rng(0)
  return data_lib.Dataset(
      train_images=rng.integers(0, 256, (n_train, 16, 16, 3), dtype=np.uint8),
      train_labels=rng.integers(0, 10, n_train).astype(np.int32),
      test_images=rng.integers(0, 256, (n_test, 16, 16, 3), dtype=np.uint8),
      test_labels=rng.integers(0, 10, n_test).astype(np.int32),
      num_classes=10, class_names=tuple(map(str, range(10))), name="random")


def _save(fig: Figure, path: str) -> str:
  FigureCanvasAgg(fig)
  fig.savefig(path, dpi=80)
  return path


def make_figures(runner: Runner, results: dict[str, Any], out_dir: str) -> list[str]:
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  fig = Figure(figsize=(11, 3.4), layout="constrained")
  axes = fig.subplots(1, 3)
  for lr, lam in L2_RECIPES:
    r = runner.train(f"l2_lr{lr}_lam{lam}_s0", runner.config(method="l2", lr=lr, lam=lam,
                                                             seed=0))
    for ax, key in zip(axes, ("norm", "elr", "angle")):
      steps, values = _series(r, key)
      ax.plot(steps, values, label=f"lr={lr}, lam={lam}")
    axes[2].axhline(theory.equilibrium_angle_sgd(lr, 2 * lam, MOMENTUM), ls=":", lw=1,
                    color=axes[2].lines[-1].get_color())
  for ax, title in zip(axes, ("mean unit norm ||w||", "effective lr eta/||w||^2",
                              "angular update (rad/step); dotted: theory")):
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step")
    ax.set_yscale("log")
  axes[0].legend(fontsize=7)
  paths.append(_save(fig, os.path.join(out_dir, "l2_equilibrium.png")))

  fig = Figure(figsize=(8, 3.2), layout="constrained")
  axes = fig.subplots(1, 2)
  for scale in (1.0, 4.0):
    r = runner.train(f"none_init{scale}", runner.config(method="none", lr=0.1, init_scale=scale))
    for ax, key in zip(axes, ("norm", "elr")):
      ax.plot(*_series(r, key), label=f"no L2, init x{scale}")
  for ax, title in zip(axes, ("mean unit norm", "effective lr eta/||w||^2")):
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step")
    ax.set_yscale("log")
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
  lr, lam = BASE
  run_dir = os.path.join(runner.workdir, f"l2_lr{lr}_lam{lam}_s0")
  for path in plot_lib.plot_runs([plot_lib.read_run(run_dir)], os.path.join(out_dir, "run")):
    if os.path.basename(path) in ("effective_lr.png", "accuracy.png"):
      paths.append(path)
    else:
      os.remove(path)
  return paths


def _fmt(x: float) -> str:
  return f"{x:.3g}"


def _verdict(holds: Optional[bool], why: str) -> str:
  word = {True: "Holds", False: "Does not hold", None: "Undecided"}[holds]
  return f"Verdict: **{word}** ({why})."


def _same_within_noise(a: float, a_std: float, b: float, b_std: float, seeds: int
                       ) -> tuple[Optional[bool], str]:
  """Equal within 2 standard errors of the difference (None with one seed)."""
  if seeds < 2:
    return None, f"difference {a - b:+.3f}; one seed gives no noise estimate"
  se = math.sqrt((a_std ** 2 + b_std ** 2) / (seeds - 1))
  return abs(a - b) <= max(2 * se, 0.005), f"difference {a - b:+.3f}, 2 s.e. = {2 * se:.3f}"


def write_report(results: dict[str, Any], figures: list[str], path: str) -> None:
  """RESULTS.md: per claim what was run, predicted, measured, and whether it holds."""
  r = results
  base = os.path.dirname(path)
  rel = [os.path.relpath(p, base) for p in figures]
  lines = [
      "# Reproduction: L2 regularization versus batch and weight normalization",
      "",
      f"Size **{r['size']}**: {r['train_images']} training and {r['test_images']} test images "
      f"of `{r['data']}`, CNN width {r['config']['width']}, {r['config']['epochs']} epochs of "
      f"{r['steps_per_epoch']} steps, batch {r['config']['batch_size']}, SGD momentum "
      f"{MOMENTUM} unless said. Produced by `python -m experiments.reproduce --size={r['size']}`"
      f" on {r['machine']} in {r['seconds'] / 60:.0f} minutes (runs cached from earlier "
      f"invocations count only when first trained). Accuracies: mean (spread = std over "
      f"{SIZES[r['size']]['seeds']} seed(s)).",
      "",
      "## 1. Invariance (trained networks, grouped weights x U(0.25, 4) per unit)",
      "",
      "| norm | grouped leaves | max rel. change of logits | loss | loss change |",
      "| --- | --- | --- | --- | --- |",
  ]
  inv = r["1_invariance"]
  for norm, v in inv.items():
    lines.append(f"| {norm} | {v['grouped_leaves']} | {v['logits_rel_change']:.1e} | "
                 f"{v['loss']:.4f} | {v['loss_change']:.1e} |")
  holds = all(v["logits_rel_change"] < 1e-3 for v in inv.values())
  lines += ["", f"Predicted: unchanged. **{'Holds' if holds else 'Does not hold'}** "
            "(changes at the level of the normalizations' eps).", ""]

  lines += ["## 2. No regularizing effect of lam alone", "",
            "| recipe | eta*lam | test acc | norm | eff. lr | angle/step |",
            "| --- | --- | --- | --- | --- | --- |"]
  l2 = r["2_no_regularization"]
  for k, v in l2.items():
    lines.append(f"| {k} | {v['eta_lam']:.1e} | {v['acc']:.3f} ({v['acc_std']:.3f}) | "
                 f"{_fmt(v['norm'])} | {_fmt(v['elr'])} | {_fmt(v['angle'])} |")
  first, third = list(l2.values())[0], list(l2.values())[2]
  same = [v["acc"] for v in list(l2.values())[:3]]
  other = [v["acc"] for v in list(l2.values())[3:]]
  predicted_ratio = ((first["lr"] / first["lam"]) / (third["lr"] / third["lam"])) ** 0.25
  lines += ["", f"The first three share eta*lam = {first['eta_lam']:.1e}. Their test "
            f"accuracies span {max(same) - min(same):.3f}; the two with other eta*lam differ "
            f"from the first three's mean by {', '.join(f'{a - np.mean(same):+.3f}' for a in other)}"
            f". Norm ratio of the first to the third: measured "
            f"{first['norm'] / third['norm']:.2f}, predicted (eta/lam)^(1/4) ratio "
            f"{predicted_ratio:.2f}; their angles per step: {_fmt(first['angle'])} and "
            f"{_fmt(third['angle'])} (equal at equilibrium).", ""]
  seeds = SIZES[r["size"]]["seeds"]
  spread_std = float(np.mean([v["acc_std"] for v in list(l2.values())[:3]]))
  ok, why = _same_within_noise(max(same), spread_std, min(same), spread_std, seeds)
  lines += [_verdict(ok, "equal eta*lam, max - min accuracy: " + why), ""]

  e = r["3_effective_lr"]
  lines += ["## 3. Effective learning rate against theory", "",
            "Equilibrium angle per step `sqrt(2*eta*lam_wd/(1+mu))`, `lam_wd = 2*lam` "
            "(`normreg.theory.equilibrium_angle_sgd`), measured as the mean over layers of "
            "the last quarter of training.", "",
            "| optimizer | recipe | measured | predicted | ratio |", "| --- | --- | --- | --- | --- |"]
  for opt in ("sgd_momentum", "sgd"):
    for k, v in e[opt].items():
      lines.append(f"| {opt} | {k} | {_fmt(v['measured'])} | {_fmt(v['predicted'])} | "
                   f"{v['ratio']:.2f} |")
  ratios = [v["ratio"] for opt in ("sgd_momentum", "sgd") for v in e[opt].values()]
  inside = sum(0.67 <= q <= 1.5 for q in ratios)
  lines += ["", _verdict(inside == len(ratios) if inside else False,
                         f"{inside} of {len(ratios)} measured angles within [0.67, 1.5] of the "
                         "prediction; runs shorter than ~3 time constants "
                         "(1-mu)/(4 eta lam_wd) have not reached equilibrium")]
  lines += ["", "Adam with coupled L2: effective lr `eta/||w||` still depends on lam:", "",
            "| recipe | norm | eta/norm | angle | acc |", "| --- | --- | --- | --- | --- |"]
  for k, v in e["adam"].items():
    lines.append(f"| {k} | {_fmt(v['norm'])} | {_fmt(v['elr'])} | {_fmt(v['angle'])} | "
                 f"{v['acc']:.3f} |")
  adam = [v["elr"] for v in e["adam"].values()]
  lines += ["", _verdict(max(adam) > 1.1 * min(adam),
                         f"eta/||w|| differs by x{max(adam) / min(adam):.2f} between the two lam; "
                         "Adam's step ignores the gradient's scale but not ||w||"), ""]

  g = r["4_growth_without_l2"]
  lines += ["## 4. Without L2 the norm grows and the effective learning rate decays", "",
            "| init | norm first -> last | eff. lr first -> last | acc |",
            "| --- | --- | --- | --- |"]
  for k, v in g.items():
    lines.append(f"| {k} | {_fmt(v['norm_first'])} -> {_fmt(v['norm_last'])} | "
                 f"{_fmt(v['elr_first'])} -> {_fmt(v['elr_last'])} | {v['acc']:.3f} |")
  g1, g4 = g["init_scale=1.0"], g["init_scale=4.0"]
  lines += ["", _verdict(g1["norm_last"] > g1["norm_first"] and g1["elr_last"] < g1["elr_first"]
                         and g4["elr_last"] < 0.5 * g1["elr_last"],
                         f"init x1: norm x{g1['norm_last'] / g1['norm_first']:.2f}, eff. lr "
                         f"x{g1['elr_last'] / g1['elr_first']:.2f}; at the end the x4 start has "
                         f"{g4['elr_last'] / g1['elr_last']:.3f} times the x1 effective lr"), ""]

  for title, sph in (("## 5. The fix: spherical SGD, no lam (BatchNorm)", r["5_spherical"]),
                     ("## 6. WeightNorm network", r["6_weight_norm"]["spherical"])):
    lines += [title, "",
              f"Best SGD+L2 recipe: {sph['best_l2']}, test acc {sph['best_l2_acc']:.3f} "
              f"({sph['best_l2_acc_std']:.3f}). Spherical SGD at the mapped learning rate "
              f"eta_s = {sph['eta_s']:.4g} (`normreg.theory.spherical_learning_rate`; the "
              f"ungrouped parameters keep lr {sph['overrides']['ungrouped_lr']}): "
              f"test acc {sph['spherical_acc']:.3f} ({sph['spherical_acc_std']:.3f}); unit "
              f"norm {sph['spherical_norm']:.5f}; angle per step {_fmt(sph['spherical_angle'])} "
              f"(predicted {_fmt(sph['predicted_angle'])}).", ""]
    lines += ["| spherical lr | x eta_s | test acc | angle/step |", "| --- | --- | --- | --- |"]
    for lr, g in sph["lr_grid"].items():
      lines.append(f"| {lr} | {float(lr) / sph['eta_s']:.3g} | {g['acc']:.3f} "
                   f"({g['acc_std']:.3f}) | {_fmt(g['angle'])} |")
    ok, why = _same_within_noise(sph["best_acc"], sph["best_acc_std"],
                                 sph["best_l2_acc"], sph["best_l2_acc_std"],
                                 SIZES[r["size"]]["seeds"])
    lines += ["", _verdict(ok, f"best spherical lr {sph['best_lr']} (one hyperparameter) "
                           "against the best SGD+L2 recipe (two): " + why), ""]
  wn = r["6_weight_norm"]["l2"]
  lines += ["| WeightNorm recipe | test acc | norm of v | angle |", "| --- | --- | --- | --- |"]
  for k, v in wn.items():
    lines.append(f"| {k} | {v['acc']:.3f} ({v['acc_std']:.3f}) | {_fmt(v['norm'])} | "
                 f"{_fmt(v['angle'])} |")
  lines += [""]

  gb = r["7_gamma_beta"]
  lines += ["## 7. BatchNorm's gamma and beta", "",
            "Relative change of the logits when one layer's (gamma, beta) are multiplied by 3 "
            "(train mode):", "", "| BN layer | change |", "| --- | --- |"]
  for layer, c in gb["output_change_when_scaling_layer"].items():
    lines.append(f"| norms/{layer}{' (last)' if str(layer) == '5' else ''} | {c:.1e} |")
  inner = [c for layer, c in gb["output_change_when_scaling_layer"].items()
           if str(layer) != "5"]
  last = gb["output_change_when_scaling_layer"][5]
  lines += ["", _verdict(max(inner) < 1e-3 and last > 1e-2,
                         f"inner layers: at most {max(inner):.1e}; last: {last:.1e}")]
  lines += ["", f"L2 on gamma and beta too (lam as in the baseline): test acc "
            f"{gb['acc_l2_on_gamma_beta'][0]:.3f} ({gb['acc_l2_on_gamma_beta'][1]:.3f}) vs "
            f"{gb['acc_baseline'][0]:.3f} ({gb['acc_baseline'][1]:.3f}) without.", ""]
  lines += ["## Figures", ""] + [f"![{os.path.basename(p)}]({p})" for p in rel] + [""]
  with open(path, "w") as f:
    f.write("\n".join(lines))


# ---------------------------------------------------------------------- main

_SIZE = flags.DEFINE_enum("size", "smoke", list(SIZES), "How big: smoke (CI, minutes on a "
                          "CPU), medium (largest CPU size), full (50,000 images; a GPU).")
_DATA_DIR = flags.DEFINE_string("data_dir", os.environ.get("NORMREG_CIFAR10_DIR"),
                                "The extracted CIFAR-10 copy (default $NORMREG_CIFAR10_DIR).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/reproduce", "Where the runs go (cached: a "
                               "finished run is not trained again).")
_REPORT_DIR = flags.DEFINE_string("report_dir", "experiments",
                                  "Where RESULTS.md, results.json and figures/ go.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _DATA_DIR.value and not os.path.isdir(_DATA_DIR.value):
    raise app.UsageError(f"--data_dir={_DATA_DIR.value} is not a folder.")
  results = run(_SIZE.value, os.path.join(_WORKDIR.value, _SIZE.value), _REPORT_DIR.value,
                _DATA_DIR.value)
  print(json.dumps(results, indent=1))


if __name__ == "__main__":
  app.run(main)

"""The reproduction as a whole: :func:`run` trains every claim at one size and writes
``results.json``, the figures and ``RESULTS.md`` (:func:`write_report`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Optional

import numpy as np

from experiments import cache as cache_lib
from experiments import data as data_lib
from experiments import errors
from experiments.reproduce.recipes import (
    ADAMW_RECIPES, BASE, EARLY_STEPS, MOMENTUM, PROBE_IMAGES, Runner, SETTLE, SIZES, ULP,
    UNGROUPED_LR, _name)
from experiments.reproduce.claims import (
    CRITERIA, check_recipes, claim_effective_lr, claim_equivalence, claim_exponential_lr,
    claim_gamma_beta, claim_growth_without_l2, claim_invariance, claim_no_regularization,
    claim_spherical, claim_weight_norm, l2_runs, verdicts)
from experiments.reproduce.figures import make_figures


# ------------------------------------------------------------------ the report


def run(size: str, workdir: str, out: str, data_dir: Optional[str] = None,
        command: Optional[str] = None) -> dict[str, Any]:
  """Runs every claim at ``size``; writes RESULTS.md and figures into ``out``."""
  if size not in SIZES:
    raise errors.InputError(f"--size={size!r} is not one of {', '.join(SIZES)}.")
  s = SIZES[size]
  if data_dir:
    dataset = data_lib.load("folder", data_dir=data_dir, train_size=s["train_size"],
                            test_size=s["test_size"], seed=0)
  elif size == "smoke":
    dataset = _random_dataset(s["train_size"], s["test_size"])
  else:
    raise errors.InputError("--data_dir (or NORMREG_CIFAR10_DIR) is needed for --size="
                     f"{size}: the CIFAR-10 copy, extracted.")
  runner = Runner(size, workdir, dataset, data_dir)
  check_recipes(runner)
  start = time.perf_counter()
  results: dict[str, Any] = {
      "size": size, "data": dataset.name,
      "command": command or f"python -m experiments.reproduce --size={size}",
      **cache_lib.environment(),
      "train_images": int(dataset.train_images.shape[0]),
      "test_images": int(dataset.test_images.shape[0]),
      "steps_per_epoch": runner.steps_per_epoch, "total_steps": runner.total_steps,
      "decay_scale": runner.decay_scale, "criteria": CRITERIA,
      "config": dataclasses.asdict(runner.base)}
  l2 = claim_no_regularization(runner)
  results["2_no_regularization"] = l2
  results["3_effective_lr"] = claim_effective_lr(runner, l2)
  results["4_growth_without_l2"] = claim_growth_without_l2(runner)
  results["5_spherical"] = claim_spherical(runner, l2)
  results["6_weight_norm"] = claim_weight_norm(runner)
  lr, lam = BASE[0], runner.lam(BASE[1])
  bn_run = l2_runs(runner, lr, lam)[0]
  trained = {"batch": bn_run,
             "weight": runner.train(
                 _name("spherical_weight", results["6_weight_norm"]["spherical"]["overrides"]
                       ["lr"]) + "_s0",
                 runner.config(seed=0, **results["6_weight_norm"]["spherical"]["overrides"]))}
  for norm in ("layer", "group"):
    # Any trained network will do (no equilibrium is measured): the table's own lam, as the
    # scaled one of a short size shrinks the weights until var ~ eps breaks the invariance.
    trained[norm] = runner.train(f"l2_{norm}", runner.config(method="l2", lr=BASE[0],
                                                             lam=BASE[1], norm=norm),
                                 settle=False)
  results["1_invariance"] = claim_invariance(runner, trained)
  results["7_gamma_beta"] = claim_gamma_beta(runner, bn_run)
  results["8_equivalence"] = claim_equivalence(runner)
  results["9_exponential_lr"] = claim_exponential_lr(runner)
  results["seconds"] = time.perf_counter() - start
  results["verdicts"] = {k: {"holds": v[0], "why": v[1]} for k, v in verdicts(results).items()}
  cache_lib.write_json(results, runner, os.path.join(out, "results.json"))
  figures = make_figures(runner, results, os.path.join(out, "figures"))
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


# ------------------------------------------------------------------ the report


def _fmt(x: float) -> str:
  return f"{x:.3g}"


def _verdict(result: dict[str, Any], key: str) -> str:
  v = result["verdicts"][key]
  word = {True: "Holds", False: "Does not hold", None: "Undecided"}[v["holds"]]
  return f"Verdict: **{word}** ({v['why']})."


def _criterion(key: str) -> str:
  return f"Criterion (fixed before the runs): {CRITERIA[key]}"


def _drift_text(size: str) -> str:
  limit = SIZES[size]["max_drift"]
  return "any amount (not checked at this size)" if limit is None else f"{100 * limit:.0f}%"


def write_report(results: dict[str, Any], figures: list[str], path: str) -> None:
  """RESULTS.md: per claim the criterion, what was run and measured, and the verdict."""
  r = results
  base = os.path.dirname(path)
  rel = [os.path.relpath(p, base) for p in figures]
  held = [k for k, v in r["verdicts"].items() if v["holds"]]
  versions = ", ".join(f"{k} {v}" for k, v in r["versions"].items())
  lines = [
      "# Reproduction: L2 regularization versus batch and weight normalization",
      "",
      f"- Command: `{r['command']}`",
      f"- Machine: {r['machine']}; {versions}.",
      f"- Wall time: {r['train_seconds'] / 60:.0f} minutes of training for the {r['runs']} "
      f"runs behind this report (each timed when it was trained; runs are cached in the "
      f"workdir), {r['seconds'] / 60:.1f} minutes for the invocation that wrote it.",
      f"- Size **{r['size']}**: {r['train_images']} training and {r['test_images']} test images"
      f" of `{r['data']}`, CNN width {r['config']['width']}, {r['config']['epochs']} epochs of "
      f"{r['steps_per_epoch']} steps ({r['total_steps']} steps), batch "
      f"{r['config']['batch_size']}, SGD momentum {MOMENTUM} unless said; every decay "
      f"coefficient of the recipe tables times {r['decay_scale']}. Accuracies: mean (std) over"
      f" {SIZES[r['size']]['seeds']} seed(s).",
      f"- Every L2, SGDW and AdamW recipe trains at least {SETTLE} time constants "
      f"(`normreg.theory.time_constant_*`, listed per recipe) before the measurement window,"
      f" the last quarter of the steps, and its mean unit norm changes by at most "
      f"{_drift_text(r['size'])} across that window (listed as the drift); the code refuses "
      f"a recipe that fails either.",
      f"- **{len(held)} of {len(r['verdicts'])} verdicts hold.**",
      "",
      "## 1. Invariance (trained networks, grouped weights x U(0.25, 4) per unit)",
      "", _criterion("1"), "",
      "| norm | grouped leaves | max rel. change of logits | loss | loss change |",
      "| --- | --- | --- | --- | --- |",
  ]
  for norm, v in r["1_invariance"].items():
    lines.append(f"| {norm} | {v['grouped_leaves']} | {v['logits_rel_change']:.1e} | "
                 f"{v['loss']:.4f} | {v['loss_change']:.1e} |")
  lines += ["", _verdict(r, "1"), ""]

  lines += ["## 2. No regularizing effect of lam alone", "", _criterion("2"), "",
            f"SGD + coupled L2, the ungrouped parameters at lr {UNGROUPED_LR} in every recipe.",
            "", "| recipe | eta*lam | time constant (steps) | test acc | norm | eta/norm^2 | "
            "angle/step | diverged seeds |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
  for k, v in r["2_no_regularization"].items():
    lines.append(f"| {k} | {v['eta_lam']:.1e} | {v['time_constant']:.3g} | {v['acc']:.3f} "
                 f"({v['acc_std']:.3f}) | {_fmt(v['norm'])} | {_fmt(v['elr'])} | "
                 f"{_fmt(v['angle'])} | {v['diverged']} |")
  lines += ["", "The first three share eta*lam; the last two have a quarter and four times "
            "it (for comparison: they need not match).", "", _verdict(r, "2"), ""]

  e = r["3_effective_lr"]
  lines += ["## 3. Effective learning rate against theory", "", _criterion("3"), "",
            "Predicted angle per step: `sqrt(2*eta*lam_wd/(1+mu))` with `lam_wd = 2*lam` (SGD +"
            " coupled L2), `sqrt(2*eta*wd*(1-mu)/(1+mu))` (SGDW), "
            "`sqrt(2*eta*wd*(1-b1)/(1+b1))` (AdamW, b1 = 0.9).", "",
            "| family | recipe | time constant (steps) | norm drift in window | measured | "
            "predicted | ratio |", "| --- | --- | --- | --- | --- | --- | --- |"]
  for fam in ("sgd_momentum", "sgd", "sgdw", "adamw"):
    for k, v in e[fam].items():
      lines.append(f"| {fam} | {k} | {v['time_constant']:.3g} | {100 * v['drift']:+.1f}% | "
                   f"{_fmt(v['measured'])} | {_fmt(v['predicted'])} | {v['ratio']:.2f} |")
  lines += ["", _verdict(r, "3"), "", "### 3b. Adam removes only part of the dependence", "",
            _criterion("3b"), "",
            f"AdamW at lr {ADAMW_RECIPES[1][0]:g}: eta/||w|| = "
            f"{_fmt(e['adam_elr']['elr'][0])} and {_fmt(e['adam_elr']['elr'][1])} (norms "
            f"{_fmt(e['adam_elr']['norm'][0])}, {_fmt(e['adam_elr']['norm'][1])}).", "",
            _verdict(r, "3b"), ""]

  lines += ["## 4. Without L2 the norm grows and the effective learning rate decays", "",
            _criterion("4"), "", "| init | norm first -> last | eff. lr first -> last | acc |",
            "| --- | --- | --- | --- |"]
  for k, v in r["4_growth_without_l2"].items():
    lines.append(f"| {k} | {_fmt(v['norm_first'])} -> {_fmt(v['norm_last'])} | "
                 f"{_fmt(v['elr_first'])} -> {_fmt(v['elr_last'])} | {v['acc']:.3f} |")
  lines += ["", _verdict(r, "4"), ""]

  for key, title, sph in (("5", "## 5. The fix: spherical SGD, no lam (BatchNorm)",
                           r["5_spherical"]),
                          ("6", "## 6. WeightNorm network", r["6_weight_norm"]["spherical"])):
    lines += [title, "", _criterion(key), "",
              f"Best SGD+L2 recipe: {sph['best_l2']}, test acc {sph['best_l2_acc']:.3f} "
              f"({sph['best_l2_acc_std']:.3f}). Spherical SGD at the mapped learning rate "
              f"eta_s = {sph['eta_s']:.4g} (`normreg.theory.spherical_learning_rate`; the "
              f"ungrouped parameters keep lr {sph['overrides']['ungrouped_lr']}): "
              f"test acc {sph['spherical_acc']:.3f} ({sph['spherical_acc_std']:.3f}); unit "
              f"norm {sph['spherical_norm']:.5f}; angle per step {_fmt(sph['spherical_angle'])} "
              f"(predicted {_fmt(sph['predicted_angle'])}).", "",
              "| spherical lr | x eta_s | test acc | angle/step |", "| --- | --- | --- | --- |"]
    for lr, g in sph["lr_grid"].items():
      lines.append(f"| {lr} | {float(lr) / sph['eta_s']:.3g} | {g['acc']:.3f} "
                   f"({g['acc_std']:.3f}) | {_fmt(g['angle'])} |")
    lines += ["", _verdict(r, key), ""]
  lines += ["| WeightNorm SGD+L2 recipe | test acc | norm of v | angle | diverged seeds |",
            "| --- | --- | --- | --- | --- |"]
  for k, v in r["6_weight_norm"]["l2"].items():
    lines.append(f"| {k} | {v['acc']:.3f} ({v['acc_std']:.3f}) | {_fmt(v['norm'])} | "
                 f"{_fmt(v['angle'])} | {v['diverged']} |")
  lines += ["", "A seed whose loss became NaN or inf is scored at chance (0.1) and left out of "
            "the norms and angles. The WeightNorm L2 runs are not at an equilibrium (their norms "
            "still move by up to a factor 3 across the last quarter): this claim compares "
            "accuracies only, and their norms and angles are shown as they end.", ""]
  lines += [""]

  gb = r["7_gamma_beta"]
  lines += ["## 7. BatchNorm's gamma and beta", "", _criterion("7"), "",
            "Relative change of the logits when one layer's (gamma, beta) are multiplied by 3 "
            "(train mode):", "", "| BN layer | change |", "| --- | --- |"]
  for layer, c in gb["output_change_when_scaling_layer"].items():
    lines.append(f"| norms/{layer}{' (last)' if str(layer) == '5' else ''} | {c:.1e} |")
  lines += ["", _verdict(r, "7"), "",
            f"L2 on gamma and beta too (lam as in the baseline): test acc "
            f"{gb['acc_l2_on_gamma_beta'][0]:.3f} ({gb['acc_l2_on_gamma_beta'][1]:.3f}) vs "
            f"{gb['acc_baseline'][0]:.3f} ({gb['acc_baseline'][1]:.3f}) without.", ""]

  lines += ["## 8. Exact equivalence: lam has no effect of its own", "", _criterion("8"), "",
            f"`(eta, lam, w0)` against `(c^2 eta, lam/c^2, c w0)` (`--init_scale=c`), SGD "
            f"momentum {MOMENTUM}, the ungrouped parameters at lr {UNGROUPED_LR} in both, "
            f"logits of {PROBE_IMAGES} test images in training mode at step 0 to "
            f"{EARLY_STEPS} and every logged step. With the default eps = 1e-5 the "
            "normalizations are invariant only up to about eps/var, and that difference is "
            "amplified by training like any other.", "",
            "| runs | lr | lam | max rel. difference of logits | test acc (c = 1 run) |",
            "| --- | --- | --- | --- | --- |"]
  for k, v in r["8_equivalence"].items():
    lines.append(f"| {k} | {v['lr']:g} | {v['lam']:g} | {v['max_deviation']:.1e} | "
                 f"{v['acc']:.4f} ({v['acc_base']:.4f}) |")
  lines += ["", _verdict(r, "8"), ""]

  lines += ["## 9. Weight decay is an exponentially growing learning rate", "",
            _criterion("9"), "",
            "SGD + coupled L2 against its twin without L2 whose grouped learning rate is "
            "`eta * alpha^(-2t-1)` (`--method=exp_lr`, `normreg.theory.exponential_lr_schedule`;"
            " `alpha = 1 - eta*lam_wd` without momentum, with momentum the larger root of "
            "`x^2 - (1+mu-eta*lam_wd) x + mu` and a buffer starting at `(alpha-1)/(eta*alpha) w0`"
            "), eps = 1e-30. The twin is the same network mathematically but rounds "
            "differently; the control is the L2 run itself from weights multiplied by "
            f"{ULP!r}. Max relative difference of the logits against the L2 run:", "",
            "| momentum | step | twin | control |", "| --- | --- | --- | --- |"]
  for k, v in r["9_exponential_lr"].items():
    shown = [i for i, s in enumerate(v["steps"]) if s <= EARLY_STEPS] + [len(v["steps"]) - 1]
    for i in shown:
      lines.append(f"| {k} | {v['steps'][i]} | {v['twin'][i]:.1e} | {v['control'][i]:.1e} |")
  lines += [""] + [
      f"{k}: alpha = {v['alpha']:.6f}, the twin's rate reaches {v['final_lr']:.3g} at the last "
      f"step; test accuracy L2 {v['acc']['l2']:.4f}, twin {v['acc']['twin']:.4f}, control "
      f"{v['acc']['control']:.4f}." for k, v in r["9_exponential_lr"].items()]
  lines += ["", "After a few steps any difference, even the control's one ulp, grows to "
            "O(0.1): ReLU and max pooling switch discretely when an activation crosses a tie, "
            "so the training map is chaotic and float32 cannot follow two roundings of the "
            "same trajectory for long. The identity over many steps is checked exactly in "
            "float64 on a small network (`tests/test_theory.py`).", "",
            _verdict(r, "9"), ""]
  lines += ["## Figures", ""] + [f"![{os.path.basename(p)}]({p})" for p in rel] + [""]
  with open(path, "w") as f:
    f.write("\n".join(lines))

"""The paper's claims on a byte-level language model, with AdamW, SGD and Muon.

``python -m experiments.reproduce_lm --size=tiny|cpu|large [--workdir=DIR]
[--report_dir=DIR]`` trains the runs below through the launcher
(``--task=lm``: ``experiments.tasks.lm``, the standard library's sources, offline),
writes ``RESULTS.md``, ``results.json`` and figures into ``--report_dir`` (default
``WORKDIR/SIZE/report``; the committed report is written with
``--report_dir=experiments/lm``), and returns the numbers (:func:`run`). Runs are
cached (``experiments.cache.RunCache``): the report regenerates from them, identically
on the same machine and versions (Muon's ``S`` is measured again when the report is
written, and a cached run is matched by its settings, not by the library's version).

The claims, pre-registered: each criterion is fixed in :data:`CRITERIA` and printed in the
report before its numbers.

1. **Equilibrium.** With decay on exactly the scale-invariant weights (QK-norm per
   head, the post-normed v, o, up and down, the pre-norm's scale), each such weight's
   angle per step over the last quarter of the steps is within 15% of
   ``normreg.theory``'s: AdamW ``sqrt(2 eta wd (1-b1)/(1+b1))``, SGD with momentum and
   coupled L2 ``sqrt(2 eta lam_wd/(1+mu))``, Muon ``sqrt(2 eta wd/S)`` (the matrices
   Muon orthogonalizes; the norms' scales go to Muon's Adam and are listed apart).
   Each recipe's decay is set from the size's steps so that it trains
   ``1.25 * SETTLE`` (5) time constants before that window (``experiments.reproduce``
   requires ``SETTLE``).
2. **c-rescaling.** The invariant weights scaled by ``c = 2`` at init, SGD's rate and
   decay by ``(c^2, 1/c^2)``, AdamW's and Muon's by ``(c, 1/c)``, the other parameters
   at their own rate (``--ungrouped_lr``), normalizations' eps ``1e-30``: the same
   function. Against a control: ``c = 2`` with the rates unchanged. Two diagnostic rows,
   not judged: AdamW and Muon with their epsilon at 1e-30 (``--adam_eps``).
3. **Held angle.** Spherical (Adam), rotational (Adam) and AdamH turn each invariant
   weight by the same angle in their first steps as in their last quarter; AdamW, from
   the same init, is the contrast.
4. **Comparison.** Validation bits per byte after the same steps, each method at its best
   learning rate on a grid extended until that best is interior (``EdgeOfGridError``'s
   rule of ``experiments.compare``, on seed 0), then every seed: mean and standard
   error; and the steps each takes to reach AdamW's final validation loss. The usual
   AdamW (decay on every matrix) is a row. No method is expected to win.

References: van Laarhoven 2017 (arXiv 1706.05350); Kosson et al. 2024 (rotational
equilibrium, arXiv 2305.17212); Liu et al. 2025 (Muon is scalable, arXiv 2502.16982).
"""

from __future__ import annotations

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

from experiments import cache as cache_lib
from experiments import errors
from experiments import methods as methods_lib
from experiments import plot as plot_lib
from experiments import tasks as tasks_lib
from experiments.config import Config
from experiments.reproduce import recipes as reproduce_lib
from normreg import theory

# The model, data and lengths of each size. ``equilibrium``: claim 1's steps; ``rescale``:
# claim 2's; ``hold``: claim 3's (every step logged); ``compare``: claim 4's, validated
# every ``eval_every``; ``methods``: claim 4's rows (tiny: a test of the code); ``stat_steps``:
# the steps of normreg.theory.muon_update_statistics behind Muon's S (16,000: ~0.5%).
SIZES = {
    "tiny": dict(seq_len=32, d_model=16, n_layers=1, n_heads=2, batch_size=8,
                 train_sequences=1024, test_sequences=32, equilibrium=96, rescale=5,
                 hold=24, compare=40, eval_every=20, seeds=2, methods=("adamw",),
                 stat_steps=4000),
    "cpu": dict(seq_len=64, d_model=64, n_layers=2, n_heads=4, batch_size=16,
                train_sequences=None, test_sequences=256, equilibrium=800, rescale=50,
                hold=200, compare=800, eval_every=100, seeds=3, methods=None,
                stat_steps=16000),
    "large": dict(seq_len=256, d_model=256, n_layers=4, n_heads=4, batch_size=64,
                  train_sequences=None, test_sequences=1024, equilibrium=3000, rescale=100,
                  hold=500, compare=3000, eval_every=250, seeds=3, methods=None,
                  stat_steps=16000),
}
SETTLE, WINDOW_START = reproduce_lib.SETTLE, reproduce_lib.WINDOW_START
EXACT_EPS = reproduce_lib.EXACT_EPS
TOLERANCE = 0.15  # claims 1 and 3
MAX_DRIFT = 0.05  # claim 1: the mean norm's change across the window
EARLY = 10  # claim 3: the first steps
MOMENTUM = 0.9
# Claim 1: (method, optimizer, lr); the decay is set from the size's steps (equilibrium_lam).
EQUILIBRIUM = {"adamw": ("decoupled", "adam", 3e-3), "sgd": ("l2", "sgd", 0.1),
               "muon": ("decoupled", "muon", 0.02)}
# Claim 2: (method, optimizer, lr, lam, the exponent p of c in lr * c^p and lam / c^p, Adam's
# and Muon's eps). The last two rows are a diagnostic, not judged: their eps at 1e-30.
RESCALE = {"sgd": ("l2", "sgd", 0.1, 1e-3, 2, 1e-8),
           "adamw": ("decoupled", "adam", 3e-3, 0.1, 1, 1e-8),
           "muon": ("decoupled", "muon", 0.02, 0.1, 1, 1e-8),
           "adamw_eps0": ("decoupled", "adam", 3e-3, 0.1, 1, EXACT_EPS),
           "muon_eps0": ("decoupled", "muon", 0.02, 0.1, 1, EXACT_EPS)}
JUDGED_RESCALE = ("sgd", "adamw", "muon")
RESCALE_C = 2.0
PROBE_SEQUENCES = 8
# Claim 3: (method, lr, lam); the first three hold their angle, AdamW is the contrast.
HOLD = {"spherical": ("spherical", 1e-2, None), "rotational": ("rotational", 3e-3, 0.1),
        "adamh": ("hyperball", 1e-2, None), "adamw": ("decoupled", 3e-3, 0.1)}
# Claim 4: name -> (overrides, the grid's middle rate). Grids are x3 apart, extended by
# MAX_EXTENSIONS more until their best is interior.
WD = 0.1
COMPARED = {
    "adamw": (dict(method="decoupled", optimizer="adam", lam=WD), 3e-3),
    "adamw_all_matrices": (dict(method="decoupled", optimizer="adam", lam=WD,
                                decay_all_matrices=True), 3e-3),
    "muon": (dict(method="decoupled", optimizer="muon", lam=WD), 1e-2),
    "rotational": (dict(method="rotational", optimizer="adam", lam=WD), 3e-3),
    "rotational_muon": (dict(method="rotational", optimizer="muon", lam=WD), 1e-2),
    "spherical": (dict(method="spherical", optimizer="adam"), 1e-2),
    "adamh": (dict(method="hyperball", optimizer="adam"), 1e-2),
}
GRID_RATIO = 3.0
MAX_EXTENSIONS = 2

CRITERIA = {
    "1": f"holds if, for each of AdamW, SGD (momentum {MOMENTUM}, coupled L2) and Muon, "
         "every scale-invariant weight's mean angle per step over the last quarter is within "
         f"{TOLERANCE:.0%} of normreg.theory's, and the mean norm moves by at most "
         f"{MAX_DRIFT:.0%} across that quarter (Muon: the matrices it orthogonalizes; the "
         "norms' scales, which Muon's Adam steps, are listed, not judged)",
    "2": "holds if, after the size's rescale steps, the logits of a fixed batch differ by "
         "a relative 1e-6 at most for SGD (float precision), 1e-3 at most for AdamW and "
         "Muon (their epsilon), and the control (rates not rescaled) differs by at least "
         "100 times more than each",
    "3": f"holds if, for spherical, rotational and AdamH, every scale-invariant weight's "
         f"mean angle over steps 1-{EARLY} is within {TOLERANCE:.0%} of its mean over the "
         "last quarter, and, where the method sets its angle (rotational, AdamH), within "
         f"{TOLERANCE:.0%} of that",
    "4": "a comparison, not a test: it holds if every method's best rate is interior to "
         "its grid and its runs finished (the table then says what happened)",
}


def planned_steps(size: str) -> int:
  """Train steps of every run of ``size`` (claim 4 on its first grid, before extensions)."""
  s = SIZES[size]
  compared = len(s["methods"] or COMPARED) * (3 + s["seeds"] - 1) * s["compare"]
  return (len(EQUILIBRIUM) * s["equilibrium"] + 3 * len(RESCALE) * s["rescale"]
          + len(HOLD) * s["hold"] + compared)


class Runner(cache_lib.RunCache):
  """The LM runs of one size (``experiments.cache.RunCache``), every seed on one data set."""

  def __init__(self, size: str, workdir: str):
    s = SIZES[size]
    base = Config(task="lm", seq_len=s["seq_len"], d_model=s["d_model"],
                  n_layers=s["n_layers"], n_heads=s["n_heads"], batch_size=s["batch_size"],
                  train_sequences=s["train_sequences"], test_sequences=s["test_sequences"],
                  steps=s["compare"], eval_every=s["eval_every"], momentum=MOMENTUM,
                  log_every=max(1, s["compare"] // 80))
    dataset = tasks_lib.of(base).load(base)
    super().__init__(workdir, dataset, base, range(s["seeds"]))
    self.size = size

  def probe_logits(self, run: plot_lib.Run) -> np.ndarray:
    """The trained model's logits of the first :data:`PROBE_SEQUENCES` test sequences."""
    graphdef, params, rest = self.model_of(run)
    tokens = jnp.asarray(self.dataset.test[:PROBE_SEQUENCES, :-1], jnp.int32)
    return np.asarray(nnx.merge(graphdef, params, rest)(tokens), np.float64)


def _mean_layers(run: plot_lib.Run, first: int, last: int) -> dict[str, float]:
  """Each layer's mean ``angle`` over the train records with ``first <= step <= last``."""
  records = [r for r in run.train if first <= r["step"] <= last]
  return {name: float(np.mean([r["layers"][name]["angle"] for r in records]))
          for name in run.layer_names()} if records else {}


def layer_drifts(run: plot_lib.Run) -> dict[str, float]:
  """Each layer's relative change of its norm from the first to the second half of the
  window (``experiments.reproduce``'s drift, per weight)."""
  first, last = _window(run)
  mid = (first + last) / 2
  out = {}
  for name in run.layer_names():
    a = [r["layers"][name]["norm"] for r in run.train if first <= r["step"] <= mid]
    b = [r["layers"][name]["norm"] for r in run.train if mid < r["step"] <= last]
    if a and b:
      out[name] = float(np.mean(b) / np.mean(a) - 1)
  return out


def _window(run: plot_lib.Run) -> tuple[int, int]:
  last = run.train[-1]["step"]
  return math.floor(WINDOW_START * last) + 1, last


# ----------------------------------------------------------------- 1. equilibrium


def equilibrium_lam(method: str, optimizer: str, lr: float, steps: int) -> float:
  """The decay whose time constant puts ``SETTLE * 1.25`` of them before the window: the
  method's ``normreg.theory`` time constant (``Method.theory_time_constant``) is
  inversely proportional to the decay, so it is taken at decay 1 and divided."""
  tau = steps * WINDOW_START / (SETTLE * 1.25)
  config = Config(task="lm", method=method, optimizer=optimizer, lr=lr, lam=1.0,
                  momentum=MOMENTUM)
  return float(f"{methods_lib.get(method).theory_time_constant(config) / tau:.3g}")


def predicted_angle(config: Config) -> Optional[float]:
  """The method's theory angle (``Method.theory_angle``) at the grouped weights' logged
  rate of the first step (rotational's is its target angle, not ``--lr``)."""
  rate = methods_lib.grouped_schedule(config, lambda t: config.lr)(0)
  return methods_lib.get(config.method).theory_angle(config, float(rate))


def muon_layer(name: str) -> bool:
  """Whether Muon orthogonalizes this grouped weight (the norms' scales go to Adam)."""
  return not name.endswith("scale")


def muon_shapes(runner: Runner) -> dict[str, tuple[int, int]]:
  """Each Muon-stepped parameter's matrix as Muon orthogonalizes it, ``(fan-in, fan-out)``
  (``Task.matrix_axes``; the other axes, the heads of q, k and v, are a batch of them)."""
  from optax import contrib  # pylint: disable=g-import-not-at-top
  from normreg import groups  # pylint: disable=g-import-not-at-top
  params = nnx.split(runner.task.create_model(runner.base, runner.dataset), nnx.Param, ...)[1]
  axes = runner.task.matrix_axes(runner.base, params)
  leaf = lambda x: x is None or isinstance(x, contrib.MuonDimensionNumbers)
  out = {}
  for (path, x), (_, dims) in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                  jax.tree_util.tree_flatten_with_path(axes, is_leaf=leaf)[0]):
    if dims is not None:
      size = lambda a: math.prod(x.shape[i] for i in ((a,) if isinstance(a, int) else a))
      out[groups.path_str(path)] = (size(dims.reduction_axis), size(dims.output_axis))
  return out


def _muon_predictions(runner: Runner, names, lr: float, lam: float) -> dict[str, float]:
  """``normreg.theory.equilibrium_angle_muon`` of each weight Muon steps, with ``S`` at its
  own matrix shape (a head of q, k or v is the parameter's slice ``.../q/HEAD``)."""
  shapes, steps = muon_shapes(runner), SIZES[runner.size]["stat_steps"]
  out = {}
  for name in names:
    shape = shapes.get(name) or shapes.get(name.rsplit("/", 1)[0])
    if shape is not None and muon_layer(name):
      out[name] = theory.equilibrium_angle_muon(
          lr, lam, theory.muon_update_statistics(tuple(shape), steps=steps)[1])
  return out


def claim_equilibrium(runner: Runner) -> dict[str, Any]:
  steps = SIZES[runner.size]["equilibrium"]
  out = {}
  for name, (method, optimizer, lr) in EQUILIBRIUM.items():
    lam = equilibrium_lam(method, optimizer, lr, steps)
    config = runner.config(method=method, optimizer=optimizer, lr=lr, lam=lam, steps=steps,
                           eval_every=0, log_every=max(1, steps // 100), seed=0)
    reproduce_lib.check_settles(f"equilibrium_{name}", config, steps, f"--size={runner.size}")
    run = runner.train(f"equilibrium_{name}", config)
    entry = methods_lib.get(method)
    predicted = float(predicted_angle(config))
    measured = _mean_layers(run, *_window(run)) if not cache_lib.diverged(run) else {}
    if optimizer == "muon":  # S at each matrix's shape
      each = _muon_predictions(runner, measured, lr, lam)
    else:
      each = {k: predicted for k in measured}
    ratios = {k: measured[k] / each[k] for k in each}
    out[name] = {"method": method, "optimizer": optimizer, "lr": lr, "lam": lam,
                 "steps": steps, "time_constant": float(entry.theory_time_constant(config)),
                 "predicted": predicted, "predicted_each": each, "measured": measured,
                 "ratios": ratios,
                 "apart": sorted(set(measured) - set(each)),
                 "drift": reproduce_lib.drift(run), "diverged": cache_lib.diverged(run),
                 "drifts": layer_drifts(run) if not cache_lib.diverged(run) else {},
                 "run": os.path.basename(run.workdir),  # (in the runs folder)
                 "bits_per_byte": runner.final_score(run)}
  return out


# ------------------------------------------------------------------ 2. c-rescaling


def claim_rescaling(runner: Runner) -> dict[str, Any]:
  steps = SIZES[runner.size]["rescale"]
  c = RESCALE_C
  out = {}
  for name, (method, optimizer, lr, lam, p, eps) in RESCALE.items():
    def config(scale, rescaled):
      k = scale ** p if rescaled else 1.0
      return runner.config(method=method, optimizer=optimizer, lr=lr * k, lam=lam / k,
                           ungrouped_lr=lr, init_scale=scale, norm_eps=EXACT_EPS,
                           adam_eps=eps, steps=steps, eval_every=0, log_every=steps, seed=0)
    logits = {tag: runner.probe_logits(runner.train(f"rescale_{name}_{tag}", cfg))
              for tag, cfg in (("c1", config(1.0, True)), (f"c{c:g}", config(c, True)),
                               ("control", config(c, False)))}
    scale = np.max(np.abs(logits["c1"]))
    dev = lambda tag: float(np.max(np.abs(logits[tag] - logits["c1"])) / scale)
    out[name] = {"method": method, "optimizer": optimizer, "lr": lr, "lam": lam,
                 "adam_eps": eps, "judged": name in JUDGED_RESCALE,
                 "power": p, "c": c, "steps": steps, "deviation": dev(f"c{c:g}"),
                 "control": dev("control")}
  return out


# ------------------------------------------------------------------- 3. held angle


def claim_held_angle(runner: Runner) -> dict[str, Any]:
  steps = SIZES[runner.size]["hold"]
  out = {}
  for name, (method, lr, lam) in HOLD.items():
    config = runner.config(method=method, optimizer="adam", lr=lr, lam=lam, steps=steps,
                           eval_every=0, log_every=1, seed=0)
    run = runner.train(f"hold_{name}", config)
    diverged = cache_lib.diverged(run)
    early, late = ({}, {}) if diverged else (_mean_layers(run, 1, EARLY),
                                             _mean_layers(run, *_window(run)))
    target = predicted_angle(config) if methods_lib.get(method).sets_angle else None
    out[name] = {"method": method, "lr": lr, "lam": lam, "steps": steps,
                 "target": None if target is None else float(target),
                 "early": early, "late": late,
                 "ratios": {k: early[k] / late[k] for k in early}, "diverged": diverged}
  return out


# -------------------------------------------------------------------- 4. comparison


def compare_method(runner: Runner, name: str) -> dict[str, Any]:
  """Seed 0 over the grid (extended until its best is interior), then every seed."""
  overrides, middle = COMPARED[name]

  def train(lr, seed):
    config = runner.config(**overrides, lr=float(f"{lr:.3g}"), seed=seed)
    return runner.train(f"compare_{name}_lr{config.lr:g}_s{seed}", config)

  tuned = {float(f"{lr:.3g}"): runner.final_score(train(lr, 0))
           for lr in (middle / GRID_RATIO, middle, middle * GRID_RATIO)}
  for _ in range(MAX_EXTENSIONS):
    lrs, best = sorted(tuned), min(tuned, key=tuned.get)
    if lrs[0] < best < lrs[-1]:
      break
    lr = best * GRID_RATIO if best == lrs[-1] else best / GRID_RATIO
    logging.info("reproduce_lm: %s's best lr %g is at the edge of %s; trying %g", name,
                 best, lrs, lr)
    tuned[float(f"{lr:.3g}")] = runner.final_score(train(lr, 0))
  lrs, best = sorted(tuned), min(tuned, key=tuned.get)
  runs = [train(best, seed) for seed in runner.seeds]
  finals = [runner.final_score(r) for r in runs]
  # The mean curve over the seeds that did not diverge, at the steps they all reached.
  curves = [[(t["step"], t["bits_per_byte"]) for t in r.test] for r in runs
            if not cache_lib.diverged(r)] or [[]]
  curves = [c[:min(map(len, curves))] for c in curves]
  return {"grid": {f"{k:g}": v for k, v in sorted(tuned.items())}, "best_lr": best,
          "interior": lrs[0] < best < lrs[-1], "finals": finals,
          "mean": float(np.mean(finals)),
          "stderr": float(np.std(finals, ddof=1) / math.sqrt(len(finals))),
          "curve": [float(np.mean([c[i][1] for c in curves])) for i in range(len(curves[0]))],
          "steps": [s for s, _ in curves[0]], "diverged": any(map(cache_lib.diverged, runs)),
          "runs": [os.path.basename(r.workdir) for r in runs]}


def claim_comparison(runner: Runner) -> dict[str, Any]:
  names = SIZES[runner.size]["methods"] or tuple(COMPARED)
  out = {name: compare_method(runner, name) for name in names}
  target = out["adamw"]["mean"]
  for row in out.values():
    reached = [s for s, v in zip(row["steps"], row["curve"]) if v <= target]
    row["steps_to_adamw"] = reached[0] if reached else None
  return out


# ----------------------------------------------------------------------- verdicts


def verdicts(r: dict[str, Any]) -> dict[str, dict[str, Any]]:
  out = {}
  eq = r["1_equilibrium"]
  worst = {k: max((abs(x - 1) for x in v["ratios"].values()), default=math.inf)
           for k, v in eq.items()}
  settled = {k: abs(v["drift"]) <= MAX_DRIFT for k, v in eq.items()}

  def kinds(v):  # the worst weight of each kind: the matrices, the norms' scales
    parts = []
    for kind, keep in (("matrices", muon_layer), ("norm scales", lambda n: not muon_layer(n))):
      off = [abs(x - 1) for n, x in v["ratios"].items() if keep(n)]
      if off:
        parts.append(f"{kind} {100 * max(off):.1f}%")
    return ", ".join(parts)

  out["1"] = (all(w <= TOLERANCE for w in worst.values()) and all(settled.values()),
              "; ".join(f"{k}: worst {kinds(eq[k])} off, drift {100 * eq[k]['drift']:+.1f}%"
                        for k in eq))
  rs = r["2_rescaling"]
  limits = {"sgd": 1e-6, "adamw": 1e-3, "muon": 1e-3}
  ok = all(rs[k]["deviation"] <= limits[k] and rs[k]["control"] >= 100 * rs[k]["deviation"]
           for k in JUDGED_RESCALE)
  out["2"] = (ok, "; ".join(f"{k}: {rs[k]['deviation']:.1e} (control {rs[k]['control']:.1e})"
                            for k in JUDGED_RESCALE))
  hold = r["3_held_angle"]
  judged = [k for k in hold if k != "adamw"]

  def holds(v):
    early_ok = all(abs(x - 1) <= TOLERANCE for x in v["ratios"].values())
    target_ok = v["target"] is None or all(
        abs(e / v["target"] - 1) <= TOLERANCE for e in v["early"].values())
    return early_ok and target_ok and not v["diverged"]

  out["3"] = (all(holds(hold[k]) for k in judged),
              "; ".join(f"{k}: {'holds' if holds(hold[k]) else 'does not hold'} (steps 1-"
                        f"{EARLY} / last quarter {_span(hold[k]['ratios'].values())})"
                        for k in hold))
  cmp = r["4_comparison"]
  edge = [k for k, v in cmp.items() if not v["interior"] or v["diverged"]]
  out["4"] = (not edge, "every best rate interior" if not edge else
              f"best rate at the grid's edge or diverged: {', '.join(edge)}")
  return {k: {"holds": bool(h), "summary": s} for k, (h, s) in out.items()}


# ------------------------------------------------------------------- the report


def _span(values, sep: str = "-") -> str:
  """``min-max`` of ``values`` to 2 decimals; ``diverged`` if there are none."""
  values = list(values)
  return f"{min(values):.2f}{sep}{max(values):.2f}" if values else "diverged"


def _fmt(x: Optional[float], digits: int = 3) -> str:
  return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}g}"


def write_report(r: dict[str, Any], figures: list[str], path: str) -> None:
  s = SIZES[r["size"]]
  base = os.path.dirname(path)
  held = [k for k, v in r["verdicts"].items() if v["holds"]]
  verdict = lambda k: (f"**Verdict: {'holds' if r['verdicts'][k]['holds'] else 'does not hold'}"
                       f"** ({r['verdicts'][k]['summary']}).")
  lines = [
      "# Reproduction on a language model: weight decay, normalization and Muon", "",
      f"- Command: `{r['command']}`",
      f"- Machine: {r['machine']}; " + ", ".join(f"{k} {v}" for k, v in r["versions"].items())
      + ".",
      f"- Training: {r['train_seconds'] / 60:.1f} minutes for the {r['runs']} runs behind "
      "this report (each timed when it was trained; cached in the workdir).",
      f"- Size **{r['size']}**: {r['data']['source']}, {r['data']['train_bytes']:,} training "
      f"and {r['data']['test_bytes']:,} validation bytes; a byte-level transformer of "
      f"{s['n_layers']} blocks, width {s['d_model']}, {s['n_heads']} heads, QK-norm and "
      f"post-norms ({r['parameters']:,} parameters); sequences of {s['seq_len']} bytes, "
      f"batch {s['batch_size']}.",
      f"- **{len(held)} of {len(r['verdicts'])} verdicts hold.**", "",
      "## 1. Each invariant weight's angle at equilibrium", "",
      f"Criterion: {CRITERIA['1']}.", "",
      "| recipe | lr | decay | time constant (steps) | steps | theory (rad/step) | "
      "measured: min - max over weights | worst | drift |",
      "|---|---|---|---|---|---|---|---|---|"]
  for k, v in r["1_equilibrium"].items():
    ms = list(v["ratios"].values())
    judged = [v["measured"][n] for n in v["ratios"]]
    each = sorted(set(f"{x:.3g}" for x in v["predicted_each"].values()), key=float)
    lines.append(
        f"| {k} ({v['method']}, {v['optimizer']}) | {v['lr']:g} | {v['lam']:g} | "
        f"{v['time_constant']:.0f} | {v['steps']} | {', '.join(each)} | "
        f"{_fmt(min(judged) if judged else None)} - {_fmt(max(judged) if judged else None)}"
        f" | {100 * max((abs(x - 1) for x in ms), default=math.nan):.1f}% | "
        f"{100 * v['drift']:+.1f}% |")
  lines += ["", "Each weight's measured / theory, and (in brackets) how much its own norm "
            "moves across the window (not part of the criterion):", "",
            "| weight | " + " | ".join(r["1_equilibrium"]) + " |",
            "|---|" + "---|" * len(r["1_equilibrium"])]
  names = sorted({n for v in r["1_equilibrium"].values() for n in v["measured"]},
                 key=plot_lib._natural_key)  # pylint: disable=protected-access
  for n in names:
    cells = []
    for v in r["1_equilibrium"].values():
      drift = f" [{100 * v['drifts'][n]:+.0f}%]" if n in v["drifts"] else ""
      if n in v["ratios"]:
        cells.append(f"{v['ratios'][n]:.3f}{drift}")
      elif n in v["measured"]:  # Muon's Adam steps it: against AdamW's angle, not judged
        adamw = theory.equilibrium_angle_adamw(v["lr"], v["lam"], 0.9)
        cells.append(f"({v['measured'][n] / adamw:.3f} of AdamW's: Adam's step){drift}")
      else:
        cells.append("-")
    lines.append(f"| {n} | " + " | ".join(cells) + " |")
  lines += ["", verdict("1"), "",
            f"## 2. The c-rescaling equivalence (c = {RESCALE_C:g})", "",
            f"Criterion: {CRITERIA['2']}.", "",
            "| optimizer | lr, decay at c = 1 | rule | eps of Adam / Muon | steps | max rel. "
            "logit difference | control (rates not rescaled) |",
            "|---|---|---|---|---|---|---|"]
  for k, v in r["2_rescaling"].items():
    rule = f"lr x c^{v['power']}, decay / c^{v['power']}"
    eps = "-" if v["optimizer"] == "sgd" else f"{v['adam_eps']:g}"
    lines.append(f"| {k} ({v['method']}){'' if v['judged'] else ', a diagnostic'} | "
                 f"{v['lr']:g}, {v['lam']:g} | {rule} | {eps} | {v['steps']} "
                 f"| {v['deviation']:.2e} | {v['control']:.2e} |")
  lines += ["", verdict("2"), "", "## 3. The angle from the first step", "",
            f"Criterion: {CRITERIA['3']}.", "",
            f"| method | lr | set angle | steps 1-{EARLY} (mean over weights) | last quarter "
            "| early / late: min - max over weights |", "|---|---|---|---|---|---|"]
  for k, v in r["3_held_angle"].items():
    mean = lambda d: _fmt(float(np.mean(list(d.values()))) if d else None)
    lines.append(f"| {k} ({v['method']}{', the contrast' if k == 'adamw' else ''}) | "
                 f"{v['lr']:g} | {_fmt(v['target'])} | {mean(v['early'])} | {mean(v['late'])}"
                 f" | {_span(v['ratios'].values(), ' - ')} |")
  adamw = r["4_comparison"]["adamw"]
  lines += ["", verdict("3"), "", "## 4. Comparison: validation bits per byte", "",
            f"Criterion: {CRITERIA['4']}.", "",
            f"Every run: {s['compare']} steps; seeds {s['seeds']}; mean and standard error; "
            f"steps to AdamW's final {adamw['mean']:.4f} bits per byte, validated every "
            f"{s['eval_every']} steps.", "",
            "| method | lr grid (seed 0: bits per byte) | best lr | interior | bits per byte "
            "| steps to AdamW's final |", "|---|---|---|---|---|---|"]
  for k, v in sorted(r["4_comparison"].items(), key=lambda kv: kv[1]["mean"]):
    grid = ", ".join(f"{lr}: {b:.3f}" for lr, b in v["grid"].items())
    lines.append(f"| {k} | {grid} | {v['best_lr']:g} | {'yes' if v['interior'] else 'no'} | "
                 f"{v['mean']:.4f} ± {v['stderr']:.4f} | {v['steps_to_adamw'] or 'not reached'}"
                 " |")
  lines += ["", verdict("4"), "", "## Figures", ""]
  lines += [f"![{os.path.basename(p)}]({os.path.relpath(p, base)})" for p in figures]
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def make_figures(runner: Runner, r: dict[str, Any], out: str) -> list[str]:
  """Claim 1's per-weight angles with their theory, and claim 4's validation curves."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  os.makedirs(out, exist_ok=True)
  paths = []
  runs = [plot_lib.read_run(os.path.join(runner.workdir, v["run"]),
                            label_keys=("method", "optimizer", "lam"))
          for v in r["1_equilibrium"].values()]
  labels = list(r["1_equilibrium"])
  colors = plot_lib._colors(len(runs))  # pylint: disable=protected-access
  theories = [plot_lib.theory_lines(run) for run in runs]
  for lines, v, run in zip(theories, r["1_equilibrium"].values(), runs):
    if v["optimizer"] == "muon" and "angle" in lines:  # S at each matrix's own shape
      each = v["predicted_each"]
      label = (r"$\theta^* = \sqrt{2\eta\,wd/S}$, $S$ at each matrix's shape: "
               f"{min(each.values()):.3g}-{max(each.values()):.3g} rad")
      steps = lines.pop("angle").steps
      lines.update({("angle", n): plot_lib.TheoryLine("angle", steps, [each[n]] * len(steps),
                                                      label) if n in each else None
                    for n in run.layer_names()})
  for key, title in (("angle", "angle per step (rad)"), ("norm", "weight norm"),
                     ("elr", "effective learning rate")):
    fig = plot_lib.layer_figure(runs, plot_lib.select_layers(runs), key,
                                f"Claim 1: {title} of each invariant weight", True, labels,
                                colors, theories)
    paths.append(os.path.join(out, f"equilibrium_{key}.png"))
    FigureCanvasAgg(fig)
    fig.savefig(paths[-1], dpi=70)
  fig = Figure(figsize=(7, 5))
  ax = fig.add_subplot()
  for k, v in r["4_comparison"].items():
    ax.plot(v["steps"], v["curve"], marker="o", ms=3, label=f"{k} (lr {v['best_lr']:g})")
  ax.set_xlabel("step")
  ax.set_ylabel("validation bits per byte")
  ax.set_title("Claim 4: each method at its best rate (mean over seeds)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  paths.append(os.path.join(out, "comparison.png"))
  FigureCanvasAgg(fig)
  fig.savefig(paths[-1], dpi=80)
  return paths


def run(size: str, workdir: str, report_dir: str, command: str = "") -> dict[str, Any]:
  """Trains (or reads back) every run of ``size``; writes the report; returns the numbers."""
  if size not in SIZES:
    raise errors.InputError(f"--size={size!r} is not one of {', '.join(SIZES)}.")
  start = time.perf_counter()
  runner = Runner(size, workdir)
  results: dict[str, Any] = {"size": size, "command": command, **cache_lib.environment()}
  results["data"] = runner.task.describe(runner.dataset)
  graphdef_params = nnx.split(runner.task.create_model(runner.base, runner.dataset),
                              nnx.Param, ...)[1]
  results["parameters"] = int(sum(x.size for x in jax.tree.leaves(graphdef_params)))
  results["1_equilibrium"] = claim_equilibrium(runner)
  results["2_rescaling"] = claim_rescaling(runner)
  results["3_held_angle"] = claim_held_angle(runner)
  results["4_comparison"] = claim_comparison(runner)
  results["verdicts"] = verdicts(results)
  os.makedirs(report_dir, exist_ok=True)
  figures = make_figures(runner, results, os.path.join(report_dir, "figures"))
  cache_lib.write_json(results, runner, os.path.join(report_dir, "results.json"))
  write_report(results, figures, os.path.join(report_dir, "RESULTS.md"))
  logging.info("reproduce_lm: %.0f s", time.perf_counter() - start)
  return results


# ----------------------------------------------------------------- command line


def define_flags() -> None:
  flags.DEFINE_enum("size", "tiny", list(SIZES), "tiny (a test of the code, a minute on a "
                    "CPU), cpu (under an hour on 2 cores), large (the accelerator's).")
  flags.DEFINE_string("workdir", "runs/reproduce_lm", "Where the runs go (cached: a finished "
                      "run is not trained again).")
  flags.DEFINE_string("report_dir", None, "Where RESULTS.md, results.json and figures/ go; "
                      "default WORKDIR/SIZE/report. The committed report is written with "
                      "--report_dir=experiments/lm.")


def main(argv) -> None:
  fl = flags.FLAGS
  with errors.one_line("experiments.reproduce_lm"):
    if len(argv) > 1:
      raise errors.InputError(f"unexpected arguments: {argv[1:]}")
    command = "python -m experiments.reproduce_lm " + " ".join(
        a for a in argv[1:] + [f"--size={fl.size}"])
    report_dir = cache_lib.report_dir_for(fl.workdir, fl.size, fl.report_dir)
    results = run(fl.size, os.path.join(fl.workdir, fl.size), report_dir, command=command)
  print(json.dumps(results["verdicts"], indent=1))
  print(f"report: {os.path.join(report_dir, 'RESULTS.md')}")


if __name__ == "__main__":
  define_flags()
  app.run(main)

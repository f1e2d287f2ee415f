"""Reproduce van Laarhoven (2017) on real images and check it against normreg.theory.

``python -m experiments.reproduce --size=smoke|medium|long|full [--data_dir=DIR]
[--report_dir=DIR]`` trains the runs below through the launcher's
``train_and_evaluate``, writes ``RESULTS.md``, ``results.json`` and PNG figures
into ``--report_dir`` (default ``WORKDIR/SIZE/report``; the committed report is
written with ``--report_dir=experiments``), and returns the numbers as a dict
(``run(...)``), so that the smoke size is checked as a test
(``tests/test_reproduce.py``).

Claims, one section each; every criterion is fixed in :data:`CRITERIA` and
printed in the report before the numbers:

1. invariance: output and loss unchanged when grouped weights are rescaled,
   measured on trained networks of every norm kind;
2. no regularizing effect: SGD+L2 recipes with equal ``eta*lam`` (the
   ungrouped parameters at one common rate) reach equal accuracy, and their
   equilibrium norms scale as ``(eta/lam)^(1/4)``;
3. effective learning rate: the angle per step at equilibrium against
   ``normreg.theory`` for SGD+L2 with and without momentum, SGDW and AdamW,
   three recipes each; and Adam's ``eta/||w||`` still depends on the decay;
4. without L2 the norm grows and the effective learning rate decays, from a
   start set by the initial scale;
5. the fix: spherical SGD, tuned over one learning rate (the rate mapped from
   the best SGD+L2 recipe's equilibrium, x3 and /3; the ungrouped parameters
   keep that recipe's rate, ``--ungrouped_lr``), reaches the best SGD+L2
   accuracy with no ``lam``;
6. the same on the WeightNorm network;
7. BatchNorm's gamma and beta: scaling an inner layer's pair leaves the output
   unchanged (ReLU and a normalized layer follow), the last one's does not;
   and what L2 on them does to accuracy;
8. exact equivalence, from step 0: ``(eta, lam, w0)`` and
   ``(c^2 eta, lam/c^2, c w0)`` (``c = 2, 1/2``) train the same network;
9. weight decay is an exponentially growing learning rate (Li & Arora 2019):
   SGD + L2 and its twin without L2 (``--method=exp_lr``) train the same
   network, to float rounding, with and without momentum.

Every L2, SGDW and AdamW recipe must train for at least :data:`SETTLE` time
constants (``normreg.theory.time_constant_*``) before the measurement window,
the last quarter of the steps; :func:`check_settles` refuses any that would not
(an error naming the recipe and the steps it needs), so that no size reports a
transient as an equilibrium. Each size scales the decay coefficients of all
recipes by one factor (``decay_scale``) so that this holds.

Data: the CIFAR-10 JPEG copy (``--data_dir``, default ``$NORMREG_CIFAR10_DIR``);
without it, random images (only the smoke size allows that, as a test of the
code).
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
    # train/test images, CNN width, epochs, batch, seeds for accuracy comparisons, and the
    # factor on every recipe's decay that keeps SETTLE time constants before the window.
    # smoke is a test of the code: its norms are not checked for stationarity (max_drift).
    "smoke": dict(train_size=512, test_size=256, width=4, epochs=3, batch_size=32, seeds=1,
                  decay_scale=32, max_drift=None),
    "medium": dict(train_size=4000, test_size=2000, width=16, epochs=6, batch_size=128,
                   seeds=2, decay_scale=8, max_drift=0.05),
    "long": dict(train_size=20000, test_size=5000, width=8, epochs=5, batch_size=64, seeds=3,
                 decay_scale=1, max_drift=0.05),
    "full": dict(train_size=None, test_size=None, width=64, epochs=30, batch_size=128,
                 seeds=3, decay_scale=1, max_drift=0.05),
}
MOMENTUM = 0.9
# Time constants a decay recipe trains before the measurement window, the last quarter,
# and the largest relative change of its mean unit norm across the window (first half
# against second): a run still settling is refused, whatever its time constant says.
SETTLE = 4
WINDOW_START = 0.75
# (lr, lam) at decay_scale 1. SGD momentum 0.9 with coupled L2, ungrouped parameters at
# UNGROUPED_LR: the first three share eta*lam; the last two have 1/4 and 4 times it.
L2_RECIPES = [(0.2, 1e-3), (0.1, 2e-3), (0.05, 4e-3), (0.1, 5e-4), (0.1, 8e-3)]
UNGROUPED_LR = 0.1
BASE = L2_RECIPES[1]
# Claim 3's other families, one seed each: plain SGD with coupled L2 (lam), SGDW and
# AdamW (decoupled wd, multiplied by the learning rate).
L2_PLAIN_RECIPES = [(0.1, 5e-3), (0.1, 1e-2), (0.2, 1e-2)]
SGDW_RECIPES = [(0.1, 1e-2), (0.1, 2e-2), (0.2, 2e-2)]
# AdamW starts ~20x above its equilibrium ||w||^2 and closes the gap by one e-fold per
# time constant: (1e-3, 2.0), tau = 250, was still settling after 1560 steps (norm -6% across
# its window), so the first recipe is (1e-3, 4.0), tau = 125.
ADAMW_RECIPES = [(1e-3, 4.0), (3e-3, 1.0), (3e-3, 2.0)]
# Spherical SGD's learning rates: the mapped eta_s times these (claims 5 and 6 tune one number).
SPHERICAL_LR_FACTORS = (3.0, 1.0, 1 / 3)
# Claims 8 and 9: the normalizations' epsilon that makes them exactly invariant (the default
# 1e-5 breaks invariance at about eps/var), the scale factors c, the steps whose logits are
# compared before rounding is amplified, and the control's perturbation (one float32 ulp).
EXACT_EPS = 1e-30
EQUIVALENCE_SCALES = (2.0, 0.5)
EARLY_STEPS = 5
ULP = float(np.nextafter(np.float32(1), np.float32(2)))
PROBE_IMAGES = 256
PROBE_FILE = "probe_logits.npz"

# The pass criteria, fixed before any number is seen; the report prints them first.
CRITERIA = {
    "1": "holds if rescaling every grouped unit by a random factor in [0.25, 4] changes the "
         "logits of every trained network by less than 1e-3 (relative to their largest).",
    "2": "holds if the three recipes with equal eta*lam reach test accuracies within two "
         "standard errors of each other (max - min against 2 s.e. of a difference of two "
         "means, at least 3 seeds at the long size), and the equilibrium norm ratio of the "
         "first to the third is within 10% of (eta/lam)^(1/4), the theory's 2.",
    "3": "holds if every measured angle per step (last quarter, mean over layers) is within "
         "15% of normreg.theory, for SGD+L2 with momentum (5 recipes), without momentum, "
         "SGDW and AdamW (3 recipes each).",
    "3b": "holds if AdamW's eta/||w|| at equal eta differs between wd and 2*wd by a factor "
          "within 15% of sqrt(2) (||w||^2 = eta*C/(2*wd) at equilibrium).",
    "4": "holds if without L2 the norm grows and eta/||w||^2 falls over the run, and the "
         "run started from 4x larger weights ends with less than half the effective lr.",
    "5": "holds if the best spherical SGD rate (one hyperparameter) reaches the best SGD+L2 "
         "recipe's accuracy (two) within two standard errors of the difference.",
    "6": "as 5, on the WeightNorm network.",
    "7": "holds if scaling an inner BatchNorm's (gamma, beta) by 3 changes the logits by "
         "less than 1e-3 and scaling the last one's by more than 1e-2.",
    "8": "holds if, with the normalizations' eps at 1e-30, the max relative difference of "
         "the logits of a fixed batch is below 1e-6 at every logged step and the test "
         "accuracy is identical, for c = 2 and c = 1/2.",
    "9": "holds if, with eps at 1e-30, the twin's logits differ from the L2 run's by less "
         "than 1e-5 after the first step (float32 rounding; a schedule off by one factor "
         "alpha is off by about eta*lam_wd, 4e-4 and 1e-3 here), with and without momentum. "
         "Later steps are shown beside a control, the L2 run from weights multiplied by "
         "1 + 2^-23: once any difference has been amplified to O(0.1) by the chaotic "
         "training map, no comparison can resolve the identity.",
}


# ------------------------------------------------------------------- time constants


class TooShortError(errors.InputError):
  """A decay recipe would be measured before it reaches its equilibrium."""


def time_constant(config: Config) -> Optional[float]:
  """``normreg.theory``'s time constant (steps) of ``config``'s decay; ``None`` without one.

  SGD + coupled L2: ``(1-mu)/(4 eta lam_wd)``, ``lam_wd = 2 lam``; SGDW:
  ``1/(4 eta wd)``; AdamW: ``1/(2 eta wd)``. Adam with coupled L2 has no closed
  form (Adam divides the decay by the gradient's scale), so it is refused.
  """
  lam = config.lam_value
  if config.method not in ("l2", "decoupled") or lam == 0:
    return None
  if config.method == "l2":
    if config.optimizer != "sgd":
      raise TooShortError("Adam with coupled L2 has no closed-form time constant in "
                          "normreg.theory; use --method=decoupled (AdamW) for an equilibrium "
                          "claim.")
    return theory.time_constant_sgd(config.lr, 2 * lam, config.momentum)
  if config.optimizer == "sgd":
    return theory.time_constant_sgdw(config.lr, lam)
  return theory.time_constant_adamw(config.lr, lam)


def steps_needed(tau: float) -> int:
  """Steps for ``SETTLE`` time constants before the window, the last quarter."""
  return math.ceil(SETTLE * tau / WINDOW_START)


def check_settles(name: str, config: Config, total_steps: int, where: str) -> None:
  """Raises :class:`TooShortError` naming ``name`` if its equilibrium is out of reach.

  ``where`` says what gives ``total_steps`` (``"--size=long"``, a run folder).
  """
  tau = time_constant(config)
  if tau is not None and total_steps < steps_needed(tau):
    raise TooShortError(
        f"recipe {name} (--method={config.method} --optimizer={config.optimizer} "
        f"--lr={config.lr} --lam={config.lam_value} --momentum={config.momentum}) has a time "
        f"constant of {tau:.0f} steps (normreg.theory); measuring its equilibrium needs "
        f"{SETTLE} of them before the last quarter, {steps_needed(tau)} steps, but "
        f"{where} trains {total_steps}.")


# ------------------------------------------------------------------------ runs


def _name(prefix: str, lr: float, lam: Optional[float] = None) -> str:
  return f"{prefix}_lr{lr:g}" + ("" if lam is None else f"_lam{lam:g}")


class Runner(cache_lib.RunCache):
  """The reproduction's runs at one size: its base Config, seeds and decay scale, and
  :func:`check_settles` on every decay recipe it trains."""

  def __init__(self, size: str, workdir: str, dataset: data_lib.Dataset,
               data_dir: Optional[str]):
    s = SIZES[size]
    steps_per_epoch = dataset.train_images.shape[0] // s["batch_size"]
    base = Config(dataset="folder", data_dir=data_dir or "random", model="cnn", norm="batch",
                  width=s["width"], epochs=s["epochs"], batch_size=s["batch_size"],
                  train_size=s["train_size"], test_size=s["test_size"], momentum=MOMENTUM,
                  log_every=max(1, steps_per_epoch // 8))
    super().__init__(workdir, dataset, base, range(s["seeds"]))
    self.size, self.decay_scale = size, s["decay_scale"]
    mean, std = data_lib.channel_stats(dataset.train_images)
    self.probe = data_lib.normalize(jnp.asarray(dataset.test_images[:PROBE_IMAGES]), mean, std)

  def lam(self, lam: float) -> float:
    """A recipe's decay at this size (``decay_scale`` times the table's)."""
    return float(f"{lam * self.decay_scale:.6g}")

  def check(self, name: str, config: Config) -> None:
    check_settles(name, config, self.total_steps, f"--size={self.size}")

  def train(self, name: str, config: Config, probe: bool = False,
            settle: bool = True) -> plot_lib.Run:
    """Trains ``config`` into ``workdir/name`` unless already there.

    ``probe`` also saves the training-mode logits of the probe batch at steps
    0..EARLY_STEPS and every logged step. ``settle=False`` is for the exact
    claims (8, 9), which hold from step 0 and measure no equilibrium; every
    other decay recipe must pass :func:`check_settles`.
    """
    if settle:
      self.check(name, config)
    if not probe:
      return super().train(name, config)
    return super().train(name, config, extra_files=[PROBE_FILE],
                         on_step=lambda path: _ProbeRecorder(self, config, path))


class _ProbeRecorder:
  """``on_step`` callback: the training-mode logits of the probe batch at chosen steps."""

  def __init__(self, runner: Runner, config: Config, workdir: str):
    model = trainer.create_model(config, runner.dataset.num_classes,
                                 runner.dataset.train_images.shape[-1])
    graphdef = nnx.split(model, nnx.Param, ...)[0]
    probe = runner.probe
    self.forward = jax.jit(lambda p, r: nnx.merge(graphdef, p, r, copy=True)(probe))
    self.every, self.epoch = config.log_every, runner.steps_per_epoch
    self.path = os.path.join(workdir, PROBE_FILE)
    self.steps: list[int] = []
    self.logits: list[np.ndarray] = []

  def __call__(self, step: int, state: trainer.TrainState) -> None:
    if step <= EARLY_STEPS or step % self.every == 0 or step % self.epoch == 0:
      self.steps.append(step)
      self.logits.append(np.asarray(self.forward(state.params, state.rest)))

  def save(self) -> None:
    np.savez(self.path, steps=np.asarray(self.steps), logits=np.stack(self.logits))


def _probe(run: plot_lib.Run) -> tuple[np.ndarray, np.ndarray]:
  with np.load(os.path.join(run.workdir, PROBE_FILE)) as f:
    return f["steps"], f["logits"]


diverged = cache_lib.diverged
final_accuracy = cache_lib.final_accuracy
_acc = cache_lib.accuracy


def _tail_mean(runs: list[plot_lib.Run], key: str, settled: bool = True) -> float:
  """:func:`_tail` averaged over the runs that did not diverge (NaN if none)."""
  values = [_tail(r, key, settled) for r in runs if not diverged(r)]
  return float(np.mean(values)) if values else float("nan")


def _window(run: plot_lib.Run) -> list[dict[str, Any]]:
  """The train records of the measurement window: the last quarter of the steps."""
  last = run.train[-1]["step"]
  return [r for r in run.train if r["step"] > WINDOW_START * last]


def drift(run: plot_lib.Run) -> float:
  """Relative change of the mean unit norm from the first to the second half of the window;
  NaN for a diverged run or one with no records in either half."""
  if diverged(run) or not run.train:
    return float("nan")
  last = run.train[-1]["step"]
  mid = (1 + WINDOW_START) / 2 * last
  norm = lambda r: np.mean([l["norm"] for l in r["layers"].values()])
  first = [norm(r) for r in _window(run) if r["step"] <= mid]
  second = [norm(r) for r in _window(run) if r["step"] > mid]
  if not first or not second:
    return float("nan")
  return float(np.mean(second) / np.mean(first) - 1)


def check_stationary(run: plot_lib.Run) -> None:
  """Raises :class:`TooShortError` if a decay recipe's norm still moves across its window
  by more than its size's ``max_drift``."""
  config = Config.from_dict(run.config)
  size = next((k for k, v in SIZES.items() if v["width"] == config.width
               and v["epochs"] == config.epochs), None)
  max_drift = SIZES[size]["max_drift"] if size else 0.05
  if time_constant(config) is None or max_drift is None:
    return
  d = drift(run)
  if np.isnan(d) and not diverged(run):
    raise TooShortError(f"the run in {run.workdir} has too few records in its measurement "
                        "window to tell whether it settled; log more often (--log_every).")
  if abs(d) > max_drift:
    raise TooShortError(
        f"the run in {run.workdir} (--method={config.method} --optimizer={config.optimizer} "
        f"--lr={config.lr} --lam={config.lam_value}) is still settling: its mean unit norm "
        f"changes by {100 * d:+.1f}% across the measurement window (at most "
        f"{100 * max_drift:.0f}%); train it longer or raise eta*lam.")


def _tail(run: plot_lib.Run, key: str, settled: bool = True) -> float:
  """Mean over layers and over the measurement window. Refuses a decay recipe too short for
  its time constant, or (``settled``) whose norm still moves across the window."""
  check_settles(run.workdir, Config.from_dict(run.config), run.train[-1]["step"],
                f"the run in {run.workdir}")
  if settled:
    check_stationary(run)
  return float(np.mean([np.mean([l[key] for l in r["layers"].values()])
                        for r in _window(run)]))


def _series(run: plot_lib.Run, key: str) -> tuple[np.ndarray, np.ndarray]:
  steps = np.array([r["step"] for r in run.train])
  return steps, np.array([np.mean([l[key] for l in r["layers"].values()]) for r in run.train])


# --------------------------------------------------------------------- claims


def check_recipes(runner: Runner) -> None:
  """Every decay recipe of every claim against :func:`check_settles`, before any training."""
  def cfg(**kw):
    return runner.config(**kw)

  s = runner.lam
  for lr, lam in L2_RECIPES:
    runner.check(_name("l2", lr, s(lam)), cfg(method="l2", lr=lr, lam=s(lam)))
  for recipes in effective_lr_recipes(runner).values():
    for _, name, config in recipes:
      runner.check(name, config)


def claim_invariance(runner: Runner, trained: dict[str, plot_lib.Run]) -> dict[str, Any]:
  """Max relative change of logits and loss when grouped weights are rescaled."""
  x = runner.probe
  y = jnp.asarray(runner.dataset.test_labels[:PROBE_IMAGES])
  rng = np.random.default_rng(0)
  out = {}
  for norm, run in trained.items():
    graphdef, params, rest = runner.model_of(run)
    forward = jax.jit(lambda p: nnx.merge(graphdef, p, rest, copy=True)(x))
    groups = trainer.find_groups(Config.from_dict(run.config), graphdef, params, rest, x[:64])

    scaled = normreg.rescale_groups(params, groups, lambda shape: rng.uniform(0.25, 4.0, shape))
    a, b = forward(params), forward(scaled)
    loss = lambda logits: float(trainer.cross_entropy(logits, y))
    out[norm] = {"logits_rel_change": float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a))),
                 "loss": loss(a), "loss_change": abs(loss(a) - loss(b)),
                 "grouped_leaves": len([g for g in jax.tree.leaves(groups) if g is not None])}
  return out


def _l2_key(lr: float, lam: float) -> str:
  return f"lr={lr:g}, lam={lam:g}"


def l2_recipe_runs(runner: Runner, lr: float, lam: float,
                   **overrides) -> list[tuple[str, Config]]:
  """``(run name, config)`` of the seeds of one SGD+L2 recipe of claim 2 (``lam`` already
  scaled)."""
  return runner.seed_runs(_name("l2", lr, lam), method="l2", lr=lr, lam=lam,
                          ungrouped_lr=UNGROUPED_LR, **overrides)


def l2_runs(runner: Runner, lr: float, lam: float, **overrides) -> list[plot_lib.Run]:
  """The seeds of one SGD+L2 recipe of claim 2 (``lam`` already scaled)."""
  return [runner.train(n, c) for n, c in l2_recipe_runs(runner, lr, lam, **overrides)]


def claim_no_regularization(runner: Runner) -> dict[str, Any]:
  out = {}
  for lr, lam in L2_RECIPES:
    lam = runner.lam(lam)
    runs = l2_runs(runner, lr, lam)
    mean, std = _acc(runs)
    out[_l2_key(lr, lam)] = {
        "lr": lr, "lam": lam, "eta_lam": lr * lam, "acc": mean, "acc_std": std,
        "angle": _tail_mean(runs, "angle"), "norm": _tail_mean(runs, "norm"),
        # eta/||w||^2 at the mean unit norm (constant schedule): bounded, where the mean
        # of eta/||w_u||^2 over units is dominated by units that died under the decay.
        "elr": lr / _tail_mean(runs, "norm") ** 2, "diverged": sum(map(diverged, runs)),
        "drift": float(np.nanmax(np.abs([drift(r) for r in runs] + [0.0]))),
        "time_constant": time_constant(runner.config(method="l2", lr=lr, lam=lam))}
  return out


def _angle_record(run: plot_lib.Run, predicted: float, tau: float) -> dict[str, float]:
  measured = _tail_mean([run], "angle")
  return {"measured": measured, "predicted": predicted, "ratio": measured / predicted,
          "time_constant": tau, "steps": run.train[-1]["step"] if run.train else 0,
          "elr": _tail_mean([run], "elr"), "norm": _tail_mean([run], "norm"),
          "acc": final_accuracy(run), "diverged": diverged(run), "drift": drift(run)}


def effective_lr_recipes(runner: Runner) -> dict[str, list[tuple[str, str, Config]]]:
  """Claim 3's runs beyond claim 2's, one seed each: family (``sgd`` without momentum,
  ``sgdw``, ``adamw``) -> ``[(key in the results, run name, config)]``."""
  s = runner.lam
  return {
      "sgd": [(_l2_key(lr, s(lam)), _name("sgd_plain", lr, s(lam)),
               runner.config(method="l2", lr=lr, lam=s(lam), momentum=0.0))
              for lr, lam in L2_PLAIN_RECIPES],
      "sgdw": [(f"lr={lr:g}, wd={s(wd):g}", _name("sgdw", lr, s(wd)),
                runner.config(method="decoupled", lr=lr, lam=s(wd)))
               for lr, wd in SGDW_RECIPES],
      "adamw": [(f"lr={lr:g}, wd={s(wd):g}", _name("adamw", lr, s(wd)),
                 runner.config(method="decoupled", optimizer="adam", lr=lr, lam=s(wd)))
                for lr, wd in ADAMW_RECIPES]}


def claim_effective_lr(runner: Runner, l2: dict[str, Any]) -> dict[str, Any]:
  """Measured vs predicted equilibrium angle for four recipe families, and AdamW's eta/||w||."""
  out: dict[str, Any] = {"sgd_momentum": {}, "sgd": {}, "sgdw": {}, "adamw": {}}
  for key, rec in l2.items():
    predicted = theory.equilibrium_angle_sgd(rec["lr"], 2 * rec["lam"], MOMENTUM)
    out["sgd_momentum"][key] = {"measured": rec["angle"], "predicted": predicted,
                                "ratio": rec["angle"] / predicted,
                                "time_constant": rec["time_constant"], "drift": rec["drift"]}
  predicted = {"sgd": lambda c: theory.equilibrium_angle_sgd(c.lr, 2 * c.lam, 0.0),
               "sgdw": lambda c: theory.equilibrium_angle_sgdw(c.lr, c.lam, MOMENTUM),
               "adamw": lambda c: theory.equilibrium_angle_adamw(c.lr, c.lam, 0.9)}
  for family, recipes in effective_lr_recipes(runner).items():
    for key, name, config in recipes:
      out[family][key] = _angle_record(runner.train(name, config), predicted[family](config),
                                       time_constant(config))
  # AdamW at equal eta, wd and 2*wd: eta/||w|| ~ sqrt(eta*wd) at equilibrium.
  (lr_a, wd_a), (lr_b, wd_b) = ADAMW_RECIPES[1], ADAMW_RECIPES[2]
  a = out["adamw"][f"lr={lr_a:g}, wd={runner.lam(wd_a):g}"]
  b = out["adamw"][f"lr={lr_b:g}, wd={runner.lam(wd_b):g}"]
  out["adam_elr"] = {"elr_ratio": b["elr"] / a["elr"], "predicted": math.sqrt(wd_b / wd_a),
                     "elr": [a["elr"], b["elr"]], "norm": [a["norm"], b["norm"]]}
  return out


def claim_growth_without_l2(runner: Runner) -> dict[str, Any]:
  out = {}
  for scale in (1.0, 4.0):
    run = runner.train(f"none_init{scale:g}", runner.config(method="none", lr=0.1,
                                                           init_scale=scale))
    _, norms = _series(run, "norm")
    _, elrs = _series(run, "elr")
    out[f"init_scale={scale:g}"] = {"norm_first": float(norms[0]),
                                    "norm_last": float(norms[-1]),
                                    "elr_first": float(elrs[0]), "elr_last": float(elrs[-1]),
                                    "acc": final_accuracy(run)}
  return out


def claim_spherical(runner: Runner, l2: dict[str, Any], norm: str = "batch") -> dict[str, Any]:
  """Spherical SGD (no lam) on a 1-D lr grid around the best L2 recipe's mapped eta_s.

  ``eta_s`` = the equilibrium ``eta/||w||^2`` of the best L2 recipe
  (``normreg.theory.spherical_learning_rate``); the grid is ``eta_s`` times
  ``SPHERICAL_LR_FACTORS``. The parameters outside the groups keep the L2
  recipe's ungrouped rate. The claim compares the best of this one
  hyperparameter with the best of the L2 recipes' two.
  """
  best_key = max(l2, key=lambda k: l2[k]["acc"])
  best = l2[best_key]
  # theory.spherical_learning_rate(eta, lam_wd, G, mu) = eta/||w_eq||^2: with G
  # estimated from the run's equilibrium norm it is the measured effective lr.
  grad_norm = best["norm"] ** 2 * math.sqrt(2 * 2 * best["lam"] * (1 - MOMENTUM) / best["lr"])
  eta_s = theory.spherical_learning_rate(best["lr"], 2 * best["lam"], grad_norm, MOMENTUM)
  grid, mapped_runs, mapped = {}, None, None
  for factor in SPHERICAL_LR_FACTORS:
    overrides = dict(method="spherical", lr=float(f"{eta_s * factor:.5g}"), norm=norm,
                     ungrouped_lr=UNGROUPED_LR)
    runs = runner.seeds_of(_name(f"spherical_{norm}", overrides["lr"]), **overrides)
    mean, std = _acc(runs)
    grid[overrides["lr"]] = {"acc": mean, "acc_std": std, "angle": _tail_mean(runs, "angle"),
                             "diverged": sum(map(diverged, runs))}
    if factor == 1.0:
      mapped_runs, mapped = runs, overrides
  best_lr = max(grid, key=lambda lr: grid[lr]["acc"])
  at_mapped = grid[mapped["lr"]]
  return {"overrides": mapped, "best_l2": best_key, "best_l2_acc": best["acc"],
          "best_l2_acc_std": best["acc_std"],
          "eta_s": eta_s, "spherical_acc": at_mapped["acc"],
          "spherical_acc_std": at_mapped["acc_std"],
          "spherical_norm": _tail_mean(mapped_runs, "norm"), "spherical_angle": at_mapped["angle"],
          "predicted_angle": theory.equilibrium_angle_sgd(best["lr"], 2 * best["lam"], MOMENTUM),
          "lr_grid": {str(lr): g for lr, g in grid.items()},
          "best_lr": best_lr, "best_acc": grid[best_lr]["acc"],
          "best_acc_std": grid[best_lr]["acc_std"]}


def claim_weight_norm(runner: Runner) -> dict[str, Any]:
  # The same five recipes as claim 2: L2 tuned over its two hyperparameters. (A first long
  # run used only the three with equal eta*lam; spherical SGD then beat the best by 0.107.)
  # Accuracy is compared, no equilibrium: the norms and angles are shown unchecked.
  l2 = {}
  for lr, lam in L2_RECIPES:
    lam = runner.lam(lam)
    runs = runner.seeds_of(_name("wn_l2", lr, lam), method="l2", lr=lr, lam=lam,
                           norm="weight", ungrouped_lr=UNGROUPED_LR)
    mean, std = _acc(runs)
    l2[_l2_key(lr, lam)] = {"lr": lr, "lam": lam, "acc": mean, "acc_std": std,
                            "norm": _tail_mean(runs, "norm", settled=False),
                            "angle": _tail_mean(runs, "angle", settled=False),
                            "diverged": sum(map(diverged, runs))}
  return {"l2": l2, "spherical": claim_spherical(runner, l2, norm="weight")}


def claim_gamma_beta(runner: Runner, bn_run: plot_lib.Run) -> dict[str, Any]:
  graphdef, params, rest = runner.model_of(bn_run)
  forward = jax.jit(lambda p: nnx.merge(graphdef, p, rest, copy=True)(runner.probe))
  ref = forward(params)

  def scaled(layer, a):
    return jax.tree_util.tree_map_with_path(
        lambda path, w: w * a if normreg.groups.path_str(path) in (
            f"norms/{layer}/scale", f"norms/{layer}/bias") else w, params)

  change = {layer: float(jnp.max(jnp.abs(forward(scaled(layer, 3.0)) - ref))
                         / jnp.max(jnp.abs(ref))) for layer in range(6)}
  rules = r"convs/\d+/kernel=unit,norms/\d+/(scale|bias)=tensor,.*=none"
  lr, lam = BASE[0], runner.lam(BASE[1])
  runs = runner.seeds_of("l2_on_gamma_beta", method="l2", lr=lr, lam=lam, group_rules=rules,
                         ungrouped_lr=UNGROUPED_LR)
  return {"output_change_when_scaling_layer": change,
          "acc_l2_on_gamma_beta": _acc(runs), "acc_baseline": _acc(l2_runs(runner, lr, lam))}


def _deviation(a: plot_lib.Run, b: plot_lib.Run) -> tuple[list[int], list[float]]:
  """Steps and max |logits_a - logits_b| / max |logits_a| of two probe runs."""
  steps_a, logits_a = _probe(a)
  steps_b, logits_b = _probe(b)
  if list(steps_a) != list(steps_b):
    raise ValueError(f"{a.workdir} and {b.workdir} recorded other steps")
  dev = np.max(np.abs(logits_a - logits_b), axis=(1, 2)) / np.max(np.abs(logits_a), axis=(1, 2))
  return [int(s) for s in steps_a], [float(d) for d in dev]


def claim_equivalence(runner: Runner) -> dict[str, Any]:
  """``(eta, lam, w0)`` vs ``(c^2 eta, lam/c^2, c w0)``, ungrouped parameters at one rate."""
  lr, lam = BASE[0], runner.lam(BASE[1])

  def recipe(c, eps):
    return runner.config(method="l2", lr=lr * c * c, lam=lam / (c * c), init_scale=c,
                         ungrouped_lr=UNGROUPED_LR, norm_eps=eps, seed=0)

  tag = {EXACT_EPS: "eps0", None: "eps_default"}
  base = {eps: runner.train(f"equiv_c1_{tag[eps]}", recipe(1.0, eps), probe=True, settle=False)
          for eps in (EXACT_EPS, None)}
  out = {}
  for c in EQUIVALENCE_SCALES:
    for eps in (EXACT_EPS, None):
      run = runner.train(f"equiv_c{c:g}_{tag[eps]}", recipe(c, eps), probe=True,
                         settle=False)
      steps, dev = _deviation(base[eps], run)
      out[f"c={c:g}, {'eps=1e-30' if eps else 'eps=1e-5 (default)'}"] = {
          "c": c, "exact_eps": eps is not None, "lr": lr * c * c, "lam": lam / (c * c),
          "steps": steps, "deviation": dev, "max_deviation": max(dev),
          "acc": final_accuracy(run), "acc_base": final_accuracy(base[eps])}
  return out


def claim_exponential_lr(runner: Runner) -> dict[str, Any]:
  """SGD + L2 against its twin without L2 (``--method=exp_lr``) and a one-ulp control."""
  out = {}
  # The recipes' own lam (no decay_scale): an exact claim needs no equilibrium, and with
  # momentum the twin exists only for eta*lam_wd <= (1 - sqrt(mu))^2.
  for label, (lr, lam), mu in (("plain SGD", L2_PLAIN_RECIPES[0], 0.0),
                               ("SGD, momentum 0.9", BASE, MOMENTUM)):
    common = dict(lr=lr, lam=lam, momentum=mu, norm_eps=EXACT_EPS, seed=0)
    prefix = f"twin_mu{mu:g}"

    def train(name, **kw):
      return runner.train(f"{prefix}_{name}", runner.config(**common, **kw), probe=True,
                          settle=False)

    l2, twin = train("l2", method="l2"), train("exp_lr", method="exp_lr")
    control = train("control", method="l2", init_scale=ULP)
    steps, twin_dev = _deviation(l2, twin)
    _, control_dev = _deviation(l2, control)
    out[label] = {"lr": lr, "lam": lam, "momentum": mu,
                  "alpha": theory.exponential_lr_rate(lr, 2 * lam, mu),
                  "final_lr": float(theory.exponential_lr_schedule(lr, 2 * lam, mu)(
                      runner.total_steps - 1)),
                  "steps": steps, "twin": twin_dev, "control": control_dev,
                  "acc": {"l2": final_accuracy(l2), "twin": final_accuracy(twin),
                          "control": final_accuracy(control)}}
  return out


# ------------------------------------------------------------------ verdicts


def _same_within_noise(a: float, a_std: float, b: float, b_std: float, seeds: int
                       ) -> tuple[Optional[bool], str]:
  """Equal within 2 standard errors of the difference of two means (None with one seed).

  ``a_std``, ``b_std`` are ddof=0 standard deviations over ``seeds`` seeds, so the
  standard error of ``a - b`` is ``sqrt((a_std^2 + b_std^2) / (seeds - 1))``.
  """
  if seeds < 2:
    return None, f"difference {a - b:+.3f}; one seed gives no noise estimate"
  se = math.sqrt((a_std ** 2 + b_std ** 2) / (seeds - 1))
  return abs(a - b) <= max(2 * se, 0.005), f"difference {a - b:+.3f}, 2 s.e. = {2 * se:.3f}"


def verdict_no_regularization(l2: dict[str, Any], seeds: int) -> tuple[Optional[bool], str]:
  """Claim 2's verdict (:data:`CRITERIA`) from :func:`claim_no_regularization`'s results
  over ``seeds`` seeds (one seed: no noise estimate, no verdict)."""
  same = list(l2.values())[:3]
  hi = max(same, key=lambda v: v["acc"])
  lo = min(same, key=lambda v: v["acc"])
  ok, why = _same_within_noise(hi["acc"], hi["acc_std"], lo["acc"], lo["acc_std"], seeds)
  first, third = same[0], same[2]
  predicted = ((first["lr"] / first["lam"]) / (third["lr"] / third["lam"])) ** 0.25
  measured = first["norm"] / third["norm"]
  norm_ok = abs(measured / predicted - 1) <= 0.10
  return (None if ok is None else (ok and norm_ok),
          f"equal eta*lam, max - min accuracy: {why}; norm ratio {measured:.3f} against "
          f"{predicted:.3f}")


def verdicts_effective_lr(e: dict[str, Any]) -> tuple[tuple[Optional[bool], str], ...]:
  """Claims 3 and 3b's verdicts (:data:`CRITERIA`) from :func:`claim_effective_lr`'s
  results."""
  ratios = [v["ratio"] for fam in ("sgd_momentum", "sgd", "sgdw", "adamw")
            for v in e[fam].values()]
  inside = sum(abs(q - 1) <= 0.15 for q in ratios)
  adam = e["adam_elr"]
  return ((inside == len(ratios), f"{inside} of {len(ratios)} angles within 15% of the "
           f"theory (ratios {min(ratios):.2f} to {max(ratios):.2f})"),
          (abs(adam["elr_ratio"] / adam["predicted"] - 1) <= 0.15,
           f"eta/||w|| ratio {adam['elr_ratio']:.3f} against {adam['predicted']:.3f}"))


def verdicts(r: dict[str, Any]) -> dict[str, tuple[Optional[bool], str]]:
  """Claim -> (holds, why), computed from the results by the criteria of :data:`CRITERIA`."""
  seeds = SIZES[r["size"]]["seeds"]
  out = {}
  inv = r["1_invariance"]
  worst = max(v["logits_rel_change"] for v in inv.values())
  out["1"] = (worst < 1e-3, f"largest change {worst:.1e}")

  out["2"] = verdict_no_regularization(r["2_no_regularization"], seeds)
  out["3"], out["3b"] = verdicts_effective_lr(r["3_effective_lr"])

  g1, g4 = r["4_growth_without_l2"]["init_scale=1"], r["4_growth_without_l2"]["init_scale=4"]
  out["4"] = (g1["norm_last"] > g1["norm_first"] and g1["elr_last"] < g1["elr_first"]
              and g4["elr_last"] < 0.5 * g1["elr_last"],
              f"init x1: norm x{g1['norm_last'] / g1['norm_first']:.2f}, eff. lr "
              f"x{g1['elr_last'] / g1['elr_first']:.2f}; at the end the x4 start has "
              f"{g4['elr_last'] / g1['elr_last']:.3f} times the x1 effective lr")

  for key, sph in (("5", r["5_spherical"]), ("6", r["6_weight_norm"]["spherical"])):
    ok, why = _same_within_noise(sph["best_acc"], sph["best_acc_std"], sph["best_l2_acc"],
                                 sph["best_l2_acc_std"], seeds)
    out[key] = (ok, f"best spherical lr {sph['best_lr']} (one hyperparameter) against the "
                "best SGD+L2 recipe (two): " + why)

  change = r["7_gamma_beta"]["output_change_when_scaling_layer"]
  inner = [c for layer, c in change.items() if str(layer) != "5"]
  last = change[5] if 5 in change else change["5"]
  out["7"] = (max(inner) < 1e-3 and last > 1e-2,
              f"inner layers: at most {max(inner):.1e}; last: {last:.1e}")

  exact = [v for v in r["8_equivalence"].values() if v["exact_eps"]]
  worst = max(v["max_deviation"] for v in exact)
  same_acc = all(v["acc"] == v["acc_base"] for v in exact)
  out["8"] = (worst < 1e-6 and same_acc,
              f"largest logit difference over every logged step {worst:.1e}; test accuracy "
              f"{'identical' if same_acc else 'different'}")

  first = {k: v["twin"][v["steps"].index(1)] for k, v in r["9_exponential_lr"].items()}
  out["9"] = (all(d < 1e-5 for d in first.values()),
              "; ".join(f"{k}: {d:.1e} after step 1" for k, d in first.items()))
  return out


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


# ---------------------------------------------------------------------- main

def define_flags() -> None:
  """The command line of ``python -m experiments.reproduce``.

  Defined when the module runs, not when it is imported, so that the
  experiments can be imported side by side (they share flag names).
  """
  flags.DEFINE_enum("size", "smoke", list(SIZES), "How big: smoke (CI, minutes on a "
                    "CPU), medium, long (every equilibrium reached; under an hour on a "
                    "2-core CPU), full (50,000 images; a GPU).")
  cache_lib.define_report_flags(
      "runs/reproduce", "Where the runs go (cached: a finished run is not trained again).",
      "Where RESULTS.md, results.json and figures/ go; default WORKDIR/SIZE/report. The "
      "committed report is written with --report_dir=experiments.")


FLAGS = flags.FLAGS


def main(argv):
  with errors.one_line("experiments.reproduce"):
    workdir, report_dir, command = cache_lib.report_paths("experiments.reproduce", argv)
    results = run(FLAGS.size, workdir, report_dir, FLAGS.data_dir, command=command)
  print(json.dumps({k: v for k, v in results["verdicts"].items()}, indent=1))
  print(f"report: {os.path.join(report_dir, 'RESULTS.md')}")


if __name__ == "__main__":
  define_flags()
  app.run(main)

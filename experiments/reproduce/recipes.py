"""The reproduction's sizes and recipes, their time constants, and its run cache.

:data:`SIZES` fixes each size's data, network, epochs and ``decay_scale``; the recipe
tables (:data:`L2_RECIPES`, :data:`SGDW_RECIPES`, ...) fix the claims' runs; every decay
recipe must settle (:func:`check_settles`, from the method's ``normreg.theory`` time
constant in ``experiments.methods``) before the measurement window, the last quarter of
its steps. :class:`Runner` trains and caches the runs.
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import cache as cache_lib
from experiments import data as data_lib
from experiments import errors
from experiments import methods as methods_lib
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

# ------------------------------------------------------------------- time constants


class TooShortError(errors.InputError):
  """A decay recipe would be measured before it reaches its equilibrium."""


def time_constant(config: Config) -> Optional[float]:
  """``normreg.theory``'s time constant (steps) of ``config``'s decay; ``None`` without one.

  The method's entry says it (``experiments.methods``: ``Method.theory_time_constant``):
  SGD + coupled L2: ``(1-mu)/(4 eta lam_wd)``, ``lam_wd = 2 lam``; SGDW:
  ``1/(4 eta wd)``; AdamW: ``1/(2 eta wd)``. Adam with coupled L2 has no closed
  form (Adam divides the decay by the gradient's scale), so it is refused.
  """
  try:
    return methods_lib.get(config.method).theory_time_constant(config)
  except ValueError as e:
    raise TooShortError(f"{e}; use --method=decoupled (AdamW) for an equilibrium "
                        "claim.") from None


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
# Chance on the reproduction's data (CIFAR-10, or the digits at the smoke size): ten classes.
CHANCE = 0.1


def final_accuracy(run: plot_lib.Run) -> float:
  """The run's last test accuracy; chance for a run whose loss diverged."""
  return cache_lib.final_score(run, CHANCE)


def _acc(runs: list[plot_lib.Run]) -> tuple[float, float]:
  """Mean and standard deviation (ddof=0) of the runs' final test accuracies."""
  return cache_lib.scores(runs, CHANCE)


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

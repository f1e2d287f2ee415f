"""The comparison's sizes and recipes (:data:`METHODS`: settings and base rate as data,
the theory from ``experiments.methods``), the tuning of each method's learning rate and
what is measured on its runs.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

import normreg
from experiments import cache as cache_lib
from experiments import data as data_lib
from experiments import errors
from experiments import methods as methods_lib
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

# name -> (launcher settings, base learning rate): the methods compared, as data. Their
# theory (target or equilibrium angle, time constant) is their entry's in experiments.methods.
RECIPES: dict[str, tuple[dict[str, Any], float]] = {
    "none": (dict(method="none"), 0.1),
    "l2": (dict(method="l2", lam=L2), 0.1),
    "decoupled": (dict(method="decoupled", lam=WD), 0.1),
    "corrected": (dict(method="decoupled", lam=WD, corrected_decay=True), 0.1),
    "spherical": (dict(method="spherical", ungrouped_lr=0.1), 0.03),
    "rotational": (dict(method="rotational", lam=L2), 0.1),
    "sgdp": (dict(method="adamp", lam=L2), 0.1),
    "nero": (dict(method="nero"), 0.01),
    "hyperball": (dict(method="hyperball", optimizer="adam"), 0.01),
}
# The entries the report writes about by name (its prose, not dispatch): the paper's own
# proposal, and decoupled decay against its corrected form (Defazio 2025).
PAPERS_RECIPE = "spherical"
DECAY_PAIR = ("decoupled", "corrected")
SETTLE = 4  # time constants before an equilibrium is measured (as experiments.reproduce)


def recipe_config(settings: dict[str, Any], lr: float) -> Config:
  """The comparison's Config of ``settings`` at peak rate ``lr`` (its common momentum)."""
  return Config(**{"momentum": MOMENTUM, **settings, "lr": lr})


def target_angle(settings: dict[str, Any]) -> Optional[Callable[[float, float], float]]:
  """``(lr_t, lr_max) -> angle``: the angle per step that ``settings``' method targets or
  reaches at equilibrium at the logged rate ``lr_t`` (``Method.theory_angle``); ``None``
  for a method without one."""
  method = methods_lib.get(settings["method"])
  if method.theory_angle(recipe_config(settings, 0.1)) is None:
    return None
  return lambda lr, peak: method.theory_angle(recipe_config(settings, peak), lr)


# name -> (launcher settings, base learning rate, target angle(lr_t, lr_max) or None)
METHODS: dict[str, tuple[dict[str, Any], float, Optional[Callable[[float, float], float]]]] = {
    name: (settings, lr, target_angle(settings)) for name, (settings, lr) in RECIPES.items()}


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
  window (the sum over steps of ``1 / tau(lr_t)``, ``Method.theory_time_constant`` at the
  logged rates); ``None`` for the methods that set their angle from the first step (or
  have no equilibrium)."""
  settings = METHODS[name][0]
  method = methods_lib.get(settings["method"])
  if method.theory_time_constant(recipe_config(settings, 0.1)) is None or not run.train:
    return None
  start, peak = 0.25 * run.train[-1]["step"], run.config["lr"]
  config = recipe_config(settings, peak)
  total, prev = 0.0, 0
  for r in run.train:
    if r["step"] > start:
      break
    lr = r["learning_rate"]
    total += (1 / method.theory_time_constant(config, lr) if lr > 0 else 0.0) * (
        r["step"] - prev)
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
  # At the logged rate of the grouped weights (rotational's is its target angle).
  targets = [target(r["learning_rate"], peak) for r in records]
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
    tuned[config.lr] = cache.final_score(
        cache.train(run_name(model[0], name, config.lr, 0), config))
  for _ in range(MAX_EXTENSIONS):
    lrs, best = sorted(tuned), max(tuned, key=tuned.get)
    if not interior or lrs[0] < best < lrs[-1]:
      return tuned
    factor = (best * ratio if best == lrs[-1] else best / ratio) / METHODS[name][1]
    config = method_config(cache, model, name, factor, 0)
    logging.info("compare: %s's best lr %g is at the edge of %s; trying %g", name, best,
                 lrs, config.lr)
    tuned[config.lr] = cache.final_score(
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
  accs = [cache.final_score(r) for r in runs]
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

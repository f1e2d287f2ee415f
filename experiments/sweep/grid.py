"""The grid of a sweep: its runs (:func:`grid`), their folder names, and the injected
chain that holds each run's ``lr`` and ``lam`` as optimizer state (:func:`recipe`).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from typing import Any, Callable, Optional, Sequence

import optax

from experiments import errors
from experiments import methods as methods_lib
from experiments import trainer
from experiments.config import Config


# The Config fields a sweep lists; the other fields must agree within one vmapped program.
GRID_FIELDS = ("method", "lr", "lam", "seed")
DEFAULT_MAX_RUNS_PER_CHUNK = 16
DIVERGED = "diverged.txt"
# Fraction of the device's free memory a chunk may plan to use.
MEMORY_FRACTION = 0.9


# -------------------------------------------------------------------------- the grid


def _check_axis(flag: str, values: Sequence[Any]) -> None:
  if not values:
    raise errors.InputError(f"--{flag} is empty: give at least one value (comma-separated).")
  for value in values:
    if list(values).count(value) > 1:
      raise errors.InputError(f"--{flag} lists {value!r} more than once; list each value once.")


def grid(config: Config, lrs: Sequence[float], lams: Optional[Sequence[Optional[float]]] = None,
         seeds: Optional[Sequence[int]] = None,
         methods: Optional[Sequence[str]] = None) -> list[Config]:
  """Every ``(method, lr, lam, seed)`` combination of ``config``, validated.

  Args:
    config: the settings all runs share (its ``lr``, ``lam``, ``seed`` and
      ``method`` are the defaults of the axes left out).
    lrs: peak learning rates.
    lams: L2 coefficients (``None`` in the list: the default,
      ``config_lib.DEFAULT_LAM``); default ``[config.lam]``. They apply to the
      methods that have one (``experiments.methods``: ``Method.lam``, such as
      ``l2`` and ``decoupled``); the other methods of a
      mixed ``methods`` list get one run per ``(lr, seed)``. ``lams`` with only
      methods that have no ``lam`` is an error naming ``--lam``.
    seeds: seeds (init, data order, augmentation); default ``[config.seed]``.
    methods: default ``[config.method]``.

  Returns:
    The Configs, method-major then lr, lam, seed (the runs of one method are
    contiguous).

  Raises:
    ValueError: an empty or repeated axis value, or a run ``Config.validate``
      refuses; the message names the flag.
  """
  lams = [config.lam] if lams is None else list(lams)
  seeds = [config.seed] if seeds is None else list(seeds)
  methods = [config.method] if methods is None else list(methods)
  for flag, values in (("method", methods), ("lr", lrs), ("lam", lams), ("seed", seeds)):
    _check_axis(flag, values)
  any_lam_method = any(methods_lib.takes_lam(m) for m in methods)
  configs = []
  for method in methods:
    # Methods without lam: one run per (lr, seed), unless no method has a lam (then the
    # lams go through to validate(), which names --lam).
    method_lams = lams if methods_lib.takes_lam(method) or not any_lam_method else [None]
    for lr, lam, seed in itertools.product(lrs, method_lams, seeds):
      configs.append(dataclasses.replace(config, method=method, lr=lr, lam=lam, seed=seed))
  for c in configs:
    c.validate()
    if not methods_lib.get(c.method).sweepable:
      raise errors.InputError(f"--method={c.method} cannot be swept: its grouped rate is "
                              "computed from --lr and --lam when the chain is built, not "
                              "injected; run it with experiments.train.")
  return configs


def _format(value: Any) -> str:
  return repr(float(value)) if isinstance(value, float) else str(value)


def run_names(configs: Sequence[Config]) -> list[str]:
  """Folder names: ``method=l2_lr=0.1_lam=0.0005_seed=0`` (no lam for methods without).

  Any other field that differs between the configs is appended (``_width=8``).
  """
  fields = dict.fromkeys(f.name for c in configs for f in dataclasses.fields(c))
  varying = [name for name in fields
             if name not in GRID_FIELDS and len({getattr(c, name, None) for c in configs}) > 1]
  names = []
  for c in configs:
    parts = [f"method={c.method}", f"lr={_format(float(c.lr))}"]
    if methods_lib.takes_lam(c.method):
      parts.append(f"lam={_format(float(c.lam_value))}")
    parts.append(f"seed={c.seed}")
    parts += [f"{name}={_format(getattr(c, name, None))}" for name in varying]
    names.append("_".join(parts).replace(os.sep, "-"))
  return names


def program_key(config: Config) -> Config:
  """The settings that must agree for runs to share one vmapped program."""
  return dataclasses.replace(config, lr=1.0, lam=None, seed=0)


# ------------------------------------------------------------------------- the recipe


def recipe(config: Config, groups: Any, total_steps: int) -> Callable[..., Any]:
  """``optax.inject_hyperparams`` over ``trainer.make_optimizer``: lr and lam as state.

  Returns a function ``(learning_rate, lam=None) -> GradientTransformation``
  whose ``init`` stores ``learning_rate`` (the peak rate) and, for the methods
  that have one, ``lam`` in the optimizer state (``InjectHyperparamsState``);
  ``update`` rebuilds the chain from the values in the state it is given. So one
  transformation updates every run of a vmapped state with the run's own
  values. Inside, the chain is ``trainer.make_step_optimizer``'s (the launcher's
  step rebuilds its chain the same way): ``trainer.make_optimizer`` of ``config``
  with ``lr`` and ``lam`` replaced, and the schedule
  ``trainer.make_schedule(config with lr=learning_rate)``: a constant ``lr``, a
  cosine ``lr * (1 + cos(pi t / T)) / 2`` or the step schedule, evaluated at
  the optimizer's own step count, as in the single run.
  ``make_optimizer`` and ``make_schedule`` accept traced values; no
  ``Config.validate()`` is called on the Config that holds them.
  """

  def factory(learning_rate, lam=None):
    return trainer.make_step_optimizer(config, groups, total_steps,
                                       {"lr": learning_rate, "lam": lam})

  return optax.inject_hyperparams(factory)


def recipe_for(config: Config, groups: Any, total_steps: int) -> optax.GradientTransformation:
  """The injected chain holding ``config.lr`` and (if the method has it) its lam."""
  make = recipe(config, groups, total_steps)
  if methods_lib.takes_lam(config.method):
    return make(learning_rate=float(config.lr), lam=float(config.lam_value))
  return make(learning_rate=float(config.lr))

"""The launcher's methods: one :class:`Method` entry per ``--method``, in :data:`REGISTRY`.

A method is what the launcher does with the scale-invariant weights on top of the
base optimizer (``--optimizer``, SGD with heavy-ball momentum ``mu`` or Adam). Its
entry says everything the rest of ``experiments`` needs, so that nothing else
branches on a method's name:

- which flags it takes: ``--lam`` (:attr:`Method.lam`), the base it needs
  (:attr:`Method.optimizer`), whether it has a separate ``--ungrouped_lr``, the
  schedule it needs and the flags that only it takes (``--corrected_decay``);
  ``Config.validate`` words its messages from these;
- whether it sets the angle of the grouped weights (:attr:`Method.sets_angle`):
  their logged effective learning rate is then that rate, not ``eta/||w||^p``;
- the grouped weights' own learning rate where it differs from the schedule
  (:attr:`Method.grouped_rate`; such a method cannot be swept, its rate being
  computed when the chain is built);
- its theory, from ``normreg.theory``: the time constant ``tau`` of the norm's
  approach to equilibrium and the angle per step (at equilibrium, or the one it
  sets), both at the grouped weights' logged learning rate ``eta_t``. With the
  penalty ``lam*||w||^2`` (``lam_wd = 2 lam``, van Laarhoven 2017) and SGD with
  momentum ``mu``:

  .. math::

     \\tau = \\frac{1 - \\mu}{4 \\eta \\lambda_{wd}}, \\qquad
     \\theta^* = \\sqrt{\\frac{2 \\eta \\lambda_{wd}}{1 + \\mu}};

  decoupled decay (``+wd*w`` times the learning rate, Loshchilov & Hutter 2019):
  ``tau = 1/(4 eta wd)`` (SGDW), ``1/(2 eta wd)`` (AdamW); see
  ``normreg.theory`` for each closed form and its derivation;
- how to build its optax chain (:attr:`Method.build`, from a :class:`Parts`).

Adding a method: write its chain as a function of :class:`Parts`, add one
``Method(...)`` to :data:`REGISTRY` (or call :func:`register`), and test it
(``tests/test_methods.py`` trains a method registered in one place through the
launcher, the sweep and the comparison). The flag's help text lists the entries.

References: van Laarhoven 2017 (arXiv 1706.05350); Li & Arora 2019 (arXiv
1910.07454); Kosson et al. 2024 (rotational equilibrium); Heo et al. 2021 (AdamP);
Liu et al. 2021 (Nero); Defazio 2025 (corrected decay).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import optax

import normreg
from normreg import theory

if TYPE_CHECKING:
  from experiments.config import Config


@dataclasses.dataclass(frozen=True)
class Parts:
  """What a method's chain is built from (:func:`make_optimizer` fills it in).

  Attributes:
    config: the run's settings (``lr`` and ``lam`` may be traced: the sweep
      injects them).
    groups: the scale-invariance groups.
    schedule: the learning rate of ``--lr`` on ``--schedule``.
    ungrouped: the other parameters' rate where it is not ``schedule``
      (``--ungrouped_lr``, or ``schedule`` for a method with its own grouped
      rate); ``None``: ``schedule``.
    grouped: the grouped weights' rate (:attr:`Method.grouped_rate`, or
      ``schedule``).
  """

  config: Any
  groups: Any
  schedule: optax.Schedule
  ungrouped: Optional[optax.Schedule]
  grouped: optax.Schedule

  @property
  def sgd(self) -> bool:
    return self.config.optimizer == "sgd"

  def direction(self) -> optax.GradientTransformation:
    """The base optimizer without its learning rate: momentum (SGD), Adam's scaling, or
    Muon's (``optax.contrib.muon`` at rate -1, which is its update with the sign of a
    direction: orthogonalized Nesterov momentum on the matrices the task names,
    ``Task.matrix_axes``, Adam with Nesterov momentum on the rest)."""
    if self.sgd:
      mu = self.config.momentum
      return optax.trace(decay=mu) if mu else optax.identity()
    if self.config.optimizer == "muon":
      from experiments import tasks  # pylint: disable=g-import-not-at-top
      task, config = tasks.of(self.config), self.config
      return optax.contrib.muon(
          learning_rate=-1.0, eps=config.adam_eps,
          muon_weight_dimension_numbers=lambda params: task.matrix_axes(config, params))
    return optax.scale_by_adam(eps=self.config.adam_eps)

  def rates(self) -> optax.GradientTransformation:
    """The learning rates: ``grouped`` on the groups, ``ungrouped`` (or it) elsewhere."""
    return normreg.scale_by_learning_rates(self.grouped, self.groups, self.ungrouped)


# A method's theory at the grouped weights' logged learning rate: (config, rate) -> value.
Theory = Callable[["Config", float], Optional[float]]


class Closed(float):
  """A theory's value that names the closed form of ``normreg.theory`` it came from
  (``form``, e.g. ``"equilibrium_angle_sgd"``): a float everywhere, and the figures'
  legends write its formula (``experiments.plot.THEORY_FORMULAS``)."""

  form: str

  def __new__(cls, value: float, form: str) -> "Closed":
    out = super().__new__(cls, value)
    out.form = form
    return out


def _closed(form: str, *args: float) -> Closed:
  """``normreg.theory.<form>(*args)``, named."""
  return Closed(getattr(theory, form)(*args), form)


@dataclasses.dataclass(frozen=True)
class Method:
  """One ``--method``: its flags, its theory and its optax chain.

  Attributes:
    name: the ``--method`` value.
    build: ``Parts -> optax.GradientTransformation``, the chain (order commented).
    help: what it does, for the flag's help text (``None``: the name alone).
    lam: takes ``--lam`` (default ``config.DEFAULT_LAM``).
    optimizer: the ``--optimizer`` it needs (``None``: either), and
      ``optimizer_reason`` what it is, for the message ("is Hyperball Adam").
    ungrouped_lr: takes ``--ungrouped_lr``.
    schedule: the ``--schedule`` it needs (``None``: any) and ``schedule_reason``.
    options: ``(flag, what it is)`` of the boolean flags only this method takes.
    sets_angle: turns its grouped weights at a set rate (its logged effective
      learning rate is that rate, not ``eta/||w||^p``).
    grouped_rate: ``(config, schedule) -> schedule`` of the grouped weights where
      it is not the schedule; computed when the chain is built (not swept).
    time_constant: steps of the norm's approach to equilibrium, ``None``
      without one; may raise ``ValueError`` where theory has no closed form.
    angle: angle per step at equilibrium, or the one it sets; ``None`` without.
    muon: takes ``--optimizer=muon`` (the methods that use the base direction as it
      is; the others have no Muon form yet).
    folded: the settings (``"lr"``, ``"lam"``) its chain multiplies by another
      number when it is built (AdamP's ``lam * wd_ratio``): they stay constants of
      the compiled step (:func:`step_hyperparameters`), where that product is
      rounded once, from double precision, as before.
  """

  name: str
  build: Callable[[Parts], optax.GradientTransformation]
  help: Optional[str] = None
  lam: bool = False
  optimizer: Optional[str] = None
  optimizer_reason: str = ""
  ungrouped_lr: bool = True
  schedule: Optional[str] = None
  schedule_reason: str = ""
  options: tuple[tuple[str, str], ...] = ()
  sets_angle: bool = False
  grouped_rate: Optional[Callable[["Config", optax.Schedule], optax.Schedule]] = None
  time_constant: Optional[Theory] = None
  angle: Optional[Theory] = None
  muon: bool = False
  folded: tuple[str, ...] = ()

  @property
  def sweepable(self) -> bool:
    """``lr`` and ``lam`` can be injected (no rate computed when the chain is built)."""
    return self.grouped_rate is None

  def theory_time_constant(self, config: "Config", rate: Optional[float] = None
                           ) -> Optional[float]:
    """:attr:`time_constant` at ``rate`` (default ``config.lr``); ``None`` without decay."""
    if self.time_constant is None or (self.lam and config.lam_value == 0):
      return None
    return self.time_constant(config, config.lr if rate is None else rate)

  def theory_angle(self, config: "Config", rate: Optional[float] = None) -> Optional[float]:
    """:attr:`angle` at ``rate`` (default ``config.lr``); ``None`` without one."""
    if self.angle is None or (self.lam and config.lam_value == 0):
      return None
    return self.angle(config, config.lr if rate is None else rate)


# ------------------------------------------------------------------------ the chains


def _none(p: Parts):
  return optax.chain(p.direction(), p.rates())


def _l2(p: Parts):
  # Coupled: the gradient of lam*||w||^2 joins the data gradient before the optimizer.
  return optax.chain(normreg.add_l2_penalty(p.config.lam_value, p.groups), p.direction(),
                     p.rates())


def _decoupled(p: Parts):
  c = p.config
  if c.corrected_decay:
    # Defazio (2025): the decay times lr_t/lr_max, so w decays by lam*lr_t^2/lr_max a step.
    return optax.chain(p.direction(), normreg.add_corrected_decayed_weights(
        c.lam_value, p.schedule, p.groups, peak_learning_rate=c.lr), p.rates())
  # SGDW / AdamW: the direction (momentum or Adam) of the gradient only, then + lam*w,
  # then the learning rate (so the decay is multiplied by it, as in optax.adamw).
  if c.decay_all_matrices:  # the usual practice: every parameter with ndim >= 2
    decay = optax.add_decayed_weights(
        c.lam_value, mask=lambda params: jax.tree.map(lambda w: w.ndim >= 2, params))
  else:
    decay = normreg.add_decayed_weights(c.lam_value, p.groups)
  return optax.chain(p.direction(), decay, p.rates())


def _spherical(p: Parts):
  if p.sgd:
    return normreg.spherical_sgd(p.schedule, p.groups, momentum=p.config.momentum,
                                 ungrouped_learning_rate=p.ungrouped)
  return normreg.spherical_adam(p.schedule, p.groups, ungrouped_learning_rate=p.ungrouped)


def _elr_rescale(p: Parts):
  # SGD: rescale the raw gradient by ||w||^2; Adam: rescale Adam's step by ||w||.
  if p.sgd:
    return optax.chain(normreg.scale_by_weight_norm(p.groups, power=2), p.direction(),
                       p.rates())
  return optax.chain(p.direction(), normreg.scale_by_weight_norm(p.groups, power=1), p.rates())


def _tangent(p: Parts):
  # The base step with its radial part removed (AdamP-style projection).
  return optax.chain(p.direction(), p.rates(), normreg.tangent_projection(p.groups))


def _exp_lr(p: Parts):
  # Li & Arora (2019): no L2, and the grouped weights' rate grows as lr*alpha^(-2t-1); with
  # momentum their buffer starts at k*w0 (normreg.theory). Same network as --method=l2.
  c = p.config
  k = theory.exponential_lr_momentum_init(c.lr, 2 * c.lam_value, c.momentum)
  momentum = p.direction()
  if k:
    momentum = optax.GradientTransformation(
        lambda params: optax.TraceState(trace=normreg.groups.map_grouped(
            lambda _, zero, w: zero + k * w, p.groups, jax.tree.map(jnp.zeros_like, params),
            params)),
        momentum.update)
  return optax.chain(momentum, p.rates())


def _rotational(p: Parts):
  # Kosson et al. (2024): the base optimizer's direction (no decay), each grouped unit
  # kept at its initial norm and turned by the L2/AdamW recipe's equilibrium angle.
  # The inner step of the grouped weights has no learning rate (the wrapper normalizes it
  # and sets its angle on the schedule); the other parameters keep theirs.
  inner = optax.chain(p.direction(), normreg.scale_by_learning_rates(
      1.0, p.groups, p.ungrouped if p.ungrouped is not None else p.schedule))
  return normreg.rotational(inner, p.groups, p.grouped)


def _adamp(p: Parts):
  # Heo et al. (2021): the radial part removed on the exact groups (or AdamP's cosine
  # test), decoupled decay --lam times wd_ratio 0.1 there.
  c = p.config
  if p.sgd:
    return normreg.sgdp(p.schedule, p.groups, momentum=c.momentum, weight_decay=c.lam_value,
                        heuristic=c.adamp_cosine)
  return normreg.adamp(p.schedule, p.groups, weight_decay=c.lam_value, heuristic=c.adamp_cosine)


def _nero(p: Parts):
  return normreg.nero(p.schedule, p.groups)


def _hyperball(p: Parts):
  return normreg.adamh(p.schedule, p.groups, ungrouped_learning_rate=p.ungrouped)


# ---------------------------------------------------------------- the grouped rates


def muon_correlation() -> float:
  """``S`` of Muon's equilibrium (``normreg.theory.muon_update_statistics``: the summed
  autocorrelation of optax.contrib.muon's orthogonalized Nesterov momentum, beta 0.95, at
  its default shape; cached)."""
  return theory.muon_update_statistics()[1]


def rotational_target(config: "Config") -> float:
  """The angle per step ``--method=rotational`` targets: the equilibrium angle of the same
  recipe with its decay, SGD + coupled L2 (``lam_wd = 2 lam``), AdamW (``b1 = 0.9``) or
  Muon with decoupled decay (``normreg.theory.equilibrium_angle_muon``)."""
  if config.optimizer == "sgd":
    return theory.equilibrium_angle_sgd(config.lr, 2 * config.lam_value, config.momentum)
  if config.optimizer == "muon":
    return theory.equilibrium_angle_muon(config.lr, config.lam_value, muon_correlation())
  return theory.equilibrium_angle_adamw(config.lr, config.lam_value, 0.9)


def _rotational_rate(config: "Config", schedule: optax.Schedule) -> optax.Schedule:
  target = rotational_target(config)
  return lambda t: schedule(t) * (target / config.lr)


def _exp_lr_rate(config: "Config", schedule: optax.Schedule) -> optax.Schedule:
  del schedule  # a constant --lr, grown
  return theory.exponential_lr_schedule(config.lr, 2 * config.lam_value,
                                        config.momentum if config.optimizer == "sgd" else 0.0)


# ----------------------------------------------------------------------- the theory
# Each at the grouped weights' logged rate ``lr`` (the schedule's value, peak config.lr).


def _l2_time_constant(c: "Config", lr: float) -> float:
  if c.optimizer != "sgd":
    raise ValueError(f"{'Adam' if c.optimizer == 'adam' else 'Muon'} with coupled L2 has no "
                     "closed-form time constant in normreg.theory")
  return _closed("time_constant_sgd", lr, 2 * c.lam_value, c.momentum)


def _l2_angle(c: "Config", lr: float) -> Optional[float]:
  if c.optimizer != "sgd":
    return None  # Adam divides the decay by the gradient's scale: no closed form
  return _closed("equilibrium_angle_sgd", lr, 2 * c.lam_value, c.momentum)


def _decay(c: "Config", lr: float) -> float:
  """Decoupled decay at ``lr``: ``lam``, or with ``--corrected_decay`` ``lam*lr_t/lr_max``."""
  return c.lam_value * lr / c.lr if c.corrected_decay else c.lam_value


def _decoupled_time_constant(c: "Config", lr: float) -> Optional[float]:
  if c.optimizer == "muon":
    return _closed("time_constant_muon", lr, _decay(c, lr))
  if c.optimizer == "sgd":
    return _closed("time_constant_sgdw", lr, _decay(c, lr))
  return _closed("time_constant_adamw", lr, _decay(c, lr))


def _decoupled_angle(c: "Config", lr: float) -> Optional[float]:
  if c.optimizer == "muon":  # (its orthogonalized matrices; the others are Adam's)
    return _closed("equilibrium_angle_muon", lr, _decay(c, lr), muon_correlation())
  if c.optimizer == "sgd":
    return _closed("equilibrium_angle_sgdw", lr, _decay(c, lr), c.momentum)
  return _closed("equilibrium_angle_adamw", lr, _decay(c, lr), 0.9)


def _adamp_time_constant(c: "Config", lr: float) -> float:
  # SGDW's with SGDP's decay, wd * wd_ratio / (1 - mu); AdamW's with wd * wd_ratio.
  if c.optimizer == "sgd":
    return _closed("time_constant_sgdw", lr, c.lam_value * 0.1 / (1 - c.momentum))
  return _closed("time_constant_adamw", lr, c.lam_value * 0.1)


def _adamp_angle(c: "Config", lr: float) -> float:
  if c.optimizer == "sgd":
    return _closed("equilibrium_angle_sgdp", lr, c.lam_value, c.momentum)
  return _closed("equilibrium_angle_adamp", lr, c.lam_value)


def _rotational_angle(c: "Config", lr: float) -> float:
  # The logged rate is the target angle on the schedule's shape: back to the schedule's
  # value, then the target at it (normreg.theory.angle_rotational: arctan(target)).
  target = rotational_target(c)
  return _closed("angle_rotational", target * (lr * (c.lr / target)) / c.lr)


# ----------------------------------------------------------------------- the registry

REGISTRY: dict[str, Method] = {m.name: m for m in (
    Method("l2", _l2, help="coupled, loss + lam*||w||^2", lam=True, muon=True,
           time_constant=_l2_time_constant, angle=_l2_angle),
    Method("decoupled", _decoupled, help="optax add_decayed_weights, +lam*w", lam=True,
           muon=True,
           options=(("corrected_decay", "corrects decoupled weight decay"),
                    ("decay_all_matrices", "decays every matrix")),
           time_constant=_decoupled_time_constant, angle=_decoupled_angle),
    Method("spherical", _spherical, help="unit norm, no lam", sets_angle=True),
    Method("elr_rescale", _elr_rescale, help="update * ||w||^p", sets_angle=True, muon=True),
    Method("tangent", _tangent, help="radial part of the update removed", muon=True),
    Method("exp_lr", _exp_lr, lam=True, grouped_rate=_exp_lr_rate,
           help="no L2; their learning rate grows as lr*rho^(-2t-1), the exact twin of l2 "
                "with the same --lam: Li & Arora 2019",
           optimizer="sgd", optimizer_reason="is SGD's twin of coupled L2 (Li & Arora 2019)",
           schedule="constant", schedule_reason="replaces a constant learning rate with its "
                                                "exponentially growing equivalent"),
    Method("rotational", _rotational, lam=True, sets_angle=True, grouped_rate=_rotational_rate,
           muon=True,
           help="Kosson et al. 2024: norm kept, each unit turned by the equilibrium angle of "
                "l2 (sgd), AdamW (adam) or Muon with decoupled decay (muon) with this --lam",
           angle=_rotational_angle),
    Method("adamp", _adamp, lam=True, ungrouped_lr=False,
           help="AdamP/SGDP: radial part removed, decay --lam x 0.1",
           options=(("adamp_cosine", "is AdamP's heuristic"),), folded=("lam",),
           time_constant=_adamp_time_constant, angle=_adamp_angle),
    Method("nero", _nero, ungrouped_lr=False, sets_angle=True,
           help="Nero: balanced units, relative steps of angle ~lr; --optimizer and "
                "--momentum unused",
           angle=lambda c, lr: _closed("angle_nero", lr)),
    Method("hyperball", _hyperball, sets_angle=True,
           help="AdamH: normalized Adam step on a fixed-norm sphere; --optimizer=adam",
           optimizer="adam", optimizer_reason="is Hyperball Adam (AdamH)",
           angle=lambda c, lr: _closed("angle_adamh", lr)),
    Method("none", _none, muon=True),
)}


def names() -> tuple[str, ...]:
  """The ``--method`` values, in the registry's order."""
  return tuple(REGISTRY)


def get(name: str) -> Method:
  """The entry of ``name``; ``KeyError`` if there is none (``Config.validate`` says so)."""
  return REGISTRY[name]


def takes_lam(name: str) -> bool:
  """Whether ``--method=name`` takes ``--lam`` (``False`` for an unknown name)."""
  return name in REGISTRY and REGISTRY[name].lam


def register(method: Method) -> Method:
  """Adds ``method`` to :data:`REGISTRY` (its name must be new); returns it."""
  if method.name in REGISTRY:
    raise ValueError(f"--method={method.name} is already registered.")
  REGISTRY[method.name] = method
  return method


@contextlib.contextmanager
def registered(method: Method) -> Iterator[Method]:
  """:func:`register` for the duration of a ``with`` block (tests)."""
  register(method)
  try:
    yield method
  finally:
    del REGISTRY[method.name]


def help_text() -> str:
  """``--method``'s help: every entry with its :attr:`Method.help`."""
  return ("What to do with the scale-invariant weights: "
          + ", ".join(m.name if m.help is None else f"{m.name} ({m.help})"
                      for m in REGISTRY.values()) + ".")


# ---------------------------------------------------------------------- the optimizer


def grouped_schedule(config: "Config", schedule: optax.Schedule) -> optax.Schedule:
  """The learning rate of the grouped weights: ``schedule``, or the method's own
  (:attr:`Method.grouped_rate`: ``--method=exp_lr``'s grows as ``lr * alpha**(-2t-1)``,
  ``--method=rotational``'s is its target angle on the schedule's shape)."""
  method = get(config.method)
  return schedule if method.grouped_rate is None else method.grouped_rate(config, schedule)


def step_hyperparameters(config: "Config") -> dict[str, float]:
  """The settings a run's train step takes as arguments rather than as constants.

  For a :attr:`Method.sweepable` method (no rate computed on the host when its chain
  is built): ``lr``, and ``lam`` where the method takes it, less those in
  :attr:`Method.folded`; with ``--ungrouped_lr`` on the constant schedule,
  ``ungrouped_rate`` (``lr * (ungrouped_lr / lr)``, in double precision, as the
  constant was), and on another schedule ``lr`` stays a constant. ``{}`` for the
  other methods.

  The train step takes them as float32 scalars, which is what the constants became
  beside the launcher's float32 parameters, and rebuilds its chain from them
  (``experiments.trainer.make_step_optimizer``). Runs that differ only in them
  then share one compiled program (JAX's persistent cache finds it), and the
  trained bits are the constants' (measured when this was written, not by a
  test: a SHA-256 of the trained state, equal with and without this for 29
  recipes covering every method). The idea of ``optax.inject_hyperparams``,
  without moving them into the optimizer state, whose structure the checkpoints
  keep.
  """
  method = get(config.method)
  if not method.sweepable:
    return {}
  out = {"lr": config.lr}
  if method.lam and "lam" not in method.folded and config.lam_value != 0:
    out["lam"] = config.lam_value  # (a zero decay stays a constant: optax skips it)
  if "lr" in method.folded:
    del out["lr"]
  if config.ungrouped_lr is not None and "lr" in out:
    if config.schedule == "constant":
      # The other parameters' rate, lr * (ungrouped_lr / lr), is a product of Python
      # floats on the constant schedule: passed whole, as it was computed.
      out["ungrouped_rate"] = config.lr * (config.ungrouped_lr / config.lr)
    else:
      # On the others, schedule(t) * (ungrouped_lr / lr) with lr and the ratio constants
      # compiles to other roundings than with them traced (measured on the cosine): lr
      # stays a constant.
      del out["lr"]
  return out


def make_optimizer(config: "Config", groups, schedule: optax.Schedule, *,
                   ungrouped: Optional[optax.Schedule] = None) -> optax.GradientTransformation:
  """The optax chain of ``--method`` on top of ``--optimizer`` (:attr:`Method.build`).

  The chains end in :func:`normreg.scale_by_learning_rates`: the grouped rate
  (:func:`grouped_schedule`) for the grouped weights and, with ``--ungrouped_lr``,
  the schedule scaled to that peak for the other parameters (a method with its own
  grouped rate keeps ``schedule`` there). The packaged optimizers (spherical,
  adamp/sgdp, nero, hyperball, rotational) take the schedules themselves. Without
  ``--ungrouped_lr`` the chains of ``none``, ``l2`` and ``decoupled`` are
  ``optax.sgd``, ``optax.adam`` and ``optax.adamw`` written out, with the same numbers.
  ``ungrouped`` is that rate of the other parameters when the caller has it (from
  the traced values of :func:`step_hyperparameters`).
  """
  if config.method not in REGISTRY:
    raise ValueError(f"--method={config.method!r} is unknown.")
  method = REGISTRY[config.method]
  if ungrouped is None and config.ungrouped_lr is not None:
    ungrouped = lambda t: schedule(t) * (config.ungrouped_lr / config.lr)
  if ungrouped is None and method.grouped_rate is not None:
    ungrouped = schedule  # only the grouped weights' rate is the method's own
  return method.build(Parts(config, groups, schedule, ungrouped,
                            grouped_schedule(config, schedule)))

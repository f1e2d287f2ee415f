"""Closed-form predictions for scale-invariant weights under SGD, SGDW, AdamW and Muon.

The model (van Laarhoven 2017; Wan et al. 2020; Kosson et al. 2024): one unit
``w`` in ``R^D`` whose loss is scale-invariant, so its gradient is tangent
(``<w, g> = 0``) and scales as ``||g|| = G / ||w||``, with ``G`` the gradient
norm the unit would have at ``||w|| = 1``. Gradients of successive steps are
taken as uncorrelated (the noise-dominated regime of late training). Symbols:

- ``eta`` the learning rate, ``mu`` heavy-ball momentum (``optax.trace``),
  ``beta1`` Adam's first-moment decay;
- ``lam_wd`` the coefficient of ``w`` in the gradient for coupled L2: the
  penalty ``lam*||w||^2`` gives ``lam_wd = 2*lam`` (``normreg.add_l2_penalty``
  takes ``lam``); ``wd`` the decoupled decay (``optax.add_decayed_weights``),
  applied as ``w <- w - eta*wd*w`` (AdamW, SGDW: multiplied by the learning
  rate, not passed through the momentum).

**Norm balance.** Write ``x = ||w||^2``. For coupled L2 with momentum, the
decay enters the momentum, so per step it removes ``2 eta lam_wd x / (1-mu)``,
while the tangent steps add ``eta^2 G^2 / ((1-mu)^2 x)`` (the momentum sum of
uncorrelated gradients, including its correlation with ``w``). In continuous
time ``y = x^2 = ||w||^4`` is linear:

.. math::

  \\frac{dy}{dt} = -\\frac{4\\eta\\lambda_{wd}}{1-\\mu}\\, y
                 + \\frac{2\\eta^2 G^2}{(1-\\mu)^2}
  \\;\\Rightarrow\\;
  y(t) = y_\\infty + (y_0 - y_\\infty)\\, e^{-4\\eta\\lambda_{wd} t/(1-\\mu)},
  \\quad y_\\infty = \\frac{\\eta G^2}{2\\lambda_{wd}(1-\\mu)} .

Without decay (``lam_wd = 0``) ``y(t) = y_0 + 2 eta^2 G^2 t / (1-mu)^2``: the
norm grows like ``t^(1/4)`` and the effective learning rate ``eta/||w||^2``
decays like ``1/sqrt(t)``, from a start set by ``||w_0||``.

**Angular update.** At equilibrium a unit turns per step by

.. math::

  \\theta_{\\mathrm{SGD+L2}} = \\sqrt{\\frac{2\\eta\\lambda_{wd}}{1+\\mu}},\\quad
  \\theta_{\\mathrm{SGDW}} = \\sqrt{\\frac{2\\eta\\, wd\\,(1-\\mu)}{1+\\mu}},\\quad
  \\theta_{\\mathrm{AdamW}} = \\sqrt{\\frac{2\\eta\\, wd\\,(1-\\beta_1)}{1+\\beta_1}},

independent of ``G`` and of the initial norm: only the product ``eta*lam``
matters, which is why ``lam`` alone has no regularizing effect (van Laarhoven
2017, sec. 3; Wan et al. 2020, arXiv 2006.08419; Kosson et al. 2024, Table 1).

**Time constants.** Near equilibrium the norm relaxes exponentially, and
the time constant (in steps) says how long a run must be before an
equilibrium quantity can be measured: ``(1-mu)/(4 eta lam_wd)`` for coupled L2
(the decay passes through the momentum, which multiplies it by ``1/(1-mu)``),
``1/(4 eta wd)`` for SGDW (``||w||^4`` relaxes, as for SGD) and
``1/(2 eta wd)`` for AdamW and for Muon (their step does not shrink with
``||w||``, so ``||w||^2`` itself relaxes linearly). A run shorter than a few time
constants measures the transient, not the equilibrium.

**Muon** (Jordan et al. 2024; with decoupled decay as in Liu et al. 2025):
``w <- (1 - eta wd) w - eta O_t``, ``O_t`` the Newton-Schulz orthogonalized
Nesterov momentum times optax's shape factor (the launcher's
``optax.contrib.muon(learning_rate=-1.0)``, then ``+wd*w``, then ``*(-eta)``).
``||O_t||`` does not depend on ``||w||`` (the orthogonalization normalizes), so
as for AdamW ``||w||^2`` relaxes linearly, time constant ``1/(2 eta wd)``. The
norm balance (Kosson et al.'s random walk with correlated steps) counts, besides
``eta^2 Q`` per step with ``Q = E||O_t||_F^2``, the cross terms
``-2 eta <w_t, O_t>``, ``w_t`` holding the past steps ``-eta O_{t-k}``: with
``rho_k = E<O_t, O_{t+k}> / Q`` and ``S = 1 + 2 sum_{k>=1} rho_k``,

.. math::

  \\|w\\|^2_\\infty = \\frac{\\eta\\, Q\\, S}{2\\, wd},\\qquad
  \\theta_{\\mathrm{Muon}} = \\frac{\\eta\\sqrt{Q}}{\\|w\\|_\\infty}
                        = \\sqrt{\\frac{2\\eta\\, wd}{S}} .

This is AdamW's form, whose linear EMA has ``S = (1+beta1)/(1-beta1)``; Muon's
orthogonalization is nonlinear, so its ``S`` (and ``Q``) are measured
(:func:`muon_update_statistics`): ``S = 23.5`` for a square 64x64 matrix at
``beta = 0.95``, 29-31 at aspect ratio 4 (below the 32.9 of the same Nesterov
momentum without orthogonalization). The polar factor of a tangent gradient need
not be tangent to ``w``: the balance assumes that ``<w, O_t>`` has no mean beyond
the correlation with the past updates that ``S`` counts. In the noise-dominated
model it has none: Newton-Schulz is an odd polynomial (``O(-c) = -O(c)``) and the
gradient noise is symmetric, so the sign-flipped gradient history is as likely
and flips every ``O``; ``<w_0, O_t>`` then averages to zero, and only the part of
``w`` made of its own past updates (flipped too) keeps a mean, the one in ``S``.
A systematic gradient (signal, not noise) is outside the model.

**Weight decay is an exponentially growing learning rate** (Li & Arora
2019). For a scale-invariant ``w``, SGD with coupled L2 (``lam_wd``),
momentum ``mu`` and constant ``eta``, and SGD *without* L2 whose learning
rate for ``w`` is ``eta_t = eta * alpha**(-2t-1)`` (the same ``mu``, optax's
convention ``m <- mu m + g; w <- w - eta_t m``), give the same network at
every step: ``w_t = alpha**t * w~_t``. ``alpha`` is the larger root of
``x^2 - (1 + mu - eta lam_wd) x + mu = 0``, which is ``rho = 1 - eta lam_wd``
without momentum; with momentum the twin's buffer starts at
``(alpha - 1)/(eta alpha) * w_0`` instead of 0 (:func:`exponential_lr_momentum_init`).

References:
  van Laarhoven, arXiv 1706.05350 (2017); Li & Arora, arXiv 1910.07454 (2019);
  Wan et al., arXiv 2006.08419 (2020); Kosson et al., *Rotational equilibrium*,
  arXiv 2305.17212 (2024); Jordan et al., *Muon: an optimizer for hidden layers
  in neural networks* (2024, kellerjordan.github.io/posts/muon); Liu et al.,
  *Muon is scalable for LLM training*, arXiv 2502.16982 (2025).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import optax

__all__ = (
    "equilibrium_angle_sgd",
    "equilibrium_angle_sgdw",
    "equilibrium_angle_adamw",
    "equilibrium_norm_sgd",
    "equilibrium_elr_sgd",
    "norm_trajectory_sgd",
    "steps_to_equilibrium",
    "spherical_learning_rate",
    "time_constant_sgd",
    "time_constant_sgdw",
    "time_constant_adamw",
    "exponential_lr_rate",
    "exponential_lr_schedule",
    "exponential_lr_momentum_init",
    "equilibrium_angle_adamp",
    "equilibrium_angle_sgdp",
    "lion_sign_correlation",
    "equilibrium_angle_lion",
    "muon_update_statistics",
    "equilibrium_angle_muon",
    "equilibrium_norm_muon",
    "time_constant_muon",
    "angle_nero",
    "angle_adamh",
    "angle_rotational",
    "weight_decay_timescale",
    "weight_decay_for_timescale",
)


def _check(**values: float) -> None:
  for name, value in values.items():
    if (name in ("lr", "grad_norm", "init_norm", "rtol", "update_sq_norm", "correlation")
        and not value > 0):
      raise ValueError(f"{name} must be > 0, got {value}.")
    if name in ("lam_wd", "wd") and not value >= 0:
      raise ValueError(f"{name} must be >= 0, got {value}.")
    if name in ("momentum", "b1", "b2", "beta") and not 0 <= value < 1:
      raise ValueError(f"{name} must be in [0, 1), got {value}.")


def equilibrium_angle_sgd(lr: float, lam_wd: float, momentum: float = 0.0) -> float:
  """Radians per step at equilibrium, SGD with coupled L2: ``sqrt(2 eta lam_wd / (1+mu))``.

  ``lam_wd`` is the coefficient of ``w`` in the gradient (``2*lam`` for the
  penalty ``lam*||w||^2``).

  Examples:
    >>> round(equilibrium_angle_sgd(0.1, 2 * 5e-4, momentum=0.9), 5)
    0.01026
  """
  _check(lr=lr, lam_wd=lam_wd, momentum=momentum)
  return math.sqrt(2 * lr * lam_wd / (1 + momentum))


def equilibrium_angle_sgdw(lr: float, wd: float, momentum: float = 0.0) -> float:
  """Radians per step at equilibrium, SGD with decoupled decay ``w <- w - eta*wd*w``.

  The decay bypasses the momentum, so it is weaker by ``1-mu`` than coupled L2
  with ``lam_wd = wd``: ``sqrt(2 eta wd (1-mu) / (1+mu))``.
  """
  _check(lr=lr, wd=wd, momentum=momentum)
  return math.sqrt(2 * lr * wd * (1 - momentum) / (1 + momentum))


def equilibrium_angle_adamw(lr: float, wd: float, b1: float = 0.9) -> float:
  """Radians per step at equilibrium, AdamW (decay multiplied by the learning rate).

  ``sqrt(2 eta wd (1-beta1) / (1+beta1))`` (Kosson et al. 2024).
  """
  _check(lr=lr, wd=wd, b1=b1)
  return math.sqrt(2 * lr * wd * (1 - b1) / (1 + b1))


def equilibrium_norm_sgd(lr: float, lam_wd: float, grad_norm: float,
                         momentum: float = 0.0) -> float:
  """``||w||`` at equilibrium, SGD + coupled L2: ``(eta G^2 / (2 lam_wd (1-mu)))^(1/4)``.

  ``grad_norm`` is ``G``, the gradient norm at ``||w|| = 1``.
  """
  _check(lr=lr, lam_wd=lam_wd, grad_norm=grad_norm, momentum=momentum)
  if lam_wd == 0:
    return math.inf
  return (lr * grad_norm ** 2 / (2 * lam_wd * (1 - momentum))) ** 0.25


def equilibrium_elr_sgd(lr: float, lam_wd: float, grad_norm: float,
                        momentum: float = 0.0) -> float:
  """Effective learning rate ``eta / ||w||^2`` at equilibrium, SGD + coupled L2.

  Equals ``sqrt(2 eta lam_wd (1-mu)) / G``.
  """
  return lr / equilibrium_norm_sgd(lr, lam_wd, grad_norm, momentum) ** 2


def norm_trajectory_sgd(step: float, lr: float, lam_wd: float, grad_norm: float,
                        init_norm: float, momentum: float = 0.0) -> float:
  """``||w_t||`` for SGD + coupled L2 (``lam_wd = 0``: no decay), closed form.

  ``||w_t||^4 = y_inf + (||w_0||^4 - y_inf) exp(-4 eta lam_wd t / (1-mu))``, and
  ``||w_t||^4 = ||w_0||^4 + 2 eta^2 G^2 t / (1-mu)^2`` without decay.
  """
  _check(lr=lr, lam_wd=lam_wd, grad_norm=grad_norm, init_norm=init_norm, momentum=momentum)
  y0 = init_norm ** 4
  if lam_wd == 0:
    return (y0 + 2 * lr ** 2 * grad_norm ** 2 * step / (1 - momentum) ** 2) ** 0.25
  y_inf = equilibrium_norm_sgd(lr, lam_wd, grad_norm, momentum) ** 4
  rate = 4 * lr * lam_wd / (1 - momentum)
  return (y_inf + (y0 - y_inf) * math.exp(-rate * step)) ** 0.25


def steps_to_equilibrium(lr: float, lam_wd: float, grad_norm: float, init_norm: float,
                         momentum: float = 0.0, rtol: float = 0.05) -> float:
  """Steps until ``||w||^4`` is within ``rtol`` of its equilibrium (SGD + coupled L2).

  From the closed form: ``t = (1-mu) ln(|y_0 - y_inf| / (rtol y_inf)) / (4 eta lam_wd)``;
  0 if it starts there. The time constant ``(1-mu)/(4 eta lam_wd)`` is set by
  ``eta*lam`` alone.
  """
  _check(lr=lr, lam_wd=lam_wd, grad_norm=grad_norm, init_norm=init_norm,
         momentum=momentum, rtol=rtol)
  if lam_wd == 0:
    return math.inf
  y_inf = equilibrium_norm_sgd(lr, lam_wd, grad_norm, momentum) ** 4
  gap = abs(init_norm ** 4 - y_inf) / (rtol * y_inf)
  return 0.0 if gap <= 1 else (1 - momentum) * math.log(gap) / (4 * lr * lam_wd)


def spherical_learning_rate(lr: float, lam_wd: float, grad_norm: float,
                            momentum: float = 0.0) -> float:
  """The learning rate of spherical SGD that matches an SGD + L2 recipe at equilibrium.

  On the unit sphere the effective learning rate is the learning rate itself,
  so the match is the equilibrium ``eta/||w||^2`` of the L2 recipe,
  ``sqrt(2 eta lam_wd (1-mu)) / G``: two hyperparameters (``eta``, ``lam``)
  become one (van Laarhoven 2017, sec. 4). With the same momentum, both then
  turn each unit by ``sqrt(2 eta lam_wd / (1+mu))`` per step.

  Examples:
    >>> eta_s = spherical_learning_rate(0.1, 1e-3, grad_norm=2.0, momentum=0.9)
    >>> round(eta_s, 6)
    0.002236
  """
  return equilibrium_elr_sgd(lr, lam_wd, grad_norm, momentum)


def time_constant_sgd(lr: float, lam_wd: float, momentum: float = 0.0) -> float:
  """Steps per e-fold of the approach to equilibrium, SGD + coupled L2: ``(1-mu)/(4 eta lam_wd)``.

  The rate of ``||w||^4`` in the closed form of :func:`norm_trajectory_sgd`.

  Examples:
    >>> round(time_constant_sgd(0.1, 2 * 2e-3, momentum=0.9), 3)
    62.5
  """
  _check(lr=lr, lam_wd=lam_wd, momentum=momentum)
  return math.inf if lam_wd == 0 else (1 - momentum) / (4 * lr * lam_wd)


def time_constant_sgdw(lr: float, wd: float) -> float:
  """Steps per e-fold of the approach to equilibrium, SGD with decoupled decay: ``1/(4 eta wd)``.

  The decay ``w <- w - eta*wd*w`` bypasses the momentum, so ``mu`` does not enter.
  """
  _check(lr=lr, wd=wd)
  return math.inf if wd == 0 else 1 / (4 * lr * wd)


def time_constant_adamw(lr: float, wd: float) -> float:
  """Steps per e-fold of the approach to equilibrium, AdamW: ``1/(2 eta wd)``.

  Adam's step has a size independent of ``||w||``, so ``||w||^2`` obeys
  ``x <- (1 - eta wd)^2 x + const`` and relaxes at rate ``2 eta wd``.
  """
  _check(lr=lr, wd=wd)
  return math.inf if wd == 0 else 1 / (2 * lr * wd)


def exponential_lr_rate(lr: float, lam_wd: float, momentum: float = 0.0) -> float:
  """``alpha`` of Li & Arora's equivalence: the larger root of ``x^2 - (1+mu-eta lam_wd) x + mu``.

  ``1 - eta*lam_wd`` without momentum.

  Examples:
    >>> exponential_lr_rate(0.1, 0.01)
    0.999
  """
  _check(lr=lr, lam_wd=lam_wd, momentum=momentum)
  b = 1 + momentum - lr * lam_wd
  disc = b * b - 4 * momentum
  if disc < 0:
    raise ValueError(f"lr*lam_wd = {lr * lam_wd} is too large for momentum {momentum}: "
                     "x^2 - (1+mu-eta*lam_wd) x + mu has no real root.")
  return (b + math.sqrt(disc)) / 2


def exponential_lr_schedule(lr: float, lam_wd: float, momentum: float = 0.0):
  """The learning rate of SGD without L2 that equals SGD with coupled L2 (Li & Arora 2019).

  An optax schedule ``t -> eta * alpha**(-2t-1)`` (:func:`exponential_lr_rate`), for the
  scale-invariant weights only: the other parameters keep ``eta``, unregularized in both
  runs. Evaluated as ``exp(-(2t+1) ln alpha)`` in float32.

  Examples:
    >>> import optax
    >>> schedule = exponential_lr_schedule(0.1, 0.01)  # rho = 0.999
    >>> [round(float(schedule(t)), 6) for t in (0, 1, 1000)]
    [0.1001, 0.100301, 0.740386]
  """
  log_alpha = math.log(exponential_lr_rate(lr, lam_wd, momentum))

  def schedule(count):
    t = jnp.asarray(count, jnp.float32)
    return jnp.float32(lr) * jnp.exp(-(2 * t + 1) * jnp.float32(log_alpha))

  return schedule


def exponential_lr_momentum_init(lr: float, lam_wd: float, momentum: float) -> float:
  """``k`` such that the twin of :func:`exponential_lr_schedule` starts its buffer at ``k w_0``.

  ``k = (alpha - 1)/(eta alpha)``; 0 without momentum. With a zero buffer the
  first step of the twin would not match (the L2 run's buffer holds
  ``lam_wd w`` from step 1 on, which the twin must carry from the start).
  """
  alpha = exponential_lr_rate(lr, lam_wd, momentum)
  return 0.0 if momentum == 0 else (alpha - 1) / (lr * alpha)


# ------------------------------------------------------ the angular-update family


def equilibrium_angle_adamp(lr: float, wd: float, wd_ratio: float = 0.1) -> float:
  """Radians per step at equilibrium, AdamP (:func:`normreg.adamp`): ``sqrt(2 eta wd r)``.

  AdamP removes the radial part of Adam's step, so ``||w||^2`` obeys exactly
  ``x <- (1 - eta wd r)^2 x + eta^2 ||d_perp||^2`` and the angle
  ``eta ||d_perp|| / ||w||`` settles at ``sqrt(2 eta wd r)``: unlike AdamW's, no
  ``(1-beta1)/(1+beta1)`` (the radial part of the momentum is gone). ``r`` is
  the ``wd_ratio``.

  Examples:
    >>> round(equilibrium_angle_adamp(1e-3, 1.0, 0.5), 6)
    0.031623
  """
  _check(lr=lr, wd=wd)
  return math.sqrt(2 * lr * wd * wd_ratio)


def equilibrium_angle_sgdp(lr: float, wd: float, momentum: float = 0.9,
                           wd_ratio: float = 0.1) -> float:
  """Radians per step at equilibrium, SGDP (:func:`normreg.sgdp`): ``sqrt(2 eta wd r/(1-mu))``.

  SGDP divides its decay by ``1 - mu`` and, like AdamP, keeps only the tangent
  part of the momentum step.
  """
  _check(lr=lr, wd=wd, momentum=momentum)
  return math.sqrt(2 * lr * wd * wd_ratio / (1 - momentum))


def lion_sign_correlation(b1: float = 0.9, b2: float = 0.99, terms: int = 100000) -> float:
  """``sum_k rho_k``: the summed autocorrelation of Lion's sign update per coordinate.

  In the random-walk model (fresh Gaussian gradients ``g`` each step), Lion's
  ``c_t = b1 m_{t-1} + (1-b1) g_t`` with ``m_t = b2 m_{t-1} + (1-b2) g_t`` is a
  Gaussian process with ``corr(c_t, c_{t+k}) = b1 b2^(k-1) cov(c, m) / var(c)``;
  the signs then correlate by the arcsine law, ``rho_k = (2/pi) arcsin(r_k)``.
  """
  _check(b1=b1, b2=b2)
  var_m = (1 - b2) / (1 + b2)
  var_c = b1 ** 2 * var_m + (1 - b1) ** 2
  cov_cm = b1 * b2 * var_m + (1 - b1) * (1 - b2)
  total, r = 0.0, b1 * cov_cm / var_c
  for _ in range(terms):
    total += 2 / math.pi * math.asin(min(r, 1.0))
    r *= b2
    if r < 1e-15:
      break
  return total


def equilibrium_angle_lion(lr: float, wd: float, b1: float = 0.9, b2: float = 0.99) -> float:
  """Radians per step at equilibrium, Lion with decoupled decay (``optax.lion``).

  Kosson et al.'s random-walk balance with a correlated update: the norm grows
  by the long-run diffusion of the updates, ``eta^2 D (1 + 2 sum_k rho_k)`` per
  step, while each step turns by ``eta sqrt(D) / ||w||`` (a sign per coordinate),
  so ``theta = sqrt(2 eta wd / (1 + 2 sum_k rho_k))`` with ``rho_k`` the sign
  update's autocorrelation (:func:`lion_sign_correlation`). For ``b1 = 0.9,
  b2 = 0.99`` that is ``0.148 sqrt(2 eta wd)``: Lion turns much less than its
  step size suggests, because its successive steps nearly repeat.

  Examples:
    >>> round(equilibrium_angle_lion(1e-3, 1.0) / math.sqrt(2e-3), 3)
    0.148
  """
  _check(lr=lr, wd=wd, b1=b1, b2=b2)
  return math.sqrt(2 * lr * wd / (1 + 2 * lion_sign_correlation(b1, b2)))


@functools.lru_cache(maxsize=None)
def muon_update_statistics(shape: tuple[int, int] = (64, 64), beta: float = 0.95,
                           nesterov: bool = True, steps: int = 4000, lags: int = 200,
                           seed: int = 0, orthogonalize: bool = True) -> tuple[float, float]:
  """``(Q, S)`` of Muon's update, measured: ``E||O_t||_F^2`` and ``1 + 2 sum_k rho_k``.

  The random-walk model's constants for :func:`equilibrium_norm_muon` and
  :func:`equilibrium_angle_muon`. I.i.d. standard Gaussian gradients of ``shape``
  (rows = fan-in, the reduction axis of optax's default ``MuonDimensionNumbers``)
  go through ``optax.contrib.scale_by_muon(beta=beta, nesterov=nesterov)`` (its
  default Newton-Schulz: 5 steps of ``(3.4445, -4.7750, 2.0315)``) times
  ``sqrt(max(1, cols/rows))``, the shape factor ``optax.contrib.muon`` applies (so
  ``optax.contrib.muon(learning_rate=-1.0)`` on a 2-D leaf steps exactly these
  ``O_t``; ``tests/test_theory_muon.py`` checks it), for ``steps`` steps in one
  jitted ``jax.lax.scan``. The first ``ceil(10/(1-beta))`` steps (bias correction,
  momentum warm-up) are discarded; then ``Q`` is the mean ``||O_t||_F^2``,
  ``rho_k`` the mean ``<O_t, O_{t+k}>`` over ``Q``, summed to ``lags`` (a ring buffer
  of the last ``lags + 1`` updates, so memory does not grow with ``steps``).

  ``rho_k`` decays as ``beta^k`` (0.951 per lag measured at ``beta = 0.95``, after
  ``rho_1 = 0.62`` at 64x64), so the tail past ``lags = 200`` is below ``1e-4`` of
  ``S`` for ``beta <= 0.95`` (for a larger ``beta`` take ``lags ~ 10/(1-beta)`` and
  more ``steps``). The statistical error of ``S`` at the defaults is ~1.2% (std
  over seeds; ~0.5% at ``steps = 16000``; more for fewer entries), ``Q``'s is
  negligible. Results are cached (``shape`` must be a tuple). Measured, Nesterov,
  ``steps = 8000``:

  | shape   | ``Q``  | ``Q/(min*w^2)`` | ``S``, beta 0.95 | ``S``, beta 0.9 |
  | ------- | ------ | --------------- | ---------------- | --------------- |
  | 64x64   | 48.9   | 0.765           | 23.5             | 10.1            |
  | 32x32   | 24.8   | 0.776           | 24.1             | 10.4            |
  | 64x16   | 13.0   | 0.811           | 31.2             | 13.4            |
  | 16x64   | 51.8   | 0.810           | 31.2             | 13.4            |
  | 256x64  | 46.9   | 0.732           | 30.8             | 13.2            |
  | 128x512 | 384.1  | 0.750           | 29.0             | 12.5            |

  (``w^2 = max(1, cols/rows)``; ``Q`` does not depend on ``beta``, to 0.1%.)
  Heavy-ball momentum (``nesterov=False``) at 64x64: ``S = 28.7`` (0.95), 14.0 (0.9).
  For comparison, the same momentum without orthogonalization has
  ``S = 1/(b^4 (1-b)/(1+b) + (1-b^2)^2)``, 32.9 (0.95) and 14.2 (0.9), with
  Nesterov, and ``(1+b)/(1-b)``, 39 and 19, without.

  ``S`` is **not** shape-free: the orthogonalization decorrelates successive updates
  most for square matrices (whose many small singular values it raises to ~1),
  ``S ~ 0.72`` of the linear value, against 0.88-0.95 at aspect ratio 4. At
  ``beta = 0.95`` it spans 23.5-31.2 (``+-14%``), so the angle, ``~ S^(-1/2)``, spans
  ``+-7%``: the default 64x64 overstates the angle of a 4:1 matrix by ~15%. Pass the
  layer's own shape. ``Q`` says Newton-Schulz's singular values are not 1: their
  mean square is 0.73-0.81.

  ``orthogonalize=False`` skips Newton-Schulz (``ns_steps=0``: the momentum over
  its Frobenius norm, a linear filter up to that nearly constant norm), where ``S``
  must match the closed forms above: a check of the estimator.
  """
  _check(beta=beta)
  if len(shape) != 2 or min(shape) < 1:
    raise ValueError(f"shape must be a 2-D matrix shape, got {shape}.")
  burn = math.ceil(10 / (1 - beta))
  if not lags >= 1 or not steps > burn + 2 * lags:
    raise ValueError(f"need lags >= 1 and steps > burn-in + 2*lags = {burn} + 2*{lags}, "
                     f"got steps={steps}, lags={lags}.")
  rows, cols = shape
  muon = optax.contrib.scale_by_muon(beta=beta, nesterov=nesterov,
                                     ns_steps=5 if orthogonalize else 0)
  width = math.sqrt(max(1.0, cols / rows))  # optax.contrib.muon's scale_by_shape
  slots = lags + 1  # a ring buffer of the last lags+1 updates: lag 0 .. lags
  key = jax.random.key(seed)

  def body(carry, t):
    state, ring, sums = carry
    g = jax.random.normal(jax.random.fold_in(key, t), shape, jnp.float32)
    update, state = muon.update(g, state)
    update = width * update
    ring = jax.lax.dynamic_update_index_in_dim(ring, update, t % slots, 0)
    lag = (t - jnp.arange(slots)) % slots  # slot j holds the update of step t - lag[j]
    dots = jnp.einsum("lij,ij->l", ring, update)
    sums = sums.at[lag].add(jnp.where(t - lag >= burn, dots, 0.0))
    return (state, ring, sums), None

  @jax.jit
  def run():
    init = (muon.init(jnp.zeros(shape, jnp.float32)), jnp.zeros((slots,) + shape),
            jnp.zeros(slots))
    (_, _, sums), _ = jax.lax.scan(body, init, jnp.arange(steps))
    return sums

  sums = run().tolist()
  cov = [total / (steps - burn - k) for k, total in enumerate(sums)]
  return cov[0], 1 + 2 * sum(c / cov[0] for c in cov[1:])


def equilibrium_angle_muon(lr: float, wd: float, correlation: float) -> float:
  """Radians per step at equilibrium, Muon with decoupled decay: ``sqrt(2 eta wd / S)``.

  ``correlation`` is ``S = 1 + 2 sum_k rho_k``, the summed autocorrelation of the
  orthogonalized updates (:func:`muon_update_statistics`, the second value). The
  update ``w <- (1 - eta wd) w - eta O_t`` turns ``w`` by ``eta sqrt(Q)/||w||``, and
  at the equilibrium norm of :func:`equilibrium_norm_muon` that is
  ``sqrt(2 eta wd / S)`` (Kosson et al. 2024's balance, as for
  :func:`equilibrium_angle_adamw` and :func:`equilibrium_angle_lion`; derivation in
  the module docstring). With ``S = 1`` (uncorrelated updates) it is
  ``sqrt(2 eta wd)``; Muon's ``S`` is 23-31 at ``beta = 0.95``, so it turns 5-6
  times less than that. Leading order in ``eta wd / (1-beta)`` and in the radial
  part of ``O_t``, ``(S-1) theta / 2`` of its norm: in simulation (64x16 and 32x32,
  ``eta wd = 1/1200``) the angle comes out 0.5-1% above, ``||w||^2`` 2-3% below.

  Examples:
    >>> round(equilibrium_angle_muon(0.02, 0.1, correlation=23.5), 5)
    0.01305
  """
  _check(lr=lr, wd=wd, correlation=correlation)
  return math.sqrt(2 * lr * wd / correlation)


def equilibrium_norm_muon(lr: float, wd: float, update_sq_norm: float,
                          correlation: float) -> float:
  """``||w||`` at equilibrium, Muon with decoupled decay: ``sqrt(eta Q S / (2 wd))``.

  ``update_sq_norm`` is ``Q = E||O_t||_F^2`` and ``correlation`` is ``S``, both from
  :func:`muon_update_statistics` at the matrix's shape. Per step the decay removes
  ``2 eta wd ||w||^2`` and the correlated updates add ``eta^2 Q S`` (``eta^2 Q``
  from each step, ``eta^2 Q (S-1)`` from its alignment with the earlier steps that
  ``w`` holds). Unlike the angle it depends on ``Q``, so on the shape through the
  shape factor and Newton-Schulz's singular values. The decay also shrinks the
  correlated past updates, which lowers ``||w||^2`` by about a fraction
  ``eta wd / (1-beta)`` (the formula is leading order in it).

  Examples:
    >>> round(equilibrium_norm_muon(0.02, 0.1, update_sq_norm=48.94, correlation=23.5), 3)
    10.724
  """
  _check(lr=lr, wd=wd, update_sq_norm=update_sq_norm, correlation=correlation)
  if wd == 0:
    return math.inf
  return math.sqrt(lr * update_sq_norm * correlation / (2 * wd))


def time_constant_muon(lr: float, wd: float) -> float:
  """Steps per e-fold of the approach to equilibrium, Muon with decoupled decay: ``1/(2 eta wd)``.

  As for AdamW (:func:`time_constant_adamw`): the orthogonalized step has a size
  independent of ``||w||``, so ``||w||^2`` obeys ``x <- (1 - eta wd)^2 x + eta^2 Q S``
  and relaxes at rate ``2 eta wd``.

  Examples:
    >>> time_constant_muon(0.02, 0.1)
    250.0
  """
  _check(lr=lr, wd=wd)
  return math.inf if wd == 0 else 1 / (2 * lr * wd)


def angle_nero(lr: float) -> float:
  """Radians per step of :func:`normreg.nero`: ``arctan(eta)`` on average, ``~eta``.

  Each balanced group steps by ``eta ||w|| g / rms(||g||)``, tangent to it (the
  gradient of a scale-invariant group is), of length ``eta`` on average on the unit
  sphere; there is no equilibrium to reach, the angle is set from the first step.
  """
  _check(lr=lr)
  return math.atan(lr)


def angle_adamh(lr: float) -> float:
  """Radians per step of :func:`normreg.adamh`: at most ``arctan(eta)``, ``~eta``.

  The step ``eta r_0 u/||u||`` has length ``eta r_0``; only its tangent part turns
  the group, so the angle is ``arctan(eta sin(u, w))``: ``~eta`` when Adam's step is
  nearly tangent (high dimensions), less when it has a radial part.
  """
  _check(lr=lr)
  return math.atan(lr)


def angle_rotational(target_angle: float) -> float:
  """Radians per step of :func:`normreg.rotational`: ``arctan(target)``, from the first step.

  The step is ``target r_0 u_perp / rms(||u_perp||)``, tangent, of expected length
  about ``target r_0``; the angle holds from the first step (``rms`` starts at the
  first step's own norm).
  """
  if not target_angle >= 0:
    raise ValueError(f"target_angle must be >= 0, got {target_angle}.")
  return math.atan(target_angle)


def weight_decay_timescale(lr: float, wd: float, steps_per_epoch: Optional[int] = None
                           ) -> float:
  """The timescale of AdamW's weights as an average of updates (Wang & Aitchison 2024).

  AdamW's ``w_t = (1 - eta wd) w_{t-1} - eta u_t`` makes ``w`` an exponential moving
  average of ``-u/wd`` over ``tau_iter = 1/(eta wd)`` steps; in epochs
  ``tau_iter / steps_per_epoch`` (returned when ``steps_per_epoch`` is given). The
  paper recommends keeping ``tau_epoch`` fixed as model and data grow.

  Examples:
    >>> weight_decay_timescale(1e-3, 0.1)
    10000.0
    >>> weight_decay_timescale(1e-3, 0.1, steps_per_epoch=500)
    20.0
  """
  _check(lr=lr, wd=wd)
  tau = math.inf if wd == 0 else 1 / (lr * wd)
  return tau if steps_per_epoch is None else tau / steps_per_epoch


def weight_decay_for_timescale(lr: float, tau: float,
                               steps_per_epoch: Optional[int] = None) -> float:
  """The ``wd`` that gives AdamW the timescale ``tau`` (steps, or epochs with
  ``steps_per_epoch``): ``1 / (eta tau_iter)``, the inverse of
  :func:`weight_decay_timescale`.

  Examples:
    >>> weight_decay_for_timescale(1e-3, 20, steps_per_epoch=500)
    0.1
  """
  _check(lr=lr)
  if not tau > 0:
    raise ValueError(f"tau must be > 0, got {tau}.")
  tau_iter = tau * steps_per_epoch if steps_per_epoch is not None else tau
  return 1 / (lr * tau_iter)

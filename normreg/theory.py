"""Closed-form predictions for scale-invariant weights under SGD, SGDW and AdamW.

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
``1/(2 eta wd)`` for AdamW (Adam's step does not shrink with ``||w||``, so
``||w||^2`` itself relaxes linearly). A run shorter than a few time
constants measures the transient, not the equilibrium.

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
  arXiv 2305.17212 (2024).
"""

from __future__ import annotations

import math
from typing import Optional

import jax.numpy as jnp

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
    "angle_nero",
    "angle_adamh",
    "angle_rotational",
    "weight_decay_timescale",
    "weight_decay_for_timescale",
)


def _check(**values: float) -> None:
  for name, value in values.items():
    if name in ("lr", "grad_norm", "init_norm", "rtol") and not value > 0:
      raise ValueError(f"{name} must be > 0, got {value}.")
    if name in ("lam_wd", "wd") and not value >= 0:
      raise ValueError(f"{name} must be >= 0, got {value}.")
    if name in ("momentum", "b1", "b2") and not 0 <= value < 1:
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

"""normreg.theory against simulation of a scale-invariant toy problem.

The toy: 128 units of dimension 64 (one UNIT kernel), each with a random
gradient tangent to it of norm ``G/||w||``, fresh every step: exactly the model
the theory assumes. The optimizers are the real ones (normreg and optax
transforms), run with ``jax.lax.scan``. Tolerance: 10% (the formulas are
small-angle, continuous-time approximations; the angles here are 0.01-0.05).
"""

import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import normreg
from normreg import theory

D, UNITS, G = 64, 128, 2.0
GROUPS = {"w": normreg.UNIT}
RTOL = 0.10


def _simulate(tx, steps, init_norm=1.0, seed=0):
  """Runs ``tx`` on the toy; returns per-step mean unit norm and mean angle."""
  key = jax.random.key(seed)
  w0 = jax.random.normal(key, (D, UNITS))
  w0 = w0 / jnp.linalg.norm(w0, axis=0, keepdims=True) * init_norm
  params = {"w": w0}

  def step(carry, k):
    params, state = carry
    w = params["w"]
    noise = jax.random.normal(k, w.shape)
    norms = jnp.linalg.norm(w, axis=0, keepdims=True)
    tangent = noise - jnp.sum(noise * w, 0, keepdims=True) / norms ** 2 * w
    g = tangent / jnp.linalg.norm(tangent, axis=0, keepdims=True) * G / norms
    updates, state = tx.update({"w": g}, state, params)
    new = optax.apply_updates(params, updates)
    angle = normreg.angular_update(params, new, GROUPS)["w"]
    return (new, state), (jnp.mean(jnp.linalg.norm(new["w"], axis=0)), jnp.mean(angle))

  keys = jax.random.split(jax.random.fold_in(key, 1), steps)
  _, (norms, angles) = jax.jit(lambda c, ks: jax.lax.scan(step, c, ks))(
      (params, tx.init(params)), keys)
  return np.asarray(norms), np.asarray(angles)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_l2_equilibrium_angle_norm_and_elr(momentum):
  lr, lam = 0.1, 5e-3  # lam_wd = 2 * lam = 1e-2
  steps = 3000 if momentum else 4000
  norms, angles = _simulate(normreg.sgd_l2(lr, lam, GROUPS, momentum=momentum), steps)
  tail = slice(-1000, None)
  assert np.mean(angles[tail]) == pytest.approx(
      theory.equilibrium_angle_sgd(lr, 2 * lam, momentum), rel=RTOL)
  assert np.mean(norms[tail]) == pytest.approx(
      theory.equilibrium_norm_sgd(lr, 2 * lam, G, momentum), rel=RTOL)
  assert np.mean(lr / norms[tail] ** 2) == pytest.approx(
      theory.equilibrium_elr_sgd(lr, 2 * lam, G, momentum), rel=2 * RTOL)


def test_equilibrium_angle_depends_on_lr_times_lam_only():
  # Same eta*lam, different lam: same angle; that is "no regularizing effect".
  a = _simulate(normreg.sgd_l2(0.2, 2.5e-3, GROUPS), 4000)[1][-1000:].mean()
  b = _simulate(normreg.sgd_l2(0.05, 1e-2, GROUPS), 4000)[1][-1000:].mean()
  assert a == pytest.approx(b, rel=RTOL)
  assert a == pytest.approx(theory.equilibrium_angle_sgd(0.2, 5e-3), rel=RTOL)


def test_sgdw_equilibrium_angle():
  lr, wd, mu = 0.1, 1e-2, 0.9
  tx = optax.chain(optax.trace(mu), optax.add_decayed_weights(wd, mask=normreg.as_mask(GROUPS)),
                   optax.scale_by_learning_rate(lr))
  # The decay is applied before the learning rate: w <- w - lr*(m + wd*w).
  angles = _simulate(tx, 4000)[1]
  assert angles[-1000:].mean() == pytest.approx(
      theory.equilibrium_angle_sgdw(lr, wd, mu), rel=RTOL)


def test_adamw_equilibrium_angle():
  lr, wd = 1e-3, 0.5
  angles = _simulate(optax.adamw(lr, b1=0.9, weight_decay=wd), 6000)[1]
  assert angles[-1500:].mean() == pytest.approx(theory.equilibrium_angle_adamw(lr, wd, 0.9),
                                                rel=RTOL)


@pytest.mark.parametrize("init_norm", [0.5, 4.0])
def test_norm_trajectory_and_steps_to_equilibrium(init_norm):
  lr, lam_wd = 0.1, 4e-3
  norms, _ = _simulate(normreg.sgd_l2(lr, lam_wd / 2, GROUPS), 3000, init_norm=init_norm)
  for t in (100, 500, 1500, 2999):
    assert norms[t] == pytest.approx(
        theory.norm_trajectory_sgd(t + 1, lr, lam_wd, G, init_norm), rel=RTOL / 2)
  eq = theory.equilibrium_norm_sgd(lr, lam_wd, G)
  t_eq = theory.steps_to_equilibrium(lr, lam_wd, G, init_norm, rtol=0.1)
  within = np.abs(norms ** 4 - eq ** 4) <= 0.1 * eq ** 4
  assert within.any() and t_eq < len(norms)
  reached = np.argmax(within)
  assert reached == pytest.approx(t_eq, rel=0.25)


def test_without_decay_norm_grows_and_elr_decays_by_initial_scale():
  lr = 0.01
  runs = {s: _simulate(optax.sgd(lr), 2000, init_norm=s)[0] for s in (0.5, 2.0)}
  for s, norms in runs.items():
    assert np.all(np.diff(norms) > 0)  # tangent steps only lengthen w
    for t in (10, 1999):
      assert norms[t] == pytest.approx(theory.norm_trajectory_sgd(t + 1, lr, 0.0, G, s),
                                       rel=RTOL / 2)
  # The effective learning rate at step 2000 still depends on where it started.
  assert lr / runs[0.5][-1] ** 2 > 1.5 * lr / runs[2.0][-1] ** 2


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_spherical_sgd_at_mapped_lr_matches_l2_equilibrium(momentum):
  lr, lam = 0.1, 5e-3
  eta_s = theory.spherical_learning_rate(lr, 2 * lam, G, momentum)
  norms, angles = _simulate(normreg.spherical_sgd(eta_s, GROUPS, momentum=momentum), 1000)
  np.testing.assert_allclose(norms, 1.0, atol=1e-5)
  assert angles[-500:].mean() == pytest.approx(
      theory.equilibrium_angle_sgd(lr, 2 * lam, momentum), rel=RTOL)


def test_bad_arguments_are_errors():
  with pytest.raises(ValueError, match="lr must be > 0"):
    theory.equilibrium_angle_sgd(0.0, 1e-3)
  with pytest.raises(ValueError, match="momentum"):
    theory.equilibrium_norm_sgd(0.1, 1e-3, 1.0, momentum=1.0)
  with pytest.raises(ValueError, match="lam_wd must be >= 0"):
    theory.steps_to_equilibrium(0.1, -1e-3, 1.0, 1.0)


# ------------------------------------------------------------------ time constants


def _relaxation_steps(series, start, end):
  """First step where ``series`` has covered 1 - 1/e of the way from ``start`` to ``end``."""
  covered = (np.asarray(series) - start) / (end - start)
  return int(np.argmax(covered >= 1 - np.exp(-1)))


def test_sgdw_time_constant_against_simulation():
  # ||w||^4 relaxes with time constant 1/(4 eta wd). Start above the equilibrium
  # (||w|| = 10 here), where every step is a small angle as the theory assumes.
  lr, wd, mu = 0.1, 2e-3, 0.9
  tx = optax.chain(optax.trace(mu), optax.add_decayed_weights(wd, mask=normreg.as_mask(GROUPS)),
                   optax.scale_by_learning_rate(lr))
  norms, _ = _simulate(tx, 6000, init_norm=30.0)
  y = norms ** 4
  tau = theory.time_constant_sgdw(lr, wd)
  assert tau == pytest.approx(1250.0)
  assert _relaxation_steps(y, y[0], y[-1000:].mean()) == pytest.approx(tau, rel=0.2)


def test_sgd_l2_time_constant_against_simulation():
  lr, lam, mu = 0.1, 2e-3, 0.9  # lam_wd = 4e-3: (1 - mu)/(4 eta lam_wd) = 62.5 steps
  eq = theory.equilibrium_norm_sgd(lr, 2 * lam, G, mu)
  norms, _ = _simulate(normreg.sgd_l2(lr, lam, GROUPS, momentum=mu), 1500, init_norm=3 * eq)
  y = norms ** 4
  tau = theory.time_constant_sgd(lr, 2 * lam, mu)
  assert tau == pytest.approx(62.5)
  assert _relaxation_steps(y, y[0], y[-500:].mean()) == pytest.approx(tau, rel=0.2)


def test_adamw_time_constant_against_simulation():
  # ||w||^2 (not ^4) relaxes, with time constant 1/(2 eta wd).
  lr, wd = 1e-3, 1.0
  norms, _ = _simulate(optax.adamw(lr, b1=0.9, weight_decay=wd), 4000, init_norm=3.0)
  x = norms ** 2
  tau = theory.time_constant_adamw(lr, wd)
  assert tau == pytest.approx(500.0)
  assert _relaxation_steps(x, x[0], x[-1000:].mean()) == pytest.approx(tau, rel=0.2)


def test_time_constants_without_decay_are_infinite():
  assert theory.time_constant_sgd(0.1, 0.0) == float("inf")
  assert theory.time_constant_sgdw(0.1, 0.0) == float("inf")
  assert theory.time_constant_adamw(0.1, 0.0) == float("inf")


# --------------------------------------------- weight decay as exponential learning rate


def _invariant_quadratic(seed=0, dim=10):
  """numpy float64: the gradient of ``L(w) = u^T A u / 2``, ``u = w/||w||`` (scale-invariant)."""
  rng = np.random.default_rng(seed)
  a = rng.standard_normal((dim, dim))
  a = a @ a.T

  def grad(w):
    n = np.linalg.norm(w)
    u = w / n
    g = a @ u
    return (g - (u @ g) * u) / n

  return grad, rng.standard_normal(dim)


@pytest.mark.parametrize("momentum, lam_wd", [(0.0, 0.02), (0.9, 0.02), (0.5, 0.1)])
def test_exponential_lr_twin_is_sgd_with_l2(momentum, lam_wd):
  """Hand-written float64 loops: SGD + coupled L2 with heavy-ball momentum against SGD
  without L2 at ``theory.exponential_lr_schedule`` (optax's momentum convention, buffer
  started at ``exponential_lr_momentum_init``): ``w_t = alpha^t w~_t`` at every step."""
  lr = 0.1
  grad, w = _invariant_quadratic()
  alpha = theory.exponential_lr_rate(lr, lam_wd, momentum)
  schedule = theory.exponential_lr_schedule(lr, lam_wd, momentum)
  k = theory.exponential_lr_momentum_init(lr, lam_wd, momentum)
  v = np.zeros_like(w)
  twin, v_twin = w.copy(), k * w
  # 60 steps: on this noise-free toy the L2 run converges, its norm then shrinks and its
  # effective lr explodes into chaos after ~100 steps, which float64 cannot follow either.
  for t in range(60):
    v = momentum * v + grad(w) + lam_wd * w
    w = w - lr * v
    # The schedule in float64 (the float32 one is checked against this below).
    eta_t = lr * alpha ** (-2 * t - 1)
    v_twin = momentum * v_twin + grad(twin)
    twin = twin - eta_t * v_twin
    np.testing.assert_allclose(w / alpha ** (t + 1), twin, rtol=1e-7,
                               atol=1e-9 * np.abs(twin).max())
    if t in (0, 1, 30, 59):
      assert float(schedule(t)) == pytest.approx(eta_t, rel=1e-5)
  assert alpha ** 2 - (1 + momentum - lr * lam_wd) * alpha + momentum == pytest.approx(0.0)


def test_exponential_lr_without_momentum_is_one_minus_eta_lam():
  assert theory.exponential_lr_rate(0.1, 0.01) == pytest.approx(0.999)
  assert theory.exponential_lr_momentum_init(0.1, 0.01, 0.0) == 0.0
  with pytest.raises(ValueError, match="no real root"):
    theory.exponential_lr_rate(0.1, 0.1, momentum=0.9)  # eta*lam_wd > (1 - sqrt(mu))^2


# ------------------------------------------------------ the angular-update family


def test_adamp_equilibrium_angle():
  # Started near its equilibrium norm (AdamP's decay is slow to close a large gap).
  lr, wd, ratio = 1e-3, 1.0, 0.5
  x_eq = lr * D * (1 - 0.9) / (1 + 0.9) / (2 * wd * ratio)  # eta E||d_perp||^2 / (2 wd r)
  angles = _simulate(normreg.adamp(lr, GROUPS, weight_decay=wd, wd_ratio=ratio), 4000,
                     init_norm=np.sqrt(x_eq))[1]
  assert angles[-1500:].mean() == pytest.approx(theory.equilibrium_angle_adamp(lr, wd, ratio),
                                                rel=RTOL)
  # Not AdamW's formula: the projection removed the momentum's radial part.
  assert angles[-1500:].mean() > 2 * theory.equilibrium_angle_adamw(lr, wd * ratio, 0.9)


def test_sgdp_equilibrium_angle():
  lr, wd, mu, ratio = 0.1, 1e-2, 0.9, 0.5
  angles = _simulate(normreg.sgdp(lr, GROUPS, momentum=mu, weight_decay=wd, wd_ratio=ratio),
                     4000)[1]
  assert angles[-1000:].mean() == pytest.approx(
      theory.equilibrium_angle_sgdp(lr, wd, mu, ratio), rel=RTOL)


def test_lion_equilibrium_angle():
  lr, wd = 1e-3, 1.0
  angles = _simulate(optax.lion(lr, weight_decay=wd), 6000)[1]
  assert angles[-1500:].mean() == pytest.approx(theory.equilibrium_angle_lion(lr, wd),
                                                rel=RTOL)


@pytest.mark.parametrize("make, angle", [
    (lambda: normreg.nero(0.01, GROUPS), theory.angle_nero(0.01)),
    (lambda: normreg.adamh(0.01, GROUPS), theory.angle_adamh(0.01)),
    (lambda: normreg.rotational(optax.sgd(0.1, momentum=0.9), GROUPS, 0.02),
     theory.angle_rotational(0.02)),
])
def test_angle_set_from_the_first_steps(make, angle):
  angles = _simulate(make(), 1000)[1]
  # No transient (the first step of Nero also balances the random init: left out).
  assert angles[1:50].mean() == pytest.approx(angle, rel=0.15)
  assert angles[-500:].mean() == pytest.approx(angle, rel=RTOL)


def test_weight_decay_timescale_is_the_ema_horizon_of_adamw():
  # A constant gradient: Adam's step is sign(g), so w_t = -(1 - (1 - eta wd)^t) sign(g)/wd,
  # an average of -sign(g)/wd over tau = 1/(eta wd) steps: 1 - 1/e of the way at tau.
  lr, wd = 1e-2, 0.5
  tau = theory.weight_decay_timescale(lr, wd)
  tx = optax.adamw(lr, b1=0.0, b2=0.0, eps=0.0, weight_decay=wd)
  w, state = {"w": jnp.zeros(3)}, None
  state = tx.init(w)
  g = {"w": jnp.array([1.0, -2.0, 0.5])}
  crossed = None
  for t in range(1, int(3 * tau)):
    u, state = tx.update(g, state, w)
    w = optax.apply_updates(w, u)
    if crossed is None and abs(float(w["w"][0])) >= (1 - np.exp(-1)) / wd:
      crossed = t
  assert crossed == pytest.approx(tau, rel=0.02)
  assert theory.weight_decay_timescale(lr, wd, steps_per_epoch=50) == pytest.approx(tau / 50)
  assert theory.weight_decay_for_timescale(lr, tau / 50, steps_per_epoch=50) == pytest.approx(wd)


# ---------------------------------------------------------------- arguments and edges

_VALID = dict(lr=0.1, lam_wd=0.01, wd=0.01, momentum=0.9, b1=0.9, b2=0.99, grad_norm=1.0,
              init_norm=1.0, rtol=0.01, step=10, wd_ratio=0.1, target_angle=0.01, tau=10.0,
              steps_per_epoch=100, terms=1000, correlation=20.0, update_sq_norm=10.0)
_BAD = {"lr": [0.0, -0.1], "grad_norm": [0.0, -1.0], "init_norm": [0.0, -1.0],
        "rtol": [0.0, -0.1], "lam_wd": [-0.01], "wd": [-0.01], "momentum": [1.0, -0.1],
        "b1": [1.0, -0.1], "b2": [1.0, -0.1], "tau": [0.0, -1.0], "correlation": [0.0, -1.0],
        "update_sq_norm": [0.0, -1.0]}
# theory.__all__, not vars(theory): a mutation tool adds module-level copies of each function.
_CHECKED = [(name, arg) for name in theory.__all__
            for arg in inspect.signature(getattr(theory, name)).parameters if arg in _BAD]


def test_all_lists_every_public_function():
  # (a function under functools.lru_cache is its __wrapped__)
  public = {name for name, fn in vars(theory).items()
            if inspect.isfunction(getattr(fn, "__wrapped__", fn))
            and getattr(fn, "__module__", None) == theory.__name__
            and not name.startswith(("_", "x_"))}
  assert public == set(theory.__all__)


@pytest.mark.parametrize("name, arg", _CHECKED)
def test_every_theory_function_refuses_bad_arguments_by_name(name, arg):
  fn = getattr(theory, name)
  kwargs = {p: _VALID[p] for p in inspect.signature(fn).parameters if p in _VALID}
  # Without decay too: several functions take a shortcut at lam_wd = 0 / wd = 0.
  points = [kwargs] + [{**kwargs, d: 0.0} for d in ("lam_wd", "wd") if d in kwargs and d != arg]
  for point in points:
    fn(**point)  # the valid point works
    for bad in _BAD[arg]:
      with pytest.raises(ValueError, match=rf"^{arg} must be"):
        fn(**{**point, arg: bad})


def test_sgdp_angle_defaults_are_momentum_09_and_wd_ratio_01():
  assert theory.equilibrium_angle_sgdp(0.1, 0.01) == pytest.approx(
      math.sqrt(2 * 0.1 * 0.01 * 0.1 / (1 - 0.9)), rel=1e-12)


def test_weight_decay_timescale_edges():
  assert theory.weight_decay_timescale(0.1, 0.0) == math.inf
  assert theory.weight_decay_timescale(0.1, 1.0) == pytest.approx(10.0)  # 1/(lr wd), wd = 1
  assert theory.weight_decay_timescale(0.1, 0.5, steps_per_epoch=4) == pytest.approx(5.0)
  assert theory.weight_decay_for_timescale(0.1, 0.5) == pytest.approx(20.0)  # tau < 1 step
  assert theory.weight_decay_for_timescale(0.1, 20.0) == pytest.approx(0.5)  # tau in steps


# ------------------------------------- the closed forms, typed again in numpy, off the defaults
# Each reference is the docstring's equation written out in numpy at a point where no
# factor is 0 or 1 (so a * for a /, a dropped momentum or a 4 for a 5 shows), and the
# defaults are checked by calling with and without them.


def test_equilibrium_angles_norm_and_elr_closed_forms():
  lr, lam, mu, g = 0.05, 3e-3, 0.6, 1.7
  assert theory.equilibrium_angle_sgd(lr, lam, mu) == pytest.approx(
      np.sqrt(2 * lr * lam / (1 + mu)), rel=1e-12)
  assert theory.equilibrium_angle_sgdw(lr, lam, mu) == pytest.approx(
      np.sqrt(2 * lr * lam * (1 - mu) / (1 + mu)), rel=1e-12)
  assert theory.equilibrium_angle_adamw(lr, lam, 0.7) == pytest.approx(
      np.sqrt(2 * lr * lam * 0.3 / 1.7), rel=1e-12)
  norm = np.power(lr * g * g / (2 * lam * (1 - mu)), 0.25)
  assert theory.equilibrium_norm_sgd(lr, lam, g, mu) == pytest.approx(norm, rel=1e-12)
  assert theory.equilibrium_elr_sgd(lr, lam, g, mu) == pytest.approx(lr / norm ** 2, rel=1e-12)
  assert theory.spherical_learning_rate(lr, lam, g, mu) == pytest.approx(
      np.sqrt(2 * lr * lam * (1 - mu)) / g, rel=1e-12)
  assert theory.time_constant_adamw(lr, lam) == pytest.approx(1 / (2 * lr * lam), rel=1e-12)
  assert theory.equilibrium_angle_adamp(lr, lam, 0.3) == pytest.approx(
      np.sqrt(2 * lr * lam * 0.3), rel=1e-12)
  assert theory.equilibrium_norm_sgd(lr, 0.0, g, mu) == math.inf  # no decay: no equilibrium


def test_theory_defaults():
  lr, lam, g = 0.05, 3e-3, 1.7
  assert theory.equilibrium_angle_sgdw(lr, lam) == theory.equilibrium_angle_sgdw(lr, lam, 0.0)
  assert theory.equilibrium_angle_adamw(lr, lam) == theory.equilibrium_angle_adamw(lr, lam, 0.9)
  assert theory.equilibrium_elr_sgd(lr, lam, g) == theory.equilibrium_elr_sgd(lr, lam, g, 0.0)
  assert (theory.spherical_learning_rate(lr, lam, g)
          == theory.spherical_learning_rate(lr, lam, g, 0.0))
  assert (theory.steps_to_equilibrium(lr, lam, g, 3.0)
          == theory.steps_to_equilibrium(lr, lam, g, 3.0, 0.0, 0.05))
  assert theory.equilibrium_angle_adamp(lr, lam) == theory.equilibrium_angle_adamp(lr, lam, 0.1)
  assert float(theory.exponential_lr_schedule(lr, lam)(7)) == pytest.approx(
      float(theory.exponential_lr_schedule(lr, lam, 0.0)(7)), rel=1e-7)
  assert theory.lion_sign_correlation() == theory.lion_sign_correlation(0.9, 0.99)
  assert theory.equilibrium_angle_lion(lr, lam) == theory.equilibrium_angle_lion(lr, lam, 0.9, 0.99)


@pytest.mark.parametrize("init_norm", [0.3, 3.0])
def test_norm_trajectory_and_steps_to_equilibrium_with_momentum(init_norm):
  lr, lam, g, mu = 0.05, 3e-3, 1.7, 0.6
  y_inf = lr * g * g / (2 * lam * (1 - mu))
  rate = 4 * lr * lam / (1 - mu)
  for t in (0, 10, 400):
    y = y_inf + (init_norm ** 4 - y_inf) * np.exp(-rate * t)
    assert theory.norm_trajectory_sgd(t, lr, lam, g, init_norm, mu) == pytest.approx(
        y ** 0.25, rel=1e-12)
    y_free = init_norm ** 4 + 2 * lr ** 2 * g ** 2 * t / (1 - mu) ** 2
    assert theory.norm_trajectory_sgd(t, lr, 0.0, g, init_norm, mu) == pytest.approx(
        y_free ** 0.25, rel=1e-12)
  for rtol in (0.05, 0.2):
    steps = (1 - mu) * np.log(abs(init_norm ** 4 - y_inf) / (rtol * y_inf)) / (4 * lr * lam)
    assert theory.steps_to_equilibrium(lr, lam, g, init_norm, mu, rtol) == pytest.approx(
        steps, rel=1e-12)
  assert theory.steps_to_equilibrium(lr, 0.0, g, init_norm, mu) == math.inf


def test_steps_to_equilibrium_is_zero_inside_the_tolerance():
  lr, lam, g = 0.05, 3e-3, 1.7
  y_inf = theory.equilibrium_norm_sgd(lr, lam, g) ** 4
  for gap in (0.0, 0.5):  # |y0 - y_inf| / (rtol y_inf)
    init = (y_inf * (1 + gap * 0.1)) ** 0.25
    assert theory.steps_to_equilibrium(lr, lam, g, init, rtol=0.1) == 0.0
  init = (y_inf * 1.15) ** 0.25  # gap 1.5: just outside, ln(1.5) time constants
  assert theory.steps_to_equilibrium(lr, lam, g, init, rtol=0.1) == pytest.approx(
      np.log(1.5) / (4 * lr * lam), rel=1e-9)


def test_exponential_lr_rate_at_a_double_root():
  # lr*lam_wd = (1 - sqrt(mu))^2: x^2 - 2 sqrt(mu) x + mu has the double root sqrt(mu).
  assert theory.exponential_lr_rate(0.5, 0.5, 0.25) == pytest.approx(0.5, rel=1e-12)
  with pytest.raises(ValueError, match="too large"):
    theory.exponential_lr_rate(0.5, 0.6, 0.25)


@pytest.mark.parametrize("b1, b2", [(0.9, 0.99), (0.5, 0.9)])
def test_lion_sign_correlation_against_numpy(b1, b2):
  # The model in numpy: m stationary with var (1-b2)/(1+b2) (unit gradients), c = b1 m +
  # (1-b1) g; the lag-k sign correlation by the arcsine law, r_k = b1 b2^(k-1) cov/var,
  # summed over every lag that matters.
  var_m = (1 - b2) / (1 + b2)
  var_c = b1 * b1 * var_m + (1 - b1) ** 2
  r1 = b1 * (b1 * b2 * var_m + (1 - b1) * (1 - b2)) / var_c
  lags = np.arange(20000)
  total = np.sum(2 / np.pi * np.arcsin(r1 * b2 ** lags))
  assert theory.lion_sign_correlation(b1, b2) == pytest.approx(total, rel=1e-9)
  # and r_1, r_5 against a simulation of the signs (400k coordinates: s.e. ~0.002)
  rng = np.random.default_rng(0)
  n = 400_000
  m = rng.normal(size=n) * np.sqrt(var_m)
  signs = []
  for _ in range(6):
    g = rng.normal(size=n)
    signs.append(np.sign(b1 * m + (1 - b1) * g))
    m = b2 * m + (1 - b2) * g
  for k in (1, 5):
    measured = np.mean(signs[0] * signs[k])
    assert measured == pytest.approx(2 / np.pi * np.arcsin(r1 * b2 ** (k - 1)), abs=0.01)


def test_lion_angle_closed_form():
  lr, wd, b1, b2 = 2e-3, 0.3, 0.8, 0.95
  rho = theory.lion_sign_correlation(b1, b2)
  assert theory.equilibrium_angle_lion(lr, wd, b1, b2) == pytest.approx(
      np.sqrt(2 * lr * wd / (1 + 2 * rho)), rel=1e-12)
  assert rho != pytest.approx(theory.lion_sign_correlation(b1, 0.99), rel=0.05)


def test_angle_rotational_is_arctan_of_the_target():
  assert theory.angle_rotational(0.0) == 0.0
  assert theory.angle_rotational(0.5) == pytest.approx(np.arctan(0.5), rel=1e-12)
  assert theory.angle_nero(0.5) == pytest.approx(np.arctan(0.5), rel=1e-12)
  assert theory.angle_adamh(0.3) == pytest.approx(np.arctan(0.3), rel=1e-12)
  with pytest.raises(ValueError, match="^target_angle must be >= 0"):
    theory.angle_rotational(-0.1)

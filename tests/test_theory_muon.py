"""normreg.theory's Muon equilibrium against a simulation of one scale-invariant matrix.

The toy: one matrix ``W`` (the whole matrix is the unit), whose gradient is a fresh
Gaussian draw made tangent to ``W`` and scaled by ``1/||W||`` every step, exactly the
model of :mod:`normreg.theory`. The optimizer is the launcher's Muon run:
``optax.contrib.muon(learning_rate=-1.0)`` (the orthogonalized Nesterov momentum,
times optax's shape scaling), then ``optax.add_decayed_weights(wd)``, then
``optax.scale(-lr)``, i.e. ``W <- W - lr (O + wd W)``, run with ``jax.lax.scan``.
The references are the simulation, not the formulas: ``S`` and ``Q`` come from
:func:`normreg.theory.muon_update_statistics` (Gaussian noise through
``optax.contrib.scale_by_muon``, no ``W`` at all), and the equilibrium they predict
is held to the mean ``||W||^2`` and angle per step of the toy.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from normreg import theory

# Time constant 1/(2 lr wd) = 600 steps; the run is 8 of them, measured over the last 4.
LR, WD = 0.05, 1 / 60
TAU = theory.time_constant_muon(LR, WD)
# The formulas are leading order in lr*wd/(1-beta): the decay also shrinks the
# correlated past updates, which lowers ||W||^2 by about that fraction (measured
# here: -2 to -3%; -4.0% and -6.4% at time constants of 300 and 150 steps), and the
# angle is off by less (+0.5 to +1.0%). 6% leaves room for them and for the noise
# of S (~0.5% at STAT_STEPS), while AdamW's formula (b1 = 0.9 or 0.95) is off by 11%
# or more at both shapes and the naive sqrt(2 lr wd) by a factor ~5.
RTOL = 0.06
# S is measured with more steps than the default: these matrices have 1024 entries,
# a quarter of the default 64x64, so the same precision needs more steps.
STAT_STEPS = 16000


def _muon_decayed(lr, wd):
  return optax.chain(optax.contrib.muon(learning_rate=-1.0), optax.add_decayed_weights(wd),
                     optax.scale(-lr))


def _simulate(shape, lr, wd, steps, init_sq_norm, seed=0):
  """Per-step ``||W_{t+1}||^2`` and angle between ``W_t`` and ``W_{t+1}`` (radians)."""
  tx = _muon_decayed(lr, wd)
  key = jax.random.key(seed)
  w0 = jax.random.normal(key, shape)
  w0 = w0 * jnp.sqrt(init_sq_norm) / jnp.linalg.norm(w0)

  def step(carry, k):
    w, state = carry
    z = jax.random.normal(k, shape)
    sq = jnp.sum(w * w)
    g = (z - jnp.sum(z * w) / sq * w) / jnp.sqrt(sq)  # tangent, scales as 1/||W||
    update, state = tx.update(g, state, w)
    new = optax.apply_updates(w, update)
    dot = jnp.sum(w * new)
    cross = jnp.linalg.norm(new - dot / sq * w) * jnp.sqrt(sq)  # |W| |W'| sin(angle)
    return (new, state), (jnp.sum(new * new), jnp.arctan2(cross, dot))

  keys = jax.random.split(jax.random.fold_in(key, 1), steps)
  _, (sq_norms, angles) = jax.jit(lambda c, ks: jax.lax.scan(step, c, ks))(
      (w0, tx.init(w0)), keys)
  return np.asarray(sq_norms, np.float64), np.asarray(angles, np.float64)


def test_chain_is_minus_lr_times_orthogonalized_plus_decay():
  """The chain steps ``-lr (O + wd W)``, with ``O`` what ``muon_update_statistics`` measures:
  ``scale_by_muon`` times ``sqrt(max(1, fan_out/fan_in))`` (``fan_in`` = rows)."""
  lr, wd = 0.1, 0.5
  for shape in [(16, 64), (64, 16)]:
    width = math.sqrt(max(1.0, shape[1] / shape[0]))
    tx, muon = _muon_decayed(lr, wd), optax.contrib.scale_by_muon()
    w = jax.random.normal(jax.random.key(0), shape)
    state, muon_state = tx.init(w), muon.init(w)
    for t in range(5):
      g = jax.random.normal(jax.random.key(t + 1), shape)
      update, state = tx.update(g, state, w)
      o, muon_state = muon.update(g, muon_state)
      np.testing.assert_allclose(update, -lr * (width * o + wd * w), rtol=1e-5, atol=1e-6)
      w = w + update
  # The width factor is real for a wide matrix: Muon's singular values are ~1 before it.
  q_wide, _ = theory.muon_update_statistics((16, 64), steps=1000, lags=20)
  assert 0.6 < q_wide / (16 * 4) < 1.0


@pytest.mark.parametrize("shape", [(64, 16), (32, 32)])
def test_equilibrium_norm_and_angle(shape):
  q, s = theory.muon_update_statistics(shape, steps=STAT_STEPS)
  sq_norms, angles = _simulate(shape, LR, WD, steps=int(8 * TAU), init_sq_norm=1.0)
  tail = slice(len(angles) // 2, None)
  sq_norm, angle = np.mean(sq_norms[tail]), np.mean(angles[tail])

  predicted_sq_norm = theory.equilibrium_norm_muon(LR, WD, q, s) ** 2
  predicted_angle = theory.equilibrium_angle_muon(LR, WD, s)
  assert sq_norm == pytest.approx(predicted_sq_norm, rel=RTOL)
  assert angle == pytest.approx(predicted_angle, rel=RTOL)

  # The test discriminates: without S (uncorrelated updates), or with AdamW's
  # (1+b1)/(1-b1) for b1 = 0.9 or for b1 = Muon's beta, the prediction is off.
  assert theory.equilibrium_norm_muon(LR, WD, q, 1.0) ** 2 != pytest.approx(sq_norm, rel=RTOL)
  for wrong in (math.sqrt(2 * LR * WD), theory.equilibrium_angle_adamw(LR, WD),
                theory.equilibrium_angle_adamw(LR, WD, b1=0.95)):
    assert wrong != pytest.approx(angle, rel=RTOL)


def test_time_constant():
  """From 3x the equilibrium ``||W||^2``, the gap to equilibrium shrinks by e in
  ``time_constant_muon`` steps (``||W||^2`` relaxes linearly, as AdamW's)."""
  shape = (64, 16)
  q, s = theory.muon_update_statistics(shape, steps=STAT_STEPS)
  start = 3 * theory.equilibrium_norm_muon(LR, WD, q, s) ** 2
  sq_norms, _ = _simulate(shape, LR, WD, steps=int(6 * TAU), init_sq_norm=start, seed=1)
  settled = np.mean(sq_norms[int(5 * TAU):])  # the gap left there is 2 e^-5 ~ 1%
  tau = int(round(TAU))
  ratio = (np.mean(sq_norms[tau - 6:tau + 5]) - settled) / (start - settled)
  assert ratio == pytest.approx(math.exp(-1), rel=0.15)
  # A time constant twice as long (SGDW's 1/(4 lr wd) is half as long) would fail.
  assert math.exp(-0.5) != pytest.approx(ratio, rel=0.15)
  assert math.exp(-2) != pytest.approx(ratio, rel=0.15)


@pytest.mark.parametrize("nesterov", [True, False])
def test_statistics_of_a_linear_update(nesterov):
  """Without Newton-Schulz (``orthogonalize=False``: the momentum over its Frobenius
  norm, nearly constant at 4096 entries), ``S`` is the linear filter's closed form:
  ``(1+b)/(1-b)`` for the EMA, ``1/(b^4 (1-b)/(1+b) + (1-b^2)^2)`` for Nesterov's
  ``b m_t + (1-b) g_t`` (unit gain at zero frequency over its variance)."""
  b = 0.95
  q, s = theory.muon_update_statistics(nesterov=nesterov, orthogonalize=False)
  expected = (1 / (b ** 4 * (1 - b) / (1 + b) + (1 - b * b) ** 2) if nesterov
              else (1 + b) / (1 - b))
  assert q == pytest.approx(1.0, rel=1e-4)
  assert s == pytest.approx(expected, rel=0.03)


def test_formulas_and_validation():
  assert theory.equilibrium_angle_muon(0.02, 0.1, 1.0) == pytest.approx(math.sqrt(4e-3))
  assert theory.equilibrium_angle_muon(0.02, 0.1, 25.0) == pytest.approx(math.sqrt(4e-3) / 5)
  assert theory.equilibrium_norm_muon(0.02, 0.1, 50.0, 25.0) == pytest.approx(
      math.sqrt(0.02 * 50 * 25 / 0.2))
  assert theory.time_constant_muon(0.02, 0.1) == pytest.approx(250.0)
  assert theory.time_constant_muon(0.02, 0.0) == math.inf
  assert theory.equilibrium_norm_muon(0.02, 0.0, 50.0, 25.0) == math.inf
  assert theory.equilibrium_angle_muon(0.02, 0.0, 25.0) == 0.0
  with pytest.raises(ValueError):
    theory.equilibrium_angle_muon(0.02, 0.1, 0.0)
  with pytest.raises(ValueError):
    theory.equilibrium_norm_muon(0.02, 0.1, -1.0, 25.0)
  with pytest.raises(ValueError):
    theory.time_constant_muon(0.0, 0.1)
  with pytest.raises(ValueError):
    theory.muon_update_statistics(beta=1.0)
  with pytest.raises(ValueError):
    theory.muon_update_statistics((64,))
  with pytest.raises(ValueError):
    theory.muon_update_statistics(steps=300, lags=200)

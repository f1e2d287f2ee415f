"""normreg.epsilon: a traced function with its normalizations' epsilons scaled, against numpy."""
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from normreg import epsilon

X = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32) * 1e-3  # mean square 1e-6


def _numpy_layer_norm(x, eps):
  x = x.astype(np.float64)
  centred = x - x.mean(-1, keepdims=True)
  return centred / np.sqrt((centred ** 2).mean(-1, keepdims=True) + eps)


def _numpy_rms_norm(x, eps):
  x = x.astype(np.float64)
  return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps)


_RMS = nnx.RMSNorm(6, epsilon=1e-6, rngs=nnx.Rngs(0))
_LN = nnx.LayerNorm(6, epsilon=1e-6, rngs=nnx.Rngs(0))
_EQX = eqx.nn.LayerNorm(6, eps=1e-6, use_weight=False, use_bias=False)


@jax.custom_vjp
def _custom(x):
  return _RMS(x)


_custom.defvjp(lambda x: (_RMS(x), None), lambda _, g: (g,))

CASES = {
    "flax RMSNorm": (lambda x: _RMS(x), _numpy_rms_norm),
    "flax LayerNorm": (lambda x: _LN(x), _numpy_layer_norm),
    "equinox LayerNorm": (jax.vmap(_EQX), _numpy_layer_norm),
    "inside jit and remat": (jax.jit(jax.checkpoint(lambda x: _RMS(x))), _numpy_rms_norm),
    "inside a custom_vjp": (_custom, _numpy_rms_norm),
    "inside a scan": (lambda x: jax.lax.scan(lambda c, r: (c, _RMS(r)), 0.0, x)[1],
                      _numpy_rms_norm),
    "inside a cond": (lambda x: jax.lax.cond(True, lambda y: _RMS(y), lambda y: y, x),
                      _numpy_rms_norm),
    # eps 1e-3 here, against norms of about 2e-3: the reference takes it as 1e-6 * 1e3.
    "x / (norm + eps)": (lambda x: x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1e-3),
                         lambda x, eps: x / (np.linalg.norm(x.astype(np.float64), axis=-1,
                                                            keepdims=True) + 1e3 * eps)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_scaled_eps_follows_numpy_at_t_one_and_zero(name):
  fn, reference = CASES[name]
  fn_t, n = epsilon.with_scaled_eps(fn, X)
  assert n == 1
  np.testing.assert_allclose(fn_t(1.0, X), reference(X, 1e-6), rtol=2e-4, atol=1e-6)
  np.testing.assert_allclose(fn_t(0.0, X), reference(X, 0.0), rtol=2e-4, atol=1e-6)
  # The eps matters here: mean(x^2) is about 1e-6.
  assert np.abs(reference(X, 1e-6) - reference(X, 0.0)).max() > 0.1
  # Differentiable, and vmapped over t in one program.
  grad = jax.jit(jax.grad(lambda x: jax.vmap(lambda t: fn_t(t, x).sum() ** 2)(
      jnp.array([1.0, 0.5])).sum()))(X)
  assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("name, fn", [
    ("tanh(x + c)", lambda x: jnp.tanh(x + 1e-3)),
    ("exp(x + c)", lambda x: jnp.exp(x + 1e-3)),
    ("sqrt(x^2 + 1)", lambda x: jnp.sqrt(x * x + 1.0)),  # too large to be an eps
    ("sqrt(c1 + c2)", lambda x: x * jnp.sqrt(jnp.float32(1e-3) + 1e-3)),
    ("a root of a sum of two arrays", lambda x: jnp.sqrt(x * x + x * x)),
])
def test_other_constants_are_left_alone(name, fn):
  fn_t, n = epsilon.with_scaled_eps(fn, X)
  assert n == 0, name
  np.testing.assert_array_equal(fn_t(0.0, X), fn(X))

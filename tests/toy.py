"""A tiny scale-invariant network written in plain jax.numpy, for the tests.

x -> x @ w1 -> BatchNorm (batch statistics) -> ReLU -> @ w2 (LayerNorm'd,
no bias) -> LayerNorm -> ReLU -> @ head + head_bias. So ``w1`` is invariant
per output unit (UNIT), ``w2`` only as a whole (TENSOR), and the BN
scale/shift and the head are not invariant at all.

``eps`` defaults to a tiny value so that invariance is exact to float
precision; the Flax models in normreg.models use the usual 1e-5.
"""

import jax
import jax.numpy as jnp

import normreg

IN, HIDDEN, OUT = 5, 6, 3


def init(key, dtype=jnp.float32):
  k1, k2, k3, k4, k5 = jax.random.split(key, 5)
  return {
      "w1": jax.random.normal(k1, (IN, HIDDEN), dtype),
      "bn": {"scale": 1 + 0.1 * jax.random.normal(k4, (HIDDEN,), dtype),
             "bias": 0.1 * jax.random.normal(k5, (HIDDEN,), dtype)},
      "w2": jax.random.normal(k2, (HIDDEN, HIDDEN), dtype),
      "head": {"kernel": jax.random.normal(k3, (HIDDEN, OUT), dtype),
               "bias": jnp.zeros((OUT,), dtype)},
  }


GROUPS = {
    "w1": normreg.UNIT,
    "bn": {"scale": None, "bias": None},
    "w2": normreg.TENSOR,
    "head": {"kernel": None, "bias": None},
}


def apply(params, x, eps=1e-20):
  h = x.astype(params["w1"].dtype) @ params["w1"]
  mean = h.mean(0, keepdims=True)
  var = h.var(0, keepdims=True)
  h = (h - mean) / jnp.sqrt(var + eps) * params["bn"]["scale"][None] + params["bn"]["bias"][None]
  h = jax.nn.relu(h) @ params["w2"]
  mean = h.mean(-1, keepdims=True)
  var = h.var(-1, keepdims=True)
  h = jax.nn.relu((h - mean) / jnp.sqrt(var + eps))
  return h @ params["head"]["kernel"] + params["head"]["bias"][None]


def loss(params, x, y):
  logits = apply(params, x).astype(jnp.float32)
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def batch(key, n=16):
  kx, ky = jax.random.split(key)
  return jax.random.normal(kx, (n, IN)), jax.random.randint(ky, (n,), 0, OUT)


def scale_grouped(params, a):
  """Multiplies w1 by a per-unit factor vector ``a`` (shape (HIDDEN,)) and w2 by a[0]."""
  out = jax.tree.map(lambda x: x, params)
  out["w1"] = params["w1"] * a[None]
  out["w2"] = params["w2"] * a[0]
  return out

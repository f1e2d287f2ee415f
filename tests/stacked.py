"""A scale-invariant MLP whose hidden layers are stacked on a leading axis (run by
``jax.lax.scan``), and the same network written with one leaf per layer.

x -> @ inp -> BN -> ReLU -> L x (@ kernel[l] (+ bias[l]) -> norm -> ReLU) -> @ head + bias,
``norm`` a batch normalization without affine parameters (per unit) or a layer
normalization (per layer, with the bias: a joint group). ``eps`` is tiny, so
invariance is exact to float precision.
"""

import jax
import jax.numpy as jnp

import normreg

L, IN, H, OUT = 3, 5, 6, 3


def normalize_batch(h, eps=1e-20):
  """Per unit over the batch, no affine parameters."""
  return (h - h.mean(0, keepdims=True)) / jnp.sqrt(h.var(0, keepdims=True) + eps)


def normalize_layer(h, eps=1e-20):
  """Per example over the features, no affine parameters."""
  return (h - h.mean(-1, keepdims=True)) / jnp.sqrt(h.var(-1, keepdims=True) + eps)


def init(key, bias=False):
  k1, k2, k3, k4 = jax.random.split(key, 4)
  layers = {"kernel": jax.random.normal(k2, (L, H, H))}
  if bias:
    layers["bias"] = jax.random.normal(k4, (L, H))
  return {"inp": jax.random.normal(k1, (IN, H)), "layers": layers,
          "head": {"kernel": jax.random.normal(k3, (H, OUT)), "bias": jnp.zeros(OUT)}}


def apply_stacked(params, x, layer_norm=False):
  norm = normalize_layer if layer_norm else normalize_batch
  h = jax.nn.relu(normalize_batch(x @ params["inp"]))

  def body(h, layer):
    z = h @ layer["kernel"]
    if "bias" in layer:
      z = z + layer["bias"][None]
    return jax.nn.relu(norm(z)), None

  h, _ = jax.lax.scan(body, h, params["layers"])
  return h @ params["head"]["kernel"] + params["head"]["bias"][None]


def unstack(params):
  """The same params, one leaf per layer: ``layers/{0..L-1}/kernel``."""
  out = dict(params)
  out["layers"] = {str(i): jax.tree.map(lambda a, i=i: a[i], params["layers"])
                   for i in range(L)}
  return out


def apply_unrolled(params, x, layer_norm=False):
  norm = normalize_layer if layer_norm else normalize_batch
  h = jax.nn.relu(normalize_batch(x @ params["inp"]))
  for i in range(L):
    layer = params["layers"][str(i)]
    z = h @ layer["kernel"]
    if "bias" in layer:
      z = z + layer["bias"][None]
    h = jax.nn.relu(norm(z))
  return h @ params["head"]["kernel"] + params["head"]["bias"][None]


def loss(apply, params, x, y, **kw):
  logits = apply(params, x, **kw)
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def batch(key, n=16):
  kx, ky = jax.random.split(key)
  return jax.random.normal(kx, (n, IN)), jax.random.randint(ky, (n,), 0, OUT)


def groups(stacked, layer_norm=False, bias=False):
  """The exact groups of either form."""
  head = {"kernel": None, "bias": None}
  if stacked:
    kind = normreg.tensor if layer_norm else normreg.unit
    joint = "layers" if bias else None
    layers = {"kernel": kind(stack=1, joint=joint)}
    if bias:
      layers["bias"] = kind(stack=1, joint=joint)
    return {"inp": normreg.UNIT, "layers": layers, "head": head}
  layers = {}
  for i in range(L):
    kind = normreg.tensor if layer_norm else normreg.unit
    layers[str(i)] = {"kernel": kind(joint=f"layers/{i}" if bias else None)}
    if bias:
      layers[str(i)]["bias"] = kind(joint=f"layers/{i}")
  return {"inp": normreg.UNIT, "layers": layers, "head": head}

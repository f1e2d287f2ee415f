"""Tests for normreg.models: shapes, param paths, WeightNorm maths, modes, dtypes.

Tiny sizes (width 4, 8x8 images, batch 4) so the file runs in seconds on CPU.
The WeightNorm layers are checked against plain numpy and against
``nnx.Conv`` run with the rebuilt kernel.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from normreg import models
from normreg.models import norms as norms_lib

CASES = [(m, n) for m in models.MODELS for n in models.NORMS]
N, H, C_IN, WIDTH, CLASSES = 4, 8, 3, 4, 5


def _images(seed=0, shape=(N, H, H, C_IN)):
  # numpy, not jax.random: no compile per shape.
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _uniform(seed, shape, low, high):
  return jnp.asarray(np.random.default_rng(seed).uniform(low, high, shape), jnp.float32)


def _paths(state):
  return {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(state)}


def _abstract_forward(build, x):
  """Output shape/dtype of ``build()(x)``, traced without allocating or compiling."""
  graphdef, state = nnx.split(nnx.eval_shape(build))
  return jax.eval_shape(lambda state, x: nnx.merge(graphdef, state)(x), state, x)


def _apply(model, x):
  """``model(x)`` under ``nnx.jit`` (one compile instead of many eager ops)."""
  return nnx.jit(lambda m, x: m(x))(model, x)


def _functional_forward(model):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def forward(params, rest, x):
    module = nnx.merge(graphdef, params, rest, copy=True)
    y = module(x)
    return y, nnx.state(module, nnx.BatchStat)

  return forward, params, rest


# ------------------------------------------------------------------- all models


@pytest.mark.parametrize("model_name, norm", CASES)
def test_every_model_and_norm_gives_finite_logits_under_jit(model_name, norm):
  model = models.create(model_name, num_classes=CLASSES, norm=norm, width=WIDTH,
                        rngs=nnx.Rngs(0))
  forward, params, rest = _functional_forward(model)
  x = _images()
  logits, stats = forward(params, rest, x)
  assert logits.shape == (N, CLASSES)
  assert logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))
  # Examples are not all mapped to the same logits.
  assert float(jnp.max(jnp.std(logits, axis=0))) > 1e-4
  # BatchNorm statistics move in training mode; other norms have none.
  before, after = _paths(nnx.state(model, nnx.BatchStat)), _paths(stats)
  if norm == "batch":
    assert before and set(before) == set(after)
    assert all(not np.allclose(after[p][...], 0.0) for p in after if p.endswith("mean"))
  else:
    assert not before and not after


@pytest.mark.parametrize("norm", models.NORMS)
def test_cnn_param_paths(norm):
  model = models.CNN(num_classes=CLASSES, norm=norm, width=WIDTH, rngs=nnx.Rngs(0))
  paths = _paths(nnx.state(model, nnx.Param))
  conv_leaves = {"batch": {"kernel"}, "layer": {"kernel"}, "group": {"kernel"},
                 "weight": {"v", "g", "bias"}, "none": {"kernel", "bias"}}[norm]
  norm_leaves = {"scale", "bias"} if norm in ("batch", "layer", "group") else set()
  expected = {f"convs/{i}/{leaf}" for i in range(6) for leaf in conv_leaves}
  expected |= {f"norms/{i}/{leaf}" for i in range(6) for leaf in norm_leaves}
  expected |= {"head/kernel", "head/bias"}
  assert set(paths) == expected
  widths = [WIDTH, WIDTH, 2 * WIDTH, 2 * WIDTH, 4 * WIDTH, 4 * WIDTH]
  w = "v" if norm == "weight" else "kernel"
  assert [paths[f"convs/{i}/{w}"].shape for i in range(6)] == [
      (3, 3, c_in, c_out) for c_in, c_out in zip([C_IN] + widths[:-1], widths)]
  assert paths["head/kernel"].shape == (4 * WIDTH, CLASSES)


@pytest.mark.parametrize("norm", models.NORMS)
def test_resnet20_param_paths(norm):
  model = models.ResNet20(num_classes=CLASSES, norm=norm, width=WIDTH, rngs=nnx.Rngs(0))
  paths = _paths(nnx.state(model, nnx.Param))
  w = "v" if norm == "weight" else "kernel"
  kernels = sorted(p for p in paths if p.endswith("/" + w))
  # 1 stem + 9 blocks x 2 + 2 projections = 21 convs; plus the head's kernel.
  assert len(kernels) == (21 if norm == "weight" else 22)
  assert {p for p in kernels if "shortcut" in p} == {
      f"blocks/{i}/shortcut_conv/{w}" for i in (3, 6)}
  assert paths[f"stem_conv/{w}"].shape == (3, 3, C_IN, WIDTH)
  assert paths[f"blocks/3/conv1/{w}"].shape == (3, 3, WIDTH, 2 * WIDTH)
  assert paths[f"blocks/6/shortcut_conv/{w}"].shape == (1, 1, 2 * WIDTH, 4 * WIDTH)
  assert paths["head/kernel"].shape == (4 * WIDTH, CLASSES)
  if norm in ("batch", "layer", "group"):
    assert {"stem_norm/scale", "blocks/3/shortcut_norm/scale", "blocks/8/norm2/bias"} <= set(paths)
    assert not any(p.endswith("conv1/bias") or p.endswith("conv2/bias") for p in paths)
  else:
    assert not any("norm" in p for p in paths)


def test_resnet20_downsamples_twice():
  def block_shapes(model, x):
    h = nnx.relu(model.stem_norm(model.stem_conv(x)))
    shapes = []
    for block in model.blocks:
      h = block(h)
      shapes.append(h.shape[1:])
    return shapes

  model = nnx.eval_shape(lambda: models.ResNet20(num_classes=CLASSES, width=WIDTH,
                                                 rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  shapes = []
  jax.eval_shape(lambda s, x: shapes.extend(block_shapes(nnx.merge(graphdef, s), x)),
                 state, jax.ShapeDtypeStruct((2, 16, 16, C_IN), jnp.float32))
  assert shapes == [(16, 16, WIDTH)] * 3 + [(8, 8, 2 * WIDTH)] * 3 + [(4, 4, 4 * WIDTH)] * 3


def test_create_defaults_and_channels():
  # Abstract (shape-only) construction of the full-width defaults.
  cnn = nnx.eval_shape(lambda: models.create("cnn", num_classes=7, in_channels=1,
                                             rngs=nnx.Rngs(0)))
  assert isinstance(cnn, models.CNN)
  assert cnn.convs[0].kernel.shape == (3, 3, 1, 64)
  assert cnn.head.kernel.shape == (256, 7)
  resnet = nnx.eval_shape(lambda: models.create("resnet20", rngs=nnx.Rngs(0)))
  assert isinstance(resnet, models.ResNet20)
  assert resnet.head.kernel.shape == (64, 10)
  out = _abstract_forward(
      lambda: models.create("cnn", num_classes=3, in_channels=1, width=4, rngs=nnx.Rngs(0)),
      jax.ShapeDtypeStruct((2, 10, 10, 1), jnp.float32))
  assert out.shape == (2, 3)


def test_unknown_norm_raises():
  for build in (models.CNN, models.ResNet20):
    with pytest.raises(ValueError, match=r"norm.*'instance'.*'batch', 'layer'"):
      build(norm="instance", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"`norm`"):
    models.create("cnn", norm="bn", rngs=nnx.Rngs(0))


def test_unknown_model_raises():
  with pytest.raises(ValueError, match=r"model.*'vgg'.*'cnn', 'resnet20'"):
    models.create("vgg", rngs=nnx.Rngs(0))


# --------------------------------------------------------------- normalizations


def test_group_count_divides_and_keeps_two_channels_per_group():
  for c in range(1, 130):
    g = norms_lib.group_count(c)
    assert c % g == 0 and 1 <= g <= 8
    if c >= 2:
      assert c // g >= 2
  assert norms_lib.group_count(64) == 8


def test_layer_norm_is_over_hwc_per_example():
  layer = norms_lib.norm_layer("layer", 6, rngs=nnx.Rngs(0))
  x = _images(shape=(3, 4, 5, 6)) * jnp.arange(1.0, 4.0)[:, None, None, None] + 2.0
  y = _apply(layer, x)
  np.testing.assert_allclose(jnp.mean(y, axis=(1, 2, 3)), 0.0, atol=1e-5)
  np.testing.assert_allclose(jnp.var(y, axis=(1, 2, 3)), 1.0, rtol=1e-3)
  assert layer.scale.shape == (6,)
  # Per-channel statistics are NOT normalized (that would be instance norm).
  assert float(jnp.max(jnp.abs(jnp.mean(y, axis=(1, 2))))) > 1e-2


def test_group_norm_is_over_channel_groups_per_example():
  layer = norms_lib.norm_layer("group", 8, rngs=nnx.Rngs(0))
  x = _images(shape=(2, 4, 4, 8)) + jnp.arange(8.0)[None, None, None, :]
  y = np.asarray(_apply(layer, x)).reshape(2, 4, 4, 4, 2)  # 4 groups of 2 channels
  np.testing.assert_allclose(y.mean(axis=(1, 2, 4)), 0.0, atol=1e-5)
  np.testing.assert_allclose(y.var(axis=(1, 2, 4)), 1.0, rtol=1e-3)


@pytest.mark.parametrize("model_name", models.MODELS)
def test_batch_norm_eval_uses_running_statistics(model_name):
  model = models.create(model_name, num_classes=CLASSES, norm="batch", width=WIDTH,
                        rngs=nnx.Rngs(0))
  x = 3.0 * _images() + 2.0  # batch statistics far from the initial (0, 1)
  train_out = _apply(model, x)
  model.eval()
  assert all(m.use_running_average for _, m in nnx.iter_modules(model)
             if isinstance(m, nnx.BatchNorm))
  eval_out = _apply(model, x)
  assert float(jnp.max(jnp.abs(eval_out - train_out))) > 1e-2
  # Running statistics make each example independent of the rest of the batch.
  np.testing.assert_allclose(_apply(model, x[:1]), eval_out[:1], rtol=1e-4, atol=1e-5)
  model.train()
  assert not np.allclose(_apply(model, x[:1]), eval_out[:1], atol=1e-3)


def test_batch_norm_running_average_momentum():
  layer = norms_lib.norm_layer("batch", 3, rngs=nnx.Rngs(0))
  x = _images(shape=(8, 2, 2, 3)) + 5.0
  _apply(layer, x)  # nnx.jit writes the updated statistics back
  np.testing.assert_allclose(layer.mean[...], 0.1 * jnp.mean(x, axis=(0, 1, 2)), rtol=1e-5)


# ------------------------------------------------------------------- WeightNorm


def _numpy_weight(v, g):
  v, g = np.asarray(v, np.float64), np.asarray(g, np.float64)
  norm = np.sqrt((v ** 2).reshape(-1, v.shape[-1]).sum(axis=0))
  return g * v / norm  # broadcasts along the last (output) axis


# Shapes shared with the width-4 models: on CPU, compiling lecun_normal (a
# truncated normal) for each new kernel shape costs about a second.
def _linear(**kw):
  return models.WeightNormLinear(4 * WIDTH, CLASSES, rngs=nnx.Rngs(0), **kw)


def _conv(**kw):
  return models.WeightNormConv(WIDTH, 2 * WIDTH, 3, strides=(1, 2), rngs=nnx.Rngs(0), **kw)


LAYERS = [(_linear, (4, 4 * WIDTH)), (_conv, (2, 7, 9, WIDTH))]


def _randomize_g(layer, seed=1):
  layer.g[...] = _uniform(seed, layer.g.shape, 0.5, 2.0)
  layer.bias[...] = _images(seed + 1, layer.bias.shape)


@pytest.mark.parametrize("make", [_linear, _conv])
def test_weight_norm_initial_weight_is_v(make):
  layer = make()
  np.testing.assert_allclose(layer.weight(), layer.v[...], rtol=1e-6, atol=1e-7)
  unit_norms = np.linalg.norm(np.reshape(layer.v[...], (-1, layer.out_features)), axis=0)
  np.testing.assert_allclose(layer.g[...], unit_norms, rtol=1e-6)
  assert layer.bias.shape == (layer.out_features,) and not np.any(layer.bias[...])


@pytest.mark.parametrize("make", [_linear, _conv])
def test_weight_norm_weight_matches_numpy(make):
  layer = make()
  _randomize_g(layer)
  layer.v[...] = layer.v[...] * _uniform(3, layer.v.shape, 0.1, 1.0)
  np.testing.assert_allclose(layer.weight(), _numpy_weight(layer.v[...], layer.g[...]),
                             rtol=1e-5, atol=1e-7)
  # Each output unit (last axis) has norm g; a norm over axis 0 would not.
  w = np.asarray(layer.weight()).reshape(-1, layer.out_features)
  np.testing.assert_allclose(np.linalg.norm(w, axis=0), layer.g[...], rtol=1e-5)


def test_weight_norm_linear_output_matches_numpy():
  layer = _linear()
  _randomize_g(layer)
  x = _images(shape=(2, 3, 4 * WIDTH))
  ref = np.asarray(x, np.float64) @ _numpy_weight(layer.v[...], layer.g[...]) \
      + np.asarray(layer.bias[...], np.float64)
  np.testing.assert_allclose(layer(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padding", ["SAME", "VALID", 1])
def test_weight_norm_conv_matches_nnx_conv(padding):
  layer = _conv(padding=padding)
  _randomize_g(layer)
  ref = nnx.Conv(WIDTH, 2 * WIDTH, (3, 3), strides=(1, 2), padding=padding, rngs=nnx.Rngs(1))
  ref.kernel[...] = jnp.asarray(_numpy_weight(layer.v[...], layer.g[...]), jnp.float32)
  ref.bias[...] = layer.bias[...]
  x = _images(shape=(2, 7, 9, WIDTH))
  out = layer(x)
  assert out.shape == ref(x).shape
  np.testing.assert_allclose(out, ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make, shape", LAYERS)
def test_weight_norm_is_pure_and_per_unit_scale_invariant(make, shape):
  layer = make()
  _randomize_g(layer)
  x = _images(shape=shape)
  v0, g0 = np.array(layer.v[...]), np.array(layer.g[...])
  graphdef, params = nnx.split(layer, nnx.Param)

  @jax.jit
  def forward(params, x):
    return nnx.merge(graphdef, params)(x)

  out = forward(params, x)
  layer(x)
  # Calling the layer (eagerly or through split/merge) changes neither v nor g.
  np.testing.assert_array_equal(layer.v[...], v0)
  np.testing.assert_array_equal(layer.g[...], g0)
  np.testing.assert_array_equal(params["v"][...], v0)
  # v -> a_j v per output unit j, a_j > 0, leaves the output unchanged.
  a = _uniform(7, (1,) * (len(v0.shape) - 1) + v0.shape[-1:], 0.01, 100.0)
  scaled = jax.tree.map(lambda t: t, params)
  scaled["v"] = nnx.Param(params["v"][...] * a)
  np.testing.assert_allclose(forward(scaled, x), out, rtol=1e-5, atol=1e-5)
  # ... but a different factor per input position does change it.
  scaled["v"] = nnx.Param(params["v"][...] * jnp.linspace(0.5, 2.0, v0.size).reshape(v0.shape))
  assert float(jnp.max(jnp.abs(forward(scaled, x) - out))) > 1e-3


@pytest.mark.parametrize("make, shape", LAYERS)
def test_weight_norm_gradients_are_finite_and_tangent(make, shape):
  layer = make()
  x = _images(shape=shape)
  graphdef, params = nnx.split(layer, nnx.Param)

  @jax.jit
  def loss(params):
    return jnp.sum(nnx.merge(graphdef, params)(x) ** 2)

  grads = jax.grad(loss)(params)
  gv = np.asarray(grads["v"][...])
  assert np.all(np.isfinite(gv)) and np.any(gv)
  # <v_j, dL/dv_j> = 0 per unit: the gradient is tangent to each unit's sphere.
  v = np.asarray(params["v"][...])
  out = v.shape[-1]
  dots = (v * gv).reshape(-1, out).sum(axis=0)
  bound = np.linalg.norm(v.reshape(-1, out), axis=0) * np.linalg.norm(gv.reshape(-1, out), axis=0)
  assert np.all(np.abs(dots) <= 1e-5 * bound)
  # A unit whose v is exactly zero: weight 0, gradients still finite.
  params["v"] = nnx.Param(params["v"][...].at[..., 0].set(0.0))
  grads = jax.grad(loss)(params)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  np.testing.assert_array_equal(nnx.merge(graphdef, params).weight()[..., 0], 0.0)


# ------------------------------------------------------------------------ dtypes


def _promotion(norm):
  # flax's BatchNorm/LayerNorm/GroupNorm call jnp.promote_types(dtype, float32)
  # internally, which raises under strict promotion; our own layers (WeightNorm)
  # and nnx.Conv/Linear/pooling are checked under strict promotion.
  strict = norm in ("weight", "none")
  return jax.numpy_dtype_promotion("strict" if strict else "standard")


def _bf16_model(model_name, norm, **kw):
  return models.create(model_name, num_classes=CLASSES, norm=norm, width=WIDTH,
                       dtype=jnp.bfloat16, rngs=nnx.Rngs(0), **kw)


@pytest.mark.parametrize("model_name, norm", CASES)
def test_bfloat16_compute_keeps_float32_params(model_name, norm):
  # Traced only (nnx.eval_shape / jax.eval_shape): dtypes, without compiling.
  model = nnx.eval_shape(lambda: _bf16_model(model_name, norm))
  graphdef, state = nnx.split(model)
  params = nnx.state(model, nnx.Param)
  assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}

  def forward(state, x):
    m = nnx.merge(graphdef, state)
    first_conv, first_norm = ((m.convs[0], m.norms[0]) if model_name == "cnn"
                              else (m.stem_conv, m.stem_norm))
    return first_norm(first_conv(x)), m(x)

  with _promotion(norm):
    hidden, logits = jax.eval_shape(forward, state,
                                    jax.ShapeDtypeStruct((N, H, H, C_IN), jnp.float32))
  assert hidden.dtype == jnp.bfloat16
  assert logits.dtype == jnp.bfloat16 and logits.shape == (N, CLASSES)


@pytest.mark.parametrize("model_name, norm", [("cnn", "weight"), ("resnet20", "batch")])
def test_bfloat16_logits_are_close_to_float32(model_name, norm):
  x = _images()
  logits = _apply(_bf16_model(model_name, norm), x)
  assert logits.dtype == jnp.bfloat16
  ref = _apply(models.create(model_name, num_classes=CLASSES, norm=norm, width=WIDTH,
                             rngs=nnx.Rngs(0)), x)
  np.testing.assert_allclose(logits.astype(jnp.float32), ref, rtol=0.1,
                             atol=0.05 * float(jnp.max(jnp.abs(ref))))


@pytest.mark.parametrize("model_name, norm", CASES)
def test_bfloat16_params_stay_bfloat16(model_name, norm):
  # Traced only (nnx.eval_shape / jax.eval_shape): dtypes, without compiling.
  build = lambda: models.create(model_name, num_classes=CLASSES, norm=norm, width=WIDTH,
                                dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                rngs=nnx.Rngs(0))
  params = nnx.state(nnx.eval_shape(build), nnx.Param)
  assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
  with _promotion(norm):
    logits = _abstract_forward(build, jax.ShapeDtypeStruct((N, H, H, C_IN), jnp.bfloat16))
  assert logits.dtype == jnp.bfloat16 and logits.shape == (N, CLASSES)


@pytest.mark.parametrize("make, shape", LAYERS)
@pytest.mark.parametrize("dtype, param_dtype", [
    (None, jnp.float32), (jnp.bfloat16, jnp.float32), (None, jnp.bfloat16)])
def test_weight_norm_dtypes_under_strict_promotion(make, shape, dtype, param_dtype):
  layer = make(dtype=dtype, param_dtype=param_dtype)
  x = _images(shape=shape).astype(dtype or param_dtype)
  with jax.numpy_dtype_promotion("strict"):
    y = layer(x)
  assert y.dtype == jnp.dtype(dtype or param_dtype)
  assert {layer.v.dtype, layer.g.dtype, layer.bias.dtype} == {jnp.dtype(param_dtype)}

"""find_scale_invariant on hand-written functions and on a Linen model."""

import functools
import logging
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import normreg
from normreg import detect
import stacked
import toy


def test_toy_network_groups_are_found():
  params = toy.init(jax.random.key(0))
  x, _ = toy.batch(jax.random.key(1), n=32)
  assert normreg.find_scale_invariant(toy.apply, params, x) == toy.GROUPS


def test_zero_initialised_leaves_are_not_reported():
  # A zero leaf has a zero JVP along itself; detection must randomize first.
  params = toy.init(jax.random.key(0))
  params["bn"]["bias"] = jnp.zeros_like(params["bn"]["bias"])
  params["head"]["bias"] = jnp.zeros_like(params["head"]["bias"])
  x, _ = toy.batch(jax.random.key(1), n=32)
  groups = normreg.find_scale_invariant(toy.apply, params, x)
  assert groups["bn"]["bias"] is None and groups["head"]["bias"] is None


class _LinenNet(nn.Module):
  """Conv -> BN -> ReLU -> Dense (no bias) -> LayerNorm -> ReLU -> Dense; plus a
  Dense with bias before a LayerNorm (only kernel+bias together is invariant)."""

  @nn.compact
  def __call__(self, x, train=True):
    x = nn.Conv(4, (3, 3), use_bias=True, name="conv")(x)  # bias before BN: no effect
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn")(x))
    x = x.mean((1, 2))
    x = nn.relu(nn.LayerNorm(name="ln")(nn.Dense(6, use_bias=False, name="dense")(x)))
    x = nn.relu(nn.LayerNorm(name="ln2")(nn.Dense(6, name="dense_bias")(x)))
    return nn.Dense(3, name="head")(x)


def test_linen_model():
  model = _LinenNet()
  x = jax.random.normal(jax.random.key(0), (16, 6, 6, 3))
  variables = model.init(jax.random.key(1), x)

  def fn(params, x):
    out, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                         mutable=["batch_stats"])
    return out

  groups = normreg.find_scale_invariant(fn, variables["params"], x)
  assert groups["conv"] == {"kernel": normreg.UNIT, "bias": None}
  assert groups["dense"] == {"kernel": normreg.TENSOR}
  # Kernel and bias are invariant only together: one joint group, tagged by the module.
  joint = normreg.tensor(joint="dense_bias")
  assert groups["dense_bias"] == {"kernel": joint, "bias": joint}
  for name in ("bn", "ln", "ln2", "head"):
    assert set(jax.tree.leaves(groups[name], is_leaf=lambda g: g is None)) == {None}, name


def test_eval_mode_normalization_is_not_invariant():
  # Documented: with running statistics the function is not scale-invariant.
  model = _LinenNet()
  x = jax.random.normal(jax.random.key(0), (16, 6, 6, 3))
  variables = model.init(jax.random.key(1), x)
  fn = lambda p, x: model.apply({"params": p, "batch_stats": variables["batch_stats"]}, x,
                                train=False)
  groups = normreg.find_scale_invariant(fn, variables["params"], x)
  assert groups["conv"]["kernel"] is None
  assert groups["dense"]["kernel"] is normreg.TENSOR  # LayerNorm has no running stats


# ------------------------------------------------ pieces of the test, and its edge cases

# Normalizations without affine parameters, with flax's eps (not the tiny default).
_bn = functools.partial(stacked.normalize_batch, eps=1e-5)
_ln = functools.partial(stacked.normalize_layer, eps=1e-5)


def _x(n=32, d=3, seed=0):
  return jax.random.normal(jax.random.key(seed), (n, d))


def _p(seed, *shape):
  return jax.random.normal(jax.random.key(seed), shape)


@pytest.mark.parametrize("dtype, rms", [(jnp.float32, 3.0), (jnp.float32, 0.3),
                                        (jnp.bfloat16, 3.0)])
def test_randomize_against_numpy(dtype, rms):
  leaf = (rms * _p(0, 40, 50)).astype(dtype)
  x = np.asarray(leaf, np.float32)
  # Uniform noise of variance 1: (U[0, 1) - 1/2) * sqrt(12).
  draws = (np.random.default_rng(7).random(x.shape, np.float32) - 0.5) * np.sqrt(12.0)
  want = jnp.asarray(x + 0.5 * np.sqrt(np.mean(x * x)) * draws, dtype)
  got = detect._randomize(leaf, np.random.default_rng(7))
  assert got.dtype == dtype
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             rtol=1e-6, atol=1e-6)
  assert abs(np.var(draws) - 1.0) < 0.1 and abs(np.mean(draws)) < 0.1
  # A zero leaf: rms taken as 1.
  zero = detect._randomize(jnp.zeros((5,), dtype), np.random.default_rng(7))
  np.testing.assert_allclose(np.asarray(zero, np.float32),
                             np.asarray(jnp.asarray(0.5 * draws.ravel()[:5], dtype), np.float32),
                             rtol=1e-6)


def test_direction_has_the_norm_of_the_leaf():
  w = 3.0 * np.asarray(_p(1, 6, 4))
  d = detect._direction(w, np.random.default_rng(2))
  assert d.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(d), np.linalg.norm(w), rtol=1e-6)
  draws = np.random.default_rng(2).random((6, 4), np.float32) - 0.5
  np.testing.assert_allclose(d, draws * np.linalg.norm(w) / np.linalg.norm(draws), rtol=1e-5)


def test_candidates_finest_first():
  u, t = normreg.unit, normreg.tensor
  assert detect._candidates(()) == []
  assert detect._candidates((5,)) == [t()]
  assert detect._candidates((3, 4)) == [u(), t(stack=1), t()]  # 4, 3, 1 groups
  # 8, 6, 4, 3, 2, 1 groups; the unit may sit on any axis after the stack axes.
  assert detect._candidates((2, 3, 4)) == [u(stack=1), t(stack=2), u(), u(axis=1),
                                           t(stack=1), t()]
  # Output-first layouts: a grouping along the first axis after k stack axes is
  # unit(stack=k, axis=0) there (tensor(stack=k+1), the same groups, in Flax's).
  assert detect._candidates((3, 4), unit_axis=0) == [u(), u(axis=0), t()]
  assert detect._candidates((2, 3, 4), unit_axis=0) == [
      u(stack=1), u(stack=1, axis=0), u(), u(axis=1), u(axis=0), t()]
  for shape in ((3, 4), (2, 3, 4), (2, 3, 4, 5)):  # one candidate per partition
    for layout in (-1, 0):
      found = detect._candidates(shape, layout)
      parts = {(g.group_shape(shape), g.reduced_axes(len(shape))) for g in found}
      assert len(parts) == len(found), (shape, layout, found)


def test_non_float_and_empty_leaves_are_none_and_left_alone():
  params = {"w": _p(1, 3, 4), "step": jnp.arange(3), "empty": jnp.zeros((0,))}
  seen = []
  def fn(p, x):
    seen.append(p["step"])
    return _bn(x @ p["w"]) + p["empty"].sum() + 0 * p["step"].sum().astype(jnp.float32)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no "mean of empty slice" from randomizing them
    assert normreg.find_scale_invariant(fn, params, _x()) == {
        "w": normreg.UNIT, "step": None, "empty": None}
  assert all(np.array_equal(s, [0, 1, 2]) for s in seen)  # integers are not randomized


def test_keyword_arguments_reach_fn():
  fn = lambda p, x, *, shift: _bn(x @ p["w"] + shift)
  assert normreg.find_scale_invariant(fn, {"w": _p(1, 3, 4)}, _x(), shift=2.0) == {
      "w": normreg.UNIT}


def test_bf16_function():
  params = {"w": _p(1, 3, 4).astype(jnp.bfloat16), "v": _p(2, 4, 2).astype(jnp.bfloat16)}
  fn = lambda p, x: (_bn(x.astype(jnp.bfloat16) @ p["w"]) @ p["v"]).astype(jnp.bfloat16)
  # bf16 rounds to ~4e-3: the tolerance follows.
  assert normreg.find_scale_invariant(fn, params, _x(), rtol=0.05) == {"w": normreg.UNIT,
                                                                      "v": None}


def _mixed(p, x):
  h = jax.nn.relu(_bn(x @ p["a"]))
  return _ln(h @ p["b"]) @ p["head"]


_MIXED = {"a": normreg.UNIT, "b": normreg.TENSOR, "head": None}


# At 1e-3 the normalizations' eps (1e-5) dominates the variances (1e-6 and less) and the
# function at that point does depend on the scales; invariant by design is as eps -> 0.
@pytest.mark.parametrize("param_scale, out_scale", [(1.0, 1.0), (1e3, 1.0), (1.0, 1e4),
                                                    (1.0, 1e-4), (1e-3, 1.0)])
def test_verdicts_do_not_depend_on_the_scale_of_params_or_output(param_scale, out_scale):
  params = {"a": _p(1, 3, 8), "b": _p(2, 8, 6), "head": _p(3, 6, 2)}
  params = jax.tree.map(lambda w: w * param_scale, params)
  fn = lambda p, x: out_scale * _mixed(p, x)
  assert normreg.find_scale_invariant(fn, params, _x()) == _MIXED


def test_the_same_seed_gives_the_same_measurements(caplog):
  params = {"a": _p(1, 3, 8), "b": _p(2, 8, 6), "head": _p(3, 6, 2)}
  logs = []
  for seed in (None, 0, 1):
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="absl"):
      kwargs = {} if seed is None else {"seed": seed}
      assert normreg.find_scale_invariant(_mixed, params, _x(), **kwargs) == _MIXED
    logs.append([r.getMessage() for r in caplog.records if "find_scale_invariant" in r.getMessage()])
  assert len(logs[0]) == 3
  assert logs[0] == logs[1]  # the default seed is 0, and draws are reproducible
  assert logs[0] != logs[2]


def test_a_leaf_with_negligible_effect_is_none_even_if_invariant():
  # v is invariant, but moves the output by ~1e-8 of its size (the threshold is 1e-5).
  params = {"head": _p(1, 3, 2), "v": _p(2, 2)}
  fn = lambda p, x: 100 * x @ p["head"] + 1e-6 * (p["v"] / jnp.linalg.norm(p["v"]))[None]
  assert normreg.find_scale_invariant(fn, params, _x()) == {"head": None, "v": None}
  louder = lambda p, x: x @ p["head"] + 1e-1 * (p["v"] / jnp.linalg.norm(p["v"]))[None]
  assert normreg.find_scale_invariant(louder, params, _x()) == {"head": None,
                                                                "v": normreg.TENSOR}


def test_a_function_that_ignores_its_params_finds_nothing():
  params = {"dense": {"kernel": _p(1, 3, 4), "bias": _p(2, 4)}}
  fn = lambda p, x: 0.0 * (x @ p["dense"]["kernel"] + p["dense"]["bias"][None])
  assert normreg.find_scale_invariant(fn, params, _x()) == {
      "dense": {"kernel": None, "bias": None}}


def test_joint_pair_among_three_siblings():
  # kernel and bias before LayerNorm are invariant together; the scalar gain is not.
  params = {"blk": {"kernel": _p(1, 3, 6), "bias": _p(2, 6), "gain": jnp.float32(0.7)}}
  fn = lambda p, x: (_ln(x @ p["blk"]["kernel"] + p["blk"]["bias"][None])
                     + p["blk"]["gain"] * x.sum(1, keepdims=True))
  joint = normreg.tensor(joint="blk")
  assert normreg.find_scale_invariant(fn, params, _x()) == {
      "blk": {"kernel": joint, "bias": joint, "gain": None}}


def test_joint_group_of_top_level_leaves_is_tagged_by_their_paths():
  params = {"kernel": _p(1, 3, 6), "bias": _p(2, 6)}
  fn = lambda p, x: _ln(x @ p["kernel"] + p["bias"][None])
  joint = normreg.tensor(joint="bias+kernel")
  assert normreg.find_scale_invariant(fn, params, _x()) == {"kernel": joint, "bias": joint}


@pytest.mark.parametrize("units", [1, 4])
def test_joint_per_unit_group_of_a_kernel_and_its_bias(units):
  # Per-unit normalization without centring: a column of the kernel and its bias
  # element are invariant together, per unit.
  params = {"d": {"kernel": _p(1, 3, units), "bias": _p(2, units) + 2.0}}
  fn = lambda p, x: (lambda z: z / jnp.sqrt(jnp.mean(z * z, 0, keepdims=True)))(
      x @ p["d"]["kernel"] + p["d"]["bias"][None])
  # One unit: per unit and per tensor are the same group; the tie goes to TENSOR.
  joint = normreg.unit(joint="d") if units > 1 else normreg.tensor(joint="d")
  assert normreg.find_scale_invariant(fn, params, _x()) == {"d": {"kernel": joint,
                                                                  "bias": joint}}


def test_normalization_vectors_before_relu_and_a_normalized_layer_stay_ungrouped():
  # (scale, bias) of bn1, then ReLU and a BatchNorm'd layer: invariant to one factor on
  # both (van Laarhoven 2017, sec. 5) but, as in the paper, not grouped.
  params = {"a": _p(1, 3, 8), "bn1": {"scale": _p(2, 8) + 2.0, "bias": _p(3, 8)},
            "b": _p(4, 8, 5)}
  fn = lambda p, x: _bn(jax.nn.relu(_bn(x @ p["a"]) * p["bn1"]["scale"][None]
                                    + p["bn1"]["bias"][None]) @ p["b"])
  assert normreg.find_scale_invariant(fn, params, _x()) == {
      "a": normreg.UNIT, "b": normreg.UNIT, "bn1": {"scale": None, "bias": None}}


def test_joint_search_takes_the_largest_set_that_passes():
  # Two (kernel, bias) pairs before two LayerNorms, all at the top level: the four leaves
  # pass together, and the search (largest set first) stops there: one group, not two.
  params = {"k1": _p(1, 3, 6), "b1": _p(2, 6), "k2": _p(3, 3, 6), "b2": _p(4, 6)}
  fn = lambda p, x: (_ln(x @ p["k1"] + p["b1"][None]) + _ln(x @ p["k2"] + p["b2"][None]))
  joint = normreg.tensor(joint="b1+b2+k1+k2")
  assert normreg.find_scale_invariant(fn, params, _x()) == {k: joint for k in params}



def test_stacked_normalization_vectors_look_like_a_matrix_to_the_joint_search():
  # A known limitation, documented in find_scale_invariant: the same vectors stacked for two
  # layers, shape (2, 8), cannot be told from a kernel by their shape; one factor on both
  # is an invariance, so they come out as one joint group over the stack (not per layer:
  # one axis besides the stack axis is a vector). joint=False leaves them alone.
  params = {"a": _p(1, 2, 3, 8), "bn1": {"scale": _p(2, 2, 8) + 2.0, "bias": _p(3, 2, 8)},
            "b": _p(4, 2, 8, 5)}

  def fn(p, x):
    outs = []
    for l in range(2):
      h = jax.nn.relu(_bn(x @ p["a"][l]) * p["bn1"]["scale"][l][None]
                      + p["bn1"]["bias"][l][None])
      outs.append(_bn(h @ p["b"][l]))
    return jnp.concatenate(outs, axis=1)

  stacked = {"a": normreg.unit(stack=1), "b": normreg.unit(stack=1)}
  joint = normreg.tensor(joint="bn1")
  assert normreg.find_scale_invariant(fn, params, _x()) == {
      **stacked, "bn1": {"scale": joint, "bias": joint}}
  assert normreg.find_scale_invariant(fn, params, _x(), joint=False) == {
      **stacked, "bn1": {"scale": None, "bias": None}}


# ------------------------------------------------- invariant by design: eps -> 0


def _rms_norm(h, eps=1e-6):
  return h * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + eps)


def test_a_kernel_whose_norm_is_dominated_by_eps_is_found_and_the_report_says_so(caplog):
  # At this init the RMSNorm's input has a mean square of about 1e-8, against eps = 1e-6:
  # the function does depend on ||w|| here (ratio ~1 at the model's eps), not by design.
  params = {"w": 1e-4 * _p(1, 3, 8), "head": _p(2, 8, 2)}
  fn = lambda p, x: _rms_norm(x @ p["w"]) @ p["head"]
  with caplog.at_level(logging.WARNING, logger="absl"):
    report = detect.scale_invariance_report(fn, params, _x())
  assert report.groups == {"w": normreg.TENSOR, "head": None}
  leaf = report.leaves["w"]
  assert leaf.reason == "invariant" and report.epsilons == 1
  assert leaf.ratio_at_eps > 0.1 and dict(leaf.candidates)[normreg.TENSOR] < 1e-4
  assert report.eps_dominated() == ["w"]
  assert any("not at the model's own epsilon" in r.getMessage() and "w (" in r.getMessage()
             for r in caplog.records)
  # Each candidate is listed, finest first, with its ratio; the head's all fail.
  assert [g for g, _ in report.leaves["head"].candidates] == detect._candidates((8, 2))
  assert all(r > 1e-3 for _, r in report.leaves["head"].candidates)


@pytest.mark.parametrize("name, fn, params", [
    # A tiny but real effect that bypasses the normalization: 1e-4 of the output.
    ("bypass", lambda p, x: _rms_norm(x @ p["w"]) @ p["head"] + 1e-4 * (x @ p["v"]),
     {"w": _p(1, 3, 8), "head": _p(2, 8, 2), "v": _p(3, 3, 2)}),
    # Through the normalization but not homogeneous: a large constant beside v.
    ("offset", lambda p, x: _rms_norm(x @ p["v"] + 30.0) @ p["head"],
     {"v": 1e-2 * _p(3, 3, 8), "head": _p(2, 8, 2)}),
    # A smooth |h| = sqrt(h^2 + eps) is a root of an eps too, but homogeneous of degree 1.
    ("smooth_abs", lambda p, x: jnp.sqrt(jnp.square(x @ p["v"]) + 1e-6) @ p["head"],
     {"v": 1e-3 * _p(3, 3, 8), "head": _p(2, 8, 2)}),
    # The same weight through the normalization and around it: at a small init the path
    # around shrinks with ||v|| while the path through does not, as eps -> 0.
    ("through_and_around", lambda p, x: _rms_norm(x @ p["v"]) @ p["head"] + (x @ p["v"])
     @ p["head"], {"v": 1e-4 * _p(3, 3, 8), "head": _p(2, 8, 2)}),
    # A SiLU gate before a post-norm: invariant only in the ReLU limit of large weights.
    ("gate", lambda p, x: _rms_norm((jax.nn.silu(x @ p["v"]) * (x @ p["w"])) @ p["d"])
     @ p["head"], {"v": _p(3, 3, 8), "w": _p(1, 3, 8), "d": _p(4, 8, 8), "head": _p(2, 8, 2)}),
])
def test_weights_whose_invariance_is_not_by_design_are_never_grouped(name, fn, params):
  groups = normreg.find_scale_invariant(fn, params, _x())
  assert groups["v"] is None, name
  if name == "gate":  # the up kernel and the down kernel are invariant
    assert groups["w"] is normreg.TENSOR and groups["d"] is normreg.TENSOR


def test_a_fused_kernel_is_grouped_per_slice():
  # (3, heads, d, head_dim): q and k normalized per head, v before a post-norm.
  params = {"qkv": _p(1, 3, 2, 3, 4), "head": _p(2, 8, 2)}

  def fn(p, x):
    q, k, v = jnp.einsum("nd,shdk->snhk", x, p["qkv"])
    q, k = _rms_norm(q), _rms_norm(k)
    att = jax.nn.softmax(jnp.einsum("nhk,mhk->hnm", q, k), -1)
    out = jnp.einsum("hnm,mhk->nhk", att, v).reshape(x.shape[0], 8)
    return _rms_norm(out) @ p["head"]

  report = detect.scale_invariance_report(fn, params, _x())
  t1 = normreg.tensor(stack=1)
  assert report.groups["qkv"] == normreg.sliced(t1, t1, normreg.TENSOR)
  assert report.leaves["qkv"].reason == "per slice"
  assert [g for g, _ in report.leaves["qkv"].slices] == [t1, t1, normreg.TENSOR]


def test_a_fused_linear_with_bias_gets_joint_groups_per_slice_and_its_report_prints():
  # equinox's and PyTorch ports' layout: weight (3 * heads * head_dim, d), rows [s, h, p],
  # and a bias of 3 * heads * head_dim; q and k normalized per head, v not.
  params = {"qkv": {"weight": _p(1, 24, 3), "bias": _p(2, 24)}, "head": _p(3, 8, 2)}

  def fn(p, x):
    h = (x @ p["qkv"]["weight"].T + p["qkv"]["bias"][None]).reshape(-1, 3, 2, 4)
    q, k, v = _rms_norm(h[:, 0]), _rms_norm(h[:, 1]), h[:, 2]
    att = jax.nn.softmax(jnp.einsum("nhp,mhp->hnm", q, k), -1)
    return jnp.einsum("hnm,mhp->nhp", att, v).reshape(x.shape[0], 8) @ p["head"]

  report = detect.scale_invariance_report(fn, params, _x())
  weight, bias = report.groups["qkv"]["weight"], report.groups["qkv"]["bias"]
  assert weight.view == bias.view == (3, 2, 4) and weight.groups[2] is None
  assert weight.groups[0].joint == bias.groups[0].joint != weight.groups[1].joint
  assert weight.groups[0] == normreg.unit(axis=0, joint=weight.groups[0].joint)  # per head
  assert report.leaves["qkv/weight"].reason == "joint"
  assert "qkv/weight" in str(report) and "sliced(" in str(report)

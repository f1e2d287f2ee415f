"""normreg where JAX users train: stacked (scanned) layers, joint groups, nnx.Optimizer,
and every params form (issue: "normreg in every JAX training setup").

References are written independently: a network with one leaf per layer for the
stacked one, plain numpy for the joint groups.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import normreg
import stacked
import toy

KEY = jax.random.key(0)

TRANSFORMS = {
    "add_l2_penalty": lambda g: optax.chain(normreg.add_l2_penalty(1e-2, g),
                                            optax.sgd(0.1, momentum=0.9)),
    "spherical_sgd": lambda g: normreg.spherical_sgd(0.1, g, momentum=0.9),
    "spherical_adam": lambda g: normreg.spherical_adam(0.01, g),
    "tangent_projection": lambda g: optax.chain(optax.sgd(0.1, momentum=0.9),
                                                normreg.tangent_projection(g)),
    "scale_by_weight_norm": lambda g: optax.chain(normreg.scale_by_weight_norm(g),
                                                  optax.sgd(0.05)),
    "project_to_sphere_init": lambda g: optax.chain(
        optax.sgd(0.1), normreg.project_to_sphere(g, radius="init")),
}


def _train(tx, params, loss, steps=5):
  state = tx.init(params)

  @jax.jit
  def step(params, state, x, y):
    updates, state = tx.update(jax.grad(loss)(params, x, y), state, params)
    return optax.apply_updates(params, updates), state

  for k in jax.random.split(KEY, steps):
    params, state = step(params, state, *stacked.batch(k))
  return params


# --------------------------------------------------------------------- stack axes


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
@pytest.mark.parametrize("layer_norm, bias", [(False, False), (True, True)])
def test_scanned_network_trains_like_separate_layers(name, layer_norm, bias):
  params = stacked.init(KEY, bias=bias)
  kw = dict(layer_norm=layer_norm)
  make = TRANSFORMS[name]
  scanned = _train(make(stacked.groups(True, layer_norm, bias)), params,
                   lambda p, x, y: stacked.loss(stacked.apply_stacked, p, x, y, **kw))
  unrolled = _train(make(stacked.groups(False, layer_norm, bias)), stacked.unstack(params),
                    lambda p, x, y: stacked.loss(stacked.apply_unrolled, p, x, y, **kw))
  chex.assert_trees_all_close(stacked.unstack(scanned), unrolled, rtol=2e-5, atol=2e-6)


def test_a_stacked_leaf_grouped_without_its_stack_axis_trains_differently():
  # The bug stack axes fix: one norm over all layers' units fixes only the joint norm.
  params = stacked.init(KEY)
  loss = lambda p, x, y: stacked.loss(stacked.apply_stacked, p, x, y)
  wrong = stacked.groups(True)
  wrong["layers"]["kernel"] = normreg.UNIT
  right = _train(normreg.spherical_sgd(0.1, stacked.groups(True), momentum=0.9), params, loss)
  joint = _train(normreg.spherical_sgd(0.1, wrong, momentum=0.9), params, loss)
  per_layer = np.linalg.norm(np.asarray(joint["layers"]["kernel"]), axis=1)  # (L, H)
  assert not np.allclose(per_layer, 1.0, atol=1e-3)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(right["layers"]["kernel"]), axis=1),
                             1.0, atol=1e-5)


@pytest.mark.parametrize("layer_norm, bias", [(False, False), (True, True)])
def test_metrics_are_per_copy(layer_norm, bias):
  before = stacked.init(KEY, bias=bias)
  after = jax.tree.map(lambda a: a * 1.3 + 0.1, before)
  g_s, g_u = stacked.groups(True, layer_norm, bias), stacked.groups(False, layer_norm, bias)
  norms = normreg.unit_norms(before, g_s)["layers"]["kernel"]
  assert norms.shape == ((stacked.L,) if layer_norm else (stacked.L, stacked.H))
  for i in range(stacked.L):
    ref_norms = normreg.unit_norms(stacked.unstack(before), g_u)["layers"][str(i)]["kernel"]
    np.testing.assert_allclose(norms[i], ref_norms, rtol=1e-6)
    # numpy, independently: per unit over the input axis, or over kernel and bias.
    k = np.asarray(before["layers"]["kernel"][i], np.float64)
    if layer_norm:
      expect = np.sqrt(np.sum(k ** 2) + np.sum(np.asarray(before["layers"]["bias"][i]) ** 2))
    else:
      expect = np.linalg.norm(k, axis=0)
    np.testing.assert_allclose(norms[i], expect, rtol=1e-6)
    for fn in (lambda p, g: normreg.effective_learning_rate(0.1, p, g, power=1),
               lambda p, g: normreg.angular_update(p, jax.tree.map(lambda a: a * 1.3 + 0.1, p),
                                                   g)):
      got = fn(before, g_s)["layers"]["kernel"][i]
      ref = fn(stacked.unstack(before), g_u)["layers"][str(i)]["kernel"]
      np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)
  del after


@pytest.mark.parametrize("layer_norm, bias", [(False, False), (True, False), (True, True)])
def test_find_scale_invariant_detects_stack_axes_and_joint_groups(layer_norm, bias):
  x, _ = stacked.batch(jax.random.key(1), n=32)
  params = stacked.init(KEY, bias=bias)
  found = normreg.find_scale_invariant(
      lambda p, x: stacked.apply_stacked(p, x, layer_norm=layer_norm), params, x)
  assert found == stacked.groups(True, layer_norm, bias)
  found = normreg.find_scale_invariant(
      lambda p, x: stacked.apply_unrolled(p, x, layer_norm=layer_norm),
      stacked.unstack(params), x)
  assert found == stacked.groups(False, layer_norm, bias)


def test_scanned_nnx_model_is_detected_per_block_and_trains():
  model = normreg.models.create("scan_cnn", width=4, norm="batch", rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  x = jax.random.normal(KEY, (8, 8, 8, 3))
  groups = normreg.find_scale_invariant(
      lambda p, x: nnx.merge(graphdef, p, rest, copy=True)(x), params, x)
  by_path = normreg.groups.groups_by_path(groups, "test")  # groups hold nnx.Param boxes
  assert by_path["blocks/conv/kernel"] == normreg.unit(stack=1)
  assert by_path["stem_conv/kernel"] is normreg.UNIT
  norms = normreg.unit_norms(params, groups)["blocks"]["conv"]["kernel"]
  assert norms.shape == (model.depth, 4)


# -------------------------------------------------------------------- joint groups


def _joint_params():
  k1, k2, k3 = jax.random.split(KEY, 3)
  return {"dense": {"kernel": jax.random.normal(k1, (4, 3)), "bias": jax.random.normal(k2, (3,))},
          "head": jax.random.normal(k3, (3, 2))}


JOINT = {"dense": {"kernel": normreg.tensor(joint="dense"),
                   "bias": normreg.tensor(joint="dense")}, "head": None}


def _np(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def test_joint_group_transforms_against_numpy():
  params = _joint_params()
  updates = jax.tree.map(lambda a: jnp.cos(a) * 0.3, params)
  p, u = _np(params), _np(updates)
  norm = np.sqrt(np.sum(p["dense"]["kernel"] ** 2) + np.sum(p["dense"]["bias"] ** 2))

  def apply(tx):
    out, _ = tx.update(updates, tx.init(params), params)
    return _np(out)

  # scale_by_weight_norm: u * ||(K, b)||^p, both leaves by the one joint norm.
  for power in (1, 2):
    got = apply(normreg.scale_by_weight_norm(JOINT, power=power))
    for leaf in ("kernel", "bias"):
      np.testing.assert_allclose(got["dense"][leaf], u["dense"][leaf] * norm ** power,
                                 rtol=1e-6)
    np.testing.assert_array_equal(got["head"], u["head"])
  # tangent_projection: u - <u, w>/||w||^2 w over the concatenation.
  coef = (np.sum(u["dense"]["kernel"] * p["dense"]["kernel"])
          + np.sum(u["dense"]["bias"] * p["dense"]["bias"])) / norm ** 2
  got = apply(normreg.tangent_projection(JOINT))
  for leaf in ("kernel", "bias"):
    np.testing.assert_allclose(got["dense"][leaf], u["dense"][leaf] - coef * p["dense"][leaf],
                               rtol=1e-5, atol=1e-7)
  # project_to_sphere: new = (w/||w|| + u) / ||w/||w|| + u||, emitted as new - w.
  stepped = {k: p["dense"][k] / norm + u["dense"][k] for k in ("kernel", "bias")}
  new_norm = np.sqrt(sum(np.sum(v ** 2) for v in stepped.values()))
  got = apply(normreg.project_to_sphere(JOINT))
  for leaf in ("kernel", "bias"):
    np.testing.assert_allclose(got["dense"][leaf] + p["dense"][leaf],
                               stepped[leaf] / new_norm, rtol=1e-5, atol=1e-7)


def test_joint_group_metrics_against_numpy():
  before = _joint_params()
  after = jax.tree.map(lambda a: a + 0.2 * jnp.sin(3 * a), before)
  b, a = _np(before), _np(after)
  vec_b = np.concatenate([b["dense"]["kernel"].ravel(), b["dense"]["bias"]])
  vec_a = np.concatenate([a["dense"]["kernel"].ravel(), a["dense"]["bias"]])
  norms = normreg.unit_norms(before, JOINT)
  angle = normreg.angular_update(before, after, JOINT)
  cos = vec_a @ vec_b / np.linalg.norm(vec_a) / np.linalg.norm(vec_b)
  for leaf in ("kernel", "bias"):
    np.testing.assert_allclose(norms["dense"][leaf], np.linalg.norm(vec_b), rtol=1e-6)
    np.testing.assert_allclose(angle["dense"][leaf], np.arccos(cos), rtol=1e-4)
  assert norms["head"] is None


def test_a_mask_that_splits_a_joint_group_is_an_error():
  params = _joint_params()
  mask = {"dense": {"kernel": True, "bias": False}, "head": False}
  tx = optax.masked(normreg.tangent_projection(JOINT), mask)
  with pytest.raises(ValueError, match="joint group 'dense' is split"):
    tx.update(params, tx.init(params), params)


def test_rules_declare_stack_axes_and_joint_groups():
  params = stacked.init(KEY, bias=True)
  groups = normreg.groups_from_rules(params, [
      ("inp", normreg.UNIT),
      (r"(layers)/(kernel|bias)", normreg.tensor(stack=1, joint=r"\1")),
      (".*", None)], log=False)
  assert groups == stacked.groups(True, layer_norm=True, bias=True)
  lines = normreg.groups.summary(groups).splitlines()
  assert len(lines) == 5
  assert "layers/bias tensor stack=1 joint=layers" in [" ".join(l.split()) for l in lines]
  # Members whose per-group shapes differ cannot form one group.
  with pytest.raises(ValueError, match="joint group 'x'.*per-group shape"):
    normreg.groups_from_rules(params, [("inp|layers/kernel", normreg.tensor(stack=1, joint="x")),
                                       (".*", None)], log=False)  # (5,) against (3,)
  with pytest.raises(ValueError, match="needs at least 2 axes"):
    normreg.groups_from_rules(params, [("head/bias", normreg.unit(stack=1)), (".*", None)],
                              log=False)


# ------------------------------------------------------------- nnx and params forms


def _small_model():
  return normreg.models.create("cnn", width=4, norm="batch", rngs=nnx.Rngs(0))


def _loss(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def test_nnx_optimizer_with_normreg_matches_the_functional_loop():
  x = jax.random.normal(KEY, (8, 16, 16, 3))
  y = jnp.arange(8) % 10
  model = _small_model()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  groups = normreg.find_scale_invariant(
      lambda p, x: nnx.merge(graphdef, p, rest, copy=True)(x), params, x)

  optimizer = nnx.Optimizer(model, normreg.spherical_sgd(0.1, groups, momentum=0.9),
                            wrt=nnx.Param)

  @nnx.jit
  def nnx_step(model, optimizer, x, y):
    grads = nnx.grad(_loss)(model, x, y)
    optimizer.update(model, grads)

  for _ in range(3):
    nnx_step(model, optimizer, x, y)

  # The same three steps written functionally (the split/merge form of docs/groups.md), from a fresh
  # copy of the model: nnx.split shares its Variables with the model the optimizer updated.
  graphdef, params, rest = nnx.split(_small_model(), nnx.Param, ...)
  tx = normreg.spherical_sgd(0.1, groups, momentum=0.9)
  state = tx.init(params)

  @jax.jit
  def step(params, rest, state):
    def loss(p):
      m = nnx.merge(graphdef, p, rest, copy=True)
      return _loss(m, x, y), nnx.split(m, nnx.Param, ...)[2]
    (_, rest), grads = jax.value_and_grad(loss, has_aux=True)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), rest, state

  for _ in range(3):
    params, rest, state = step(params, rest, state)
  chex.assert_trees_all_close(nnx.as_pure(nnx.state(model, nnx.Param)), nnx.as_pure(params),
                              rtol=1e-5, atol=1e-6)
  norms = normreg.unit_norms(nnx.state(model, nnx.Param), groups)
  np.testing.assert_allclose(norms["convs"][0]["kernel"], 1.0, atol=1e-5)


def _forms(state):
  """The same params as a boxed NNX State, a pure State and a pure dict."""
  return {"boxed": state, "pure_state": nnx.as_pure(state),
          "dict": nnx.to_pure_dict(state)}


@pytest.mark.parametrize("groups_form", ["boxed", "pure_state", "dict"])
@pytest.mark.parametrize("params_form", ["pure_state", "dict"])
def test_every_function_takes_groups_and_params_in_any_form(groups_form, params_form):
  model = _small_model()
  _, params, _ = nnx.split(model, nnx.Param, ...)
  rules = [(r"convs/\d+/kernel", normreg.UNIT), (".*", None)]
  groups = _forms(normreg.groups_from_rules(params, rules, log=False))[groups_form]
  p = _forms(params)[params_form]
  ref_p = _forms(params)["dict"]
  ref_g = _forms(normreg.groups_from_rules(params, rules, log=False))["dict"]
  grads = jax.tree.map(lambda a: jnp.sin(a) * 0.1, p)
  ref_grads = jax.tree.map(lambda a: jnp.sin(a) * 0.1, ref_p)
  for name, make in {**TRANSFORMS, "sgd_l2": lambda g: normreg.sgd_l2(0.1, 1e-3, g),
                     "rates": lambda g: normreg.scale_by_learning_rates(0.1, g, 0.3)}.items():
    tx, ref_tx = make(groups), make(ref_g)
    got, _ = tx.update(grads, tx.init(p), p)
    want, _ = ref_tx.update(ref_grads, ref_tx.init(ref_p), ref_p)
    chex.assert_trees_all_close(nnx.to_pure_dict(got) if params_form != "dict" else got, want,
                                rtol=1e-6, atol=1e-7, custom_message=name)
  got = normreg.unit_norms(p, groups)
  want = normreg.unit_norms(ref_p, ref_g)
  flat = lambda t: [x for x in jax.tree.leaves(t) if x is not None]
  chex.assert_trees_all_close(flat(got), flat(want))
  assert flat(normreg.as_mask(groups)) == flat(normreg.as_mask(ref_g))


@pytest.mark.parametrize("name", sorted(TRANSFORMS) + ["unit_norms"])
def test_mismatched_groups_fail_at_init(name):
  params = toy.init(KEY)
  groups = dict(toy.GROUPS)
  del groups["w2"]
  with pytest.raises(ValueError, match="does not match the params.*w2"):
    if name == "unit_norms":
      normreg.unit_norms(params, groups)
    else:
      TRANSFORMS[name](groups).init(params)


@pytest.mark.parametrize("layer_norm, bias", [(False, False), (True, True)])
def test_rescale_groups_keeps_the_function(layer_norm, bias):
  params = stacked.init(KEY, bias=bias)
  groups = stacked.groups(True, layer_norm, bias)
  rng = np.random.default_rng(0)
  scaled = normreg.rescale_groups(params, groups, lambda shape: rng.uniform(0.25, 4.0, shape))
  x, _ = stacked.batch(jax.random.key(1))
  np.testing.assert_allclose(stacked.apply_stacked(scaled, x, layer_norm=layer_norm),
                             stacked.apply_stacked(params, x, layer_norm=layer_norm),
                             rtol=1e-4, atol=1e-5)
  factor = np.asarray(scaled["layers"]["kernel"]) / np.asarray(params["layers"]["kernel"])
  if bias:  # one factor per layer, shared by the joint kernel and bias
    per_layer = factor.reshape(stacked.L, -1)
    np.testing.assert_allclose(per_layer, per_layer[:, :1] * np.ones_like(per_layer), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(scaled["layers"]["bias"]) /
                               np.asarray(params["layers"]["bias"]), per_layer[:, :stacked.H],
                               rtol=1e-5)
  else:  # one factor per (layer, unit)
    assert len(np.unique(np.round(factor[:, 0, :], 6))) == stacked.L * stacked.H
  assert scaled["head"] is params["head"] or np.array_equal(scaled["head"]["kernel"],
                                                            params["head"]["kernel"])

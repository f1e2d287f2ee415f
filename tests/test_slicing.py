"""Per-slice groups (normreg.sliced) for fused kernels: every transform and metric honours them.

The references: numpy on each slice (norms, projections, the plain SGD step of an ungrouped
slice), and each transform run on the same weights stored as separate leaves, one per slice.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import normreg
import test_transforms

_RNG = np.random.default_rng(0)
# A fused q/k/v kernel (3, heads, d, head_dim) behind QK-norm and a post-norm: q and k per head,
# v as a whole; a fused gate/up (2, hidden, d): the gate feeds a non-linearity, up a post-norm.
QKV = jnp.asarray(_RNG.normal(size=(3, 2, 4, 3)), jnp.float32)
GATE_UP = jnp.asarray(_RNG.normal(size=(2, 5, 4)), jnp.float32)
FUSED = {"qkv": QKV, "gate_up": GATE_UP, "scale": jnp.ones(4)}
FUSED_GROUPS = {"qkv": normreg.sliced(normreg.tensor(stack=1), normreg.tensor(stack=1),
                                      normreg.TENSOR),
                "gate_up": normreg.sliced(None, normreg.TENSOR), "scale": None}
# The same weights, one leaf per slice.
SEPARATE = {"q": QKV[0], "k": QKV[1], "v": QKV[2], "gate": GATE_UP[0], "up": GATE_UP[1],
            "scale": jnp.ones(4)}
SEPARATE_GROUPS = {"q": normreg.tensor(stack=1), "k": normreg.tensor(stack=1),
                   "v": normreg.TENSOR, "gate": None, "up": normreg.TENSOR, "scale": None}


def _fused(separate):
  return {"qkv": jnp.stack([separate["q"], separate["k"], separate["v"]]),
          "gate_up": jnp.stack([separate["gate"], separate["up"]]), "scale": separate["scale"]}


def _grads(seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), SEPARATE)


@pytest.mark.parametrize("name", sorted(test_transforms._NAMED))  # pylint: disable=protected-access
def test_every_transform_steps_a_fused_leaf_as_its_slices_stored_apart(name):
  make = test_transforms._NAMED[name]  # pylint: disable=protected-access
  fused_tx, separate_tx = make(FUSED_GROUPS), make(SEPARATE_GROUPS)
  fused_state, separate_state = fused_tx.init(FUSED), separate_tx.init(SEPARATE)
  fused_params, separate_params = FUSED, SEPARATE
  for step in range(3):
    grads = _grads(step)
    fused_u, fused_state = jax.jit(fused_tx.update)(_fused(grads), fused_state, fused_params)
    separate_u, separate_state = separate_tx.update(grads, separate_state, separate_params)
    assert jax.tree.map(jnp.shape, fused_u) == jax.tree.map(jnp.shape, FUSED)
    np.testing.assert_allclose(fused_u["qkv"], _fused(separate_u)["qkv"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fused_u["gate_up"], _fused(separate_u)["gate_up"], rtol=1e-5,
                               atol=1e-6)
    fused_params = optax.apply_updates(fused_params, fused_u)
    separate_params = optax.apply_updates(separate_params, separate_u)


def test_spherical_sgd_puts_grouped_slices_on_the_sphere_and_steps_the_gate_as_sgd():
  tx = normreg.spherical_sgd(0.1, FUSED_GROUPS)
  grads = _fused(_grads(0))
  updates, _ = tx.update(grads, tx.init(FUSED), FUSED)
  new = np.asarray(optax.apply_updates(FUSED, updates)["qkv"]), np.asarray(
      optax.apply_updates(FUSED, updates)["gate_up"])
  qkv, gate_up = new
  np.testing.assert_allclose(np.sqrt((qkv[0] ** 2).sum((1, 2))), [1, 1], rtol=1e-6)  # per head
  np.testing.assert_allclose(np.sqrt((qkv[1] ** 2).sum((1, 2))), [1, 1], rtol=1e-6)
  np.testing.assert_allclose(np.sqrt((qkv[2] ** 2).sum()), 1, rtol=1e-6)  # v as a whole
  np.testing.assert_allclose(np.sqrt((gate_up[1] ** 2).sum()), 1, rtol=1e-6)
  np.testing.assert_allclose(gate_up[0], np.asarray(GATE_UP[0] - 0.1 * grads["gate_up"][0]),
                             rtol=1e-6)


def test_metrics_give_a_tuple_of_per_slice_values_at_a_fused_leaf():
  norms = normreg.unit_norms(FUSED, FUSED_GROUPS)
  q, k, v = norms["qkv"]
  np.testing.assert_allclose(q, np.sqrt((np.asarray(QKV[0]) ** 2).sum((1, 2))), rtol=1e-6)
  np.testing.assert_allclose(k, np.sqrt((np.asarray(QKV[1]) ** 2).sum((1, 2))), rtol=1e-6)
  np.testing.assert_allclose(v, np.sqrt((np.asarray(QKV[2]) ** 2).sum()), rtol=1e-6)
  gate, up = norms["gate_up"]
  assert gate is None and norms["scale"] is None
  np.testing.assert_allclose(up, np.linalg.norm(np.asarray(GATE_UP[1])), rtol=1e-6)
  elr = normreg.effective_learning_rate(0.1, FUSED, FUSED_GROUPS)
  np.testing.assert_allclose(elr["qkv"][0], 0.1 / q ** 2, rtol=1e-6)
  turned = {"qkv": QKV.at[2].multiply(-1.0), "gate_up": GATE_UP, "scale": FUSED["scale"]}
  angles = normreg.angular_update(FUSED, turned, FUSED_GROUPS)
  np.testing.assert_allclose(angles["qkv"][2], np.pi, rtol=1e-6)  # v flipped, q and k kept
  np.testing.assert_allclose(angles["qkv"][0], [0, 0], atol=1e-3)


def test_rescaled_and_decayed_slices_follow_numpy():
  scaled = normreg.rescale_groups(FUSED, FUSED_GROUPS, 3.0)
  np.testing.assert_allclose(scaled["qkv"], 3 * np.asarray(QKV), rtol=1e-6)  # every slice grouped
  np.testing.assert_allclose(scaled["gate_up"][0], GATE_UP[0])  # the gate is not
  np.testing.assert_allclose(scaled["gate_up"][1], 3 * np.asarray(GATE_UP[1]), rtol=1e-6)
  tx = normreg.add_decayed_weights(0.5, FUSED_GROUPS)
  zeros = jax.tree.map(jnp.zeros_like, FUSED)
  updates, _ = tx.update(zeros, tx.init(FUSED), FUSED)
  np.testing.assert_allclose(updates["gate_up"][0], 0)
  np.testing.assert_allclose(updates["gate_up"][1], 0.5 * np.asarray(GATE_UP[1]), rtol=1e-6)
  np.testing.assert_allclose(updates["qkv"], 0.5 * np.asarray(QKV), rtol=1e-6)
  doubled = normreg.groups.map_grouped(lambda g, w: 2 * w, FUSED_GROUPS, FUSED)
  np.testing.assert_allclose(doubled["gate_up"][0], GATE_UP[0])
  np.testing.assert_allclose(doubled["gate_up"][1], 2 * np.asarray(GATE_UP[1]))


def test_slices_along_a_layer_axis_stacked_by_scan():
  stacked = jnp.asarray(_RNG.normal(size=(2, 3, 4, 5)), jnp.float32)  # (layers, q/k/v, d, hd)
  groups = {"w": normreg.sliced(normreg.tensor(stack=1), None, normreg.tensor(stack=1), axis=1)}
  norms = normreg.unit_norms({"w": stacked}, groups)["w"]
  np.testing.assert_allclose(norms[0], np.sqrt((np.asarray(stacked[:, 0]) ** 2).sum((1, 2))),
                             rtol=1e-6)
  assert norms[1] is None
  tx = normreg.project_to_sphere(groups)
  updates, _ = tx.update({"w": jnp.zeros_like(stacked)}, tx.init({"w": stacked}), {"w": stacked})
  new = np.asarray(stacked + updates["w"])
  np.testing.assert_allclose(np.sqrt((new[:, 2] ** 2).sum((1, 2))), [1, 1], rtol=1e-6)
  np.testing.assert_allclose(new[:, 1], np.asarray(stacked[:, 1]), atol=1e-7)


def test_groups_from_rules_take_sliced_groups_and_expand_their_joint_tags():
  params = {"blocks": [{"qkv": QKV, "bias": jnp.zeros((3, 2, 3))} for _ in range(2)]}
  groups = normreg.groups_from_rules(params, [
      (r"blocks/(\d+)/(qkv|bias)", normreg.sliced(None, None, normreg.tensor(joint=r"v\1"))),
  ], log=False)
  assert groups["blocks"][1]["bias"].groups[2].joint == "v1"
  norms = normreg.unit_norms(params, groups)["blocks"][0]["qkv"]
  np.testing.assert_allclose(norms[2], np.linalg.norm(np.asarray(QKV[2])), rtol=1e-6)


@pytest.mark.parametrize("spec, message", [
    (normreg.sliced(None, normreg.TENSOR), r"'qkv': sliced\(- \| tensor\) gives 2 slices "
                                           r"along axis 0, but the leaf has shape \(3, 2, 4, 3\)"),
    (normreg.sliced(normreg.unit(stack=3), None, None), r"'qkv' slice 0: a unit stack=3 group"),
])
def test_a_wrong_slice_spec_is_one_error_naming_the_leaf(spec, message):
  groups = dict(FUSED_GROUPS, qkv=spec)
  with pytest.raises(ValueError, match=message):
    normreg.spherical_sgd(0.1, groups).init(FUSED)
  with pytest.raises(ValueError, match=message):
    normreg.unit_norms(FUSED, groups)


def test_a_boolean_mask_refuses_a_sliced_leaf_and_names_it():
  with pytest.raises(ValueError, match=r"as_mask: 'gate_up' is grouped per slice"):
    normreg.as_mask(FUSED_GROUPS)


def test_sliced_specs_compare_and_print_as_written():
  assert normreg.sliced(None, normreg.UNIT, axis=1) == normreg.sliced(None, normreg.UNIT, axis=1)
  assert repr(normreg.sliced(None, normreg.UNIT, axis=1)) == (
      "normreg.sliced(None, normreg.UNIT, axis=1)")
  with pytest.raises(ValueError, match="cannot itself be sliced"):
    normreg.sliced(normreg.sliced(None), None)


def test_groups_given_as_a_function_of_the_params_may_be_sliced():
  as_data, as_function = (normreg.spherical_adam(0.1, g) for g in (FUSED_GROUPS,
                                                                    lambda p: FUSED_GROUPS))
  grads = _fused(_grads(1))
  want, _ = as_data.update(grads, as_data.init(FUSED), FUSED)
  got, _ = as_function.update(grads, as_function.init(FUSED), FUSED)
  np.testing.assert_allclose(got["qkv"], want["qkv"], rtol=1e-6)
  np.testing.assert_allclose(got["gate_up"], want["gate_up"], rtol=1e-6)


def test_the_launchers_layer_metrics_give_one_entry_per_grouped_slice():
  from experiments import steps  # pylint: disable=g-import-not-at-top
  after = {"qkv": 2 * QKV, "gate_up": GATE_UP, "scale": FUSED["scale"]}
  metrics = steps.layer_metrics(FUSED, after, FUSED_GROUPS, 0.1, power=2, rescaled=False)
  # q and k are per head (one stack axis): an entry per head, as per layer for a scanned leaf.
  assert sorted(metrics) == ["gate_up/1", "qkv/0/0", "qkv/0/1", "qkv/1/0", "qkv/1/1", "qkv/2"]
  q_norms = 2 * np.sqrt((np.asarray(QKV[0]) ** 2).sum((1, 2)))  # per head
  np.testing.assert_allclose(metrics["qkv/0/1"]["norm"], q_norms[1], rtol=1e-6)
  np.testing.assert_allclose(metrics["qkv/0/1"]["elr"], 0.1 / q_norms[1] ** 2, rtol=1e-5)
  np.testing.assert_allclose(metrics["qkv/2"]["norm"], 2 * np.linalg.norm(np.asarray(QKV[2])),
                             rtol=1e-6)
  np.testing.assert_allclose(metrics["gate_up/1"]["angle"], 0, atol=1e-3)


def test_slices_concatenated_along_an_axis_are_read_through_a_view():
  # PyTorch ports' fused q/k/v Linear: a (3 * heads * head_dim, d) weight, rows [s, h, p].
  weight = jnp.asarray(_RNG.normal(size=(24, 5)), jnp.float32)  # 3 slices, 2 heads of 4 rows
  per_head = normreg.unit(axis=0)  # in the slice's view (heads, head_dim, d)
  groups = {"w": normreg.sliced(per_head, per_head, None, view=(3, 2, 4))}
  grads = jnp.asarray(_RNG.normal(size=(24, 5)), jnp.float32)
  tx = normreg.spherical_sgd(0.1, groups)
  updates, _ = tx.update({"w": grads}, tx.init({"w": weight}), {"w": weight})
  new = np.asarray(weight + updates["w"])
  heads = new[:16].reshape(2, 2, 4, 5)  # q and k: (slice, head, row, d)
  np.testing.assert_allclose(np.sqrt((heads ** 2).sum((2, 3))), np.ones((2, 2)), rtol=1e-6)
  np.testing.assert_allclose(new[16:], np.asarray(weight[16:] - 0.1 * grads[16:]), rtol=1e-6)
  norms = normreg.unit_norms({"w": weight}, groups)["w"]
  np.testing.assert_allclose(norms[1], np.sqrt((np.asarray(weight[8:16]).reshape(2, 4, 5) ** 2)
                                               .sum((1, 2))), rtol=1e-6)
  with pytest.raises(ValueError, match=r"'w': sliced\(.*\) reads axis 0 as \(3, 2, 5\)"):
    normreg.unit_norms({"w": weight}, {"w": normreg.sliced(None, None, None, view=(3, 2, 5))})


def test_adamps_cosine_heuristic_ignores_groups_sliced_or_not():
  grads = _fused(_grads(2))
  with_slices = normreg.adamp(0.1, FUSED_GROUPS, heuristic=True)
  without = normreg.adamp(0.1, jax.tree.map(lambda _: None, FUSED), heuristic=True)
  state_a, state_b = with_slices.init(FUSED), without.init(FUSED)
  params_a = params_b = FUSED
  for _ in range(3):
    u_a, state_a = with_slices.update(grads, state_a, params_a)
    u_b, state_b = without.update(grads, state_b, params_b)
    params_a, params_b = optax.apply_updates(params_a, u_a), optax.apply_updates(params_b, u_b)
  np.testing.assert_array_equal(params_a["qkv"], params_b["qkv"])


def test_a_groups_function_is_called_on_the_updates_when_no_params_are_given():
  tx = normreg.scale_by_learning_rates(0.1, lambda tree: FUSED_GROUPS, 0.5)
  grads = _fused(_grads(3))
  updates, _ = tx.update(grads, tx.init(FUSED))
  np.testing.assert_allclose(updates["gate_up"][1], -0.1 * np.asarray(grads["gate_up"][1]),
                             rtol=1e-6)  # up: grouped
  np.testing.assert_allclose(updates["gate_up"][0], -0.5 * np.asarray(grads["gate_up"][0]),
                             rtol=1e-6)  # the gate: ungrouped


def test_rotational_hands_its_inner_optimizer_the_trees_as_they_are():
  # A pytree mask inside the inner optimizer, shaped like the params: the fused leaf whole.
  mask = {"qkv": True, "gate_up": True, "scale": False}
  inner = optax.masked(optax.sgd(0.1), mask)
  tx = normreg.rotational(inner, FUSED_GROUPS, target_angle=0.01)
  updates, state = tx.update(_fused(_grads(4)), tx.init(FUSED), FUSED)
  assert jax.tree.map(jnp.shape, updates) == jax.tree.map(jnp.shape, FUSED)
  new = optax.apply_updates(FUSED, updates)
  angles = normreg.angular_update(FUSED, new, FUSED_GROUPS)
  np.testing.assert_allclose(angles["qkv"][2], 0.01, rtol=1e-3)  # v: turned by the target
  np.testing.assert_allclose(np.linalg.norm(np.asarray(new["qkv"][2])),
                             np.linalg.norm(np.asarray(QKV[2])), rtol=1e-5)  # norm kept
  assert jax.tree.structure(state.inner) == jax.tree.structure(inner.init(FUSED))


def test_bf16_fused_leaves_stay_bf16():
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), FUSED)
  for make in (lambda g: normreg.spherical_adam(0.1, g), lambda g: normreg.adamh(0.1, g)):
    tx = make(FUSED_GROUPS)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    assert {x.dtype for x in jax.tree.leaves(updates)} == {jnp.dtype(jnp.bfloat16)}

"""The transforms against independent references, and their invariances."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import normreg
import toy

KEY = jax.random.key(0)


def _np_unit_norm(w, group):
  w = np.asarray(w, np.float64)
  axes = tuple(range(w.ndim - 1)) if group is normreg.UNIT else tuple(range(w.ndim))
  return np.sqrt(np.sum(w ** 2, axis=axes, keepdims=True))


def _run(tx, params, steps, key=KEY, loss=toy.loss, keys=None):
  """Trains ``steps`` steps with a jitted step (batches from ``keys``, default
  ``split(key, steps)``); returns the params after each."""
  state = tx.init(params)

  @jax.jit
  def step(params, state, x, y):
    grads = jax.grad(loss)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  history = []
  for k in jax.random.split(key, steps) if keys is None else keys:
    params, state = step(params, state, *toy.batch(k))
    history.append(params)
  return history


# ----------------------------------------------------------------- add_l2_penalty


def test_add_l2_penalty_matches_hand_written_gradient():
  params = toy.init(KEY)
  x, y = toy.batch(KEY)
  lam = 3e-3

  def penalized(p):  # L + lam * ||w||^2 on w1 and w2 only, written out by hand.
    return toy.loss(p, x, y) + lam * (jnp.sum(p["w1"] ** 2) + jnp.sum(p["w2"] ** 2))

  tx = normreg.add_l2_penalty(lam, toy.GROUPS)
  updates, _ = jax.jit(tx.update)(jax.grad(toy.loss)(params, x, y), tx.init(params), params)
  chex.assert_trees_all_close(updates, jax.grad(penalized)(params), rtol=1e-6, atol=1e-7)
  # BN scale/bias and the head are untouched: exactly the data gradient.
  grads = jax.grad(toy.loss)(params, x, y)
  chex.assert_trees_all_equal(updates["bn"], grads["bn"])
  chex.assert_trees_all_equal(updates["head"], grads["head"])


def test_sgd_l2_equals_sgd_on_penalized_loss():
  params = toy.init(KEY)
  lam, lr, mu = 1e-2, 0.1, 0.9

  def penalized(p, x, y):
    return toy.loss(p, x, y) + lam * (jnp.sum(p["w1"] ** 2) + jnp.sum(p["w2"] ** 2))

  ours = _run(normreg.sgd_l2(lr, lam, toy.GROUPS, momentum=mu), params, 5)
  ref = _run(optax.sgd(lr, momentum=mu), params, 5, loss=penalized)
  chex.assert_trees_all_close(ours[-1], ref[-1], rtol=1e-5, atol=1e-6)


def test_decoupled_weight_decay_is_optax_with_our_mask():
  # Documented relation: add_decayed_weights(wd) before SGD == coupled L2 with lam = wd/2.
  params = toy.init(KEY)
  wd = 4e-3
  decoupled = optax.chain(
      optax.add_decayed_weights(wd, mask=normreg.as_mask(toy.GROUPS)), optax.sgd(0.1))
  coupled = normreg.sgd_l2(0.1, wd / 2, toy.GROUPS)
  chex.assert_trees_all_close(_run(decoupled, params, 3)[-1], _run(coupled, params, 3)[-1],
                              rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------- invariance


SPHERICAL = {
    "sgd": lambda: normreg.spherical_sgd(0.2, toy.GROUPS),
    "sgd_momentum": lambda: normreg.spherical_sgd(0.2, toy.GROUPS, momentum=0.9),
    "sgd_nesterov": lambda: normreg.spherical_sgd(0.2, toy.GROUPS, momentum=0.9, nesterov=True),
    "adam": lambda: normreg.spherical_adam(0.01, toy.GROUPS),
}


@pytest.mark.parametrize("name", sorted(SPHERICAL))
def test_spherical_trajectory_is_independent_of_initial_scale(name):
  params = toy.init(KEY)
  a = jnp.array([0.3, 2.0, 7.0, 1.0, 0.05, 11.0])  # a different factor per unit
  tx = SPHERICAL[name]()
  base = _run(tx, params, 10)
  scaled = _run(tx, toy.scale_grouped(params, a), 10)
  x, _ = toy.batch(jax.random.key(1))
  for p, q in zip(base, scaled):
    chex.assert_trees_all_close(toy.apply(p, x), toy.apply(q, x), rtol=1e-3, atol=1e-4)
  # The first step already agrees: the point stepped from is w/||w||.
  chex.assert_trees_all_close(base[0]["w1"], scaled[0]["w1"], rtol=2e-5, atol=2e-6)


def _unit_grouped(params):
  """toy params with w1 rescaled to unit norm per unit and w2 as a whole."""
  out = dict(params)
  out["w1"] = params["w1"] / jnp.linalg.norm(params["w1"], axis=0, keepdims=True)
  out["w2"] = params["w2"] / jnp.linalg.norm(params["w2"])
  return out


def test_naive_chain_differs_only_by_its_first_gradient():
  params = _unit_grouped(toy.init(KEY))
  naive = lambda lr, mu: optax.chain(optax.sgd(lr, momentum=mu or None),
                                     normreg.project_to_sphere(toy.GROUPS))
  # On the unit sphere the naive chain is spherical_sgd, step for step, momentum included.
  for a, b in zip(_run(naive(0.2, 0.9), params, 8),
                  _run(normreg.spherical_sgd(0.2, toy.GROUPS, momentum=0.9), params, 8)):
    chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-6)
  # From a*w0 (a = 4) without momentum: its first step is spherical_sgd's at lr/a (the
  # gradient at a*w0 is grad L(w0)/a) ...
  scaled = toy.scale_grouped(params, jnp.full((toy.HIDDEN,), 4.0))
  keys = jax.random.split(KEY, 5)
  first, *rest = _run(naive(0.2, 0.0), scaled, 5, keys=keys)
  expected = _run(normreg.spherical_sgd(0.2 / 4, toy.GROUPS), params, 1, keys=keys[:1])[0]
  chex.assert_trees_all_close(first["w1"], expected["w1"], rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(first["w2"], expected["w2"], rtol=1e-5, atol=1e-6)
  # ... and from there on (on the sphere) it is spherical_sgd again.
  from_first = _run(normreg.spherical_sgd(0.2, toy.GROUPS), first, 4, keys=keys[1:])
  for a, b in zip(rest, from_first):
    chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-6)


def test_naive_chain_is_not_scale_invariant():
  """The reason spherical_sgd is built as it is: sgd -> project alone is not."""
  params = toy.init(KEY)
  a = jnp.full((toy.HIDDEN,), 5.0)
  naive = optax.chain(optax.sgd(0.2, momentum=0.9), normreg.project_to_sphere(toy.GROUPS))
  base = _run(naive, params, 3)[-1]
  scaled = _run(naive, toy.scale_grouped(params, a), 3)[-1]
  assert not np.allclose(base["w1"], scaled["w1"], atol=1e-3)


@pytest.mark.parametrize("make", ["spherical_sgd", "spherical_adam"])
def test_spherical_keeps_unit_norm(make):
  params = toy.init(KEY)
  tx = getattr(normreg, make)(0.3, toy.GROUPS)
  for p in _run(tx, params, 25)[::6]:
    norms = normreg.unit_norms(p, toy.GROUPS)
    np.testing.assert_allclose(norms["w1"], 1.0, atol=1e-5)
    np.testing.assert_allclose(norms["w2"], 1.0, atol=1e-5)
    assert norms["bn"]["scale"] is None


@pytest.mark.parametrize("make, lr", [("spherical_sgd", 0.2), ("spherical_adam", 0.01)])
@pytest.mark.parametrize("groups_as", ["pytree", "callable"])
def test_ungrouped_learning_rate_scales_only_the_ungrouped_steps(make, lr, groups_as):
  params = toy.init(KEY)
  groups = toy.GROUPS if groups_as == "pytree" else (lambda _: toy.GROUPS)
  same = getattr(normreg, make)(lr, groups)
  apart = getattr(normreg, make)(lr, groups, ungrouped_learning_rate=lr / 4)
  s_same, s_apart = same.init(params), apart.init(params)
  for k in jax.random.split(KEY, 3):  # the same gradients into both, three steps
    grads = jax.grad(toy.loss)(params, *toy.batch(k))
    u_same, s_same = same.update(grads, s_same, params)
    u_apart, s_apart = apart.update(grads, s_apart, params)
    for name in ("w1", "w2"):  # grouped: unchanged
      chex.assert_trees_all_close(u_apart[name], u_same[name], rtol=1e-6, atol=1e-7)
    for name in ("bn", "head"):  # ungrouped: a quarter of the step
      chex.assert_trees_all_close(u_apart[name], jax.tree.map(lambda u: u / 4, u_same[name]),
                                  rtol=1e-6, atol=1e-8)
    assert float(jnp.abs(u_same["head"]["kernel"]).max()) > 0
  with pytest.raises(ValueError, match="ungrouped_learning_rate must be > 0"):
    getattr(normreg, make)(lr, groups, ungrouped_learning_rate=0.0)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_scale_by_weight_norm_makes_sgd_scale_equivariant(momentum):
  params = toy.init(KEY)
  a = 2.5
  tx = optax.chain(normreg.scale_by_weight_norm(toy.GROUPS, power=2),
                   optax.sgd(0.05, momentum=momentum or None))
  base = _run(tx, params, 8)
  scaled = _run(tx, toy.scale_grouped(params, jnp.full((toy.HIDDEN,), a)), 8)
  for p, q in zip(base, scaled):
    np.testing.assert_allclose(q["w1"], a * p["w1"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(q["w2"], a * p["w2"], rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(q["head"], p["head"], rtol=1e-4, atol=1e-5)


def test_plain_sgd_is_not_scale_equivariant():
  params = toy.init(KEY)
  base = _run(optax.sgd(0.05), params, 3)[-1]
  scaled = _run(optax.sgd(0.05), toy.scale_grouped(params, jnp.full((toy.HIDDEN,), 2.5)), 3)[-1]
  assert not np.allclose(scaled["w1"], 2.5 * base["w1"], rtol=1e-3)


# ------------------------------------------------------------ the single transforms


def test_scale_by_weight_norm_against_numpy():
  params = toy.init(KEY)
  updates = jax.tree.map(jnp.ones_like, params)
  tx = normreg.scale_by_weight_norm(toy.GROUPS, power=1.5)
  out, _ = tx.update(updates, tx.init(params), params)
  np.testing.assert_allclose(out["w1"], np.broadcast_to(
      _np_unit_norm(params["w1"], normreg.UNIT) ** 1.5, (toy.IN, toy.HIDDEN)), rtol=1e-5)
  np.testing.assert_allclose(out["w2"], np.full(
      (toy.HIDDEN, toy.HIDDEN), _np_unit_norm(params["w2"], normreg.TENSOR).item() ** 1.5),
                             rtol=1e-5)
  chex.assert_trees_all_equal(out["head"], updates["head"])


def test_tangent_projection_removes_radial_part():
  params = toy.init(KEY)
  updates = jax.tree.map(lambda x: jax.random.normal(KEY, x.shape), params)
  tx = normreg.tangent_projection(toy.GROUPS)
  out, _ = jax.jit(tx.update)(updates, tx.init(params), params)
  w, u = np.asarray(params["w1"], np.float64), np.asarray(updates["w1"], np.float64)
  expected = u - np.sum(u * w, 0) / np.sum(w * w, 0) * w
  np.testing.assert_allclose(out["w1"], expected, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.sum(np.asarray(out["w1"]) * w, 0), 0.0, atol=1e-5)
  assert abs(float(jnp.vdot(out["w2"], params["w2"]))) < 1e-4
  chex.assert_trees_all_equal(out["bn"], updates["bn"])


def test_project_to_sphere_radius_and_init():
  params = toy.init(KEY)
  updates = jax.tree.map(lambda x: 0.1 * jax.random.normal(KEY, x.shape), params)
  for radius in (0.5, 3.0):
    tx = normreg.project_to_sphere(toy.GROUPS, radius=radius)
    new = optax.apply_updates(params, tx.update(updates, tx.init(params), params)[0])
    np.testing.assert_allclose(normreg.unit_norms(new, toy.GROUPS)["w1"], radius, rtol=1e-5)
    chex.assert_trees_all_close(new["head"], optax.apply_updates(params, updates)["head"])
  tx = normreg.project_to_sphere(toy.GROUPS, radius="init")
  state = tx.init(params)
  new = optax.apply_updates(params, tx.update(updates, state, params)[0])
  chex.assert_trees_all_close(normreg.unit_norms(new, toy.GROUPS),
                              normreg.unit_norms(params, toy.GROUPS), rtol=1e-5)


# ---------------------------------------------------------------------- metrics


def test_metrics_against_numpy():
  before = toy.init(KEY)
  after = toy.init(jax.random.key(1))
  norms = jax.jit(lambda p: normreg.unit_norms(p, toy.GROUPS))(before)
  np.testing.assert_allclose(norms["w1"], _np_unit_norm(before["w1"], normreg.UNIT)[0],
                             rtol=1e-6)
  chex.assert_shape(norms["w1"], (toy.HIDDEN,))
  chex.assert_shape(norms["w2"], ())
  elr = normreg.effective_learning_rate(0.1, before, toy.GROUPS, power=2)
  np.testing.assert_allclose(elr["w1"], 0.1 / np.asarray(norms["w1"]) ** 2, rtol=1e-6)
  angles = jax.jit(lambda a, b: normreg.angular_update(a, b, toy.GROUPS))(before, after)
  a, b = np.asarray(before["w1"], np.float64), np.asarray(after["w1"], np.float64)
  cos = np.sum(a * b, 0) / np.linalg.norm(a, axis=0) / np.linalg.norm(b, axis=0)
  np.testing.assert_allclose(angles["w1"], np.arccos(cos), rtol=1e-5)
  assert angles["head"]["kernel"] is None


def test_angular_update_is_accurate_for_tiny_angles():
  w = jnp.array([[1.0], [0.0]])
  theta = 1e-6
  v = jnp.array([[np.cos(theta)], [np.sin(theta)]], jnp.float32)
  got = normreg.angular_update({"w": w}, {"w": v}, {"w": normreg.UNIT})["w"]
  np.testing.assert_allclose(got, [theta], rtol=1e-3)


# ----------------------------------------------------- jit, vmap, masks, dtypes


ALL_TRANSFORMS = {
    "add_l2_penalty": lambda g: normreg.add_l2_penalty(1e-3, g),
    "scale_by_weight_norm": lambda g: normreg.scale_by_weight_norm(g),
    "project_to_sphere": lambda g: normreg.project_to_sphere(g),
    "project_to_sphere_init": lambda g: normreg.project_to_sphere(g, radius="init"),
    "tangent_projection": lambda g: normreg.tangent_projection(g),
    "sgd_l2": lambda g: normreg.sgd_l2(0.1, 1e-3, g, momentum=0.9),
    "spherical_sgd": lambda g: normreg.spherical_sgd(0.1, g, momentum=0.9),
    "spherical_adam": lambda g: normreg.spherical_adam(0.01, g),
}


OPTIMIZERS = ("sgd_l2", "spherical_sgd", "spherical_adam")


def _grads(params):
  return jax.grad(toy.loss)(params, *toy.batch(KEY))


@pytest.mark.parametrize("name", sorted(ALL_TRANSFORMS))
def test_jit_matches_eager_and_traces_once(name):
  params = toy.init(KEY)
  tx = ALL_TRANSFORMS[name](toy.GROUPS)
  state = tx.init(params)
  eager, _ = tx.update(_grads(params), state, params)
  chex.clear_trace_counter()
  update = chex.assert_max_traces(tx.update, n=1)
  jitted = jax.jit(update)
  out, state2 = jitted(_grads(params), state, params)
  jitted(_grads(params), state2, params)  # second call: no retrace
  chex.assert_trees_all_close(out, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(ALL_TRANSFORMS))
def test_vmap_over_independent_copies(name):
  keys = jax.random.split(KEY, 3)
  params = jax.vmap(toy.init)(keys)
  grads = jax.vmap(_grads)(params)
  tx = ALL_TRANSFORMS[name](toy.GROUPS)
  out, _ = jax.vmap(lambda g, p: tx.update(g, tx.init(p), p))(grads, params)
  for i in range(3):
    p_i = jax.tree.map(lambda x: x[i], params)
    g_i = jax.tree.map(lambda x: x[i], grads)
    expected, _ = tx.update(g_i, tx.init(p_i), p_i)
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[i], out), expected,
                                rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(ALL_TRANSFORMS))
def test_callable_groups_equal_pytree_groups(name):
  params = toy.init(KEY)
  a = ALL_TRANSFORMS[name](toy.GROUPS)
  b = ALL_TRANSFORMS[name](lambda p: toy.GROUPS)
  out_a, _ = a.update(_grads(params), a.init(params), params)
  out_b, _ = b.update(_grads(params), b.init(params), params)
  chex.assert_trees_all_equal(out_a, out_b)


ANGULAR = {
    "nero": lambda g: normreg.nero(0.01, g),
    "adamp": lambda g: normreg.adamp(0.01, g, weight_decay=1e-2),
    "sgdp": lambda g: normreg.sgdp(0.1, g, momentum=0.9, weight_decay=1e-3),
    "adamh": lambda g: normreg.adamh(0.01, g),
    "rotational": lambda g: normreg.rotational(optax.scale_by_adam(), g, 0.01),
}


@pytest.mark.parametrize("name", ["add_l2_penalty", "scale_by_weight_norm", "project_to_sphere",
                                  "tangent_projection", *ANGULAR])
def test_inside_optax_masked_with_masked_nodes(name):
  params = toy.init(KEY)
  mask = {"w1": True, "bn": {"scale": False, "bias": False}, "w2": False,
          "head": {"kernel": True, "bias": False}}
  make = ALL_TRANSFORMS.get(name) or ANGULAR[name]
  tx = optax.masked(make(toy.GROUPS), mask)
  grads = _grads(params)
  out, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  full = make(toy.GROUPS)
  expected, _ = full.update(grads, full.init(params), params)
  # (jit against eager: the angular optimizers' normalizations round differently)
  chex.assert_trees_all_close(out["w1"], expected["w1"], rtol=1e-4, atol=1e-7)
  chex.assert_trees_all_equal(out["w2"], grads["w2"])  # masked out: untouched


@pytest.mark.parametrize("name", ["add_l2_penalty", "scale_by_weight_norm", "project_to_sphere",
                                  "tangent_projection"])
def test_none_leaves_pass_through(name):
  params = toy.init(KEY)
  grads = _grads(params)
  grads["w2"] = None
  grads["head"]["bias"] = None
  tx = ALL_TRANSFORMS[name](toy.GROUPS)
  out, _ = tx.update(grads, tx.init(params), params)
  assert out["w2"] is None and out["head"]["bias"] is None
  assert out["w1"].shape == params["w1"].shape


@pytest.mark.parametrize("name", sorted(ALL_TRANSFORMS))
def test_bf16_params_stay_bf16(name):
  params = toy.init(KEY, dtype=jnp.bfloat16)
  tx = ALL_TRANSFORMS[name](toy.GROUPS)
  state = tx.init(params)
  grads = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _grads(params))
  # Our own transforms never promote silently; optax's (adam, schedules) may.
  promotion = "standard" if name in OPTIMIZERS else "strict"
  with jax.numpy_dtype_promotion(promotion):
    updates, _ = jax.jit(tx.update)(grads, state, params)
  new = optax.apply_updates(params, updates)
  for leaf in jax.tree.leaves(new):
    assert leaf.dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(leaf, np.float32)))


def test_inject_hyperparams_schedules_lam_and_learning_rate():
  params = toy.init(KEY)
  lam = optax.linear_schedule(1e-2, 0.0, 4)
  tx = optax.inject_hyperparams(normreg.add_l2_penalty)(lam=lam, groups=toy.GROUPS)
  state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  step = jax.jit(tx.update)
  for expected_lam in (1e-2, 7.5e-3, 5e-3):
    out, state = step(zeros, state, params)
    np.testing.assert_allclose(out["w1"], 2 * expected_lam * params["w1"], rtol=1e-5)
  sph = optax.inject_hyperparams(normreg.spherical_sgd)(
      learning_rate=optax.cosine_decay_schedule(0.1, 10), groups=toy.GROUPS)
  s = sph.init(params)
  for _ in range(3):
    _, s = jax.jit(sph.update)(_grads(params), s, params)
  np.testing.assert_allclose(s.hyperparams["learning_rate"],
                             optax.cosine_decay_schedule(0.1, 10)(2), rtol=1e-6)
  proj = optax.inject_hyperparams(normreg.project_to_sphere)(groups=toy.GROUPS, radius=2.0)
  new = optax.apply_updates(params, proj.update(zeros, proj.init(params), params)[0])
  np.testing.assert_allclose(normreg.unit_norms(new, toy.GROUPS)["w1"], 2.0, rtol=1e-5)


# -------------------------------------------------------------------------- errors


def test_negative_lam_is_an_error():
  with pytest.raises(ValueError, match="lam must be >= 0"):
    normreg.add_l2_penalty(-1e-4, toy.GROUPS)
  with pytest.raises(ValueError, match="lam"):
    normreg.sgd_l2(0.1, -1.0, toy.GROUPS)


def test_corrected_decay_after_a_warmup_needs_the_peak():
  warmup = optax.linear_schedule(0.0, 0.1, 10)
  with pytest.raises(ValueError, match="warmup"):
    normreg.add_corrected_decayed_weights(1e-2, warmup, toy.GROUPS)
  with pytest.raises(ValueError, match="peak_learning_rate must be > 0"):
    normreg.add_corrected_decayed_weights(1e-2, warmup, toy.GROUPS, peak_learning_rate=0.0)
  normreg.add_corrected_decayed_weights(1e-2, warmup, toy.GROUPS, peak_learning_rate=0.1)
  with pytest.raises(ValueError, match="eta_max must be a scalar"):
    normreg.add_corrected_decayed_weights(1e-2, warmup, toy.GROUPS,
                                          peak_learning_rate=jnp.ones(2))
  # A traced peak (the launcher's step takes its rates as arguments) is checked only where
  # it is concrete, and its decay is the constant's.
  params = {"w": jnp.ones((3, 2))}
  groups = {"w": normreg.UNIT}
  g = {"w": jnp.full((3, 2), 0.5)}
  traced = jax.jit(lambda peak: normreg.add_corrected_decayed_weights(
      0.1, 0.05, groups, peak_learning_rate=peak).update(g, optax.ScaleByScheduleState(
          count=jnp.zeros([], jnp.int32)), params)[0])(jnp.float32(0.2))
  np.testing.assert_allclose(traced["w"], 0.5 + 0.1 * 0.05 / 0.2, rtol=1e-6)


@pytest.mark.parametrize("radius", [0.0, -1.0, "unit"])
def test_bad_radius_is_an_error(radius):
  with pytest.raises(ValueError, match="radius"):
    normreg.project_to_sphere(toy.GROUPS, radius=radius)


@pytest.mark.parametrize("make", [
    lambda lr: normreg.sgd_l2(lr, 1e-4, toy.GROUPS),
    lambda lr: normreg.spherical_sgd(lr, toy.GROUPS),
    lambda lr: normreg.spherical_adam(lr, toy.GROUPS)])
def test_non_positive_learning_rate_is_an_error(make):
  with pytest.raises(ValueError, match="learning_rate must be > 0"):
    make(0.0)


@pytest.mark.parametrize("name", sorted(ALL_TRANSFORMS))
def test_groups_of_wrong_structure_is_an_error(name):
  params = toy.init(KEY)
  bad = {"w1": normreg.UNIT, "w2": normreg.TENSOR}
  tx = ALL_TRANSFORMS[name](bad)
  with pytest.raises(ValueError, match="does not match the params"):
    tx.update(_grads(params), tx.init(params), params)


def test_missing_params_is_an_error():
  tx = normreg.scale_by_weight_norm(toy.GROUPS)
  params = toy.init(KEY)
  with pytest.raises(ValueError, match="params"):
    tx.update(_grads(params), tx.init(params))


INJECTABLE = {
    "add_l2_penalty": dict(lam=1e-3),
    "scale_by_weight_norm": dict(power=2.0),
    "project_to_sphere": dict(radius=1.5),
    "tangent_projection": dict(),
    "sgd_l2": dict(learning_rate=0.1, lam=1e-3, momentum=0.9),
    "spherical_sgd": dict(learning_rate=0.1, momentum=0.9),
    "spherical_adam": dict(learning_rate=0.01),
}


@pytest.mark.parametrize("name", sorted(INJECTABLE))
def test_inject_hyperparams_equals_plain_transform(name):
  params = toy.init(KEY)
  factory = getattr(normreg, name)
  plain = factory(groups=toy.GROUPS, **INJECTABLE[name])
  injected = optax.inject_hyperparams(factory)(groups=toy.GROUPS, **INJECTABLE[name])
  s_plain, s_inj = plain.init(params), injected.init(params)
  for _ in range(2):
    u_plain, s_plain = plain.update(_grads(params), s_plain, params)
    u_inj, s_inj = jax.jit(injected.update)(_grads(params), s_inj, params)
    chex.assert_trees_all_close(u_inj, u_plain, rtol=1e-5, atol=1e-7)
    params = optax.apply_updates(params, u_plain)


# Every public function that takes groups names itself when the groups do not fit the
# params (the first thing a user reads), at init or at the first update.
_NAMED = {
    "add_l2_penalty": lambda g: normreg.add_l2_penalty(0.1, g),
    "add_decayed_weights": lambda g: normreg.add_decayed_weights(0.1, g),
    "scale_by_weight_norm": lambda g: normreg.scale_by_weight_norm(g),
    "project_to_sphere": lambda g: normreg.project_to_sphere(g),
    "tangent_projection": lambda g: normreg.tangent_projection(g),
    "sgd_l2": lambda g: normreg.sgd_l2(0.1, 0.01, g),
    "spherical_sgd": lambda g: normreg.spherical_sgd(0.1, g),
    "spherical_adam": lambda g: normreg.spherical_adam(0.1, g),
    "rotational": lambda g: normreg.rotational(optax.sgd(0.1), g, 0.01),
    "adamp": lambda g: normreg.adamp(0.1, g),
    "sgdp": lambda g: normreg.sgdp(0.1, g),
    "nero": lambda g: normreg.nero(0.1, g),
    "adamh": lambda g: normreg.adamh(0.1, g),
    "add_corrected_decayed_weights": lambda g: normreg.add_corrected_decayed_weights(0.1, 0.1, g),
}
_NAMED_FUNCTIONS = {
    "unit_norms": lambda p, g: normreg.unit_norms(p, g),
    "effective_learning_rate": lambda p, g: normreg.effective_learning_rate(0.1, p, g),
    "angular_update": lambda p, g: normreg.angular_update(p, p, g),
    "rescale_groups": lambda p, g: normreg.rescale_groups(p, g, 2.0),
}


@pytest.mark.parametrize("name", list(_NAMED) + list(_NAMED_FUNCTIONS))
def test_groups_that_do_not_fit_name_the_function(name):
  params = {"w": jnp.ones((3, 2)), "b": jnp.zeros((2,))}
  wrong = {"w": normreg.UNIT, "other": None}
  with pytest.raises(ValueError, match=rf"^{name}: "):
    if name in _NAMED_FUNCTIONS:
      _NAMED_FUNCTIONS[name](params, wrong)
    else:
      tx = _NAMED[name](wrong)
      state = tx.init(params)
      tx.update(jax.tree.map(jnp.ones_like, params), state, params)


def test_spherical_adam_keeps_its_first_moment_in_mu_dtype():
  params = {"w": jnp.ones((3, 2)), "b": jnp.zeros((2,))}
  groups = {"w": normreg.UNIT, "b": None}
  tx = normreg.spherical_adam(0.1, groups, mu_dtype=jnp.bfloat16)
  state = tx.init(params)
  _, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  adam = [s for s in state if isinstance(s, optax.ScaleByAdamState)]
  assert len(adam) == 1
  assert {x.dtype for x in jax.tree.leaves(adam[0].mu)} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(adam[0].nu)} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("name", ["sgd_l2", "spherical_sgd", "spherical_adam"])
def test_a_non_positive_learning_rate_names_the_optimizer(name):
  make = {"sgd_l2": lambda lr: normreg.sgd_l2(lr, 0.01, {"w": normreg.UNIT}),
          "spherical_sgd": lambda lr: normreg.spherical_sgd(lr, {"w": normreg.UNIT}),
          "spherical_adam": lambda lr: normreg.spherical_adam(lr, {"w": normreg.UNIT})}[name]
  with pytest.raises(ValueError, match=rf"^{name}: learning_rate must be > 0"):
    make(-0.1)


@pytest.mark.parametrize("make, message", [
    (lambda: normreg.add_l2_penalty(-0.1, {"w": normreg.UNIT}),
     r"^add_l2_penalty: lam must be >= 0, got -0.1"),
    (lambda: normreg.project_to_sphere({"w": normreg.UNIT}, radius=0.0),
     r"^project_to_sphere: radius must be > 0, got 0.0"),
])
def test_bad_hyperparameters_name_the_function_and_the_argument(make, message):
  with pytest.raises(ValueError, match=message):
    make()


@pytest.mark.parametrize("how", ["float32 array", "inject_hyperparams"])
def test_an_array_lam_keeps_bf16_updates_bf16(how):
  """``lam`` as a float32 array (a schedule's value, a sweep's hyperparameter) does not
  promote the updates of bf16 params; the penalty keeps its value."""
  groups = {"w": normreg.UNIT}
  tx = (normreg.add_l2_penalty(jnp.float32(0.25), groups) if how == "float32 array" else
        optax.inject_hyperparams(normreg.add_l2_penalty)(lam=0.25, groups=groups))
  params = {"w": jnp.full((3, 2), 2.0, jnp.bfloat16)}
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  assert updates["w"].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(updates["w"], np.float32), 1.0 + 2 * 0.25 * 2.0)


def test_metrics_leave_masked_leaves_as_none():
  """Under optax.masked the params hold MaskedNode leaves: the metrics give None there."""
  params = {"w": jnp.ones((3, 2)), "m": optax.MaskedNode()}
  groups = {"w": normreg.UNIT, "m": None}
  for out in (normreg.unit_norms(params, groups),
              normreg.effective_learning_rate(0.1, params, groups),
              normreg.angular_update(params, params, groups)):
    assert out["m"] is None
    assert out["w"].shape == (2,)


@pytest.mark.parametrize("make, message", [
    (lambda: normreg.scale_by_learning_rates(-0.1, {"w": normreg.UNIT}),
     r"^scale_by_learning_rates: learning_rate must be > 0"),
    (lambda: normreg.sgd_l2(0.1, 0.01, {"w": normreg.UNIT}, ungrouped_learning_rate=-0.1),
     r"^sgd_l2: ungrouped_learning_rate must be > 0"),
])
def test_bad_learning_rates_name_the_function(make, message):
  with pytest.raises(ValueError, match=message):
    make()


def test_project_to_sphere_needs_params_and_keeps_bf16_updates_bf16():
  tx = normreg.project_to_sphere({"w": normreg.UNIT})
  params = {"w": jnp.full((3, 2), 2.0, jnp.bfloat16)}
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"^project_to_sphere needs the current params"):
    tx.update(params, state)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
  assert updates["w"].dtype == jnp.bfloat16
  # From 2 * ones to the unit sphere: w + u = 1/sqrt(3) per entry.
  np.testing.assert_allclose(np.asarray(params["w"] + updates["w"], np.float32),
                             1 / np.sqrt(3), rtol=1e-2)

"""Every transform and optimizer against an independent reference, over several steps.

The references are plain numpy loops written from the docstrings' equations
(float64): they share no code with normreg. The gradients are those of a fixed
quadratic, ``g(w) = A w + b`` per leaf (so they depend on where the params
are), computed in numpy for the reference and in jax for normreg. Each test
checks the *values* of the params after every step, not only their norms.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import normreg

STEPS = 6




SHAPES = {"unit": (4, 3), "tensor": (3, 5), "stacked": (2, 3, 4), "free": (3,)}
GROUPS = {"unit": normreg.UNIT, "tensor": normreg.TENSOR, "stacked": normreg.unit(stack=1),
          "free": None}


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  params = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
  mats = {k: rng.standard_normal((int(np.prod(s)),) * 2) / 3 for k, s in SHAPES.items()}
  shifts = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
  return params, mats, shifts


def _np_grad(params, mats, shifts):
  return {k: (mats[k] @ w.ravel()).reshape(w.shape) + shifts[k] for k, w in params.items()}


def _jax_grad(mats, shifts):
  mats = {k: jnp.asarray(v, jnp.float32) for k, v in mats.items()}
  shifts = {k: jnp.asarray(v, jnp.float32) for k, v in shifts.items()}
  return lambda p: {k: (mats[k] @ w.ravel()).reshape(w.shape) + shifts[k] for k, w in p.items()}


def _np_axes(name, ndim):
  """Reduced axes, written out per leaf: UNIT over all but the last, TENSOR over all,
  the stacked UNIT over all but the first and the last."""
  return {"unit": (0,), "tensor": (0, 1), "stacked": (1,)}[name]


def _np_norm(name, w):
  return np.sqrt(np.sum(w * w, axis=_np_axes(name, w.ndim), keepdims=True))


def _np_dot(name, a, b):
  return np.sum(a * b, axis=_np_axes(name, a.ndim), keepdims=True)


def _run_normreg(tx, steps=STEPS, seed=0):
  params, mats, shifts = _problem(seed)
  grad = _jax_grad(mats, shifts)
  p = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
  state = tx.init(p)

  @jax.jit
  def step(p, state):
    updates, state = tx.update(grad(p), state, p)
    return optax.apply_updates(p, updates), state

  out = []
  for _ in range(steps):
    p, state = step(p, state)
    out.append({k: np.asarray(v, np.float64) for k, v in p.items()})
  return out


def _run_reference(update, steps=STEPS, seed=0):
  """``update(t, params, grads, state) -> (params, state)`` in numpy, from the problem's start."""
  params, mats, shifts = _problem(seed)
  state = {}
  out = []
  for t in range(steps):
    params, state = update(t, params, _np_grad(params, mats, shifts), state)
    out.append({k: v.copy() for k, v in params.items()})
  return out


def _assert_same(ours, ref, rtol=2e-5, atol=2e-6):
  for t, (a, b) in enumerate(zip(ours, ref)):
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=f"step {t + 1}, {k}")


def _grouped(name):
  return GROUPS[name] is not None


# ------------------------------------------------------------------ the transforms


@pytest.mark.parametrize("radius", [1.0, 2.5, "init"])
def test_project_to_sphere_direction_and_magnitude(radius):
  lr = 0.3

  def ref(t, p, g, state):
    if t == 0:
      state["r"] = {k: _np_norm(k, w) for k, w in p.items() if _grouped(k)}
    out = {}
    for k, w in p.items():
      u = -lr * g[k]
      if not _grouped(k):
        out[k] = w + u
        continue
      r = state["r"][k] if radius == "init" else radius
      stepped = r * w / _np_norm(k, w) + u  # from the point on the sphere, along -lr g
      out[k] = r * stepped / _np_norm(k, stepped)
    return out, state

  ours = _run_normreg(optax.chain(optax.sgd(lr), normreg.project_to_sphere(GROUPS, radius)))
  _assert_same(ours, _run_reference(ref))


def test_tangent_projection_values():
  lr = 0.1

  def ref(t, p, g, state):
    out = {}
    for k, w in p.items():
      u = -lr * g[k]
      if _grouped(k):
        u = u - _np_dot(k, u, w) / _np_dot(k, w, w) * w
      out[k] = w + u
    return out, state

  ours = _run_normreg(optax.chain(optax.sgd(lr), normreg.tangent_projection(GROUPS)))
  _assert_same(ours, _run_reference(ref))


@pytest.mark.parametrize("power", [1, 2])
def test_scale_by_weight_norm_both_powers(power):
  lr = 0.05 if power == 1 else 0.005  # the quadratic is not scale-invariant: keep it stable

  def ref(t, p, g, state):
    return {k: w - lr * g[k] * (_np_norm(k, w) ** power if _grouped(k) else 1.0)
            for k, w in p.items()}, state

  ours = _run_normreg(optax.chain(normreg.scale_by_weight_norm(GROUPS, power=power),
                                  optax.sgd(lr)))
  _assert_same(ours, _run_reference(ref))


@pytest.mark.parametrize("momentum, nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_sgd_l2(momentum, nesterov):
  lr, lam = 0.05, 0.03

  def ref(t, p, g, state):
    out = {}
    for k, w in p.items():
      d = g[k] + (2 * lam * w if _grouped(k) else 0.0)  # gradient of lam*||w||^2
      m = momentum * state.get(k, 0.0) + d
      state[k] = m
      out[k] = w - lr * ((d + momentum * m) if nesterov else m)
    return out, state

  ours = _run_normreg(normreg.sgd_l2(lr, lam, GROUPS, momentum=momentum, nesterov=nesterov))
  _assert_same(ours, _run_reference(ref))


@pytest.mark.parametrize("momentum, nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_spherical_sgd(momentum, nesterov):
  lr, lr_free = 0.2, 0.05

  def ref(t, p, g, state):
    out = {}
    for k, w in p.items():
      # The gradient at w/||w||: ||w|| grad L(w), for the scale-invariant loss.
      d = g[k] * _np_norm(k, w) if _grouped(k) else g[k]
      m = momentum * state.get(k, 0.0) + d
      state[k] = m
      u = -(lr if _grouped(k) else lr_free) * ((d + momentum * m) if nesterov else m)
      if _grouped(k):
        stepped = w / _np_norm(k, w) + u
        out[k] = stepped / _np_norm(k, stepped)
      else:
        out[k] = w + u
    return out, state

  ours = _run_normreg(normreg.spherical_sgd(lr, GROUPS, momentum=momentum, nesterov=nesterov,
                                            ungrouped_learning_rate=lr_free))
  _assert_same(ours, _run_reference(ref))


def test_spherical_adam():
  # None of b1, b2, eps, eps_root at optax's default: each must reach the moments.
  lr, b1, b2, eps, eps_root = 0.05, 0.8, 0.99, 1e-3, 1e-4

  def ref(t, p, g, state):
    out = {}
    for k, w in p.items():
      d = g[k] * _np_norm(k, w) if _grouped(k) else g[k]
      m = b1 * state.get(("m", k), 0.0) + (1 - b1) * d
      v = b2 * state.get(("v", k), 0.0) + (1 - b2) * d * d
      state[("m", k)], state[("v", k)] = m, v
      m_hat, v_hat = m / (1 - b1 ** (t + 1)), v / (1 - b2 ** (t + 1))
      u = -lr * m_hat / (np.sqrt(v_hat + eps_root) + eps)
      if _grouped(k):
        stepped = w / _np_norm(k, w) + u
        out[k] = stepped / _np_norm(k, stepped)
      else:
        out[k] = w + u
    return out, state

  ours = _run_normreg(normreg.spherical_adam(lr, GROUPS, b1=b1, b2=b2, eps=eps,
                                             eps_root=eps_root))
  _assert_same(ours, _run_reference(ref), rtol=5e-5, atol=5e-6)


def test_add_l2_penalty_then_adam():
  # The penalty's gradient goes through Adam's moments (coupled), unlike AdamW.
  lr, lam, b1, b2, eps = 0.05, 0.1, 0.9, 0.999, 1e-8

  def ref(t, p, g, state):
    out = {}
    for k, w in p.items():
      d = g[k] + (2 * lam * w if _grouped(k) else 0.0)
      m = b1 * state.get(("m", k), 0.0) + (1 - b1) * d
      v = b2 * state.get(("v", k), 0.0) + (1 - b2) * d * d
      state[("m", k)], state[("v", k)] = m, v
      out[k] = w - lr * (m / (1 - b1 ** (t + 1))) / (np.sqrt(v / (1 - b2 ** (t + 1))) + eps)
    return out, state

  ours = _run_normreg(optax.chain(normreg.add_l2_penalty(lam, GROUPS),
                                  optax.adam(lr, b1=b1, b2=b2, eps=eps)))
  _assert_same(ours, _run_reference(ref), rtol=5e-5, atol=5e-6)


def test_scale_by_learning_rates():
  lr, lr_free = 0.1, 0.02
  ours = _run_normreg(normreg.scale_by_learning_rates(lr, GROUPS, lr_free))
  ref = _run_reference(lambda t, p, g, s: ({k: w - (lr if _grouped(k) else lr_free) * g[k]
                                            for k, w in p.items()}, s))
  _assert_same(ours, ref)


# ---------------------------------------------------------------------- the metrics


@pytest.mark.parametrize("power", [1, 2])
def test_metrics_against_numpy(power):
  params, mats, shifts = _problem()
  after = {k: w - 0.2 * g for (k, w), g in zip(params.items(),
                                                _np_grad(params, mats, shifts).values())}
  jp = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
  ja = {k: jnp.asarray(v, jnp.float32) for k, v in after.items()}
  norms = normreg.unit_norms(jp, GROUPS)
  elr = normreg.effective_learning_rate(0.3, jp, GROUPS, power=power)
  angles = normreg.angular_update(jp, ja, GROUPS)
  for k, w in params.items():
    if not _grouped(k):
      assert norms[k] is None and elr[k] is None and angles[k] is None
      continue
    n = np.squeeze(_np_norm(k, w), axis=_np_axes(k, w.ndim))
    np.testing.assert_allclose(norms[k], n, rtol=1e-6)
    np.testing.assert_allclose(elr[k], 0.3 / n ** power, rtol=1e-5)
    if power == 2:  # the default: SGD's eta / ||w||^2
      default = normreg.effective_learning_rate(0.3, jp, GROUPS)[k]
      np.testing.assert_allclose(default, 0.3 / n ** 2, rtol=1e-5)
    cos = np.squeeze(_np_dot(k, w, after[k]) / _np_norm(k, w) / _np_norm(k, after[k]),
                     axis=_np_axes(k, w.ndim))
    np.testing.assert_allclose(angles[k], np.arccos(cos), rtol=1e-4)


# --------------------------------------------------------------------------- bf16


def _bf16_case(seed=0):
  # 4096 values per unit: a sum of squares rounded to bf16 is off by ~4e-3.
  rng = np.random.default_rng(seed)
  w = jnp.asarray(rng.standard_normal((4096, 4)), jnp.bfloat16)
  u = jnp.asarray(rng.standard_normal((4096, 4)), jnp.bfloat16)
  return w, u


def test_bf16_norms_are_accumulated_in_float32():
  w, _ = _bf16_case()
  ref = np.sqrt(np.sum(np.asarray(w, np.float64) ** 2, axis=0))
  got = normreg.unit_norms({"w": w}, {"w": normreg.UNIT})["w"]
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=1e-6)
  # And the transforms that use them: w * ||w||^2 in bf16 out, but from the float32 norm.
  tx = normreg.scale_by_weight_norm({"w": normreg.UNIT}, power=2)
  out, _ = tx.update({"w": jnp.ones_like(w)}, tx.init({"w": w}), {"w": w})
  assert out["w"].dtype == jnp.bfloat16
  expect = np.asarray(jnp.asarray(ref ** 2, jnp.float32).astype(jnp.bfloat16), np.float64)
  np.testing.assert_array_equal(np.asarray(out["w"][0], np.float64), expect)


def test_bf16_dots_are_accumulated_in_float32():
  w, u = _bf16_case(1)
  w64, u64 = np.asarray(w, np.float64), np.asarray(u, np.float64)
  coef = np.sum(u64 * w64, axis=0) / np.sum(w64 * w64, axis=0)
  expect = np.asarray(jnp.asarray(u64 - coef * w64, jnp.float32).astype(jnp.bfloat16),
                      np.float64)
  tx = normreg.tangent_projection({"w": normreg.UNIT})
  out, _ = jax.jit(tx.update)({"w": u}, tx.init({"w": w}), {"w": w})
  got = np.asarray(out["w"], np.float64)
  # Rounding to bf16 at the end may differ by one bf16 ulp where the float32 result sits
  # on a rounding boundary; a bf16-accumulated dot is off in most elements.
  ulp = np.abs(expect) * 2.0 ** -7
  assert np.mean(np.abs(got - expect) <= ulp) > 0.99


# ------------------------------------------------------------- the loss goes down


def _toy_loss_run(tx, steps=40):
  import toy  # pylint: disable=g-import-not-at-top
  params = toy.init(jax.random.key(0))
  x, y = toy.batch(jax.random.key(1), n=64)
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(toy.loss)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for _ in range(steps):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  return losses[0], float(toy.loss(params, x, y))


def _toy_groups():
  import toy  # pylint: disable=g-import-not-at-top
  return toy.GROUPS


OPTIMIZERS = {
    "sgd_l2": lambda g: normreg.sgd_l2(0.1, 1e-3, g, momentum=0.9),
    "spherical_sgd": lambda g: normreg.spherical_sgd(0.1, g, momentum=0.9),
    "spherical_sgd_nesterov": lambda g: normreg.spherical_sgd(0.1, g, momentum=0.9,
                                                              nesterov=True),
    "spherical_adam": lambda g: normreg.spherical_adam(0.01, g),
    "elr_rescale": lambda g: optax.chain(normreg.scale_by_weight_norm(g), optax.sgd(0.05, 0.9)),
    "tangent": lambda g: optax.chain(optax.sgd(0.1, 0.9), normreg.tangent_projection(g)),
    "project": lambda g: optax.chain(optax.sgd(0.1, 0.9), normreg.project_to_sphere(g)),
    "rotational": lambda g: normreg.rotational(optax.sgd(0.1, 0.9), g, 0.05),
    "adamp": lambda g: normreg.adamp(0.01, g, weight_decay=1e-2),
    "adamp_cosine": lambda g: normreg.adamp(0.01, g, weight_decay=1e-2, heuristic=True),
    "sgdp": lambda g: normreg.sgdp(0.1, g, weight_decay=1e-3),
    "nero": lambda g: normreg.nero(0.02, g),
    "adamh": lambda g: normreg.adamh(0.02, g),
    "corrected_decay": lambda g: optax.chain(
        optax.trace(0.9), normreg.add_corrected_decayed_weights(
            1e-2, optax.cosine_decay_schedule(0.1, 40), g),
        optax.scale_by_learning_rate(optax.cosine_decay_schedule(0.1, 40))),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_lowers_a_fixed_loss(name):
  # 40 full-batch steps on the toy network: the training loss must fall by a third.
  first, last = _toy_loss_run(OPTIMIZERS[name](_toy_groups()))
  assert last < 0.67 * first, (first, last)
  chex.assert_tree_all_finite(last)


# ------------------------------------------------------- the angular-update family


def _np_tangent(k, u, w):
  return u - _np_dot(k, u, w) / _np_dot(k, w, w) * w


def test_rotational_wrapper():
  lr, mu, theta, beta = 0.1, 0.9, 0.05, 0.9

  def ref(t, p, g, state):
    if t == 0:
      state["r0"] = {k: _np_norm(k, w) for k, w in p.items() if _grouped(k)}
    out = {}
    for k, w in p.items():
      m = mu * state.get(("m", k), 0.0) + g[k]  # the inner optax.sgd(lr, momentum)
      state[("m", k)] = m
      u = -lr * m
      if not _grouped(k):
        out[k] = w + u
        continue
      u_perp = _np_tangent(k, u, w)
      nu = beta * state.get(("nu", k), 0.0) + (1 - beta) * _np_dot(k, u_perp, u_perp)
      state[("nu", k)] = nu
      r0 = state["r0"][k]
      stepped = w + theta * r0 * u_perp / (np.sqrt(nu / (1 - beta ** (t + 1))) + 1e-8)
      out[k] = r0 * stepped / _np_norm(k, stepped)
    return out, state

  ours = _run_normreg(normreg.rotational(optax.sgd(lr, momentum=mu), GROUPS, theta, decay=beta))
  _assert_same(ours, _run_reference(ref))


def _np_adam(state, k, g, t, b1=0.9, b2=0.999, eps=1e-8):
  m = b1 * state.get(("m", k), 0.0) + (1 - b1) * g
  v = b2 * state.get(("v", k), 0.0) + (1 - b2) * g * g
  state[("m", k)], state[("v", k)] = m, v
  return (m / (1 - b1 ** (t + 1))) / (np.sqrt(v / (1 - b2 ** (t + 1))) + eps)


def test_adamp_on_exact_groups():
  lr, wd, ratio = 0.05, 0.2, 0.1

  def ref(t, p, g, state):
    out = {}
    for k, w in p.items():
      d = _np_adam(state, k, g[k], t)
      if _grouped(k):
        out[k] = w * (1 - lr * wd * ratio) - lr * _np_tangent(k, d, w)  # AdamP's order
      else:
        out[k] = w - lr * d
    return out, state

  ours = _run_normreg(normreg.adamp(lr, GROUPS, weight_decay=wd, wd_ratio=ratio))
  _assert_same(ours, _run_reference(ref), rtol=5e-5, atol=5e-6)


def _cosine_problem():
  """Three 2-D leaves whose gradients are orthogonal to w per unit ("unit"), only as a
  whole ("layer"), or not at all ("none"), and a 1-D "bias" (never projected, fully
  decayed): one of each of the heuristic's branches."""
  rng = np.random.default_rng(3)
  params = {k: rng.standard_normal((5, 4)) for k in ("unit", "layer", "none")}
  params["bias"] = rng.standard_normal(4)
  mats = {k: rng.standard_normal((w.size, w.size)) / 4 for k, w in params.items()}

  def grad(xp, p):
    out = {}
    for k, w in p.items():
      g = (mats[k] @ w.reshape(-1)).reshape(w.shape)
      if k == "unit":
        g = g - xp.sum(g * w, 0, keepdims=True) / xp.sum(w * w, 0, keepdims=True) * w
      elif k == "layer":
        g = g - xp.sum(g * w) / xp.sum(w * w) * w
      out[k] = g
    return out

  return params, grad


def test_adamp_cosine_heuristic():
  """The paper's rule, written out: per unit if every unit's |cos(g, w)| < delta/sqrt(fan-in),
  else per layer if |cos| < delta/sqrt(size), else no projection and full decay."""
  lr, wd, ratio, delta = 0.05, 0.2, 0.1, 0.1
  params, grad = _cosine_problem()
  seen = set()
  p, state, ref = {k: v.copy() for k, v in params.items()}, {}, []
  for t in range(STEPS):
    g = grad(np, p)
    out = {}
    for k, w in p.items():
      d = _np_adam(state, k, g[k], t)
      if w.ndim == 1:  # AdamP's code: no projection, wd_ratio 1
        out[k] = w * (1 - lr * wd) - lr * d
        continue
      axes = (0,)
      cos_u = np.abs(np.sum(g[k] * w, axes)) / np.sqrt(np.sum(g[k] ** 2, axes) *
                                                       np.sum(w ** 2, axes))
      cos_l = abs(np.sum(g[k] * w)) / np.sqrt(np.sum(g[k] ** 2) * np.sum(w ** 2))
      if cos_u.max() < delta / np.sqrt(w.shape[0]):
        n = w / np.sqrt(np.sum(w ** 2, axes, keepdims=True))
        d, f = d - n * np.sum(n * d, axes, keepdims=True), ratio
        seen.add(("unit", k))
      elif cos_l < delta / np.sqrt(w.size):
        n = w / np.sqrt(np.sum(w ** 2))
        d, f = d - n * np.sum(n * d), ratio
        seen.add(("layer", k))
      else:
        f = 1.0
        seen.add(("none", k))
      out[k] = w * (1 - lr * wd * f) - lr * d
    p = out
    ref.append(out)
  assert seen == {("unit", "unit"), ("layer", "layer"), ("none", "none")}

  tx = normreg.adamp(lr, None, weight_decay=wd, wd_ratio=ratio, heuristic=True, delta=delta)
  jp = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
  state = tx.init(jp)
  step = jax.jit(lambda p, s: tx.update(grad(jnp, p), s, p))
  ours = []
  for _ in range(STEPS):
    u, state = step(jp, state)
    jp = optax.apply_updates(jp, u)
    ours.append({k: np.asarray(v, np.float64) for k, v in jp.items()})
  _assert_same(ours, ref, rtol=5e-5, atol=5e-6)
  # The same decisions as cosine_groups, the rule on concrete arrays:
  found = normreg.cosine_groups(grad(np, params), params, delta=delta)
  assert found == {"unit": normreg.UNIT, "layer": normreg.TENSOR, "none": None, "bias": None}


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgdp(nesterov):
  lr, mu, wd, ratio = 0.05, 0.9, 0.1, 0.5

  def ref(t, p, g, state):
    out = {}
    for k, w in p.items():
      m = mu * state.get(k, 0.0) + g[k]
      d = g[k] + mu * m if nesterov else m
      if _grouped(k):
        d_perp = _np_tangent(k, d, w)
        out[k] = w * (1 - lr * wd * ratio / (1 - mu)) - lr * d_perp
        if not nesterov:  # the official code projects the buffer itself (it is d_p)
          m = d_perp
      else:
        out[k] = w - lr * d
      state[k] = m
    return out, state

  ours = _run_normreg(normreg.sgdp(lr, GROUPS, momentum=mu, nesterov=nesterov,
                                   weight_decay=wd, wd_ratio=ratio))
  _assert_same(ours, _run_reference(ref))


def test_nero():
  lr, beta = 0.05, 0.99

  def balanced(k, w):
    centered = w - np.mean(w, axis=_np_axes(k, w.ndim), keepdims=True)
    return centered / _np_norm(k, centered)

  def ref(t, p, g, state):
    if t == 0:  # the official code: mean |b|, 0.01 only for an all-zero bias
      state["sigma"] = {k: np.mean(np.abs(w)) or 0.01 for k, w in p.items()
                        if not _grouped(k)}
    out = {}
    for k, w in p.items():
      if _grouped(k):
        v = beta * state.get(k, 0.0) + (1 - beta) * _np_dot(k, g[k], g[k])
        state[k] = v
        w = balanced(k, w)  # the official constructor balances before the first step
        stepped = w - lr * _np_norm(k, w) * g[k] / np.sqrt(v / (1 - beta ** (t + 1)))
        out[k] = balanced(k, stepped)
      else:
        v = beta * state.get(k, 0.0) + (1 - beta) * g[k] ** 2
        state[k] = v
        out[k] = w - lr * state["sigma"][k] * g[k] / np.sqrt(v / (1 - beta ** (t + 1)))
    return out, state

  ours = _run_normreg(normreg.nero(lr, GROUPS, b2=beta))
  _assert_same(ours, _run_reference(ref))
  for k in ("unit", "stacked"):  # balanced: zero mean, unit norm per group
    w = ours[-1][k]
    np.testing.assert_allclose(np.mean(w, axis=_np_axes(k, w.ndim)), 0.0, atol=1e-6)
    np.testing.assert_allclose(_np_norm(k, w), 1.0, rtol=1e-6)


def test_adamh():
  # Both rates are schedules, linear from (0.05, 0.01) to a fifth of that over STEPS: step t
  # uses the rate at t (the step count before the update).
  lr = lambda t: 0.05 * (1 - 0.8 * t / STEPS)
  lr_free = lambda t: 0.01 * (1 - 0.8 * t / STEPS)

  def ref(t, p, g, state):
    if t == 0:
      state["r0"] = {k: _np_norm(k, w) for k, w in p.items() if _grouped(k)}
    out = {}
    for k, w in p.items():
      u = _np_adam(state, k, g[k], t)
      if _grouped(k):
        r0 = state["r0"][k]
        stepped = w - lr(t) * r0 * u / _np_norm(k, u)
        out[k] = r0 * stepped / _np_norm(k, stepped)
      else:
        out[k] = w - lr_free(t) * u
    return out, state

  ours = _run_normreg(normreg.adamh(optax.linear_schedule(0.05, 0.01, STEPS), GROUPS,
                                    ungrouped_learning_rate=optax.linear_schedule(
                                        0.01, 0.002, STEPS)))
  _assert_same(ours, _run_reference(ref), rtol=5e-5, atol=5e-6)


def test_corrected_decay_follows_lr_squared_over_peak():
  peak, wd, mu = 0.1, 0.05, 0.9
  schedule = optax.cosine_decay_schedule(peak, STEPS)

  def ref(t, p, g, state):
    lr = peak * 0.5 * (1 + np.cos(np.pi * t / STEPS))
    out = {}
    for k, w in p.items():
      m = mu * state.get(k, 0.0) + g[k]
      state[k] = m
      decay = wd * lr / peak * w if _grouped(k) else 0.0
      out[k] = w - lr * (m + decay)  # decay lambda lr^2 / lr_max on w
    return out, state

  reference = _run_reference(ref)
  ours = _run_normreg(optax.chain(optax.trace(mu),
                                  normreg.add_corrected_decayed_weights(wd, schedule, GROUPS),
                                  optax.scale_by_learning_rate(schedule)))
  _assert_same(ours, reference)
  # The launcher's --method=decoupled --corrected_decay builds the same chain (and not
  # plain SGDW's, whose decay would not follow lr_t / lr_max).
  from experiments import trainer  # pylint: disable=g-import-not-at-top
  from experiments.config import Config  # pylint: disable=g-import-not-at-top
  config = Config(method="decoupled", corrected_decay=True, lam=wd, lr=peak, momentum=mu)
  _assert_same(_run_normreg(trainer.make_optimizer(config.validate(), GROUPS, schedule)),
               reference)


LAUNCHER = [(m, o) for m in ("l2", "decoupled", "spherical", "elr_rescale", "tangent", "exp_lr",
                             "rotational", "adamp", "nero", "hyperball", "none")
            for o in ("sgd", "adam")
            if not (m == "exp_lr" and o == "adam") and not (m == "hyperball" and o == "sgd")]


@pytest.mark.parametrize("method, optimizer", LAUNCHER)
def test_every_launcher_method_lowers_a_fixed_loss(method, optimizer):
  """``trainer.make_optimizer``'s chain for each --method x --optimizer, on the toy."""
  from experiments import trainer  # pylint: disable=g-import-not-at-top
  from experiments.config import Config  # pylint: disable=g-import-not-at-top
  lr = {"sgd": 0.1, "adam": 0.01}[optimizer] if method not in ("nero", "hyperball") else 0.02
  lam = {"l2": 1e-3, "decoupled": 1e-2, "exp_lr": 1e-3, "rotational": 1e-3,
         "adamp": 1e-2}.get(method)
  config = Config(method=method, optimizer=optimizer, lr=lr, lam=lam, momentum=0.9).validate()
  tx = trainer.make_optimizer(config, _toy_groups(), trainer.make_schedule(config, 40))
  first, last = _toy_loss_run(tx)
  assert last < 0.67 * first, (first, last)

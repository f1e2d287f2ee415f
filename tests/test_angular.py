"""normreg.angular's helpers and options, each against numpy or hand-written values.

tests/test_references.py replays every angular optimizer's trajectory against a numpy
loop and tests/test_goldens.py against the official code; these tests pin what those
leave free: the helpers on their own (``balance``, the bias correction, the cosine
test), the arguments the trajectories keep at their defaults, and what a call
refuses and how its message reads.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import normreg
from normreg import angular
import test_transforms


def test_balance_centres_and_normalizes_every_group():
  rng = np.random.default_rng(0)
  params = {"unit": rng.standard_normal((4, 3)) + 2.0, "tensor": rng.standard_normal((2, 3)),
            "free": rng.standard_normal(3)}
  groups = {"unit": normreg.UNIT, "tensor": normreg.TENSOR, "free": None}
  out = angular.balance({k: jnp.asarray(v, jnp.float32) for k, v in params.items()}, groups)
  c = params["unit"] - params["unit"].mean(0, keepdims=True)
  np.testing.assert_allclose(out["unit"], c / np.sqrt((c * c).sum(0, keepdims=True)),
                             rtol=1e-5, atol=1e-6)
  c = params["tensor"] - params["tensor"].mean()
  np.testing.assert_allclose(out["tensor"], c / np.sqrt((c * c).sum()), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["free"], params["free"], rtol=1e-6)  # ungrouped: as it was
  bf16 = angular.balance({k: jnp.asarray(v, jnp.bfloat16) for k, v in params.items()}, groups)
  assert all(v.dtype == jnp.bfloat16 for v in bf16.values())


def test_balance_names_itself_in_its_errors():
  with pytest.raises(ValueError, match="^balance: the groups pytree does not match"):
    angular.balance({"w": jnp.ones((2, 2))}, {"v": normreg.UNIT})


# ------------------------------------------------------------------ helpers


@pytest.mark.parametrize("x64", [False, True])
def test_bias_correction_is_one_minus_decay_to_the_count(x64):
  with jax.enable_x64(x64):
    for decay in (0.9, 0.999):
      for t in (1, 2, 7):
        got = angular._bias_correction(decay, jnp.asarray(t, jnp.int32))
        assert got.dtype == (jnp.float64 if x64 else jnp.float32)
        np.testing.assert_allclose(float(got), 1 - decay ** t, rtol=1e-13 if x64 else 1e-6)
    got = angular._bias_corrected(jnp.asarray(3.0), 0.9, jnp.asarray(2, jnp.int32))
    np.testing.assert_allclose(float(got), 3.0 / 0.19, rtol=1e-13 if x64 else 1e-6)


@pytest.mark.parametrize("x64", [False, True])
def test_hyperparameters_take_the_default_float_dtype(x64):
  """A float or a schedule of the step count, in float64 when JAX runs in float64."""
  with jax.enable_x64(x64):
    want = jnp.float64 if x64 else jnp.float32
    assert angular._dtype() == want
    value = angular._value(0.1, jnp.asarray(3, jnp.int32))
    assert value.dtype == want and float(value) == float(np.asarray(0.1, want))
    value = angular._value(lambda count: 0.5 * count, jnp.asarray(3, jnp.int32))
    assert value.dtype == want and float(value) == 1.5


# ------------------------------------------------------- what a call refuses, and how


def _changing_groups():
  """Groups as a function that fits the params at init and no longer at the update (as if
  a leaf were added in between)."""
  calls = []

  def groups(params):
    calls.append(None)
    return {"w": normreg.UNIT, "b": None} if len(calls) == 1 else {"w": normreg.UNIT}

  return groups


# The angular family's factories, as test_transforms names every public transform.
UPDATE_NAMED = {name: test_transforms._NAMED[name] for name in (  # pylint: disable=protected-access
    "rotational", "adamp", "sgdp", "nero", "adamh", "add_corrected_decayed_weights")}


# Where each optimizer keeps its step counts in its state (the optimizers: UPDATE_NAMED).
_COUNTS = {
    "adamp": lambda s: [s[1], s[0].count],
    "sgdp": lambda s: [s[1]],
    "nero": lambda s: [s.count],
    "adamh": lambda s: [s.count, s.adam.count],
    "rotational": lambda s: [s.count],
}


@pytest.mark.parametrize("name", list(_COUNTS))
def test_step_counts_stay_int32(name):
  """Every step count in the state is int32 after init and after a step, as optax's own:
  a float32 count stops at 2^24 (``float32(2**24) + 1 == 2**24``) and freezes a schedule."""
  tx = UPDATE_NAMED[name]({"w": normreg.UNIT})
  params = {"w": jnp.ones((3, 2), jnp.float32)}
  state = tx.init(params)
  _, after = tx.update({"w": jnp.full((3, 2), 0.5, jnp.float32)}, state, params)
  for s, step in ((state, 0), (after, 1)):
    counts = _COUNTS[name](s)
    assert [(c.dtype, int(c)) for c in counts] == [(jnp.int32, step)] * len(counts)


@pytest.mark.parametrize("name", sorted(UPDATE_NAMED))
def test_the_update_names_the_optimizer(name):
  params = {"w": jnp.ones((3, 2)), "b": jnp.zeros((2,))}
  grads = jax.tree.map(jnp.ones_like, params)
  tx = UPDATE_NAMED[name]({"w": normreg.UNIT, "b": None})
  with pytest.raises(ValueError, match=rf"^{name} needs the current params"):
    tx.update(grads, tx.init(params))
  tx = UPDATE_NAMED[name](_changing_groups())
  state = tx.init(params)
  with pytest.raises(ValueError, match=rf"^{name}: the groups pytree does not match"):
    tx.update(grads, state, params)


@pytest.mark.parametrize("make, message", [
    (lambda: normreg.rotational(optax.sgd(0.1), {}, -0.1),
     r"^rotational: target_angle must be >= 0, got -0.1"),
    (lambda: normreg.adamp(0.0, {}), r"^adamp: learning_rate must be > 0, got 0.0"),
    (lambda: normreg.adamp(0.1, {}, weight_decay=-1.0),
     r"^adamp: weight_decay must be >= 0, got -1.0"),
    (lambda: normreg.sgdp(-0.1, {}), r"^sgdp: learning_rate must be > 0, got -0.1"),
    (lambda: normreg.sgdp(0.1, {}, momentum=-0.5), r"^sgdp: momentum must be >= 0, got -0.5"),
    (lambda: normreg.sgdp(0.1, {}, momentum=1.0), r"^sgdp: momentum must be < 1, got 1.0"),
    (lambda: normreg.sgdp(0.1, {}, weight_decay=-1.0),
     r"^sgdp: weight_decay must be >= 0, got -10.0"),  # divided by 1 - momentum first
    (lambda: normreg.nero(0.0, {}), r"^nero: learning_rate must be > 0, got 0.0"),
    (lambda: normreg.adamh(-1.0, {}), r"^adamh: learning_rate must be > 0, got -1.0"),
    (lambda: normreg.add_corrected_decayed_weights(-0.1, 0.1, {}),
     r"^add_corrected_decayed_weights: weight_decay must be >= 0, got -0.1"),
    (lambda: normreg.add_corrected_decayed_weights(0.1, 0.0, {}),
     r"^add_corrected_decayed_weights: eta_max = learning_rate\(0\) \(a warmup\? pass "
     r"peak_learning_rate\) must be > 0, got 0.0"),
    (lambda: normreg.add_corrected_decayed_weights(0.1, 0.1, {}, peak_learning_rate=-1.0),
     r"^add_corrected_decayed_weights: eta_max = peak_learning_rate must be > 0, got -1.0"),
])
def test_bad_hyperparameters_name_the_optimizer_and_the_argument(make, message):
  with pytest.raises(ValueError, match=message):
    make()


# ---------------------------------------------------------------------------- Nero


def test_nero_steps_of_the_ungrouped_leaves_and_their_scale():
  """At the first step the normalized gradient is its sign, so an ungrouped leaf moves by
  ``-lr sigma sign(g)``: sigma is mean |b| at init (1 exactly here), ``zero_scale`` for an
  all-zero leaf (0.01 by default), and an element with no gradient does not move."""
  params = {"w": angular.balance({"w": jnp.arange(12.0).reshape(4, 3) ** 1.5},
                                 {"w": normreg.UNIT})["w"],
            "b": jnp.array([1.0, -1.0, 1.0, -1.0]), "z": jnp.zeros(3)}
  grads = {"w": jnp.ones((4, 3)), "b": jnp.array([0.5, -2.0, 0.0, 3.0]),
           "z": jnp.array([-1.0, 0.0, 2.0])}
  groups = {"w": normreg.UNIT, "b": None, "z": None}
  for kwargs, zero_scale in (({}, 0.01), ({"zero_scale": 0.5}, 0.5)):
    tx = normreg.nero(0.1, groups, **kwargs)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["b"], [-0.1, 0.1, 0.0, -0.1], rtol=1e-6)
    np.testing.assert_allclose(updates["z"], np.array([0.1, 0.0, -0.1]) * zero_scale,
                               rtol=1e-6)


def test_nero_keeps_no_per_element_state_for_the_grouped_leaves():
  params = {"w": jnp.ones((4, 3)), "b": jnp.ones((3,))}
  state = normreg.nero(0.1, {"w": normreg.UNIT, "b": None}).init(params)
  assert state.grouped["w"].shape == (3,)  # one running mean per unit
  assert state.ungrouped["w"] is None and state.scale["w"] is None
  assert state.ungrouped["b"].shape == (3,) and state.scale["b"].shape == ()


def test_nero_gives_no_update_where_there_is_no_gradient():
  """A None gradient (a frozen leaf) gives a None update; the rest as with a gradient
  there. (adamh cannot: optax's Adam inside it refuses None gradients.)"""
  params = {"w": jnp.arange(1.0, 7.0).reshape(3, 2), "b": jnp.ones((2,)), "c": jnp.ones((2,))}
  groups = {"w": normreg.UNIT, "b": None, "c": None}
  tx = normreg.nero(0.1, groups)
  grads = {"w": jnp.ones((3, 2)), "b": None, "c": jnp.ones((2,))}
  full = {"w": jnp.ones((3, 2)), "b": jnp.ones((2,)), "c": jnp.ones((2,))}
  updates, _ = tx.update(grads, tx.init(params), params)
  expected, _ = tx.update(full, tx.init(params), params)
  assert updates["b"] is None
  np.testing.assert_allclose(updates["w"], expected["w"], rtol=1e-6)
  np.testing.assert_allclose(updates["c"], expected["c"], rtol=1e-6)


# ------------------------------------------------------------- AdamP, SGDP: one step
#
# At the first step Adam's direction is ``d = g / (|g| + eps)`` elementwise whatever the
# betas (``(1 + b1) g / (|g| + eps)`` with Nesterov) and SGD's is the gradient, so one
# step of AdamP/SGDP is a few lines of numpy.


def _np_cos(g, w, axes, eps):
  return np.abs(np.sum(g * w, axes)) / (np.maximum(np.sqrt(np.sum(g * g, axes)), eps) *
                                        np.maximum(np.sqrt(np.sum(w * w, axes)), eps))


def _np_project(d, w, axes, eps):
  n = w / (np.sqrt(np.sum(w * w, axes, keepdims=True)) + eps)
  return d - n * np.sum(n * d, axes, keepdims=True)


def _np_heuristic_step(d, g, w, lr, wd, ratio, delta, eps, unit_axis=-1):
  """The paper's code: 1-D leaves fully decayed; else projected per unit, per tensor or not."""
  if w.ndim <= 1:
    return -lr * (d + wd * w)
  unit = unit_axis % w.ndim
  axes = tuple(a for a in range(w.ndim) if a != unit)
  if _np_cos(g, w, axes, eps).max() < delta / np.sqrt(w.size // w.shape[unit]):
    return -lr * (_np_project(d, w, axes, eps) + ratio * wd * w)
  if _np_cos(g, w, None, eps) < delta / np.sqrt(w.size):
    return -lr * (_np_project(d, w, None, eps) + ratio * wd * w)
  return -lr * (d + wd * w)


def _cosine_case(unit_axis=-1):
  """Leaves that take each branch of the cosine test: "unit" (g orthogonal to w per unit),
  "layer" (only as a whole), "none", "tie" (|cos| = delta / sqrt(fan-in) exactly, with
  delta = 0.05 sqrt(5): not below, so not projected), "bias" (1-D, g orthogonal to it:
  never projected), "small" ("none" scaled by 0.01: norms below 1, where a wrong eps
  of 1 would decide differently), and "uneven" (three units of norm ~20 with g orthogonal,
  one of norm ~0.2 with g along it: |cos| = 1 there, so "layer"; a unit's cosine divided
  by the whole tensor's norm instead of the unit's would say "unit")."""
  rng = np.random.default_rng(7)
  w = {k: rng.standard_normal((5, 4)) for k in ("unit", "layer", "none")}
  g = {k: rng.standard_normal((5, 4)) for k in w}
  g["unit"] -= np.sum(g["unit"] * w["unit"], 0) / np.sum(w["unit"] ** 2, 0) * w["unit"]
  g["layer"] -= np.sum(g["layer"] * w["layer"]) / np.sum(w["layer"] ** 2) * w["layer"]
  w["tie"], g["tie"] = np.eye(5)[:, :1], np.array([[1.0], [19.0], [6.0], [1.0], [1.0]])
  w["bias"], g["bias"] = np.array([1.0, 2.0, 0.0]), np.array([2.0, -1.0, 3.0])
  w["small"], g["small"] = 0.01 * w["none"], 0.01 * g["none"]
  w["uneven"] = rng.standard_normal((5, 4)) * np.array([10.0, 10.0, 10.0, 0.1])
  g["uneven"] = rng.standard_normal((5, 4))
  g["uneven"] -= np.sum(g["uneven"] * w["uneven"], 0) / np.sum(w["uneven"] ** 2, 0) * w["uneven"]
  g["uneven"][:, 3] = w["uneven"][:, 3]
  if unit_axis == 0:  # output-first layout: the same leaves, transposed
    w = {k: v.T for k, v in w.items()}
    g = {k: v.T for k, v in g.items()}
  return w, g


def test_cosine_groups_takes_each_branch():
  w, g = _cosine_case()
  expected = {"unit": normreg.UNIT, "layer": normreg.TENSOR, "none": None, "tie": None,
              "bias": None, "small": None, "uneven": normreg.TENSOR}
  assert normreg.cosine_groups(g, w) == expected  # the default delta, 0.1, and eps
  assert normreg.cosine_groups(g, w, delta=0.05 * np.sqrt(5))["tie"] is None
  # output-first layouts: the unit is axis 0
  wt, gt = _cosine_case(unit_axis=0)
  assert normreg.cosine_groups(gt, wt, unit_axis=0) == dict(expected, unit=normreg.unit(axis=0))
  # a larger delta takes more: every unit of "none" is below 1.0 / sqrt(5)?
  cos = _np_cos(g["none"], w["none"], (0,), 1e-8)
  big = float(cos.max() * np.sqrt(5) * 1.01)
  assert normreg.cosine_groups(g, w, delta=big)["none"] == normreg.UNIT


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("unit_axis", [-1, 0])
def test_adamp_heuristic_first_step_against_numpy(nesterov, unit_axis):
  lr, wd = 0.1, 0.5
  w, g = _cosine_case(unit_axis)
  tx = normreg.adamp(lr, None, weight_decay=wd, nesterov=nesterov, heuristic=True,
                     unit_axis=unit_axis)  # wd_ratio 0.1, delta 0.1, eps 1e-8: the defaults
  params = {k: jnp.asarray(v, jnp.float32) for k, v in w.items()}
  updates, _ = tx.update({k: jnp.asarray(v, jnp.float32) for k, v in g.items()},
                         tx.init(params), params)
  for k in w:
    d = (1.9 if nesterov else 1.0) * g[k] / (np.abs(g[k]) + 1e-8)
    want = _np_heuristic_step(d, g[k], w[k], lr, wd, 0.1, 0.1, 1e-8, unit_axis)
    np.testing.assert_allclose(updates[k], want, rtol=1e-5, atol=1e-6, err_msg=k)


def test_the_cosine_test_is_strict():
  """``|cos| < delta / sqrt(fan-in)``, as the paper's code: at equality (the "tie" leaf,
  ``|cos| = 1/20``, delta = 0.05 sqrt(5)) nothing is projected and the decay is full."""
  w, g = _cosine_case()
  w, g = {"tie": w["tie"]}, {"tie": g["tie"]}
  delta = 0.05 * np.sqrt(5)
  assert delta / np.sqrt(5) == 0.05 and normreg.cosine_groups(g, w, delta=delta) == {"tie": None}
  tx = normreg.adamp(0.1, None, weight_decay=0.5, heuristic=True, delta=delta)
  params = {"tie": jnp.asarray(w["tie"], jnp.float32)}
  updates, _ = tx.update({"tie": jnp.asarray(g["tie"], jnp.float32)}, tx.init(params), params)
  d = g["tie"] / (np.abs(g["tie"]) + 1e-8)
  np.testing.assert_allclose(updates["tie"], -0.1 * (d + 0.5 * w["tie"]), rtol=1e-6)


def test_sgdp_heuristic_first_step_against_numpy():
  lr, wd, mu = 0.1, 0.05, 0.9
  w, g = _cosine_case()
  tx = normreg.sgdp(lr, None, weight_decay=wd, heuristic=True)
  params = {k: jnp.asarray(v, jnp.float32) for k, v in w.items()}
  updates, _ = tx.update({k: jnp.asarray(v, jnp.float32) for k, v in g.items()},
                         tx.init(params), params)
  for k in w:
    want = _np_heuristic_step(g[k], g[k], w[k], lr, wd / (1 - mu), 0.1, 0.1, 1e-8)
    np.testing.assert_allclose(updates[k], want, rtol=1e-5, atol=1e-6, err_msg=k)


EXACT = {"unit": normreg.UNIT, "tensor": normreg.TENSOR, "free": None}


def _exact_case():
  rng = np.random.default_rng(8)
  w = {"unit": 0.2 * rng.standard_normal((4, 3)), "tensor": 0.1 * rng.standard_normal((2, 3)),
       "free": rng.standard_normal(3)}
  grads = [{k: rng.standard_normal(v.shape) for k, v in w.items()} for _ in range(3)]
  return w, grads


def _np_exact_project(k, d, w, eps):
  return d if EXACT[k] is None else _np_project(d, w, (0,) if k == "unit" else None, eps)


def _run(tx, w, grads):
  params = {k: jnp.asarray(v, jnp.float32) for k, v in w.items()}
  state = tx.init(params)
  out = []
  for g in grads:
    updates, state = tx.update({k: jnp.asarray(v, jnp.float32) for k, v in g.items()}, state,
                               params)
    params = optax.apply_updates(params, updates)
    out.append({k: np.asarray(v, np.float64) for k, v in params.items()})
  return out


@pytest.mark.parametrize("eps", [None, 0.05])
def test_adamp_on_exact_groups_with_its_defaults_and_eps(eps):
  """AdamP's defaults (b1 0.9, b2 0.999, eps 1e-8, no decay; wd_ratio 0.1 once there is
  decay) over three steps, and an eps large enough to show where it enters: Adam's
  denominator and ``w_hat = w / (||w|| + eps)``."""
  w, grads = _exact_case()
  for wd in (None, 0.3):
    kwargs = {k: v for k, v in (("eps", eps), ("weight_decay", wd)) if v is not None}
    ours = _run(normreg.adamp(0.05, EXACT, **kwargs), w, grads)
    e, decay = (1e-8 if eps is None else eps), (0.0 if wd is None else wd * 0.1)
    p, m, v = dict(w), {k: 0.0 for k in w}, {k: 0.0 for k in w}
    for t, g in enumerate(grads, start=1):
      new = {}
      for k in w:
        m[k] = 0.9 * m[k] + 0.1 * g[k]
        v[k] = 0.999 * v[k] + 0.001 * g[k] ** 2
        d = m[k] / (np.sqrt(v[k] / (1 - 0.999 ** t)) + e) / (1 - 0.9 ** t)
        if EXACT[k] is None:
          new[k] = p[k] - 0.05 * d
        else:
          new[k] = p[k] - 0.05 * (_np_exact_project(k, d, p[k], e) + decay * p[k])
      p = new
      np.testing.assert_allclose(ours[t - 1]["unit"], p["unit"], rtol=1e-5, atol=1e-6)
      for k in w:
        np.testing.assert_allclose(ours[t - 1][k], p[k], rtol=1e-5, atol=1e-6,
                                   err_msg=f"{kwargs} step {t} {k}")


def test_sgdp_on_exact_groups_with_its_defaults():
  """SGDP's defaults: momentum 0.9, no Nesterov, no dampening, the buffer projected,
  eps 1e-8, wd_ratio 0.1 on a decay divided by 1 - momentum."""
  w, grads = _exact_case()
  ours = _run(normreg.sgdp(0.05, EXACT, weight_decay=0.02), w, grads)
  p, buf = dict(w), {k: 0.0 for k in w}
  for t, g in enumerate(grads):
    new = {}
    for k in w:
      b = 0.9 * buf[k] + g[k]
      d_perp = _np_exact_project(k, b, p[k], 1e-8)
      if EXACT[k] is None:
        new[k] = p[k] - 0.05 * b
      else:
        new[k] = p[k] - 0.05 * (d_perp + 0.1 * 0.02 / 0.1 * p[k])
      buf[k] = d_perp
    p = new
    for k in w:
      np.testing.assert_allclose(ours[t][k], p[k], rtol=1e-5, atol=1e-6, err_msg=f"{t} {k}")


@pytest.mark.parametrize("name", ["adamp", "sgdp"])
@pytest.mark.parametrize("heuristic", [False, True])
def test_adamp_and_sgdp_give_no_update_where_there_is_no_gradient(name, heuristic):
  w, grads = _exact_case()
  params = {k: jnp.asarray(v, jnp.float32) for k, v in w.items()}
  make = normreg.adamp if name == "adamp" else normreg.sgdp
  tx = make(0.1, None if heuristic else EXACT, weight_decay=0.1, heuristic=heuristic)
  full = {k: jnp.asarray(v, jnp.float32) for k, v in grads[0].items()}
  expected, _ = tx.update(full, tx.init(params), params)
  for hole in ("unit", "free"):
    updates, state = tx.update(dict(full, **{hole: None}), tx.init(params), params)
    assert updates[hole] is None
    for k in w:
      if k != hole:
        np.testing.assert_allclose(updates[k], expected[k], rtol=1e-6, err_msg=k)
    tx.update(dict(full, **{hole: None}), state, params)  # and again from that state


@pytest.mark.parametrize("name", ["adamp", "sgdp"])
def test_adamp_and_sgdp_check_the_groups_at_init(name):
  make = normreg.adamp if name == "adamp" else normreg.sgdp
  with pytest.raises(ValueError, match=rf"^{name}: the groups pytree does not match"):
    make(0.1, {"v": normreg.UNIT}).init({"w": jnp.ones((2, 2))})
  make(0.1, None, heuristic=True).init({"w": jnp.ones((2, 2))})  # the heuristic needs none


# ----------------------------------------------------------------------------- bf16


BF16 = {
    "rotational": lambda g: normreg.rotational(optax.scale(-0.5), g, 0.05),
    "rotational_centred": lambda g: normreg.rotational(optax.scale(-0.5), g, 0.05,
                                                       zero_mean=True),
    "nero": lambda g: normreg.nero(0.1, g),
    "adamp": lambda g: normreg.adamp(0.1, g, weight_decay=0.1),
    "adamp_cosine": lambda g: normreg.adamp(0.1, None, weight_decay=0.1, heuristic=True),
    "sgdp": lambda g: normreg.sgdp(0.1, g, weight_decay=0.1),
    "sgdp_cosine": lambda g: normreg.sgdp(0.1, None, weight_decay=0.1, heuristic=True),
    "adamh": lambda g: normreg.adamh(0.1, g),
    "corrected_decay": lambda g: normreg.add_corrected_decayed_weights(0.1, 0.05, g,
                                                                       peak_learning_rate=0.1),
}
# Whose step is taken in float32 from the (exact) inner update: its bf16 update is the
# float32 update of the same values to within the rounding of the tangent part to bf16
# (one ulp or two). Nero's and the centred rotational's are not: their balanced start is
# rounded to bf16 before the step.
ROUNDED_ONCE = ("rotational",)


@pytest.mark.parametrize("name", sorted(BF16))
def test_bf16_params_get_bf16_updates_computed_in_float32(name):
  w, grads = _exact_case()
  params = {k: jnp.asarray(v, jnp.bfloat16) for k, v in w.items()}
  g16 = {k: jnp.asarray(v, jnp.bfloat16) for k, v in grads[0].items()}
  tx = BF16[name](EXACT)
  updates, state = tx.update(g16, tx.init(params), params)
  updates, _ = tx.update(g16, state, params)  # a second step, from a bf16 state
  for k, u in updates.items():
    assert u.dtype == jnp.bfloat16, k
    assert np.all(np.isfinite(np.asarray(u, np.float32))), k
  if name in ROUNDED_ONCE:
    p32 = {k: v.astype(jnp.float32) for k, v in params.items()}
    g32 = {k: v.astype(jnp.float32) for k, v in g16.items()}
    u32, state = tx.update(g32, tx.init(p32), p32)
    u32, _ = tx.update(g32, state, p32)
    for k in updates:
      want = np.asarray(u32[k], np.float64)
      np.testing.assert_allclose(np.asarray(updates[k], np.float64), want, rtol=2 ** -6,
                                 atol=2 ** -6 * np.abs(want).max(), err_msg=k)

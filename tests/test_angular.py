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

# bf16's unit roundoff: a value rounded once to bf16 is within _U of it, relatively (its
# half ulp is 2**-9 to 2**-8 of it), so ``_U * |x|`` is half an ulp to an ulp of ``x``.
_U = 2.0 ** -8
_H2 = np.array([[1.0, 1.0], [1.0, -1.0]])
_HADAMARD = np.kron(np.kron(_H2, _H2), _H2)  # 8 x 8, orthogonal rows, 1..7 of zero mean


def _bf16_sphere_case():
  """Groups of zero mean and unit norm built from Hadamard rows (so centring, normalizing
  and ``<g, w>`` are exact in bf16 and in float32), a gradient orthogonal to them and of zero
  mean (so the tangent, centred or not, is the gradient itself) made of powers of two (so
  Adam's step is one common factor times its sign), the same at both steps. What is left
  is float32: the step, its projection to the sphere and ``new - w``, a step of 0.05 to 0.1
  of ``w``, so that rounding ``new`` (of the size of ``w``) to bf16 can be off by 10 u or
  more of the update."""
  h = _HADAMARD
  w = {"unit": np.stack([h[1] / 4 + (h[2] + h[3] + h[4] + h[5]) / 8,
                         h[6] / 4 + (h[7] + h[1] + h[2] + h[3]) / 8,
                         -h[3] / 4 + (h[5] - h[7] + h[2] - h[4]) / 8], 1),
       "tensor": np.stack([h[1] / 8 + (h[2] + h[3] + h[4] + h[5]) / 16,
                           h[2] / 8 - (h[3] + h[4] + h[5] + h[6]) / 16,
                           h[7] / 8 + (h[1] - h[2] + h[3] - h[4]) / 16,
                           -h[5] / 8 + (h[6] + h[7] + h[1] + h[2]) / 16], 0),
       "free": np.array([0.5, -1.0, 0.25])}
  g = {"unit": np.stack([2 * h[6], h[4] / 2, h[1]], 1),
       "tensor": np.stack([h[6], 4 * h[7], h[5] / 4, -h[3]], 0),
       "free": np.array([1.0, -0.5, 2.0])}
  for k, axis in (("unit", 0), ("tensor", None)):
    np.testing.assert_array_equal(np.sum(w[k], axis), 0.0)
    np.testing.assert_array_equal(np.sum(w[k] ** 2, axis), 1.0)
    np.testing.assert_array_equal(np.sum(g[k] * w[k], axis), 0.0)
    np.testing.assert_array_equal(np.sum(g[k], axis), 0.0)
  return w, [g, g]


def _bf16_sgd_case():
  """Groups ``(31 h_a + h_b) / 64``. Step 1: ``g = 32 h_a``, radial but for 3% of it: SGDP
  removes the rest, a cancellation in which a bf16 projection is off by about ``2**-8 |g|``,
  over 10 u of what is left (its momentum buffer starts at zero: the step is ``g`` exactly).
  The heuristic does not project it (``|cos| = 0.9995``) and keeps ``32 h_a`` in its buffer.
  Step 2: a small gradient orthogonal to ``w`` (per unit; in "tensor" over the whole leaf
  only), so the heuristic projects ``0.9 * 32 h_a + g``, as radial as step 1's (and exact in
  bf16: ``0.8984375 * 32 + g`` needs at most 8 bits), per unit and per tensor."""
  h = _HADAMARD
  w = {"unit": np.stack([(31 * h[a] + h[b]) / 64 for a, b in ((1, 2), (3, 4), (5, 6))], 1),
       "tensor": np.stack([(31 * h[1] + h[2]) / 64, (31 * h[3] + h[4]) / 64], 1),
       "free": np.array([0.5, -1.0, 0.25])}
  g1 = {"unit": 32 * np.stack([h[1], h[3], h[5]], 1), "tensor": 32 * np.stack([h[1], h[3]], 1),
        "free": np.array([1.0, -2.0, 4.0])}
  g2 = {"unit": np.stack([h[7], h[6], h[4]], 1) / 4,
        "tensor": np.stack([h[5] + h[1], h[6] - h[3]], 1) / 4,
        "free": np.array([1.0, -1.0, 2.0])}
  np.testing.assert_array_equal(np.sum(g2["unit"] * w["unit"], 0), 0.0)
  np.testing.assert_array_equal(np.sum(g2["tensor"] * w["tensor"]), 0.0)
  assert np.all(np.abs(np.sum(g2["tensor"] * w["tensor"], 0)) > 0.5)  # per unit: not orthogonal
  return w, [g1, g2]


def _bf16_adam_case():
  """Per group: ``g = s`` (random signs) but one element ``256 s``, ``w = s / 8`` but there,
  where ``w`` is ``-(n - 1) / 2048`` times its sign (plus +-1/32 in "tensor"), so that
  ``<g, w> = 0`` (per unit; for "tensor" over the whole leaf only) and the heuristic projects.
  Adam's step is ``c * sign(g)``, the same ``c`` for every element (each ``|g|`` is a power of
  two, and the same at both steps), so its bf16 rounding is one factor, and ``sign(g)`` is
  radial but for about 1/sqrt(n) of it: removing that is a cancellation which a bf16
  projection gets wrong by over 40 u on the elements it leaves small. (Only on those: the
  heuristic projects only a gradient nearly orthogonal to ``w``, so for ``sign(g)`` to be
  radial a few ``|g|`` must be large, and those elements of the step stay about ``+-c``.)"""
  rng = np.random.default_rng(3)

  def column(n, tilt):
    s = rng.choice([-1.0, 1.0], n)
    g, w = s.copy(), s / 8
    g[0], w[0] = 256 * s[0], -s[0] * ((n - 1) / 2048 + tilt)
    return w, g

  unit = [column(64, 0.0) for _ in range(2)]
  tensor = [column(32, tilt) for tilt in (1 / 32, -1 / 32)]
  w = {"unit": np.stack([c[0] for c in unit], 1), "tensor": np.stack([c[0] for c in tensor], 1),
       "free": np.array([0.5, -1.0, 0.25])}
  g = {"unit": np.stack([c[1] for c in unit], 1), "tensor": np.stack([c[1] for c in tensor], 1),
       "free": np.array([1.0, -2.0, 4.0])}
  np.testing.assert_array_equal(np.sum(g["unit"] * w["unit"], 0), 0.0)
  np.testing.assert_array_equal(np.sum(g["tensor"] * w["tensor"]), 0.0)
  return w, [g, g]


# Each optimizer's case, and how many bf16 roundings (of _U each, relative to the update's
# element) its update may carry; ``2**-20 max|w|`` is added for the float32 arithmetic the
# reference itself rounds (rotational's, nero's and adamh's update is ``new - w``).
# - rotational, rotational_centred, nero: 1. Everything the bf16 path rounds before the end
#   (rotational's tangent, the centred and the balanced start) is exact on its case, and the
#   rest is float32: the update is the float32 one rounded once.
# - adamh: 2. Its steps on the sphere are float32, rounded once; its ungrouped leaf takes
#   optax's Adam step, computed in the params' dtype (optax's convention), then ``-lr``.
# - sgdp, sgdp_cosine: 3. The projection is float32, then rounded, and the rest is bf16 by
#   design (optax's convention): ``decay * w``, its sum with the step, and at step 2 the
#   momentum buffer ``0.9 * b + g`` (0.9 is 0.8984375 in bf16).
# - adamp, adamp_cosine: 4. As SGDP, and Adam's step is computed in bf16 (its moments, bias
#   corrections and quotient): here a factor common to every element, 2 u off at step 1.
# - add_corrected_decayed_weights: 1. It computes ``u + factor * w`` in the update's dtype,
#   as optax.add_decayed_weights does (rounded twice, but ``factor * w`` is small here). It has
#   no float32 part, so it cannot fail the bf16-only computation below: compared for the rest.
BF16_CASES = {
    "rotational": (_bf16_sphere_case, 1),
    "rotational_centred": (_bf16_sphere_case, 1),
    "nero": (_bf16_sphere_case, 1),
    "adamh": (_bf16_sphere_case, 2),
    "corrected_decay": (_bf16_sphere_case, 1),
    "sgdp": (_bf16_sgd_case, 3),
    "sgdp_cosine": (_bf16_sgd_case, 3),
    "adamp": (_bf16_adam_case, 4),
    "adamp_cosine": (_bf16_adam_case, 4),
}


def _float32_copy(tree):
  return jax.tree.map(lambda x: x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x, tree)


@pytest.mark.parametrize("name", sorted(BF16))
def test_bf16_params_get_bf16_updates_computed_in_float32(name):
  """bf16 params, grads and state give bf16 updates equal to the same optimizer's float32
  update of the same values (float32 copies of the params, the grads and the state it
  holds, so that each comparison is one update's arithmetic: Adam's moments and SGD's buffer
  stay bf16 by design) to within the bf16 roundings that its design makes (BF16_CASES):
  ``k u |want|`` for each element, ``u = 2**-8``, ``k`` from 1 to 4.

  Catches a computation done entirely in bf16 (``reductions.compute_dtype`` returning bf16
  for bf16 and the hyperparameters not forcing float32): every optimizer but
  add_corrected_decayed_weights fails, by 11 u or more on every grouped leaf (430 u at
  most). So does each part alone in bf16: the sphere's ``new - w`` (rotational, nero,
  adamh), the projection of SGDP and AdamP (``reductions.tangential``), the heuristic's
  projection, per unit and per tensor. On random inputs no bound would tell them from the
  correct code: there its designed roundings (a tangent or a balanced start stored in bf16,
  Adam in bf16) are as large as a bf16 computation's errors. So each case makes those exact
  (or a common factor) and puts the update where float32 matters: a small step off a large
  ``w``, or a mostly radial step (the case builders say how).
  """
  case, roundings = BF16_CASES[name]
  w, grads = case()
  params = {k: jnp.asarray(v, jnp.bfloat16) for k, v in w.items()}
  for k, v in w.items():  # the cases are exact in bf16: no rounding of the inputs
    np.testing.assert_array_equal(np.asarray(params[k], np.float64), v, err_msg=k)
  tx = BF16[name](EXACT)
  state = tx.init(params)
  for step, g in enumerate(grads, 1):
    g16 = {k: jnp.asarray(v, jnp.bfloat16) for k, v in g.items()}
    for k, v in g.items():
      np.testing.assert_array_equal(np.asarray(g16[k], np.float64), v, err_msg=k)
    want, _ = tx.update(_float32_copy(g16), _float32_copy(state), _float32_copy(params))
    updates, state = tx.update(g16, state, params)  # step 2 from a bf16 state
    for k, u in updates.items():
      assert u.dtype == jnp.bfloat16, k
      got, ref = np.asarray(u, np.float64), np.asarray(want[k], np.float64)
      err = np.abs(got - ref) - 2.0 ** -20 * np.abs(w[k]).max()
      off = np.max(np.where(err > 0, err, 0.0) / np.maximum(_U * np.abs(ref), 1e-300))
      assert off <= roundings, (f"{name}, step {step}, {k!r}: off by up to {off:.3g} u of "
                                f"an element, more than {roundings} bf16 roundings")

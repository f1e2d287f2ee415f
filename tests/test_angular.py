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


UPDATE_NAMED = {
    "rotational": lambda g: normreg.rotational(optax.sgd(0.1), g, 0.01),
    "adamp": lambda g: normreg.adamp(0.1, g),
    "sgdp": lambda g: normreg.sgdp(0.1, g),
    "nero": lambda g: normreg.nero(0.1, g),
    "adamh": lambda g: normreg.adamh(0.1, g),
    "add_corrected_decayed_weights": lambda g: normreg.add_corrected_decayed_weights(0.1, 0.1, g),
}


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

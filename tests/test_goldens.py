"""normreg's angular-update optimizers against their official implementations, step by step.

The golden trajectories in ``tests/goldens/`` were made by the official PyTorch code
(clovaai's ``adamp`` 0.3.0 for AdamP/SGDP, jxbz/nero's ``nero.py``, epfml/REQ's
``RotationalWrapper``) with ``tests/goldens/make_goldens.py``, which says how the
problem is built: four leaves (a conv kernel whose gradient is tangent per unit, with
a nearly dead unit; a dense kernel tangent only as a whole; a leaf that is not
invariant; a bias), 24 saved gradients. Here normreg is fed the same gradients from
the same start and must land on the official parameters after every step: to 1e-5
relative (per leaf, ``||ours - official|| / ||official||``) in float32 and to 1e-9
under float64. No torch is needed.
"""

import inspect
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import normreg
from normreg import theory

HERE = os.path.join(os.path.dirname(__file__), "goldens")
NAMES = sorted(f[:-4] for f in os.listdir(HERE) if f.endswith(".npz"))
LEAVES = ("conv", "dense", "other", "bias")
TOL = {"float32": 1e-5, "float64": 1e-9}
# The exact groups of the golden problem (Flax layout: the unit is the last axis).
EXACT = {"conv": normreg.UNIT, "dense": normreg.TENSOR, "other": None, "bias": None}


def load(name):
  with np.load(os.path.join(HERE, name + ".npz")) as f:
    data = {k: f[k] for k in f.files}
  meta = json.loads(str(data.pop("meta")))
  grads = [{k: data[f"grads/{k}"][t] for k in LEAVES} for t in range(meta["steps"])]
  trajectories = {dtype: [{k: data[f"params{dtype[-2:]}/{k}"][t] for k in LEAVES}
                          for t in range(meta["steps"] + 1)] for dtype in TOL}
  return meta, grads, trajectories


def run(tx, start, grads, dtype):
  """normreg's trajectory from ``start`` under ``grads``, as float64 numpy."""
  with jax.enable_x64(dtype == "float64"):
    params = {k: jnp.asarray(v, dtype) for k, v in start.items()}
    state = tx.init(params)

    @jax.jit
    def step(params, state, g):
      updates, state = tx.update(g, state, params)
      return optax.apply_updates(params, updates), state

    out = [start]
    for g in grads:
      params, state = step(params, state, {k: jnp.asarray(v, dtype) for k, v in g.items()})
      assert all(p.dtype == jnp.dtype(dtype) for p in params.values())
      out.append({k: np.asarray(v, np.float64) for k, v in params.items()})
  return out


def worst(ours, official):
  """``(largest relative error, at step, leaf)`` over every step and leaf."""
  errors = [(float(np.linalg.norm(a[k] - b[k]) / np.linalg.norm(b[k])), t, k)
            for t, (a, b) in enumerate(zip(ours, official)) for k in LEAVES]
  return max(errors)


def optimizers(meta):
  """``{label: normreg transform}`` that must reproduce this official run."""
  opt, out = meta["optimizer"], {}
  if opt in ("adamp", "sgdp"):
    modes = {"none": ("exact", "cosine"), "all": ("cosine",), "grouped": ("exact",)}
    for mode in modes[meta["decay_on"]]:
      kw = dict(weight_decay=meta["weight_decay"], wd_ratio=meta["wd_ratio"],
                nesterov=meta["nesterov"], delta=meta["delta"], eps=meta["eps"],
                heuristic=mode == "cosine")
      groups = None if mode == "cosine" else EXACT
      if opt == "adamp":
        b1, b2 = meta["betas"]
        out[mode] = normreg.adamp(meta["lr"], groups, b1=b1, b2=b2, **kw)
      else:
        out[mode] = normreg.sgdp(meta["lr"], groups, momentum=meta["momentum"],
                                 dampening=meta["dampening"], **kw)
  elif opt == "nero":  # the official code constrains every parameter of 2+ axes, per neuron
    groups = {"conv": normreg.UNIT, "dense": normreg.UNIT, "other": normreg.UNIT, "bias": None}
    out["official"] = normreg.nero(meta["lr"], groups, b2=meta["beta"])
  else:
    out["official"] = rotational(meta, zero_mean=meta["zero_mean"])
  return out


def rotational(meta, zero_mean, eps=None):
  lr, wd = meta["lr"], meta["weight_decay"]
  ungrouped = {k: g is None for k, g in EXACT.items()}
  if meta["inner"] == "sgdm":  # REQ: coupled L2 inside the momentum, on the ungrouped only
    inner = optax.chain(optax.add_decayed_weights(wd, mask=ungrouped),
                        optax.sgd(lr, momentum=meta["momentum"]))
    angle = theory.equilibrium_angle_sgd(lr, wd, meta["momentum"])
  else:  # AdamW's decay is radial on the grouped leaves: the projection removes it
    b1, b2 = meta["betas"]
    inner = optax.adamw(lr, b1=b1, b2=b2, eps=meta["eps"], weight_decay=wd)
    angle = theory.equilibrium_angle_adamw(lr, wd, b1)
  return normreg.rotational(inner, EXACT, angle, decay=meta["update_norm_decay_factor"],
                            eps=lr * meta["rotational_eps"] if eps is None else eps,
                            zero_mean=zero_mean)


def test_the_goldens_cover_every_optimizer_and_option():
  metas = [load(n)[0] for n in NAMES]
  cases = {(m["optimizer"], m.get("nesterov"), m.get("weight_decay", 0) > 0,
            m.get("decay_on"), m.get("inner"), m.get("zero_mean")) for m in metas}
  for opt in ("adamp", "sgdp"):
    for nesterov in (False, True):
      assert (opt, nesterov, False, "none", None, None) in cases
      assert (opt, nesterov, True, "all", None, None) in cases  # the cosine test's decay
      assert (opt, nesterov, True, "grouped", None, None) in cases  # exact groups' decay
  assert any(m["optimizer"] == "nero" for m in metas)
  for inner in ("sgdm", "adamw"):
    for zero_mean in (False, True):
      assert ("rotational", None, True, None, inner, zero_mean) in cases
  for m in metas:
    assert m["steps"] >= 20


@pytest.mark.parametrize("dtype", sorted(TOL))
@pytest.mark.parametrize("name", NAMES)
def test_matches_the_official_trajectory(name, dtype):
  meta, grads, official = load(name)
  txs = optimizers(meta)
  assert txs
  for label, tx in txs.items():
    ours = run(tx, official[dtype][0], grads, dtype)
    error, step, leaf = worst(ours, official[dtype])
    assert error <= TOL[dtype], (f"{name} ({label}, {dtype}): {error:.2e} relative off the "
                                 f"official code at step {step}, leaf {leaf!r}")


def test_the_golden_gradients_take_every_branch_of_the_cosine_test():
  """cosine_groups, run on the golden gradients and the official params, decides per unit
  for the conv kernel (its nearly dead unit included), per tensor for the dense one and
  not at all for the third, at every step: the branches the official code took."""
  meta, grads, official = load("adamp_plain_wd-all")
  assert np.max(np.abs(grads[0]["conv"][..., -1])) < 1e-8  # below eps: nearly dead
  for t, g in enumerate(grads):
    found = normreg.cosine_groups(g, official["float64"][t], delta=meta["delta"])
    assert found == EXACT, f"step {t}: {found}"


def test_the_theory_gives_the_official_target_angles():
  for name in NAMES:
    meta = load(name)[0]
    if meta["optimizer"] == "rotational":
      lr, wd = meta["lr"], meta["weight_decay"]
      ours = (theory.equilibrium_angle_sgd(lr, wd, meta["momentum"]) if meta["inner"] == "sgdm"
              else theory.equilibrium_angle_adamw(lr, wd, meta["betas"][0]))
      np.testing.assert_allclose(ours, meta["etar"], rtol=1e-12)


# ------------------------------------------- the documented departures from the official code


def departure(name, tx):
  meta, grads, official = load(name)
  ours = run(tx, official["float64"][0], grads, "float64")
  return worst(ours, official["float64"])


def test_sgdp_without_momentum_projection_departs_as_documented():
  """``project_momentum=False`` keeps the buffer's radial part: identical at the first
  step (the buffer is the gradient, tangent here), 1e-3 relative off the official
  trajectory after 24 steps (the docstring's figure)."""
  for name in ("sgdp_plain_wd0", "sgdp_plain_wd-grouped"):
    meta = load(name)[0]
    tx = normreg.sgdp(meta["lr"], EXACT, momentum=meta["momentum"],
                      weight_decay=meta["weight_decay"], project_momentum=False)
    error, step, _ = departure(name, tx)
    assert 5e-4 < error < 2e-3 and step == meta["steps"], (name, error, step)


def test_rotational_defaults_depart_from_req_as_documented():
  """The docstring's figures: normreg's ``zero_mean=False`` against REQ's default
  ``zero_mean=True`` (2.3e-2 with SGD inside, 8.6e-3 with AdamW), and the default
  ``eps`` against REQ's ``lr * rotational_eps`` (4.8e-4, 1.9e-4: the nearly dead unit)."""
  figures = {("rotational_sgdm_centred", False, None): 2.3e-2,
             ("rotational_adamw_centred", False, None): 8.6e-3,
             ("rotational_sgdm_plain", False, 1e-8): 4.8e-4,
             ("rotational_adamw_plain", False, 1e-8): 1.9e-4}
  for (name, zero_mean, eps), figure in figures.items():
    meta = load(name)[0]
    error, _, leaf = departure(name, rotational(meta, zero_mean, eps=eps))
    np.testing.assert_allclose(error, figure, rtol=0.05, err_msg=name)
  meta = load("rotational_sgdm_plain")[0]
  assert departure("rotational_sgdm_plain", rotational(meta, False, eps=1e-8))[2] == "conv"
  defaults = inspect.signature(normreg.rotational).parameters
  assert (defaults["eps"].default, defaults["zero_mean"].default) == (1e-8, False)

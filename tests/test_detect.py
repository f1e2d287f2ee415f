"""find_scale_invariant on hand-written functions and on a Linen model."""

import flax.linen as nn
import jax
import jax.numpy as jnp

import normreg
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

"""normreg on other frameworks' models: dm-haiku, equinox, flax.linen (nn.scan), a model zoo.

Each model's ground truth is derived by reading its source, leaf by leaf, and written
here as a rule over its parameter paths (the comment beside each says what in the
source it comes from); detection must return exactly it. Then the groups, exactly
as detection returns them (an equinox Module, haiku's dicts, ...), drive 30 steps of
``spherical_sgd`` and of SGD with the paper's L2, with the metrics computed inside the
jitted step: the loss falls, and on the sphere every grouped norm stays 1 to 1e-4.
The configurations that would give no group at all say so.
"""

import logging

import equinox as eqx
import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import normreg

STEPS = 30
LR = 0.05
KEY = jax.random.key(0)


def _batch(n=8, size=32, classes=10):
  kx, ky = jax.random.split(jax.random.key(1))
  return jax.random.normal(kx, (n, size, size, 3)), jax.random.randint(ky, (n,), 0, classes)


def _by_path(groups):
  return normreg.groups.groups_by_path(groups, "test")


def _check_training(loss_fn, params, groups, jit=jax.jit):
  """30 steps of spherical SGD and of SGD + L2 on one batch; ``loss_fn(params) -> (loss,
  aux)`` with ``aux`` the new model state, threaded through."""
  tests = {"spherical": normreg.spherical_sgd(LR, groups, momentum=0.9),
           "l2": optax.chain(normreg.add_l2_penalty(5e-4, groups), optax.sgd(LR, momentum=0.9))}
  for name, tx in tests.items():

    @jit
    def step(params, opt_state, aux):
      (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, aux)
      updates, opt_state = tx.update(grads, opt_state, params)
      new = optax.apply_updates(params, updates)
      metrics = (normreg.unit_norms(new, groups),
                 normreg.effective_learning_rate(LR, new, groups),
                 normreg.angular_update(params, new, groups))
      return new, opt_state, aux, loss, metrics

    p, opt_state, aux, losses = params, tx.init(params), None, []
    for _ in range(STEPS):
      p, opt_state, aux, loss, (norms, elr, angle) = step(p, opt_state, aux)
      losses.append(float(loss))
    assert losses[-1] < losses[0], (name, losses[0], losses[-1])
    grouped = [k for k, g in _by_path(groups).items() if g is not None]
    norms, elr, angle = (dict(zip(normreg.param_paths(params), jax.tree.leaves(
        m, is_leaf=lambda x: x is None))) for m in (norms, elr, angle))
    assert grouped
    for path in grouped:
      assert np.all(np.isfinite(angle[path])) and np.all(angle[path] >= 0), (name, path)
      if name == "spherical":  # on the sphere: ||w|| = 1, and eta / ||w||^2 is eta
        np.testing.assert_allclose(norms[path], 1.0, atol=1e-4, err_msg=path)
        np.testing.assert_allclose(elr[path], LR, rtol=2e-4, err_msg=path)


# ------------------------------------------------------------------------- dm-haiku


def _haiku_resnet18():
  model = hk.transform_with_state(
      lambda x, is_training: hk.nets.ResNet18(num_classes=10)(x, is_training=is_training))
  x, y = _batch()
  params, state = model.init(KEY, x, True)
  return model, params, state, x, y


def _haiku_truth(path):
  """hk.nets.ResNet18 (haiku/_src/nets/resnet.py): every conv (initial_conv, conv_0,
  conv_1, shortcut_conv) has with_bias=False and feeds a BatchNorm: per output unit,
  HWIO, the unit last. The BatchNorms' scale and offset, stored (1, 1, 1, C), and the
  logits Linear are not invariant."""
  module, name = path.rsplit("/", 1)
  if module.endswith("conv") or module.rsplit("/", 1)[-1] in ("conv_0", "conv_1"):
    assert name == "w"
    return normreg.UNIT
  return None


@pytest.mark.slow
def test_haiku_resnet18_detection_and_training(caplog):
  model, params, state, x, y = _haiku_resnet18()
  fn = lambda p, x: model.apply(p, state, None, x, is_training=True)[0]
  with caplog.at_level(logging.WARNING):
    groups = normreg.find_scale_invariant(fn, params, x)
  found = _by_path(groups)
  assert len(found) == 62
  assert found == {p: _haiku_truth(p) for p in found}
  # 32x32 inputs leave the last stage 1x1 (2x2 before its first, strided conv): those
  # kernels act through their centre taps only. Reported as meant, with a warning each.
  warned = [r.getMessage() for r in caplog.records if "smaller than the kernel" in r.getMessage()]
  assert any("block_group_3/~/block_1/~/conv_1/w" in m for m in warned), warned
  assert not any("block_group_0" in m for m in warned), warned

  def loss_fn(p, s):
    logits, s = model.apply(p, state if s is None else s, None, x, is_training=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), s

  _check_training(loss_fn, params, groups)


def test_haiku_forward_returning_its_state_is_refused():
  model = hk.transform_with_state(lambda x: hk.BatchNorm(True, True, 0.9)(
      hk.Conv2D(4, 3, with_bias=False)(x), is_training=True))
  x, _ = _batch(size=6)
  params, state = model.init(KEY, x)
  with pytest.raises(ValueError, match=r"returned a tuple of 2.*\(output, state\)"):
    normreg.find_scale_invariant(lambda p, x: model.apply(p, state, None, x), params, x)


def test_evaluation_mode_or_a_batch_of_one_warn_that_nothing_was_found(caplog):
  model = hk.transform_with_state(lambda x, training: hk.BatchNorm(True, True, 0.9)(
      hk.Linear(6, with_bias=False)(x), is_training=training))
  x = jax.random.normal(KEY, (8, 5))
  params, state = model.init(KEY, x, True)
  with caplog.at_level(logging.WARNING):
    assert _by_path(normreg.find_scale_invariant(
        lambda p, x: model.apply(p, state, None, x, True)[0], params, x))[
            "linear/w"] == normreg.UNIT
    assert not caplog.records
    for fn, batch in ((lambda p, x: model.apply(p, state, None, x, False)[0], x),  # eval mode
                      (lambda p, x: model.apply(p, state, None, x, True)[0], x[:1])):  # one
      caplog.clear()
      groups = normreg.find_scale_invariant(fn, params, batch)
      assert set(_by_path(groups).values()) == {None}
      assert [r.levelname for r in caplog.records] == ["WARNING"]
      assert "no scale-invariant parameter" in caplog.records[0].getMessage()
    # An optimizer given such groups says once that it acts as its base optimizer.
    caplog.clear()
    tx = normreg.spherical_sgd(0.1, groups, momentum=0.9)
    tx.init(params)
    tx.init(params)
    assert sum("no scale-invariant leaf" in r.getMessage() for r in caplog.records) == 1


# -------------------------------------------------------------------------- equinox


class _EqxCNN(eqx.Module):
  conv: eqx.nn.Conv2d
  bn: eqx.nn.BatchNorm
  linear: eqx.nn.Linear
  ln: eqx.nn.LayerNorm
  head: eqx.nn.Linear

  def __init__(self, key):
    k1, k2, k3 = jax.random.split(key, 3)
    self.conv = eqx.nn.Conv2d(3, 8, 3, padding=1, use_bias=False, key=k1)
    # mode="batch": batch statistics in training; the default ("legacy", an EMA) mixes
    # the running statistics in after the first call, and is not scale-invariant then.
    self.bn = eqx.nn.BatchNorm(8, axis_name="batch", mode="batch")
    self.linear = eqx.nn.Linear(8, 16, key=k2)
    self.ln = eqx.nn.LayerNorm(16)
    self.head = eqx.nn.Linear(16, 10, key=k3)

  def __call__(self, x, state):  # one example, channels first (equinox's convention)
    x, state = self.bn(self.conv(x), state)
    x = jax.nn.relu(x).mean((1, 2))
    return self.head(jax.nn.relu(self.ln(self.linear(x)))), state


EQX_TRUTH = {
    # Conv2d(use_bias=False) -> BatchNorm: per output unit, weight (out, in, kh, kw).
    "conv/weight": normreg.unit(axis=0), "conv/bias": None,
    "bn/weight": None, "bn/bias": None,
    # Linear with bias -> LayerNorm: weight (out, in) and bias together, one joint group.
    "linear/weight": normreg.tensor(joint="linear"),
    "linear/bias": normreg.tensor(joint="linear"),
    "ln/weight": None, "ln/bias": None,
    "head/weight": None, "head/bias": None,
}


def test_equinox_detection_and_training():
  model, state = eqx.nn.make_with_state(_EqxCNN)(KEY)
  params, static = eqx.partition(model, eqx.is_inexact_array)
  x, y = _batch(size=8)
  x = jnp.transpose(x, (0, 3, 1, 2))

  def forward(p, x, state):
    return jax.vmap(eqx.combine(p, static), axis_name="batch", in_axes=(0, None),
                    out_axes=(0, None))(x, state)

  groups = normreg.find_scale_invariant(lambda p, x: forward(p, x, state)[0], params, x)
  assert isinstance(groups, _EqxCNN)  # the user's Module, holding groups: data, never called
  found = _by_path(groups)
  assert {p: g for p, g in found.items() if p in EQX_TRUTH} == EQX_TRUTH
  # eqx.partition leaves None where the Module holds no array (BatchNorm's state indices).
  assert all(found[p] is None for p in set(found) - set(EQX_TRUTH))
  # The unit is the output axis: one norm per output channel, (8,), not per kw.
  assert normreg.unit_norms(params, groups).conv.weight.shape == (8,)
  # The same groups, declared by rules.
  declared = normreg.groups_from_rules(params, [
      ("conv/weight", normreg.unit(axis=0)), (r"(linear)/(weight|bias)",
                                              normreg.tensor(joint=r"\1")), (".*", None)],
      log=False)
  assert _by_path(declared) == found

  def loss_fn(p, s):
    logits, s = forward(p, x, state if s is None else s)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), s

  _check_training(loss_fn, params, groups, jit=eqx.filter_jit)


def test_an_unfiltered_equinox_model_is_refused_naming_eqx_partition():
  model, state = eqx.nn.make_with_state(_EqxCNN)(KEY)
  # All of it: the leaf named (the first non-array one), what it is, and the way out. A message
  # that dropped the eqx.partition advice, or named no leaf, fails.
  with pytest.raises(ValueError) as e:
    normreg.find_scale_invariant(lambda m, x: m(x, state)[0], model, jnp.ones((3, 8, 8)))
  message = str(e.value)
  assert message.startswith("find_scale_invariant: params leaf 'bn/axis_name' is a str, not an "
                            "array."), message
  assert "eqx.partition(model, eqx.is_inexact_array)" in message
  assert "eqx.combine(p, static)" in message


# ----------------------------------------------------------- flax.linen, nn.scan


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    x = nn.Dense(16, use_bias=False)(x)
    return nn.relu(nn.BatchNorm(use_running_average=False)(x)), None


class _ScannedMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(16, use_bias=False, name="stem")(x.reshape(x.shape[0], -1))
    blocks = nn.scan(_Block, variable_axes={"params": 0, "batch_stats": 0},
                     split_rngs={"params": True}, length=4)
    x, _ = blocks(name="blocks")(nn.relu(nn.LayerNorm(name="ln")(x)), None)
    return nn.Dense(10, name="head")(x)


LINEN_TRUTH = {
    "stem/kernel": normreg.TENSOR,  # Dense(use_bias=False) -> LayerNorm: the whole tensor
    "ln/scale": None, "ln/bias": None,
    # Four Dense(use_bias=False) -> BatchNorm blocks stacked by nn.scan: (4, 16, 16),
    # per block and per output unit.
    "blocks/Dense_0/kernel": normreg.unit(stack=1),
    "blocks/BatchNorm_0/scale": None, "blocks/BatchNorm_0/bias": None,
    "head/kernel": None, "head/bias": None,
}


def test_linen_blocks_stacked_by_scan():
  model = _ScannedMLP()
  x, y = _batch(size=4)
  variables = model.init(KEY, x)
  assert variables["params"]["blocks"]["Dense_0"]["kernel"].shape == (4, 16, 16)

  def forward(p, stats):
    return model.apply({"params": p, "batch_stats": stats}, x, mutable=["batch_stats"])

  groups = normreg.find_scale_invariant(
      lambda p, x: forward(p, variables["batch_stats"])[0], variables["params"], x)
  assert _by_path(groups) == LINEN_TRUTH
  assert normreg.unit_norms(variables["params"], groups)["blocks"]["Dense_0"][
      "kernel"].shape == (4, 16)

  def loss_fn(p, stats):
    logits, new = forward(p, variables["batch_stats"] if stats is None else stats)
    return (optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(),
            new["batch_stats"])

  _check_training(loss_fn, variables["params"], groups)


# ------------------------------------------------------ a model zoo: flaxmodels


@pytest.mark.slow
def test_flaxmodels_resnet18():
  with jax.numpy_rank_promotion("allow"):  # flaxmodels' own BatchNorm broadcasts by rank
    _flaxmodels_resnet18()


def _flaxmodels_resnet18():
  import flaxmodels  # pylint: disable=g-import-not-at-top
  model = flaxmodels.ResNet18(output="logits", pretrained=None, num_classes=10)
  x, y = _batch()
  variables = model.init(KEY, x, train=True)

  def forward(p, stats):
    return model.apply({"params": p, "batch_stats": stats}, x, train=True,
                       mutable=["batch_stats"])

  groups = normreg.find_scale_invariant(
      lambda p, x: forward(p, variables["batch_stats"])[0], variables["params"], x)
  found = _by_path(groups)
  # flaxmodels/resnet/resnet.py: every nn.Conv has use_bias=False and feeds
  # ops.batch_norm: per output unit (HWIO, the unit last); BatchNorm scale/bias and the
  # final nn.Dense are not invariant.
  shapes = dict(zip(normreg.param_paths(variables["params"]),
                    [x.shape for x in jax.tree.leaves(variables["params"])]))
  assert found == {p: normreg.UNIT if len(shapes[p]) == 4 else None for p in found}
  assert sum(g is not None for g in found.values()) == 20  # 17 convs + 3 shortcut convs

  def loss_fn(p, stats):
    logits, new = forward(p, variables["batch_stats"] if stats is None else stats)
    return (optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(),
            new["batch_stats"])

  _check_training(loss_fn, variables["params"], groups)

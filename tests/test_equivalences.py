"""The exact equivalences of the reproduction (claims 8 and 9), on the toy network.

- ``lam`` has no effect of its own: ``(eta, lam, w0)`` and ``(c^2 eta, lam/c^2, c w0)``
  with the ungrouped parameters at one rate train the same network at every step,
  momentum included (van Laarhoven 2017, sec. 3).
- Weight decay is an exponentially growing learning rate (Li & Arora 2019): the
  launcher's ``--method=exp_lr`` chain, run on the toy, equals its ``--method=l2``
  chain with ``w_t = alpha^t w~_t``.

The reference in both is the other run, computed with a different recipe; the
float64 identity of the schedule itself is in ``tests/test_theory.py``.
"""

import dataclasses

import chex
import jax
import numpy as np
import optax
import pytest

import normreg
from experiments import trainer
from experiments.config import Config
from normreg import theory
import toy

KEY = jax.random.key(3)


def _train(tx, params, steps):
  state = tx.init(params)

  @jax.jit
  def step(params, state, x, y):
    grads = jax.grad(toy.loss)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  history = [params]
  for k in jax.random.split(KEY, steps):
    params, state = step(params, state, *toy.batch(k))
    history.append(params)
  return history


def _scale_grouped(params, c):
  return normreg.groups.map_grouped(lambda _, w: w * c, toy.GROUPS, params)


@pytest.mark.parametrize("c", [2.0, 0.5])
@pytest.mark.parametrize("momentum, nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_lam_alone_has_no_effect(c, momentum, nesterov):
  lr, lam = 0.1, 5e-3
  params = toy.init(KEY)
  ref = _train(normreg.sgd_l2(lr, lam, toy.GROUPS, momentum=momentum, nesterov=nesterov,
                              ungrouped_learning_rate=lr), params, 12)
  scaled = _train(normreg.sgd_l2(c * c * lr, lam / (c * c), toy.GROUPS, momentum=momentum,
                                 nesterov=nesterov, ungrouped_learning_rate=lr),
                  _scale_grouped(params, c), 12)
  for a, b in zip(ref, scaled):
    chex.assert_trees_all_close(_scale_grouped(a, c), b, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(toy.apply(a, toy.batch(KEY)[0]), toy.apply(b, toy.batch(KEY)[0]),
                               rtol=1e-5, atol=1e-6)
  # Without the common ungrouped rate the runs differ: the rest of the network moves at c^2 eta.
  apart = _train(normreg.sgd_l2(c * c * lr, lam / (c * c), toy.GROUPS, momentum=momentum,
                                nesterov=nesterov), _scale_grouped(params, c), 12)
  assert not np.allclose(apart[-1]["head"]["kernel"], ref[-1]["head"]["kernel"], rtol=1e-3)


def _launcher_tx(method, lr, lam, momentum):
  config = Config(method=method, lr=lr, lam=lam, momentum=momentum)
  return trainer.make_optimizer(config, toy.GROUPS, trainer.make_schedule(config, 100))


@pytest.mark.parametrize("momentum, lam", [(0.0, 5e-3), (0.9, 1e-3)])
def test_launcher_exp_lr_is_the_twin_of_l2(momentum, lam):
  lr = 0.1
  params = toy.init(KEY)
  l2 = _train(_launcher_tx("l2", lr, lam, momentum), params, 15)
  twin = _train(_launcher_tx("exp_lr", lr, lam, momentum), params, 15)
  alpha = theory.exponential_lr_rate(lr, 2 * lam, momentum)
  for t, (a, b) in enumerate(zip(l2, twin)):
    chex.assert_trees_all_close(_scale_grouped(a, alpha ** -t), b, rtol=2e-5, atol=1e-6)
  # The grouped rate grows; the rest keep lr (and L2 never touches them).
  grouped = [float(theory.exponential_lr_schedule(lr, 2 * lam, momentum)(t)) for t in (0, 14)]
  assert grouped[1] > grouped[0] > lr


def test_exp_lr_needs_sgd_and_a_constant_rate():
  with pytest.raises(ValueError, match="--optimizer=sgd"):
    Config(method="exp_lr", optimizer="adam").validate()
  with pytest.raises(ValueError, match="--schedule=constant"):
    Config(method="exp_lr", schedule="cosine").validate()
  assert dataclasses.replace(Config(), method="l2", ungrouped_lr=0.05).validate()


@pytest.mark.parametrize("c", [2.0, 0.5])
def test_scaled_recipe_is_the_same_network_in_evaluation_mode(tmp_path, c):
  """``(eta, lam, w0)`` and ``(c^2 eta, lam/c^2, c w0)`` through the launcher, eps 1e-30:
  BatchNorm's running statistics follow (mean x c, variance x c^2) from the first step,
  so the test loss and accuracy, computed on them, are the same at every epoch."""
  import runs  # pylint: disable=g-import-not-at-top
  common = dict(model="cnn", width=4, epochs=2, batch_size=16, log_every=4, method="l2",
                norm_eps=1e-30, ungrouped_lr=0.05, seed=0)
  lr, lam = 0.05, 5e-3
  data = runs.tiny_dataset()
  base = trainer.train_and_evaluate(Config(**common, lr=lr, lam=lam), str(tmp_path / "base"),
                                    dataset=data, progress=False, tensorboard=False)
  scaled = trainer.train_and_evaluate(
      Config(**common, lr=c * c * lr, lam=lam / (c * c), init_scale=c),
      str(tmp_path / "scaled"), dataset=data, progress=False, tensorboard=False)
  stats = lambda state: {normreg.groups.path_str(p): np.asarray(x) for p, x in
                         jax.tree_util.tree_leaves_with_path(state.rest)}
  a, b = stats(base), stats(scaled)
  assert [p for p in a if p.endswith("/var")], "the network has BatchNorm statistics"
  for path in a:
    factor = c * c if path.endswith("/var") else c if path.endswith("/mean") else 1.0
    np.testing.assert_allclose(b[path], factor * a[path], rtol=1e-5, atol=1e-7, err_msg=path)
  tests = [[r for r in runs.read_metrics(tmp_path / d) if r["kind"] == "test"]
           for d in ("base", "scaled")]
  assert len(tests[0]) == 2
  for x, y in zip(*tests):
    assert x["accuracy"] == y["accuracy"]
    np.testing.assert_allclose(y["loss"], x["loss"], rtol=1e-6)

"""End-to-end runs of the experiment stack, CPU-sized.

A short run under ``tfds.testing.mock_data`` and one on a few hundred real
CIFAR-10 images (path from NORMREG_CIFAR10_DIR, skipped when unset) write
well-formed metrics, config, checkpoints and figures; resumption is exact; bad
input is refused before training.
"""

import dataclasses
import json
import os
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds
from flax import nnx

import normreg
from experiments import data as data_lib
from experiments import plot
from experiments import trainer
from experiments.config import Config

import runs

SMALL = dict(model="cnn", width=4, epochs=2, batch_size=16, log_every=2, lr=0.05)
CIFAR_DIR = os.environ.get("NORMREG_CIFAR10_DIR")


def _check_run(workdir, config, steps_per_epoch):
  records = runs.read_metrics(workdir)
  train = [r for r in records if r["kind"] == "train"]
  test = [r for r in records if r["kind"] == "test"]
  assert [r["epoch"] for r in test] == list(range(1, config.epochs + 1))
  assert train[-1]["step"] == steps_per_epoch * config.epochs
  for r in train:
    assert np.isfinite(r["loss"]) and 0 <= r["accuracy"] <= 1 and r["learning_rate"] > 0
    assert r["layers"], "a BatchNorm network has grouped layers"
    for name, layer in r["layers"].items():
      assert layer["norm"] > 0 and layer["elr"] > 0 and layer["angle"] >= 0, name
  for r in test:
    assert 0 <= r["accuracy"] <= 1 and r["images_per_sec"] > 0
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f) == dataclasses.asdict(config)
  assert os.listdir(os.path.join(workdir, "checkpoints"))
  figures = plot.plot_runs([plot.read_run(workdir)], os.path.join(workdir, "figures"))
  assert len(figures) == 5
  for path in figures:
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  return train, test


@pytest.mark.slow
def test_end_to_end_under_tfds_mock_data(tmp_path):
  config = Config(dataset="cifar10", method="l2", **SMALL)
  with tfds.testing.mock_data(num_examples=64):
    trainer.train_and_evaluate(config, str(tmp_path), progress=False)
  train, _ = _check_run(str(tmp_path), config, steps_per_epoch=64 // 16)
  # The conv kernels before BatchNorm are found and measured; the head is not.
  assert set(train[0]["layers"]) == {f"convs/{i}/kernel" for i in range(6)}


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR_DIR, reason="set NORMREG_CIFAR10_DIR to the extracted "
                    "CIFAR-10 copy (../shared/data/cifar10-jpeg.tar.gz) to run this test")
def test_end_to_end_on_real_cifar10_images(tmp_path):
  config = Config(dataset="folder", data_dir=CIFAR_DIR, train_size=320, test_size=160,
                  method="spherical", model="cnn", width=4, epochs=2, batch_size=32,
                  log_every=5, lr=0.1)
  trainer.train_and_evaluate(config, str(tmp_path), progress=False)
  train, _ = _check_run(str(tmp_path), config, steps_per_epoch=10)
  for layer in train[-1]["layers"].values():  # spherical: unit norms throughout
    assert abs(layer["norm"] - 1) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("method", ["l2", "spherical"])
def test_interrupted_run_resumes_exactly(tmp_path, method):
  ds = runs.tiny_dataset()
  config = Config(dataset="cifar10", method=method, **{**SMALL, "epochs": 3})
  full = trainer.train_and_evaluate(config, str(tmp_path / "full"), dataset=ds, progress=False)
  # Killed in the middle of the second epoch (after its checkpoint of epoch 1)...
  trainer.train_and_evaluate(config, str(tmp_path / "cut"), dataset=ds, progress=False,
                             interrupt_after_step=6)
  # ...and started again with the same command.
  resumed = trainer.train_and_evaluate(config, str(tmp_path / "cut"), dataset=ds,
                                       progress=False)
  chex.assert_trees_all_close(resumed.params, full.params, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(resumed.opt_state, full.opt_state, rtol=1e-6, atol=1e-7)
  # No record is duplicated by the replay.
  steps = [(r["kind"], r["step"]) for r in runs.read_metrics(str(tmp_path / "cut"))]
  assert len(steps) == len(set(steps))
  assert steps == [(r["kind"], r["step"]) for r in runs.read_metrics(str(tmp_path / "full"))]
  if method == "l2":  # killed before the first checkpoint: the restart starts afresh
    trainer.train_and_evaluate(config, str(tmp_path / "early"), dataset=ds, progress=False,
                               interrupt_after_step=2)
    assert runs.read_metrics(str(tmp_path / "early"))  # (it had logged step 2)
    trainer.train_and_evaluate(config, str(tmp_path / "early"), dataset=ds, progress=False)
    def steps_and_losses(folder):
      return [(r["kind"], r["step"], r["loss"]) for r in runs.read_metrics(str(folder))]
    assert steps_and_losses(tmp_path / "early") == steps_and_losses(tmp_path / "full")


def test_layer_metrics_per_layer_against_numpy():
  rng = np.random.default_rng(0)
  before = {"k": rng.standard_normal((3, 5)).astype(np.float32)}
  after = {"k": before["k"] + 0.1 * rng.standard_normal((3, 5)).astype(np.float32)}
  after["k"][:, 4] = 1e-6  # a dead unit: its eta/||w||^2 is 1e11
  out = trainer.layer_metrics(before, after, {"k": normreg.UNIT}, 0.1, power=2,
                              rescaled=False)["k"]
  norms = np.linalg.norm(after["k"], axis=0)
  cos = np.sum(before["k"] * after["k"], 0) / (np.linalg.norm(before["k"], axis=0) * norms)
  np.testing.assert_allclose(out["norm"], norms.mean(), rtol=1e-5)
  np.testing.assert_allclose(out["elr"], np.median(0.1 / norms ** 2), rtol=1e-5)
  np.testing.assert_allclose(out["angle"], np.arccos(np.clip(cos, -1, 1)).mean(), rtol=1e-3,
                             atol=1e-4)


def test_train_step_traces_once():
  ds = runs.tiny_dataset()
  config = Config(dataset="cifar10", method="spherical", **SMALL)
  model = trainer.create_model(config, ds.num_classes, 3)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  images = jnp.asarray(ds.train_images)
  mean, std = (jnp.asarray(a) for a in data_lib.channel_stats(ds.train_images))
  groups = trainer.find_groups(config, graphdef, params, rest,
                               data_lib.normalize(images[:16], mean, std))
  tx = trainer.make_optimizer(config, groups, optax.constant_schedule(0.1))
  chex.clear_trace_counter()
  step = jax.jit(chex.assert_max_traces(
      trainer.make_train_step(graphdef, tx, mean, std, augment=True, key=jax.random.key(0)),
      n=1))
  state = trainer.TrainState(jnp.int32(0), params, rest, tx.init(params), jnp.int32(-1))
  labels = jnp.asarray(ds.train_labels)
  for i in range(4):
    state, metrics = step(state, images, labels, jnp.arange(16) + 16 * i)
  assert int(state.step) == 4 and np.isfinite(float(metrics["loss"]))


@pytest.mark.parametrize("method, optimizer, settings", [
    ("l2", "sgd", dict(lr=(0.0731, 0.0417), lam=(1.3e-3, 2.9e-3), ungrouped_lr=(0.021, 0.033))),
    ("adamp", "adam", dict(lr=(0.0031, 0.0047), schedule=("cosine", "cosine")))])
def test_runs_that_differ_only_in_seed_rates_and_decay_share_their_programs(
    tmp_path, method, optimizer, settings):
  """Run B (other seed, --lr, --lam, --ungrouped_lr than run A) compiles nothing: every
  program it needs is in JAX's persistent cache (all its requests hit). Run C, B's seed
  with A's rates, hits too, and ends elsewhere than B (the shared program takes each
  run's own rates); run D, without augmentation (compiled into the step), misses.

  Every run has a --norm_eps of this session's own, so programs that a kept cache
  (JAX_COMPILATION_CACHE_DIR set beforehand) holds from an earlier session cannot be
  hit: run A must miss.
  """
  eps = 1e-5 * (1 + (time.time_ns() % 9973) / 1e5)  # a program no earlier session built
  events = []
  listener = lambda name, **kw: events.append(name)
  old_min = (jax.config.jax_persistent_cache_min_compile_time_secs,
             jax.config.jax_persistent_cache_min_entry_size_bytes)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  jax.monitoring.register_event_listener(listener)
  counts, finals = {}, {}
  try:
    # (name, seed, which rates, augment)
    for name, seed, rates, augment in (("A", 0, 0, True), ("B", 1, 1, True),
                                       ("C", 1, 0, True), ("D", 1, 1, False)):
      run = {k: v[rates] for k, v in settings.items()}
      config = Config(dataset="cifar10", method=method, optimizer=optimizer, seed=seed,
                      augment=augment, norm_eps=eps, **{**SMALL, "epochs": 1, **run})
      events.clear()
      state = trainer.train_and_evaluate(config, str(tmp_path / name),
                                         dataset=runs.tiny_dataset(), progress=False)
      counts[name] = (events.count("/jax/compilation_cache/compile_requests_use_cache"),
                      events.count("/jax/compilation_cache/cache_hits"))
      finals[name] = jax.tree.leaves(state.params)
  finally:
    jax.monitoring.unregister_event_listener(listener)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old_min[0])
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", old_min[1])
  requests, hits = counts["A"]
  assert hits < requests, counts  # the first of its programs
  for name in ("B", "C"):
    requests, hits = counts[name]
    assert requests > 0 and hits == requests, (name, counts)
  requests, hits = counts["D"]
  assert hits < requests, counts  # a constant of the step: a miss
  # Same seed, other rates: the shared program took each run's own.
  assert any(not np.array_equal(b, c) for b, c in zip(finals["B"], finals["C"]))


def test_non_finite_loss_stops_naming_the_step(tmp_path):
  config = Config(dataset="cifar10", method="none", norm="none", optimizer="sgd",
                  **{**SMALL, "lr": 1e30, "momentum": 0.0})
  with pytest.raises(trainer.NonFiniteLossError, match=r"non-finite at step \d+"):
    trainer.train_and_evaluate(config, str(tmp_path), dataset=runs.tiny_dataset(), progress=False)


@pytest.mark.parametrize("method", ["l2", "decoupled", "spherical", "elr_rescale", "tangent",
                                    "none"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_every_method_takes_finite_steps(method, optimizer):
  config = Config(dataset="cifar10", method=method, optimizer=optimizer,
                  **{**SMALL, "lr": 0.01})
  ds = runs.tiny_dataset(n_train=32)
  model = trainer.create_model(config, ds.num_classes, 3)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  groups = trainer.find_groups(
      config, graphdef, params, rest, jnp.asarray(ds.train_images[:16], jnp.float32) / 255)
  tx = trainer.make_optimizer(config, groups, optax.constant_schedule(0.01))
  step = jax.jit(trainer.make_train_step(graphdef, tx, jnp.zeros(3), jnp.ones(3),
                                         augment=False, key=jax.random.key(0)))
  state = trainer.TrainState(jnp.int32(0), params, rest, tx.init(params), jnp.int32(-1))
  new, m = step(state, jnp.asarray(ds.train_images), jnp.asarray(ds.train_labels),
                jnp.arange(16))
  assert np.isfinite(float(m["loss"]))
  moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), params, new.params)
  assert all(jax.tree.leaves(moved)), "every parameter takes a step"


# ----------------------------------------------------------------------- bad input


@pytest.mark.parametrize("overrides, flag", [
    (dict(dataset="imagenet"), "--dataset"),
    (dict(model="vgg19"), "--model"),
    (dict(norm="instance"), "--norm"),
    (dict(method="adamw"), "--method"),
    (dict(method="spherical", lam=1e-4), "--lam"),
    (dict(lr=0.0), "--lr"),
    (dict(lr=-0.1), "--lr"),
    (dict(batch_size=0), "--batch_size"),
    (dict(dataset="folder"), "--data_dir"),
    (dict(method="spherical", ungrouped_lr=0.0), "--ungrouped_lr must be > 0"),
    (dict(method="exp_lr", optimizer="adam"), "--method=exp_lr .* needs --optimizer=sgd"),
    (dict(method="exp_lr", schedule="step"), "needs --schedule=constant"),
    (dict(norm_eps=0.0), "--norm_eps must be > 0"),
])
def test_bad_config_is_refused_naming_the_flag(overrides, flag):
  with pytest.raises(ValueError, match=flag):
    Config(**{**SMALL, **overrides}).validate()


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_spherical_ungrouped_lr_follows_the_schedule_at_its_own_peak(schedule):
  config = Config(method="spherical", momentum=0.0, lr=0.2, ungrouped_lr=0.05,
                  schedule=schedule, **{k: v for k, v in SMALL.items() if k != "lr"})
  params = {"kernel": jnp.eye(3), "bias": jnp.ones(3)}
  groups = {"kernel": normreg.UNIT, "bias": None}
  tx = trainer.make_optimizer(config, groups, trainer.make_schedule(config, 10))
  state = tx.init(params)
  grads = {"kernel": jnp.zeros((3, 3)), "bias": jnp.full(3, 2.0)}
  for t in range(3):
    updates, state = tx.update(grads, state, params)
    peak_fraction = 1.0 if schedule == "constant" else (1 + np.cos(np.pi * t / 10)) / 2
    np.testing.assert_allclose(updates["bias"], -0.05 * 2.0 * peak_fraction, rtol=1e-6)


def test_batch_larger_than_data_is_refused(tmp_path):
  config = Config(dataset="cifar10", **{**SMALL, "batch_size": 128})
  with pytest.raises(ValueError, match="--batch_size=128 is larger than the training set"):
    trainer.train_and_evaluate(config, str(tmp_path), dataset=runs.tiny_dataset(), progress=False)


def test_missing_and_empty_data_folders_are_refused(tmp_path):
  missing = Config(dataset="folder", data_dir=str(tmp_path / "nope"), **SMALL)
  with pytest.raises((ValueError, FileNotFoundError), match="nope"):
    trainer.train_and_evaluate(missing, str(tmp_path / "w1"), progress=False)
  (tmp_path / "empty" / "train").mkdir(parents=True)
  (tmp_path / "empty" / "test").mkdir(parents=True)
  empty = Config(dataset="folder", data_dir=str(tmp_path / "empty"), **SMALL)
  with pytest.raises((ValueError, FileNotFoundError), match="empty|no class|no image"):
    trainer.train_and_evaluate(empty, str(tmp_path / "w2"), progress=False)


def test_launcher_prints_one_clear_line_for_bad_flags(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "experiments.train", f"--workdir={tmp_path}",
       "--method=spherical", "--lam=1e-4"],
      capture_output=True, text=True, timeout=120,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert result.returncode != 0
  assert "--lam=0.0001 has no meaning with --method=spherical" in result.stderr
  assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_group_rules_flag(tmp_path):
  rules = trainer.parse_group_rules(r"convs/\d+/kernel=unit, .*=none")
  assert rules == [(r"convs/\d+/kernel", normreg.UNIT), (".*", None)]
  # Options in parentheses; commas inside parentheses (regex groups, options) stay.
  rules = trainer.parse_group_rules(
      r"blocks/conv/kernel=unit(stack=1),(dense)/(kernel|bias|x{1,2})=tensor(stack=0, "
      r"joint=\1),norms/\d+/(scale|bias)=none")
  assert rules == [("blocks/conv/kernel", normreg.unit(stack=1)),
                   (r"(dense)/(kernel|bias|x{1,2})", normreg.tensor(joint=r"\1")),
                   (r"norms/\d+/(scale|bias)", None)]
  # Output-first layouts (equinox, PyTorch ports): the unit's axis.
  assert trainer.parse_group_rules("conv/weight=unit(axis=0, stack=1),.*=none")[0] == (
      "conv/weight", normreg.unit(stack=1, axis=0))
  for bad, why in (("convs=per-unit", "is not REGEX=unit"), ("a=unit(stack=x)", "integer"),
                   ("a=unit(depth=1)", "is not stack=K, joint=TAG or"),
                   ("a=tensor(axis=0)", "is not stack=K, joint=TAG or"),
                   ("a=unit(axis=x)", "axis must be an integer"),
                   ("a=none(stack=1)", "after unit or tensor")):
    with pytest.raises(ValueError, match=f"--group_rules.*{why}"):
      trainer.parse_group_rules(bad)


def test_scanned_model_trains_with_one_metric_entry_per_block(tmp_path):
  config = Config(dataset="cifar10", **{**SMALL, "model": "scan_cnn", "epochs": 1, "log_every": 2})
  trainer.train_and_evaluate(config, str(tmp_path), dataset=runs.tiny_dataset(), progress=False)
  record = [r for r in runs.read_metrics(tmp_path) if r["kind"] == "train"][-1]
  depth = normreg.models.ScanCNN(width=4, rngs=nnx.Rngs(0)).depth
  assert [f"blocks/conv/kernel/{i}" for i in range(depth)] == sorted(
      k for k in record["layers"] if k.startswith("blocks/"))
  assert "stem_conv/kernel" in record["layers"]
  norms = [record["layers"][f"blocks/conv/kernel/{i}"]["norm"] for i in range(depth)]
  assert len(set(norms)) == depth  # each block its own norm


def test_on_step_sees_every_step_and_exp_lr_logs_its_growing_rate(tmp_path):
  config = Config(dataset="cifar10", method="exp_lr", lam=0.05, momentum=0.0,
                  **{**SMALL, "lr": 0.1, "epochs": 1, "log_every": 1})
  seen = []
  trainer.train_and_evaluate(config, str(tmp_path), dataset=runs.tiny_dataset(),
                             progress=False, on_step=lambda step, state: seen.append(
                                 (step, int(state.step))))
  steps = 64 // 16
  assert seen == [(s, s) for s in range(steps + 1)]
  rates = [r["learning_rate"] for r in runs.read_metrics(tmp_path) if r["kind"] == "train"]
  rho = 1 - 0.1 * 2 * 0.05  # the grouped rate of step t is lr * rho^(-2t-1)
  np.testing.assert_allclose(rates, [0.1 * rho ** (-2 * t - 1) for t in range(steps)],
                             rtol=1e-5)

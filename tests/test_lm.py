"""The language-model task (``--task=lm``) and its data (``experiments.text``).

The data's split is held to the SHA-256 rule written out here; bad folders give
one line naming the file; a tiny model trains through the launcher (library and
command line) from the standard library's sources, starts at the uniform
distribution's 8 bits per byte, and its validation bits per byte match a
recomputation from its final weights with numpy's log-softmax.
"""

import hashlib
import json
import math
import os
import platform

import jax
import numpy as np
import pytest
from flax import nnx

from experiments import tasks
from experiments import text
from experiments import trainer
from experiments.config import Config
from normreg import theory

import runs

TINY_LM = dict(task="lm", seq_len=32, n_layers=1, d_model=32, n_heads=2, batch_size=8,
               train_sequences=64, test_sequences=20, log_every=2)


def _by_hand_in_test(relative: str) -> bool:
  value = int(hashlib.sha256(relative.encode()).hexdigest()[:16], 16)
  return value < text.TEST_FRACTION * 16 ** 16


def test_a_folder_is_split_by_the_hash_of_each_path(tmp_path):
  names = [f"d{i % 3}/f{i}.txt" for i in range(60)]
  for i, name in enumerate(names):
    os.makedirs(tmp_path / os.path.dirname(name), exist_ok=True)
    (tmp_path / name).write_text(f"file {i} " * 40)
  (tmp_path / ".hidden").write_bytes(b"\0binary, but hidden: skipped")
  data = text.load(str(tmp_path), seq_len=16)
  test = sorted(n for n in names if _by_hand_in_test(n))
  assert test and data.test_files == len(test) and data.train_files == len(names) - len(test)
  test_bytes = b"".join((tmp_path / n).read_bytes() for n in test)
  assert data.test_bytes == len(test_bytes)
  np.testing.assert_array_equal(data.test.reshape(-1),
                                np.frombuffer(test_bytes[:data.test.size], np.uint8))
  assert data.train.shape[1] == 17 and data.train.dtype == np.uint8


def test_one_file_is_split_by_its_last_bytes(tmp_path):
  (tmp_path / "a.txt").write_bytes(bytes(range(32, 127)) * 20)
  data = text.load(str(tmp_path / "a.txt"), seq_len=9)
  cut = int(1900 * (1 - text.TEST_FRACTION))
  assert (data.train_bytes, data.test_bytes) == (cut, 1900 - cut)
  assert data.test[0, 0] == (bytes(range(32, 127)) * 20)[cut]


def test_the_standard_library_is_the_offline_default():
  data = text.load(None, seq_len=64)
  assert platform.python_version() in data.source and data.test_files > 0
  root = text.stdlib_root()
  assert data.train_bytes + data.test_bytes == sum(
      os.path.getsize(os.path.join(root, f)) for f in text._files(root, True))  # pylint: disable=protected-access
  assert 0.01 < data.test_bytes / (data.train_bytes + data.test_bytes) < 0.15


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "holds no text"),
    (lambda p: (p / "x.bin").write_bytes(b"ab\0cd"),
     r"x.bin is not text \(a NUL byte at offset 2\)"),
    (lambda p: os.symlink(p / "gone", p / "link.txt"), "cannot read"),
])
def test_a_bad_folder_is_one_line_naming_the_file(tmp_path, make, message):
  make(tmp_path)
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    text.load(str(tmp_path), seq_len=8)
  with pytest.raises(FileNotFoundError, match="--data_dir=.*missing does not exist"):
    text.load(str(tmp_path / "missing"), seq_len=8)


def test_bad_lm_settings_name_the_flag():
  with pytest.raises(ValueError, match="--d_model=30 must be divisible by --n_heads=4"):
    Config(task="lm", d_model=30).validate()
  with pytest.raises(ValueError, match="--seq_len must be > 0"):
    Config(task="lm", seq_len=0).validate()
  with pytest.raises(ValueError, match="--dataset belongs to --task=classification"):
    Config(task="lm", dataset="cifar10").validate()
  with pytest.raises(ValueError, match="--adam_eps must be > 0 and finite, got 0"):
    Config(task="lm", optimizer="adam", adam_eps=0.0).validate()
  with pytest.raises(ValueError, match="--adam_eps must be > 0 and finite, got inf"):
    Config(task="lm", optimizer="adam", adam_eps=math.inf).validate()
  with pytest.raises(ValueError, match="--adam_eps=1e-30 is the epsilon of .* does not use"):
    Config(task="lm", optimizer="sgd", adam_eps=1e-30).validate()
  with pytest.raises(ValueError, match="--adam_eps=1e-30 .*--method=spherical does not use"):
    Config(task="lm", optimizer="adam", method="spherical", adam_eps=1e-30).validate()
  Config(task="lm", optimizer="muon", method="decoupled", adam_eps=1e-30).validate()


@pytest.mark.slow
def test_a_tiny_language_model_trains_from_the_standard_library(tmp_path):
  config = Config(**{**TINY_LM, "log_every": 1}, method="decoupled", optimizer="adam",
                  lr=3e-3, lam=0.1, steps=8, eval_every=4).validate()
  task = tasks.get("lm")
  data = task.load(config)
  state = trainer.train_and_evaluate(config, str(tmp_path), dataset=data, progress=False,
                                     tensorboard=False)
  records = runs.read_metrics(str(tmp_path))
  trains = [r for r in records if r["kind"] == "train"]
  tests = [r for r in records if r["kind"] == "test"]
  # A step's record holds the loss before its update: the first is the model at init,
  # close to uniform over 256 bytes (kernels of std 0.02): 8 bits.
  assert trains[0]["step"] == 1 and abs(trains[0]["bits_per_byte"] - 8.0) < 0.05
  assert trains[0]["loss"] == pytest.approx(trains[0]["bits_per_byte"] * math.log(2), rel=1e-5)
  assert [r["step"] for r in tests] == [4, 8] and tests[-1]["bits_per_byte"] < 8.0
  assert tests[-1]["tokens_per_sec"] > 0 and "images_per_sec" not in tests[-1]
  # The validation's sums against the final weights and numpy's log-softmax.
  model = nnx.merge(trainer.initial_state(config, data)[0].eval_graphdef, state.params,
                    state.rest)
  tokens = data.test.astype(np.int32)
  logits = np.asarray(jax.jit(lambda x: model(x))(tokens[:, :-1]), np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  nats = -np.take_along_axis(logp, tokens[:, 1:, None], -1).mean()
  assert tests[-1]["bits_per_byte"] == pytest.approx(nats / math.log(2), rel=1e-5)
  # The scale-invariant weights of the sandwich block were found and are measured.
  layers = trains[-1]["layers"]
  for name in ("attn/q", "attn/k", "attn/v", "attn/o", "mlp/up", "mlp/down"):
    assert any(name in layer for layer in layers), (name, sorted(layers))
  assert not any("gate" in layer or "embed" in layer for layer in layers)
  with open(tmp_path / "data.json") as f:
    described = json.load(f)
  assert described["train_sequences"] == 64 and platform.python_version() in (
      described["source"])


@pytest.mark.slow
def test_the_launcher_trains_a_language_model_offline(tmp_path):
  """``--model=lm`` is ``--task=lm`` (the issue's command)."""
  result = runs.command("experiments.train", f"--workdir={tmp_path}", "--model=lm",
                        "--seq_len=32", "--n_layers=1", "--d_model=32", "--n_heads=2",
                        "--batch_size=8", "--train_sequences=48", "--test_sequences=16",
                        "--steps=4", "--method=spherical", "--lr=0.05", "--nofigures")
  assert result.returncode == 0, result.stderr[-3000:]
  last = result.stdout.strip().splitlines()[-1]
  assert last.startswith("test bits_per_byte "), last
  with open(tmp_path / "config.json") as f:
    saved = json.load(f)
  assert saved["task"] == "lm" and saved["model"] == "cnn"  # (the classifier's own default)


def test_model_lm_with_another_task_is_one_line(tmp_path):
  result = runs.command("experiments.train", f"--workdir={tmp_path}", "--model=lm",
                        "--task=classification")
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1] == (
      "experiments.train: error: --model=lm is --task=lm; it cannot go with "
      "--task=classification.")


@pytest.mark.slow
def test_every_launcher_method_trains_the_language_model(tmp_path):
  """Each ``--method`` of the registry, on its own base optimizer and schedule where it
  needs one, takes finite steps on the LM's groups and measures every grouped weight."""
  from experiments import methods  # pylint: disable=g-import-not-at-top
  base = dict(TINY_LM, seq_len=16, d_model=16, steps=3, log_every=1, test_sequences=8)
  data = tasks.get("lm").load(Config(**base))
  names = set()
  for name in methods.names():
    method = methods.get(name)
    optimizer = method.optimizer or ("adam" if name in ("decoupled", "adamp") else "sgd")
    config = Config(**base, method=name, optimizer=optimizer,
                    lr=3e-3 if optimizer == "adam" else 0.05,
                    **({"schedule": method.schedule} if method.schedule else {})).validate()
    trainer.train_and_evaluate(config, str(tmp_path / name), dataset=data, progress=False,
                               tensorboard=False)
    records = runs.read_metrics(str(tmp_path / name))
    test = [r for r in records if r["kind"] == "test"][-1]
    assert math.isfinite(test["bits_per_byte"]) and test["bits_per_byte"] < 8.1, name
    layers = [r for r in records if r["kind"] == "train"][-1]["layers"]
    assert all(math.isfinite(v) for layer in layers.values() for v in layer.values()), name
    names.add(tuple(sorted(layers)))
  assert len(names) == 1  # every method measures the same grouped weights
  # Muon (orthogonalized momentum on each head's q, k, v, on o and the MLP; Adam on the
  # rest) with decoupled decay on the invariant weights: it learns within the 3 steps.
  config = Config(**base, method="decoupled", optimizer="muon", lr=0.02, lam=0.1).validate()
  trainer.train_and_evaluate(config, str(tmp_path / "muon"), dataset=data, progress=False,
                             tensorboard=False)
  records = runs.read_metrics(str(tmp_path / "muon"))
  assert [r for r in records if r["kind"] == "test"][-1]["bits_per_byte"] < 7.5
  # Rotational on Muon: each grouped weight turns by arctan of the target, Muon's
  # equilibrium angle with this lr and lam, sqrt(2 lr lam / S), from its first step.
  config = Config(**base, method="rotational", optimizer="muon", lr=0.02, lam=0.1).validate()
  trainer.train_and_evaluate(config, str(tmp_path / "rotational_muon"), dataset=data,
                             progress=False, tensorboard=False)
  first = [r for r in runs.read_metrics(str(tmp_path / "rotational_muon"))
           if r["kind"] == "train"][0]
  target = math.atan(math.sqrt(2 * 0.02 * 0.1 / theory.muon_update_statistics()[1]))
  assert first["step"] == 1
  for name, layer in first["layers"].items():
    assert layer["angle"] == pytest.approx(target, rel=1e-3), name


def test_muon_is_optax_muon_on_the_matrices_and_adam_on_the_rest():
  """``--optimizer=muon`` with ``--method=none`` steps as ``optax.contrib.muon`` itself
  (the default task's matrices are optax's: the 2-D leaves)."""
  import optax  # pylint: disable=g-import-not-at-top
  import normreg  # pylint: disable=g-import-not-at-top
  from experiments import methods  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  params = {"w": rng.standard_normal((8, 6)), "v": rng.standard_normal((6, 5)),
            "b": rng.standard_normal(6)}
  params = jax.tree.map(lambda a: a.astype(np.float32), params)
  groups = normreg.groups_from_rules(params, [(".*", None)])
  config = Config(method="none", optimizer="muon", lr=0.02).validate()
  ours = methods.make_optimizer(config, groups, optax.constant_schedule(0.02))
  reference = optax.contrib.muon(0.02)
  states = [ours.init(params), reference.init(params)]
  for step in range(3):
    grads = jax.tree.map(lambda a, s=step: np.sin(a * (s + 1)).astype(np.float32), params)
    (u, states[0]), (r, states[1]) = (tx.update(grads, s, params)
                                      for tx, s in zip((ours, reference), states))
    for name in params:
      np.testing.assert_allclose(u[name], r[name], rtol=1e-5, atol=1e-7)
  # The matrices' steps are orthogonalized: 5 Newton-Schulz steps with Muon's coefficients
  # leave the singular values within about [0.7, 1.2] of one scale, where the gradient's
  # spread over more than that.
  spread = lambda a: (lambda s: s.max() / s.min())(np.linalg.svd(np.asarray(a), compute_uv=False))
  assert spread(u["w"]) < 2.0 < spread(grads["w"])
  with pytest.raises(ValueError, match="--method=spherical has no Muon form yet"):
    Config(method="spherical", optimizer="muon").validate()


def test_decay_on_every_matrix_against_decay_on_the_invariant_weights():
  """``--decay_all_matrices`` (AdamW as usually run) adds ``lr * lam * w`` to the step of
  every parameter of two or more dimensions; without it, of the grouped weights only
  (which include a 1-D norm scale here: the attention pre-norm's, whose every output
  is normalized again)."""
  import optax  # pylint: disable=g-import-not-at-top
  from experiments import methods, network  # pylint: disable=g-import-not-at-top
  base = Config(**TINY_LM, method="decoupled", optimizer="adam", lr=0.01, lam=0.5)
  data = tasks.get("lm").load(base)
  model = network.init_model(base, data)
  params = model.params
  grads = jax.tree.map(lambda w: np.cos(np.asarray(w)).astype(np.float32), params)
  steps = {}
  for every in (False, True):
    config = Config(**{**TINY_LM, "method": "decoupled", "optimizer": "adam", "lr": 0.01,
                       "lam": 0.5, "decay_all_matrices": every}).validate()
    tx = methods.make_optimizer(config, model.groups, optax.constant_schedule(0.01))
    steps[every] = tx.update(grads, tx.init(params), params)[0]
  flat = lambda tree: dict((trainer.normreg.groups.path_str(p), np.asarray(x)) for p, x in
                           jax.tree_util.tree_leaves_with_path(tree))
  grouped = {name for name, g in trainer.normreg.groups.groups_by_path(
      model.groups, "test").items() if g is not None}
  w, only, every = flat(params), flat(steps[False]), flat(steps[True])
  for name in w:
    decayed = (w[name].ndim >= 2) - (name in grouped)  # with the flag, less without it
    np.testing.assert_allclose(every[name] - only[name], -0.01 * 0.5 * decayed * w[name],
                               rtol=1e-4, atol=1e-8, err_msg=name)
  # Each case is there: embed, head and gate (matrices, not invariant); the pre-norm's
  # scale (invariant, a vector); q, k, v, o, up, down (both).
  kinds = {((w[n].ndim >= 2), n in grouped) for n in w}
  assert kinds >= {(True, False), (False, True), (True, True)}, kinds
  with pytest.raises(ValueError, match="--decay_all_matrices .*needs --method=decoupled"):
    Config(method="l2", decay_all_matrices=True).validate()


@pytest.mark.slow
def test_a_catalog_text_data_set_is_read_with_tfds(tmp_path):
  """``--corpus=tiny_shakespeare`` under ``tfds.testing.mock_data`` (no download): its
  train and test splits, each example's text and a newline."""
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=3):
    source = tfds.data_source("tiny_shakespeare", split="test")
    texts = [source[i]["text"] for i in range(len(source))]  # str or bytes, as tfds gives
    expected = b"".join((t.encode() if isinstance(t, str) else bytes(t)) + b"\n"
                        for t in texts)
    data = text.load(None, seq_len=8, corpus="tiny_shakespeare")
    config = Config(task="lm", corpus="tiny_shakespeare", seq_len=8, n_layers=1, d_model=16,
                    n_heads=2, batch_size=2, steps=2, test_sequences=0,
                    method="none").validate()
    trainer.train_and_evaluate(config, str(tmp_path), progress=False, tensorboard=False)
  assert data.test_bytes == len(expected) and "tiny_shakespeare" in data.source
  np.testing.assert_array_equal(data.test.reshape(-1),
                                np.frombuffer(expected[:data.test.size], np.uint8))
  assert [r["kind"] for r in runs.read_metrics(str(tmp_path))][-1] == "test"
  with pytest.raises(ValueError, match="--corpus=files needs --data_dir"):
    text.load(None, seq_len=8, corpus="files")
  with pytest.raises(ValueError, match="give --corpus=files to read it"):
    Config(task="lm", data_dir=str(tmp_path)).validate()

"""experiments.sweep: a grid of recipes trained as one vmapped, jitted program.

The key property: every run of a sweep ends where the same Config trained
alone by ``trainer.train_and_evaluate`` ends (params, BatchNorm statistics and
metrics.jsonl, to float tolerance), whatever the chunking. CPU-sized: a width-4
CNN on 64 random 8x8 images, batch 16, 2 epochs.
"""

import dataclasses
import json
import os
import subprocess
import sys

import chex
import numpy as np
import pytest

from experiments import plot
from experiments import sweep
from experiments import steps as steps_lib
from experiments import trainer
from experiments.config import Config

import runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(dataset="cifar10", model="cnn", width=4, epochs=2, batch_size=16, log_every=2)
TOL = dict(rtol=1e-5, atol=1e-5)  # vmapped convs sum in another order


def _assert_same_records(swept, alone):
  assert [(r["kind"], r["step"], r["epoch"]) for r in swept] == \
      [(r["kind"], r["step"], r["epoch"]) for r in alone]
  for a, b in zip(swept, alone):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5, atol=1e-6)
    assert a["accuracy"] == pytest.approx(b["accuracy"], abs=1e-6)
    if a["kind"] == "train":
      assert a["learning_rate"] == b["learning_rate"]
      assert a["layers"].keys() == b["layers"].keys() and a["layers"]
      chex.assert_trees_all_close(a["layers"], b["layers"], rtol=1e-4, atol=1e-7)


@pytest.fixture(scope="module")
def dataset():
  return runs.tiny_dataset()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
  """64 train and 32 test random 8x8 PNGs in 4 class folders (for --dataset=folder)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  root = str(tmp_path_factory.mktemp("images"))
  rng = np.random.default_rng(0)
  for split, n in (("train", 64), ("test", 32)):
    for i in range(n):
      folder = os.path.join(root, split, f"c{i % 4}")
      os.makedirs(folder, exist_ok=True)
      Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
          os.path.join(folder, f"{i}.png"))
  return root


@pytest.fixture(scope="module")
def l2_sweep(tmp_path_factory, dataset):
  """2 lrs x 2 lams of coupled L2 with SGD momentum 0.9, one program, all runs vmapped (the default)."""
  configs = sweep.grid(Config(method="l2", optimizer="sgd", momentum=0.9, **SMALL),
                       lrs=[0.05, 0.1], lams=[1e-4, 5e-4], seeds=[0])
  workdir = str(tmp_path_factory.mktemp("l2_sweep"))
  states = sweep.train_grid(configs, workdir, dataset=dataset, vmap_size=0, strategy="vmap",
                            progress=False)
  return configs, workdir, states


@pytest.mark.slow
def test_every_vmapped_run_equals_the_run_alone(l2_sweep, dataset, tmp_path):
  configs, workdir, states = l2_sweep
  names = sweep.run_names(configs)
  assert names[1] == "method=l2_lr=0.05_lam=0.0005_seed=0"
  assert sorted(os.listdir(workdir)) == sorted(names)
  for config, name, state in zip(configs, names, states):
    alone = trainer.train_and_evaluate(config, str(tmp_path / name), dataset=dataset,
                                       progress=False)
    chex.assert_trees_all_close(state.params, alone.params, **TOL)
    chex.assert_trees_all_close(state.rest, alone.rest, **TOL)
    # The injected chain's inner state is the single run's optimizer state: the momentum,
    # a sum of gradients (not scaled by the lr, so its float noise is larger).
    chex.assert_trees_all_close(state.opt_state.inner_state, alone.opt_state,
                                rtol=1e-4, atol=1e-5)
    assert int(state.step) == int(alone.step) == 8
    _assert_same_records(runs.read_metrics(os.path.join(workdir, name)),
                         runs.read_metrics(str(tmp_path / name)))
    with open(os.path.join(workdir, name, "config.json")) as f:
      assert json.load(f) == dataclasses.asdict(config)


@pytest.mark.slow
@pytest.mark.parametrize("max_runs, vmap_size", [(2, 0), (3, 1), (4, 2)])
def test_chunks_and_lax_map_equal_one_vmapped_program(l2_sweep, dataset, tmp_path, max_runs,
                                                      vmap_size):
  # (2, 0): two chunks of 2, vmapped; (3, 1): at most 3 a chunk gives two of 2, each
  # looped one run at a time by lax.map; (4, 2): one chunk, lax.map over
  # two vmapped pairs.
  configs, _, states = l2_sweep
  chunked = sweep.train_grid(configs, str(tmp_path), dataset=dataset, strategy="vmap",
                             max_runs_per_chunk=max_runs, vmap_size=vmap_size, progress=False)
  for state, expected in zip(chunked, states):
    chex.assert_trees_all_close(state.params, expected.params, **TOL)
    chex.assert_trees_all_close(state.rest, expected.rest, **TOL)


@pytest.mark.slow
def test_rerun_skips_complete_runs_and_refuses_other_settings(l2_sweep, dataset):
  configs, workdir, _ = l2_sweep
  before = {n: runs.read_metrics(os.path.join(workdir, n)) for n in sweep.run_names(configs)}
  assert sweep.train_grid(configs, workdir, dataset=dataset, progress=False) == [None] * 4
  assert before == {n: runs.read_metrics(os.path.join(workdir, n)) for n in before}
  other = [dataclasses.replace(c, epochs=3) for c in configs]
  with pytest.raises(ValueError, match="holds a run with other settings"):
    sweep.train_grid(other, workdir, dataset=dataset, progress=False)


@pytest.mark.slow
def test_spherical_grid_over_lr_and_seed_with_a_subset_per_seed(image_folder, tmp_path):
  # --train_size draws each seed's own subset: the runs' data is stacked, not shared.
  base = Config(**{**SMALL, "dataset": "folder", "data_dir": image_folder, "train_size": 48,
                   "method": "spherical"})
  configs = sweep.grid(base, lrs=[0.05, 0.1], seeds=[0, 1])
  assert [(c.lr, c.seed, c.lam) for c in configs] == [
      (0.05, 0, None), (0.05, 1, None), (0.1, 0, None), (0.1, 1, None)]
  states = sweep.train_grid(configs, str(tmp_path / "sweep"), progress=False)
  # Another seed is another init, subset, data order and augmentation: as the run alone.
  alone = trainer.train_and_evaluate(configs[3], str(tmp_path / "alone"), progress=False)
  chex.assert_trees_all_close(states[3].params, alone.params, **TOL)
  name = sweep.run_names(configs)[3]
  assert name == "method=spherical_lr=0.1_seed=1"
  _assert_same_records(runs.read_metrics(str(tmp_path / "sweep" / name)),
                       runs.read_metrics(str(tmp_path / "alone")))


@pytest.mark.parametrize("kwargs, flag", [
    (dict(lrs=[]), "--lr is empty"),
    (dict(lrs=[0.1, -0.1]), "--lr must be > 0"),
    (dict(lrs=[0.1, 0.1]), "--lr lists 0.1 more than once"),
    (dict(lrs=[0.1], seeds=[]), "--seed is empty"),
    (dict(lrs=[0.1], lams=[1e-4], methods=["spherical"]), "--lam=0.0001 has no meaning"),
    (dict(lrs=[0.1], lams=[-1.0]), "--lam must be >= 0"),
    (dict(lrs=[0.1], methods=["adamw"]), "--method='adamw' is not one of"),
])
def test_bad_grid_is_refused_naming_the_flag(kwargs, flag):
  with pytest.raises(ValueError, match=flag):
    sweep.grid(Config(method="l2", **SMALL), **kwargs)


def test_bad_runs_are_refused_before_training(dataset, tmp_path):
  big = sweep.grid(Config(**{**SMALL, "batch_size": 128}), lrs=[0.1])
  with pytest.raises(ValueError, match="--batch_size=128 is larger than the training set"):
    sweep.train_grid(big, str(tmp_path), dataset=dataset, progress=False)
  with pytest.raises(ValueError, match="--max_runs_per_chunk must be > 0"):
    sweep.train_grid(big, str(tmp_path), dataset=dataset, max_runs_per_chunk=0)
  with pytest.raises(ValueError, match="--vmap_size must be >= 0"):
    sweep.train_grid(big, str(tmp_path), dataset=dataset, vmap_size=-1)
  with pytest.raises(ValueError, match="empty"):
    sweep.train_grid([], str(tmp_path), dataset=dataset)
  assert not os.listdir(tmp_path)


def test_mixed_methods_give_lam_only_to_the_methods_that_have_one():
  configs = sweep.grid(Config(**SMALL), lrs=[0.1], lams=[1e-4, 5e-4],
                       methods=["l2", "spherical"])
  assert sweep.run_names(configs) == ["method=l2_lr=0.1_lam=0.0001_seed=0",
                                      "method=l2_lr=0.1_lam=0.0005_seed=0",
                                      "method=spherical_lr=0.1_seed=0"]


def test_chunk_planning():
  assert [list(c) for c in sweep.plan_chunks(3, 2)] == [[0, 1], [2]]
  assert [len(c) for c in sweep.plan_chunks(17, 16)] == [9, 8]
  assert [len(c) for c in sweep.plan_chunks(4, 16)] == [4]
  # 1 GiB per run and 4.5 GiB free: 4 runs of the 16 asked for.
  assert sweep.fit_chunk(16, lambda n: n * 2**30, int(4.5 * 2**30)) == 4
  assert sweep.fit_chunk(16, lambda n: n * 2**30, None) == 16
  assert sweep.fit_chunk(16, lambda n: None, 2**30) == 16


@pytest.mark.slow
def test_command_line_writes_run_folders_and_survives_a_diverged_run(image_folder, tmp_path):
  workdir = tmp_path / "runs"
  result = subprocess.run(
      [sys.executable, "-m", "experiments.sweep", f"--workdir={workdir}", "--train_size=32",
       "--dataset=folder", f"--data_dir={image_folder}", "--model=cnn", "--width=4",
       "--epochs=1", "--batch_size=16", "--log_every=1", "--norm=none", "--momentum=0",
       "--method=l2", "--lam=1e-4", "--lr=0.05,1e30", "--seed=0"],
      capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  good, bad = "method=l2_lr=0.05_lam=0.0001_seed=0", "method=l2_lr=1e+30_lam=0.0001_seed=0"
  assert sorted(os.listdir(workdir)) == [good, bad]
  records = runs.read_metrics(str(workdir / good))
  assert [(r["kind"], r["step"]) for r in records] == [("train", 1), ("train", 2), ("test", 2)]
  run = plot.read_run(str(workdir / good))
  assert run.config["lr"] == 0.05 and run.config["lam"] == 0.0001
  with open(workdir / bad / "diverged.txt") as f:
    assert "non-finite at step" in f.read()


@pytest.mark.slow
def test_init_scale_is_applied_as_in_the_run_alone(dataset, tmp_path):
  # --init_scale multiplies the grouped weights at init: a sweep's run starts there too.
  configs = sweep.grid(Config(method="l2", init_scale=4.0, **{**SMALL, "epochs": 1}),
                       lrs=[0.1], lams=[5e-4])
  swept = sweep.train_grid(configs, str(tmp_path / "sweep"), dataset=dataset, progress=False)
  alone = trainer.train_and_evaluate(configs[0], str(tmp_path / "alone"), dataset=dataset,
                                     progress=False)
  chex.assert_trees_all_close(swept[0].params, alone.params, **TOL)
  _assert_same_records(runs.read_metrics(str(tmp_path / "sweep" / sweep.run_names(configs)[0])),
                       runs.read_metrics(str(tmp_path / "alone")))


@pytest.mark.slow
def test_sequential_strategy_equals_the_vmapped_one(l2_sweep, dataset, tmp_path):
  configs, workdir, states = l2_sweep
  seq = sweep.train_grid(configs, str(tmp_path), dataset=dataset, strategy="sequential",
                         max_runs_per_chunk=3, progress=False)
  for state, expected, name in zip(seq, states, sweep.run_names(configs)):
    chex.assert_trees_all_close(state.params, expected.params, **TOL)
    _assert_same_records(runs.read_metrics(str(tmp_path / name)),
                         runs.read_metrics(os.path.join(workdir, name)))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["vmap", "sequential"])
def test_the_grid_traces_its_step_once(dataset, tmp_path, monkeypatch, strategy):
  # Every trace of the jitted step builds the single-run step once: count the builds.
  calls = []
  original = steps_lib.make_task_train_step
  monkeypatch.setattr(steps_lib, "make_task_train_step",
                      lambda *a, **k: calls.append(1) or original(*a, **k))
  configs = sweep.grid(Config(method="l2", **{**SMALL, "epochs": 1}), lrs=[0.05, 0.1],
                       lams=[1e-4, 5e-4], seeds=[0])
  sweep.train_grid(configs, str(tmp_path), dataset=dataset, strategy=strategy,
                   max_runs_per_chunk=2, progress=False)  # two chunks of two
  assert len(calls) == 1


METHODS = [("l2", "sgd"), ("decoupled", "sgd"), ("spherical", "sgd"), ("elr_rescale", "sgd"),
           ("tangent", "sgd"), ("none", "sgd"), ("l2", "adam"), ("decoupled", "adam"),
           ("spherical", "adam"), ("elr_rescale", "adam"), ("tangent", "adam")]


@pytest.mark.slow
def test_every_method_and_optimizer_swept_equals_the_run_alone(dataset, tmp_path):
  base = Config(**{**SMALL, "epochs": 1, "log_every": 4})
  configs = []
  for method, optimizer in METHODS:
    lam = 1e-3 if method in ("l2", "decoupled") else None
    configs.append(dataclasses.replace(base, method=method, optimizer=optimizer,
                                       lr=0.05 if optimizer == "sgd" else 0.01, lam=lam))
  names = [f"{c.method}_{c.optimizer}" for c in configs]
  swept = []
  for name, config in zip(names, configs):  # one program per run: sequential is one step
    swept += sweep.train_grid([config], str(tmp_path / "sweep" / name), dataset=dataset,
                              strategy="sequential", progress=False)
  for name, config, state in zip(names, configs, swept):
    alone = trainer.train_and_evaluate(config, str(tmp_path / "alone" / name), dataset=dataset,
                                       progress=False, tensorboard=False)
    chex.assert_trees_all_close(state.params, alone.params, **TOL, custom_message=name)
    run = sweep.run_names([config])[0]
    _assert_same_records(runs.read_metrics(str(tmp_path / "sweep" / name / run)),
                         runs.read_metrics(str(tmp_path / "alone" / name)))


@pytest.mark.slow
@pytest.mark.parametrize("slow", ["vmap", "sequential"])
def test_auto_keeps_the_faster_strategy(dataset, tmp_path, monkeypatch, slow):
  import time  # pylint: disable=g-import-not-at-top
  cls = sweep.STRATEGIES[slow]
  original = cls.step
  monkeypatch.setattr(cls, "step", lambda self, idx: time.sleep(0.2) or original(self, idx))
  configs = sweep.grid(Config(method="l2", **{**SMALL, "epochs": 1}), lrs=[0.05, 0.1])
  datasets = [dataset] * 2
  program = sweep.make_program(configs, datasets)
  chosen, seconds = sweep.choose_strategy(program, configs, datasets, 2)
  assert chosen != slow and set(seconds) == {"vmap", "sequential"}
  assert seconds[slow] > seconds[chosen]


def test_chunks_shrink_until_the_compiled_step_fits_the_free_memory(dataset, monkeypatch):
  """XLA's memory analysis of the real compiled vmapped step (CPU reports it too), against
  a free-memory budget between what 2 and what 3 runs need."""
  configs = sweep.grid(Config(method="l2", **{**SMALL, "epochs": 1}),
                       lrs=[0.01, 0.02, 0.05, 0.1])
  datasets = [dataset] * 4
  program = sweep.make_program(configs, datasets)
  data = sweep._chunk_data(datasets[:1], per_run=False)
  bytes_for = sweep._step_bytes(program, sweep.init_state(program, configs[0], dataset), data)
  need = {n: bytes_for(n) for n in (1, 2, 3, 4)}
  assert need[1] < need[2] < need[3] < need[4]  # more runs, more memory
  budget = (need[2] + need[3]) / 2 / sweep.MEMORY_FRACTION
  monkeypatch.setattr(sweep, "device_free_bytes", lambda device=None: int(budget))
  assert sweep._chunk_size(program, configs, datasets, None) == 2
  monkeypatch.setattr(sweep, "device_free_bytes", lambda device=None: None)
  assert sweep._chunk_size(program, configs, datasets, None) == 4  # CPU: the flag decides
  assert sweep._chunk_size(program, configs, datasets, 3) == 3


def test_bad_strategy_is_refused(dataset, tmp_path):
  with pytest.raises(ValueError, match="--strategy='fast' is not one of auto, vmap, sequential"):
    sweep.train_grid(sweep.grid(Config(**SMALL), lrs=[0.1]), str(tmp_path), dataset=dataset,
                     strategy="fast")

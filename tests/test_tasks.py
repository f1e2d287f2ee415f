"""experiments.tasks: the task registry, one training loop, and budgets in steps.

A toy task, regression on random features, is registered in one place
(``tests/toy_task.py``) and trains through the launcher's trainer, a resume, the
sweep (both strategies), the figures and the run cache, and through the command
lines of the launcher and the sweep (``--task_module=toy_task``); its test records
are checked against a numpy forward pass of the final weights. Budgets in
steps (``--steps``, ``--eval_every``, ``--checkpoint_every``) are checked on the
classification task, as is an exact resume from a step inside an epoch. A grep
keeps the generic modules free of image-classification words.
"""

import dataclasses
import json
import os
import pickle
import re

import chex
import jax
import numpy as np
import pytest
from flax import nnx

from experiments import cache as cache_lib
from experiments import plot
from experiments import sweep
from experiments import tasks
from experiments import trainer
from experiments.config import Config

import runs
import toy_task


# The toy task lives in one place, tests/toy_task.py.
TOY = toy_task.TOY
BASE = dict(task="toy_regression", method="l2", lr=0.05, lam=1e-3, batch_size=16, epochs=3,
            log_every=2)


@pytest.fixture
def toy():
  return tasks.get(TOY.name)  # registered by importing toy_task


def _numpy_rmse(params, test) -> float:
  """The network's test RMSE by hand, in numpy (float64), from the final weights."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(params))
  h = test["x"] @ p["inner"]["kernel"]
  h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-6)
  out = np.maximum(h, 0) @ p["outer"]["kernel"][:, 0] + p["outer"]["bias"][0]
  return float(np.sqrt(np.mean((out - test["y"]) ** 2)))


@pytest.mark.slow
def test_a_registered_task_trains_through_train_resume_sweep_plot_and_cache(toy, tmp_path):
  config = Config(**BASE).validate()
  assert type(config).__name__ == "ToyRegressionConfig" and config.rows == 100
  data = toy.load(config)
  state = trainer.train_and_evaluate(config, str(tmp_path / "alone"), dataset=data,
                                     progress=False)
  records = runs.read_metrics(str(tmp_path / "alone"))
  tests = [r for r in records if r["kind"] == "test"]
  # 100 rows in batches of 16: 6 steps an epoch, 3 epochs, a test record per epoch.
  assert [(r["step"], r["epoch"]) for r in tests] == [(6, 1), (12, 2), (18, 3)]
  assert all(r["rows_per_sec"] > 0 and "images_per_sec" not in r for r in tests)
  # The evaluation (33 test rows: the last batch padded) against numpy's forward pass.
  assert tests[-1]["rmse"] == pytest.approx(_numpy_rmse(state.params, data[1]), rel=1e-4)
  assert tests[-1]["rmse"] < toy.chance(data)  # it learned
  # The LayerNorm makes the first layer scale-invariant: the groups were found.
  layers = [r for r in records if r["kind"] == "train"][-1]["layers"]
  assert any(name.startswith("inner/kernel") for name in layers), layers
  # TensorBoard has every number the records have.
  from experiments import records as records_lib  # pylint: disable=g-import-not-at-top
  tags = records_lib.read_events(str(tmp_path / "alone" / "tensorboard"))
  assert {"test/rmse", "test/rows_per_sec", "train/loss", "train/grad_norm"} <= set(tags)
  # Figures and the launcher's last line read the task's headline.
  run = plot.read_run(str(tmp_path / "alone"))
  assert "rmse.png" in plot.make_figures([run]) and "accuracy.png" not in plot.make_figures(
      [run])

  # Resume: killed after step 8 (checkpoint at step 6), then the same call goes on.
  trainer.train_and_evaluate(config, str(tmp_path / "resumed"), dataset=data, progress=False,
                             interrupt_after_step=8)
  resumed = trainer.train_and_evaluate(config, str(tmp_path / "resumed"), dataset=data,
                                       progress=False)
  chex.assert_trees_all_equal(resumed.params, state.params)
  drop = lambda rs: [{k: v for k, v in r.items() if not k.endswith("_per_sec")} for r in rs]
  assert drop(runs.read_metrics(str(tmp_path / "resumed"))) == drop(records)

  # The sweep, both strategies: the lr=0.05 run ends where the run alone ended.
  for strategy in ("sequential", "vmap"):
    configs = sweep.grid(config, lrs=[0.05, 0.1], seeds=[0])
    finals = sweep.train_grid(configs, str(tmp_path / strategy), dataset=data,
                              strategy=strategy, progress=False)
    chex.assert_trees_all_close(finals[0].params, state.params, atol=1e-5, rtol=1e-5)
    name = sweep.run_names(configs)[0]
    swept = [r for r in runs.read_metrics(str(tmp_path / strategy / name)) if r["kind"] == "test"]
    assert [r["step"] for r in swept] == [6, 12, 18]
    assert swept[-1]["rmse"] == pytest.approx(tests[-1]["rmse"], rel=1e-4)

  # The run cache scores runs by the task's headline, and a diverged one at its chance.
  cache = cache_lib.RunCache(str(tmp_path / "cache"), data, config, seeds=[0])
  cached = cache.train("a", config)
  assert cache.final_score(cached) == pytest.approx(tests[-1]["rmse"], rel=1e-6)
  diverged = cache.train("b", dataclasses.replace(config, lr=1e6, lam=None))
  assert cache_lib.diverged(diverged) and cache.final_score(diverged) == toy.chance(data)


def test_a_task_option_is_a_setting_and_a_flag(toy):
  del toy
  config = Config(**BASE, features=3)
  assert config.features == 3 and dataclasses.replace(config, lr=0.1).features == 3
  assert json.loads(config.to_json())["features"] == 3
  assert Config.from_dict(json.loads(config.to_json())) == config
  assert pickle.loads(pickle.dumps(config)) == config
  with pytest.raises(ValueError, match="--rows must be > 0"):
    Config(**BASE, rows=0).validate()
  # The classification task's flags are refused with another task, and the reverse.
  with pytest.raises(ValueError, match="--dataset belongs to --task=classification"):
    Config(**BASE, dataset="cifar10").validate()
  with pytest.raises(TypeError):
    Config(features=3)  # not a setting of the default task
  assert "toy_regression (regression on random features (a test))" in tasks.help_text()


@pytest.mark.slow
def test_the_command_lines_train_a_task_named_by_its_module(tmp_path):
  """``--task_module=toy_task`` registers the task before the flags are parsed: its
  options are flags of the launcher and of the sweep, and the last line names its
  headline."""
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      [os.path.dirname(os.path.abspath(__file__)), os.environ.get("PYTHONPATH", "")])}
  common = ["--task_module=toy_task", "--task=toy_regression", "--rows=64", "--features=4",
            "--batch_size=16", "--log_every=2", "--method=spherical"]
  result = runs.command("experiments.train", f"--workdir={tmp_path / 'run'}", "--steps=6",
                        "--eval_every=3", "--lr=0.05", "--nofigures", *common, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  tests = [r for r in runs.read_metrics(str(tmp_path / "run")) if r["kind"] == "test"]
  assert [r["step"] for r in tests] == [3, 6] and "rows_per_sec" in tests[-1]
  last = result.stdout.strip().splitlines()[-1]
  assert last.startswith(f"test rmse {tests[-1]['rmse']:.4f} after 1.5 epochs (6 steps"), last
  with open(tmp_path / "run" / "config.json") as f:
    assert json.load(f)["rows"] == 64
  result = runs.command("experiments.sweep", f"--workdir={tmp_path / 'sweep'}", "--epochs=1",
                        "--lr=0.05,0.1", "--strategy=sequential", *common, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert sorted(os.listdir(tmp_path / "sweep")) == ["method=spherical_lr=0.05_seed=0",
                                                     "method=spherical_lr=0.1_seed=0"]
  # An option of the toy task with the default task, and a module that cannot be
  # imported: one line each, naming the flag.
  result = runs.command("experiments.train", f"--workdir={tmp_path / 'bad'}",
                        "--task_module=toy_task", "--rows=64", env=env)
  runs.one_line(result, "experiments.train", "--rows belongs to --task=toy_regression")
  result = runs.command("experiments.train", f"--workdir={tmp_path / 'bad'}",
                        "--task_module=no_such_module", env=env)
  runs.one_line(result, "experiments.train", "--task_module=no_such_module: cannot import")


def test_an_unknown_task_is_refused_naming_the_flag():
  for make in (lambda: Config(task="nope"), lambda: dataclasses.replace(Config(), task="nope")):
    with pytest.raises(ValueError, match="--task='nope' is not one of classification"):
      make()


def test_a_task_name_is_registered_once():
  with pytest.raises(ValueError, match="--task=classification is already registered"):
    tasks.register(tasks.get("classification"))


# ------------------------------------------------------------------------ budgets in steps


@pytest.mark.slow
def test_steps_eval_every_and_checkpoint_every_and_an_exact_resume_from_any_step(tmp_path):
  ds = runs.tiny_dataset()  # 64 images, batch 16: 4 steps an epoch
  config = Config(**{**runs.TINY, "epochs": 1}, steps=10, eval_every=3,
                  checkpoint_every=2).validate()
  whole = trainer.train_and_evaluate(config, str(tmp_path / "whole"), dataset=ds,
                                     progress=False, tensorboard=False)
  records = runs.read_metrics(str(tmp_path / "whole"))
  tests = [(r["step"], r["epoch"]) for r in records if r["kind"] == "test"]
  assert tests == [(3, 0.75), (6, 1.5), (9, 2.25), (10, 2.5)]  # --steps wins over --epochs
  trains = [r["step"] for r in records if r["kind"] == "train"]
  assert trains == [2, 3, 4, 6, 8, 9, 10]  # --log_every, epochs' ends, evaluations
  saved = sorted(int(p) for p in os.listdir(tmp_path / "whole" / "checkpoints") if p.isdigit())
  assert saved[-1] == 10
  # Killed after step 5 (saved at 4, inside the second epoch), resumed by the same call:
  # the data order and the augmentation go on where they stopped, bit for bit.
  trainer.train_and_evaluate(config, str(tmp_path / "cut"), dataset=ds, progress=False,
                             tensorboard=False, interrupt_after_step=5)
  cut = trainer.train_and_evaluate(config, str(tmp_path / "cut"), dataset=ds, progress=False,
                                   tensorboard=False)
  chex.assert_trees_all_equal(cut.params, whole.params)
  chex.assert_trees_all_equal(cut.opt_state, whole.opt_state)
  drop = lambda rs: [{k: v for k, v in r.items() if k != "images_per_sec"} for r in rs]
  assert drop(runs.read_metrics(str(tmp_path / "cut"))) == drop(records)
  # Asking for fewer steps than the folder holds is refused, naming --steps.
  with pytest.raises(ValueError, match="--steps=4: .* already holds step 10"):
    trainer.train_and_evaluate(dataclasses.replace(config, steps=4), str(tmp_path / "whole"),
                               dataset=ds, progress=False)


def test_bad_budgets_are_refused_naming_the_flag():
  with pytest.raises(ValueError, match="--steps must be > 0"):
    Config(steps=0).validate()
  with pytest.raises(ValueError, match="--eval_every must be >= 0"):
    Config(eval_every=-1).validate()


# --------------------------------------------------------------- one reading of the task

# The modules that must read only what the task declares (the list): the trainer,
# its steps, loop and model, the sweep, the records, the figures, the run cache and the
# launcher. The classification task and the data readers are where those words belong.
GENERIC = ["experiments/trainer.py", "experiments/steps.py", "experiments/loop.py",
           "experiments/network.py", "experiments/records.py", "experiments/plot.py",
           "experiments/cache.py", "experiments/train.py", "experiments/tasks/__init__.py",
           "experiments/sweep/__init__.py", "experiments/sweep/program.py",
           "experiments/sweep/chunks.py", "experiments/sweep/strategies.py",
           "experiments/sweep/grid.py", "experiments/sweep/cli.py"]


def test_the_generic_modules_name_no_image_classification():
  words = re.compile(r"accuracy|num_classes|images")
  found = []
  for path in GENERIC:
    with open(os.path.join(runs.REPO, path)) as f:
      for number, line in enumerate(f, 1):
        if words.search(line):
          found.append(f"{path}:{number}: {line.strip()}")
  assert not found, "\n".join(found)
  # The check can fail: the classification task itself has all three words.
  with open(os.path.join(runs.REPO, "experiments/tasks/classification.py")) as f:
    text = f.read()
  assert all(word in text for word in ("accuracy", "num_classes", "images"))

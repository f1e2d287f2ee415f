"""Tests for experiments.plot on synthetic workdirs (no training, CPU, a few seconds)."""

import json
import math
import os
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver

from experiments import plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LAYERS = ("convs/0/kernel", "convs/1/kernel", "dense/kernel")
ALL_PNGS = ("weight_norm.png", "effective_lr.png", "angular_update.png", "accuracy.png",
            "loss.png")


def _train_record(step, layers=LAYERS, loss=None):
  return {"kind": "train", "step": step, "epoch": step / 50, "loss": loss or 2.0 / (1 + step / 50),
          "accuracy": min(0.9, 0.1 + step / 250), "learning_rate": 0.1,
          "layers": {name: {"norm": 1.0 + 0.1 * i + step / 1000, "elr": 0.1 / (1 + step / 100),
                            "angle": 0.02 / (1 + i + step / 100)}
                     for i, name in enumerate(layers)}}


def _test_record(epoch, loss=None):
  return {"kind": "test", "step": 50 * epoch, "epoch": epoch, "loss": loss or 1.5 / epoch,
          "accuracy": 0.2 * epoch}


def _write_workdir(path, config=None, records=None, layers=LAYERS):
  """A run of 20 train records (steps 10..200) and 4 epochs, resumed once at step 150."""
  os.makedirs(path, exist_ok=True)
  if config is not None:
    with open(os.path.join(path, "config.json"), "w") as f:
      json.dump(config, f)
  if records is None:
    first = [_train_record(s, layers) for s in range(10, 161, 10)]
    first[5:5] = [_test_record(1)]
    first[11:11] = [_test_record(2)]
    first.append(_test_record(3, loss=9.0))   # killed before the checkpoint of epoch 3 ...
    resumed = [_train_record(s, layers, loss=0.25 if s == 150 else None)
               for s in range(150, 201, 10)]  # ... and resumed from step 140
    resumed[1:1] = [_test_record(3)]
    records = first + resumed + [_test_record(4)]
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  return str(path)


def _config(**overrides):
  return {"dataset": "cifar10", "model": "cnn", "norm": "batch", "method": "l2",
          "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "lam": 0.0005, "epochs": 4,
          "batch_size": 128, "seed": 0, **overrides}


@pytest.fixture
def workdirs(tmp_path):
  return [_write_workdir(tmp_path / "a", _config()),
          _write_workdir(tmp_path / "b", _config(method="decoupled", lam=0.05, lr=0.05)),
          _write_workdir(tmp_path / "c", _config(method="spherical", lam=None))]


def _legend_texts(legend):
  return [t.get_text() for t in legend.get_texts()]


def _solid(ax):
  return [line for line in ax.get_lines() if line.get_linestyle() == "-"]


def _dashed(ax):
  return [line for line in ax.get_lines() if line.get_linestyle() == "--"]


def test_read_run_parses_and_dedups(workdirs):
  run = plot.read_run(workdirs[0])
  assert run.workdir == workdirs[0]
  assert run.config["method"] == "l2"
  assert [r["step"] for r in run.train] == list(range(10, 201, 10))
  assert [r["step"] for r in run.test] == [50, 100, 150, 200]
  # The last record of a repeated (kind, step) wins.
  assert next(r for r in run.train if r["step"] == 150)["loss"] == 0.25
  assert run.test[2]["loss"] == pytest.approx(0.5)
  assert run.layer_names() == list(LAYERS)
  assert run.train[0]["layers"]["convs/1/kernel"]["norm"] == pytest.approx(1.11)
  assert run.label == "method=l2, lam=0.0005, lr=0.1"


def test_labels(tmp_path, workdirs):
  assert plot.read_run(workdirs[2]).label == "method=spherical, lr=0.1"  # null lam left out
  assert plot.read_run(workdirs[1], ["optimizer", "seed"]).label == "optimizer=sgd, seed=0"
  assert plot.make_label({"lam": 1e-5, "augment": True}, ["lam", "augment"], "x") == \
      "lam=1e-05, augment=True"
  no_config = _write_workdir(tmp_path / "no_config")
  assert plot.read_run(no_config).label == "no_config"
  # Equal labels are told apart by the folder name.
  twin = _write_workdir(tmp_path / "a_seed1", _config(seed=1))
  runs = [plot.read_run(w) for w in (workdirs[0], twin, workdirs[1])]
  assert plot.unique_labels(runs) == ["method=l2, lam=0.0005, lr=0.1 (a)",
                                      "method=l2, lam=0.0005, lr=0.1 (a_seed1)",
                                      "method=decoupled, lam=0.05, lr=0.05"]


def test_plot_runs_writes_five_valid_pngs(tmp_path, workdirs):
  runs = [plot.read_run(w) for w in workdirs]
  out = tmp_path / "plots" / "new"
  paths = plot.plot_runs(runs, str(out))
  assert sorted(os.path.basename(p) for p in paths) == sorted(ALL_PNGS)
  for path in paths:
    with open(path, "rb") as f:
      assert f.read(8) == PNG_SIGNATURE, path
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100, (path, image.shape)
    assert image.std() > 0, path  # not a blank canvas


def test_figures_have_one_legend_entry_per_run(workdirs):
  runs = [plot.read_run(w) for w in workdirs]
  labels = [r.label for r in runs]
  figures = plot.make_figures(runs)
  assert set(figures) == set(ALL_PNGS)
  for name in ("weight_norm.png", "effective_lr.png", "angular_update.png"):
    fig = figures[name]
    # The runs, then the theory of the two runs that have one (l2 and decoupled).
    texts = _legend_texts(fig.legends[0])
    assert texts[:3] == labels, name
    assert [t.split(": ")[0] for t in texts[3:]] == [f"theory, {label}" for label in labels[:2]]
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == list(LAYERS)
    assert all(len(_solid(ax)) == 3 for ax in axes)
    assert axes[0].get_yscale() == ("linear" if name == "weight_norm.png" else "log")
    assert axes[0].get_xlabel() == "step"
  for name in ("accuracy.png", "loss.png"):
    (ax,) = figures[name].axes
    assert _legend_texts(ax.get_legend()) == labels + ["train", "test"]
    assert ax.get_xlabel() == "epoch"
    assert len(ax.get_lines()) == 2 * len(runs)  # train and test per run
  # The same run has the same colour everywhere.
  acc_colors = [line.get_color() for line in figures["accuracy.png"].axes[0].get_lines()[::2]]
  norm_colors = [line.get_color() for line in _solid(figures["weight_norm.png"].axes[0])]
  assert acc_colors == norm_colors


def _with_rates(path, config, rate_of_step):
  """A workdir whose train records log ``rate_of_step(step)`` as the learning rate."""
  records = [{**_train_record(step), "learning_rate": rate_of_step(step)}
             for step in range(10, 201, 10)] + [_test_record(1)]
  return plot.read_run(_write_workdir(path, config, records=records))


def test_angular_update_draws_the_methods_equilibrium_angle(tmp_path):
  """Dashed, in the run's colour, in every panel: SGD + coupled L2's
  ``sqrt(2 eta lam_wd / (1+mu))`` with ``lam_wd = 2 lam`` (a line with ``lam`` for
  ``lam_wd``, or AdamW's ``(1-beta1)/(1+beta1)`` for SGDW's ``(1-mu)/(1+mu)``, is off by a
  factor) at each logged rate, under a decaying schedule too; Nero's ``arctan(eta_t)``.
  Written out here from the runs' hyperparameters."""
  l2 = _with_rates(tmp_path / "l2", _config(lam=5e-4, lr=0.1, momentum=0.9), lambda s: 0.1)
  decaying = lambda s: 0.05 * (1 - s / 400)  # noqa: E731
  sgdw = _with_rates(tmp_path / "sgdw", _config(method="decoupled", lam=0.05, lr=0.05,
                                                momentum=0.8), decaying)
  nero = _with_rates(tmp_path / "nero", _config(method="nero", lam=None, lr=0.02),
                     lambda s: 0.02)
  steps = list(range(10, 201, 10))
  expected = [[math.sqrt(2 * 0.1 * (2 * 5e-4) / (1 + 0.9))] * len(steps),
              [math.sqrt(2 * decaying(s) * 0.05 * (1 - 0.8) / (1 + 0.8)) for s in steps],
              [math.atan(0.02)] * len(steps)]
  fig = plot.make_figures([l2, sgdw, nero])["angular_update.png"]
  for ax in [ax for ax in fig.axes if ax.get_visible()]:
    solid, dashed = _solid(ax), _dashed(ax)
    assert len(dashed) == 3, ax.get_title()
    for run_line, theory, want in zip(solid, dashed, expected):
      assert theory.get_color() == run_line.get_color()
      assert list(theory.get_xdata()) == steps
      np.testing.assert_allclose(theory.get_ydata(), want, rtol=1e-12)
  texts = _legend_texts(fig.legends[0])[3:]
  assert texts[0] == (f"theory, {l2.label}: " r"$\theta^* = \sqrt{2\eta\lambda_{wd}/(1+\mu)}$"
                      f" = {expected[0][0]:.3g} rad (logged rate 0.1)")
  assert r"\sqrt{2\eta\,wd\,(1-\mu)/(1+\mu)}" in texts[1]
  assert f"= {expected[1][0]:.3g} rad (logged rate {decaying(10):g})" in texts[1]
  assert r"$\theta^* = \arctan\,\eta$" in texts[2]


def test_norm_and_elr_figures_mark_the_time_constant(tmp_path):
  """A vertical dashed line at ``tau``: ``(1-mu)/(4 eta lam_wd)`` for coupled L2 (the
  momentum's ``1-mu`` in it), ``1/(4 eta wd)`` for SGDW, at ``config.lr``; the angular
  figure has none, and Nero (no decay) none at all."""
  runs = [_with_rates(tmp_path / "l2", _config(lam=5e-4, lr=0.1, momentum=0.9), lambda s: 0.1),
          _with_rates(tmp_path / "sgdw", _config(method="decoupled", lam=0.05, lr=0.05),
                      lambda s: 0.05),
          _with_rates(tmp_path / "nero", _config(method="nero", lam=None), lambda s: 0.1)]
  taus = [(1 - 0.9) / (4 * 0.1 * (2 * 5e-4)), 1 / (4 * 0.05 * 0.05)]
  figures = plot.make_figures(runs)
  for name in ("weight_norm.png", "effective_lr.png"):
    for ax in [ax for ax in figures[name].axes if ax.get_visible()]:
      dashed = _dashed(ax)
      assert [line.get_color() for line in dashed] == [line.get_color()
                                                       for line in _solid(ax)[:2]]
      for line, tau in zip(dashed, taus):
        np.testing.assert_allclose(line.get_xdata(), [tau, tau], rtol=1e-12)
    texts = _legend_texts(figures[name].legends[0])[3:]
    assert texts == [f"theory, {runs[0].label}: " r"$\tau = (1-\mu)/(4\eta\lambda_{wd})$"
                     " = 250 steps",
                     f"theory, {runs[1].label}: " r"$\tau = 1/(4\eta\,wd)$ = 100 steps"]
  for ax in [ax for ax in figures["angular_update.png"].axes if ax.get_visible()]:
    assert [len(line.get_xdata()) for line in _dashed(ax)] == [20, 20, 20]  # angles only


@pytest.mark.parametrize("config", [
    _config(method="spherical", lam=None), _config(method="none", lam=None),
    _config(method="tangent", lam=None), _config(method="elr_rescale", lam=None),
    _config(method="exp_lr"), _config(method="l2", optimizer="adam"),
    _config(method="l2", lam=0.0), None], ids=lambda c: "no_config" if c is None else
    f"{c['method']}-{c['optimizer']}-lam{c['lam']}")
def test_methods_without_a_theory_get_no_dashed_line(tmp_path, config):
  """No closed form in the registry (spherical, elr_rescale, tangent, exp_lr, none), coupled
  L2 under Adam (no closed form), no decay, or no config.json: nothing dashed, no theory in
  the legend. A plot that drew a line for every run would fail here."""
  run = plot.read_run(_write_workdir(tmp_path / "run", config))
  for name in ("weight_norm.png", "effective_lr.png", "angular_update.png"):
    fig = plot.make_figures([run])[name]
    assert not any(_dashed(ax) for ax in fig.axes), name
    assert _legend_texts(fig.legends[0]) == [run.label], name


def test_layers_regex_selects_panels(workdirs):
  runs = [plot.read_run(w) for w in workdirs]
  fig = plot.make_figures(runs, layers_regex=r"^convs/")["effective_lr.png"]
  assert [ax.get_title() for ax in fig.axes if ax.get_visible()] == list(LAYERS[:2])
  fig = plot.make_figures(runs, layers_regex="dense")["angular_update.png"]
  assert [ax.get_title() for ax in fig.axes if ax.get_visible()] == ["dense/kernel"]


def test_many_layers_are_capped_and_naturally_ordered(tmp_path):
  names = [f"convs/{i}/kernel" for i in range(20)]
  run = plot.read_run(_write_workdir(tmp_path / "deep", _config(), layers=names))
  fig = plot.make_figures([run])["weight_norm.png"]
  titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
  assert len(titles) == plot.MAX_PANELS
  assert titles[:15] == names[:15]  # convs/2 before convs/10
  assert titles[-1] == "median of the other 5 layers"
  (line,) = _solid(fig.axes[15])
  assert line.get_ydata()[0] == pytest.approx(1.0 + 0.1 * 17 + 0.01)  # median of 15..19


def test_runs_without_layers(tmp_path, workdirs):
  records = [{**_train_record(s), "layers": {}} for s in (10, 20)] + [_test_record(1)]
  bare = _write_workdir(tmp_path / "none", _config(norm="none", method="none", lam=None),
                        records=records)
  paths = plot.plot_runs([plot.read_run(bare)], str(tmp_path / "out"))
  assert [os.path.basename(p) for p in paths] == ["accuracy.png", "loss.png"]
  with pytest.raises(ValueError, match=r"'conv'.*none: no run has a grouped layer"):
    plot.make_figures([plot.read_run(bare)], layers_regex="conv")
  # Mixed with a normalized run: the layer panels show the normalized one only.
  runs = [plot.read_run(bare), plot.read_run(workdirs[0])]
  fig = plot.make_figures(runs)["weight_norm.png"]
  assert [t for t in _legend_texts(fig.legends[0]) if not t.startswith("theory, ")] == \
      [runs[1].label]
  assert _legend_texts(plot.make_figures(runs)["loss.png"].axes[0].get_legend())[:2] == \
      [r.label for r in runs]


def test_error_missing_workdir(tmp_path):
  path = str(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match=f"{path}: no such folder"):
    plot.read_run(path)


def test_error_missing_metrics(tmp_path):
  (tmp_path / "empty_dir").mkdir()
  with pytest.raises(FileNotFoundError, match=r"empty_dir/metrics\.jsonl: no such file"):
    plot.read_run(str(tmp_path / "empty_dir"))


def test_error_no_records(tmp_path):
  path = tmp_path / "w"
  path.mkdir()
  (path / "metrics.jsonl").write_text("\n  \n")
  with pytest.raises(ValueError, match=r"w/metrics\.jsonl: no train or test records"):
    plot.read_run(str(path))


@pytest.mark.parametrize("bad_line", ['{"kind": "train", "step": 3', '[1, 2]',
                                      '{"kind": "train", "loss": 1.0}'])
def test_error_malformed_line(tmp_path, bad_line):
  path = tmp_path / "w"
  path.mkdir()
  good = json.dumps(_train_record(10))
  (path / "metrics.jsonl").write_text(f"{good}\n\n{bad_line}\n{good}\n")
  with pytest.raises(ValueError, match=r"w/metrics\.jsonl:3: malformed line"):
    plot.read_run(str(path))


def test_error_bad_config(tmp_path):
  path = _write_workdir(tmp_path / "w")
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write("{oops")
  with pytest.raises(ValueError, match=r"w/config\.json: not valid JSON"):
    plot.read_run(path)


def test_error_layers_regex(workdirs):
  runs = [plot.read_run(w) for w in workdirs]
  with pytest.raises(ValueError, match=r"--layers='bn/scale' selects no layer; the layers are: "
                     r"convs/0/kernel, convs/1/kernel, dense/kernel"):
    plot.make_figures(runs, layers_regex="bn/scale")
  with pytest.raises(ValueError, match=r"--layers='conv\(' is not a valid regex"):
    plot.make_figures(runs, layers_regex="conv(")


def test_error_label_key_typo(workdirs):
  runs = [plot.read_run(w) for w in workdirs]
  plot.check_label_keys(runs, ["method", "seed"])
  with pytest.raises(ValueError, match=r"--label key\(s\) lamda in no run's config\.json"):
    plot.check_label_keys(runs, ["method", "lamda"])


def test_main_with_absl_flags(tmp_path, workdirs, capsys):
  out = tmp_path / "out"
  with flagsaver.flagsaver():
    argv = flags.FLAGS(["plot", *workdirs[:2], f"--out={out}", "--layers=convs",
                        "--label=method,seed"])
    plot.main(argv)
  printed = capsys.readouterr().out.split()
  assert printed == [str(out / name) for name in ALL_PNGS]
  assert all(os.path.getsize(p) > 0 for p in printed)
  # Default --out: the first workdir.
  with flagsaver.flagsaver():
    plot.main(flags.FLAGS(["plot", workdirs[2]]))
  assert capsys.readouterr().out.split()[0] == os.path.join(workdirs[2], "weight_norm.png")
  # Errors: one line naming the path.
  missing = str(tmp_path / "missing")
  with flagsaver.flagsaver(), pytest.raises(SystemExit, match=f"error: {missing}: no such"):
    plot.main(flags.FLAGS(["plot", workdirs[0], missing]))


def test_command_line(tmp_path, workdirs):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = tmp_path / "cli"
  result = subprocess.run([sys.executable, "-m", "experiments.plot", *workdirs, "--out", str(out),
                           "--layers", "kernel"], cwd=repo, capture_output=True, text=True,
                          timeout=60, check=False)
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == [str(out / name) for name in ALL_PNGS]
  result = subprocess.run([sys.executable, "-m", "experiments.plot", workdirs[0], "--layers",
                           "bn"], cwd=repo, capture_output=True, text=True, timeout=60,
                          check=False)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [
      "experiments.plot: error: --layers='bn' selects no layer; the layers are: "
      "convs/0/kernel, convs/1/kernel, dense/kernel"]


def test_a_layer_of_its_own_theory_replaces_the_runs_line_in_its_panel(tmp_path):
  """``(kind, layer)`` entries: that layer's own dashed value (or none, for ``None``); the
  other panels keep the run's line."""
  run = plot.read_run(_write_workdir(tmp_path / "run", None))
  steps = [r["step"] for r in run.train]
  theories = [{"angle": plot.TheoryLine("angle", steps, [0.5] * len(steps), "run's"),
               ("angle", LAYERS[0]): plot.TheoryLine("angle", steps, [0.25] * len(steps),
                                                     "own"),
               ("angle", LAYERS[1]): None}]
  fig = plot.layer_figure([run], list(LAYERS), "angle", "angle", True, [run.label],
                          ["C0"], theories)
  drawn = {ax.get_title(): [set(line.get_ydata()) for line in _dashed(ax)]
           for ax in fig.axes if ax.get_visible()}
  assert drawn == {LAYERS[0]: [{0.25}], LAYERS[1]: [], LAYERS[2]: [{0.5}]}

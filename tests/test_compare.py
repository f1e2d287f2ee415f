"""``python -m experiments.compare --size=smoke`` runs every method and writes its report.

The numbers at this size are a test of the code, not a comparison (the committed
``experiments/COMPARISON.md`` is the ``cpu`` size).
"""

import json
import os

import pytest

from experiments import compare

DATA = os.environ.get("NORMREG_CIFAR10_DIR")


@pytest.mark.slow
@pytest.mark.skipif(not DATA, reason="set NORMREG_CIFAR10_DIR to the extracted CIFAR-10 copy")
def test_smoke_comparison_writes_every_method(tmp_path):
  results = compare.run("smoke", str(tmp_path / "runs"), str(tmp_path / "report"), DATA)
  rows = results["models"]["cnn (width 4, 2 epochs)"]["methods"]
  assert set(rows) == set(compare.METHODS)
  for name, row in rows.items():
    assert 0.0 <= row["acc"] <= 1.0 and len(row["accs"]) == 2, name
    assert row["step_time"] > 0, name
    # Every method with a target gets a measured-to-target ratio; the others none.
    assert (row["angle_ratio"] is None) == (compare.METHODS[name][2] is None), name
  assert rows["none"]["step_time"] == pytest.approx(1.0)
  # The methods that set their angle hit it within 20% even at this size; Nero's steps are
  # normalized by a running mean of the gradient norm, which lags a falling norm.
  for name in ("rotational", "hyperball"):
    assert 0.8 < rows[name]["angle_ratio"] < 1.2, (name, rows[name]["angle_ratio"])
  assert 0.5 < rows["nero"]["angle_ratio"] < 1.2, rows["nero"]["angle_ratio"]
  heuristic = results["models"]["cnn (width 4, 2 epochs)"]["heuristic"]
  assert heuristic["decisions"] > 0 and 0.0 <= heuristic["disagree"] <= 1.0
  report = (tmp_path / "report" / "COMPARISON.md").read_text()
  assert report.count("| rotational |") == 2  # the settings table and the results table
  with open(tmp_path / "report" / "comparison.json") as f:
    assert json.load(f)["size"] == "smoke"
  for figure in ("accuracy.png", "angles.png", "grad_norm.png"):
    assert (tmp_path / "report" / "figures" / "comparison" / figure).exists()


def test_time_constants_before_the_window_integrate_the_relaxation_rate(tmp_path):
  from experiments import plot  # pylint: disable=g-import-not-at-top
  train = [{"step": s, "learning_rate": 0.1, "layers": {}} for s in range(10, 101, 10)]
  run = plot.Run(str(tmp_path), {"lr": 0.1}, train, [], "synthetic")
  # Window from step 25: the records at 10 and 20 count, 10 steps each at lr 0.1.
  # SGD + L2 (lam_wd = 2 lam): 4 eta lam_wd / (1 - mu) a step; SGDW: 4 eta wd; the
  # corrected decay at the peak rate is SGDW's; SGDP's decay is wd * 0.1 / (1 - mu).
  rate_l2 = 4 * 0.1 * (2 * compare.L2) / (1 - compare.MOMENTUM)
  assert compare.time_constants_before_window(run, "l2") == pytest.approx(20 * rate_l2)
  rate_w = 4 * 0.1 * compare.WD
  assert compare.time_constants_before_window(run, "decoupled") == pytest.approx(20 * rate_w)
  assert compare.time_constants_before_window(run, "corrected") == pytest.approx(20 * rate_w)
  rate_p = 4 * 0.1 * compare.L2 * 0.1 / (1 - compare.MOMENTUM)
  assert compare.time_constants_before_window(run, "sgdp") == pytest.approx(20 * rate_p)
  assert compare.time_constants_before_window(run, "rotational") is None
  # At half the peak rate the corrected decay (wd * lr_t / lr_max) relaxes 2x slower.
  half = plot.Run(str(tmp_path), {"lr": 0.2}, train, [], "synthetic")
  assert compare.time_constants_before_window(half, "corrected") == pytest.approx(10 * rate_w)


class _FakeCache:
  """Stands in for a RunCache: a "run" is its config, trained instantly."""

  def __init__(self):
    self.trained = []

  def config(self, **kw):
    import types  # pylint: disable=g-import-not-at-top
    return types.SimpleNamespace(**kw)

  def train(self, name, config):
    self.trained.append(config.lr)
    return config


@pytest.mark.parametrize("peak, expected", [
    (2.7, [0.033333, 0.1, 0.3, 0.9, 2.7, 8.1]),  # extended upwards until beaten above
    (0.004, [0.0012346, 0.0037037, 0.011111, 0.033333, 0.1, 0.3]),  # and downwards
    (0.1, [0.033333, 0.1, 0.3]),  # interior already: the grid as it is
])
def test_the_grid_is_extended_until_the_best_rate_is_interior(monkeypatch, peak, expected):
  import math  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(_FakeCache, "final_score",
                      lambda self, run: -abs(math.log(run.lr / peak)), raising=False)  # best at `peak`
  cache = _FakeCache()
  tuned = compare.tune(cache, ("cnn", 8, 4), "l2", compare.LR_GRID, interior=True)
  assert sorted(tuned) == pytest.approx(expected, rel=1e-4)
  lrs, best = sorted(tuned), max(tuned, key=tuned.get)
  assert lrs[0] < best < lrs[-1]
  assert len(cache.trained) == len(set(cache.trained))  # no rate trained twice


def test_a_best_rate_that_stays_at_the_edge_stops_the_comparison(monkeypatch):
  monkeypatch.setattr(_FakeCache, "final_score", lambda self, run: run.lr,
                      raising=False)  # bigger is better
  with pytest.raises(compare.EdgeOfGridError, match="l2's best learning rate .* edge"):
    compare.tune(_FakeCache(), ("cnn", 8, 4), "l2", compare.LR_GRID, interior=True)
  # Not enforced (the smoke size's single rate): the grid as given.
  assert len(compare.tune(_FakeCache(), ("cnn", 8, 4), "l2", compare.LR_GRID,
                          interior=False)) == 3

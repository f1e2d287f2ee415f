"""`python -m experiments.reproduce --size=smoke` runs, measures what it claims, and refuses
to report an equilibrium from a run too short for it.

Uses the CIFAR-10 copy when NORMREG_CIFAR10_DIR is set (CI sets it), random
images otherwise; the equilibrium-angle check needs the real images.
"""

import json
import math
import os
import re

import pytest

from experiments import cache as cache_lib
from experiments import reproduce
from experiments.config import Config

import runs

DATA = os.environ.get("NORMREG_CIFAR10_DIR")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  root = tmp_path_factory.mktemp("reproduce")
  out = root / "report"
  results = reproduce.run("smoke", str(root / "runs"), str(out), data_dir=DATA)
  return results, out


def _lr_lam(key):
  lr, lam = re.fullmatch(r"lr=([\d.e-]+), (?:lam|wd)=([\d.e-]+)", key).groups()
  return float(lr), float(lam)


@pytest.mark.slow
def test_grouped_weights_of_trained_networks_are_invariant(smoke):
  results, _ = smoke
  assert set(results["1_invariance"]) == {"batch", "layer", "group", "weight"}
  for norm, v in results["1_invariance"].items():
    assert v["grouped_leaves"] >= 5, norm
    assert v["logits_rel_change"] < 1e-3, norm
    assert v["loss_change"] < 1e-3, norm


@pytest.mark.slow
def test_predicted_angles_are_the_closed_forms(smoke):
  """Each family's prediction, recomputed here from its recipe (lam_wd = 2*lam for
  coupled L2, not lam; (1-mu) for the decoupled ones): catches a convention slip."""
  results, _ = smoke
  e = results["3_effective_lr"]
  forms = {"sgd_momentum": lambda lr, lam: math.sqrt(2 * lr * 2 * lam / 1.9),
           "sgd": lambda lr, lam: math.sqrt(2 * lr * 2 * lam),
           "sgdw": lambda lr, wd: math.sqrt(2 * lr * wd * 0.1 / 1.9),
           "adamw": lambda lr, wd: math.sqrt(2 * lr * wd * 0.1 / 1.9)}
  for family, form in forms.items():
    assert len(e[family]) >= 3, family
    for key, v in e[family].items():
      assert v["predicted"] == pytest.approx(form(*_lr_lam(key)), rel=1e-12), key
      assert v["ratio"] == pytest.approx(v["measured"] / v["predicted"])
      # Every decay recipe trained SETTLE time constants before its window.
      assert v["time_constant"] * reproduce.SETTLE <= 0.75 * results["total_steps"], key


@pytest.mark.slow
@pytest.mark.skipif(not DATA, reason="set NORMREG_CIFAR10_DIR to the extracted CIFAR-10 copy "
                    "(../shared/data/cifar10-jpeg.tar.gz): on random images the smoke run's "
                    "angle is not at its equilibrium value")
def test_equilibrium_angle_matches_theory_where_the_decay_is_mild(smoke):
  # SGD momentum 0.9, eta*lam = 1.6e-3 (time constant 8 steps, run 48): within 15%. A
  # lam for lam_wd slip would put it at 0.71 or 1.41 of the prediction.
  results, _ = smoke
  rec = results["3_effective_lr"]["sgd_momentum"]["lr=0.1, lam=0.016"]
  assert 0.85 < rec["ratio"] < 1.15, rec


@pytest.mark.slow
def test_lam_alone_exact_equivalence_is_bit_exact_and_eps_breaks_it(smoke):
  results, _ = smoke
  eq = results["8_equivalence"]
  for c in ("2", "0.5"):
    exact, default = eq[f"c={c}, eps=1e-30"], eq[f"c={c}, eps=1e-5 (default)"]
    assert exact["steps"][:reproduce.EARLY_STEPS + 1] == list(range(reproduce.EARLY_STEPS + 1))
    assert exact["max_deviation"] == 0.0, c  # c is a power of two: every rounding scales
    assert default["max_deviation"] > 1e-6, c  # eps/var is not scale-invariant
    # Test accuracy runs on BatchNorm's running statistics, scaled with the weights.
    assert exact["acc"] == exact["acc_base"], c
  assert results["verdicts"]["8"]["holds"]


@pytest.mark.slow
def test_exponential_lr_twin_matches_after_the_first_step(smoke):
  results, _ = smoke
  for key, v in results["9_exponential_lr"].items():
    assert v["steps"][1] == 1
    assert v["twin"][0] == 0.0 and v["twin"][1] < 1e-5, key
    assert results["verdicts"]["9"]["holds"]


@pytest.mark.slow
def test_spherical_runs_stay_on_the_sphere_around_the_mapped_lr(smoke):
  results, _ = smoke
  for sph in (results["5_spherical"], results["6_weight_norm"]["spherical"]):
    assert abs(sph["spherical_norm"] - 1.0) < 1e-4
    assert sph["eta_s"] > 0
    # Only the grouped weights change recipe: the rest keep the L2 recipes' common rate.
    assert sph["overrides"]["ungrouped_lr"] == reproduce.UNGROUPED_LR
    lrs = sorted(float(lr) for lr in sph["lr_grid"])
    assert lrs == pytest.approx([sph["eta_s"] / 3, sph["eta_s"], 3 * sph["eta_s"]], rel=1e-3)
    assert sph["best_acc"] == max(g["acc"] for g in sph["lr_grid"].values())


@pytest.mark.slow
def test_without_l2_the_norm_grows_and_the_effective_lr_depends_on_the_start(smoke):
  results, _ = smoke
  g1 = results["4_growth_without_l2"]["init_scale=1"]
  g4 = results["4_growth_without_l2"]["init_scale=4"]
  assert g1["norm_last"] > g1["norm_first"]
  assert g1["elr_last"] < g1["elr_first"]
  assert g4["elr_last"] < 0.5 * g1["elr_last"]


@pytest.mark.slow
def test_inner_gamma_beta_scale_invariant_last_not(smoke):
  results, _ = smoke
  change = results["7_gamma_beta"]["output_change_when_scaling_layer"]
  assert max(change[layer] for layer in range(5)) < 1e-3
  assert change[5] > 1e-2


@pytest.mark.slow
def test_report_states_each_criterion_before_its_numbers(smoke):
  results, out = smoke
  report = (out / "RESULTS.md").read_text()
  sections = re.split(r"\n## ", report)
  for n in range(1, 10):
    section = next(s for s in sections if s.startswith(f"{n}."))
    criterion = section.index("Criterion (fixed before the runs):")
    verdict = section.index("Verdict: **")
    assert criterion < section.index("|") < verdict, n
  assert report.count("Verdict: **") == len(results["verdicts"]) == 10
  assert "Command: `python -m experiments.reproduce --size=smoke`" in report
  for version in ("jax", "flax", "optax"):
    assert f"{version} " in report
  with open(out / "results.json") as f:
    assert json.load(f)["size"] == "smoke"
  figures = [line.split("(")[1].rstrip(")") for line in report.splitlines()
             if line.startswith("![")]
  assert len(figures) == 7
  for figure in figures:
    with open(out / figure, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_a_recipe_too_short_for_its_equilibrium_is_refused(tmp_path):
  runner = reproduce.Runner("smoke", str(tmp_path), runs.tiny_dataset(n_train=64), None)
  # 64 images / batch 32 * 3 epochs = 6 steps; SGD+L2 at eta*lam = 2e-4 has tau = 62.5.
  config = runner.config(method="l2", lr=0.1, lam=2e-3)
  with pytest.raises(reproduce.TooShortError,
                     match=r"recipe short \(--method=l2.*--lr=0.1 --lam=0.002.*62 steps.*"
                           r"334 steps.*--size=smoke trains 6"):
    runner.train("short", config)
  assert not os.path.exists(tmp_path / "short")  # refused before anything was trained
  # Decoupled recipes and AdamW have their own time constants; Adam with coupled L2 none.
  assert reproduce.time_constant(runner.config(method="decoupled", lr=0.1, lam=0.01)) == (
      pytest.approx(250.0))
  assert reproduce.time_constant(runner.config(method="decoupled", optimizer="adam",
                                               lr=1e-3, lam=2.0)) == pytest.approx(250.0)
  with pytest.raises(reproduce.TooShortError, match="Adam with coupled L2"):
    reproduce.time_constant(runner.config(method="l2", optimizer="adam", lr=1e-3, lam=1e-3))
  assert reproduce.time_constant(runner.config(method="spherical")) is None


def test_every_size_trains_its_recipes_long_enough():
  for size, s in reproduce.SIZES.items():
    n_train = s["train_size"] or 50000
    runner = reproduce.Runner(size, "unused", runs.tiny_dataset(n_train=1, n_test=1), None)
    runner.dataset = runs.tiny_dataset(n_train=1, n_test=1)
    total = n_train // s["batch_size"] * s["epochs"]
    for recipe in reproduce.L2_RECIPES + reproduce.L2_PLAIN_RECIPES:
      lr, lam = recipe
      config = Config(method="l2", lr=lr, lam=lam * s["decay_scale"],
                      momentum=reproduce.MOMENTUM if recipe in reproduce.L2_RECIPES else 0.0)
      reproduce.check_settles(str(recipe), config, total, f"--size={size}")
    for lr, wd in reproduce.SGDW_RECIPES:
      reproduce.check_settles("sgdw", Config(method="decoupled", lr=lr,
                                             lam=wd * s["decay_scale"]), total, size)
    for lr, wd in reproduce.ADAMW_RECIPES:
      reproduce.check_settles("adamw", Config(method="decoupled", optimizer="adam", lr=lr,
                                              lam=wd * s["decay_scale"]), total, size)


@pytest.mark.slow
def test_a_cached_run_with_other_settings_is_moved_aside_and_retrained(tmp_path):
  runner = reproduce.Runner("smoke", str(tmp_path), runs.tiny_dataset(), data_dir=None)
  first = runner.train("r", runner.config(method="none", lr=0.1, epochs=1))
  assert runner.train("r", runner.config(method="none", lr=0.1, epochs=1)).test == first.test
  second = runner.train("r", runner.config(method="none", lr=0.05, epochs=1))
  assert second.config["lr"] == 0.05
  aside = [p for p in os.listdir(tmp_path) if p.startswith("r.stale-")]
  assert len(aside) == 1
  with open(tmp_path / aside[0] / "config.json") as f:
    assert json.load(f)["lr"] == 0.1


def test_sizes_other_than_smoke_need_the_data(tmp_path):
  with pytest.raises(ValueError, match="--data_dir"):
    reproduce.run("long", str(tmp_path), str(tmp_path), data_dir=None)
  with pytest.raises(ValueError, match="--size='huge'"):
    reproduce.run("huge", str(tmp_path), str(tmp_path))


def test_the_default_report_goes_under_the_workdir_not_over_the_committed_one():
  assert cache_lib.report_dir_for("runs/reproduce", "smoke", None) == os.path.join(
      "runs/reproduce", "smoke", "report")
  assert cache_lib.report_dir_for("runs/reproduce", "long", "experiments") == "experiments"


def _synthetic_run(tmp_path, norms, steps):
  from experiments import plot  # pylint: disable=g-import-not-at-top
  train = [{"step": s, "layers": {"a": {"norm": n}, "b": {"norm": 2 * n}}}
           for s, n in zip(steps, norms)]
  return plot.Run(str(tmp_path), {}, train, [], "synthetic")


def test_drift_compares_the_two_halves_of_the_window(tmp_path):
  # Window: steps > 75 of 100; halves split at 87.5. Layer means 1.5*n.
  run = _synthetic_run(tmp_path, [9.0, 1.0, 1.0, 1.2, 1.2], [50, 80, 85, 90, 100])
  assert math.isclose(reproduce.drift(run), 0.2, rel_tol=1e-9)
  # No record in the window's first half: nothing to compare.
  assert math.isnan(reproduce.drift(_synthetic_run(tmp_path, [1.0, 1.0], [50, 100])))
  # A diverged run has no drift either.
  from experiments import cache  # pylint: disable=g-import-not-at-top
  (tmp_path / cache.DIVERGED).write_text("step 1")
  assert math.isnan(reproduce.drift(run))

"""experiments.methods: the registry of launcher methods.

A method registered in one place (one ``Method`` entry) trains through the launcher,
the sweep and the comparison's machinery; every entry's theory is the closed form of
``normreg.theory``, recomputed here by hand; ``Config.validate`` words its messages
from the entries.
"""

import dataclasses
import glob
import json
import math
import os

import chex
import numpy as np
import optax
import pytest

import normreg
from normreg import theory
from experiments import cache as cache_lib
from experiments import compare
from experiments import methods
from experiments import sweep
from experiments import trainer
from experiments.config import Config

import runs


def _twin_chain(p: methods.Parts) -> optax.GradientTransformation:
  # Coupled L2 written out again: the same numbers as --method=l2, under another name.
  return optax.chain(normreg.add_l2_penalty(p.config.lam_value, p.groups), p.direction(),
                     p.rates())


# The one place the new method is defined.
TWIN = methods.Method(
    "l2_twin", _twin_chain, help="coupled L2 again (a test)", lam=True,
    time_constant=lambda c, lr: theory.time_constant_sgd(lr, 2 * c.lam_value, c.momentum),
    angle=lambda c, lr: theory.equilibrium_angle_sgd(lr, 2 * c.lam_value, c.momentum))


@pytest.fixture
def twin():
  with methods.registered(TWIN) as method:
    yield method


@pytest.mark.slow
def test_a_registered_method_trains_through_train_sweep_and_compare(twin, tmp_path,
                                                                     monkeypatch):
  del twin
  ds = runs.tiny_dataset()
  base = Config(**runs.TINY, epochs=1, lam=1e-3)
  # The launcher: the twin's run is --method=l2's, number for number.
  alone = {m: trainer.train_and_evaluate(dataclasses.replace(base, method=m).validate(),
                                         str(tmp_path / "alone" / m), dataset=ds,
                                         progress=False, tensorboard=False)
           for m in ("l2", "l2_twin")}
  chex.assert_trees_all_equal(alone["l2"].params, alone["l2_twin"].params)
  assert "l2_twin (coupled L2 again (a test))" in methods.help_text()

  # The sweep: --lam is one of its axes (Method.lam), and the swept run is the run alone.
  configs = sweep.grid(dataclasses.replace(base, method="l2_twin"), lrs=[0.05, 0.1],
                       lams=[1e-3])
  assert sweep.run_names(configs) == ["method=l2_twin_lr=0.05_lam=0.001_seed=0",
                                      "method=l2_twin_lr=0.1_lam=0.001_seed=0"]
  states = sweep.train_grid(configs, str(tmp_path / "sweep"), dataset=ds,
                            strategy="sequential", progress=False)
  chex.assert_trees_all_close(states[0].params, alone["l2_twin"].params, rtol=1e-5,
                              atol=1e-5)

  # The comparison: its recipe is data, its target angle the entry's. A grid of three rates;
  # every figure of the row recomputed here from the runs' own metrics.jsonl files, with the
  # equilibrium angle written out (coupled L2 lam: sqrt(2 lr (2 lam) / (1 + mu)), van
  # Laarhoven 2017), and the window (the middle half of training) as the row's docs say.
  settings = dict(method="l2_twin", lam=compare.L2)
  monkeypatch.setitem(compare.METHODS, "l2_twin", (settings, 0.1,
                                                   compare.target_angle(settings)))
  cache = cache_lib.RunCache(str(tmp_path / "compare"), ds,
                             Config(**{**runs.TINY, "schedule": "cosine",
                                       "momentum": compare.MOMENTUM}), range(2))
  row = compare.compare_method(cache, ("cnn", 4, 2), "l2_twin", (1 / 3, 1.0, 3.0),
                               interior=False)

  def records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      rows = [json.loads(line) for line in f if line.strip()]
    return ([r for r in rows if r["kind"] == "train"], [r for r in rows if r["kind"] == "test"])

  grid = {}
  for lr in (0.1 / 3, 0.1, 0.3):
    found = []
    for path in glob.glob(str(tmp_path / "compare" / "**" / "config.json"), recursive=True):
      with open(path) as f:
        config = json.load(f)
      if config["lr"] == pytest.approx(lr, rel=1e-4) and config["seed"] == 0:  # lr as %g
        found.append(os.path.dirname(path))
    assert len(found) == 1, (lr, found)
    grid[lr] = records(found[0])[1][-1]["accuracy"]
  assert sorted(map(float, row["grid"])) == pytest.approx(sorted(grid), rel=1e-4)
  assert sorted(row["grid"].values()) == pytest.approx(sorted(grid.values()))
  assert row["best_lr"] == pytest.approx(max(grid, key=grid.get), rel=1e-4)
  train, _ = records(row["workdir"])
  last = train[-1]["step"]
  window = [r for r in train if 0.25 * last < r["step"] <= 0.75 * last]
  want = [math.sqrt(2 * r["learning_rate"] * 2 * compare.L2 / (1 + compare.MOMENTUM))
          for r in window]
  measured = [np.mean([layer["angle"] for layer in r["layers"].values()]) for r in window]
  assert window and row["target"] == pytest.approx(np.mean(want), rel=1e-6)
  assert row["angle"] == pytest.approx(np.mean(measured), rel=1e-6)
  assert row["angle_ratio"] == pytest.approx(np.mean(np.divide(measured, want)), rel=1e-6)
  assert len(row["accs"]) == 2 and row["time_constants"] > 0


# ------------------------------------------------------------------------- theory

MU, LR, LAM = 0.9, 0.1, 1e-3


def _expected(name: str, optimizer: str):
  """Each entry's (time constant, angle) at LR, by hand; None: no closed form. A method
  added to the registry must be added here, with its own closed forms."""
  wd = LAM
  sgd = optimizer == "sgd"
  table = {
      "l2": (ValueError if not sgd else (1 - MU) / (4 * LR * 2 * LAM),
             None if not sgd else math.sqrt(2 * LR * 2 * LAM / (1 + MU))),
      "decoupled": ((1 / (4 * LR * wd)) if sgd else 1 / (2 * LR * wd),
                    math.sqrt(2 * LR * wd * (1 - MU) / (1 + MU)) if sgd
                    else math.sqrt(2 * LR * wd * 0.1 / 1.9)),
      "adamp": ((1 - MU) / (4 * LR * wd * 0.1) if sgd else 1 / (2 * LR * wd * 0.1),
                math.sqrt(2 * LR * wd * 0.1 / (1 - MU)) if sgd
                else math.sqrt(2 * LR * wd * 0.1)),
      "rotational": (None, math.atan(LR)),  # at the logged rate LR: arctan of it
      "nero": (None, math.atan(LR)),
      "hyperball": (None, math.atan(LR)),
      "spherical": (None, None), "elr_rescale": (None, None), "tangent": (None, None),
      "exp_lr": (None, None), "none": (None, None),
  }
  return table[name]


@pytest.mark.parametrize("name", methods.names())
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_every_entry_has_the_closed_forms_of_normreg_theory(name, optimizer):
  method = methods.get(name)
  if method.optimizer not in (None, optimizer):
    pytest.skip(f"--method={name} needs --optimizer={method.optimizer}")
  config = Config(method=name, optimizer=optimizer, momentum=MU, lr=LR,
                  lam=LAM if method.lam else None, schedule=method.schedule or "constant")
  config.validate()
  tau, angle = _expected(name, optimizer)
  if tau is ValueError:
    with pytest.raises(ValueError, match="no closed-form time constant"):
      method.theory_time_constant(config)
  elif tau is None:
    assert method.theory_time_constant(config) is None
  else:
    assert method.theory_time_constant(config) == pytest.approx(tau, rel=1e-12)
  if angle is None:
    assert method.theory_angle(config) is None
  else:
    # The rotational target is reached through the logged rate (the target itself): the
    # angle at the logged rate r is arctan(r).
    assert method.theory_angle(config) == pytest.approx(angle, rel=1e-9)


def test_corrected_decay_follows_the_schedule():
  config = Config(method="decoupled", lam=LAM, lr=LR, momentum=MU, corrected_decay=True)
  method = methods.get("decoupled")
  # At half the peak rate the decay is wd/2: SGDW's forms at (LR/2, wd/2).
  assert method.theory_time_constant(config, LR / 2) == pytest.approx(
      1 / (4 * (LR / 2) * (LAM / 2)))
  assert method.theory_angle(config, LR / 2) == pytest.approx(
      theory.equilibrium_angle_sgdw(LR / 2, LAM / 2, MU))


def test_the_registry_answers_what_the_old_tables_said():
  """The flags of each entry, as config.LAM_METHODS, ANGLE_METHODS and the sweep's
  refusal of exp_lr and rotational said before the registry."""
  names = methods.names()
  assert names == ("l2", "decoupled", "spherical", "elr_rescale", "tangent", "exp_lr",
                   "rotational", "adamp", "nero", "hyperball", "none")
  assert {n for n in names if methods.get(n).lam} == {"l2", "decoupled", "exp_lr",
                                                      "rotational", "adamp"}
  assert {n for n in names if methods.get(n).sets_angle} == {
      "spherical", "elr_rescale", "rotational", "nero", "hyperball"}
  assert {n for n in names if not methods.get(n).sweepable} == {"exp_lr", "rotational"}
  assert {n for n in names if not methods.get(n).ungrouped_lr} == {"adamp", "nero"}


# ---------------------------------------------------------------------- validation


def test_validation_messages_come_from_the_entries():
  toy = methods.Method("toy", lambda p: optax.chain(p.direction(), p.rates()),
                       optimizer="adam", optimizer_reason="is a toy on Adam",
                       schedule="cosine", schedule_reason="decays by design",
                       ungrouped_lr=False, options=(("adamp_cosine", "is the toy's"),))
  with pytest.raises(ValueError, match=r"--method='toy' is not one of l2, decoupled, "
                     r"spherical, elr_rescale, tangent, exp_lr, rotational, adamp, nero, "
                     r"hyperball, none\.$"):
    Config(method="toy").validate()
  with pytest.raises(KeyError):
    methods.get("toy")
  with methods.registered(toy):
    with pytest.raises(ValueError, match=r"^--method=toy is a toy on Adam; it needs "
                       r"--optimizer=adam, got --optimizer=sgd\.$"):
      Config(method="toy").validate()
    with pytest.raises(ValueError, match=r"^--method=toy decays by design; it needs "
                       r"--schedule=cosine, got --schedule=constant\.$"):
      Config(method="toy", optimizer="adam").validate()
    with pytest.raises(ValueError, match=r"^--method=toy has one learning rate for every "
                       r"parameter: drop --ungrouped_lr\.$"):
      Config(method="toy", optimizer="adam", schedule="cosine", ungrouped_lr=0.1).validate()
    with pytest.raises(ValueError, match=r"^--lam=0.1 has no meaning with --method=toy"):
      Config(method="toy", optimizer="adam", schedule="cosine", lam=0.1).validate()
    # A flag two entries claim: the first (adamp's) words the message.
    with pytest.raises(ValueError, match=r"^--adamp_cosine is AdamP's heuristic; it needs "
                       r"--method=adamp, got --method=toy\.$"):
      Config(method="toy", optimizer="adam", schedule="cosine", adamp_cosine=True).validate()
    Config(method="toy", optimizer="adam", schedule="cosine").validate()
    assert "toy" in methods.names() and "toy" in methods.help_text()
  assert "toy" not in methods.names()


def test_a_name_is_registered_once():
  with pytest.raises(ValueError, match="--method=l2 is already registered"):
    methods.register(dataclasses.replace(methods.get("l2")))


def test_the_old_messages_are_unchanged():
  for config, message in (
      (Config(method="hyperball"), "--method=hyperball is Hyperball Adam (AdamH); it needs "
                                   "--optimizer=adam, got --optimizer=sgd."),
      (Config(method="exp_lr", optimizer="adam"),
       "--method=exp_lr is SGD's twin of coupled L2 (Li & Arora 2019); it needs "
       "--optimizer=sgd, got --optimizer=adam."),
      (Config(method="exp_lr", schedule="cosine"),
       "--method=exp_lr replaces a constant learning rate with its exponentially growing "
       "equivalent; it needs --schedule=constant, got --schedule=cosine."),
      (Config(method="nero", ungrouped_lr=0.1),
       "--method=nero has one learning rate for every parameter: drop --ungrouped_lr."),
      (Config(method="l2", corrected_decay=True),
       "--corrected_decay corrects decoupled weight decay; it needs --method=decoupled, got "
       "--method=l2."),
      (Config(method="spherical", lam=0.1),
       "--lam=0.1 has no meaning with --method=spherical: spherical keeps no L2 "
       "coefficient. Drop --lam, or use --method=l2 or --method=decoupled."),
  ):
    with pytest.raises(ValueError) as e:
      config.validate()
    assert str(e.value) == message


# Where method names are data on purpose: the registry, and the comparison's table of
# recipes (which names the entries its report writes about).
_NAME_TABLES = ("methods.py", os.path.join("compare", "recipes.py"))


def _method_name_branches(source: str, names: set) -> list:
  """``[(line, text)]`` where ``source`` compares something with a method name, or loops over
  a literal list of them: ``x == "l2"``, ``m in ("l2", "spherical")``, ``for name in
  ("decoupled", "corrected")``, in any variable's name. Comparisons with a normalization or
  group kind (``norm == "none"``, ``kind == "none"``: "none" is also their value) are not."""
  import ast  # pylint: disable=g-import-not-at-top
  tree = ast.parse(source)
  named = lambda node: (isinstance(node, ast.Constant) and node.value in names) or (
      isinstance(node, (ast.Tuple, ast.List, ast.Set)) and any(named(e) for e in node.elts))
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Compare):
      sides = [node.left, *node.comparators]
      others = " ".join(ast.get_source_segment(source, n) or "" for n in sides if not named(n))
      if any(named(n) for n in sides) and not any(w in others for w in ("norm", "kind")):
        found.append(node.lineno)
    elif isinstance(node, (ast.For, ast.comprehension)) and named(node.iter):
      found.append(node.iter.lineno)
  lines = source.splitlines()
  return [(n, lines[n - 1].strip()) for n in sorted(set(found))]


def test_no_module_of_experiments_branches_on_a_method_name():
  """Outside the registry and the comparison's table, no comparison with a method name
  (``best != "spherical"``, ``method in ("l2", ...)``), no loop over a literal list of them
  (``for name in ("decoupled", "corrected")``), and no ``METHODS = (...)`` name table: a
  method added to the registry must need no edit elsewhere."""
  import re  # pylint: disable=g-import-not-at-top
  names = set(methods.names())
  root = os.path.join(runs.REPO, "experiments")
  table = re.compile(r"[A-Z_]*METHODS\s*=\s*\(")
  checked = 0
  for folder, _, files in os.walk(root):
    for name in files:
      path = os.path.join(folder, name)
      if not name.endswith(".py") or os.path.relpath(path, root) in _NAME_TABLES:
        continue
      with open(path) as f:
        source = f.read()
      checked += 1
      assert not _method_name_branches(source, names), (path, _method_name_branches(
          source, names))
      assert not table.search(source), path
  assert checked > 20


@pytest.mark.parametrize("source, caught", [
    ('if method == "l2":\n  pass\n', True),
    ('if "spherical" != best:\n  pass\n', True),
    ('ok = recipe in ("l2", "nero")\n', True),
    ('for name in ("decoupled", "corrected"):\n  pass\n', True),
    ('xs = [f(n) for n in ["l2", "exp_lr"]]\n', True),
    ('if norm == "none":\n  pass\n', False),  # --norm's value, not a method
    ('config = Config(method="l2")\n', False),  # data: a run's settings
])
def test_the_method_name_scan_catches_branches_and_name_loops(source, caught):
  assert bool(_method_name_branches(source, set(methods.names()))) == caught


def test_the_registries_stand_below_the_config():
  """``experiments.methods`` and ``experiments.tasks`` import nothing of
  ``experiments.config`` (which imports them): no import cycle."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  result = subprocess.run(
      [sys.executable, "-c", "import sys, experiments.methods, experiments.tasks; "
       "print(sorted(m for m in sys.modules if m.startswith('experiments.')))"],
      capture_output=True, text=True, timeout=120, cwd=runs.REPO)
  assert result.returncode == 0, result.stderr[-2000:]
  loaded = result.stdout.strip()
  assert "experiments.methods" in loaded and "experiments.tasks" in loaded
  assert "experiments.config" not in loaded, loaded

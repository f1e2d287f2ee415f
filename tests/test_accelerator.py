"""benchmarks.accelerator and benchmarks.scaling run, and write sane, complete results.

The accelerator command at ``--size=tiny`` (every part but g, small models, on
the CPU) checks the command that an accelerator will run, not its figures; so do
the scaling script's small size and the transformer's groups. No timing is
asserted: the figures are measured by running the commands (README,
"Performance"). Part g (the LM reproduction, about a minute more on a CPU; its
tiny size is ``tests/test_reproduce_lm.py``'s) is tested in this process: its
estimate, its skip, and what it records of a run.
"""

import json
import math
import os
import re
import subprocess
import sys

import jax
import pytest
from flax import nnx

import normreg
from experiments import reproduce

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `pytest` does not put the repository root (benchmarks' parent) on sys.path.
sys.path.insert(0, ROOT)
from benchmarks import accelerator  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import transformer as tf_lib  # pylint: disable=g-import-not-at-top,wrong-import-position


def _run(module, *flags):
  return subprocess.run([sys.executable, "-m", module, *flags], capture_output=True,
                        text=True, timeout=1500, cwd=ROOT)


def _positive(x):
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_tiny_run_measures_every_part(tmp_path):
  # A generous budget: on a loaded CI machine nothing may be skipped for time.
  result = _run("benchmarks.accelerator", "--size=tiny", f"--out={tmp_path}",
                "--budget_s=1000", "--parts=a,b,c,d,e,f")
  assert result.returncode == 0, result.stderr[-3000:]
  r = json.loads((tmp_path / "results.json").read_text())
  tiny = accelerator.SIZES["tiny"]
  # Nothing skipped but the LM's combination that Config.validate refuses, with its reason.
  assert [(s["part"], s["what"]) for s in r["skipped"]] == [("f_lm", "hyperball:muon")]
  assert r["skipped"][0]["why"].startswith("Config.validate refuses it: --method=hyperball "
                                           "has no Muon form yet")
  assert not r["tensorflow_imported"]
  parts = r["parts"]
  tables = {t["table"]: t for t in parts["a_step_overhead"]}
  wanted = {name: methods or accelerator.METHODS for name, methods in tiny.methods.items()}
  assert wanted["a_unscanned"] == accelerator.METHODS  # every method, on one table at least
  assert set(tables) == set(wanted)
  assert len(accelerator.METHODS) == 10 and "hyperball:adam" in accelerator.METHODS
  for name, methods in wanted.items():
    rows = tables[name]["rows"]
    assert [row["method"] for row in rows] == list(methods), name
    for row in rows:
      assert row["base"] == ("none:adam" if row["method"].endswith(":adam") else "none")
      assert _positive(row["median_ms"]) and _positive(row["base_median_ms"])
      # The timings cannot be reproduced here; what is checked is what the table makes of
      # them: the ratio is the method over its base (not base over method), and "ok" holds
      # against the target the docs state for a CPU (1.05; 1.02 on an accelerator).
      assert row["ratio"] == pytest.approx(row["median_ms"] / row["base_median_ms"])
      assert row["target"] == 1.05
      assert row["ok"] == (row["median_ms"] <= 1.05 * row["base_median_ms"])
  for grid, runs in zip(parts["b_sweep"], tiny.sweep["runs"]):
    assert grid["runs"] == runs
    assert [row["how"] for row in grid["rows"]] == ["vmap", "sequential", "separate"]
    assert all(_positive(row["speedup_vs_separate"]) for row in grid["rows"])
    assert grid["rows"][-1]["speedup_vs_separate"] == 1.0
  assert [(t["model"], t["width"]) for t in parts["c_throughput"]] == list(tiny.throughput)
  assert [t["from"] for t in parts["c_throughput"]] == ["measured here", "part a"]
  assert all(_positive(t["images_per_s"]) for t in parts["c_throughput"])
  # Four grouped leaves per block; scanned, the same four with a layers axis.
  assert [d["grouped"] for d in parts["d_detection"]] == [4 * tiny.transformer["layers"], 4]
  assert all(_positive(d["detection_s"]) and _positive(d["ratio_to_first_fwd_bwd"])
             for d in parts["d_detection"])
  claims = parts["e_claims"]
  assert claims["size"] == "smoke" and [u["runs"] for u in claims["units"]] == [5, 9]
  assert set(claims["verdicts"]) == {"2", "3", "3b"}
  for key, verdict in claims["verdicts"].items():
    assert verdict["criterion"] == reproduce.CRITERIA[key]
  # One seed (smoke): claim 2 has no noise estimate, hence no verdict.
  assert claims["verdicts"]["2"]["holds"] is None
  # Claims 3 and 3b: each verdict follows from the numbers it gives, by the criterion's own
  # words (every angle within 15% of the theory; the eta/||w|| ratio within 15% of its
  # prediction), re-derived here from its text: a verdict that ignored its numbers fails.
  why = claims["verdicts"]["3"]["why"]
  inside, total, low, high = re.fullmatch(
      r"(\d+) of (\d+) angles within 15% of the theory \(ratios ([\d.]+) to ([\d.]+)\)",
      why).groups()
  assert claims["verdicts"]["3"]["holds"] == (inside == total)
  low, high = float(low), float(high)  # printed to two decimals: 5e-3 of rounding
  if inside == total:
    assert abs(low - 1) <= 0.155 and abs(high - 1) <= 0.155, why
  else:
    assert low < 0.855 or high > 1.145, why
  measured, predicted = map(float, re.fullmatch(
      r"eta/\|\|w\|\| ratio ([\d.]+) against ([\d.]+)", claims["verdicts"]["3b"]["why"]).groups())
  assert claims["verdicts"]["3b"]["holds"] == (abs(measured / predicted - 1) <= 0.15)
  # f: each base optimizer's tokens/s (batch * seq_len per step), each method against its
  # base (Muon's against none:muon).
  lm = parts["f_lm"]
  tokens = tiny.lm["batch"] * tiny.lm["seq_len"]
  assert [t["optimizer"] for t in lm["throughput"]] == ["sgd", "adam", "muon"]
  for t in lm["throughput"]:
    assert t["tokens_per_step"] == tokens and _positive(t["tokens_per_s"])
    assert t["tokens_per_s"] == pytest.approx(tokens / (t["median_ms"] / 1e3))
    assert _positive(t["first_call_s"])
  rows = lm["ratios"]["rows"]
  assert [row["method"] for row in rows] == ["l2", "decoupled:muon", "hyperball:adam"]
  assert [row["base"] for row in rows] == ["none", "none:muon", "none:adam"]
  for row in rows:
    assert _positive(row["ratio"]) and _positive(row["median_ms"])
    assert row["ratio"] == pytest.approx(row["median_ms"] / row["base_median_ms"])
  assert parts["g_reproduce_lm"] == {}  # not selected
  text = (tmp_path / "results.md").read_text()
  for section in ("## a.", "## b.", "## c.", "## d.", "## e.", "## f.", "## g.", "## Skipped"):
    assert section in text
  assert "| muon |" in text and "| decoupled:muon | none:muon |" in text


def test_what_the_budget_cannot_hold_is_skipped_and_says_why(tmp_path):
  result = _run("benchmarks.accelerator", "--size=tiny", f"--out={tmp_path}",
                "--budget_s=0.01", "--parts=a,e,g")
  assert result.returncode == 0, result.stderr[-3000:]
  r = json.loads((tmp_path / "results.json").read_text())
  assert [s["part"] for s in r["skipped"]] == ["a_float32", "a_bfloat16", "a_unscanned",
                                               "a_scanned", "e", "g"]
  assert all("s left" in s["why"] for s in r["skipped"])
  assert r["parts"]["a_step_overhead"] == [] and r["parts"]["e_claims"] == {}
  assert r["parts"]["g_reproduce_lm"] == {}
  text = (tmp_path / "results.md").read_text()
  assert "| e | the whole part |" in text and "| g | the whole part |" in text


def _part_f_adam(median_ms=2.0, first_call_s=1.5):
  """Part f's result as the command records it, for part g's estimate: the tiny LM,
  Adam's median step and first call."""
  model = {k: v for k, v in accelerator.SIZES["tiny"].lm.items() if k != "methods"}
  return {"model": model, "throughput": [
      {"optimizer": "sgd", "median_ms": 1.0, "first_call_s": 1.0},
      {"optimizer": "adam", "median_ms": median_ms, "first_call_s": first_call_s}]}


def _budget_with(seconds_left):
  budget = accelerator.Budget(1e9)
  budget.end = accelerator.time.perf_counter() + seconds_left
  return budget


def test_the_lm_reproduction_is_estimated_from_part_f_and_skipped_if_it_does_not_fit(
    tmp_path, monkeypatch):
  monkeypatch.setattr(accelerator.reproduce_lm, "run", lambda *a, **k: pytest.fail("ran"))
  budget = _budget_with(60.0)
  g = accelerator.part_lm_reproduction(accelerator.SIZES["tiny"], budget, 10.0,
                                       _part_f_adam(), str(tmp_path), str(tmp_path))
  est = g["estimate"]
  # reproduce_lm's tiny size: 3 equilibrium runs (96 steps), 5 x 3 rescaling (5 steps),
  # 4 held-angle (24 steps), and claim 4's one method on 3 rates and 1 more seed (40
  # steps); its model (seq 32, batch 8) takes more FLOPs than part f's (seq 16, batch 4):
  # the step is scaled up, the blocks (1) are not.
  assert g["size"] == "tiny" and est["runs"] == 3 + 15 + 4 + 4
  steps = 3 * 96 + 15 * 5 + 4 * 24 + 4 * 40
  assert est["planned_steps"] == accelerator.reproduce_lm.planned_steps("tiny") == steps
  assert est["from"] == "part f" and est["flops_scale"] > 2
  assert est["step_ms"] == pytest.approx(2.0 * est["flops_scale"])
  assert est["compile_s_per_run"] == pytest.approx(3 * 1.5)
  assert est["estimated_s"] == pytest.approx(
      accelerator.LM_FIXED_S + accelerator.LM_STEP_OVERHEAD * steps * est["step_ms"] / 1e3
      + 26 * 4.5)
  assert "verdicts" not in g and not (tmp_path / "reproduce_lm").exists()
  skip, = budget.skipped
  assert skip["part"] == "g_reproduce_lm" and f"size tiny ({steps} steps, 26 runs)" in skip["what"]
  assert re.search(r"estimated \d+ s .* \d+ s left, 10 s of them kept", skip["why"])


def test_the_lm_reproduction_records_its_verdicts_and_report(tmp_path, monkeypatch):
  calls = []

  def fake_run(size, workdir, report_dir, command=""):
    calls.append((size, workdir, report_dir))
    os.makedirs(report_dir)
    (tmp_path / "out" / "reproduce_lm" / "RESULTS.md").write_text("report")
    return {"verdicts": {k: {"holds": k != "4", "summary": f"claim {k}"}
                         for k in ("1", "2", "3", "4")}}

  monkeypatch.setattr(accelerator.reproduce_lm, "run", fake_run)
  budget = _budget_with(1e4)
  out, runs = tmp_path / "out", tmp_path / "runs"
  g = accelerator.part_lm_reproduction(accelerator.SIZES["tiny"], budget, 0.0,
                                       _part_f_adam(), str(runs), str(out))
  assert calls == [("tiny", str(runs / "reproduce_lm" / "tiny"), str(out / "reproduce_lm"))]
  assert budget.skipped == [] and "error" not in g
  assert g["report"] == str(out / "reproduce_lm" / "RESULTS.md")
  assert g["runs_dir"] == str(runs / "reproduce_lm" / "tiny")
  assert set(g["verdicts"]) == {"1", "2", "3", "4"}
  for key, verdict in g["verdicts"].items():
    assert verdict["criterion"] == accelerator.reproduce_lm.CRITERIA[key]
    assert verdict["holds"] == (key != "4") and verdict["summary"] == f"claim {key}"
  text = accelerator.markdown({
      "size": "tiny", "command": "-", "machine": "-", "versions": {"jax": "-"},
      "seconds": 1.0, "budget_s": 2.0, "parts": {"g_reproduce_lm": g}, "skipped": []})
  assert "| 4 | does not hold | claim 4 |" in text and "RESULTS.md" in text

  # A run that fails is recorded, not raised: the parts before it keep their figures.
  monkeypatch.setattr(accelerator.reproduce_lm, "run",
                      lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
  g = accelerator.part_lm_reproduction(accelerator.SIZES["tiny"], budget, 0.0,
                                       _part_f_adam(), str(runs), str(out))
  assert g["error"] == "RuntimeError: boom" and "verdicts" not in g and "report" not in g


@pytest.mark.parametrize("flag, message", [
    ("--parts=a,z", "--parts"), ("--data_dir=/nonexistent", "is not a folder")])
def test_bad_flags_are_refused(tmp_path, flag, message):
  result = _run("benchmarks.accelerator", "--size=tiny", f"--out={tmp_path}", flag)
  assert result.returncode != 0 and message in result.stderr


def test_the_budget_takes_what_fits_and_keeps_the_reserve():
  budget = accelerator.Budget(1e9)
  budget.end = accelerator.time.perf_counter() + 100.0
  safety = accelerator.SAFETY
  assert safety == 1.2
  # (100 - 28) / 1.2 = 60 s of room: 5 s fixed, then 5 of 10 s each (only 4 wanted).
  assert accelerator.how_many_fit(budget, 10.0, 4, 5.0, 28.0) == 4
  assert accelerator.how_many_fit(budget, 10.0, 9, 5.0, 28.0) == 5
  assert accelerator.how_many_fit(budget, 10.0, 9, 70.0, 28.0) == 0
  assert budget.fits(59.0, 28.0) and not budget.fits(61.0, 28.0)


@pytest.mark.parametrize("scan", [False, True])
def test_transformer_groups_are_found_as_documented(scan):
  model = tf_lib.Transformer(layers=2, width=8, heads=2, vocab=7, seq_len=4, scan=scan,
                             rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  tokens = tf_lib.random_tokens(4, 4, vocab=7)
  groups = normreg.find_scale_invariant(lambda p, x: nnx.merge(graphdef, p)(x), params,
                                        tokens[:, :-1])
  found = {path: g for path, g in zip(normreg.param_paths(params),
                                       jax.tree.leaves(groups, is_leaf=lambda g: g is None))
           if g is not None}
  blocks = [f"blocks/{i}/" for i in range(2)] if not scan else ["blocks/"]
  stack = 1 if scan else 0
  expected = {}
  for b in blocks:
    expected[b + "q/kernel"] = expected[b + "k/kernel"] = normreg.tensor(stack=stack)
    for leaf in ("kernel", "bias"):
      expected[b + "mlp_in/" + leaf] = normreg.tensor(stack=stack, joint=b + "mlp_in")
  assert found == expected
  by_rules = normreg.groups_from_rules(params, tf_lib.rules(scan), log=False)
  assert jax.tree.leaves(by_rules, is_leaf=lambda g: g is None) == jax.tree.leaves(
      groups, is_leaf=lambda g: g is None)
  assert set(expected) == {b + leaf for b in blocks for leaf in tf_lib.GROUPED_PER_BLOCK}


def test_scaling_small_writes_its_table_and_figure(tmp_path):
  result = _run("benchmarks.scaling", "--size=small", f"--out={tmp_path}")
  assert result.returncode == 0, result.stderr[-3000:]
  r = json.loads((tmp_path / "scaling.json").read_text())
  assert [(m["layers"], m["grouped"]) for m in r["models"]] == [(2, 8)]
  for m in r["models"]:
    assert _positive(m["detection_ratio"]) and m["params"] > 0
    for name, base in (("spherical_sgd", "sgd"), ("l2_sgd", "sgd"), ("metrics_sgd", "sgd"),
                       ("adamp", "adamw")):
      v = m["variants"][name]
      assert v["base"] == base and _positive(v["step_ratio"]) and _positive(v["compile_ratio"])
      assert _positive(m["variants"][base]["compile_s"])
  assert (tmp_path / "scaling.png").stat().st_size > 10_000
  assert "| 8 |" in (tmp_path / "scaling.md").read_text()


def test_scaling_detection_only_prints_one_ratio_per_model():
  result = _run("benchmarks.scaling", "--size=small", "--detection_only", "--models=2x16")
  assert result.returncode == 0, result.stderr[-3000:]
  line, = [l for l in result.stdout.splitlines() if l.startswith("2 x 16:")]
  found = re.search(r"detection ([\d.e+-]+) s / first forward-backward ([\d.e+-]+) s = "
                    r"([\d.]+)", line)
  assert found, line
  det, fwd, ratio = map(float, found.groups())
  assert det > 0 and fwd > 0 and abs(det / fwd - ratio) < 0.02 * ratio + 0.01
  assert "8 grouped leaves" in line

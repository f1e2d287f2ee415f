"""The language-model reproduction (``experiments.reproduce_lm``) at its tiny size.

The command trains every claim's runs and writes a verdict for each; its theory values
are checked against the closed forms written out here (not read from the library), the
exactness of SGD's c-rescaling against zero, and the report regenerates byte for byte
from its cached runs without training any of them again.
"""

import json
import math
import os

import pytest

from experiments import reproduce_lm
from normreg import theory

import runs


def test_each_decay_is_set_to_settle_before_the_window():
  """``equilibrium_lam`` puts SETTLE * 1.25 time constants before the last quarter, with
  the time constants written out: SGD + coupled L2 (1-mu)/(4 lr (2 lam)), AdamW and Muon
  1/(2 lr wd)."""
  steps = 800
  by_hand = {"l2": lambda lr, lam: (1 - reproduce_lm.MOMENTUM) / (8 * lr * lam),
             "decoupled": lambda lr, lam: 1 / (2 * lr * lam)}
  for name, (method, optimizer, lr) in reproduce_lm.EQUILIBRIUM.items():
    lam = reproduce_lm.equilibrium_lam(method, optimizer, lr, steps)
    assert by_hand[method](lr, lam) == pytest.approx(steps * 0.75 / (4 * 1.25), rel=2e-3), name


@pytest.mark.slow
def test_the_tiny_reproduction_judges_every_claim_and_regenerates_identically(tmp_path):
  workdir, report = tmp_path / "runs", tmp_path / "report"
  result = runs.command("experiments.reproduce_lm", "--size=tiny", f"--workdir={workdir}",
                        f"--report_dir={report}", timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(report / "results.json") as f:
    r = json.load(f)
  assert set(r["verdicts"]) == {"1", "2", "3", "4"}
  assert all(isinstance(v["holds"], bool) and v["summary"] for v in r["verdicts"].values())

  # Claim 1's theory, written out: AdamW sqrt(2 eta wd (1-b1)/(1+b1)) with b1 = 0.9, SGD
  # with coupled L2 sqrt(2 eta (2 lam) / (1+mu)), each at the recipe's own lr and decay.
  eq = r["1_equilibrium"]
  adamw, sgd = eq["adamw"], eq["sgd"]
  assert adamw["predicted"] == pytest.approx(
      math.sqrt(2 * adamw["lr"] * adamw["lam"] * 0.1 / 1.9), rel=1e-6)
  assert sgd["predicted"] == pytest.approx(math.sqrt(4 * sgd["lr"] * sgd["lam"] / 1.9), rel=1e-6)
  assert adamw["time_constant"] == pytest.approx(1 / (2 * adamw["lr"] * adamw["lam"]), rel=1e-6)
  # Muon's: sqrt(2 lr wd / S), S at each matrix as Muon orthogonalizes it, written out for
  # width 16 and 2 heads of 8: a head of q, k or v (16, 8), o (2*8, 16), up (16, 64),
  # down (64, 16).
  muon = eq["muon"]
  shapes = {"q": (16, 8), "k": (16, 8), "v": (16, 8), "o": (16, 16), "up": (16, 64),
            "down": (64, 16)}
  for name, value in muon["predicted_each"].items():
    part = next(p for p in reversed(name.split("/")) if not p.isdigit())
    s = theory.muon_update_statistics(shapes[part], steps=4000)[1]
    assert value == pytest.approx(math.sqrt(2 * muon["lr"] * muon["lam"] / s), rel=1e-9), name
  assert len(muon["predicted_each"]) == 2 + 2 + 4  # q, k per head; v, o, up, down
  # Muon's norm scales are Adam's, listed apart; every other grouped weight is judged.
  assert eq["muon"]["apart"] and all(n.endswith("scale") for n in eq["muon"]["apart"])
  assert set(eq["muon"]["ratios"]) | set(eq["muon"]["apart"]) == set(eq["adamw"]["ratios"])

  # Claim 2: SGD's (c^2 lr, lam/c^2, c w0) is exact in float arithmetic at c = 2 (every
  # product a power of two); the control, rates not rescaled, is another function.
  rs = r["2_rescaling"]
  assert rs["sgd"]["deviation"] == 0.0
  assert all(v["control"] > 1e-2 for v in rs.values())
  assert rs["adamw"]["deviation"] < 1e-3 and rs["muon"]["deviation"] < 1e-3
  # With --adam_eps=1e-30 AdamW's and Muon's (c lr, wd/c, c w0) are exact too: what is left
  # at the default eps is eps (and --adam_eps reaches both directions).
  assert rs["adamw_eps0"]["deviation"] == 0.0 and rs["muon_eps0"]["deviation"] == 0.0
  assert rs["adamw"]["deviation"] > 0.0

  # Claim 3: AdamH's normalized step turns each weight by arctan(lr) from step 1.
  adamh = r["3_held_angle"]["adamh"]
  assert adamh["target"] == pytest.approx(math.atan(adamh["lr"]), rel=1e-6)
  assert all(e == pytest.approx(adamh["target"], rel=0.05) for e in adamh["early"].values())

  # Claim 4: AdamW's row, its grid interior or extended, every seed scored.
  row = r["4_comparison"]["adamw"]
  assert len(row["finals"]) == reproduce_lm.SIZES["tiny"]["seeds"]
  assert row["best_lr"] == min((float(k) for k in row["grid"]), key=lambda k: row["grid"][
      f"{k:g}"])
  assert all(2 < b < 8.5 for b in row["finals"])

  # The report regenerates from the cache: same bytes, nothing trained again.
  stamps = {d: os.path.getmtime(workdir / "tiny" / d / "metrics.jsonl")
            for d in os.listdir(workdir / "tiny")}
  again = reproduce_lm.run("tiny", str(workdir / "tiny"), str(tmp_path / "again"),
                           command=r["command"])
  assert again["verdicts"] == r["verdicts"]
  for name in ("RESULTS.md", "results.json"):
    assert (tmp_path / "again" / name).read_bytes() == (report / name).read_bytes(), name
  assert stamps == {d: os.path.getmtime(workdir / "tiny" / d / "metrics.jsonl")
                    for d in os.listdir(workdir / "tiny")}
  text = (report / "RESULTS.md").read_text()
  assert all(f"## {k}." in text for k in "1234") and "figures/equilibrium_angle.png" in text

"""benchmarks.step_overhead runs with one command and prints its three tables.

Tiny sizes (a width-4 CNN, batch 8, one or two timed steps): this checks the
script, not the figures; the figures are measured by running it
(docs/performance.md).
"""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*flags):
  return subprocess.run([sys.executable, "-m", "benchmarks.step_overhead", *flags],
                        capture_output=True, text=True, timeout=600, cwd=ROOT)


@pytest.mark.slow
def test_prints_overhead_and_grid_tables():
  result = _run("--model=cnn", "--width=4", "--batch_sizes=8", "--steps=2", "--warmup=1",
                "--tables=overhead,grid", "--grid_size=2", "--grid_rounds=1",
                "--recipes=l2,decoupled,spherical,elr_rescale,tangent,hyperball:adam")
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert "1. step overhead: cnn (width 4)" in out
  for recipe in ("l2", "decoupled", "spherical", "elr_rescale", "tangent", "hyperball:adam"):
    row = re.search(rf"^{recipe}\s+8\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(ok|over)$", out,
                    re.MULTILINE)
    assert row, f"no overhead row for {recipe}:\n{out}"
    assert float(row.group(3)) > 0
  base = re.search(r"^none \(base.*\s1\.000\s+-$", out, re.MULTILINE)
  assert base, out
  assert "3. a grid of 2 l2 recipes" in out
  for how in (r"vmap: 2 runs in one vmapped step \(--strategy=vmap\)",
              r"vmap, looped by lax.map \(--strategy=vmap --vmap_size=1\)",
              r"sequential: one single-run step, run after run \(--strategy=sequential\)",
              r"auto \(--strategy=auto, the default\) chose (vmap|sequential)",
              r"2 separate runs \(the trainer's single-run step, as experiments.train\)"):
    speedup = re.search(rf"^{how}\s+[\d.]+\s+[\d.]+\s+([\d.]+)$", out, re.MULTILINE)
    assert speedup and float(speedup.group(speedup.lastindex)) > 0, out


@pytest.mark.parametrize("flag, message", [
    ("--batch_sizes=0", "--batch_sizes and --steps must be positive"),
    ("--batch_sizes=x", "--batch_sizes"),
    ("--tables=speed", "--tables: unknown"),
    ("--recipes=l2,sharpness", "--recipes: 'sharpness'"),
])
def test_bad_flags_are_refused(flag, message):
  result = _run(flag)
  assert result.returncode != 0
  assert message in result.stderr

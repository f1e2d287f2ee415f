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


def test_stacking_compares_programs_that_compute_the_same_values():
  """benchmarks.stacking times like against like: each program's values are numpy's."""
  sys.path.insert(0, ROOT)
  from benchmarks import stacking  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  xs = [rng.standard_normal((64, 64)).astype(np.float32) for _ in range(3)]
  double = [2 * x for x in xs]
  scaled = [x * np.sqrt(np.sum(x * x, axis=0, keepdims=True)) for x in xs]
  for name, program in stacking.programs(3).items():
    want = scaled if name.endswith("norm") else double
    got = program([jnp.asarray(x) for x in xs])
    assert len(got) == 3, name
    for g, w in zip(got, want):
      np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, err_msg=name)
  result = subprocess.run([sys.executable, "-m", "benchmarks.stacking", "--leaves=3"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = re.findall(r"^\s+3 leaves\s+(\w+)\s+trace\s+[\d.]+ s\s+XLA compile\s+[\d.]+ s\s+"
                    r"run\s+[\d.]+ ms$", result.stdout, re.MULTILINE)
  assert rows == list(stacking.programs(3)), result.stdout

"""Time to find the groups: ``python -m benchmarks.detection``.

Times :func:`normreg.find_scale_invariant` on the launcher's models, as the
launcher calls it (``experiments.trainer.find_groups``: NNX split, training
mode, a probe batch of 64 random 32x32x3 images), in a fresh process per
model so that nothing is cached: the first call (tracing and compiling the one
vmapped ``jax.vjp`` program, plus the numpy sums) and a second call on the same
model (compiled again, since the function is a new closure: what a second run
of the launcher pays). Prints one table row per model: parameter leaves,
groups found, seconds.

Target (issue "normreg in every JAX training setup"): under 5 s for the
paper's CNN (width 64) on a 2-core CPU.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time

from absl import app
from absl import flags

def define_flags() -> None:
  """This command's flags: defined when it runs, not on import (flag names repeat)."""
  flags.DEFINE_list("models", ["cnn:64:batch", "cnn:64:layer", "resnet20:16:batch",
                               "scan_cnn:16:batch"],
                    "MODEL:WIDTH:NORM entries to time.")


def time_one(model: str, width: int, norm: str) -> dict:
  """Builds ``model`` and times two ``find_scale_invariant`` calls (in this process)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from experiments import trainer  # pylint: disable=g-import-not-at-top
  from experiments.config import Config  # pylint: disable=g-import-not-at-top

  config = Config(model=model, width=width, norm=norm)
  net = trainer.create_model(config, 10, 3)
  graphdef, params, rest = nnx.split(net, nnx.Param, ...)
  images = jax.numpy.asarray(np.random.default_rng(0).normal(size=(64, 32, 32, 3)),
                             jax.numpy.float32)
  times = []
  for _ in range(2):
    start = time.perf_counter()
    groups = trainer.find_groups(config, graphdef, params, rest, images)
    times.append(time.perf_counter() - start)
  leaves = jax.tree.leaves(groups, is_leaf=lambda g: g is None)
  return {"model": f"{model} (width {width}, {norm})", "leaves": len(leaves),
          "grouped": sum(g is not None for g in leaves), "first_s": times[0],
          "second_s": times[1]}


FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 2 and argv[1] == "--one":
    model, width, norm = argv[2].split(":")
    print(json.dumps(time_one(model, int(width), norm)))
    return
  import jax  # pylint: disable=g-import-not-at-top
  print(f"jax {jax.__version__}, {jax.default_backend()}, {platform.machine()}, "
        f"{jax.devices()[0].device_kind}")
  print("| model | leaves | grouped | first call (s) | second call (s) |")
  print("| --- | --- | --- | --- | --- |")
  for entry in FLAGS.models:
    out = subprocess.run([sys.executable, "-m", "benchmarks.detection", "--", "--one", entry],
                         capture_output=True, text=True, check=True)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"| {row['model']} | {row['leaves']} | {row['grouped']} | {row['first_s']:.2f} | "
          f"{row['second_s']:.2f} |", flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)

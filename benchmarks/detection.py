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

A second table times it on ``normreg.models.Transformer`` (``--transformers``,
``LAYERS:WIDTH:LAYOUT`` with a layout of ``normreg.models.transformer.LAYOUTS``),
unscanned, at its own initialization (std 0.02), on 4 sequences of 64 random
tokens, each in a fresh process: the first ``find_scale_invariant`` call
(tracing the model twice, once to find its normalizations' epsilons, then
compiling and running the one vmapped ``jax.vjp`` program at the model's
epsilons and at eps -> 0) against the first call (compile and run) of a
jitted forward-backward pass of the next-token loss. Target (issue "normreg on
today's transformers"): detection within 3x of the forward-backward pass on a
12-layer model of at least 100 leaves. The load average is printed with each row.
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
  flags.DEFINE_list("transformers", ["12:256:gemma3", "12:256:gemma3_fused", "12:256:olmo2",
                                     "12:256:ngpt"],
                    "LAYERS:WIDTH:LAYOUT transformers to time (normreg.models.transformer).")


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


def time_transformer(layers: int, width: int, layout: str) -> dict:
  """Builds a ``normreg.models.Transformer`` and times detection against a forward-backward
  pass (both first calls, in this process)."""
  import os  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from normreg import detect  # pylint: disable=g-import-not-at-top
  from normreg.models import transformer  # pylint: disable=g-import-not-at-top

  model = transformer.Transformer(layers=layers, width=width, heads=4, rngs=nnx.Rngs(0),
                                  **transformer.LAYOUTS[layout])
  graphdef, params = nnx.split(model, nnx.Param)
  tokens = jax.random.randint(jax.random.key(1), (4, 65), 0, 256)
  fn = lambda p, x: nnx.merge(graphdef, p)(x)
  load = os.getloadavg()[0]
  start = time.perf_counter()
  report = detect.scale_invariance_report(fn, params, tokens[:, :-1])
  detection_s = time.perf_counter() - start

  def loss(p):
    logits = fn(p, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  start = time.perf_counter()
  jax.block_until_ready(jax.jit(jax.grad(loss))(params))
  fwd_bwd_s = time.perf_counter() - start
  leaves = list(report.leaves.values())
  return {"model": f"{layout}, {layers} x {width}", "leaves": len(leaves),
          "grouped": sum(leaf.group is not None for leaf in leaves),
          "eps_dominated": len(report.eps_dominated()),
          "params": sum(int(x.size) for x in jax.tree.leaves(params)),
          "detection_s": detection_s, "fwd_bwd_s": fwd_bwd_s,
          "load": (load + os.getloadavg()[0]) / 2, "dtype": str(jnp.float32.dtype)}


FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 2 and argv[1] == "--one":
    model, width, norm = argv[2].split(":")
    print(json.dumps(time_one(model, int(width), norm)))
    return
  if len(argv) > 2 and argv[1] == "--one_transformer":
    layers, width, layout = argv[2].split(":")
    print(json.dumps(time_transformer(int(layers), int(width), layout)))
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
  if not FLAGS.transformers:
    return
  print("\n| transformer | params | leaves | grouped | eps-dominated | detection (s) | "
        "forward-backward (s) | ratio | load |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
  for entry in FLAGS.transformers:
    out = subprocess.run([sys.executable, "-m", "benchmarks.detection", "--",
                          "--one_transformer", entry], capture_output=True, text=True,
                         check=True)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"| {row['model']} | {row['params'] / 1e6:.1f}M | {row['leaves']} | "
          f"{row['grouped']} | {row['eps_dominated']} | {row['detection_s']:.2f} | "
          f"{row['fwd_bwd_s']:.2f} | {row['detection_s'] / row['fwd_bwd_s']:.2f} | "
          f"{row['load']:.1f} |", flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)

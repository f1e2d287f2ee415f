"""Why normreg reduces leaf by leaf: ``python -m benchmarks.stacking [--leaves=200,1000]``.

The obvious fix for a per-leaf cost (issue 31) is to stack the leaves of one shape and
reduce each stack in one operation: ``jnp.stack`` the ``N`` leaves, compute on the
``(N, ...)`` array, ``jax.lax.split`` it back. This script measures what XLA makes of
that, on ``N`` leaves of shape ``(64, 64)``, against the same computation leaf by leaf:

- ``per_leaf``: ``x * 2`` on each leaf;
- ``per_leaf_norm``: ``x * ||x||`` per unit (a reduction and a broadcast per leaf: what
  ``normreg.scale_by_weight_norm`` does);
- ``stacked``: ``x * 2`` on the stack, split back;
- ``stacked_norm``: ``x * ||x||`` per unit on the stack, split back;
- ``stacked_barrier``: as ``stacked``, with ``jax.lax.optimization_barrier`` around the
  stack and before the split, so that XLA cannot fuse the concatenation or the slices
  into the arithmetic.

For each: the trace (``jax.jit(f).lower``) and XLA compile seconds, and the median of 5
runs. Prints one line per program and ``N``. Nothing is cached (the persistent
compilation cache is switched off here).
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Sequence

from absl import app
from absl import flags

flags.DEFINE_list("leaves", ["200", "1000"], "Numbers of (64, 64) leaves to measure.")
FLAGS = flags.FLAGS


def programs(n: int) -> dict[str, Callable]:
  """The five programs of the module docstring, on ``n`` leaves."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  barrier = jax.lax.optimization_barrier

  def unstack(s):
    return [p.reshape(p.shape[1:]) for p in jax.lax.split(s, [1] * n)]

  def norm(x, axis):
    return jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))

  def stacked_times_norm(s):
    return s * norm(s, 1)

  return {
      "per_leaf": lambda xs: [x * 2 for x in xs],
      "per_leaf_norm": lambda xs: [x * norm(x, 0) for x in xs],
      "stacked": lambda xs: unstack(jnp.stack(xs) * 2),
      "stacked_norm": lambda xs: unstack(stacked_times_norm(jnp.stack(xs))),
      "stacked_barrier": lambda xs: unstack(barrier(barrier(jnp.stack(xs)) * 2)),
  }


def measure(n: int) -> list[dict]:
  """``[{program, leaves, trace_s, compile_s, run_ms}]`` for ``n`` leaves."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  xs = [jnp.full((64, 64), 1.0 + i) for i in range(n)]
  rows = []
  for name, f in programs(n).items():
    t0 = time.perf_counter()
    lowered = jax.jit(f).lower(xs)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    times = []
    for _ in range(5):
      t = time.perf_counter()
      jax.block_until_ready(compiled(xs))
      times.append(time.perf_counter() - t)
    rows.append({"program": name, "leaves": n, "trace_s": t1 - t0, "compile_s": t2 - t1,
                 "run_ms": 1e3 * statistics.median(times)})
  return rows


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_enable_compilation_cache", False)
  print(f"jax {jax.__version__}, {jax.default_backend()}, load {os.getloadavg()[0]:.1f}")
  for n in [int(n) for n in FLAGS.leaves]:
    for r in measure(n):
      print(f"{r['leaves']:5d} leaves  {r['program']:16s} trace {r['trace_s']:6.2f} s  "
            f"XLA compile {r['compile_s']:6.2f} s  run {r['run_ms']:7.2f} ms", flush=True)


if __name__ == "__main__":
  app.run(main)

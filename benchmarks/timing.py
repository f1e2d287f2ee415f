"""Timing helpers shared by the benchmarks: interleaved rounds, median and IQR.

A compared function is wrapped in :class:`Timed` (a step function, its state
and inputs); :func:`warm_up` calls each a few times untimed (the first call
compiles); :func:`interleave` then times them in rounds, one step each per
round, the order rotated every round, so that drift of a shared machine
(clock, other work) hits all of them alike. Every timed step ends with
``jax.block_until_ready``. Report the median and read the IQR.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import jax


def median(times: Sequence[float]) -> float:
  return statistics.median(times)


def iqr(times: Sequence[float]) -> float:
  """Interquartile range (0 for fewer than two times)."""
  if len(times) < 2:
    return 0.0
  q = statistics.quantiles(times, n=4)
  return q[2] - q[0]


@dataclasses.dataclass
class Timed:
  """A step function, its state, and its inputs; ``run()`` takes one step."""
  name: str
  step: Callable
  state: Any
  args: tuple
  times: list = dataclasses.field(default_factory=list)

  def run(self) -> None:
    self.state, _ = self.step(self.state, *self.args)
    jax.block_until_ready(self.state)

  def timed(self) -> None:
    t0 = time.perf_counter()
    self.run()
    self.times.append(time.perf_counter() - t0)

  @property
  def median(self) -> float:
    return median(self.times)

  @property
  def iqr(self) -> float:
    return iqr(self.times)


def warm_up(timed: Sequence[Timed], steps: int) -> None:
  """``steps`` (at least one) untimed calls of each: the first one compiles."""
  for t in timed:
    for _ in range(max(steps, 1)):
      t.run()


def interleave(timed: Sequence[Timed], rounds: int) -> None:
  """``rounds`` rounds of one timed step each, the order rotated every round."""
  for r in range(rounds):
    for i in range(len(timed)):
      timed[(i + r) % len(timed)].timed()


def loop_seconds(step: Callable, states: list, args_of: Callable[[int], tuple],
                 rounds: int) -> tuple[float, list]:
  """Median seconds of one step of every state, one after another from Python."""
  times = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    for i, state in enumerate(states):
      states[i], _ = step(state, *args_of(i))
    jax.block_until_ready(states)
    times.append(time.perf_counter() - t0)
  return statistics.median(times), states


def compile_seconds(fn: Callable, *args: Any) -> tuple[Callable, float, float]:
  """``(compiled, trace_s, compile_s)``: ``jax.jit(fn)`` traced and lowered (Python,
  tracing every transform), then compiled by XLA, each timed apart."""
  t0 = time.perf_counter()
  lowered = jax.jit(fn).lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  return compiled, t1 - t0, time.perf_counter() - t1


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
  """A plain-text table, first column left-aligned, the others right-aligned."""
  cells = [list(map(str, header))] + [[str(c) for c in row] for row in rows]
  widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
  print(f"\n{title}")
  for j, row in enumerate(cells):
    print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
    if j == 0:
      print("  ".join("-" * w for w in widths))
  sys.stdout.flush()


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  lines = ["| " + " | ".join(map(str, header)) + " |", "|" + " --- |" * len(header)]
  return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])

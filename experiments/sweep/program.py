"""One compiled program for the runs of one method: the shared graph, groups and
injected chain (:class:`Program`), each run's initial state, and the single-run
functions that the strategies vmap or loop.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import optax
from absl import logging

import normreg

from experiments import errors
from experiments import loop as loop_lib
from experiments import network
from experiments import steps as steps_lib
from experiments import tasks as tasks_lib
from experiments import trainer
from experiments.config import Config
from experiments.sweep.grid import recipe_for


# ------------------------------------------------------------------------- a program


@dataclasses.dataclass
class Program:
  """What the runs of one vmapped program share (one method and all other settings).

  Built by :func:`make_program` from the first run: its task, the NNX graph
  definitions, the scale-invariance groups and the injected optax chain (whose
  numbers come from each run's state).
  """
  config: Config
  task: tasks_lib.Task
  budget: loop_lib.Budget
  graphdef: Any
  eval_graphdef: Any
  groups: Any
  tx: optax.GradientTransformation
  n_train: int
  steps_per_epoch: int
  total_steps: int
  # Runs vectorized together by jax.vmap inside a step; None: all of the chunk.
  vmap_size: Optional[int] = None
  # (seed, id(dataset)) -> the seed's initial (params, rest).
  initial: dict = dataclasses.field(default_factory=dict, repr=False)
  _jitted: dict = dataclasses.field(default_factory=dict, repr=False)

  # The strategy the sweep chose for it ("vmap" or "sequential").
  strategy: Optional[str] = None
  # How many times each jitted function was traced (tests check "compiles once").
  traces: dict = dataclasses.field(default_factory=dict, repr=False)

  def jitted(self, name: str, per_run_data: bool, vmapped: bool = True) -> Callable:
    """The jitted train step, eval step or layer metrics, built once per program: every
    chunk of the program reuses one trace and one compiled executable. ``vmapped=False``
    gives the single-run function of the sequential strategy (:class:`_SequentialChunk`),
    also one trace for every run: the runs differ only in the values of their state."""
    key = (name, per_run_data, vmapped)
    if key not in self._jitted:
      one = {"train_step": run_step, "eval_step": run_eval_step,
             "layer_metrics": run_layer_metrics}[name](self)
      if vmapped:
        # (state, train, idx, key, stats); (params, rest, batch, weights, stats); (before,
        # after, lr): the task's data pytrees (train, batch, stats) have a run axis only
        # with per-run data.
        in_axes = {"train_step": (0, 0, 0, 0, 0), "eval_step": (0, 0, 0, None, 0),
                   "layer_metrics": (0, 0, 0)}[name]
        if name != "layer_metrics" and not per_run_data:
          data = (1, 4) if name == "train_step" else (2, 4)
          in_axes = tuple(None if i in data else a for i, a in enumerate(in_axes))
        one = (jax.vmap(one, in_axes=in_axes) if name == "layer_metrics"
               else over_runs(one, in_axes, self.vmap_size))

      def counted(*args, _fn=one, _key=key):
        self.traces[_key] = self.traces.get(_key, 0) + 1  # runs at trace time only
        return _fn(*args)

      donate = name == "train_step" and jax.default_backend() != "cpu"
      self._jitted[key] = jax.jit(counted, donate_argnums=0 if donate else ())
    return self._jitted[key]


def _same_groups(a: Any, b: Any) -> bool:
  is_none = lambda x: x is None
  return (jax.tree.structure(a, is_leaf=is_none) == jax.tree.structure(b, is_leaf=is_none)
          and jax.tree.leaves(a, is_leaf=is_none) == jax.tree.leaves(b, is_leaf=is_none))


def make_program(configs: Sequence[Config], datasets: Sequence[Any],
                 vmap_size: Optional[int] = None) -> Program:
  """The shared program of ``configs`` (one ``program_key``), ``datasets[i]`` run i's data
  (its task's, ``Task.load``).

  Per distinct seed, the model is built by ``network.init_model``, as
  ``train_and_evaluate`` builds it (groups found on the task's probe batch,
  ``--init_scale`` applied), and kept as the seed's initial variables. The groups decide the optimizer's structure, so they must agree
  across seeds; they do for the models here, invariance being a property of
  the architecture.
  """
  config, dataset = configs[0], datasets[0]
  budget = trainer.budget(config, dataset)
  n_train = tasks_lib.num_examples(tasks_lib.of(config).arrays(dataset)[0])
  first, initial = None, {}
  for c, ds in zip(configs, datasets):
    if (c.seed, id(ds)) in initial:
      continue
    model = network.init_model(c, ds)
    if first is None:
      first = model
    elif not _same_groups(model.groups, first.groups):
      raise errors.InputError(f"--seed={c.seed} finds other scale-invariant groups than "
                       f"--seed={config.seed}; give them with --group_rules.")
    initial[(c.seed, id(ds))] = (model.params, model.rest)
  groups = first.groups
  logging.info("scale-invariant groups:\n%s", normreg.groups.summary(groups))
  return Program(config=config, task=tasks_lib.of(config), budget=budget,
                 graphdef=first.graphdef, eval_graphdef=first.eval_graphdef, groups=groups,
                 tx=recipe_for(config, groups, budget.total_steps), n_train=n_train,
                 steps_per_epoch=budget.steps_per_epoch, total_steps=budget.total_steps,
                 vmap_size=vmap_size, initial=initial)


def init_state(program: Program, config: Config, dataset: Any) -> trainer.TrainState:
  """Run ``config``'s initial state: its seed's params and BatchNorm statistics (built
  by :func:`make_program` from the program's configs and datasets), and the injected
  chain's ``init`` (lr and lam in the state)."""
  params, rest = program.initial[(config.seed, id(dataset))]
  opt_state = recipe_for(config, program.groups, program.total_steps).init(params)
  return trainer.TrainState(jnp.int32(0), params, rest, opt_state, jnp.int32(-1))


def stack(trees: Sequence[Any]) -> Any:
  """The runs' pytrees stacked on a new leading axis (``jnp.stack`` per leaf)."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree: Any, n: int) -> list[Any]:
  return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(n)]


def over_runs(fn: Callable, in_axes: Sequence[Optional[int]],
              vmap_size: Optional[int]) -> Callable:
  """``fn`` over a leading run axis of the arguments whose ``in_axes`` is 0.

  ``vmap_size=None``: ``jax.vmap(fn, in_axes)``, every run at once. Otherwise
  ``jax.lax.map`` over the runs, ``vmap_size`` of them vectorized at a time
  (1: a loop, one run after another inside the same compiled program). Same
  numbers either way; the choice is speed and memory: XLA turns a vmapped
  convolution with per-run kernels into a grouped convolution, fast on GPUs
  and TPUs, several times slower than separate convolutions on CPUs
  (``python -m benchmarks.step_overhead --tables=grid``; on a 2-core CPU the
  ``lax.map`` loop measured slower still than the vmapped step).
  """
  if vmap_size is None:
    return jax.vmap(fn, in_axes=tuple(in_axes))

  def mapped(*args):
    per_run = tuple(a for a, axis in zip(args, in_axes) if axis == 0)

    def one(xs):
      it = iter(xs)
      return fn(*(next(it) if axis == 0 else a for a, axis in zip(args, in_axes)))

    return jax.lax.map(one, per_run, batch_size=None if vmap_size == 1 else vmap_size)

  return mapped


def run_step(program: Program) -> Callable:
  """One run's ``step(state, train, idx, key, stats) -> (state, metrics)``.

  ``steps.make_task_train_step`` with the step key and the task's data and statistics
  as arguments, so that one trace serves every run: vmapped over a leading run axis
  (``state``, ``idx``, ``key`` and, with per-run data, the data) by
  :meth:`Program.jitted`, or called run after run.
  """
  config, task = program.config, program.task

  def one(state, train, idx, key, stats):
    step = steps_lib.make_task_train_step(program.graphdef, program.tx, task, config, stats,
                                          key=key)
    return step(state, train, idx)

  return one


def run_eval_step(program: Program) -> Callable:
  """One run's ``steps.make_task_eval_step``: the task's sums over a batch."""
  def one(params, rest, batch, weights, stats):
    return steps_lib.make_task_eval_step(program.eval_graphdef, program.task, program.config,
                                         stats)(params, rest, batch, weights)

  return one


def run_layer_metrics(program: Program) -> Callable:
  """One run's ``trainer.layer_metrics(before, after, learning_rate)``."""
  metrics = trainer.make_layer_metrics(program.config, program.groups)
  return lambda before, after, lr: metrics(before, after, learning_rate=lr)

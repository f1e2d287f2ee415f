"""The one training loop: steps, logged records, evaluations, for any task.

``experiments.trainer`` (a run of the launcher) and the sweep's sequential strategy
(``experiments.sweep``: the runs of a grid one after another, through one compiled
step) both train through :func:`train`; they differ only in what they hand it (a
:class:`Run`: the jitted functions, the records) and in what they do at its hooks
(checkpoints, signals, the launcher's callbacks). The sweep's vmapped strategy,
which trains many runs in one step, reads the same :class:`Budget`.

Budgets are in steps, as in flax's examples (``num_train_steps``,
``log_every_steps``): ``--steps`` (default: ``--epochs`` worth), ``--log_every``,
``--eval_every`` (default: at each epoch's end) and ``--checkpoint_every``. The
data order is still drawn per epoch (:func:`epoch_order`: a permutation keyed by the
seed and the epoch), so a run resumed at step ``t`` continues the order, and the
augmentation keyed by the step, where it stopped.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from experiments import data as data_lib
from experiments import errors
from experiments import records
from experiments import tasks as tasks_lib


@dataclasses.dataclass(frozen=True)
class Budget:
  """Where a run's steps go. ``step`` below counts the steps done (1 after the first).

  Attributes:
    steps_per_epoch: full batches in the training set (the remainder is dropped).
    total_steps: the run's length: ``--steps``, or ``--epochs`` epochs.
    log_every: a train record every this many steps, at each epoch's end and at
      each evaluation.
    eval_every: an evaluation (and a checkpoint) every this many steps, and at
      the last one.
  """

  steps_per_epoch: int
  total_steps: int
  log_every: int
  eval_every: int

  @classmethod
  def of(cls, config, n_train: int) -> "Budget":
    """The budget of ``config`` on ``n_train`` training examples."""
    per_epoch = n_train // config.batch_size
    total = config.steps if config.steps else per_epoch * config.epochs
    return cls(per_epoch, total, config.log_every, config.eval_every or per_epoch)

  def evaluates(self, step: int) -> bool:
    return step % self.eval_every == 0 or step == self.total_steps

  def logs(self, step: int) -> bool:
    return (step % self.log_every == 0 or step % self.steps_per_epoch == 0
            or self.evaluates(step))

  def eval_steps(self) -> list[int]:
    """The steps after which the run evaluates: one test record each."""
    return [s for s in range(1, self.total_steps + 1) if self.evaluates(s)]

  def epoch(self, step: int):
    """The epochs done after ``step``: an int at an epoch's end (the test records of
    epoch-long runs), else rounded to 4 digits."""
    whole, part = divmod(step, self.steps_per_epoch)
    return whole if not part else round(step / self.steps_per_epoch, 4)

  def too_short(self, config, where: Any, step: int) -> str:
    """The message for a folder that already holds ``step``, past this budget."""
    flag = f"--steps={config.steps}" if config.steps else f"--epochs={config.epochs}"
    more = "--steps" if config.steps else "--epochs"
    return (f"{flag}: {where} already holds step {step}, past this run's "
            f"{self.total_steps} steps; give more {more}, or --restart to start afresh, or "
            "use a new --workdir.")


def epoch_order(key: jax.Array, epoch: int, n_train: int, batch_size: int) -> np.ndarray:
  """Epoch ``epoch``'s batches (``data.epoch_permutation`` of ``fold_in(key, 1000 +
  epoch)``), as host indices ``(steps_per_epoch, batch_size)``."""
  return np.asarray(data_lib.epoch_permutation(jax.random.fold_in(key, 1000 + epoch), n_train,
                                               batch_size))


class NonFiniteLossError(errors.UsageError, FloatingPointError):
  """The loss became NaN or inf; the message says at which step."""


def non_finite_message(step: int, epoch: int, lr: float) -> str:
  """What a run whose loss became NaN or inf reports (the trainer raises it, a sweep's run
  writes it to ``diverged.txt``)."""
  return (f"the training loss became non-finite at step {step} (epoch {epoch}); "
          f"lower --lr (now {lr}) or check the data.")


def train_record(step: int, steps_per_epoch: int, metrics: dict[str, float],
                 learning_rate: float, layers: Any) -> dict[str, Any]:
  """A ``metrics.jsonl`` train record: the step's ``metrics`` (the loss and the task's), the
  rate the step used and the per-layer ``steps.layer_metrics``, all Python floats."""
  return {"kind": "train", "step": step, "epoch": round(step / steps_per_epoch, 4), **metrics,
          "learning_rate": learning_rate, "layers": layers}


def test_record(task: tasks_lib.Task, budget: Budget, step: int, metrics: dict[str, float],
                examples_per_sec: float) -> dict[str, Any]:
  """A ``metrics.jsonl`` test record: ``task.eval_metrics`` and the training throughput
  since the last evaluation (``<unit>_per_sec``, e.g. ``tokens_per_sec``)."""
  return {"kind": "test", "step": step, "epoch": budget.epoch(step), **metrics,
          f"{task.unit}_per_sec": examples_per_sec}


def to_float(tree: Any) -> Any:
  return jax.tree.map(lambda x: float(records.host_value(x)), tree)


@dataclasses.dataclass
class Run:
  """What :func:`train` needs of one run.

  Attributes:
    task: the run's task.
    config: its settings.
    budget: its :class:`Budget`.
    key: its ``jax.random.key(seed)`` (the epoch orders).
    n_train: training examples.
    step: ``(state, idx) -> (state, metrics)``; ``idx`` is the host's batch indices.
    evaluate: ``state -> task.eval_metrics`` on the test set.
    layer_metrics: ``(before, after, learning_rate) -> per-layer metrics``.
    rate: the grouped weights' learning rate at a step (``methods.grouped_schedule``).
    log: the run's ``records.RunLog``.
    copy_before: copy the params before a logged step (the step donates its state).
    note: a line for the user (``trainer._note``), or ``None``.
  """

  task: tasks_lib.Task
  config: Any
  budget: Budget
  key: jax.Array
  n_train: int
  step: Callable[[Any, np.ndarray], tuple[Any, Any]]
  evaluate: Callable[[Any], dict[str, float]]
  layer_metrics: Callable[[Any, Any, float], Any]
  rate: Callable[[int], Any]
  log: records.RunLog
  copy_before: bool = True
  note: Optional[Callable[[str], None]] = None


@dataclasses.dataclass
class Hooks:
  """What a caller does around :func:`train`'s steps (each optional).

  Attributes:
    started: called once, after this launch's first step (the trainer writes the
      run's settings then: a run that fails before it leaves none behind).
    before_step: ``step -> None`` before each step (may raise to stop).
    after_step: ``(step, state) -> bool`` after each step; ``True`` returns at once.
    after_eval: ``(step, state) -> None`` after each evaluation's record.
    diverged: ``message -> message``: what a non-finite loss raises.
    progress: ``(step, record or None) -> None`` after each step (a progress bar).
  """

  started: Optional[Callable[[], None]] = None
  before_step: Optional[Callable[[int], None]] = None
  after_step: Optional[Callable[[int, Any], bool]] = None
  after_eval: Optional[Callable[[int, Any], None]] = None
  diverged: Callable[[str], str] = lambda message: message
  progress: Optional[Callable[[int, Optional[dict]], None]] = None


def train(run: Run, state: Any, step: int, hooks: Hooks = Hooks()) -> Any:
  """Trains ``run`` from ``state`` at ``step`` to the end of its budget; returns the state.

  At each logged step, a train record (the step's metrics, the rate it used, the
  per-layer norms, effective learning rates and angles); at each evaluation, a test
  record. A non-finite loss (recorded on the device by the step, read at the next
  logged step: no sync per step) raises :class:`NonFiniteLossError` naming the
  first bad step.
  """
  budget, config = run.budget, run.config
  order_of, order = None, None
  t0, seen, started = time.perf_counter(), 0, False
  while step < budget.total_steps:
    epoch, i = divmod(step, budget.steps_per_epoch)
    if order_of != epoch:
      order, order_of = epoch_order(run.key, epoch, run.n_train, config.batch_size), epoch
    if hooks.before_step:
      hooks.before_step(step)
    log_now = budget.logs(step + 1)
    # The step may donate its input: keep a copy of the params to measure the turn.
    before = (jax.tree.map(jnp.copy, state.params) if run.copy_before else state.params
              ) if log_now else None
    state, metrics = run.step(state, order[i])
    step += 1
    seen += config.batch_size * run.task.units(config)
    if hooks.started and not started:
      hooks.started()
    started = True
    record = None
    if log_now:
      bad = int(records.host_value(state.first_bad_step))
      if bad >= 0:
        raise NonFiniteLossError(hooks.diverged(non_finite_message(bad, epoch, config.lr)))
      lr = float(run.rate(step - 1))  # the grouped weights' rate this step used
      record = train_record(step, budget.steps_per_epoch, to_float(metrics), lr,
                            to_float(run.layer_metrics(before, state.params, lr)))
      run.log.write(record)
    if hooks.progress:
      hooks.progress(step, record)
    if hooks.after_step and hooks.after_step(step, state):
      return state
    if budget.evaluates(step):
      jax.block_until_ready(state.params)
      seconds = time.perf_counter() - t0
      test = run.evaluate(state)
      run.log.write(test_record(run.task, budget, step, test, seen / seconds))
      if run.note:
        where = (f"epoch {budget.epoch(step)}/{config.epochs}" if not config.steps
                 else f"step {step}/{budget.total_steps}")
        head = run.task.headline
        run.note(f"{where}: test {head} {test[head]:.4f}"
                 + (f", loss {test['loss']:.4f}" if head != "loss" and "loss" in test else "")
                 + f"; {seen / seconds:.0f} {run.task.unit}/s")
      if hooks.after_eval:
        hooks.after_eval(step, state)
      t0, seen = time.perf_counter(), 0
  return state

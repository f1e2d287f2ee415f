"""Training library: small testable functions and ``train_and_evaluate``.

Follows the flax examples (examples/imagenet/train.py): a launcher parses
flags and calls :func:`train_and_evaluate`; everything else is a function of
explicit arguments.

Design:

- Everything that depends on what is learned comes from the run's task
  (``experiments.tasks``, ``--task``): its data, its model, what a batch becomes
  inside the step, its loss and metrics. The steps are counted by the one training
  loop (``experiments.loop``), in steps: ``--steps`` or ``--epochs``,
  ``--log_every``, ``--eval_every``, ``--checkpoint_every``.
- The NNX model is split once into ``graphdef`` and two ``State``s, ``params``
  (``nnx.Param``) and ``rest`` (BatchNorm statistics); the jitted step is a
  pure function of ``TrainState`` and is traced once (a test counts traces).
- The task's data live on the device, whole; each epoch is a ``jax.random``
  permutation; the task's preparation (augmentation, normalization) runs inside
  the jitted step.
- The scale-invariance groups are found by ``normreg.find_scale_invariant`` on
  the task's probe batch, or given as ``--group_rules``.
- Per logged step, ``metrics.jsonl`` gets the loss, the task's training metrics,
  the learning rate and per grouped layer the mean unit norm, effective learning
  rate and angular update; per evaluation, the task's test metrics. Orbax
  checkpoints at every evaluation; a run restarted on the same workdir resumes
  from the last one, exactly.
- A NaN/inf loss stops the run, naming the first step where it appeared: the
  step is recorded on the device and read at the next log step (no host sync
  per step).
- The run folder is checked, locked and reconciled with the settings before
  anything slow (``experiments.workdir``); Ctrl-C saves the current step, and
  a run resumes in the middle of an epoch as well as at its end.

The pieces live beside it and are re-exported here under their old names:
``experiments.network`` (the model, its groups, its init), ``experiments.steps``
(``TrainState``, the jitted steps, the per-layer metrics) and ``experiments.methods``
(``make_optimizer``: the optax chain of each ``--method``, from its registry entry).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import signal
import sys
import threading
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from etils import epath

import normreg
from experiments import checkpoint as ckpt_lib
from experiments import errors
from experiments import faultlog
from experiments import loop as loop_lib
from experiments import methods as methods_lib
from experiments import network
from experiments import records
from experiments import tasks as tasks_lib
from experiments import workdir as workdir_lib
from experiments import data as data_lib  # pylint: disable=unused-import  (users patch it here)
from experiments.config import Config
# The model, the steps, the loop and the chains live beside this module; their names are
# the trainer's too, as its users know (and patch) them.
from experiments.loop import (  # pylint: disable=unused-import
    Budget, NonFiniteLossError, non_finite_message, train_record)
from experiments.methods import grouped_schedule, make_optimizer  # pylint: disable=unused-import
from experiments.network import (  # pylint: disable=unused-import
    Model, find_groups, parse_group_rules, rescale_running_statistics)
from experiments.steps import (  # pylint: disable=unused-import
    TrainState, elr_power, eval_batches, evaluate, layer_metrics, make_layer_metrics,
    make_task_eval_step, make_task_train_step, progress_bar)
# The classification task's step and model under their names from before the task registry.
from experiments.tasks.classification import (  # pylint: disable=unused-import
    create_model, cross_entropy, init_model, make_eval_step, make_train_step)

# --------------------------------------------------------------------- initial state


def budget(config: Config, data) -> Budget:
  """The :class:`Budget` of ``config`` on its task's ``data``."""
  return Budget.of(config, tasks_lib.num_examples(tasks_lib.of(config).arrays(data)[0]))


def check_batch_size(config: Config, data) -> int:
  """The training examples of the task's ``data``; ``errors.InputError`` naming
  ``--batch_size`` if one batch needs more."""
  task = tasks_lib.of(config)
  n_train = tasks_lib.num_examples(task.arrays(data)[0])
  if config.batch_size > n_train:
    raise errors.InputError(f"--batch_size={config.batch_size} is larger than the training set "
                            f"({n_train} examples); lower --batch_size or give more data"
                            + (" (--train_size)." if "train_size" in task.flags else "."))
  return n_train


def initial_state(config: Config, dataset) -> tuple[Model, optax.Schedule,
                                                  optax.GradientTransformation, "TrainState"]:
  """A run's model, schedule, optimizer and initial ``TrainState`` (on this host).

  What :func:`train_and_evaluate` starts from, and the structure its checkpoints
  restore into (``experiments.checkpoint.Manager.restore_latest(state)``).
  ``dataset`` is the task's data (``Task.load``).
  """
  model = network.init_model(config, dataset)
  schedule = make_schedule(config, budget(config, dataset).total_steps)
  tx = make_optimizer(config, model.groups, schedule)
  state = TrainState(jnp.int32(0), model.params, model.rest, tx.init(model.params),
                     jnp.int32(-1))
  return model, schedule, tx, state


# ---------------------------------------------------------------------- optimizer


def make_schedule(config: Config, total_steps: int) -> optax.Schedule:
  if config.schedule == "constant":
    return optax.constant_schedule(config.lr)
  if config.schedule == "cosine":
    return optax.cosine_decay_schedule(config.lr, max(total_steps, 1))
  return optax.piecewise_constant_schedule(
      config.lr, {int(total_steps * 0.5): 0.1, int(total_steps * 0.75): 0.1})


def make_step_optimizer(config: Config, groups, total_steps: int,
                        values: dict[str, Any]) -> optax.GradientTransformation:
  """:func:`make_optimizer` of ``config`` with the values of
  ``methods.step_hyperparameters(config)`` put back: traced, inside the train step
  that takes them as arguments (with ``{}``, the run's optimizer as built outside)."""
  values = dict(values)
  rate = values.pop("ungrouped_rate", None)
  run = dataclasses.replace(config, **values)
  return make_optimizer(run, groups, make_schedule(run, total_steps),
                        ungrouped=None if rate is None else optax.constant_schedule(rate))


# ------------------------------------------------------------------- the run


changed_settings = workdir_lib.changed_settings
# What a task records about its data (Task.describe), beside config.json.
DATA_FILE = "data.json"


def write_config(workdir: Any, config: Config) -> None:
  """``workdir/config.json``, written whole (a kill mid-write leaves the old one)."""
  workdir_lib.write_atomic(epath.Path(workdir) / workdir_lib.CONFIG, config.to_json())


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> jax.sharding.Mesh:
  """A 1-D mesh with axis ``"data"`` over ``devices`` (default: all devices, all hosts)."""
  devices = list(jax.devices() if devices is None else devices)
  return jax.sharding.Mesh(np.asarray(devices), ("data",))


def shard_batch_indices(idx: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
  """The global batch indices as an array split over the data axis.

  Every host computes the same ``idx`` (same seed), so each fills in its own
  devices' part; this works on one device, many devices and many hosts alike.
  """
  return jax.make_array_from_callback(idx.shape, sharding, lambda index: idx[index])


def train_and_evaluate(config: Config, workdir: str, *, dataset: Optional[Any] = None,
                       interrupt_after_step: Optional[int] = None,
                       progress: bool = True,
                       devices: Optional[Sequence[jax.Device]] = None,
                       on_step: Optional[Callable[[int, TrainState], None]] = None,
                       tensorboard: bool = True,
                       restart: bool = False) -> TrainState:
  """Trains ``config`` and writes metrics, config and checkpoints into ``workdir``.

  Before anything slow, ``workdir`` (a folder or ``gs://`` URL) is checked and
  locked, and its settings reconciled with ``config`` (``experiments.workdir``).
  Ctrl-C (SIGINT) or SIGTERM (a preemption) stops after the current step, saves it
  and raises ``errors.Interrupted``: the same call resumes from there. On several
  hosts every process saves the same step (JAX's preemption sync point). A checkpoint
  is saved at each evaluation (``config.eval_every`` steps, or each epoch's end), and
  every ``config.checkpoint_every`` steps if set.

  Args:
    config: the run's settings (validated here).
    workdir: folder for config.json, metrics.jsonl and checkpoints/.
    dataset: the task's data, already loaded (``Task.load``; tests, sweeps);
      default: loaded from ``config``.
    interrupt_after_step: stop (as if killed) right after this step, without
      saving: for tests of resumption.
    progress: show a progress bar and a line per evaluation.
    devices: devices to train on, data-parallel (batch split, params
      replicated); default all of them. Multi-host: call
      ``jax.distributed.initialize()`` first (``--distributed``).
    on_step: called on the host as ``on_step(step, state)`` at step 0 of a
      fresh run and after every step, to record more than ``metrics.jsonl``
      holds (``experiments.reproduce`` saves the logits of a fixed batch this
      way). Keep it cheap where it does nothing, and keep no reference to
      ``state``: the next step may donate its buffers.
    tensorboard: mirror ``metrics.jsonl`` to TensorBoard event files in
      ``workdir/tensorboard`` (``experiments.records``).
    restart: discard what ``workdir`` holds (checkpoints, records) and start afresh.

  Returns:
    The final ``TrainState``.
  """
  config.validate()
  with workdir_lib.open_run(workdir, config, restart=restart) as run, faultlog.divert(run.path):
    return _train(config, run.path, dataset=dataset, interrupt_after_step=interrupt_after_step,
                  progress=progress, devices=devices, on_step=on_step, tensorboard=tensorboard)


class _StopRequest:
  """Ctrl-C (SIGINT) or SIGTERM while training: stop after the current step and save it.

  SIGTERM is what a preemptible VM, SLURM's time limit, ``scancel`` and ``kill`` send
  before they kill. In a one-process run the handlers are Python's, in the main thread
  only (a second Ctrl-C stops at once). In a multi-host run JAX's preemption service
  (``jax.distributed.initialize`` starts it; it catches SIGTERM) picks the step at which
  every process saves: :meth:`check` asks it at every step
  (``multihost_utils.reached_preemption_sync_point``).
  """

  SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}

  def __init__(self, show: bool):
    self.signum, self._show, self._old = None, show, {}
    self._hosts = jax.process_count() > 1
    if not self._hosts and threading.current_thread() is threading.main_thread():
      self._old = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signum = signum
    _note(f"{self.SIGNALS[signum]}: stopping after this step to save it"
          + (" (Ctrl-C again stops at once)." if signum == signal.SIGINT else "."), self._show)

  def check(self, step: int) -> Optional[str]:
    """What stops the run before ``step`` runs: ``"Ctrl-C"``, ``"SIGTERM"`` or ``None``."""
    if self._hosts:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      if multihost_utils.reached_preemption_sync_point(step):
        self.signum = signal.SIGTERM
    return None if self.signum is None else self.SIGNALS[self.signum]

  def close(self) -> None:
    for signum, old in self._old.items():
      signal.signal(signum, old)
    self._old = {}


def _note(message: str, show: bool) -> None:
  """A line for the user: beside the progress bar when it shows, else an INFO log."""
  if show:
    from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
    tqdm.tqdm.write(message, file=sys.stderr)
  else:
    logging.info("%s", message)


def _train(config: Config, folder: epath.Path, *, dataset, interrupt_after_step, progress,
           devices, on_step, tensorboard) -> TrainState:
  """:func:`train_and_evaluate` in an opened, locked run folder."""
  writer = jax.process_index() == 0  # one process writes files (all save checkpoints)
  show = progress and writer
  task = tasks_lib.of(config)

  ds = dataset if dataset is not None else task.load(config)
  host_train, host_test = task.arrays(ds)
  n_train = check_batch_size(config, ds)
  devices = list(jax.devices() if devices is None else devices)
  if config.batch_size % len(devices):
    raise errors.InputError(f"--batch_size={config.batch_size} must be divisible by the number "
                            f"of devices ({len(devices)}) for data parallelism.")
  mesh = make_mesh(devices)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  run_budget = Budget.of(config, n_train)
  total_steps = run_budget.total_steps
  stats = jax.device_put(task.stats(ds), replicated)
  # The whole (small) training set on every device; batches are gathered in the step.
  # Every process of a multi-host run holds the same arrays and feeds its devices.
  train_data = jax.device_put(host_train, replicated)

  model, schedule, _, state = initial_state(config, ds)
  graphdef, eval_graphdef, groups = model.graphdef, model.eval_graphdef, model.groups
  logging.info("scale-invariant groups:\n%s", normreg.groups.summary(groups))
  state = jax.device_put(state, replicated)

  # Nothing is written before the first step: a failed start leaves no settings behind.
  checkpoints = folder / workdir_lib.CHECKPOINTS
  manager = ckpt_lib.Manager(checkpoints) if checkpoints.is_dir() else None
  restored = manager.restore_latest(state) if manager else None
  if restored is not None:
    state = restored
  step = int(records.host_value(state.step))  # the host's copy: no device sync per step
  saved_step = step
  if step > total_steps:
    if manager:
      manager.close()
    raise errors.InputError(run_budget.too_short(config, folder, step))
  if restored is not None:
    _note(f"resumed from step {step} (epoch {step / run_budget.steps_per_epoch:g})", show)
  log = records.RunLog(folder, enabled=writer, tensorboard=tensorboard, resume_step=step)

  if on_step is not None and step == 0:
    on_step(0, state)
  # The step's key is an argument, not a constant of the program: runs that differ only in
  # their seed share one compiled step (JAX's persistent cache finds it).
  key = jax.random.key(config.seed)
  # Its raw bits go from the host, as the data do: on several hosts a device's key array
  # cannot be placed on the others' devices.
  step_key = jax.device_put(np.asarray(jax.random.key_data(jax.random.fold_in(key, 1))),
                            replicated)

  # So are the learning rates and the decay (methods_lib.step_hyperparameters): runs that
  # differ only in them share one too. The optimizer is rebuilt from them in the trace,
  # with the state's structure that initial_state's made.
  hyper = methods_lib.step_hyperparameters(config)

  def keyed_step(state, train, idx, key_data, hyper_values):
    run_tx = make_step_optimizer(config, groups, total_steps, hyper_values)
    return make_task_train_step(graphdef, run_tx, task, config, stats,
                                key=jax.random.wrap_key_data(key_data),
                                batch_sharding=batch_sharding)(state, train, idx)

  # From host arrays, as the key: Python floats failed device_put's same-on-every-process
  # check in the two-process test (it compared the gathered [0.001 0.001] with 0.001).
  # float32, as the constants were (the launcher's parameters and updates are float32).
  hyper_values = jax.device_put({k: np.float32(v) for k, v in hyper.items()}, replicated)
  train_step = jax.jit(
      keyed_step, in_shardings=(replicated, replicated, batch_sharding, replicated, replicated),
      out_shardings=(replicated, replicated),
      donate_argnums=() if jax.default_backend() == "cpu" else 0)
  eval_step = jax.jit(make_task_eval_step(eval_graphdef, task, config, stats))
  metrics_fn = jax.jit(make_layer_metrics(config, groups))

  def save(at: int, state) -> None:
    nonlocal manager, saved_step
    log.flush()  # the records first: a checkpoint never runs ahead of them
    if manager is None:
      manager = ckpt_lib.Manager(checkpoints)
    manager.save(at, state)
    saved_step = at

  bar = progress_bar(total_steps, show, initial=step)
  stop = _StopRequest(show)
  last = {"state": state}  # the state a stop request saves

  def before_step(at: int) -> None:
    stopped_by = stop.check(at)
    if stopped_by:
      if at != saved_step:
        save(at, last["state"])
      raise errors.Interrupted(f"stopped by {stopped_by} at step {at} of {total_steps}; "
                               f"saved it in {checkpoints}", signum=stop.signum)

  def started() -> None:  # the settings, once this launch has trained
    if writer:
      folder.mkdir(parents=True, exist_ok=True)
      write_config(folder, config)
      described = task.describe(ds)
      if described:
        workdir_lib.write_atomic(folder / DATA_FILE, json.dumps(described, indent=2))

  def after_step(at: int, state) -> bool:
    last["state"] = state
    if on_step is not None:
      on_step(at, state)
    if config.checkpoint_every and at % config.checkpoint_every == 0 and (
        not run_budget.evaluates(at)):  # (an evaluation saves after its record)
      save(at, state)
    return interrupt_after_step is not None and at >= interrupt_after_step

  def progress_shown(at: int, record) -> None:
    del at
    if record is not None:
      bar.set_postfix({k: f"{record[k]:.3f}" for k in ("loss", task.headline) if k in record})
    bar.update(1)

  run = loop_lib.Run(
      task=task, config=config, budget=run_budget, key=key, n_train=n_train,
      step=lambda s, idx: train_step(s, train_data, shard_batch_indices(idx, batch_sharding),
                                     step_key, hyper_values),
      evaluate=lambda s: evaluate(eval_step, task, config, s.params, s.rest, host_test,
                                  config.batch_size, sharding=replicated, progress=show),
      layer_metrics=lambda before, after, lr: metrics_fn(before, after, learning_rate=lr),
      rate=grouped_schedule(config, schedule), log=log,
      note=lambda line: _note(line, show))
  hooks = loop_lib.Hooks(
      started=started, before_step=before_step, after_step=after_step,
      after_eval=save, progress=progress_shown,
      diverged=lambda message: message + (
          " A checkpoint is kept: --restart starts afresh with other settings."
          if saved_step else ""))
  full = False
  try:
    state = loop_lib.train(run, state, step, hooks)
  except Exception as e:  # pylint: disable=broad-except  (orbax's is a bare ValueError)
    full = errors.disk_full(e)
    if full is None:
      raise
    raise errors.DiskFullError(_disk_full_message(folder, full, saved_step)) from None
  finally:
    stop.close()
    bar.close()
    # After a full disk, closing flushes into it again: the one line above says it all.
    with contextlib.suppress(Exception) if full else contextlib.nullcontext():
      log.close()
      if manager:
        manager.close()
  return state


def _disk_full_message(folder: epath.Path, error: BaseException, saved_step: int) -> str:
  """One line: what could not be written, where, the free space and how to go on."""
  what = getattr(error, "filename", None) or next(iter(re.findall(r'"(/[^"]+)"', str(error))),
                                                  None)
  partial = re.search(r"^(.*)/(\d+)\.orbax-checkpoint-tmp", str(what or ""))
  if partial:  # orbax writes a step into <step>.orbax-checkpoint-tmp/, renamed when whole
    what = f"checkpoint {partial.group(2)} into {partial.group(1)}"
  kept = (f"the last checkpoint, step {saved_step}, is intact" if saved_step else
          "no checkpoint was saved yet")
  return (f"no space left in {folder} ({workdir_lib.free_space(folder)} free; "
          f"{'writing ' + str(what) if what else 'writing a checkpoint or record'}): "
          f"{kept}. Free some space (or raise the quota), then run the same command: it "
          "resumes from there.")

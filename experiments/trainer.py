"""Training library: small testable functions and ``train_and_evaluate``.

Follows the flax examples (examples/imagenet/train.py): a launcher parses
flags and calls :func:`train_and_evaluate`; everything else is a function of
explicit arguments.

Design:

- The NNX model is split once into ``graphdef`` and two ``State``s, ``params``
  (``nnx.Param``) and ``rest`` (BatchNorm statistics); the jitted step is a
  pure function of ``TrainState`` and is traced once (a test counts traces).
- Data lives on the device as uint8; each epoch is a ``jax.random``
  permutation; crop, flip and normalization run inside the jitted step.
- The scale-invariance groups are found by ``normreg.find_scale_invariant`` on
  a training batch, or given as ``--group_rules``.
- Per logged step, ``metrics.jsonl`` gets loss, accuracy, learning rate and per
  grouped layer the mean unit norm, effective learning rate and angular update;
  per epoch, test loss and accuracy. Orbax checkpoints every epoch; a run
  restarted on the same workdir resumes from the last one, exactly.
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
import re
import signal
import sys
import threading
import time
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
from experiments import methods as methods_lib
from experiments import records
from experiments import workdir as workdir_lib
from experiments import data as data_lib
from experiments.config import Config
# The model, the steps and the chains live beside this module; their names are the
# trainer's too, as its users know (and patch) them.
from experiments.methods import grouped_schedule, make_optimizer  # pylint: disable=unused-import
from experiments.network import (  # pylint: disable=unused-import
    Model, create_model, find_groups, init_model, parse_group_rules, rescale_running_statistics)
from experiments.steps import (  # pylint: disable=unused-import
    TrainState, cross_entropy, elr_power, eval_batches, evaluate, layer_metrics, make_eval_step,
    make_layer_metrics, make_train_step, progress_bar)

# --------------------------------------------------------------------- initial state


def initial_state(config: Config, dataset) -> tuple[Model, optax.Schedule,
                                                  optax.GradientTransformation, "TrainState"]:
  """A run's model, schedule, optimizer and initial ``TrainState`` (on this host).

  What :func:`train_and_evaluate` starts from, and the structure its checkpoints
  restore into (``experiments.checkpoint.Manager.restore_latest(state)``).
  """
  n_train = dataset.train_images.shape[0]
  model = init_model(config, dataset.num_classes, dataset.train_images,
                     *data_lib.channel_stats(dataset.train_images))
  schedule = make_schedule(config, n_train // config.batch_size * config.epochs)
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


class NonFiniteLossError(errors.UsageError, FloatingPointError):
  """The loss became NaN or inf; the message says at which step."""


def non_finite_message(step: int, epoch: int, lr: float) -> str:
  """What a run whose loss became NaN or inf reports (the trainer raises it, a sweep's run
  writes it to ``diverged.txt``)."""
  return (f"the training loss became non-finite at step {step} (epoch {epoch}); "
          f"lower --lr (now {lr}) or check the data.")


def train_record(step: int, steps_per_epoch: int, metrics: dict[str, float],
                 learning_rate: float, layers: Any) -> dict[str, Any]:
  """A ``metrics.jsonl`` train record: the step's ``metrics`` (loss, accuracy), the rate
  the step used and the per-layer :func:`layer_metrics`, all Python floats."""
  return {"kind": "train", "step": step, "epoch": round(step / steps_per_epoch, 4), **metrics,
          "learning_rate": learning_rate, "layers": layers}


changed_settings = workdir_lib.changed_settings


def write_config(workdir: Any, config: Config) -> None:
  """``workdir/config.json``, written whole (a kill mid-write leaves the old one)."""
  workdir_lib.write_atomic(epath.Path(workdir) / workdir_lib.CONFIG, config.to_json())


def _to_float(tree):
  return jax.tree.map(lambda x: float(records.host_value(x)), tree)


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
  is saved at each epoch's end, and every ``config.checkpoint_every`` steps if set.

  Args:
    config: the run's settings (validated here).
    workdir: folder for config.json, metrics.jsonl and checkpoints/.
    dataset: an already loaded ``experiments.data.Dataset`` (tests, sweeps);
      default: loaded from ``config``.
    interrupt_after_step: stop (as if killed) right after this step, without
      saving: for tests of resumption.
    progress: show a progress bar and a line per epoch.
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

  ds = dataset if dataset is not None else data_lib.load(
      config.dataset, data_dir=config.data_dir, train_size=config.train_size,
      test_size=config.test_size, seed=config.seed)
  n_train = ds.train_images.shape[0]
  if config.batch_size > n_train:
    raise errors.InputError(f"--batch_size={config.batch_size} is larger than the training set "
                            f"({n_train} images); lower --batch_size or raise --train_size.")
  devices = list(jax.devices() if devices is None else devices)
  if config.batch_size % len(devices):
    raise errors.InputError(f"--batch_size={config.batch_size} must be divisible by the number "
                            f"of devices ({len(devices)}) for data parallelism.")
  mesh = make_mesh(devices)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  steps_per_epoch = n_train // config.batch_size
  total_steps = steps_per_epoch * config.epochs
  host_mean, host_std = data_lib.channel_stats(ds.train_images)
  mean, std = jax.device_put((host_mean, host_std), replicated)
  # The whole (small) training set on every device, as uint8; batches are gathered in the
  # step. Every process of a multi-host run holds the same arrays and feeds its devices.
  train_images, train_labels = jax.device_put((ds.train_images, ds.train_labels), replicated)

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
    raise errors.InputError(f"--epochs={config.epochs}: {folder} already holds step {step}, "
                            f"past this run's {total_steps} steps; give more --epochs, or "
                            "--restart to start afresh, or use a new --workdir.")
  if restored is not None:
    _note(f"resumed from step {step} (epoch {step / steps_per_epoch:g})", show)
  log = records.RunLog(folder, enabled=writer, tensorboard=tensorboard, resume_step=step)
  start_epoch = step // steps_per_epoch

  if on_step is not None and step == 0:
    on_step(0, state)
  rate = grouped_schedule(config, schedule)
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

  def keyed_step(state, images, labels, idx, key_data, hyper_values):
    run_tx = make_step_optimizer(config, groups, total_steps, hyper_values)
    return make_train_step(graphdef, run_tx, mean, std, augment=config.augment,
                           key=jax.random.wrap_key_data(key_data),
                           batch_sharding=batch_sharding,
                           **data_lib.augment_options(config.dataset))(state, images, labels,
                                                                       idx)

  # From host arrays, as the key: Python floats failed device_put's same-on-every-process
  # check in the two-process test (it compared the gathered [0.001 0.001] with 0.001).
  # float32, as the constants were (the launcher's parameters and updates are float32).
  hyper_values = jax.device_put({k: np.float32(v) for k, v in hyper.items()}, replicated)
  train_step = jax.jit(
      keyed_step, in_shardings=(replicated,) * 3 + (batch_sharding,) + (replicated,) * 2,
      out_shardings=(replicated, replicated),
      donate_argnums=() if jax.default_backend() == "cpu" else 0)
  eval_step = jax.jit(make_eval_step(eval_graphdef, mean, std))
  metrics_fn = jax.jit(make_layer_metrics(config, groups))

  def save():
    nonlocal manager, saved_step
    log.flush()  # the records first: a checkpoint never runs ahead of them
    if manager is None:
      manager = ckpt_lib.Manager(checkpoints)
    manager.save(step, state)
    saved_step = step

  bar = progress_bar(total_steps, show, initial=step)
  stop = _StopRequest(show)
  config_written = full = False
  try:
    for epoch in range(start_epoch, config.epochs):
      order = np.asarray(data_lib.epoch_permutation(jax.random.fold_in(key, 1000 + epoch),
                                                    n_train, config.batch_size))
      t0, images_seen = time.perf_counter(), 0
      # A run stopped by Ctrl-C resumes in the middle of its epoch.
      for i in range(step - epoch * steps_per_epoch, steps_per_epoch):
        stopped_by = stop.check(step)
        if stopped_by:
          if step != saved_step:
            save()
          raise errors.Interrupted(f"stopped by {stopped_by} at step {step} of {total_steps}; "
                                   f"saved it in {checkpoints}", signum=stop.signum)
        idx = shard_batch_indices(order[i], batch_sharding)
        log_now = (step + 1) % config.log_every == 0 or i == steps_per_epoch - 1
        # The step may donate its input: keep a copy of the params to measure the turn.
        before = jax.tree.map(jnp.copy, state.params) if log_now else None
        state, m = train_step(state, train_images, train_labels, idx, step_key,
                              hyper_values)
        step += 1
        images_seen += config.batch_size
        if not config_written and writer:  # the settings, once this launch has trained
          folder.mkdir(parents=True, exist_ok=True)
          write_config(folder, config)
          config_written = True
        if log_now:
          bad = int(records.host_value(state.first_bad_step))
          if bad >= 0:
            raise NonFiniteLossError(non_finite_message(bad, epoch, config.lr) + (
                " A checkpoint is kept: --restart starts afresh with other settings."
                if saved_step else ""))
          lr = float(rate(step - 1))  # the grouped weights' rate this step used
          record = train_record(step, steps_per_epoch, _to_float(m), lr,
                                _to_float(metrics_fn(before, state.params, learning_rate=lr)))
          log.write(record)
          bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.3f}")
        if on_step is not None:
          on_step(step, state)
        bar.update(1)
        if config.checkpoint_every and step % config.checkpoint_every == 0 and (
            i < steps_per_epoch - 1):  # (the epoch's end saves after its evaluation)
          save()
        if interrupt_after_step is not None and step >= interrupt_after_step:
          return state
      jax.block_until_ready(state.params)
      seconds = time.perf_counter() - t0
      test = evaluate(eval_step, state.params, state.rest, ds.test_images, ds.test_labels,
                      config.batch_size, sharding=replicated, progress=show)
      log.write({"kind": "test", "step": step, "epoch": epoch + 1, **test,
                 "images_per_sec": images_seen / seconds})
      _note(f"epoch {epoch + 1}/{config.epochs}: test accuracy {test['accuracy']:.4f}, loss "
            f"{test['loss']:.4f}; {images_seen / seconds:.0f} images/s", show)
      save()
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

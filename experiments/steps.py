"""The launcher's jitted functions: the train step, the eval step and the per-layer metrics.

Pure functions of explicit arguments, built once per run (``experiments.trainer``) or
per program (``experiments.sweep``, which vmaps them), for any task of
``experiments.tasks``: the task prepares the batch and scores the model's outputs;
these functions do the rest. ``experiments.trainer`` re-exports each under the same
name.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import normreg
from experiments import methods as methods_lib
from experiments import records
from experiments import tasks as tasks_lib

if TYPE_CHECKING:
  from experiments.config import Config


class TrainState(NamedTuple):
  """Everything a step reads and writes; a pytree, checkpointed whole."""

  step: jax.Array  # int32 scalar
  params: Any  # nnx.State of nnx.Param
  rest: Any  # nnx.State of the other variables (BatchNorm statistics)
  opt_state: Any
  first_bad_step: jax.Array  # int32, -1 until a non-finite loss is seen


def elr_power(config: "Config") -> int:
  """Exponent of ``eta/||w||^p``: 2 for SGD, 1 for Adam and Muon (whose steps' sizes do not
  follow the gradient's scale)."""
  return 2 if config.optimizer == "sgd" else 1


def gather(data: Any, idx: jax.Array) -> Any:
  """The examples ``idx`` of every leaf of a task's data pytree (inside the step)."""
  return jax.tree.map(lambda a: a[idx], data)


def make_task_train_step(graphdef, tx: optax.GradientTransformation, task: tasks_lib.Task,
                         config: Optional["Config"], stats: Any, *, key: jax.Array,
                         batch_sharding: Optional[jax.sharding.Sharding] = None,
                         prepare: Optional[Callable] = None) -> Callable:
  """``step(state, train, idx) -> (state, metrics)``, pure, to be jitted.

  ``train`` is the task's whole training set on the device (``Task.arrays``); ``idx``
  the batch's indices, gathered inside the step (no per-step copy). The task's
  ``prepare(config, batch, stats, key)`` makes the model's input (or ``prepare(batch,
  stats, key)`` if given), with ``key = fold_in(key, step)``; ``task.loss`` scores the
  outputs, and the metrics are the loss, ``task.train_metrics`` and the gradient's
  global norm.
  With ``batch_sharding`` (data parallelism) the gathered batch is split over
  the devices; everything reduced over the batch (the loss, BatchNorm's batch
  statistics) is then reduced over the global batch by XLA.
  """

  prepare = prepare or functools.partial(task.prepare, config)

  def step(state: TrainState, train, idx):
    batch = gather(train, idx)
    if batch_sharding is not None:
      batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
    x = prepare(batch, stats, jax.random.fold_in(key, state.step))

    def loss_fn(params):
      model = nnx.merge(graphdef, params, state.rest, copy=True)
      outputs = model(x)
      new_rest = nnx.split(model, nnx.Param, ...)[2]
      return task.loss(config, outputs, batch), (outputs, new_rest)

    (loss, (outputs, rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    bad = (state.first_bad_step < 0) & ~jnp.isfinite(loss)
    first_bad = jnp.where(bad, state.step, state.first_bad_step)
    metrics = task.train_metrics(config, outputs, batch)
    new_state = TrainState(state.step + 1, params, rest, opt_state, first_bad)
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32)))
                             for g in jax.tree.leaves(grads)))
    return new_state, {"loss": loss, **metrics, "grad_norm": grad_norm}

  return step


def make_task_eval_step(eval_graphdef, task: tasks_lib.Task, config: Optional["Config"],
                        stats: Any, prepare: Optional[Callable] = None) -> Callable:
  """``eval_step(params, rest, batch, weights) -> task.eval_sums`` (weighted sums); the
  input is ``task.prepare(config, batch, stats, None)``, or ``prepare(batch, stats,
  None)`` if given."""
  prepare = prepare or functools.partial(task.prepare, config)

  def eval_step(params, rest, batch, weights):
    outputs = nnx.merge(eval_graphdef, params, rest)(prepare(batch, stats, None))
    return task.eval_sums(config, outputs, batch, weights)

  return eval_step


def layer_metrics(before, after, groups, learning_rate, power: int, rescaled: bool):
  """Per grouped layer: mean unit norm, median effective learning rate, mean angle.

  The effective learning rate of a unit is ``eta/||w||^power`` (van Laarhoven
  2017, eq. 12); under the methods that set their angle (``spherical``,
  ``elr_rescale``, ...) it is the rate they set. The layer's is the median over
  its units: a unit that died under weight decay (no gradient, its norm decayed
  towards 0) has an unbounded ``eta/||w||^2`` that would dominate a mean. The
  angle is what the step actually did. A leaf with
  stack axes (layers stacked by scan) gives one entry per copy,
  ``"blocks/conv/kernel/0"``, ``".../1"``, ...: each layer has its own.
  """
  norms = normreg.unit_norms(after, groups)
  angles = normreg.angular_update(before, after, groups)
  # Per-slice groups (fused kernels) give a tuple per leaf: one entry per slice, "qkv/0", ...
  stacks = normreg.groups.groups_by_path(
      normreg.slicing.expanded(groups, after, "layer_metrics"), "layer_metrics")
  flat_norms = jax.tree_util.tree_flatten_with_path(norms)[0]
  flat_angles = dict((normreg.groups.path_str(p), a)
                     for p, a in jax.tree_util.tree_flatten_with_path(angles)[0])
  out = {}
  for path, n in flat_norms:
    name = normreg.groups.path_str(path)
    stack = stacks[name].stack
    n = n.reshape(n.shape[:stack] + (-1,))
    angle = flat_angles[name].reshape(n.shape)
    elr = jnp.broadcast_to(learning_rate, n.shape) if rescaled else learning_rate / n ** power
    copies = [()] if not stack else list(np.ndindex(*n.shape[:stack]))
    for index in copies:
      key = "/".join([name] + [str(i) for i in index])
      out[key] = {"norm": jnp.mean(n[index]), "elr": jnp.median(elr[index]),
                  "angle": jnp.mean(angle[index])}
  return out


def make_layer_metrics(config: "Config", groups) -> Callable:
  """:func:`layer_metrics` of ``config``'s recipe: ``(before, after, learning_rate) -> dict``."""
  return functools.partial(layer_metrics, groups=groups, power=elr_power(config),
                           rescaled=methods_lib.get(config.method).sets_angle)


def eval_batches(data: Any, batch_size: int, axis: int = 0):
  """Yields ``(batch, weights)``: ``batch_size`` examples of every leaf of ``data`` along
  ``axis``.

  ``axis`` is 0, or 1 for arrays with a leading run axis (``experiments.sweep``).
  The last batch is zero-padded to the same shape (one trace of the eval step)
  and its padding has weight 0; ``weights`` has shape ``(batch_size,)``.
  """
  n = jax.tree.leaves(data)[0].shape[axis]
  for start in range(0, n, batch_size):
    stop = min(start + batch_size, n)
    pad = batch_size - (stop - start)
    w = (jnp.arange(batch_size) < stop - start).astype(jnp.float32)

    def cut(a):
      a = jax.lax.slice_in_dim(a, start, stop, axis=axis)
      return jnp.pad(a, [(0, pad) if i == axis else (0, 0) for i in range(a.ndim)]) if pad else a

    yield jax.tree.map(cut, data), w


def evaluate(eval_step, task: tasks_lib.Task, config: "Config", params, rest, test: Any,
             batch_size: int, sharding: Optional[jax.sharding.Sharding] = None,
             progress: bool = False) -> dict[str, float]:
  """``task.eval_metrics`` over the whole test set; the last batch is padded and masked.

  ``eval_step`` gives ``task.eval_sums`` of a batch; they are added up on the host in
  double precision. ``sharding`` places each batch (replicated over a multi-host mesh:
  every process holds the same test set and evaluates on it with the others).
  ``progress`` shows a bar over the batches (removed when done).
  """
  n = tasks_lib.num_examples(test)
  totals: dict[str, float] = {}
  bar = progress_bar(-(-n // batch_size), progress, desc="test", leave=False, unit="batch")
  for batch in eval_batches(test, batch_size):
    batch, weights = batch if sharding is None else jax.device_put(batch, sharding)
    sums = eval_step(params, rest, batch, weights)
    for name, value in sums.items():
      totals[name] = totals.get(name, 0.0) + float(records.host_value(value))
    bar.update(1)
  bar.close()
  return task.eval_metrics(config, totals, n)


def progress_bar(total: int, enabled: bool, initial: int = 0, desc: Optional[str] = None,
                 leave: bool = True, unit: str = "step"):
  """A tqdm bar over ``total`` steps (``tqdm.auto``; disabled unless ``enabled``)."""
  from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
  return tqdm.tqdm(total=total, initial=initial, disable=not enabled, unit=unit,
                   dynamic_ncols=True, desc=desc, leave=leave)

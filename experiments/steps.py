"""The launcher's jitted functions: the train step, the eval step and the per-layer metrics.

Pure functions of explicit arguments, built once per run (``experiments.trainer``) or
per program (``experiments.sweep``, which vmaps them); ``experiments.trainer``
re-exports each under the same name.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import normreg
from experiments import data as data_lib
from experiments import methods as methods_lib
from experiments import records
from experiments.config import Config


class TrainState(NamedTuple):
  """Everything a step reads and writes; a pytree, checkpointed whole."""

  step: jax.Array  # int32 scalar
  params: Any  # nnx.State of nnx.Param
  rest: Any  # nnx.State of the other variables (BatchNorm statistics)
  opt_state: Any
  first_bad_step: jax.Array  # int32, -1 until a non-finite loss is seen


def elr_power(config: Config) -> int:
  """Exponent of ``eta/||w||^p``: 2 for SGD, 1 for Adam."""
  return 2 if config.optimizer == "sgd" else 1


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                         labels).mean()


def make_train_step(graphdef, tx: optax.GradientTransformation, mean, std, *,
                    augment: bool, key: jax.Array,
                    batch_sharding: Optional[jax.sharding.Sharding] = None,
                    pad: int = 4, flip: bool = True) -> Callable:
  """``step(state, images, labels, idx) -> (state, metrics)``, pure, to be jitted.

  ``images`` (uint8) and ``labels`` are the whole training set on the device;
  ``idx`` the batch's indices, gathered inside the step (no per-step copy).
  With ``augment``, ``data.augment(..., pad=pad, flip=flip)``
  (``data.augment_options(config.dataset)`` gives a data set's).
  With ``batch_sharding`` (data parallelism) the gathered batch is split over
  the devices; everything reduced over the batch (the loss, BatchNorm's batch
  statistics) is then reduced over the global batch by XLA.
  """

  def step(state: TrainState, all_images, all_labels, idx):
    x, labels = all_images[idx], all_labels[idx]
    if batch_sharding is not None:
      x = jax.lax.with_sharding_constraint(x, batch_sharding)
      labels = jax.lax.with_sharding_constraint(labels, batch_sharding)
    if augment:
      x = data_lib.augment(jax.random.fold_in(key, state.step), x, pad=pad, flip=flip)
    x = data_lib.normalize(x, mean, std)

    def loss_fn(params):
      model = nnx.merge(graphdef, params, state.rest, copy=True)
      logits = model(x)
      new_rest = nnx.split(model, nnx.Param, ...)[2]
      return cross_entropy(logits, labels), (logits, new_rest)

    (loss, (logits, rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    bad = (state.first_bad_step < 0) & ~jnp.isfinite(loss)
    first_bad = jnp.where(bad, state.step, state.first_bad_step)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    new_state = TrainState(state.step + 1, params, rest, opt_state, first_bad)
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32)))
                             for g in jax.tree.leaves(grads)))
    return new_state, {"loss": loss, "accuracy": accuracy, "grad_norm": grad_norm}

  return step


def make_eval_step(eval_graphdef, mean, std) -> Callable:
  """``eval_step(params, rest, images, labels, weights) -> (sum loss, sum correct)``."""

  def eval_step(params, rest, images, labels, weights):
    logits = nnx.merge(eval_graphdef, params, rest)(data_lib.normalize(images, mean, std))
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return jnp.sum(losses * weights), jnp.sum(correct * weights)

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


def make_layer_metrics(config: Config, groups) -> Callable:
  """:func:`layer_metrics` of ``config``'s recipe: ``(before, after, learning_rate) -> dict``."""
  return functools.partial(layer_metrics, groups=groups, power=elr_power(config),
                           rescaled=methods_lib.get(config.method).sets_angle)


def eval_batches(images, labels, batch_size: int, axis: int = 0):
  """Yields ``(images, labels, weights)`` batches of ``batch_size`` examples along ``axis``.

  ``axis`` is 0, or 1 for arrays with a leading run axis (``experiments.sweep``).
  The last batch is zero-padded to the same shape (one trace of the eval step)
  and its padding has weight 0; ``weights`` has shape ``(batch_size,)``.
  """
  n = images.shape[axis]
  for start in range(0, n, batch_size):
    x = jax.lax.slice_in_dim(images, start, min(start + batch_size, n), axis=axis)
    y = jax.lax.slice_in_dim(labels, start, min(start + batch_size, n), axis=axis)
    pad = batch_size - x.shape[axis]
    w = (jnp.arange(batch_size) < x.shape[axis]).astype(jnp.float32)
    if pad:
      x = jnp.pad(x, [(0, pad) if a == axis else (0, 0) for a in range(x.ndim)])
      y = jnp.pad(y, [(0, pad) if a == axis else (0, 0) for a in range(y.ndim)])
    yield x, y, w


def evaluate(eval_step, params, rest, images, labels, batch_size: int,
             sharding: Optional[jax.sharding.Sharding] = None,
             progress: bool = False) -> dict[str, float]:
  """Test loss and accuracy over the whole set; the last batch is padded and masked.

  ``sharding`` places each batch (replicated over a multi-host mesh: every process
  holds the same test set and evaluates on it with the others). ``progress``
  shows a bar over the batches (removed when done).
  """
  n = images.shape[0]
  total_loss = total_correct = 0.0
  bar = progress_bar(-(-n // batch_size), progress, desc="test", leave=False, unit="batch")
  for batch in eval_batches(images, labels, batch_size):
    x, y, w = batch if sharding is None else jax.device_put(batch, sharding)
    loss, correct = eval_step(params, rest, x, y, w)
    total_loss += float(records.host_value(loss))
    total_correct += float(records.host_value(correct))
    bar.update(1)
  bar.close()
  return {"loss": total_loss / n, "accuracy": total_correct / n}


def progress_bar(total: int, enabled: bool, initial: int = 0, desc: Optional[str] = None,
                 leave: bool = True, unit: str = "step"):
  """A tqdm bar over ``total`` steps (``tqdm.auto``; disabled unless ``enabled``)."""
  from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
  return tqdm.tqdm(total=total, initial=initial, disable=not enabled, unit=unit,
                   dynamic_ncols=True, desc=desc, leave=leave)

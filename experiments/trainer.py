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
"""

from __future__ import annotations

import functools
import re
import signal
import sys
import threading
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from etils import epath
from flax import nnx

import normreg
from normreg import theory
from experiments import checkpoint as ckpt_lib
from experiments import errors
from experiments import records
from experiments import workdir as workdir_lib
from experiments import data as data_lib
from experiments import config as config_lib
from experiments.config import Config


class TrainState(NamedTuple):
  """Everything a step reads and writes; a pytree, checkpointed whole."""

  step: jax.Array  # int32 scalar
  params: Any  # nnx.State of nnx.Param
  rest: Any  # nnx.State of the other variables (BatchNorm statistics)
  opt_state: Any
  first_bad_step: jax.Array  # int32, -1 until a non-finite loss is seen


# ----------------------------------------------------------------- model & groups


def create_model(config: Config, num_classes: int, in_channels: int) -> nnx.Module:
  dtype = jnp.bfloat16 if config.dtype == "bfloat16" else None
  return normreg.models.create(config.model, num_classes=num_classes, norm=config.norm,
                               width=config.width, in_channels=in_channels, dtype=dtype,
                               epsilon=config.norm_eps, rngs=nnx.Rngs(config.seed))


_RULE = re.compile(r"(?P<pattern>.+)=(?P<kind>unit|tensor|none)(?:\((?P<options>[^()]*)\))?",
                   re.DOTALL)


def _split_top_level(text: str) -> list[str]:
  """``text`` split at the commas outside parentheses (regex groups, rule options)."""
  items, depth, start, escaped = [], 0, 0, False
  for i, ch in enumerate(text):
    if escaped:
      escaped = False
    elif ch == "\\":
      escaped = True
    elif ch == "(":
      depth += 1
    elif ch == ")":
      depth -= 1
    elif ch == "," and depth == 0:
      items.append(text[start:i])
      start = i + 1
  return [s.strip() for s in items + [text[start:]] if s.strip()]


def parse_group_rules(text: str) -> list[tuple[str, Optional[normreg.Group]]]:
  """``--group_rules`` text as ``normreg.groups_from_rules`` rules.

  ``REGEX=unit|tensor|none`` items, comma-separated (commas inside parentheses
  belong to the item), first match wins; ``unit`` and ``tensor`` take options
  in parentheses: ``stack=K`` leading copy axes, ``joint=TAG`` (``\\1`` expands
  to the regex's first group), and ``unit`` ``axis=A``, the unit's axis after the stack
  axes (0 for output-first layouts). Example:
  ``"convs/.*/kernel=unit,(dense)/(kernel|bias)=tensor(joint=\\1),.*=none"``.
  """
  rules = []
  for item in _split_top_level(text):
    match = _RULE.fullmatch(item)
    if not match:
      raise errors.InputError(f"--group_rules: {item!r} is not REGEX=unit|tensor|none, with "
                       "optional (stack=K, joint=TAG, axis=A) after unit or tensor.")
    kind, options = match["kind"], {}
    for option in filter(None, (o.strip() for o in (match["options"] or "").split(","))):
      key, sep, value = option.partition("=")
      allowed = ("stack", "joint", "axis") if kind == "unit" else ("stack", "joint")
      if not sep or key.strip() not in allowed or kind == "none":
        raise errors.InputError(f"--group_rules: {item!r}: option {option!r} is not stack=K, "
                         "joint=TAG or (unit only) axis=A, after unit or tensor.")
      key = key.strip()
      try:
        options[key] = int(value) if key in ("stack", "axis") else value.strip()
      except ValueError:
        raise errors.InputError(f"--group_rules: {item!r}: {key} must be an integer, got "
                         f"{value!r}.") from None
    group = None if kind == "none" else (normreg.unit if kind == "unit" else normreg.tensor)(
        **options)
    rules.append((match["pattern"], group))
  return rules


def find_groups(config: Config, graphdef, params, rest, images: jax.Array) -> Any:
  """The groups pytree: from ``--group_rules`` or found by autodiff on ``images``."""
  if config.group_rules:
    try:
      return normreg.groups_from_rules(params, parse_group_rules(config.group_rules))
    except ValueError as e:
      raise errors.InputError(f"--group_rules: {e}") from e
  fn = lambda p, x: nnx.merge(graphdef, p, rest, copy=True)(x)
  return normreg.find_scale_invariant(fn, params, images, seed=config.seed)


class Model(NamedTuple):
  """A model at init, split (``nnx.split(model, nnx.Param, ...)``), with its groups."""

  graphdef: Any  # training mode: BatchNorm on batch statistics
  eval_graphdef: Any  # evaluation mode: BatchNorm on its running statistics
  params: Any
  rest: Any
  groups: Any


def init_model(config: Config, num_classes: int, train_images, mean, std) -> Model:
  """``config``'s model at init, split, with its scale-invariance groups.

  The groups come from :func:`find_groups` on a probe batch, the first 64
  ``train_images`` (uint8, ``(N, H, W, C)``) normalized by ``mean`` and ``std``.
  Then ``--init_scale`` multiplies the grouped weights: the network's function
  is unchanged, only the norms (hence the effective learning rate) change.
  Shared by :func:`train_and_evaluate`, ``experiments.sweep`` and the benchmarks,
  so every run of a recipe starts from the same point.
  """
  model = create_model(config, num_classes, train_images.shape[-1])
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  probe = data_lib.normalize(jnp.asarray(train_images[:64]), mean, std)
  groups = find_groups(config, graphdef, params, rest, probe)
  if config.init_scale != 1.0:
    scaled = normreg.groups.map_grouped(lambda _, w: w * jnp.asarray(config.init_scale, w.dtype),
                                        groups, params)
    rest = rescale_running_statistics(graphdef, params, scaled, rest, probe)
    params = scaled
  model.eval()
  return Model(graphdef, nnx.split(model, nnx.Param, ...)[0], params, rest, groups)


def rescale_running_statistics(graphdef, params, scaled, rest, batch):
  """``rest`` with each BatchNorm's running statistics scaled as its input is by ``scaled``.

  Rescaling the weights before a BatchNorm by ``c`` scales its input, and so its batch
  mean by ``c`` and its batch variance by ``c^2``; the running statistics, which
  evaluation divides by, must start at ``(c * 0, c^2 * 1)`` for the two networks to be
  the same in evaluation mode too (van Laarhoven 2017's equivalence, at every step).
  Which channel's input scales by how much is measured, not assumed: one forward pass
  in training mode on ``batch`` with each BatchNorm's momentum at 0 (so its running
  statistics become the batch's), for ``params`` and for ``scaled``; the variance of
  each channel is multiplied by the ratio of the two, the mean by its square root.
  """
  def batch_statistics(p):
    model = nnx.merge(graphdef, p, rest, copy=True)
    model.train()
    for _, module in nnx.iter_graph(model):
      if isinstance(module, nnx.BatchNorm):
        module.momentum = 0.0
    model(batch)
    return nnx.split(model, nnx.Param, ...)[2]

  path_str = normreg.groups.path_str
  before = {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(
      batch_statistics(params))}
  after = {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(
      batch_statistics(scaled))}
  # Per channel, var_scaled / var: c^2 where the input scales by c, 1 where it does not.
  ratio = {p: jnp.where(v > 0, after[p] / jnp.where(v > 0, v, 1), 1)
           for p, v in before.items() if p.endswith("/var")}

  def one(path, x):
    name = path_str(path)
    if name in ratio:
      return (x * ratio[name]).astype(x.dtype)
    if name.endswith("/mean") and name[:-len("mean")] + "var" in ratio:
      return (x * jnp.sqrt(ratio[name[:-len("mean")] + "var"])).astype(x.dtype)
    return x

  return jax.tree_util.tree_map_with_path(one, rest)


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


def rotational_target(config: Config) -> float:
  """The angle per step ``--method=rotational`` targets: the equilibrium angle of the same
  recipe with its decay, SGD + coupled L2 (``lam_wd = 2 lam``) or AdamW (``b1 = 0.9``)."""
  if config.optimizer == "sgd":
    return theory.equilibrium_angle_sgd(config.lr, 2 * config.lam_value, config.momentum)
  return theory.equilibrium_angle_adamw(config.lr, config.lam_value, 0.9)


def grouped_schedule(config: Config, schedule: optax.Schedule) -> optax.Schedule:
  """The learning rate of the grouped weights: ``schedule``, except for ``--method=exp_lr``
  whose rate grows as ``lr * alpha**(-2t-1)`` (``normreg.theory.exponential_lr_schedule``)
  and ``--method=rotational`` whose rate is its target angle, on the schedule's shape."""
  if config.method == "rotational":
    target = rotational_target(config)
    return lambda t: schedule(t) * (target / config.lr)
  if config.method == "exp_lr":
    return theory.exponential_lr_schedule(config.lr, 2 * config.lam_value,
                                          config.momentum if config.optimizer == "sgd" else 0.0)
  return schedule


def elr_power(config: Config) -> int:
  """Exponent of ``eta/||w||^p``: 2 for SGD, 1 for Adam."""
  return 2 if config.optimizer == "sgd" else 1


def make_optimizer(config: Config, groups, schedule: optax.Schedule
                   ) -> optax.GradientTransformation:
  """The optax chain of ``--method`` on top of ``--optimizer``. Order, commented.

  The chains built here end in :func:`normreg.scale_by_learning_rates`:
  ``schedule`` for the grouped weights and, with ``--ungrouped_lr``, the same
  schedule scaled to that peak for the other parameters. The packaged
  optimizers (spherical, adamp/sgdp, nero, hyperball, rotational) take the
  schedules themselves. Without ``--ungrouped_lr`` the chains of ``none``,
  ``l2`` and ``decoupled`` are ``optax.sgd``, ``optax.adam`` and
  ``optax.adamw`` written out, with the same numbers.
  """
  sgd = config.optimizer == "sgd"
  mu = config.momentum
  mask = normreg.as_mask(groups)
  ungrouped = None if config.ungrouped_lr is None else (
      lambda t: schedule(t) * (config.ungrouped_lr / config.lr))
  if ungrouped is None and config.method == "exp_lr":
    ungrouped = schedule  # only the grouped weights' rate grows

  def direction():
    """The base optimizer without its learning rate: momentum (SGD) or Adam's scaling."""
    if sgd:
      return optax.trace(decay=mu) if mu else optax.identity()
    return optax.scale_by_adam()

  def rates():
    return normreg.scale_by_learning_rates(grouped_schedule(config, schedule), groups,
                                           ungrouped)

  if config.method == "none":
    return optax.chain(direction(), rates())
  if config.method == "l2":
    # Coupled: the gradient of lam*||w||^2 joins the data gradient before the optimizer.
    return optax.chain(normreg.add_l2_penalty(config.lam_value, groups), direction(), rates())
  if config.method == "decoupled" and config.corrected_decay:
    # Defazio (2025): the decay times lr_t/lr_max, so w decays by lam*lr_t^2/lr_max a step.
    return optax.chain(direction(), normreg.add_corrected_decayed_weights(
        config.lam_value, schedule, groups, peak_learning_rate=config.lr), rates())
  if config.method == "decoupled":
    # SGDW / AdamW: the direction (momentum or Adam) of the gradient only, then + lam*w,
    # then the learning rate (so the decay is multiplied by it, as in optax.adamw).
    return optax.chain(direction(), optax.add_decayed_weights(config.lam_value, mask=mask),
                       rates())
  if config.method == "spherical":
    if sgd:
      return normreg.spherical_sgd(schedule, groups, momentum=mu, ungrouped_learning_rate=ungrouped)
    return normreg.spherical_adam(schedule, groups, ungrouped_learning_rate=ungrouped)
  if config.method == "elr_rescale":
    # SGD: rescale the raw gradient by ||w||^2; Adam: rescale Adam's step by ||w||.
    if sgd:
      return optax.chain(normreg.scale_by_weight_norm(groups, power=2), direction(), rates())
    return optax.chain(direction(), normreg.scale_by_weight_norm(groups, power=1), rates())
  if config.method == "tangent":
    # The base step with its radial part removed (AdamP-style projection).
    return optax.chain(direction(), rates(), normreg.tangent_projection(groups))
  if config.method == "rotational":
    # Kosson et al. (2024): the base optimizer's direction (no decay), each grouped unit
    # kept at its initial norm and turned by the L2/AdamW recipe's equilibrium angle.
    # The inner step of the grouped weights has no learning rate (the wrapper normalizes it
    # and sets its angle on the schedule); the other parameters keep theirs.
    inner = optax.chain(direction(), normreg.scale_by_learning_rates(
        1.0, groups, ungrouped if ungrouped is not None else schedule))
    return normreg.rotational(inner, groups, grouped_schedule(config, schedule))
  if config.method == "adamp":
    # Heo et al. (2021): the radial part removed on the exact groups (or AdamP's cosine
    # test), decoupled decay --lam times wd_ratio 0.1 there.
    if sgd:
      return normreg.sgdp(schedule, groups, momentum=mu, weight_decay=config.lam_value,
                          heuristic=config.adamp_cosine)
    return normreg.adamp(schedule, groups, weight_decay=config.lam_value,
                         heuristic=config.adamp_cosine)
  if config.method == "nero":
    return normreg.nero(schedule, groups)
  if config.method == "hyperball":
    return normreg.adamh(schedule, groups, ungrouped_learning_rate=ungrouped)
  if config.method == "exp_lr":
    # Li & Arora (2019): no L2, and the grouped weights' rate grows as lr*alpha^(-2t-1); with
    # momentum their buffer starts at k*w0 (normreg.theory). Same network as --method=l2.
    lam_wd = 2 * config.lam_value
    k = theory.exponential_lr_momentum_init(config.lr, lam_wd, mu)
    momentum = direction()
    if k:
      momentum = optax.GradientTransformation(
          lambda params: optax.TraceState(trace=normreg.groups.map_grouped(
              lambda _, zero, w: zero + k * w, groups, jax.tree.map(jnp.zeros_like, params),
              params)),
          momentum.update)
    return optax.chain(momentum, rates())
  raise ValueError(f"--method={config.method!r} is unknown.")


# ------------------------------------------------------------------------ steps


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
  stacks = normreg.groups.groups_by_path(groups, "layer_metrics")
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
                           rescaled=config.method in config_lib.ANGLE_METHODS)


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
  Ctrl-C (SIGINT, in a one-process run) stops after the current step, saves it
  and raises ``errors.Interrupted``: the same call resumes from there.

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
  with workdir_lib.open_run(workdir, config, restart=restart) as run:
    return _train(config, run.path, dataset=dataset, interrupt_after_step=interrupt_after_step,
                  progress=progress, devices=devices, on_step=on_step, tensorboard=tensorboard)


class _StopRequest:
  """Ctrl-C while training: stop after the current step and save it (a second one stops
  at once). Only in a one-process run's main thread: a multi-host job must stop together."""

  def __init__(self, show: bool):
    self.requested, self._show, self._old = False, show, None
    if (jax.process_count() == 1
        and threading.current_thread() is threading.main_thread()):
      self._old = signal.signal(signal.SIGINT, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    if self.requested:
      raise KeyboardInterrupt
    self.requested = True
    _note("Ctrl-C: stopping after this step to save it (Ctrl-C again stops at once).",
          self._show)

  def close(self) -> None:
    if self._old is not None:
      signal.signal(signal.SIGINT, self._old)
      self._old = None


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

  model, schedule, tx, state = initial_state(config, ds)
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
  key = jax.random.key(config.seed)
  train_step = jax.jit(
      make_train_step(graphdef, tx, mean, std, augment=config.augment,
                      key=jax.random.fold_in(key, 1), batch_sharding=batch_sharding,
                      **data_lib.augment_options(config.dataset)),
      in_shardings=(replicated, replicated, replicated, batch_sharding),
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
  config_written = False
  try:
    for epoch in range(start_epoch, config.epochs):
      order = np.asarray(data_lib.epoch_permutation(jax.random.fold_in(key, 1000 + epoch),
                                                    n_train, config.batch_size))
      t0, images_seen = time.perf_counter(), 0
      # A run stopped by Ctrl-C resumes in the middle of its epoch.
      for i in range(step - epoch * steps_per_epoch, steps_per_epoch):
        if stop.requested:
          if step != saved_step:
            save()
          raise errors.Interrupted(f"stopped by Ctrl-C at step {step} of {total_steps}; "
                                   f"saved it in {checkpoints}")
        idx = shard_batch_indices(order[i], batch_sharding)
        log_now = (step + 1) % config.log_every == 0 or i == steps_per_epoch - 1
        # The step may donate its input: keep a copy of the params to measure the turn.
        before = jax.tree.map(jnp.copy, state.params) if log_now else None
        state, m = train_step(state, train_images, train_labels, idx)
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
  finally:
    stop.close()
    bar.close()
    log.close()
    if manager:
      manager.close()
  return state


def progress_bar(total: int, enabled: bool, initial: int = 0, desc: Optional[str] = None,
                 leave: bool = True, unit: str = "step"):
  """A tqdm bar over ``total`` steps (``tqdm.auto``; disabled unless ``enabled``)."""
  from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
  return tqdm.tqdm(total=total, initial=initial, disable=not enabled, unit=unit,
                   dynamic_ncols=True, desc=desc, leave=leave)

"""Image classification, the paper's task: ``--task=classification`` (the default).

The data are a whole image data set in host memory (``experiments.data``: the
shipped digits, the tfds catalog, an image folder) as uint8; the batch is gathered,
augmented (random crop and flip, ``data.augment``) and normalized by the training
set's channel statistics (``data.normalize``) inside the jitted step. The model is
one of ``normreg.models`` (the paper's CNN, ResNet-20, the scanned CNN); the loss
is the softmax cross-entropy, and the test set is scored by its mean loss and
accuracy, chance being one over the number of classes.

Also here, under their old names (the trainer re-exports them): the model of a
config for a number of classes (:func:`create_model`), its init from images
(:func:`init_model`) and the image-shaped train and eval steps
(:func:`make_train_step`, :func:`make_eval_step`), which the tests and benchmarks
written before the task registry call.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from experiments import data as data_lib
from experiments import errors
from experiments import tasks

DATASETS = data_lib.DATASETS
MODELS = ("cnn", "resnet20", "scan_cnn")
NORMS = ("batch", "layer", "group", "weight", "none")


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy of integer ``labels``, in float32."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                         labels).mean()


class ImageClassification(tasks.Task):
  """Images and integer labels; cross-entropy; test accuracy (module docstring)."""

  name = "classification"
  headline = "accuracy"
  higher_is_better = True
  unit = "images"
  help = "images and labels; the paper's CNNs; test accuracy"
  flags = {
      "dataset": f"Data set: one of {', '.join(DATASETS)}. 'digits' is shipped in the "
                 "repository (offline; 1,497 training and 300 test images); the catalog ones "
                 "come through tensorflow-datasets; 'folder' reads --data_dir.",
      "train_size": "Use a random subset of this many training images.",
      "test_size": "Use a random subset of this many test images.",
      "model": f"Network: one of {', '.join(MODELS)}; or another task's name (lm), which is "
               "that --task.",
      "norm": f"Normalization: one of {', '.join(NORMS)}.",
      "width": "Base width (channels of the first stage); default: the model's own.",
      "augment": "Random crop and flip inside the jitted step (CIFAR-style; digits: shifts "
                 "of at most 2 pixels, never mirrored).",
  }

  def validate(self, config) -> None:
    for name, choices in (("dataset", DATASETS), ("model", MODELS), ("norm", NORMS)):
      value = getattr(config, name)
      if value not in choices:
        raise errors.InputError(f"--{name}={value!r} is not one of {', '.join(choices)}.")
    if config.dataset == "folder" and not config.data_dir:
      raise errors.InputError("--dataset=folder needs --data_dir=DIR (a folder with "
                              "train/<class>/ and test/<class>/ image subfolders).")
    for name in ("train_size", "test_size", "width"):
      value = getattr(config, name)
      if value is not None and not value > 0:
        raise errors.InputError(f"--{name} must be > 0, got {value}.")

  def load(self, config) -> data_lib.Dataset:
    return data_lib.load(config.dataset, data_dir=config.data_dir,
                         train_size=config.train_size, test_size=config.test_size,
                         seed=config.seed)

  def data_key(self, config) -> Any:
    subset = config.train_size is not None or config.test_size is not None
    return (config.dataset, config.data_dir, config.train_size, config.test_size,
            config.seed if subset else None)  # the seed draws the subsets only

  def arrays(self, data: data_lib.Dataset) -> tuple[Any, Any]:
    return ({"images": data.train_images, "labels": data.train_labels},
            {"images": data.test_images, "labels": data.test_labels})

  def stats(self, data: data_lib.Dataset) -> dict[str, Any]:
    mean, std = data_lib.channel_stats(data.train_images)
    return {"mean": mean, "std": std}

  def chance(self, data: data_lib.Dataset) -> float:
    return 1.0 / data.num_classes

  def create_model(self, config, data: data_lib.Dataset):
    return create_model(config, data.num_classes, data.train_images.shape[-1])

  def prepare(self, config, batch, stats, key: Optional[jax.Array]) -> jax.Array:
    x = batch["images"]
    if key is not None and config.augment:
      x = data_lib.augment(key, x, **data_lib.augment_options(config.dataset))
    return data_lib.normalize(x, stats["mean"], stats["std"])

  def loss(self, config, outputs, batch) -> jax.Array:
    return cross_entropy(outputs, batch["labels"])

  def train_metrics(self, config, outputs, batch) -> dict[str, jax.Array]:
    return {"accuracy": jnp.mean(jnp.argmax(outputs, -1) == batch["labels"])}

  def eval_sums(self, config, outputs, batch, weights) -> dict[str, jax.Array]:
    losses = optax.softmax_cross_entropy_with_integer_labels(outputs.astype(jnp.float32),
                                                             batch["labels"])
    correct = (jnp.argmax(outputs, -1) == batch["labels"]).astype(jnp.float32)
    return {"loss": jnp.sum(losses * weights), "correct": jnp.sum(correct * weights)}

  def eval_metrics(self, config, sums: dict[str, float], n: int) -> dict[str, float]:
    return {"loss": sums["loss"] / n, "accuracy": sums["correct"] / n}


TASK = tasks.register(ImageClassification())


# ------------------------------------------------- the image-shaped names of old


def create_model(config, num_classes: int, in_channels: int):
  """``normreg.models.create`` of ``config``'s ``--model``, ``--norm`` and ``--width``."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import normreg  # pylint: disable=g-import-not-at-top
  dtype = jnp.bfloat16 if config.dtype == "bfloat16" else None
  return normreg.models.create(config.model, num_classes=num_classes, norm=config.norm,
                               width=config.width, in_channels=in_channels, dtype=dtype,
                               epsilon=config.norm_eps, rngs=nnx.Rngs(config.seed))


def init_model(config, num_classes: int, train_images, mean, std):
  """``experiments.network.init_model`` of a data set given by its parts."""
  from experiments import network  # pylint: disable=g-import-not-at-top
  data = data_lib.Dataset(train_images, None, None, None, num_classes, (), "")
  return network.init_model(config, data, TASK, stats={"mean": mean, "std": std})


def _image_prepare(augment: bool, pad: int, flip: bool) -> Callable:
  def prepare(batch, stats, key):
    x = batch["images"]
    if key is not None and augment:
      x = data_lib.augment(key, x, pad=pad, flip=flip)
    return data_lib.normalize(x, stats["mean"], stats["std"])

  return prepare


def make_train_step(graphdef, tx: optax.GradientTransformation, mean, std, *,
                    augment: bool, key: jax.Array,
                    batch_sharding: Optional[jax.sharding.Sharding] = None,
                    pad: int = 4, flip: bool = True) -> Callable:
  """``step(state, images, labels, idx) -> (state, metrics)``: ``steps.make_task_train_step``
  of this task with ``images``/``labels`` for the training set, ``mean``/``std`` for its
  statistics, and :func:`data.augment` with ``pad`` and ``flip`` if ``augment``."""
  from experiments import steps  # pylint: disable=g-import-not-at-top
  step = steps.make_task_train_step(graphdef, tx, TASK, None, {"mean": mean, "std": std},
                                    key=key, batch_sharding=batch_sharding,
                                    prepare=_image_prepare(augment, pad, flip))
  return lambda state, images, labels, idx: step(state, {"images": images, "labels": labels},
                                                 idx)


def make_eval_step(eval_graphdef, mean, std) -> Callable:
  """``eval_step(params, rest, images, labels, weights) -> (sum loss, sum correct)``."""
  from experiments import steps  # pylint: disable=g-import-not-at-top
  step = steps.make_task_eval_step(eval_graphdef, TASK, None, {"mean": mean, "std": std},
                                   prepare=_image_prepare(False, 0, False))

  def eval_step(params, rest, images, labels, weights):
    sums = step(params, rest, {"images": images, "labels": labels}, weights)
    return sums["loss"], sums["correct"]

  return eval_step

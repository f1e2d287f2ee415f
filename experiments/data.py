"""Small image data sets held in memory, shuffled and augmented on the device.

The design follows the advice for small data sets (CIFAR-10 is 150 MB as
uint8): read the whole data set once into host memory as uint8 numpy arrays
(:func:`load`), move it to the device once, draw each epoch's order with
``jax.random.permutation`` (:func:`epoch_permutation`) and gather, augment
(:func:`augment`: random crop and horizontal flip) and normalize
(:func:`normalize`) the batch inside the jitted train step. There is no input
pipeline in the training loop: TensorFlow stays out of it and off the GPU.

Three readers:

* ``digits`` (the default) is shipped in the repository, so a fresh clone
  trains offline: the UCI handwritten digits as scikit-learn bundles them
  (``experiments/digits/``: provenance, licence and the script that made the
  file), 1,497 training and 300 test images of 10 classes, 8x8 grayscale
  repeated to 16x16 (the paper's CNN pools three times);
* the catalog data sets (``cifar10``, ``cifar100``, ``mnist``,
  ``fashion_mnist``) are read through ``tfds.data_source`` (tensorflow-datasets'
  random-access reader over ``array_record`` files), which needs neither
  TensorFlow nor tf.data once the data set is prepared; downloading and
  preparing it the first time needs TensorFlow, which the ``tfds`` extra
  installs (``pip install -e '.[tfds]'``). Without it, or without a network,
  the load stops with one line saying what to install or to use ``folder``.
  tensorflow-datasets is imported lazily, only on this path, so
  ``import experiments.data`` works on a machine without it;
* ``folder`` reads ``DIR/train/<class>/*`` and ``DIR/test/<class>/*`` image
  files (jpg, jpeg, png) with pillow. ``tfds.ImageFolder`` reads the same
  layout but needs TensorFlow, which the GPU machine does not have. Pillow
  decodes the 60,000 JPEGs of the CIFAR-10 copy in about 6 s on one core.

Example::

  ds = load("folder", data_dir="/data/cifar10", train_size=5000)
  mean, std = channel_stats(ds.train_images)
  images = jax.device_put(ds.train_images)
  order = epoch_permutation(jax.random.key(0), len(ds.train_labels), 128)
  x = normalize(augment(jax.random.key(1), images[order[0]]), mean, std)
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from experiments import errors

DATASETS = ("digits", "cifar10", "cifar100", "mnist", "fashion_mnist", "folder")
CATALOG = ("cifar10", "cifar100", "mnist", "fashion_mnist")

# The shipped data set: the UCI handwritten digits, 1,497 training and 300 test images
# (experiments/digits/README.md says where they come from and under which licence).
DIGITS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits", "digits.npz")
DIGITS_SIZE = 16  # the 8x8 images, each pixel repeated 2x2: three 2x2 poolings leave 2x2

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")

_FOLDER_LAYOUT = "DIR/train/<class>/*.jpg|*.jpeg|*.png and DIR/test/<class>/*"


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A whole image-classification data set in host memory.

  Attributes:
    train_images: uint8, ``(N, H, W, C)`` (``C == 1`` for the mnist kinds).
    train_labels: int32, ``(N,)``, in ``[0, num_classes)``.
    test_images: uint8, ``(M, H, W, C)``.
    test_labels: int32, ``(M,)``.
    num_classes: number of classes.
    class_names: the name of each label, ``class_names[label]``.
    name: the data set's name (``"cifar10"``, ..., or ``"folder"``).
  """
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  class_names: tuple[str, ...]
  name: str


# ------------------------------------------------------------------------ host side


def load(dataset: str, *, data_dir: Optional[str] = None, train_size: Optional[int] = None,
         test_size: Optional[int] = None, seed: int = 0) -> Dataset:
  """Reads a whole data set into host memory.

  Args:
    dataset: one of :data:`DATASETS`. ``"digits"`` is read from the shipped
      ``experiments/digits/digits.npz``; the catalog names are read with
      ``tfds.data_source`` (downloaded and prepared on first use); ``"folder"``
      reads an image folder laid out as ``DIR/train/<class>/*.jpg|*.jpeg|*.png``
      and ``DIR/test/<class>/*`` with pillow. Class ``i`` is the ``i``-th of the
      sorted subfolder names of ``train/``; ``test/`` must hold the same classes.
      All images must have one size. Grayscale images give ``C == 1``, others
      ``C == 3`` (a grayscale image among colour ones is repeated to 3 channels).
    data_dir: for ``"folder"``, the folder ``DIR`` (required); for the catalog
      data sets, tensorflow-datasets' data directory (``None``: its default).
    train_size: if set, a random subset of this many training images (drawn
      with ``seed`` before anything is decoded); it may not exceed the data set.
    test_size: likewise for the test set.
    seed: seed of the subsets.

  Returns:
    A :class:`Dataset`.

  Raises:
    ValueError: an unknown ``dataset``, ``"folder"`` without ``data_dir``, a
      non-positive or too large ``train_size``/``test_size``, a folder with no
      classes or images, test classes that differ from the train classes, or
      images of different sizes.
    FileNotFoundError: a ``data_dir`` (for ``"folder"``) that does not exist or
      has no ``train/`` or ``test/`` subfolder.
    ImportError: a catalog data set without tensorflow-datasets installed.
  """
  if dataset not in DATASETS:
    raise errors.InputError(f"unknown --dataset (dataset=) {dataset!r}; choose one of "
                     f"{', '.join(DATASETS)}.")
  for flag, size in (("train_size", train_size), ("test_size", test_size)):
    if size is not None and (isinstance(size, bool) or int(size) != size or size <= 0):
      raise errors.InputError(f"--{flag} ({flag}=) must be a positive integer, got {size!r}; "
                       f"leave it unset to use the whole set.")
  if dataset == "folder":
    return _load_folder(data_dir, train_size, test_size, seed)
  if dataset == "digits":
    return _load_digits(train_size, test_size, seed)
  return _load_catalog(dataset, data_dir, train_size, test_size, seed)


def _subset(n: int, size: Optional[int], seed: int, which: int, flag: str,
            where: str) -> np.ndarray:
  """Sorted indices of a seeded random subset of ``range(n)`` of ``size`` (all if None)."""
  if size is None or size == n:
    return np.arange(n)
  if size > n:
    raise errors.InputError(f"--{flag}={size} is larger than {where} ({n} images); lower --{flag} "
                     f"or leave it unset.")
  rng = np.random.default_rng([seed, which])
  return np.sort(rng.choice(n, size=size, replace=False))


def _load_digits(train_size: Optional[int], test_size: Optional[int], seed: int) -> Dataset:
  """The shipped digits: 8x8 pixels 0..16 scaled to 0..255 and repeated to 16x16, 1 channel."""
  with np.load(DIGITS_FILE) as f:
    images, labels, test = f["images"], f["labels"].astype(np.int32), f["test"]
  scale = DIGITS_SIZE // images.shape[1]
  images = (images.astype(np.int32) * 255 + 8) // 16  # 0..16 -> 0..255, rounded
  images = images.repeat(scale, 1).repeat(scale, 2)[..., None].astype(np.uint8)
  train_idx = np.flatnonzero(~test)[_subset(int((~test).sum()), train_size, seed, 0,
                                            "train_size", "the digits training set")]
  test_idx = np.flatnonzero(test)[_subset(int(test.sum()), test_size, seed, 1, "test_size",
                                          "the digits test set")]
  return Dataset(images[train_idx], labels[train_idx], images[test_idx], labels[test_idx],
                 num_classes=10, class_names=tuple(map(str, range(10))), name="digits")


def _load_catalog(name: str, data_dir: Optional[str], train_size: Optional[int],
                  test_size: Optional[int], seed: int) -> Dataset:
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise errors.MissingExtraError(
        f"--dataset={name} is read with tensorflow-datasets, which is not installed; "
        f"install the launcher's extra: pip install -e '.[experiments]', or use the shipped "
        f"--dataset=digits, or --dataset=folder --data_dir=DIR on an image folder "
        f"({_FOLDER_LAYOUT}).") from e
  try:
    train_src, test_src = _data_source(tfds, name, data_dir)
  except ImportError as e:
    # Preparing a catalog data set (the first time) needs TensorFlow and more.
    raise errors.MissingExtraError(
        f"--dataset={name}: downloading and preparing it with tensorflow-datasets needs "
        f"{e.name or 'a module'} ({e}); install the extra: pip install -e '.[tfds]', or "
        f"use the shipped --dataset=digits, or --dataset=folder --data_dir=DIR on an image "
        f"folder ({_FOLDER_LAYOUT}).") from e
  except (OSError, ConnectionError, tfds.download.DownloadError) as e:
    raise errors.MissingInputError(
        f"--dataset={name}: could not download or read it ({type(e).__name__}: {e}); check "
        f"the network and --data_dir, or use the shipped --dataset=digits, or "
        f"--dataset=folder --data_dir=DIR on an image folder ({_FOLDER_LAYOUT}).") from e
  label = train_src.dataset_info.features["label"]
  train_idx = _subset(len(train_src), train_size, seed, 0, "train_size",
                      f"the {name} training set")
  test_idx = _subset(len(test_src), test_size, seed, 1, "test_size", f"the {name} test set")
  train_images, train_labels = _read_source(train_src, train_idx)
  test_images, test_labels = _read_source(test_src, test_idx)
  return Dataset(train_images, train_labels, test_images, test_labels,
                 num_classes=int(label.num_classes), class_names=tuple(label.names), name=name)


def _data_source(tfds, name: str, data_dir: Optional[str]):
  """``tfds.data_source`` of the train and test splits, downloaded and prepared if needed.

  A prepared (or ``tfds.testing.mock_data``) data set is read without the
  network. Otherwise one request with a timeout (:func:`probe_download`) checks
  that the download can start, instead of tfds' 10 retries with backoff
  (3.5 minutes offline); after a failed preparation, the empty and temporary
  folders it left under the tfds data folder are removed.
  """
  kwargs = dict(split=["train", "test"], data_dir=data_dir,
                builder_kwargs={"file_format": "array_record"})
  try:  # prepared (or tfds.testing.mock_data)
    return tfds.data_source(name, download=False, **kwargs)
  except (KeyError, AssertionError, FileNotFoundError):  # not prepared: tfds says so thus
    pass
  builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  probe_download(name, sorted(builder.url_infos or {}))
  # Preparing needs TensorFlow (the tfds extra): say so before the download, not after it.
  import tensorflow  # pylint: disable=g-import-not-at-top,unused-import,import-outside-toplevel
  root = epath.Path(builder.data_dir).parent.parent  # DATA_DIR/name/version
  before = _folders(root)
  try:
    return tfds.data_source(name, download=True, **kwargs)
  except BaseException:
    _remove_new_folders(root, before)
    raise


PROBE_TIMEOUT_S = 10.0


def probe_download(name: str, urls: Sequence[str]) -> None:
  """One HEAD request (``requests``, as tfds downloads, so proxies count) to the first of
  ``urls``; raises a one-line ``errors.MissingInputError`` if no answer comes within
  :data:`PROBE_TIMEOUT_S` seconds per connect and read. Any HTTP answer will do."""
  if not urls:
    return
  import requests  # pylint: disable=g-import-not-at-top
  try:
    requests.head(urls[0], timeout=PROBE_TIMEOUT_S, allow_redirects=True)
  except requests.RequestException as e:
    raise errors.MissingInputError(
        f"--dataset={name}: cannot reach {urls[0]} to download it ({type(e).__name__}); check "
        f"the network (or its proxy), or use the shipped --dataset=digits, or --dataset=folder "
        f"--data_dir=DIR on an image folder ({_FOLDER_LAYOUT}).") from None


def _folders(root: epath.Path) -> set[str]:
  return {dirpath for dirpath, _, _ in os.walk(root)}


def _remove_new_folders(root: epath.Path, before: set[str]) -> None:
  """Removes the folders under ``root`` made since ``before`` that are empty or tfds'
  temporary ones (``*.tmp.*``, ``*.incomplete*``), deepest first."""
  import shutil  # pylint: disable=g-import-not-at-top
  for dirpath, _, _ in sorted(os.walk(root), key=lambda w: -len(w[0])):
    if dirpath in before or not os.path.isdir(dirpath):
      continue
    name = os.path.basename(dirpath)
    if ".tmp." in name or ".incomplete" in name or "incomplete." in name:
      shutil.rmtree(dirpath, ignore_errors=True)
    elif not os.listdir(dirpath):
      os.rmdir(dirpath)


def _read_source(source: Any, indices: np.ndarray,
                 chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
  """Reads ``source[i]["image"], source[i]["label"]`` for ``i in indices`` into arrays."""
  images = labels = None
  for start in range(0, len(indices), chunk):
    keys = [int(i) for i in indices[start:start + chunk]]
    try:
      records = source.__getitems__(keys)  # one batched read of the array_record file
    except TypeError:  # tfds.testing.mock_data's mock has no working batched read
      records = [source[i] for i in keys]
    for j, record in enumerate(records, start):
      image = np.asarray(record["image"])
      if images is None:
        images = np.empty((len(indices),) + image.shape, np.uint8)
        labels = np.empty((len(indices),), np.int32)
      images[j] = image
      labels[j] = record["label"]
  assert images is not None and labels is not None  # sizes are positive
  return images, labels


def _load_folder(data_dir: Optional[str], train_size: Optional[int],
                 test_size: Optional[int], seed: int) -> Dataset:
  if not data_dir:
    raise errors.InputError(f"--dataset=folder needs --data_dir (data_dir=), a folder laid out as "
                     f"{_FOLDER_LAYOUT}.")
  if not os.path.isdir(data_dir):
    raise errors.MissingInputError(f"--data_dir={data_dir} does not exist or is not a folder; "
                            f"point it at a folder laid out as {_FOLDER_LAYOUT}.")
  splits = {}
  for split in ("train", "test"):
    path = os.path.join(data_dir, split)
    if not os.path.isdir(path):
      raise errors.MissingInputError(f"--data_dir={data_dir} has no {split}/ subfolder; "
                              f"expected {_FOLDER_LAYOUT}.")
    splits[split] = _list_classes(path)
  classes = sorted(splits["train"])
  if not classes:
    raise errors.InputError(f"--data_dir={data_dir}: train/ holds no class folders; "
                     f"expected {_FOLDER_LAYOUT}.")
  if set(splits["test"]) != set(classes):
    missing = sorted(set(classes) - set(splits["test"]))
    extra = sorted(set(splits["test"]) - set(classes))
    raise errors.InputError(f"--data_dir={data_dir}: test/ classes differ from train/ classes "
                     f"(missing in test/: {missing}, not in train/: {extra}); give test/ the "
                     f"same class folders as train/.")
  files = {}
  for split in ("train", "test"):
    paths, labels = [], []
    for label, name in enumerate(classes):
      names = splits[split][name]
      if split == "train" and not names:
        raise errors.InputError(f"--data_dir={data_dir}: train/{name}/ holds no images "
                         f"({', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder.")
      paths += [os.path.join(data_dir, split, name, f) for f in names]
      labels += [label] * len(names)
    if not paths:
      raise errors.InputError(f"--data_dir={data_dir}: {split}/ holds no images "
                       f"({', '.join(IMAGE_EXTENSIONS)}); expected {_FOLDER_LAYOUT}.")
    files[split] = (paths, np.asarray(labels, np.int32))
  empty = [f"test/{name}/" for name in classes if not splits["test"][name]]
  if empty and len(empty) < len(classes):
    logging.warning("--data_dir=%s: %s hold(s) no images: the test accuracy covers %d of the "
                    "%d classes.", data_dir, ", ".join(empty), len(classes) - len(empty),
                    len(classes))

  train_idx = _subset(len(files["train"][0]), train_size, seed, 0, "train_size",
                      f"the training set of --data_dir={data_dir}")
  test_idx = _subset(len(files["test"][0]), test_size, seed, 1, "test_size",
                     f"the test set of --data_dir={data_dir}")
  paths = [files["train"][0][i] for i in train_idx] + [files["test"][0][i] for i in test_idx]
  train_images, test_images = _stack(_decode_all(paths, data_dir), paths, len(train_idx))
  return Dataset(train_images, files["train"][1][train_idx], test_images,
                 files["test"][1][test_idx], num_classes=len(classes),
                 class_names=tuple(classes), name="folder")


def _list_classes(path: str) -> dict[str, list[str]]:
  """``{class: sorted image file names}`` for the (non-hidden) subfolders of ``path``."""
  classes = {}
  with os.scandir(path) as entries:
    for entry in entries:
      if entry.is_dir() and not entry.name.startswith("."):
        with os.scandir(entry.path) as images:
          classes[entry.name] = sorted(
              f.name for f in images
              if f.is_file() and not f.name.startswith(".")
              and os.path.splitext(f.name)[1].lower() in IMAGE_EXTENSIONS)
  return classes


def _decode_all(paths: Sequence[str], data_dir: str) -> list[np.ndarray]:
  """:func:`_decode` of every path; a file pillow cannot read (cut short, not an image)
  stops the load with one line naming it, after all are tried (to count them)."""
  images, bad = [], []
  for path in paths:
    try:
      images.append(_decode(path))
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # what pillow raises on bad data
      bad.append(f"{path} ({type(e).__name__}: {e})")
  if bad:
    more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
    raise errors.InputError(f"--data_dir={data_dir}: {len(bad)} image file(s) cannot be read: "
                            f"{bad[0]}{more}; replace or remove them.")
  return images


def _decode(path: str) -> np.ndarray:
  """One image file as uint8 ``(H, W, 1)`` (grayscale) or ``(H, W, 3)``."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(path) as image:
    if image.mode in ("1", "L", "I", "I;16", "F"):
      return np.asarray(image.convert("L"))[:, :, None]
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


def _stack(images: list[np.ndarray], paths: Sequence[str],
           n_train: int) -> tuple[np.ndarray, np.ndarray]:
  """Stacks decoded images into (train, test) uint8 arrays, checking they share a size."""
  height, width = images[0].shape[:2]
  channels = max(image.shape[2] for image in images)
  out = np.empty((len(images), height, width, channels), np.uint8)
  for i, (image, path) in enumerate(zip(images, paths)):
    if image.shape[:2] != (height, width):
      raise errors.InputError(f"--data_dir: {path} is {image.shape[1]}x{image.shape[0]} (WxH) but "
                       f"{paths[0]} is {width}x{height}; all images of a folder must have one "
                       f"size: resize them first.")
    out[i] = image  # a grayscale image among colour ones is repeated to 3 channels
  return out[:n_train], out[n_train:]


# ---------------------------------------------------------------------- device side


def channel_stats(images_uint8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and standard deviation of ``images / 255``.

  Computed exactly from a 256-bin histogram per channel, so it needs no float
  copy of the data set. A constant channel gets ``std = 1`` (not 0) so that
  :func:`normalize` stays finite.

  Args:
    images_uint8: uint8 ``(..., C)``, usually the training images.

  Returns:
    ``(mean, std)``, each float32 ``(C,)``.
  """
  images = np.asarray(images_uint8)
  if images.dtype != np.uint8:
    raise ValueError(f"channel_stats expects uint8 images, got {images.dtype}.")
  if images.size == 0:
    raise ValueError(f"channel_stats needs at least one image, got shape {images.shape}.")
  channels = images.shape[-1]
  pixels = images.reshape(-1, channels)
  offsets = np.arange(channels, dtype=np.intp) * 256  # channel c counts in bins [256c, 256c+256)
  counts = np.zeros(256 * channels, np.int64)
  for start in range(0, pixels.shape[0], 1 << 14):  # bounded temporaries, cache-sized
    counts += np.bincount((pixels[start:start + (1 << 14)] + offsets).ravel(),
                          minlength=256 * channels)
  counts = counts.reshape(channels, 256).astype(np.float64)
  values = np.arange(256, dtype=np.float64) / 255.0
  n = counts.sum(axis=1)
  mean = (counts @ values) / n
  var = np.sum(counts * (values[None, :] - mean[:, None]) ** 2, axis=1) / n
  std = np.where(var > 0, np.sqrt(var), 1.0)
  return np.asarray(mean, np.float32), np.asarray(std, np.float32)


def normalize(images_uint8: jax.Array, mean, std) -> jax.Array:
  """``(images / 255 - mean) / std`` per channel, as float32.

  Args:
    images_uint8: uint8 ``(..., H, W, C)`` (any integer or float dtype in
      ``[0, 255]`` works).
    mean: ``(C,)`` or a scalar, in units of ``images / 255`` (see
      :func:`channel_stats`).
    std: likewise.

  Returns:
    float32, the shape of ``images_uint8``.
  """
  x = jnp.asarray(images_uint8).astype(jnp.float32) / jnp.float32(255.0)
  shape = (1,) * (x.ndim - 1) + (-1,)
  mean = jnp.reshape(jnp.asarray(mean, jnp.float32), shape)
  std = jnp.reshape(jnp.asarray(std, jnp.float32), shape)
  return (x - mean) / std


def augment(key: jax.Array, images: jax.Array, *, pad: int = 4, flip: bool = True) -> jax.Array:
  """Random crop after zero padding, and random horizontal flip, per image.

  The standard CIFAR augmentation (He et al., 2016, "Deep Residual Learning for
  Image Recognition"): each image is padded with ``pad`` zero pixels on every
  side, a window of the original size is cut at a uniformly random offset in
  ``[0, 2 * pad]`` along each axis, and the window is mirrored left-right with
  probability 1/2. Pure jax (``vmap`` of ``lax.dynamic_slice`` and
  ``jnp.where``), no branching on values: safe under ``jit`` and ``vmap``.

  Args:
    key: a PRNG key; each image uses its own ``jax.random.split`` of it.
    images: ``(N, H, W, C)``, any dtype.
    pad: padding in pixels (static); 0 disables the crop.
    flip: whether to flip (static).

  Returns:
    ``(N, H, W, C)``, the dtype of ``images``.
  """
  if images.ndim != 4:
    raise ValueError(f"augment expects (N, H, W, C) images, got shape {images.shape}.")
  if pad < 0:
    raise ValueError(f"augment: pad must be >= 0, got {pad}.")
  _, height, width, channels = images.shape
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

  def one(key, image):
    crop_key, flip_key = jax.random.split(key)
    dy, dx = jax.random.randint(crop_key, (2,), 0, 2 * pad + 1)
    zero = jnp.zeros((), dy.dtype)
    out = jax.lax.dynamic_slice(image, (dy, dx, zero), (height, width, channels))
    if flip:
      out = jnp.where(jax.random.bernoulli(flip_key), out[:, ::-1], out)
    return out

  return jax.vmap(one)(jax.random.split(key, images.shape[0]), padded)


def augment_options(dataset: str) -> dict[str, Any]:
  """:func:`augment`'s ``pad`` and ``flip`` for ``dataset`` (a ``--dataset`` name).

  CIFAR's (pad 4, flip) for every data set but ``digits``: its 16x16 images are
  shifted by at most 2 pixels (one pixel of the 8x8 original) and never
  mirrored (a mirrored 2 is no 2).
  """
  if dataset == "digits":
    return {"pad": 2, "flip": False}
  return {"pad": 4, "flip": True}


def epoch_permutation(key: jax.Array, n: int, batch_size: int) -> jax.Array:
  """One epoch's batches: a random permutation of ``range(n)``, remainder dropped.

  Args:
    key: a PRNG key, e.g. ``jax.random.fold_in(key, epoch)``.
    n: the number of examples (static).
    batch_size: examples per batch (static).

  Returns:
    int32 ``(n // batch_size, batch_size)``: row ``i`` holds the indices of
    step ``i``; each index occurs at most once.
  """
  if batch_size <= 0 or n < 0:
    raise ValueError(f"epoch_permutation needs n >= 0 and batch_size > 0, got n={n}, "
                     f"batch_size={batch_size}.")
  steps = n // batch_size
  order = jax.random.permutation(key, n)[:steps * batch_size]
  return order.astype(jnp.int32).reshape(steps, batch_size)

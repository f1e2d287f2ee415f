"""Tests of experiments/data.py: loaders (tfds mock, folder, CIFAR-10 copy), augmentation."""
import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from experiments import data as data_lib

CIFAR_DIR = os.environ.get("NORMREG_CIFAR10_DIR")
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                 "ship", "truck")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Created in this order on purpose: labels must follow the *sorted* names.
CLASSES = ("zebra", "ant", "mole")


def _make_folder(root, classes=CLASSES, n_train=4, n_test=2, size=(8, 8), mode="RGB"):
  """Writes root/{train,test}/<class>/<i>.png and returns {split: {class: [arrays]}}."""
  rng = np.random.default_rng(0)
  channels = {"RGB": 3, "L": 1}[mode]
  written = {}
  for split, n in (("train", n_train), ("test", n_test)):
    written[split] = {}
    for name in classes:
      os.makedirs(root / split / name, exist_ok=True)
      written[split][name] = []
      for i in range(n):
        array = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
        Image.fromarray(array[:, :, 0] if mode == "L" else array, mode).save(
            root / split / name / f"{i:02d}.png")
        written[split][name].append(array)
  return written


# --------------------------------------------------------------------- catalog (tfds)


def test_catalog_cifar10_under_mock_data():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=20):
    ds = data_lib.load("cifar10", train_size=8)
  assert ds.train_images.shape == (8, 32, 32, 3) and ds.train_images.dtype == np.uint8
  assert ds.test_images.shape == (20, 32, 32, 3) and ds.test_images.dtype == np.uint8
  assert ds.train_labels.shape == (8,) and ds.train_labels.dtype == np.int32
  assert ds.test_labels.dtype == np.int32
  assert ds.num_classes == 10 and len(ds.class_names) == 10 and ds.name == "cifar10"
  assert np.all((ds.train_labels >= 0) & (ds.train_labels < 10))


def test_catalog_mnist_under_mock_data():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=12):
    ds = data_lib.load("mnist", train_size=5, test_size=3, seed=1)
    with pytest.raises(ValueError, match="--train_size"):
      data_lib.load("mnist", train_size=13)
  assert ds.train_images.shape == (5, 28, 28, 1) and ds.train_images.dtype == np.uint8
  assert ds.test_images.shape == (3, 28, 28, 1)
  assert ds.num_classes == 10 and ds.class_names == tuple(map(str, range(10)))


def test_import_needs_no_tensorflow_and_folder_and_digits_read_without_it(tmp_path):
  _make_folder(tmp_path)
  code = ("import sys; from experiments import data; "
          "assert 'tensorflow_datasets' not in sys.modules; "
          f"ds = data.load('folder', data_dir={str(tmp_path)!r}); "
          "assert ds.train_images.shape == (12, 8, 8, 3); "
          "assert data.load('digits').train_images.shape == (1497, 16, 16, 1); "
          "assert 'tensorflow' not in sys.modules and 'tensorflow_datasets' not in sys.modules")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO,
                 env={**os.environ, "JAX_PLATFORMS": "cpu"})


# ------------------------------------------------------------------- shipped digits

# Images per class of the UCI optdigits test set (optdigits.tes), from the data set's
# description at the UCI repository: what the shipped file must hold.
UCI_TEST_SET_CLASS_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def _rows(images, labels):
  """Each (image, label) as bytes, to compare sets of examples."""
  return [image.tobytes() + bytes([label]) for image, label in zip(images, labels)]


def test_digits_are_the_uci_test_set_split_30_per_class_for_testing():
  ds = data_lib.load("digits")
  assert ds.name == "digits" and ds.num_classes == 10 and ds.class_names[3] == "3"
  assert ds.train_images.shape == (1497, 16, 16, 1) and ds.train_images.dtype == np.uint8
  assert ds.test_images.shape == (300, 16, 16, 1) and ds.test_labels.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(ds.test_labels), [30] * 10)
  np.testing.assert_array_equal(np.bincount(ds.train_labels) + 30, UCI_TEST_SET_CLASS_COUNTS)
  # Each pixel of the 8x8 original repeated 2x2; the 17 levels 0..16 spread over 0..255.
  images = np.concatenate([ds.train_images, ds.test_images])
  np.testing.assert_array_equal(images, images[:, ::2, ::2].repeat(2, 1).repeat(2, 2))
  assert set(np.unique(images)) <= {(v * 255 + 8) // 16 for v in range(17)}
  assert images.min() == 0 and images.max() == 255
  # The file holds each example once: no image of the test set is also a training example.
  with np.load(data_lib.DIGITS_FILE) as f:
    raw, labels, test = f["images"], f["labels"], f["test"]
  assert raw.shape == (1797, 8, 8) and raw.max() == 16 and test.sum() == 300
  train_rows, test_rows = (set(_rows(ds.train_images, ds.train_labels)),
                           set(_rows(ds.test_images, ds.test_labels)))
  assert not train_rows & test_rows
  assert len(set(_rows(raw, labels))) == len(train_rows) + len(test_rows)


def test_digits_subsets_are_seeded_and_drawn_from_their_split():
  full = data_lib.load("digits")
  ds = data_lib.load("digits", train_size=100, test_size=50, seed=1)
  assert ds.train_images.shape == (100, 16, 16, 1) and ds.test_images.shape == (50, 16, 16, 1)
  assert set(_rows(ds.train_images, ds.train_labels)) <= set(
      _rows(full.train_images, full.train_labels))
  assert set(_rows(ds.test_images, ds.test_labels)) <= set(
      _rows(full.test_images, full.test_labels))
  again = data_lib.load("digits", train_size=100, test_size=50, seed=1)
  np.testing.assert_array_equal(again.train_images, ds.train_images)
  other = data_lib.load("digits", train_size=100, seed=2)
  assert not np.array_equal(other.train_images, ds.train_images)
  with pytest.raises(ValueError, match="--train_size=1498 is larger than the digits training"):
    data_lib.load("digits", train_size=1498)


def test_the_trainer_never_mirrors_digits(tmp_path, monkeypatch):
  from experiments import trainer  # pylint: disable=g-import-not-at-top
  from experiments.config import Config  # pylint: disable=g-import-not-at-top
  import runs  # pylint: disable=g-import-not-at-top
  seen = []
  augment = data_lib.augment
  monkeypatch.setattr(data_lib, "augment", lambda key, x, **kw: seen.append(kw) or augment(
      key, x, **kw))
  config = Config(dataset="digits", width=4, epochs=1, batch_size=16, log_every=1)
  trainer.train_and_evaluate(config, str(tmp_path), dataset=runs.tiny_dataset(n_train=16),
                             progress=False, tensorboard=False)
  assert seen == [{"pad": 2, "flip": False}]  # traced once; CIFAR's (4, True) elsewhere


# ------------------------------------------------------------------------- folder


def test_folder_labels_follow_sorted_classes_and_pixels_round_trip(tmp_path):
  written = _make_folder(tmp_path)
  ds = data_lib.load("folder", data_dir=str(tmp_path))
  assert ds.class_names == ("ant", "mole", "zebra") and ds.num_classes == 3
  assert ds.name == "folder"
  assert ds.train_images.shape == (12, 8, 8, 3) and ds.train_images.dtype == np.uint8
  assert ds.test_images.shape == (6, 8, 8, 3) and ds.test_labels.dtype == np.int32
  np.testing.assert_array_equal(ds.train_labels, np.repeat(np.arange(3, dtype=np.int32), 4))
  np.testing.assert_array_equal(ds.test_labels, np.repeat(np.arange(3, dtype=np.int32), 2))
  for split, images in (("train", ds.train_images), ("test", ds.test_images)):
    expected = np.stack([a for name in ds.class_names for a in written[split][name]])
    np.testing.assert_array_equal(images, expected)


def test_folder_subset_is_seeded_and_consistent(tmp_path):
  written = _make_folder(tmp_path)
  ds = data_lib.load("folder", data_dir=str(tmp_path), train_size=5, test_size=2, seed=3)
  assert ds.train_images.shape == (5, 8, 8, 3) and ds.train_labels.shape == (5,)
  assert ds.test_images.shape == (2, 8, 8, 3)
  for image, label in zip(ds.train_images, ds.train_labels):  # each image keeps its label
    assert any(np.array_equal(image, a) for a in written["train"][ds.class_names[label]])
  assert len({image.tobytes() for image in ds.train_images}) == 5  # no repeats
  again = data_lib.load("folder", data_dir=str(tmp_path), train_size=5, test_size=2, seed=3)
  np.testing.assert_array_equal(again.train_images, ds.train_images)
  other = [data_lib.load("folder", data_dir=str(tmp_path), train_size=5, seed=s).train_images
           for s in range(4, 8)]
  assert any(not np.array_equal(o, ds.train_images) for o in other)


def test_folder_grayscale_gives_one_channel(tmp_path):
  written = _make_folder(tmp_path, classes=("a", "b"), n_train=2, n_test=1, mode="L")
  ds = data_lib.load("folder", data_dir=str(tmp_path))
  assert ds.train_images.shape == (4, 8, 8, 1)
  np.testing.assert_array_equal(ds.train_images[0], written["train"]["a"][0])


def test_real_cifar10_copy():
  if not CIFAR_DIR:
    pytest.skip("set NORMREG_CIFAR10_DIR to a folder where "
                "`tar -xzf cifar10-jpeg.tar.gz -C DIR` was extracted to run this test")
  ds = data_lib.load("folder", data_dir=CIFAR_DIR, train_size=500, test_size=200)
  assert ds.train_images.shape == (500, 32, 32, 3) and ds.train_images.dtype == np.uint8
  assert ds.test_images.shape == (200, 32, 32, 3) and ds.test_images.dtype == np.uint8
  assert ds.num_classes == 10 and ds.class_names == CIFAR_CLASSES
  assert len(np.unique(ds.train_labels)) == 10  # a random 500 of 50,000 meets every class
  mean, std = data_lib.channel_stats(ds.train_images)
  assert np.all((mean > 0.3) & (mean < 0.6)) and np.all((std > 0.15) & (std < 0.35))


# ---------------------------------------------------------------------- bad input


def _break(kind, root):
  """Builds a broken folder under root; returns the kwargs for load()."""
  if kind == "missing_dir":
    return dict(data_dir=str(root / "nowhere"))
  _make_folder(root, n_train=2, n_test=1)
  if kind in ("no_train", "no_test"):
    split = kind[3:]
    for name in CLASSES:
      for f in os.listdir(root / split / name):
        os.remove(root / split / name / f)
      os.rmdir(root / split / name)
    os.rmdir(root / split)
  elif kind == "no_classes":
    for name in CLASSES:
      for split in ("train", "test"):
        for f in os.listdir(root / split / name):
          os.remove(root / split / name / f)
        os.rmdir(root / split / name)
  elif kind == "empty_class":
    for f in os.listdir(root / "train" / "ant"):
      os.remove(root / "train" / "ant" / f)
    (root / "train" / "ant" / "notes.txt").write_text("not an image")
  elif kind == "test_classes_differ":
    os.rename(root / "test" / "ant", root / "test" / "bee")
  elif kind == "mixed_sizes":
    Image.fromarray(np.zeros((9, 8, 3), np.uint8)).save(root / "train" / "mole" / "odd.png")
  return dict(data_dir=str(root))


@pytest.mark.parametrize("kind, error, match", [
    ("missing_dir", FileNotFoundError, "--data_dir"),
    ("no_train", FileNotFoundError, "--data_dir.*train/"),
    ("no_test", FileNotFoundError, "--data_dir.*test/"),
    ("no_classes", ValueError, "--data_dir.*no class folders"),
    ("empty_class", ValueError, "--data_dir.*train/ant/ holds no images"),
    ("test_classes_differ", ValueError, "--data_dir.*test/ classes differ.*'ant'.*'bee'"),
    ("mixed_sizes", ValueError, "--data_dir.*odd.png"),
])
def test_bad_folder_is_refused_naming_the_argument(tmp_path, kind, error, match):
  kwargs = _break(kind, tmp_path)
  with pytest.raises(error, match=match):
    data_lib.load("folder", **kwargs)


@pytest.mark.parametrize("args, kwargs, match", [
    (("imagenet",), {}, "--dataset.*cifar10, cifar100, mnist, fashion_mnist, folder"),
    (("folder",), {}, "--data_dir"),
    (("folder",), dict(train_size=0), "--train_size"),
    (("cifar10",), dict(train_size=-5), "--train_size"),
    (("cifar10",), dict(test_size=0), "--test_size"),
    (("cifar10",), dict(train_size=2.5), "--train_size"),
])
def test_bad_arguments_are_refused_naming_the_flag(args, kwargs, match):
  with pytest.raises(ValueError, match=match):
    data_lib.load(*args, **kwargs)


def test_too_large_subset_is_refused(tmp_path):
  _make_folder(tmp_path)
  with pytest.raises(ValueError, match="--train_size=13 is larger"):
    data_lib.load("folder", data_dir=str(tmp_path), train_size=13)
  with pytest.raises(ValueError, match="--test_size=7 is larger"):
    data_lib.load("folder", data_dir=str(tmp_path), test_size=7)
  assert data_lib.load("folder", data_dir=str(tmp_path), train_size=12).train_images.shape[0] == 12


def test_unreadable_images_are_named_in_one_error(tmp_path):
  """Real damage: a PNG cut to 100 bytes (pillow: truncated) and a text file named .jpg
  (pillow: not an image). The load stops before training, naming the first and counting."""
  _make_folder(tmp_path, size=(32, 32))
  cut = tmp_path / "train" / "ant" / "01.png"
  with open(cut, "r+b") as f:
    f.truncate(100)
  (tmp_path / "test" / "mole" / "notes.jpg").write_text("not an image\n")
  with pytest.raises(ValueError) as info:
    data_lib.load("folder", data_dir=str(tmp_path))
  message = str(info.value)
  assert "2 image file(s) cannot be read" in message and "and 1 more" in message
  assert str(cut) in message and message.count("\n") == 0
  cut.unlink()  # with the truncated file gone, the text file is the one named
  with pytest.raises(ValueError, match=r"1 image file\(s\) cannot be read: .*notes\.jpg "
                     r"\(UnidentifiedImageError"):
    data_lib.load("folder", data_dir=str(tmp_path))


def test_a_class_empty_in_test_only_is_one_warning(tmp_path, caplog):
  _make_folder(tmp_path)
  for f in (tmp_path / "test" / "mole").iterdir():
    f.unlink()
  with caplog.at_level("WARNING"):
    ds = data_lib.load("folder", data_dir=str(tmp_path))
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert len(warnings) == 1, warnings
  assert "test/mole/ hold(s) no images" in warnings[0] and "covers 2 of the 3" in warnings[0]
  assert ds.num_classes == 3 and sorted(set(ds.test_labels.tolist())) == [0, 2]  # ant, zebra


# ----------------------------------------------------------------- normalization


def test_channel_stats_and_normalize():
  images = np.random.default_rng(0).integers(0, 256, (50, 6, 5, 3), dtype=np.uint8)
  images[..., 2] //= 4  # channels with different statistics
  mean, std = data_lib.channel_stats(images)
  assert mean.shape == std.shape == (3,) and mean.dtype == std.dtype == np.float32
  x = images.astype(np.float64) / 255
  np.testing.assert_allclose(mean, x.mean(axis=(0, 1, 2)), rtol=1e-6)
  np.testing.assert_allclose(std, x.std(axis=(0, 1, 2)), rtol=1e-6)
  out = jax.jit(data_lib.normalize)(jnp.asarray(images), jnp.asarray(mean), jnp.asarray(std))
  assert out.shape == images.shape and out.dtype == jnp.float32
  np.testing.assert_allclose(np.mean(out, axis=(0, 1, 2)), 0, atol=1e-5)
  np.testing.assert_allclose(np.std(out, axis=(0, 1, 2)), 1, atol=1e-5)
  expected = (x - mean.astype(np.float64)[None, None, None, :]) / std[None, None, None, :]
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_channel_stats_of_a_constant_channel_keeps_normalize_finite():
  images = np.full((4, 3, 3, 1), 7, np.uint8)
  mean, std = data_lib.channel_stats(images)
  assert std[0] == 1 and np.isclose(mean[0], 7 / 255)
  assert np.all(np.isfinite(data_lib.normalize(jnp.asarray(images), mean, std)))


# ------------------------------------------------------------------- augmentation


def _images(n=32, h=6, w=5, c=2, dtype=np.uint8, seed=0):
  # Values in [1, 255]: a zero pixel in the output can only come from padding.
  return np.random.default_rng(seed).integers(1, 256, (n, h, w, c)).astype(dtype)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_augment_keeps_shape_and_dtype(dtype):
  x = jnp.asarray(_images(dtype=dtype))
  out = data_lib.augment(jax.random.key(0), x)
  assert out.shape == x.shape and out.dtype == x.dtype


def test_augment_without_pad_and_flip_is_the_identity():
  x = jnp.asarray(_images())
  np.testing.assert_array_equal(data_lib.augment(jax.random.key(0), x, pad=0, flip=False), x)


def test_augment_flip_mirrors_left_right():
  x = _images(n=64)
  out = np.asarray(data_lib.augment(jax.random.key(1), jnp.asarray(x), pad=0, flip=True))
  same = np.all(out == x, axis=(1, 2, 3))
  flipped = np.all(out == x[:, :, ::-1], axis=(1, 2, 3))
  assert np.all(same ^ flipped), "each image is either kept or mirrored, never anything else"
  assert 10 < flipped.sum() < 54, "about half are mirrored"


def _windows(padded, h, w):
  """All (dy, dx, mirrored) -> window of a padded (H+2p, W+2p, C) image."""
  out = {}
  for dy in range(padded.shape[0] - h + 1):
    for dx in range(padded.shape[1] - w + 1):
      window = padded[dy:dy + h, dx:dx + w]
      out[(dy, dx, False)] = window
      out[(dy, dx, True)] = window[:, ::-1]
  return out


@pytest.mark.parametrize("flip", [False, True])
def test_augment_crops_are_windows_of_the_zero_padded_image(flip):
  pad, (n, h, w, c) = 2, (48, 6, 5, 2)
  x = _images(n, h, w, c)
  out = np.asarray(data_lib.augment(jax.random.key(2), jnp.asarray(x), pad=pad, flip=flip))
  padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  seen = set()
  for i in range(n):
    matches = [k for k, window in _windows(padded[i], h, w).items()
               if np.array_equal(window, out[i])]
    assert matches, f"image {i} is not a window of its padded input"
    assert flip or all(not mirrored for _, _, mirrored in matches)
    seen.update(matches)
  offsets = {(dy, dx) for dy, dx, _ in seen}
  assert len(offsets) >= 10, f"offsets should vary over the 25 possible, saw {sorted(offsets)}"
  assert {dy for dy, _ in offsets} == set(range(2 * pad + 1))  # both extremes are reachable
  assert {dx for _, dx in offsets} == set(range(2 * pad + 1))


def test_augment_under_jit_and_vmap():
  x = jnp.asarray(_images(n=8))
  key = jax.random.key(3)
  jitted = jax.jit(functools.partial(data_lib.augment, pad=3))
  np.testing.assert_array_equal(jitted(key, x), data_lib.augment(key, x, pad=3))
  assert not np.array_equal(jitted(jax.random.key(4), x), jitted(key, x))
  stacked = jnp.stack([x, x[::-1]])
  out = jax.jit(jax.vmap(data_lib.augment))(jax.random.split(key, 2), stacked)
  assert out.shape == stacked.shape and out.dtype == stacked.dtype


def test_epoch_permutation():
  key = jax.random.key(0)
  order = data_lib.epoch_permutation(key, 103, 10)
  assert order.shape == (10, 10) and order.dtype == jnp.int32
  flat = np.asarray(order).ravel()
  assert len(np.unique(flat)) == flat.size and flat.min() >= 0 and flat.max() < 103
  other = data_lib.epoch_permutation(jax.random.key(1), 103, 10)
  assert not np.array_equal(other, order)
  full = np.asarray(jax.jit(data_lib.epoch_permutation, static_argnums=(1, 2))(key, 12, 4))
  assert sorted(full.ravel()) == list(range(12))
  assert data_lib.epoch_permutation(key, 5, 8).shape == (0, 8)

"""Helpers of the experiment tests: a tiny random dataset and a run's metrics."""

import json
import os

import numpy as np

from experiments import data as data_lib


def tiny_dataset(n_train=64, n_test=32, size=8, classes=4, seed=0):
  """Random uint8 ``size x size x 3`` images with random labels of ``classes`` classes."""
  rng = np.random.default_rng(seed)
  return data_lib.Dataset(
      train_images=rng.integers(0, 256, (n_train, size, size, 3), dtype=np.uint8),
      train_labels=rng.integers(0, classes, n_train).astype(np.int32),
      test_images=rng.integers(0, 256, (n_test, size, size, 3), dtype=np.uint8),
      test_labels=rng.integers(0, classes, n_test).astype(np.int32),
      num_classes=classes, class_names=tuple(map(str, range(classes))), name="tiny")


def read_metrics(workdir):
  """The records of ``workdir/metrics.jsonl``, in order."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def image_folder(root, classes=3, n_train=16, n_test=8, size=8, seed=0):
  """Writes ``root/{train,test}/c<k>/<i>.png`` (random RGB) and returns ``root``."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  for split, n in (("train", n_train), ("test", n_test)):
    for k in range(classes):
      os.makedirs(os.path.join(root, split, f"c{k}"), exist_ok=True)
      for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
            os.path.join(root, split, f"c{k}", f"{i:03d}.png"))
  return str(root)


def one_line(result, marker, *needles, status=1):
  """Asserts that the finished command ``result`` exited with ``status``, printed no
  traceback and exactly one stderr line holding ``marker`` and every needle; returns it."""
  assert result.returncode == status, (result.returncode, result.stderr[-2000:])
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  lines = [l for l in result.stderr.splitlines() if marker in l]
  assert len(lines) == 1, result.stderr[-3000:]
  for needle in needles:
    assert needle in lines[0], lines[0]
  return lines[0]


def command(module, *args, env=None, timeout=300):
  """Runs ``python -m module args`` from the repository root; the CompletedProcess."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                        timeout=timeout, cwd=REPO, env=env)

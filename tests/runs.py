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

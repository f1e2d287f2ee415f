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


TINY = dict(dataset="cifar10", model="cnn", width=4, batch_size=16, log_every=2, lr=0.05)

_HOLD = """
import sys, time
from experiments import workdir
workdir.Lock(workdir.resolve(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def hold_lock(path):
  """A real process holding ``path``'s run lock (as a run does); ended by the caller."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import pytest  # pylint: disable=g-import-not-at-top
  if "://" not in str(path):
    os.makedirs(path, exist_ok=True)
  proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(path)], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  if proc.stdout.readline().strip() != "locked":
    proc.kill()
    pytest.fail(f"the lock holder did not start: {proc.communicate()[1][-2000:]}")
  return proc


def check_lock_is_honoured_then_taken_over(workdir, caplog):
  """A live holder refuses a run of ``workdir`` before its data is read (a missing
  --data_dir is not reached); once the holder is killed (SIGKILL: no clean-up), its lock
  is taken over with a warning naming it, and the run trains."""
  import pytest  # pylint: disable=g-import-not-at-top
  from experiments import errors  # pylint: disable=g-import-not-at-top
  from experiments import trainer  # pylint: disable=g-import-not-at-top
  from experiments.config import Config  # pylint: disable=g-import-not-at-top
  holder = hold_lock(workdir)
  try:
    missing = Config(**{**TINY, "dataset": "folder"}, data_dir="/nonexistent", epochs=1)
    with pytest.raises(errors.UsageError, match=rf"in use by another run \(pid {holder.pid} "):
      trainer.train_and_evaluate(missing, str(workdir), progress=False)
  finally:
    holder.kill()
    holder.wait()
  with caplog.at_level("WARNING"):
    trainer.train_and_evaluate(Config(**TINY, epochs=1), str(workdir), dataset=tiny_dataset(),
                               progress=False)
  taken = [r.getMessage() for r in caplog.records if "taken over" in r.getMessage()]
  assert len(taken) == 1 and f"pid {holder.pid} " in taken[0], taken

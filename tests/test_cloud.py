"""gs:// run folders, end to end, against a real GCS API server on 127.0.0.1.

The server is the PyPI package gcp-storage-emulator, started in this process; gcsfs
(``etils.epath``'s gs:// back end) finds it through STORAGE_EMULATOR_HOST and
orbax's tensorstore through TENSORSTORE_GCS_HTTP_URL, as DESIGN.md section 9 records.
The launcher itself runs as a separate command: killed after step 9, resumed by the same
command, it must leave in the bucket the config, records, TensorBoard events, checkpoints
and figures of a local run that was never stopped, and no local folder named ``gs:``.
"""

import json
import os
from http import HTTPStatus
import socket
import sys

import pytest

from experiments import data as data_lib
from experiments import errors
from experiments import records
from experiments import trainer
from experiments import workdir as workdir_lib
from experiments.config import Config

import runs

emulator = pytest.importorskip("gcp_storage_emulator.server", reason="the test extra "
                               "(gcp-storage-emulator) is not installed")
pytest.importorskip("gcsfs", reason="gs:// folders are written through gcsfs (test extra)")

BUCKET = "normreg-test"
FLAGS = ["--model=cnn", "--width=4", "--batch_size=16", "--lr=0.05", "--epochs=2",
         "--log_every=2"]


def _with_generation(download):
  """The emulator's media download, plus the ``x-goog-generation`` header real GCS sends
  with every object it serves (its JSON API reference). tensorstore (orbax) revalidates a
  cached read against that generation; without it, a revalidation fails with "Malformed
  StorageGeneration" now and then."""

  def handler(request, response, storage, *args, **kwargs):
    download(request, response, storage, *args, **kwargs)
    if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = obj["generation"]
      response["x-goog-metageneration"] = obj["metageneration"]
  return handler


@pytest.fixture(scope="module")
def bucket():
  from gcp_storage_emulator.handlers import objects  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
  server.start()
  patch = pytest.MonkeyPatch()
  patch.setattr(objects, "download", _with_generation(objects.download))
  for name in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL"):
    patch.setenv(name, f"http://127.0.0.1:{port}")  # the commands started here inherit them
  patch.delenv("EPATH_USE_TF", raising=False)  # set by workdir.resolve, as in the launcher
  try:
    yield f"gs://{BUCKET}"
  finally:
    patch.undo()
    server.stop()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  # 96 training images: 6 steps per epoch at batch 16, checkpoints at steps 6 and 12.
  return runs.image_folder(tmp_path_factory.mktemp("images"), classes=3, n_train=32, n_test=8)


def test_a_gs_run_is_killed_resumed_and_ends_as_a_local_one(bucket, folder, tmp_path):
  workdir = f"{bucket}/runs/a"
  args = [f"--workdir={workdir}", "--dataset=folder", f"--data_dir={folder}", *FLAGS]
  killed = runs.command("experiments.train", *args, "--exit_after_step=9")
  assert killed.returncode == 17, killed.stderr[-3000:]
  resumed = runs.command("experiments.train", *args)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from step 6 " in resumed.stderr  # the checkpoint of epoch 1, in the bucket
  assert f"figures: {workdir}/figures/" in resumed.stdout
  assert not os.path.exists(os.path.join(runs.REPO, "gs:"))

  config = Config(dataset="folder", data_dir=folder, model="cnn", width=4, batch_size=16,
                  lr=0.05, epochs=2, log_every=2)
  ds = data_lib.load("folder", data_dir=folder)
  trainer.train_and_evaluate(config, str(tmp_path), dataset=ds, progress=False)
  run = workdir_lib.resolve(workdir)  # an epath.Path, through gcsfs
  assert json.loads((run / "config.json").read_text()) == json.loads(config.to_json())
  ours = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
  theirs = runs.read_metrics(tmp_path)
  assert [(r["kind"], r["step"]) for r in ours] == [(r["kind"], r["step"]) for r in theirs]
  for a, b in zip(ours, theirs):
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
  # TensorBoard: one file per launch; the last value per step is the record's.
  events = records.read_events(f"{workdir}/{records.TENSORBOARD_DIR}")
  assert len([p for p in (run / records.TENSORBOARD_DIR).iterdir()]) == 2
  assert dict(events["train/loss"]) == pytest.approx(
      {r["step"]: r["loss"] for r in ours if r["kind"] == "train"}, rel=1e-6)
  assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["12", "6"]
  figures = sorted(p.name for p in (run / "figures").iterdir())
  assert len(figures) == 5 and "accuracy.png" in figures
  assert (run / "figures" / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert not (run / workdir_lib.LOCK).exists()


def test_a_gs_lock_is_honoured_then_taken_over(bucket, caplog):
  runs.check_lock_is_honoured_then_taken_over(f"{bucket}/runs/locked", caplog)
  assert not (workdir_lib.resolve(f"{bucket}/runs/locked") / workdir_lib.LOCK).exists()


def test_gs_without_gcsfs_is_refused_in_one_line(monkeypatch):
  monkeypatch.setitem(sys.modules, "gcsfs", None)  # as if the extra were not installed
  with pytest.raises(errors.MissingExtraError, match=r"--workdir=gs://b/r: .*gcsfs, which is "
                     r"not installed: pip install -e '\.\[gcs\]'"):
    workdir_lib.resolve("gs://b/r")

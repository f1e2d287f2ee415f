"""The run folder against real faults: a file or a read-only folder given as --workdir, a
second live run, a lock left by a killed one, a damaged checkpoint, a torn metrics.jsonl,
Ctrl-C sent to a running command, a run that diverged, and a finished run extended.

Each fault ends in one line naming the folder, file or flag (``experiments.train: ...``
from the command, a ``UsageError`` from the library) or is survived: the run ends with
the records and parameters of one that never met it. Checks that must come before
anything slow are shown to do so by giving a missing --data_dir as well: the error names
the workdir, not the data.
"""

import dataclasses
import glob
import logging
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import chex
import pytest
from etils import epath

from experiments import data as data_lib
from experiments import errors
from experiments import faultlog
from experiments import trainer
from experiments import workdir as workdir_lib
from experiments.config import Config

import runs

TINY = runs.TINY
FLAGS = ["--model=cnn", "--width=4", "--batch_size=16", "--lr=0.05", "--nofigures"]


def _train(config, workdir, **kwargs):
  return trainer.train_and_evaluate(config, str(workdir), dataset=runs.tiny_dataset(),
                                    progress=False, **kwargs)


def _records(workdir, with_loss=True):
  return [(r["kind"], r["step"]) + ((r["loss"],) if with_loss else ())
          for r in runs.read_metrics(workdir)]


def _one_line(result, *needles, status=1):
  return runs.one_line(result, "experiments.train:", *needles, status=status)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return runs.image_folder(tmp_path_factory.mktemp("images"), classes=3, n_train=16, n_test=8)


# ---------------------------------------------------------------- before anything slow


def test_a_file_as_workdir_is_refused_before_the_data_is_read(tmp_path):
  path = tmp_path / "not_a_folder"
  path.write_text("x")
  config = Config(dataset="folder", data_dir=str(tmp_path / "missing"), **{
      k: v for k, v in TINY.items() if k != "dataset"}, epochs=1)
  with pytest.raises(errors.UsageError, match=f"--workdir={path} is a file, not a folder"):
    trainer.train_and_evaluate(config, str(path), progress=False)
  for bad, why in (("s3://bucket/run", "s3:// paths are not supported"),
                   ("gs:/bucket/run", "looks like a URL without its '//'")):
    with pytest.raises(errors.UsageError, match=why):
      trainer.train_and_evaluate(config, bad, progress=False)
  assert not os.path.exists("gs:")


# The command, run by a user who may not write the folder. The interpreter lives under
# /root here, which nobody may read: so everything the failing path imports is imported
# first, then the process drops from root to nobody (losing root's right to write anywhere).
_AS_NOBODY = """
import os, sys
from absl import app
import experiments.train as train
from experiments import trainer
if os.geteuid() == 0:
  os.setgroups([])
  os.setgid(int(sys.argv[1]))
  os.setuid(int(sys.argv[2]))
app.run(train.main, argv=["experiments.train"] + sys.argv[3:])
"""


def test_a_read_only_workdir_is_one_line_before_the_data_is_read():
  try:
    nobody = pwd.getpwnam("nobody")
  except KeyError:
    if os.geteuid() == 0:
      pytest.skip("running as root with no user 'nobody' to drop to: root may write to any "
                  "folder, so none can be made read-only for this test")
    nobody = pwd.getpwuid(os.geteuid())
  root = tempfile.mkdtemp(prefix="normreg-readonly-")
  try:
    os.chmod(root, 0o755)
    workdir = os.path.join(root, "run")
    os.mkdir(workdir)
    os.chmod(workdir, 0o555)
    result = subprocess.run(
        [sys.executable, "-c", _AS_NOBODY, str(nobody.pw_gid), str(nobody.pw_uid),
         f"--workdir={workdir}", "--dataset=folder", f"--data_dir={root}/missing",
         "--epochs=1", *FLAGS], capture_output=True, text=True, timeout=300, cwd=runs.REPO)
    _one_line(result, f"--workdir={workdir} is not writable", "PermissionError")
    assert os.listdir(workdir) == []
  finally:
    shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------------- the lock


def test_two_processes_on_one_workdir_one_trains_the_other_is_refused(tmp_path, folder):
  workdir = tmp_path / "run"
  args = [sys.executable, "-m", "experiments.train", f"--workdir={workdir}", "--dataset=folder",
          f"--data_dir={folder}", "--epochs=2", "--log_every=1", *FLAGS]
  procs = [subprocess.Popen(args, cwd=runs.REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for _ in range(2)]
  try:
    results = []
    for p in procs:
      out, err = p.communicate(timeout=300)
      results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  codes = [r.returncode for r in results]
  assert sorted(codes) == [0, 1], [r.stderr[-2000:] for r in results]
  winner, loser = procs[codes.index(0)], results[codes.index(1)]
  _one_line(loser, f"--workdir={workdir} is in use by another run (pid {winner.pid} on host")
  steps = _records(workdir, with_loss=False)
  assert len(steps) == len(set(steps))  # no record twice
  assert steps == [("train", s) for s in (1, 2, 3)] + [("test", 3)] + [
      ("train", s) for s in (4, 5, 6)] + [("test", 6)]
  assert not os.path.exists(workdir / workdir_lib.LOCK)  # released by the run that held it


def test_a_live_lock_refuses_and_a_dead_ones_is_taken_over(tmp_path, caplog):
  runs.check_lock_is_honoured_then_taken_over(tmp_path / "run", caplog)
  assert not os.path.exists(tmp_path / "run" / workdir_lib.LOCK)


# ---------------------------------------------------------------- damage survived


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """A 3-epoch run that nothing disturbed: (workdir, final state)."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  return workdir, _train(Config(**TINY, epochs=3), workdir)


def _damage(workdir, step, how):
  files = glob.glob(os.path.join(workdir, "checkpoints", str(step), "**", "d", "*"),
                    recursive=True)
  assert files
  for path in files:
    if how == "truncate":
      with open(path, "r+b") as f:
        f.truncate(10)
    else:
      os.remove(path)


# tensorstore leaves a callback on a closed asyncio loop when a read fails (orbax's concern).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("how", ["truncate", "delete"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(tmp_path, uninterrupted,
                                                                  caplog, how):
  ref_dir, ref = uninterrupted
  config = Config(**TINY, epochs=3)
  _train(config, tmp_path, interrupt_after_step=10)  # checkpoints of steps 4 and 8, killed
  _damage(tmp_path, 8, how)
  with caplog.at_level("WARNING"):
    final = _train(config, tmp_path)
  warned = [r.getMessage() for r in caplog.records if "cannot be restored" in r.getMessage()]
  assert len(warned) == 1 and "checkpoint 8 in" in warned[0] and "resuming from step 4" in (
      warned[0]), warned
  # Moved aside, not deleted: an error that was not damage loses no checkpoint.
  assert os.path.isdir(tmp_path / "checkpoints_unrestorable" / "8"), os.listdir(tmp_path)
  assert "moved to " + str(tmp_path / "checkpoints_unrestorable" / "8") in warned[0]
  chex.assert_trees_all_close(final.params, ref.params, rtol=1e-6, atol=1e-7)
  assert _records(tmp_path) == _records(ref_dir)
  # When no checkpoint restores, the error names the folder and the way out.
  for step in (8, 12):
    _damage(tmp_path, step, how)
  with pytest.raises(errors.UsageError, match=r"no checkpoint in .*checkpoints can be restored "
                     r"into this run \(step 12: .*; step 8: .*--restart"):
    _train(Config(**TINY, epochs=4), tmp_path)


def test_checkpoint_every_saves_mid_epoch_and_the_resume_is_exact(tmp_path, uninterrupted):
  ref_dir, ref = uninterrupted  # 3 epochs of 4 steps, saved at each epoch's end
  config = Config(**TINY, epochs=3, checkpoint_every=3)
  _train(config, tmp_path, interrupt_after_step=7)  # saved 3, 4 (epoch end), 6; killed at 7
  steps = sorted(int(p) for p in os.listdir(tmp_path / "checkpoints") if p.isdigit())
  assert steps == [4, 6], steps  # orbax keeps the last two
  # How often to save may change between launches; the run goes on from step 6, in the
  # middle of epoch 2: its data order and augmentation continue where they stopped.
  final = _train(dataclasses.replace(config, checkpoint_every=0), tmp_path)
  chex.assert_trees_all_close(final.params, ref.params, rtol=1e-6, atol=1e-7)
  assert _records(tmp_path) == _records(ref_dir)
  with pytest.raises(errors.UsageError, match=r"--checkpoint_every must be >= 0"):
    Config(**TINY, checkpoint_every=-1).validate()


def test_an_unreachable_bucket_is_one_line_naming_it(tmp_path):
  # A host that cannot resolve (.invalid is reserved for that, RFC 2606) stands for a
  # machine without network: the real DNS failure, not a mock.
  env = dict(os.environ, STORAGE_EMULATOR_HOST="http://storage.normreg.invalid:4443")
  result = runs.command("experiments.train", "--workdir=gs://normreg-test-bucket/run",
                        "--dataset=folder", f"--data_dir={tmp_path / 'missing'}", *FLAGS,
                        env=env, timeout=60)
  _one_line(result, "bucket 'normreg-test-bucket' cannot be reached",
            "storage.normreg.invalid:4443 (STORAGE_EMULATOR_HOST)", "check the network")


def test_a_torn_metrics_tail_is_repaired_on_resume(tmp_path, uninterrupted, caplog):
  ref_dir, _ = uninterrupted
  config = Config(**TINY, epochs=3)
  _train(config, tmp_path, interrupt_after_step=6)  # killed after step 6, checkpoint at 4
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"kind": "train", "step": 8, "epoch": 2.0, "lo')  # a write cut short
  with caplog.at_level("WARNING"):
    _train(config, tmp_path)
  assert any("dropped 1 damaged line" in r.getMessage() for r in caplog.records)
  with open(tmp_path / "metrics.jsonl") as f, open(ref_dir / "metrics.jsonl") as g:
    ours, theirs = f.read().splitlines(), g.read().splitlines()
  assert len(ours) == len(theirs)
  assert _records(tmp_path) == _records(ref_dir)  # the file of an uninterrupted run


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
def test_ctrl_c_or_sigterm_saves_the_step_and_the_same_command_resumes(tmp_path, folder,
                                                                         signum):
  """Ctrl-C, and SIGTERM as a preemption, ``scancel`` or ``kill`` sends it: the step is
  saved mid-epoch, one line says so, and the rerun ends with an uninterrupted run's
  records."""
  workdir = tmp_path / "run"
  args = _args(workdir, folder)
  interrupted = _launch(args, lambda: os.path.exists(workdir / "metrics.jsonl"),
                        lambda proc: proc.send_signal(signum))  # once it trains
  name = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}[signum]
  line = _one_line(interrupted, f"stopped by {name} at step", "the same command resumes",
                   "python -m experiments.train", status=128 + signum)
  step = int(line.split("at step ")[1].split()[0])
  assert 0 < step < 120 and os.path.isdir(workdir / "checkpoints" / str(step))
  resumed = runs.command("experiments.train", *args[3:])
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resumed from step {step} " in resumed.stderr
  assert re.search(r"test accuracy [01]\.\d{4} after 40 epochs \(\d+ steps, \d+ s\)",
                   resumed.stdout), resumed.stdout[-500:]
  _assert_records_equal(workdir, _reference_records(tmp_path, folder, 40))


def _args(workdir, folder):
  """The launcher on ``folder`` for 40 short epochs, a record every step."""
  return [sys.executable, "-m", "experiments.train", f"--workdir={workdir}", "--dataset=folder",
          f"--data_dir={folder}", "--epochs=40", "--log_every=1", *FLAGS]


def _launch(args, ready, act):
  """Starts ``args``, calls ``act(process)`` once ``ready()``, and returns the finished
  ``CompletedProcess``."""
  proc = subprocess.Popen(args, cwd=runs.REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  try:
    deadline = time.time() + 300
    while not ready():
      assert time.time() < deadline and proc.poll() is None, "not ready in 300 s"
      time.sleep(0.02)
    act(proc)
    out, err = proc.communicate(timeout=300)
  finally:
    if proc.poll() is None:
      proc.kill()
  return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _assert_records_equal(workdir, theirs):
  ours = runs.read_metrics(workdir)
  assert [(r["kind"], r["step"]) for r in ours] == [(r["kind"], r["step"]) for r in theirs]
  for a, b in zip(ours, theirs):
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), (a["step"], a["kind"])


def _reference_records(tmp_path, folder, epochs):
  """The records of a run of ``FLAGS`` on ``folder`` that nothing disturbed (in process)."""
  config = Config(dataset="folder", data_dir=folder, epochs=epochs, log_every=1, **{
      k: v for k, v in TINY.items() if k not in ("dataset", "log_every")})
  trainer.train_and_evaluate(config, str(tmp_path / "ref"), dataset=data_lib.load(
      "folder", data_dir=folder), progress=False)
  return runs.read_metrics(tmp_path / "ref")


@pytest.fixture
def small_disk(tmp_path):
  """A 2 MB tmpfs mounted for the test (CI runs as root); skipped where mounting is not
  allowed."""
  mount = tmp_path / "disk"
  mount.mkdir()
  done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                        capture_output=True, text=True)
  if done.returncode:
    pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode})")
  try:
    yield mount
  finally:
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _text_or_empty(path):
  return path.read_text() if os.path.exists(path) else ""


def _fill(mount, leave):
  """Fills ``mount`` with a ballast file, then gives back ``leave`` bytes of it."""
  ballast = mount / "ballast"
  with open(ballast, "wb", buffering=0) as f:
    with pytest.raises(OSError, match="No space left"):
      while True:
        f.write(b"\0" * 4096)
  os.truncate(ballast, os.path.getsize(ballast) - leave)
  return ballast


def test_a_full_disk_is_one_line_and_the_rerun_resumes_once_there_is_room(tmp_path, folder,
                                                                          small_disk):
  workdir = small_disk / "run"
  args = _args(workdir, folder)
  ballast = []
  # Room for a record, not for a checkpoint (about 200 KB): the next save hits the end.
  full = _launch(args, lambda: os.path.isdir(workdir / "checkpoints") and any(
      p.isdigit() for p in os.listdir(workdir / "checkpoints")),
                 lambda _: ballast.append(_fill(small_disk, leave=64 << 10)))
  err = full.stderr
  line = _one_line(full, f"no space left in {workdir} (", " free; writing ", "is intact",
                   "then run the same command: it resumes from there")
  assert "Event loop is closed" not in err and "RESOURCE_EXHAUSTED" not in err, err[-3000:]
  saved = int(re.search(r"the last checkpoint, step (\d+), is intact", line).group(1))
  assert os.path.isdir(workdir / "checkpoints" / str(saved))
  # The details went to a temporary file: the run folder's disk is full.
  assert "RESOURCE_EXHAUSTED" not in _text_or_empty(workdir / "faults.log")

  os.remove(ballast[0])  # room again: the same command resumes and finishes
  resumed = runs.command("experiments.train", *args[3:])
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resumed from step {saved} " in resumed.stderr
  assert not [p for p in os.listdir(workdir / "checkpoints") if "tmp" in p]  # cleaned up
  _assert_records_equal(workdir, _reference_records(tmp_path, folder, 40))


def test_a_damaged_checkpoint_is_one_warning_on_the_command_line(tmp_path, folder):
  """What orbax, TensorStore and asyncio print around the failed restore (tracebacks,
  "Event loop is closed") goes to WORKDIR/faults.log; the terminal gets the one line."""
  workdir = tmp_path / "run"
  args = [f"--workdir={workdir}", "--dataset=folder", f"--data_dir={folder}", "--log_every=1",
          *FLAGS]
  first = runs.command("experiments.train", *args, "--epochs=3")
  assert first.returncode == 0, first.stderr[-3000:]
  latest = max(int(p) for p in os.listdir(workdir / "checkpoints") if p.isdigit())
  _damage(workdir, latest, "truncate")
  again = runs.command("experiments.train", *args, "--epochs=4")
  assert again.returncode == 0, again.stderr[-3000:]
  runs.one_line(again, "cannot be restored", f"checkpoint {latest} in", "resuming from step",
                status=0)
  for noise in ("Traceback", "Event loop is closed", "OCDBT"):
    assert noise not in again.stderr.replace(  # (the one line quotes the error's start)
        [l for l in again.stderr.splitlines() if "cannot be restored" in l][0], ""), noise
  # What was printed around it, if anything this time, is in the file, not on the terminal.
  details = _text_or_empty(workdir / "faults.log")
  assert not details or "Traceback" in details or "ERROR" in details, details[:2000]


def test_library_fault_output_goes_to_the_run_folders_file(tmp_path, capsys):
  """experiments.faultlog, deterministically: an orbax ERROR record and a traceback printed
  through sys.excepthook (as TensorStore's callbacks print theirs) land in
  WORKDIR/faults.log; a record of the launcher's own still shows."""
  handler = logging.StreamHandler(sys.stderr)
  root = logging.getLogger()
  root.addHandler(handler)
  try:
    with faultlog.divert(epath.Path(tmp_path)):
      record = logging.LogRecord("absl", logging.ERROR, os.path.join(
          os.sep, "site-packages", "orbax", "checkpoint", "future.py"), 387,
          "thread raised: RESOURCE_EXHAUSTED", None, None)
      root.handle(record)
      ours = logging.LogRecord("absl", logging.WARNING, os.path.join(
          os.sep, "experiments", "checkpoint.py"), 87, "checkpoint 8 cannot be restored",
          None, None)
      root.handle(ours)
      try:
        raise RuntimeError("Event loop is closed")
      except RuntimeError:
        sys.excepthook(*sys.exc_info())
  finally:
    root.removeHandler(handler)
  err = capsys.readouterr().err
  assert "checkpoint 8 cannot be restored" in err
  assert "RESOURCE_EXHAUSTED" not in err and "Event loop is closed" not in err
  text = (tmp_path / "faults.log").read_text()
  assert "ERROR" in text and "RESOURCE_EXHAUSTED" in text and "orbax" in text
  assert "Traceback" in text and "RuntimeError: Event loop is closed" in text
  assert sys.excepthook is sys.__excepthook__ or "faultlog" not in repr(sys.excepthook)


# ------------------------------------------------------------ what blocks a command


def test_a_diverged_run_without_a_checkpoint_does_not_block_the_corrected_one(tmp_path, caplog):
  bad = Config(**{**TINY, "lr": 1e30}, method="none", norm="none", momentum=0.0, epochs=2)
  with pytest.raises(trainer.NonFiniteLossError):
    _train(bad, tmp_path / "run")
  assert os.path.exists(tmp_path / "run" / "config.json")  # it had started
  good = dataclasses.replace(bad, lr=0.05)
  with caplog.at_level("WARNING"):
    _train(good, tmp_path / "run")
  assert any("other settings" in r.getMessage() and "starts afresh" in r.getMessage()
             for r in caplog.records)
  _train(good, tmp_path / "fresh")
  assert _records(tmp_path / "run") == _records(tmp_path / "fresh")
  assert runs.read_metrics(tmp_path / "run")[0]["step"] == 2


def test_more_epochs_extend_a_finished_run(tmp_path, uninterrupted):
  ref_dir, ref = uninterrupted
  _train(Config(**TINY, epochs=2), tmp_path / "run")
  final = _train(Config(**TINY, epochs=3), tmp_path / "run")  # the same flags, more epochs
  chex.assert_trees_all_close(final.params, ref.params, rtol=1e-6, atol=1e-7)
  assert _records(tmp_path / "run") == _records(ref_dir)
  with open(tmp_path / "run" / "config.json") as f:
    assert '"epochs": 3' in f.read()
  # A schedule whose shape depends on --epochs cannot be stretched: the refusal names --restart.
  cosine = Config(**TINY, epochs=2, schedule="cosine")
  _train(cosine, tmp_path / "cosine")
  longer = dataclasses.replace(cosine, epochs=3)
  with pytest.raises(errors.UsageError, match=r"other settings \{'epochs': \(2, 3\)\}.*"
                     r"--schedule=cosine.*--restart"):
    _train(longer, tmp_path / "cosine")
  _train(longer, tmp_path / "cosine", restart=True)
  _train(longer, tmp_path / "cosine_fresh")
  assert _records(tmp_path / "cosine") == _records(tmp_path / "cosine_fresh")

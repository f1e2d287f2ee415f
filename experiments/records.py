"""What a run writes while it trains: ``metrics.jsonl`` and a TensorBoard mirror of it.

``metrics.jsonl`` is the source of truth (``experiments.plot`` and the
reproduction read it): one JSON object per line, ``train`` records every
``--log_every`` steps and a ``test`` record per epoch (format in
``experiments.plot``). The same numbers go to TensorBoard event files in
``WORKDIR/tensorboard`` as they are logged, written with tensorboardX (no
TensorFlow): every number of a record as ``KIND/NAME`` (``train/loss``,
``train/learning_rate``, ``train/grad_norm``, the task's own metrics such as
``test/rmse``, its throughput such as ``test/rows_per_sec``) and the
per-layer ``norm/LAYER``, ``elr/LAYER``, ``angle/LAYER``, all against the step;
nothing a task declares is dropped. Watch a run with
``tensorboard --logdir WORKDIR`` (``pip install tensorboard``).

Only one process writes (process 0 of a multi-host run), and nothing is
created before the first record, so a run that fails before its first step
leaves no files behind. A run resumed from step ``T`` drops the records after
``T`` from both (``purge_step`` for the events); one restarted without a
checkpoint drops them all. A line cut short by a kill or a full disk is
dropped too, with a warning, so that the file ends as that of a run that was
never interrupted.

The folder may be local or ``gs://`` (``etils.epath``). Object stores cannot
append: there the records are kept in memory and the whole file is rewritten
at each :meth:`RunLog.flush`, and the TensorBoard events are written to a
local folder whose files are copied up at each flush (the trainer flushes
before every checkpoint, so a resumed run loses nothing it keeps).
tensorboardX's own gs:// writer is not used: it uploads its whole file every
10 seconds and again when garbage-collected, retrying for 2 minutes if the
bucket is gone by then.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Optional

from absl import logging
from etils import epath

from experiments import workdir as workdir_lib

TENSORBOARD_DIR = "tensorboard"
# The record's fields that are not metrics (the step is TensorBoard's axis).
NOT_SCALARS = ("kind", "step", "epoch", "layers")
METRICS = "metrics.jsonl"


def parse_record(line: str) -> Any:
  """The record of one ``metrics.jsonl`` line, or ``None`` if it is not one (cut short)."""
  try:
    record = json.loads(line)
  except json.JSONDecodeError:
    return None
  if not isinstance(record, dict) or not isinstance(record.get("step"), int):
    return None
  return record


class RunLog:
  """Appends a run's records to ``metrics.jsonl`` and mirrors them to TensorBoard.

  Args:
    workdir: the run's folder (a path or ``gs://`` URL).
    enabled: whether this process writes (``jax.process_index() == 0``).
    tensorboard: also write TensorBoard events (needs tensorboardX).
    resume_step: the step a resumed run restarts from: later records are dropped.
  """

  def __init__(self, workdir: Any, enabled: bool = True, tensorboard: bool = True,
               resume_step: int = 0):
    self.path = epath.Path(workdir) / METRICS
    self.tb_dir = epath.Path(workdir) / TENSORBOARD_DIR
    self.enabled, self.tensorboard = enabled, tensorboard
    self.resume_step = resume_step
    self._cloud = workdir_lib.is_cloud(self.path)
    self._lines: list[str] = []  # in a bucket: the whole file, rewritten by flush()
    self._unsaved = False
    self._writer = None
    self._staging: Optional[str] = None  # in a bucket: the events' local folder, copied up
    if enabled:  # a restart drops what came after its checkpoint (all, without one)
      self._lines = truncate(self.path, resume_step)
      if not resume_step and self.tb_dir.is_dir():
        self.tb_dir.rmtree()

  def _tb(self):
    if self._writer is None:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      where = str(self.tb_dir)
      if self._cloud:
        self._staging = where = tempfile.mkdtemp(prefix="normreg-tensorboard-")
      self._writer = SummaryWriter(where, purge_step=self.resume_step or None, flush_secs=10)
    return self._writer

  def _upload_events(self) -> None:
    """Copies the staged event files into the bucket, whole (objects cannot be appended)."""
    if self._staging is None:
      return
    self.tb_dir.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(self._staging):
      (self.tb_dir / name).write_bytes(pathlib.Path(self._staging, name).read_bytes())

  def write(self, record: dict[str, Any]) -> None:
    """Appends one ``train`` or ``test`` record (Python floats) to both outputs."""
    if not self.enabled:
      return
    line = json.dumps(record) + "\n"
    if self._cloud:
      self._lines.append(line)
      self._unsaved = True
    else:
      with self.path.open("a") as f:
        f.write(line)
    if not self.tensorboard:
      return
    tb, step, kind = self._tb(), record["step"], record["kind"]
    for key, value in record.items():
      if key not in NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(
          value, bool):
        tb.add_scalar(f"{kind}/{key}", value, step)
    for layer, values in (record.get("layers") or {}).items():
      for key, value in values.items():
        tb.add_scalar(f"{key}/{layer}", value, step)

  def flush(self) -> None:
    if self._unsaved:
      self.path.write_text("".join(self._lines))
      self._unsaved = False
    if self._writer is not None:
      self._writer.flush()
      self._upload_events()

  def close(self) -> None:
    self.flush()
    if self._writer is not None:
      self._writer.close()
      self._writer = None
      self._upload_events()
    if self._staging is not None:
      shutil.rmtree(self._staging, ignore_errors=True)
      self._staging = None


def truncate(path: epath.Path, last_step: int) -> list[str]:
  """Drops the records past ``last_step`` (the checkpoint a run resumes from) and lines cut
  short, rewriting ``path`` atomically; returns the lines kept."""
  if not path.exists():
    return []
  lines = path.read_text().splitlines(keepends=True)
  kept = [l if l.endswith("\n") else l + "\n" for l in lines
          if (r := parse_record(l)) is not None and r["step"] <= last_step]
  damaged = sum(1 for l in lines if l.strip() and parse_record(l) is None)
  if damaged:
    logging.warning("%s: dropped %d damaged line(s) (a write cut short); the records up to "
                    "step %d are kept.", path, damaged, last_step)
  if kept != lines:
    workdir_lib.write_atomic(path, "".join(kept))
  return kept


def read_events(directory: str) -> dict[str, list[tuple[int, float]]]:
  """``{tag: [(step, value), ...]}`` of the scalar events in ``directory``'s event files.

  Reads the TFRecord framing (length, crc, payload, crc) with the ``Event``
  protocol buffer that tensorboardX ships; the CRCs are not checked.
  """
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  out: dict[str, list[tuple[int, float]]] = {}
  for path in sorted(p for p in epath.Path(directory).iterdir() if "tfevents" in p.name):
    data = path.read_bytes()
    pos = 0
    while pos + 12 <= len(data):
      length = int.from_bytes(data[pos:pos + 8], "little")
      payload = data[pos + 12:pos + 12 + length]
      pos += 12 + length + 4
      event = event_pb2.Event.FromString(payload)
      for value in event.summary.value:
        out.setdefault(value.tag, []).append((event.step, value.simple_value))
  return out


def host_value(x: Any) -> Any:
  """A replicated jax array as numpy on this host (multi-host too: its local copy)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(x)
  return np.asarray(x.addressable_data(0))



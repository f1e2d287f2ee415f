"""What a run writes while it trains: ``metrics.jsonl`` and a TensorBoard mirror of it.

``metrics.jsonl`` is the source of truth (``experiments.plot`` and the
reproduction read it): one JSON object per line, ``train`` records every
``--log_every`` steps and a ``test`` record per epoch (format in
``experiments.plot``). The same numbers go to TensorBoard event files in
``WORKDIR/tensorboard`` as they are logged, written with tensorboardX (no
TensorFlow): ``train/loss``, ``train/accuracy``, ``train/learning_rate``,
``norm/LAYER``, ``elr/LAYER``, ``angle/LAYER`` and ``test/loss``,
``test/accuracy``, ``test/images_per_sec``, all against the step. Watch a
run with ``tensorboard --logdir WORKDIR`` (``pip install tensorboard``).

Only one process writes (process 0 of a multi-host run), and nothing is
created before the first record, so a run that fails before its first step
leaves no files behind. A run resumed from step ``T`` drops the records after
``T`` from both (``purge_step`` for the events); one restarted without a
checkpoint drops them all.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

TENSORBOARD_DIR = "tensorboard"


class RunLog:
  """Appends a run's records to ``metrics.jsonl`` and mirrors them to TensorBoard.

  Args:
    workdir: the run's folder.
    enabled: whether this process writes (``jax.process_index() == 0``).
    tensorboard: also write TensorBoard events (needs tensorboardX).
    resume_step: the step a resumed run restarts from: later records are dropped.
  """

  def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True,
               resume_step: int = 0):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb_dir = os.path.join(workdir, TENSORBOARD_DIR)
    self.enabled, self.tensorboard = enabled, tensorboard
    self.resume_step = resume_step
    self._writer = None
    if enabled:  # a restart drops what came after its checkpoint (all, without one)
      truncate(self.path, resume_step)
      if not resume_step and os.path.isdir(self.tb_dir):
        shutil.rmtree(self.tb_dir)

  def _tb(self):
    if self._writer is None:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._writer = SummaryWriter(self.tb_dir, purge_step=self.resume_step or None,
                                   flush_secs=10)
    return self._writer

  def write(self, record: dict[str, Any]) -> None:
    """Appends one ``train`` or ``test`` record (Python floats) to both outputs."""
    if not self.enabled:
      return
    append_record(self.path, record)
    if not self.tensorboard:
      return
    tb, step, kind = self._tb(), record["step"], record["kind"]
    for key in ("loss", "accuracy", "learning_rate", "images_per_sec"):
      if key in record:
        tb.add_scalar(f"{kind}/{key}", record[key], step)
    for layer, values in (record.get("layers") or {}).items():
      for key, value in values.items():
        tb.add_scalar(f"{key}/{layer}", value, step)

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None


def append_record(path: str, record: dict) -> None:
  """Appends ``record`` to the JSON-lines file ``path``."""
  with open(path, "a") as f:
    f.write(json.dumps(record) + "\n")


def truncate(path: str, last_step: int) -> None:
  """Drops records past ``last_step`` (the checkpoint a run resumes from)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [l for l in f if l.strip() and json.loads(l)["step"] <= last_step]
  with open(path, "w") as f:
    f.writelines(lines)


def read_events(directory: str) -> dict[str, list[tuple[int, float]]]:
  """``{tag: [(step, value), ...]}`` of the scalar events in ``directory``'s event files.

  Reads the TFRecord framing (length, crc, payload, crc) with the ``Event``
  protocol buffer that tensorboardX ships; the CRCs are not checked.
  """
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  out: dict[str, list[tuple[int, float]]] = {}
  files = sorted(f for f in os.listdir(directory) if "tfevents" in f)
  for name in files:
    with open(os.path.join(directory, name), "rb") as f:
      data = f.read()
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



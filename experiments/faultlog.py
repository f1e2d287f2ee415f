"""What libraries print around a fault goes to ``WORKDIR/faults.log``, not the terminal.

A damaged checkpoint or a full disk makes orbax log each failed thread's error
with its traceback, and TensorStore's callbacks on a closed asyncio loop print
``RuntimeError: Event loop is closed`` tracebacks, dozens of them: about 600 to
1,000 lines around the one line the launcher writes (the checkpoint it fell back
from, or ``errors.DiskFullError``). While a run trains, :func:`divert` sends
those to a file in its folder instead:

- log records of ERROR and above from orbax, TensorStore and asyncio (through
  a ``logging.Filter`` on the root logger's handlers, where absl's handler is);
- exceptions printed by ``sys.excepthook`` (TensorStore prints its callbacks'
  errors through it), ``sys.unraisablehook`` and ``threading.excepthook``.

The launcher's own lines and warnings, and a bug's traceback (raised after the
block), still reach the terminal. After a fault, asyncio's "exception was never
retrieved" for the tasks that failed with it, logged when they are collected at
exit, is dropped. The file is written when the block ends; where
the folder cannot take it (the disk is full), it goes to the temporary folder.
Builds on the standard library's ``logging`` and hooks only.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
import tempfile
import threading
import time
import traceback
from typing import Iterator

from etils import epath

from experiments import workdir as workdir_lib

FILE = workdir_lib.FAULTS
# Where a log record comes from, as a path fragment of its module.
LIBRARIES = tuple(f"{os.sep}{name}{os.sep}" for name in ("orbax", "tensorstore", "asyncio"))


class _Divert(logging.Filter):
  """Keeps the libraries' records of ERROR and above out of a handler, into ``lines``."""

  def __init__(self, lines: list):
    super().__init__()
    self.lines = lines

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR or not any(
        part in (record.pathname or "") for part in LIBRARIES):
      return True
    text = f"{record.levelname} {record.pathname}:{record.lineno}: {record.getMessage()}"
    if record.exc_info:
      text += "\n" + "".join(traceback.format_exception(*record.exc_info))
    self.lines.append(text)
    return False


@contextlib.contextmanager
def divert(folder: epath.Path) -> Iterator[list]:
  """Inside the block, the libraries' fault output is collected (the yielded list of
  texts), then appended to ``folder/faults.log``."""
  lines: list = []
  keep = _Divert(lines)
  handlers = list(logging.getLogger().handlers)
  old = sys.excepthook, sys.unraisablehook, threading.excepthook

  def printed(kind, value, tb):
    lines.append("".join(traceback.format_exception(kind, value, tb)))

  for handler in handlers:
    handler.addFilter(keep)
  sys.excepthook = printed
  sys.unraisablehook = lambda u: lines.append(
      f"unraisable in {u.object!r}: " + "".join(
          traceback.format_exception(u.exc_type, u.exc_value, u.exc_traceback)))
  threading.excepthook = lambda a: printed(a.exc_type, a.exc_value, a.exc_traceback)
  try:
    yield lines
  finally:
    # asyncio logs a failed task's error when the task is collected ("Task exception was
    # never retrieved"): collect them here, inside the block.
    gc.collect()
    sys.excepthook, sys.unraisablehook, threading.excepthook = old
    for handler in handlers:
      handler.removeFilter(keep)
      if lines:  # the failed writes' tasks that are collected later, at exit
        handler.addFilter(_never_retrieved)
    if lines:
      _write(folder, lines)


def _never_retrieved(record: logging.LogRecord) -> bool:
  """Drops asyncio's "exception was never retrieved" of a task collected after the block,
  once a fault was diverted: the same errors, already in the file."""
  return not (f"{os.sep}asyncio{os.sep}" in (record.pathname or "")
              and "never retrieved" in record.getMessage())


def _write(folder: epath.Path, lines: list) -> str:
  """Appends ``lines`` to ``folder/faults.log``, or where the folder cannot take them
  whole (a full disk) to a temporary file; returns the path written."""
  text = f"--- {time.strftime('%Y-%m-%d %H:%M:%S')}, pid {os.getpid()}\n" + "\n".join(lines)
  text += "\n"
  path = folder / FILE
  try:
    if workdir_lib.is_cloud(path):  # an object is written whole
      path.write_text((path.read_text() if path.exists() else "") + text)
    else:
      with open(path, "a") as f:
        start = f.tell()
        try:
          f.write(text)
          f.flush()
        except OSError:
          f.truncate(start)  # what it held before, not a torn tail
          raise
    return str(path)
  except OSError:
    with tempfile.NamedTemporaryFile("w", prefix="normreg-faults-", suffix=".log",
                                     delete=False) as f:
      f.write(text)
      return f.name

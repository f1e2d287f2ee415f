"""Errors a user causes from the command line, printed as one line naming the flag.

Every command (``experiments.train``, ``sweep``, ``reproduce``, ``plot``) turns a
:class:`UsageError` into one line on stderr and exit status 1, with no
traceback; anything else is a bug and keeps its traceback. Ctrl-C
(``KeyboardInterrupt``, or :class:`Interrupted` from a run that saved its
step first) is one line too, saying how to go on, with exit status 130 (as a
shell reports SIGINT); a run stopped by SIGTERM and saved exits with 143. The
subclasses also derive from the builtin a library caller would expect
(``ValueError``, ``FileNotFoundError``, ``ImportError``, ``FloatingPointError``).
"""

from __future__ import annotations

import contextlib
import errno
import shlex
import sys
from typing import Iterator, Optional


class UsageError(Exception):
  """Bad input the user can fix; the message names the flag, path or parameter."""


class InputError(UsageError, ValueError):
  """A flag's value is out of range, inconsistent with another, or does not fit the data."""


class MissingInputError(UsageError, FileNotFoundError):
  """A folder or file named by a flag is missing or holds the wrong thing."""


class MissingExtraError(UsageError, ImportError):
  """An optional dependency is not installed; the message says what to install."""


class DiskFullError(UsageError, OSError):
  """A checkpoint or record could not be written: the disk is full or over quota. The
  message names the folder, the free space and the last checkpoint, which is intact."""


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded")


def disk_full(e: BaseException) -> Optional[BaseException]:
  """The exception in ``e``'s chain (itself, its cause or context) that says the disk is
  full or over quota, or ``None``: an ``OSError`` with ``ENOSPC``/``EDQUOT``, or
  TensorStore's error through orbax (a ``ValueError`` whose text holds the OS's message)."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if (isinstance(e, OSError) and e.errno in _DISK_FULL) or any(
        text in str(e) for text in _DISK_FULL_TEXT):
      return e
    e = e.__cause__ or e.__context__
  return None


class Interrupted(UsageError):
  """The run was stopped (Ctrl-C, or SIGTERM: a preemption) and saved where it stopped; the
  message says where. ``status`` is the exit status a shell reports for that signal,
  128 + its number (130 for SIGINT, 143 for SIGTERM)."""

  def __init__(self, message: str, signum: int = 2):
    super().__init__(message)
    self.status = 128 + int(signum)


@contextlib.contextmanager
def one_line(program: str) -> Iterator[None]:
  """Exits with ``program: error: message`` (status 1) on a :class:`UsageError`, and with
  one line naming the command that goes on on Ctrl-C (status 130) or SIGTERM (143)."""
  again = f"python -m {program} {shlex.join(sys.argv[1:])}".strip()
  try:
    yield
  except Interrupted as e:
    sys.stdout.flush()
    print(f"{program}: {e}; the same command resumes from there: {again}", file=sys.stderr)
    sys.exit(e.status)
  except KeyboardInterrupt:
    sys.stdout.flush()
    print(f"{program}: interrupted (Ctrl-C); the same command goes on from the last "
          f"checkpoint, if any: {again}", file=sys.stderr)
    sys.exit(130)
  except UsageError as e:
    sys.stdout.flush()
    sys.exit(f"{program}: error: {e}")

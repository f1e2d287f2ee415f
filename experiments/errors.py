"""Errors a user causes from the command line, printed as one line naming the flag.

Every command (``experiments.train``, ``sweep``, ``reproduce``, ``plot``) turns a
:class:`UsageError` into one line on stderr and exit status 1, with no
traceback; anything else is a bug and keeps its traceback. Ctrl-C
(``KeyboardInterrupt``, or :class:`Interrupted` from a run that saved its
step first) is one line too, saying how to go on, with exit status 130 (as a
shell reports SIGINT). The subclasses also derive from the builtin a library
caller would expect (``ValueError``, ``FileNotFoundError``, ``ImportError``,
``FloatingPointError``).
"""

from __future__ import annotations

import contextlib
import shlex
import sys
from typing import Iterator


class UsageError(Exception):
  """Bad input the user can fix; the message names the flag, path or parameter."""


class InputError(UsageError, ValueError):
  """A flag's value is out of range, inconsistent with another, or does not fit the data."""


class MissingInputError(UsageError, FileNotFoundError):
  """A folder or file named by a flag is missing or holds the wrong thing."""


class MissingExtraError(UsageError, ImportError):
  """An optional dependency is not installed; the message says what to install."""


class Interrupted(UsageError):
  """The user stopped the run (Ctrl-C) and it saved where it stopped; the message says where."""


@contextlib.contextmanager
def one_line(program: str) -> Iterator[None]:
  """Exits with ``program: error: message`` (status 1) on a :class:`UsageError`, and with
  one line naming the command that goes on (status 130) on Ctrl-C."""
  again = f"python -m {program} {shlex.join(sys.argv[1:])}".strip()
  try:
    yield
  except Interrupted as e:
    sys.stdout.flush()
    print(f"{program}: {e}; the same command resumes from there: {again}", file=sys.stderr)
    sys.exit(130)
  except KeyboardInterrupt:
    sys.stdout.flush()
    print(f"{program}: interrupted (Ctrl-C); the same command goes on from the last "
          f"checkpoint, if any: {again}", file=sys.stderr)
    sys.exit(130)
  except UsageError as e:
    sys.stdout.flush()
    sys.exit(f"{program}: error: {e}")

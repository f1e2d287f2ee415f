"""Errors a user causes from the command line, printed as one line naming the flag.

Every command (``experiments.train``, ``sweep``, ``reproduce``, ``plot``) turns a
:class:`UsageError` into one line on stderr and exit status 1, with no
traceback; anything else is a bug and keeps its traceback. The subclasses also
derive from the builtin a library caller would expect (``ValueError``,
``FileNotFoundError``, ``ImportError``, ``FloatingPointError``).
"""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def one_line(program: str) -> Iterator[None]:
  """Exits with ``program: message`` (status 1) on a :class:`UsageError`."""
  try:
    yield
  except UsageError as e:
    sys.stdout.flush()
    sys.exit(f"{program}: error: {e}")

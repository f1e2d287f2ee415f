"""Byte-level text held in memory, cut into sequences: the language model's data.

The design is ``experiments.data``'s for images: read the whole corpus once into
host memory as uint8, put it on the device once, and gather each batch inside the
jitted step. A corpus of tens of megabytes (the default's 31 MB) is a few
thousand batches of 128 sequences of 256 bytes.

Sources (:func:`load`):

* ``stdlib`` (the default): the source files (``*.py``) of the running Python's
  standard library, which every machine with Python has, so a run needs no network
  and no download. A file's split is fixed by a hash of its path relative to the
  library's root (:func:`in_test_split`), so it is the same on every machine with
  the same Python version; the data's description names that version and the byte
  counts.
* a text file or a folder of them (``--data_dir``): every file below the folder
  (hidden ones and ``__pycache__`` skipped), split by the same hash; one file is
  split by bytes (its last :data:`TEST_FRACTION`). A folder with no text, a binary
  file (one with a NUL byte) or an unreadable file stops the load with one line
  naming it.

The tensorflow-datasets text catalog (``lm1b``, ``tiny_shakespeare``, ...) is not
read here yet.

Each split's files are concatenated (sorted by path) and cut into non-overlapping
windows of ``seq_len + 1`` bytes (:func:`sequences`): the model reads the first
``seq_len`` bytes of a window and predicts each next one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import platform
import sysconfig
from typing import Optional

import numpy as np

from experiments import errors

# The share of the files (by the hash of their path) held out for validation.
TEST_FRACTION = 0.05


@dataclasses.dataclass(frozen=True, eq=False)
class TextData:
  """A corpus cut into sequences of ``seq_len + 1`` bytes.

  Attributes:
    train: uint8 ``(N, seq_len + 1)``.
    test: uint8 ``(M, seq_len + 1)``.
    source: what was read (the Python version and its library's root, or the path).
    train_bytes: bytes of the training files (before the cut into sequences).
    test_bytes: bytes of the validation files.
    train_files: how many files the training split holds.
    test_files: how many files the validation split holds.
  """
  train: np.ndarray
  test: np.ndarray
  source: str
  train_bytes: int
  test_bytes: int
  train_files: int
  test_files: int

  def describe(self) -> dict:
    """What a run's records say about its data."""
    return {"source": self.source, "train_bytes": self.train_bytes,
            "test_bytes": self.test_bytes, "train_files": self.train_files,
            "test_files": self.test_files, "train_sequences": int(self.train.shape[0]),
            "test_sequences": int(self.test.shape[0])}


def in_test_split(relative_path: str) -> bool:
  """Whether a file belongs to the validation split: the first 8 bytes of the SHA-256
  of its path relative to the corpus's root (``/``-separated), read as a fraction of
  2^64, fall below :data:`TEST_FRACTION`."""
  digest = hashlib.sha256(relative_path.replace(os.sep, "/").encode()).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64 < TEST_FRACTION


def stdlib_root() -> str:
  return sysconfig.get_paths()["stdlib"]


def _files(root: str, python_only: bool) -> list[str]:
  """The files below ``root``, relative, sorted (hidden ones, ``__pycache__`` and, for
  the standard library, ``site-packages`` skipped)."""
  out = []
  for folder, dirs, names in os.walk(root):
    dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                     and d not in ("__pycache__", "site-packages"))
    for name in names:
      if name.startswith(".") or (python_only and not name.endswith(".py")):
        continue
      out.append(os.path.relpath(os.path.join(folder, name), root))
  return sorted(out)


def _read(path: str, flag: str) -> bytes:
  try:
    with open(path, "rb") as f:
      content = f.read()
  except OSError as e:
    raise errors.MissingInputError(f"{flag}: cannot read {path} ({e.strerror or e}).") from None
  nul = content.find(b"\0")
  if nul >= 0:
    raise errors.InputError(f"{flag}: {path} is not text (a NUL byte at offset {nul}); give "
                            "a folder of text files only.")
  return content


def sequences(corpus: bytes, seq_len: int) -> np.ndarray:
  """``corpus`` cut into non-overlapping windows of ``seq_len + 1`` bytes (the remainder
  dropped): uint8 ``(len(corpus) // (seq_len + 1), seq_len + 1)``."""
  n = len(corpus) // (seq_len + 1)
  return np.frombuffer(corpus, np.uint8, count=n * (seq_len + 1)).reshape(n, seq_len + 1)


def load(data_dir: Optional[str], seq_len: int) -> TextData:
  """The corpus of ``data_dir`` (``None``: the standard library's sources), cut.

  Raises:
    MissingInputError: a ``data_dir`` that does not exist, or a file that cannot be
      read.
    InputError: a binary file, a corpus with no text, or one too short for a single
      sequence in either split.
  """
  flag = "--data_dir"
  if data_dir is None:
    root = stdlib_root()
    source = f"python {platform.python_version()} standard library ({root})"
    names = _files(root, python_only=True)
  else:
    root = os.path.abspath(os.path.expanduser(data_dir))
    if not os.path.exists(root):
      raise errors.MissingInputError(f"{flag}={data_dir} does not exist.")
    source = root
    names = [""] if os.path.isfile(root) else _files(root, python_only=False)
  contents = {name: _read(os.path.join(root, name) if name else root, flag) for name in names}
  if not sum(len(c) for c in contents.values()):
    raise errors.InputError(f"{flag}: {root} holds no text (no files, or only empty ones).")
  test_names = [n for n in names if n and in_test_split(n)]
  train_names = [n for n in names if n not in test_names]
  if test_names and train_names:
    train = b"".join(contents[n] for n in train_names)
    test = b"".join(contents[n] for n in test_names)
  else:  # one file, or too few to split by path: the last bytes are the validation set
    whole = b"".join(contents[n] for n in names)
    cut = int(len(whole) * (1 - TEST_FRACTION))
    train, test = whole[:cut], whole[cut:]
    train_names, test_names = names, names
  out = TextData(sequences(train, seq_len), sequences(test, seq_len), source, len(train),
                 len(test), len(train_names), len(test_names))
  for split, array, size in (("training", out.train, len(train)),
                             ("validation", out.test, len(test))):
    if not array.shape[0]:
      raise errors.InputError(f"{flag}: the {split} split of {root} holds {size} bytes, "
                              f"fewer than one sequence of --seq_len={seq_len} + 1; give more "
                              "text or a shorter --seq_len.")
  return out

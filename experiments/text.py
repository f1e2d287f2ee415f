"""Byte-level text held in memory, cut into sequences: the language model's data.

The design is ``experiments.data``'s for images: read the whole corpus once into
host memory as uint8, put it on the device once, and gather each batch inside the
jitted step. A corpus of tens of megabytes (the default's 31 MB) is a few
thousand batches of 128 sequences of 256 bytes.

Sources (:func:`load`, by ``--corpus``):

* ``stdlib`` (the default): the source files (``*.py``) of the running Python's
  standard library, which every machine with Python has, so a run needs no network
  and no download. A file's split is fixed by a hash of its path relative to the
  library's root (:func:`in_test_split`), so it is the same on every machine with
  the same Python version; the data's description names that version and the byte
  counts.
* ``files``: a text file or a folder of them (``--data_dir``): every file below
  the folder (hidden ones and ``__pycache__`` skipped), split by the same hash; one
  file is split by bytes (its last :data:`TEST_FRACTION`). A folder with no text, a
  binary file (one with a NUL byte) or an unreadable file stops the load with one
  line naming it.
* any other name is a text data set of the tensorflow-datasets catalog
  (``tiny_shakespeare``, ``lm1b``, ...; its ``text`` feature), read with
  ``tfds.data_source`` as ``experiments.data`` reads the image catalog: from
  ``--data_dir`` (tfds' data folder) once prepared, downloaded and prepared on first
  use where the network and the ``tfds`` extra allow, one line otherwise. Its own
  ``train`` and ``test`` splits are used, each example followed by a newline.

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


STDLIB, FILES = "stdlib", "files"


def load(data_dir: Optional[str], seq_len: int, corpus: Optional[str] = None) -> TextData:
  """The ``corpus`` (``stdlib``, ``files`` from ``data_dir``, or a tfds catalog name;
  default ``files`` with a ``data_dir``, else ``stdlib``), cut into sequences.

  Raises:
    MissingInputError: a ``data_dir`` that does not exist, a file that cannot be
      read, or a catalog data set that cannot be downloaded or read.
    InputError: a binary file, a corpus with no text, or one too short for a single
      sequence in either split.
  """
  corpus = corpus or (FILES if data_dir else STDLIB)
  if corpus not in (STDLIB, FILES):
    return _checked(_load_catalog(corpus, data_dir, seq_len), seq_len, corpus)
  flag = "--data_dir"
  if corpus == STDLIB:
    root = stdlib_root()
    source = f"python {platform.python_version()} standard library ({root})"
    names = _files(root, python_only=True)
  else:
    if data_dir is None:
      raise errors.InputError("--corpus=files needs --data_dir=PATH (a text file or a folder "
                              "of them).")
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
  return _checked(out, seq_len, root)


def _checked(data: TextData, seq_len: int, where: str) -> TextData:
  for split, array, size in (("training", data.train, data.train_bytes),
                             ("validation", data.test, data.test_bytes)):
    if not array.shape[0]:
      raise errors.InputError(f"the {split} split of {where} holds {size} bytes, fewer than "
                              f"one sequence of --seq_len={seq_len} + 1; give more text or a "
                              "shorter --seq_len.")
  return data


def _load_catalog(name: str, data_dir: Optional[str], seq_len: int) -> TextData:
  """A text data set of the tensorflow-datasets catalog (its ``text`` feature)."""
  from experiments import data as data_lib  # pylint: disable=g-import-not-at-top
  flag = f"--corpus={name}"
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise errors.MissingExtraError(
        f"{flag} is read with tensorflow-datasets, which is not installed; pip install -e "
        "'.[experiments]', or use --corpus=stdlib or --corpus=files --data_dir=DIR.") from e
  try:
    sources = data_lib._data_source(tfds, name, data_dir)  # pylint: disable=protected-access
  except ImportError as e:
    raise errors.MissingExtraError(
        f"{flag}: downloading and preparing it needs {e.name or 'a module'} ({e}); pip "
        "install -e '.[tfds]', or use --corpus=stdlib.") from e
  except (OSError, ConnectionError, tfds.download.DownloadError) as e:
    raise errors.MissingInputError(
        f"{flag}: could not download or read it ({type(e).__name__}: {e}); check the "
        "network and --data_dir, or use --corpus=stdlib.") from e
  except Exception as e:  # pylint: disable=broad-except  (tfds: an unknown name, ...)
    raise errors.InputError(f"{flag}: tensorflow-datasets cannot read it "
                            f"({type(e).__name__}: {e}).") from None
  texts = []
  for source in sources:
    if "text" not in source.dataset_info.features:
      raise errors.InputError(f"{flag} has no 'text' feature (it has "
                              f"{', '.join(source.dataset_info.features)}); give a text data "
                              "set.")
    texts.append(b"".join(_as_bytes(source[i]["text"]) + b"\n" for i in range(len(source))))
  train, test = texts
  return TextData(sequences(train, seq_len), sequences(test, seq_len),
                  f"tensorflow-datasets {name} (train, test)", len(train), len(test), 1, 1)


def _as_bytes(value) -> bytes:
  return value.encode() if isinstance(value, str) else bytes(value)

"""The run folder (``--workdir``): checked, locked and reconciled before anything slow.

What a run does with its folder before it reads any data or compiles anything:

- :func:`resolve`: a local folder, or ``gs://BUCKET/PATH`` read and written
  through ``etils.epath`` (the path library orbax uses) with gcsfs underneath;
  any other ``scheme://`` is refused in one line, and so is a mistyped URL
  such as ``gs:/bucket`` (which would otherwise become a local folder ``gs:``).
- :func:`open_run`: the folder is created if missing and must be a folder, be
  writable (a file is created and removed in it) and not be held by another
  live run: ``WORKDIR/run.lock`` names the host and process holding it.
  Locally the lock is ``fcntl.flock`` (what the ``filelock`` package uses): the
  kernel releases it when its process dies, however it dies, so a lock left
  by a killed run is taken over (with a warning naming it). In a bucket there
  is no such lock: the holder rewrites the lock every ``HEARTBEAT_S`` seconds,
  and a lock from a dead process of this host, or not rewritten for
  ``STALE_S`` seconds, is taken over; two runs started within the same second
  may both get it there (object stores have no atomic create through
  ``etils.epath``). Process 0 of a multi-host job takes the lock for the whole
  job, and every process learns the outcome (``distributed.agree``).
- Settings: a folder whose ``config.json`` holds other settings is refused,
  naming them, when it holds a checkpoint; without a checkpoint (a run that
  diverged or failed before its first epoch ended) nothing worth keeping was
  trained, and the new settings start afresh. ``--checkpoint_every`` and
  ``--eval_every`` may change between launches (:data:`FREE_SETTINGS`). More ``--epochs`` or ``--steps``
  (:data:`LENGTH_SETTINGS`) with a constant schedule continue a finished run from
  its last checkpoint (every other step is unchanged); ``restart=True`` (``--restart``) discards what the
  folder holds and starts afresh.

The helpers :func:`write_atomic` and :func:`is_cloud` serve ``records`` and
``trainer`` too.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import sys
import threading
import time
import uuid
from typing import Any, Iterator, Optional

from absl import logging
from etils import epath

from experiments import distributed
from experiments import errors

LOCK = "run.lock"
CONFIG = "config.json"
CHECKPOINTS = "checkpoints"
FAULTS = "faults.log"  # what libraries printed around a fault (experiments.faultlog)
# What a run writes into its folder (``--restart`` removes these, and nothing else).
# (checkpoints_unrestorable/: those experiments.checkpoint moved aside on resume.)
RUN_FILES = (CONFIG, "metrics.jsonl", "tensorboard", CHECKPOINTS, CHECKPOINTS + "_unrestorable",
             "figures", FAULTS, "data.json")
CLOUD_SCHEMES = ("gs",)
# Settings a resumed run may change: they say when to save, not what is trained.
FREE_SETTINGS = ("checkpoint_every", "eval_every")
# The run's length: on a constant schedule, changing it changes none of the steps trained.
LENGTH_SETTINGS = ("epochs", "steps")
HEARTBEAT_S = 30.0
STALE_S = 120.0


# ------------------------------------------------------------------------- paths


def is_cloud(path: Any) -> bool:
  """Whether ``path`` (a string or ``epath.Path``) is a ``scheme://`` path."""
  return "://" in os.fspath(path)


def resolve(workdir: str, flag: str = "--workdir") -> epath.Path:
  """``workdir`` as an ``epath.Path``: a local folder (made absolute) or ``gs://...``.

  Raises a one-line ``errors.UsageError`` naming ``flag`` for another scheme,
  a ``gs:/x``-like path that lost a slash, or ``gs://`` without gcsfs.
  """
  scheme, sep, _ = workdir.partition("://")
  if sep:
    if scheme not in CLOUD_SCHEMES:
      raise errors.InputError(f"{flag}={workdir}: {scheme}:// paths are not supported; use a "
                              "local folder or gs://BUCKET/PATH.")
    try:
      import gcsfs  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      raise errors.MissingExtraError(
          f"{flag}={workdir}: gs:// paths are written through gcsfs, which is not installed: "
          "pip install -e '.[gcs]'.") from None
    # etils routes gs:// through TensorFlow's file system when TensorFlow is installed,
    # importing it into the training process; gcsfs (fsspec) is what is installed and tested.
    # etils reads EPATH_USE_TF once, at its first use of any path: forget that reading.
    if "EPATH_USE_TF" not in os.environ:
      os.environ["EPATH_USE_TF"] = "false"
      from etils.epath import gpath  # pylint: disable=g-import-not-at-top
      getattr(gpath._is_tf_installed, "cache_clear", lambda: None)()  # pylint: disable=protected-access
    return epath.Path(workdir)
  first = workdir.split("/")[0]
  if re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]+:", first) and not os.path.exists(first):
    raise errors.InputError(f"{flag}={workdir} looks like a URL without its '//' (it would "
                            f"make a local folder {first!r}); write gs://BUCKET/PATH or a local "
                            "folder.")
  return epath.Path(os.path.abspath(workdir))


def write_atomic(path: epath.Path, text: str) -> None:
  """Writes ``path`` whole or not at all: locally a temporary file renamed over it (a kill
  mid-write leaves the old file); an object store writes an object whole anyway."""
  if is_cloud(path):
    path.write_text(text)
    return
  tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
  tmp.write_text(text)
  os.replace(tmp, path)


# ------------------------------------------------------------------------- lock


def _me() -> dict[str, Any]:
  return {"host": socket.gethostname(), "pid": os.getpid(),
          "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}


def _describe(holder: dict[str, Any]) -> str:
  return (f"pid {holder.get('pid')} on host {holder.get('host')}, started "
          f"{holder.get('started')}: {str(holder.get('command', ''))[:120]}")


def _parse(text: str) -> dict[str, Any]:
  try:
    holder = json.loads(text)
  except json.JSONDecodeError:
    return {}
  return holder if isinstance(holder, dict) else {}


def _pid_alive(pid: Any) -> bool:
  """Whether process ``pid`` of this host exists (a garbled pid counts as gone)."""
  if not isinstance(pid, int) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  return True


class Lock:
  """``WORKDIR/run.lock``, held by one live run; see the module docstring.

  Builds on ``fcntl.flock`` for local folders; in a bucket it is a JSON object
  rewritten by a heartbeat thread. :meth:`acquire` raises a one-line
  ``errors.InputError`` naming the holder when another live run holds it.
  """

  def __init__(self, folder: epath.Path):
    self.path = folder / LOCK
    self.flag = f"--workdir={folder}"
    self._fd: Optional[int] = None
    self._me = {**_me(), "token": uuid.uuid4().hex}
    self._stop = threading.Event()
    self._beat: Optional[threading.Thread] = None

  def _held(self, holder: dict[str, Any]) -> errors.InputError:
    return errors.InputError(f"{self.flag} is in use by another run ({_describe(holder)}); "
                             f"wait for it or stop it, or use another --workdir (lock: "
                             f"{self.path}).")

  def acquire(self) -> None:
    (self._acquire_cloud if is_cloud(self.path) else self._acquire_local)()

  def _acquire_local(self) -> None:
    import fcntl  # pylint: disable=g-import-not-at-top
    while True:
      try:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      except OSError as e:
        raise errors.InputError(f"{self.flag}: cannot open its lock {self.path} "
                                f"({type(e).__name__}: {e.strerror or e}).") from None
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        text = os.pread(fd, 4096, 0).decode(errors="replace")
        os.close(fd)
        if e.errno in (errno.EAGAIN, errno.EACCES):
          raise self._held(_parse(text)) from None
        logging.warning("%s: this file system cannot lock files (%s); the folder is not "
                        "guarded against a second run.", self.path, e)
        self._write_local(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644))
        return
      try:  # the file we locked may have been removed by its last holder meanwhile
        same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)
    left = _parse(os.pread(fd, 4096, 0).decode(errors="replace"))
    if left:
      logging.warning("%s was left by a run that is gone (%s); taken over.", self.path,
                      _describe(left))
    self._write_local(fd)

  def _write_local(self, fd: int) -> None:
    self._fd = fd
    data = json.dumps(self._me).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)

  def _acquire_cloud(self) -> None:
    if self.path.exists():
      holder = _parse(self.path.read_text())
      mine = holder.get("host") == socket.gethostname() and holder.get("pid") == os.getpid()
      if holder.get("host") == socket.gethostname():
        alive = not mine and _pid_alive(holder.get("pid"))
      else:
        beat = holder.get("beat")
        alive = isinstance(beat, (int, float)) and time.time() - beat < STALE_S
      if alive:
        raise self._held(holder)
      logging.warning("%s was left by a run that is gone (%s); taken over.", self.path,
                      _describe(holder))
    self._write_cloud()
    now = _parse(self.path.read_text())
    if now.get("token") != self._me["token"]:  # another run wrote it meanwhile
      raise self._held(now)
    self._beat = threading.Thread(target=self._heartbeat, daemon=True, name="run.lock")
    self._beat.start()

  def _write_cloud(self) -> None:
    self.path.write_text(json.dumps({**self._me, "beat": time.time()}))

  def _heartbeat(self) -> None:
    while not self._stop.wait(HEARTBEAT_S):
      try:
        self._write_cloud()
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("%s: could not renew the lock (%s)", self.path, e)

  def release(self) -> None:
    """Removes the lock (ours); locally while still holding it, so no one sees it half."""
    if self._fd is not None:
      with contextlib.suppress(OSError):
        os.unlink(self.path)
      os.close(self._fd)
      self._fd = None
    if self._beat is not None:
      self._stop.set()
      self._beat.join()
      self._beat = None
      with contextlib.suppress(Exception):
        if _parse(self.path.read_text()).get("token") == self._me["token"]:
          self.path.unlink()


# ------------------------------------------------------------------ the folder


def free_space(folder: epath.Path) -> str:
  """Free space of ``folder``'s file system for a message, e.g. ``"12 KB of 700 KB"``; a
  bucket's is unknown here."""
  if is_cloud(folder):
    return "unknown (a bucket's quota)"
  path = str(folder)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  usage = shutil.disk_usage(path)

  def size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
      if n < 1024 or unit == "GB":
        return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
      n /= 1024
    return ""

  return f"{size(usage.free)} of {size(usage.total)}"


def check_reachable(folder: epath.Path, flag: str, timeout_s: float = 10.0) -> None:
  """For a ``gs://`` folder: one TCP connection to the storage endpoint, or a one-line
  ``errors.InputError`` naming the bucket and the endpoint tried.

  The endpoint is ``storage.googleapis.com:443``, or ``STORAGE_EMULATOR_HOST``
  where it is set (as gcsfs reads it). Without this, gcsfs retries with backoff
  for about a minute and ends in an aiohttp traceback.
  """
  if not is_cloud(folder):
    return
  emulator = os.environ.get("STORAGE_EMULATOR_HOST")
  if emulator:
    where = emulator.split("://")[-1].rstrip("/")
    host, _, port = where.rpartition(":") if ":" in where else (where, "", "")
    port = int(port) if port.isdigit() else (443 if emulator.startswith("https") else 80)
    tried = f"{host}:{port} (STORAGE_EMULATOR_HOST)"
  else:
    host, port = "storage.googleapis.com", 443
    tried = f"{host}:{port}"
  try:
    socket.create_connection((host, port), timeout=timeout_s).close()
  except OSError as e:
    bucket = str(folder).split("://", 1)[1].split("/", 1)[0]
    raise errors.InputError(
        f"{flag}={folder}: bucket {bucket!r} cannot be reached: connecting to {tried} failed "
        f"({getattr(e, 'strerror', None) or type(e).__name__}); check the network, or use a "
        "local --workdir.") from None


def check_folder(folder: epath.Path, flag: str) -> bool:
  """Creates ``folder`` if missing; refuses a file or a folder this process cannot write.

  Returns whether it was created (so that a failed start can remove it again).
  """
  check_reachable(folder, flag)
  if folder.exists() and not folder.is_dir():
    raise errors.InputError(f"{flag}={folder} is a file, not a folder; give a folder (it is "
                            "created if missing).")
  created = not folder.exists()
  try:
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".write-test-{socket.gethostname()}-{os.getpid()}"
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise errors.InputError(f"{flag}={folder} is not writable ({type(e).__name__}: "
                            f"{e.strerror or e}); give a folder you can write to.") from None
  return created


def changed_settings(workdir: Any, config) -> dict[str, tuple[Any, Any]]:
  """``{field: (old, new)}`` where ``workdir/config.json`` differs from ``config``.

  Empty if the files agree or ``workdir`` has no ``config.json`` yet; a field
  only one side has shows ``"<absent>"`` on the other. A ``config.json`` that
  is not JSON is an ``errors.InputError`` naming it.
  """
  path = epath.Path(workdir) / CONFIG
  if not path.exists():
    return {}
  try:
    old = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise errors.InputError(f"{path} is not valid JSON ({e}); --restart discards the run in "
                            "the folder, or use a new --workdir.") from None
  new = json.loads(config.to_json())
  defaults = json.loads(type(config)().to_json())
  # A setting added after the run was written counts as its default there.
  old = {**{k: v for k, v in defaults.items() if k not in old}, **old}
  absent = "<absent>"
  return {k: (old.get(k, absent), new.get(k, absent)) for k in {**old, **new}
          if old.get(k, absent) != new.get(k, absent)}


def has_checkpoint(folder: epath.Path) -> bool:
  """Whether ``folder/checkpoints`` holds a step folder (orbax names them by step)."""
  path = folder / CHECKPOINTS
  return path.is_dir() and any(p.name.isdigit() for p in path.iterdir())


def reconcile_settings(folder: epath.Path, config, restart: bool, writer: bool) -> None:
  """Applies the settings rules of the module docstring; raises naming the flags.

  ``writer`` (process 0) removes files and logs; the other processes only check.
  """
  warn = logging.warning if writer else (lambda *args: None)
  if restart:
    for path in (folder / name for name in RUN_FILES):
      if not writer or not path.exists():
        continue
      if path.is_dir():
        path.rmtree()
      else:
        path.unlink()
    warn("--restart: %s starts afresh (its checkpoints and records are discarded).", folder)
    return
  checkpointed = has_checkpoint(folder)
  try:
    diff = changed_settings(folder, config)
  except errors.InputError:
    if checkpointed:
      raise
    diff = {CONFIG: ("unreadable", "")}
  for free in FREE_SETTINGS:  # how often to save, not what is trained
    diff.pop(free, None)
  if not diff:
    return
  if not checkpointed:
    warn("%s held a run with other settings %s but no checkpoint; it starts afresh with the "
         "new ones.", folder, diff)
    return
  if set(diff) <= set(LENGTH_SETTINGS) and config.schedule == "constant":
    for name, (old, new) in sorted(diff.items()):
      warn("%s: --%s %s -> %s; the run continues from its last checkpoint.", folder, name,
           old, new)
    return
  why = ""
  lengths = sorted(set(diff) & set(LENGTH_SETTINGS))
  if lengths and config.schedule != "constant":
    why = (f" (--{lengths[0]} sets the length of --schedule={config.schedule}, so the steps "
           "already trained followed another schedule)")
  raise errors.InputError(
      f"--workdir={folder} holds a checkpointed run with other settings {diff} (old, new){why}; "
      f"resume with the same {', '.join('--' + k for k in sorted(diff))}, or --restart to "
      "discard it and start afresh, or use a new --workdir.")


class RunFolder:
  """An opened run folder: ``path`` (an ``epath.Path``), held until :meth:`close`."""

  def __init__(self, path: epath.Path, lock: Optional[Lock], created: bool):
    self.path, self._lock, self._created = path, lock, created

  def close(self) -> None:
    """Releases the lock, and removes the folder if this run made it and it is still empty
    (a run that failed to start leaves nothing behind)."""
    if self._lock is not None:
      self._lock.release()
      self._lock = None
    if self._created and not is_cloud(self.path):
      with contextlib.suppress(OSError):
        os.rmdir(self.path)


@contextlib.contextmanager
def open_run(workdir: str, config, *, restart: bool = False) -> Iterator[RunFolder]:
  """Checks, locks and reconciles ``workdir`` for ``config`` (see the module docstring).

  Every process of a multi-host job calls it; process 0 takes the lock and
  writes, and an error on any process is raised on all of them. Yields a
  :class:`RunFolder`; the lock is released on exit.
  """
  import jax  # pylint: disable=g-import-not-at-top
  writer = jax.process_index() == 0
  folder = resolve(workdir)
  lock, created, error = None, False, None
  try:
    created = check_folder(folder, "--workdir")
    if writer:
      lock = Lock(folder)
      lock.acquire()
    reconcile_settings(folder, config, restart, writer)
  except errors.UsageError as e:
    error = str(e)
  run = RunFolder(folder, lock, created)
  error = distributed.agree(error)  # also a barrier: --restart's removal is done everywhere
  if error:
    run.close()
    raise errors.InputError(error)
  try:
    yield run
  finally:
    run.close()

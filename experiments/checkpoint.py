"""Checkpoints of a whole TrainState with orbax, robust to its pytree structure and to damage.

Builds on ``orbax.checkpoint.CheckpointManager`` (StandardSave/StandardRestore),
which takes local folders and ``gs://`` paths alike (``etils.epath``). The
state is saved as the flat list of its array leaves; on restore the
structure comes from a freshly built state of the same run (same config), so
optax states with ``None`` or empty nodes, NNX ``State`` containers and
namedtuples all round-trip without orbax needing to know them.

A checkpoint that cannot be restored (a data file truncated or deleted by a
crash or a full disk) is skipped for the newest one that can, with a one-line
warning; the ones that failed are moved aside, into ``<directory>_unrestorable/``
(orbax saves no step at or below its latest one, so they cannot stay), never
deleted: an error that was not damage (a network blip on a bucket, memory
running out) costs the steps since the older checkpoint, not the checkpoint. When no checkpoint can be restored (they are damaged, or hold
another model or method) the error names the folder. Damage that still
decodes (flipped bits in an array) is not detected: orbax keeps no checksums.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from experiments import errors


def _short(e: BaseException) -> str:
  """``Type: message``, on one line and cut short (tensorstore's messages run to pages)."""
  text = " ".join(str(e).split())
  return f"{type(e).__name__}: {text[:160]}{'...' if len(text) > 160 else ''}"


class Manager:
  """Keeps the last ``max_to_keep`` checkpoints of one run in ``directory``."""

  def __init__(self, directory: Any, max_to_keep: int = 2):
    self.directory = epath.Path(directory)
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True,
            # A save cut short (a full disk, a kill) leaves a *.orbax-checkpoint-tmp
            # folder: removed when the run resumes, so its space comes back.
            cleanup_tmp_directories=True))

  def save(self, step: int, state: Any) -> None:
    leaves = jax.tree.leaves(state)
    saved = self._manager.save(step, args=ocp.args.StandardSave({f"{i:05d}": x for i, x in
                                                                 enumerate(leaves)}))
    self._manager.wait_until_finished()
    if not saved:
      raise RuntimeError(f"orbax did not save step {step} in {self.directory} (its steps: "
                         f"{self._manager.all_steps()})")

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def _restore(self, step: int, like: Any) -> Any:
    leaves, treedef = jax.tree.flatten(like)
    target = {f"{i:05d}": jax.ShapeDtypeStruct(np.shape(x), x.dtype,
                                               sharding=getattr(x, "sharding", None))
              for i, x in enumerate(leaves)}
    restored = self._manager.restore(step, args=ocp.args.StandardRestore(target))
    return jax.tree.unflatten(treedef, [restored[f"{i:05d}"] for i in range(len(leaves))])

  def restore_latest(self, like: Any) -> Optional[Any]:
    """The newest checkpoint that restores, with the structure (and shardings) of ``like``.

    ``None`` if there is no checkpoint. Newer ones that fail are moved aside
    (:meth:`_move_aside`), with a warning naming them; if every one fails,
    ``errors.InputError`` names the folder.
    """
    failed = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        state = self._restore(step, like)
      except Exception as e:  # pylint: disable=broad-except  (tensorstore raises bare Exception)
        failed.append((step, e))
        continue
      for bad, e in failed:
        aside = self._move_aside(bad)
        logging.warning("checkpoint %d in %s cannot be restored (%s); moved to %s, resuming "
                        "from step %d.", bad, self.directory, _short(e), aside, step)
      if failed:  # orbax's list of steps still holds the ones moved aside
        self._manager.reload()
      return state
    if failed:
      raise errors.InputError(
          f"no checkpoint in {self.directory} can be restored into this run ("
          + "; ".join(f"step {s}: {_short(e)}" for s, e in failed)
          + "): they are damaged or hold another model or method; --restart discards them, "
          "or use a new --workdir.")
    return None

  def _move_aside(self, step: int) -> epath.Path:
    """Moves step ``step``'s folder to ``<directory>_unrestorable/<step>[.n]``; returns it."""
    aside_root = self.directory.parent / f"{self.directory.name}_unrestorable"
    aside_root.mkdir(parents=True, exist_ok=True)
    aside, n = aside_root / str(step), 1
    while aside.exists():
      aside, n = aside_root / f"{step}.{n}", n + 1
    try:
      (self.directory / str(step)).rename(aside)
    except OSError as e:
      raise errors.InputError(
          f"checkpoint {step} in {self.directory} cannot be restored, nor moved to {aside} "
          f"({_short(e)}): move it aside by hand, or --restart discards every checkpoint.") from e
    return aside

  def close(self) -> None:
    self._manager.close()

"""Checkpoints of a whole TrainState with orbax, robust to its pytree structure and to damage.

Builds on ``orbax.checkpoint.CheckpointManager`` (StandardSave/StandardRestore),
which takes local folders and ``gs://`` paths alike (``etils.epath``). The
state is saved as the flat list of its array leaves; on restore the
structure comes from a freshly built state of the same run (same config), so
optax states with ``None`` or empty nodes, NNX ``State`` containers and
namedtuples all round-trip without orbax needing to know them.

A checkpoint that cannot be restored (a data file truncated or deleted by a
crash or a full disk) is skipped for the newest one that can, with a one-line
warning; the damaged ones are deleted, since orbax saves no step at or below
its latest one. When no checkpoint can be restored (they are damaged, or hold
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
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                                             create=True))

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

    ``None`` if there is no checkpoint. Newer ones that fail are deleted, with a
    warning naming them; if every one fails, ``errors.InputError`` names the folder.
    """
    failed = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        state = self._restore(step, like)
      except Exception as e:  # pylint: disable=broad-except  (tensorstore raises bare Exception)
        failed.append((step, e))
        continue
      for bad, e in failed:
        logging.warning("checkpoint %d in %s cannot be restored (%s); deleted, resuming from "
                        "step %d.", bad, self.directory, _short(e), step)
        self._manager.delete(bad)
      return state
    if failed:
      raise errors.InputError(
          f"no checkpoint in {self.directory} can be restored into this run ("
          + "; ".join(f"step {s}: {_short(e)}" for s, e in failed)
          + "): they are damaged or hold another model or method; --restart discards them, "
          "or use a new --workdir.")
    return None

  def close(self) -> None:
    self._manager.close()

"""Checkpoints of a whole TrainState with orbax, robust to its pytree structure.

Builds on ``orbax.checkpoint.CheckpointManager`` (StandardSave/StandardRestore).
The state is saved as the flat list of its array leaves; on restore the
structure comes from a freshly built state of the same run (same config), so
optax states with ``None`` or empty nodes, NNX ``State`` containers and
namedtuples all round-trip without orbax needing to know them. A checkpoint
whose leaves do not match the fresh state (another model or method) is an
error naming the folder.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from experiments import errors


class Manager:
  """Keeps the last ``max_to_keep`` checkpoints of one run in ``directory``."""

  def __init__(self, directory: str, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                                             create=True))

  def save(self, step: int, state: Any) -> None:
    leaves = jax.tree.leaves(state)
    self._manager.save(step, args=ocp.args.StandardSave({f"{i:05d}": x for i, x in
                                                         enumerate(leaves)}))
    self._manager.wait_until_finished()

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def restore_latest(self, like: Any) -> Optional[Any]:
    """The latest checkpoint, with the structure (and shardings) of ``like``."""
    step = self._manager.latest_step()
    if step is None:
      return None
    leaves, treedef = jax.tree.flatten(like)
    target = {f"{i:05d}": jax.ShapeDtypeStruct(np.shape(x), x.dtype,
                                               sharding=getattr(x, "sharding", None))
              for i, x in enumerate(leaves)}
    try:
      restored = self._manager.restore(step, args=ocp.args.StandardRestore(target))
    except (ValueError, KeyError) as e:
      raise errors.InputError(f"the checkpoint in {self.directory} (step {step}) does not fit this "
                       f"run's state: {e}. Use a new --workdir.") from e
    return jax.tree.unflatten(treedef, [restored[f"{i:05d}"] for i in range(len(leaves))])

  def close(self) -> None:
    self._manager.close()

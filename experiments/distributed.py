"""Multi-host runs: the flags that start ``jax.distributed`` and what each process does.

With ``--distributed`` the launcher calls ``jax.distributed.initialize`` before
anything touches a device. On a TPU pod slice or a SLURM cluster it finds the
coordinator, the process count and this process's id in the environment; elsewhere
give them with ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I``.
``--cpu_collectives=gloo`` lets several CPU processes on one machine (or many)
talk to each other, which is how the multi-host path is tested here.

Then, in ``experiments.train``, every process loads the data, builds the same model,
and feeds its own devices' share of every global batch (the mesh spans all
processes' devices); process 0 alone writes ``config.json``, ``metrics.jsonl``,
TensorBoard files and INFO logs, and all processes save and restore the orbax
checkpoints together. In ``experiments.sweep`` the runs are independent, so process
``i`` of ``N`` trains runs ``i, i+N, i+2N, ...`` on its own devices and writes their
folders.
"""

from __future__ import annotations

from typing import Optional

from absl import flags
from absl import logging


def define_flags() -> None:
  """``--distributed`` and its coordinator flags (idempotent)."""
  if "distributed" in flags.FLAGS:
    return
  flags.DEFINE_bool("distributed", False,
                    "Multi-host: call jax.distributed.initialize() first (a TPU pod or SLURM "
                    "provides the coordinator; elsewhere give --coordinator_address, "
                    "--num_processes and --process_id).")
  flags.DEFINE_string("coordinator_address", None, "With --distributed: HOST:PORT of process "
                      "0's coordinator (default: from the environment).")
  flags.DEFINE_integer("num_processes", None, "With --distributed: the number of processes "
                       "(default: from the environment).")
  flags.DEFINE_integer("process_id", None, "With --distributed: this process's id, 0 to "
                       "--num_processes-1 (default: from the environment).")
  flags.DEFINE_enum("cpu_collectives", None, ["gloo", "mpi"], "With --distributed on CPUs: "
                    "the collectives implementation (gloo runs several processes on one "
                    "machine, as the tests do).")


def initialize_from_flags() -> None:
  """Starts ``jax.distributed`` if ``--distributed``; quiets INFO logs off process 0."""
  f = flags.FLAGS
  given = [n for n in ("coordinator_address", "num_processes", "process_id", "cpu_collectives")
           if getattr(f, n) is not None]
  if not f.distributed:
    if given:
      from experiments import errors  # pylint: disable=g-import-not-at-top
      raise errors.InputError(f"--{given[0]} needs --distributed.")
    return
  import jax  # pylint: disable=g-import-not-at-top
  if f.cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", f.cpu_collectives)
  jax.distributed.initialize(coordinator_address=f.coordinator_address,
                             num_processes=f.num_processes, process_id=f.process_id)
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)
  logging.info("process %d of %d; %d local and %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


AGREE_BYTES = 2048


def agree(error: Optional[str]) -> Optional[str]:
  """The first process's ``error`` (``None`` if no process has one), the same on every process.

  A collective (``jax.experimental.multihost_utils.process_allgather`` of the
  messages as bytes, cut at :data:`AGREE_BYTES`): every process must call it.
  It lets a check that fails on one process (process 0's lock, a folder
  another host cannot write) stop every process with the same line, instead
  of leaving the others waiting in their first collective; it is also a
  barrier. One process: returns ``error`` at once.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return error
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  mine = np.zeros(AGREE_BYTES, np.uint8)
  text = (error or "").encode()[:AGREE_BYTES]
  mine[:len(text)] = np.frombuffer(text, np.uint8)
  every = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, AGREE_BYTES)
  for row in every:
    if row.any():
      return bytes(row).rstrip(b"\0").decode(errors="replace")
  return None

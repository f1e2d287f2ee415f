"""The command line of ``python -m experiments.sweep``: the launcher's flags with the
grid axes as lists.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

from absl import flags
from absl import logging

from experiments import config as config_lib
from experiments import distributed
from experiments import errors
from experiments.config import Config
from experiments.sweep.grid import DEFAULT_MAX_RUNS_PER_CHUNK, GRID_FIELDS, grid, run_names
from experiments.sweep.chunks import check_chunking
from experiments.sweep import train_grid


# ------------------------------------------------------------------------ launcher


def _parse(flag: str, values: Optional[Sequence[str]], kind: Callable[[str], Any]) -> list:
  out = []
  for text in values or []:
    try:
      out.append(kind(text.strip()))
    except ValueError:
      raise errors.InputError(f"--{flag}: {text!r} is not a valid {kind.__name__}.") from None
  return out


def define_flags() -> None:
  """The launcher's flags (``config.define_flags``, ``distributed.define_flags``), with the
  grid axes as lists.

  Called by ``python -m experiments.sweep`` only, not on import, so that this
  module can be imported beside ``experiments.train``.
  """
  config_lib.define_flags()
  distributed.define_flags()
  for name in GRID_FIELDS:
    help_ = flags.FLAGS[name].help
    default = flags.FLAGS[name].default
    delattr(flags.FLAGS, name)
    flags.DEFINE_list(name, None if default is None else str(default),
                      f"Comma-separated list, one run per value. {help_}")
  flags.DEFINE_string("workdir", None, "Folder of the sweep; one subfolder per run.")
  flags.DEFINE_integer("vmap_size", None,
                       "Runs vectorized by jax.vmap at a time inside the one jitted step (the "
                       "others are looped by jax.lax.map in the same program); 0: every run "
                       "of a chunk (default).")
  flags.DEFINE_enum("strategy", "auto", ["auto", "vmap", "sequential"],
                    "How the runs of a chunk share the one compiled step: vmap (stacked, one "
                    "vmapped step), sequential (one single-run step, run after run) or auto "
                    "(time both on the first chunk, keep the faster).")
  flags.DEFINE_integer("max_runs_per_chunk", None,
                       "Most runs trained at once; default: what fits the device's free "
                       f"memory, or {DEFAULT_MAX_RUNS_PER_CHUNK} where it is unknown (CPU).")
  flags.mark_flag_as_required("workdir")


def configs_from_flags() -> list[Config]:
  """The grid of the parsed flags (raises ``ValueError`` naming the flag)."""
  f = flags.FLAGS
  base = Config(**config_lib.flag_values(exclude=GRID_FIELDS))
  lams = None if f.lam is None else _parse("lam", f.lam, float)
  return grid(base, lrs=_parse("lr", f.lr, float), lams=lams,
              seeds=_parse("seed", f.seed, int), methods=_parse("method", f.method, str))


def main(argv: Sequence[str]) -> None:
  with errors.one_line("experiments.sweep"):
    if len(argv) > 1:
      raise errors.InputError(f"unexpected arguments: {argv[1:]}")
    configs = configs_from_flags()
    check_chunking(flags.FLAGS.max_runs_per_chunk, flags.FLAGS.vmap_size)
    distributed.initialize_from_flags()
    logging.info("%d runs:\n%s", len(configs), "\n".join(run_names(configs)))
    train_grid(configs, flags.FLAGS.workdir, max_runs_per_chunk=flags.FLAGS.max_runs_per_chunk,
               vmap_size=flags.FLAGS.vmap_size, strategy=flags.FLAGS.strategy)

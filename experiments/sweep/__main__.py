"""``python -m experiments.sweep``: :mod:`experiments.sweep.cli`'s command line."""

from absl import app
from absl import flags

from experiments import sweep
from experiments.sweep import cli

__doc__ = sweep.__doc__  # what absl's --help prints: the command's own description

if __name__ == "__main__":
  cli.define_flags()
  flags.adopt_module_key_flags(cli)  # --help lists them, as the command's own
  app.run(cli.main)

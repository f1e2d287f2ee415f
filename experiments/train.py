"""Launcher: ``python -m experiments.train --workdir=DIR [flags]``.

Parses the absl flags into a checked ``Config`` and calls
``experiments.trainer.train_and_evaluate(config, workdir)``. Run with
``--helpfull`` for every flag. Examples in the README.
"""

import os

from absl import app
from absl import flags
from absl import logging

from experiments import config as config_lib
from experiments import distributed
from experiments import errors

config_lib.define_flags()
distributed.define_flags()
flags.DEFINE_string("workdir", None, "Folder for config.json, metrics.jsonl and checkpoints; "
                    "a run restarted on the same folder resumes.")
flags.DEFINE_integer("exit_after_step", None, "Testing: stop abruptly (exit status 17, as if "
                     "killed) after this step, to check that the same command resumes.")
flags.mark_flag_as_required("workdir")


def main(argv):
  with errors.one_line("experiments.train"):
    if len(argv) > 1:
      raise errors.InputError(f"unexpected arguments: {argv[1:]}")
    config = config_lib.from_flags()
    distributed.initialize_from_flags()
    from experiments import trainer  # pylint: disable=g-import-not-at-top
    logging.info("config:\n%s", config.to_json())
    stop = flags.FLAGS.exit_after_step
    trainer.train_and_evaluate(config, flags.FLAGS.workdir, interrupt_after_step=stop)
    if stop is not None:
      os._exit(17)  # pylint: disable=protected-access


if __name__ == "__main__":
  app.run(main)

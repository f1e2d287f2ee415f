"""Launcher: ``python -m experiments.train --workdir=DIR [flags]``.

Parses the absl flags into a checked ``Config`` and calls
``experiments.trainer.train_and_evaluate(config, workdir)``. Run with
``--helpfull`` for every flag. Examples in the README.
"""

from absl import app
from absl import flags
from absl import logging

from experiments import config as config_lib
from experiments import errors

config_lib.define_flags()
flags.DEFINE_string("workdir", None, "Folder for config.json, metrics.jsonl and checkpoints; "
                    "a run restarted on the same folder resumes.")
flags.DEFINE_bool("distributed", False, "Multi-host: call jax.distributed.initialize() "
                  "(the environment, e.g. a TPU pod or SLURM, provides the coordinator).")
flags.mark_flag_as_required("workdir")


def main(argv):
  with errors.one_line("experiments.train"):
    if len(argv) > 1:
      raise errors.InputError(f"unexpected arguments: {argv[1:]}")
    config = config_lib.from_flags()
    if flags.FLAGS.distributed:
      import jax  # pylint: disable=g-import-not-at-top
      jax.distributed.initialize()
    from experiments import trainer  # pylint: disable=g-import-not-at-top
    logging.info("config:\n%s", config.to_json())
    trainer.train_and_evaluate(config, flags.FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)

"""Launcher: ``python -m experiments.train --workdir=DIR [flags]``.

Parses the absl flags into a checked ``Config`` and calls
``experiments.trainer.train_and_evaluate(config, workdir)``; then draws the
run's figures into ``WORKDIR/figures`` (``experiments.plot``) and ends with one
line: test accuracy, steps, wall time and where the files are. INFO logs
(orbax's, the groups found, the settings) are off unless ``--verbose``. Run
with ``--helpfull`` for every flag. Examples in the README.
"""

import logging as pylogging
import os
import time

from absl import app
from absl import flags
from absl import logging

from experiments import config as config_lib
from experiments import distributed
from experiments import errors

config_lib.define_flags()
distributed.define_flags()
flags.DEFINE_string("workdir", None, "Folder (or gs://BUCKET/PATH) for config.json, "
                    "metrics.jsonl, TensorBoard files and checkpoints; a run restarted on the "
                    "same folder resumes, and more --epochs (constant schedule) extend it.")
flags.DEFINE_bool("restart", False, "Discard what --workdir holds (checkpoints, records) and "
                  "start afresh, with new settings if given.")
flags.DEFINE_bool("figures", True, "Draw the run's figures into WORKDIR/figures at the end.")
flags.DEFINE_bool("verbose", False, "Show INFO logs (the settings, the groups found, orbax's "
                  "checkpointing).")
flags.DEFINE_integer("exit_after_step", None, "Testing: stop abruptly (exit status 17, as if "
                     "killed) after this step, to check that the same command resumes.")
flags.mark_flag_as_required("workdir")


def summary(workdir: str, seconds: float, figures: bool) -> str:
  """The last line of a run: its final test record, where its files and figures are."""
  from experiments import plot  # pylint: disable=g-import-not-at-top
  run = plot.read_run(workdir)
  where = f"files in {workdir}"
  if figures:
    try:
      plot.plot_runs([run], os.path.join(workdir, "figures"))
      where += f", figures in {os.path.join(workdir, 'figures')}"
    except Exception as e:  # pylint: disable=broad-except  (the run itself is done and saved)
      logging.warning("could not draw the figures (%s: %s)", type(e).__name__, e)
  test = run.test[-1]
  return (f"experiments.train: done in {seconds:.0f} s: test accuracy {test['accuracy']:.4f} "
          f"(loss {test['loss']:.4f}) after {test['step']} steps, {test['epoch']} epochs; "
          f"{where}")


def main(argv):
  with errors.one_line("experiments.train"):
    if len(argv) > 1:
      raise errors.InputError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS.verbose:
      logging.set_verbosity(logging.WARNING)
      # gcsfs warns at every gs:// access made without Google credentials (an emulator).
      pylogging.getLogger("gcsfs").setLevel(pylogging.ERROR)
    start = time.perf_counter()
    config = config_lib.from_flags()
    distributed.initialize_from_flags()
    from experiments import trainer  # pylint: disable=g-import-not-at-top
    logging.info("config:\n%s", config.to_json())
    stop = flags.FLAGS.exit_after_step
    trainer.train_and_evaluate(config, flags.FLAGS.workdir, interrupt_after_step=stop,
                               restart=flags.FLAGS.restart)
    if stop is not None:
      os._exit(17)  # pylint: disable=protected-access
    import jax  # pylint: disable=g-import-not-at-top
    if jax.process_index() == 0:
      print(summary(flags.FLAGS.workdir, time.perf_counter() - start, flags.FLAGS.figures),
            flush=True)


if __name__ == "__main__":
  app.run(main)

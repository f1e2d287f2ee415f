"""Launcher: ``python -m experiments.train --workdir=DIR [flags]``.

Parses the absl flags into a checked ``Config``, calls
``experiments.trainer.train_and_evaluate(config, workdir)``, draws the run's
figures into ``WORKDIR/figures`` (``experiments.plot``) and prints one last
line: the task's headline test metric (``experiments.tasks``), steps, wall time
and where the metrics and figures are. INFO logs (orbax's, the groups found, the settings) are off unless
``--verbose``. ``--help`` lists the launcher's flags; examples in
docs/experiments.md.
"""

import logging as pylogging
import os
import signal
import time

from absl import app
from absl import flags
from absl import logging

from experiments import config as config_lib
from experiments import distributed
from experiments import errors

config_lib.define_flags()
distributed.define_flags()
# --help lists the key flags of the main module: make the shared ones this module's too.
flags.adopt_module_key_flags(config_lib)
flags.adopt_module_key_flags(distributed)
flags.DEFINE_string("workdir", None, "Folder (or gs://BUCKET/PATH) for config.json, "
                    "metrics.jsonl, TensorBoard files and checkpoints; a run restarted on the "
                    "same folder resumes, and more --epochs (constant schedule) extend it.")
flags.DEFINE_bool("restart", False, "Discard what --workdir holds (checkpoints, records) and "
                  "start afresh, with new settings if given.")
flags.DEFINE_bool("figures", True, "When training ends, draw the run's figures (weight norm, "
                  "effective lr and angle per layer; the task's headline metric; loss) into "
                  "WORKDIR/figures, "
                  "as python -m experiments.plot WORKDIR --out=WORKDIR/figures does.")
flags.DEFINE_bool("verbose", False, "Show INFO logs (the settings, the groups found, orbax's "
                  "checkpointing).")
flags.DEFINE_integer("exit_after_step", None, "Testing: stop abruptly (exit status 17, as if "
                     "killed) after this step, to check that the same command resumes.")
flags.DEFINE_integer("sigterm_after_step", None, "Testing: send this process SIGTERM (what a "
                     "preemption sends) after this step, to check that it saves and resumes.")
flags.mark_flag_as_required("workdir")


def finish(workdir: str, seconds: float, figures: bool) -> str:
  """Draws the run's figures (if ``figures``) and returns the launcher's last line: the
  task's final headline test metric, steps, wall time and where the metrics and figures
  are."""
  from experiments import plot  # pylint: disable=g-import-not-at-top  (matplotlib)
  from experiments import tasks  # pylint: disable=g-import-not-at-top
  run = plot.read_run(workdir)
  headline = tasks.of(run.config).headline
  where = f"metrics: {os.path.join(workdir, 'metrics.jsonl')}"
  if figures:
    out = os.path.join(workdir, "figures")
    try:
      plot.plot_runs([run], out)
      where += f"; figures: {out}{os.sep}"
    except Exception as e:  # pylint: disable=broad-except  (the run itself is done and saved)
      logging.warning("could not draw the figures (%s: %s)", type(e).__name__, e)
  test = run.test[-1]
  epochs = f"{test['epoch']} epoch{'' if test['epoch'] == 1 else 's'}"
  return (f"test {headline} {test[headline]:.4f} after {epochs} ({test['step']} steps, "
          f"{seconds:.0f} s); {where}")


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
    import jax  # pylint: disable=g-import-not-at-top
    from experiments import trainer  # pylint: disable=g-import-not-at-top
    logging.info("config:\n%s", config.to_json())
    stop, term = flags.FLAGS.exit_after_step, flags.FLAGS.sigterm_after_step
    on_step = None if term is None else (
        lambda step, _: os.kill(os.getpid(), signal.SIGTERM) if step == term else None)
    state = trainer.train_and_evaluate(config, flags.FLAGS.workdir, interrupt_after_step=stop,
                                       restart=flags.FLAGS.restart, on_step=on_step)
    if stop is not None:
      # The steps dispatched so far finish first: on several hosts, a process that left
      # while the others still ran them would take the coordinator away mid-step.
      jax.block_until_ready(state.params)
      os._exit(17)  # pylint: disable=protected-access
    if jax.process_index() == 0:
      print(finish(flags.FLAGS.workdir, time.perf_counter() - start, flags.FLAGS.figures),
            flush=True)


if __name__ == "__main__":
  app.run(main)

"""``python -m experiments.reproduce``: the command line of :func:`experiments.reproduce.run`."""

import json
import os

from absl import app
from absl import flags

from experiments import cache as cache_lib
from experiments import errors
from experiments import reproduce
from experiments.reproduce.recipes import SIZES
from experiments.reproduce.report import run

__doc__ = reproduce.__doc__  # what absl's --help prints: the command's own description


def define_flags() -> None:
  """The command line of ``python -m experiments.reproduce``.

  Defined when the module runs, not when it is imported, so that the
  experiments can be imported side by side (they share flag names).
  """
  flags.DEFINE_enum("size", "smoke", list(SIZES), "How big: smoke (CI, minutes on a "
                    "CPU), medium, long (every equilibrium reached; under an hour on a "
                    "2-core CPU), full (50,000 images; a GPU).")
  cache_lib.define_report_flags(
      "runs/reproduce", "Where the runs go (cached: a finished run is not trained again).",
      "Where RESULTS.md, results.json and figures/ go; default WORKDIR/SIZE/report. The "
      "committed report is written with --report_dir=experiments.")


FLAGS = flags.FLAGS


def main(argv):
  with errors.one_line("experiments.reproduce"):
    workdir, report_dir, command = cache_lib.report_paths("experiments.reproduce", argv)
    results = run(FLAGS.size, workdir, report_dir, FLAGS.data_dir, command=command)
  print(json.dumps({k: v for k, v in results["verdicts"].items()}, indent=1))
  print(f"report: {os.path.join(report_dir, 'RESULTS.md')}")


if __name__ == "__main__":
  define_flags()
  app.run(main)

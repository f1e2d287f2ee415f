"""``python -m experiments.compare``: the command line of :func:`experiments.compare.run`."""

import os

from absl import app
from absl import flags

from experiments import cache as cache_lib
from experiments import compare
from experiments import errors
from experiments.compare.recipes import SIZES
from experiments.compare.report import run

__doc__ = compare.__doc__  # what absl's --help prints: the command's own description


def define_flags() -> None:
  """The command line of ``python -m experiments.compare``.

  Defined when the module runs, not when it is imported, so that the
  experiments can be imported side by side (they share flag names).
  """
  flags.DEFINE_enum("size", "cpu", list(SIZES), "smoke (a test), cpu (about an hour on "
                    "a 2-core CPU), full (50,000 images; a GPU).")
  cache_lib.define_report_flags("runs/compare", "Where the runs go (cached).",
                                "Where COMPARISON.md and figures go; default "
                                "WORKDIR/SIZE/report (the committed one: "
                                "--report_dir=experiments).")


FLAGS = flags.FLAGS


def main(argv):
  with errors.one_line("experiments.compare"):
    workdir, report_dir, command = cache_lib.report_paths("experiments.compare", argv)
    run(FLAGS.size, workdir, report_dir, FLAGS.data_dir, command=command)
  print(f"report: {os.path.join(report_dir, 'COMPARISON.md')}")


if __name__ == "__main__":
  define_flags()
  app.run(main)

"""The angular-update optimizers against the paper's recipes, on the same data.

``python -m experiments.compare --size=cpu --data_dir=DIR [--report_dir=DIR]`` trains
every method of :data:`METHODS` on the paper's BatchNorm CNN and on ResNet-20, on the
CIFAR-10 copy, through the launcher (``trainer.train_and_evaluate``, runs cached by
``experiments.cache``), and writes ``COMPARISON.md`` with figures:

- each method's learning rate is tuned over the same relative grid, its base rate
  times :data:`LR_GRID` (one seed), then the best rate is trained with two more seeds;
- the table gives the best test accuracy (mean over 3 seeds, with its standard
  error), the measured angle per step against the angle the method targets or
  reaches at equilibrium (``normreg.theory``; the middle half of training, mean over
  layers), and the step time relative to the base optimizer (``--method=none``);
- AdamP's cosine heuristic is compared with the exact groups along an SGDP run;
- decoupled weight decay with and without Defazio's correction: the gradient norm
  at the end of the cosine schedule.

Every run uses a cosine schedule (the common budget, and what the correction is for).
"""

# Layout: recipes (the methods compared, the tuning, the measurements), report (run, the
# figures, COMPARISON.md) and __main__ (the command line); every name is re-exported here.

from experiments import cache as cache_lib  # pylint: disable=unused-import
from experiments.compare.recipes import (  # pylint: disable=unused-import
    SIZES,
    LR_GRID,
    MAX_EXTENSIONS,
    MOMENTUM,
    L2,
    WD,
    RECIPES,
    SETTLE,
    recipe_config,
    target_angle,
    METHODS,
    method_config,
    run_name,
    _window_records,
    time_constants_before_window,
    angle_ratio,
    images_per_sec,
    EdgeOfGridError,
    tune,
    compare_method,
    _HeuristicProbe,
    heuristic_disagreement)
from experiments.compare.report import (  # pylint: disable=unused-import
    run,
    _save,
    make_figures,
    grad_norm_rise,
    write_report)

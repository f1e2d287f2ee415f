"""Reproduce van Laarhoven (2017) on real images and check it against normreg.theory.

``python -m experiments.reproduce --size=smoke|medium|long|full [--data_dir=DIR]
[--report_dir=DIR]`` trains the runs below through the launcher's
``train_and_evaluate``, writes ``RESULTS.md``, ``results.json`` and PNG figures
into ``--report_dir`` (default ``WORKDIR/SIZE/report``; the committed report is
written with ``--report_dir=experiments``), and returns the numbers as a dict
(``run(...)``), so that the smoke size is checked as a test
(``tests/test_reproduce.py``).

Claims, one section each; every criterion is fixed in :data:`CRITERIA` and
printed in the report before the numbers:

1. invariance: output and loss unchanged when grouped weights are rescaled,
   measured on trained networks of every norm kind;
2. no regularizing effect: SGD+L2 recipes with equal ``eta*lam`` (the
   ungrouped parameters at one common rate) reach equal accuracy, and their
   equilibrium norms scale as ``(eta/lam)^(1/4)``;
3. effective learning rate: the angle per step at equilibrium against
   ``normreg.theory`` for SGD+L2 with and without momentum, SGDW and AdamW,
   three recipes each; and Adam's ``eta/||w||`` still depends on the decay;
4. without L2 the norm grows and the effective learning rate decays, from a
   start set by the initial scale;
5. the fix: spherical SGD, tuned over one learning rate (the rate mapped from
   the best SGD+L2 recipe's equilibrium, x3 and /3; the ungrouped parameters
   keep that recipe's rate, ``--ungrouped_lr``), reaches the best SGD+L2
   accuracy with no ``lam``;
6. the same on the WeightNorm network;
7. BatchNorm's gamma and beta: scaling an inner layer's pair leaves the output
   unchanged (ReLU and a normalized layer follow), the last one's does not;
   and what L2 on them does to accuracy;
8. exact equivalence, from step 0: ``(eta, lam, w0)`` and
   ``(c^2 eta, lam/c^2, c w0)`` (``c = 2, 1/2``) train the same network;
9. weight decay is an exponentially growing learning rate (Li & Arora 2019):
   SGD + L2 and its twin without L2 (``--method=exp_lr``) train the same
   network, to float rounding, with and without momentum.

Every L2, SGDW and AdamW recipe must train for at least :data:`SETTLE` time
constants (``normreg.theory.time_constant_*``) before the measurement window,
the last quarter of the steps; :func:`check_settles` refuses any that would not
(an error naming the recipe and the steps it needs), so that no size reports a
transient as an equilibrium. Each size scales the decay coefficients of all
recipes by one factor (``decay_scale``) so that this holds.

Data: the CIFAR-10 JPEG copy (``--data_dir``, default ``$NORMREG_CIFAR10_DIR``);
without it, random images (only the smoke size allows that, as a test of the
code).
"""

# Layout: recipes (the sizes, the recipes, their time constants and the run cache, Runner),
# claims (each claim's measurement, its criterion in CRITERIA and its verdict), figures,
# report (run and RESULTS.md) and __main__ (the command line). Every name is re-exported
# here, so that reproduce.run, reproduce.Runner, reproduce.SIZES, ... read as before.

from experiments.reproduce.recipes import (  # pylint: disable=unused-import
    SIZES,
    MOMENTUM,
    SETTLE,
    WINDOW_START,
    L2_RECIPES,
    UNGROUPED_LR,
    BASE,
    L2_PLAIN_RECIPES,
    SGDW_RECIPES,
    ADAMW_RECIPES,
    SPHERICAL_LR_FACTORS,
    EXACT_EPS,
    EQUIVALENCE_SCALES,
    EARLY_STEPS,
    ULP,
    PROBE_IMAGES,
    PROBE_FILE,
    TooShortError,
    time_constant,
    steps_needed,
    check_settles,
    _name,
    Runner,
    _ProbeRecorder,
    _probe,
    diverged,
    final_accuracy,
    _acc,
    _tail_mean,
    _window,
    drift,
    check_stationary,
    _tail,
    _series)
from experiments.reproduce.claims import (  # pylint: disable=unused-import
    CRITERIA,
    check_recipes,
    claim_invariance,
    _l2_key,
    l2_recipe_runs,
    l2_runs,
    claim_no_regularization,
    _angle_record,
    effective_lr_recipes,
    claim_effective_lr,
    claim_growth_without_l2,
    claim_spherical,
    claim_weight_norm,
    claim_gamma_beta,
    _deviation,
    claim_equivalence,
    claim_exponential_lr,
    _same_within_noise,
    verdict_no_regularization,
    verdicts_effective_lr,
    verdicts)
from experiments.reproduce.figures import (  # pylint: disable=unused-import
    _save,
    _log_axes,
    make_figures)
from experiments.reproduce.report import (  # pylint: disable=unused-import
    run,
    _random_dataset,
    _fmt,
    _verdict,
    _criterion,
    _drift_text,
    write_report)

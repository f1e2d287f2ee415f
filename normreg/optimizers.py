"""Ready-made optimizers for normalized networks, in the style of ``optax.adamw``.

- :func:`sgd_l2`: the paper's baseline, SGD (with heavy-ball momentum) on the
  data loss plus the coupled penalty ``lam * ||w||^2`` on the scale-invariant
  weights.
- :func:`spherical_sgd`, :func:`spherical_adam`: the paper's fix. The grouped
  weights are kept at unit norm per unit (or per tensor), so the effective
  learning rate is the learning rate itself and ``lam`` is gone.

In all three, parameters outside the groups (norm scales and shifts, biases,
the last layer) get the plain base optimizer, unregularized, as in the paper.
Every learning rate may be a float or an optax schedule.
"""

from __future__ import annotations

import operator
from typing import Any, Optional

import jax
import optax

from normreg import _checks
from normreg import groups as groups_lib
from normreg import penalty
from normreg import rescale
from normreg import sphere


def _check_lr(learning_rate: Any, caller: str) -> None:
  _checks.positive("learning_rate", learning_rate, caller)


def _scale_by_learning_rates(learning_rate: optax.ScalarOrSchedule,
                             ungrouped_learning_rate: Optional[optax.ScalarOrSchedule],
                             groups: groups_lib.GroupsOrFn, caller: str
                             ) -> optax.GradientTransformation:
  """``optax.scale_by_learning_rate``; with ``ungrouped_learning_rate``, two of them under
  ``optax.masked``: ``learning_rate`` on the grouped leaves, the other on the rest."""
  _check_lr(learning_rate, caller)
  if ungrouped_learning_rate is None:
    return optax.scale_by_learning_rate(learning_rate)
  _checks.positive("ungrouped_learning_rate", ungrouped_learning_rate, caller)

  if callable(groups) and not hasattr(groups, "items"):  # optax.masked calls it on the updates
    def grouped(tree):
      return groups_lib.as_mask(groups_lib.resolve(groups, tree, caller))

    def ungrouped(tree):
      return jax.tree.map(operator.not_, grouped(tree))
  else:
    grouped = groups_lib.as_mask(groups)
    ungrouped = jax.tree.map(operator.not_, grouped)

  return optax.chain(optax.masked(optax.scale_by_learning_rate(learning_rate), grouped),
                     optax.masked(optax.scale_by_learning_rate(ungrouped_learning_rate),
                                  ungrouped))


def _momentum(momentum: Any, nesterov: bool) -> optax.GradientTransformation:
  """``optax.trace``, or nothing for a literal 0 (an injected array keeps the trace)."""
  if isinstance(momentum, (int, float)) and momentum == 0:
    return optax.identity()
  return optax.trace(decay=momentum, nesterov=nesterov)


def sgd_l2(learning_rate: optax.ScalarOrSchedule, lam: float, groups: groups_lib.GroupsOrFn,
           momentum: float = 0.0, nesterov: bool = False) -> optax.GradientTransformationExtraArgs:
  """SGD with coupled L2 on the scale-invariant weights (the paper's baseline).

  .. math::

    g_i = \\nabla_{w_i} L + 2 \\lambda w_i \\ (\\text{grouped } w_i), \\quad
    m \\leftarrow \\mu m + g, \\quad w \\leftarrow w - \\eta m,

  with ``lam`` the coefficient of the penalty ``lam * ||w||^2`` (gradient
  ``2 lam w``), ``mu`` the momentum and ``eta`` the learning rate. At
  equilibrium each unit turns by about ``sqrt(4 eta lam / (1 + mu))`` radians
  per step (:mod:`normreg.metrics`, DESIGN.md sec. 1).

  Chain: ``add_l2_penalty`` (grouped leaves only), ``optax.trace`` (momentum),
  ``optax.scale_by_learning_rate``: ``optax.sgd`` with the penalty in front.

  Args:
    learning_rate: ``eta > 0``, float or schedule.
    lam: penalty coefficient ``>= 0``.
    groups: groups pytree, or a callable ``params -> groups``.
    momentum: heavy-ball momentum ``mu`` (0 for plain SGD).
    nesterov: Nesterov momentum.

  Example:

    >>> import jax.numpy as jnp, normreg
    >>> params = {"kernel": jnp.ones((3, 2)), "scale": jnp.ones(2)}
    >>> tx = normreg.sgd_l2(0.1, 5e-4, {"kernel": normreg.UNIT, "scale": None}, momentum=0.9)
    >>> state = tx.init(params)

  References:
    van Laarhoven, 2017 (arXiv 1706.05350).
  """
  _check_lr(learning_rate, "sgd_l2")
  return optax.chain(
      penalty.add_l2_penalty(lam, groups),
      _momentum(momentum, nesterov),
      optax.scale_by_learning_rate(learning_rate),
  )


def spherical_sgd(learning_rate: optax.ScalarOrSchedule, groups: groups_lib.GroupsOrFn,
                  momentum: float = 0.0, nesterov: bool = False,
                  ungrouped_learning_rate: Optional[optax.ScalarOrSchedule] = None
                  ) -> optax.GradientTransformationExtraArgs:
  """SGD on the unit sphere for the grouped weights; plain SGD for the rest.

  Per grouped unit ``w`` (``||w|| = 1`` after the first step):

  .. math::

    g = \\|w\\|\\, \\nabla L(w) = \\nabla L(w / \\|w\\|), \\quad
    m \\leftarrow \\mu m + g, \\quad
    w \\leftarrow \\frac{\\hat w - \\eta m}{\\|\\hat w - \\eta m\\|},
    \\quad \\hat w = \\frac{w}{\\|w\\|}.

  The effective learning rate of every grouped unit is ``eta`` itself. The
  first two factors make training exactly independent of the initial scale of
  the grouped weights, momentum included: the gradient, the momentum buffer
  and the point stepped from are those at ``w/||w||`` from the very first step
  (a naive ``chain(sgd, project)`` would take its first step from ``a w`` with
  gradient ``grad L(w)/a``).

  Chain: ``scale_by_weight_norm(power=1)`` (gradient at ``w/||w||``),
  ``optax.trace`` (momentum), ``optax.scale_by_learning_rate``,
  ``project_to_sphere(radius=1)`` (last).

  Args:
    learning_rate: ``eta > 0``, float or schedule.
    groups: groups pytree, or a callable ``params -> groups``.
    momentum: heavy-ball momentum ``mu``.
    nesterov: Nesterov momentum.
    ungrouped_learning_rate: learning rate of the parameters outside the
      groups (norm scales and shifts, biases, the last layer); default
      ``learning_rate``. On the sphere ``eta`` is an angle per unit gradient,
      not the step size of an ordinary parameter, so the two are tuned apart:
      switching from ``sgd_l2`` at ``eta`` to ``spherical_sgd`` at the mapped
      ``eta_s`` (:func:`normreg.theory.spherical_learning_rate`) changes
      nothing else with ``ungrouped_learning_rate=eta``.

  References:
    van Laarhoven, 2017 (arXiv 1706.05350), sec. 4.
  """
  return optax.chain(
      rescale.scale_by_weight_norm(groups, power=1),
      _momentum(momentum, nesterov),
      _scale_by_learning_rates(learning_rate, ungrouped_learning_rate, groups,
                               "spherical_sgd"),
      sphere.project_to_sphere(groups, radius=1.0),
  )


def spherical_adam(learning_rate: optax.ScalarOrSchedule, groups: groups_lib.GroupsOrFn,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   eps_root: float = 0.0, mu_dtype: Optional[Any] = None,
                   ungrouped_learning_rate: Optional[optax.ScalarOrSchedule] = None
                   ) -> optax.GradientTransformationExtraArgs:
  """Adam on the unit sphere for the grouped weights; plain Adam for the rest.

  As :func:`spherical_sgd`, with ``optax.scale_by_adam`` in place of the
  momentum: the moments are built from ``grad L(w/||w||)``, the step is taken
  from ``w/||w||`` and the result is projected back to ``||w|| = 1``. The
  effective learning rate (step of the direction) is ``eta``, whereas with
  plain Adam it is ``eta/||w||`` (van Laarhoven 2017, sec. 3.3).

  Args:
    learning_rate: ``eta > 0``, float or schedule.
    groups: groups pytree, or a callable ``params -> groups``.
    b1, b2, eps, eps_root, mu_dtype: as in ``optax.adam``.
    ungrouped_learning_rate: as in :func:`spherical_sgd`.

  References:
    van Laarhoven, 2017; Kingma & Ba, 2015; Heo et al., *AdamP*, 2021.
  """
  return optax.chain(
      rescale.scale_by_weight_norm(groups, power=1),
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype),
      _scale_by_learning_rates(learning_rate, ungrouped_learning_rate, groups,
                               "spherical_adam"),
      sphere.project_to_sphere(groups, radius=1.0),
  )

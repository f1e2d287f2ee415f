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
from normreg import slicing
from normreg import sphere


def _check_lr(learning_rate: Any, caller: str) -> None:
  _checks.positive("learning_rate", learning_rate, caller)


@slicing.honours_slices
def scale_by_learning_rates(learning_rate: optax.ScalarOrSchedule,
                            groups: groups_lib.GroupsOrFn,
                            ungrouped_learning_rate: Optional[optax.ScalarOrSchedule] = None,
                            *, caller: str = "scale_by_learning_rates"
                            ) -> optax.GradientTransformation:
  """``-learning_rate`` on the grouped leaves, ``-ungrouped_learning_rate`` on the others.

  .. math::

    u_i \\leftarrow -\\eta_t\\, u_i \\ (\\text{grouped } w_i), \\qquad
    u_j \\leftarrow -\\eta^{u}_t\\, u_j \\ (\\text{otherwise}),

  ``optax.scale_by_learning_rate`` when ``ungrouped_learning_rate`` is ``None``
  (one rate for all); otherwise two of them under ``optax.masked`` with the
  masks :func:`normreg.as_mask` and its negation. Each rate is a float or an
  optax schedule of the step count.

  Args:
    learning_rate: ``eta > 0`` of the grouped (scale-invariant) weights.
    groups: groups pytree, or a callable ``params -> groups``.
    ungrouped_learning_rate: ``eta^u > 0`` of every other parameter;
      ``None``: ``learning_rate``.
    caller: name used in error messages.

  Examples:
    >>> import jax.numpy as jnp, normreg
    >>> params = {"kernel": jnp.ones((2, 2)), "scale": jnp.ones(2)}
    >>> tx = normreg.scale_by_learning_rates(0.1, {"kernel": normreg.UNIT, "scale": None},
    ...                                      ungrouped_learning_rate=0.5)
    >>> updates, _ = tx.update({"kernel": jnp.ones((2, 2)), "scale": jnp.ones(2)},
    ...                        tx.init(params))
    >>> round(float(updates["kernel"][0, 0]), 6), float(updates["scale"][0])
    (-0.1, -0.5)
  """
  _check_lr(learning_rate, caller)
  if ungrouped_learning_rate is None:
    return optax.scale_by_learning_rate(learning_rate)
  _checks.positive("ungrouped_learning_rate", ungrouped_learning_rate, caller)

  # Masks built from the updates optax.masked is given, matched by path: the groups may
  # use other containers (NNX Variable boxes) than the arrays an optimizer passes.
  def grouped(tree):
    return groups_lib.mask_like(groups, tree)

  def ungrouped(tree):
    return jax.tree.map(operator.not_, grouped(tree))

  return optax.chain(optax.masked(optax.scale_by_learning_rate(learning_rate), grouped),
                     optax.masked(optax.scale_by_learning_rate(ungrouped_learning_rate),
                                  ungrouped))


def _momentum(momentum: Any, nesterov: bool) -> optax.GradientTransformation:
  """``optax.trace``, or nothing for a literal 0 (an injected array keeps the trace)."""
  if isinstance(momentum, (int, float)) and momentum == 0:
    return optax.identity()
  return optax.trace(decay=momentum, nesterov=nesterov)


@slicing.honours_slices
def sgd_l2(learning_rate: optax.ScalarOrSchedule, lam: float, groups: groups_lib.GroupsOrFn,
           momentum: float = 0.0, nesterov: bool = False,
           ungrouped_learning_rate: Optional[optax.ScalarOrSchedule] = None
           ) -> optax.GradientTransformationExtraArgs:
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
    ungrouped_learning_rate: learning rate of the parameters outside the
      groups; default ``learning_rate``. With it, ``(eta, lam, w_0)`` and
      ``(c^2 eta, lam/c^2, c w_0)`` (``c w_0`` on the grouped weights, the
      same ``ungrouped_learning_rate``) train the same network at every step:
      ``lam`` alone has no effect (van Laarhoven 2017, sec. 3).

  Examples:
    >>> import jax.numpy as jnp, normreg
    >>> params = {"kernel": jnp.ones((3, 2)), "scale": jnp.ones(2)}
    >>> tx = normreg.sgd_l2(0.1, 0.5, {"kernel": normreg.UNIT, "scale": None}, momentum=0.9)
    >>> state = tx.init(params)
    >>> grads = {"kernel": jnp.zeros((3, 2)), "scale": jnp.ones(2)}
    >>> updates, state = tx.update(grads, state, params)  # -0.1 * (0 + 2 * 0.5 * 1)
    >>> round(float(updates["kernel"][0, 0]), 6), round(float(updates["scale"][0]), 6)
    (-0.1, -0.1)
    >>> updates, state = tx.update(grads, state, params)  # momentum: -0.1 * (0.9 + 1)
    >>> round(float(updates["kernel"][0, 0]), 6)
    -0.19

  References:
    van Laarhoven, 2017 (arXiv 1706.05350).
  """
  return groups_lib.checked_at_init("sgd_l2", groups, optax.chain(
      penalty.add_l2_penalty(lam, groups),
      _momentum(momentum, nesterov),
      scale_by_learning_rates(learning_rate, groups, ungrouped_learning_rate, caller="sgd_l2"),
  ))


@slicing.honours_slices
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
  and the point stepped from are those at ``w/||w||`` from the very first step.
  A naive ``chain(optax.sgd, project_to_sphere)`` also steps from ``w/||w||``,
  but its first gradient, taken at ``a w``, is ``grad L(w)/a``: that step is
  ``1/a`` times too short, and momentum carries the scaled gradient on.

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
  return groups_lib.checked_at_init("spherical_sgd", groups, optax.chain(
      rescale.scale_by_weight_norm(groups, power=1),
      _momentum(momentum, nesterov),
      scale_by_learning_rates(learning_rate, groups, ungrouped_learning_rate,
                              caller="spherical_sgd"),
      sphere.project_to_sphere(groups, radius=1.0),
  ))


@slicing.honours_slices
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
    b1: as in ``optax.adam``.
    b2: as in ``optax.adam``.
    eps: as in ``optax.adam``.
    eps_root: as in ``optax.adam``.
    mu_dtype: as in ``optax.adam``.
    ungrouped_learning_rate: as in :func:`spherical_sgd`.

  References:
    van Laarhoven, 2017; Kingma & Ba, 2015; Heo et al., *AdamP*, 2021.
  """
  return groups_lib.checked_at_init("spherical_adam", groups, optax.chain(
      rescale.scale_by_weight_norm(groups, power=1),
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype),
      scale_by_learning_rates(learning_rate, groups, ungrouped_learning_rate,
                              caller="spherical_adam"),
      sphere.project_to_sphere(groups, radius=1.0),
  ))

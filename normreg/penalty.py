"""The paper's coupled L2 penalty on scale-invariant weights.

Two conventions exist for "weight decay" and normreg names both:

- *coupled L2* (this module, the paper's and Keras' ``l2``): the loss gains
  ``lam * ||w||^2``, so the gradient gains ``2 * lam * w``; it then goes through
  the optimizer like the rest of the gradient (momentum, Adam's scaling).
- *decoupled weight decay* (PyTorch's ``weight_decay``, Loshchilov & Hutter
  2019): :func:`add_decayed_weights` adds ``wd * w`` to the update. Placed
  before ``optax.sgd``'s scaling it equals coupled L2 with ``lam = wd / 2`` for
  plain SGD; after Adam's scaling, as inside ``optax.adamw``, it is multiplied
  by the learning rate.

The second is optax's own ``optax.add_decayed_weights`` masked to the grouped
leaves (``mask=normreg.as_mask(groups)`` does the same where no leaf is grouped
per slice); :func:`add_decayed_weights` adds the per-slice groups of fused
kernels, whose slices a boolean mask cannot tell apart.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import optax

from normreg import _checks
from normreg import groups as groups_lib
from normreg import slicing


@slicing.honours_slices
def add_l2_penalty(lam: Any, groups: groups_lib.GroupsOrFn) -> optax.GradientTransformationExtraArgs:
  """Adds the gradient of ``lam * ||w||^2`` on the grouped weights (coupled L2).

  .. math::

    u_i \\leftarrow u_i + 2 \\lambda w_i \\quad \\text{for grouped } w_i, \\qquad
    u_j \\leftarrow u_j \\quad \\text{otherwise},

  where ``u`` is the incoming update (normally the gradient of the data loss),
  ``w`` the params and ``lambda`` (``lam``) the coefficient of the penalty
  ``lam * ||w||^2`` (the paper's convention, eq. 2; Keras ``l2(lam)``). The
  coefficient of ``w`` in the gradient is ``lam_wd = 2 * lam``.

  For weights that feed a normalization the penalty does not regularize the
  function (``L_lam(a w) = L_{lam a^2}(w)``); it sets ``||w||`` and with it the
  effective learning rate (van Laarhoven 2017, sec. 3). Norm scales and
  shifts and the last layer are ungrouped and left alone, as in the paper.

  Args:
    lam: penalty coefficient ``lambda >= 0`` (float or scalar array; schedule it
      with ``optax.inject_hyperparams``).
    groups: groups pytree, or a callable ``params -> groups``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with empty state; it needs
    ``params`` in ``update``.

  Examples:
    >>> import jax.numpy as jnp, optax, normreg
    >>> params = {"kernel": jnp.ones((2, 2)), "scale": jnp.ones(2)}
    >>> groups = {"kernel": normreg.UNIT, "scale": None}
    >>> tx = optax.chain(normreg.add_l2_penalty(1e-2, groups), optax.sgd(0.1))
    >>> grads = {"kernel": jnp.zeros((2, 2)), "scale": jnp.zeros(2)}
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> round(float(updates["kernel"][0, 0]), 6), float(updates["scale"][0])  # -0.1 * 2 * 1e-2
    (-0.002, -0.0)

  References:
    van Laarhoven, 2017 (arXiv 1706.05350), eq. 2 and sec. 3.
  """
  _checks.non_negative("lam", lam, "add_l2_penalty")

  return groups_lib.stateless_on_groups(
      "add_l2_penalty", groups,
      lambda _, u, w: u + jnp.asarray(2 * lam, u.dtype) * w.astype(u.dtype))


@slicing.honours_slices
def add_decayed_weights(weight_decay: Any,
                        groups: groups_lib.GroupsOrFn) -> optax.GradientTransformationExtraArgs:
  """Adds ``weight_decay * w`` to the update of the grouped weights (decoupled decay).

  .. math::

    u_i \\leftarrow u_i + \\mathrm{wd}\\, w_i \\quad \\text{for grouped } w_i, \\qquad
    u_j \\leftarrow u_j \\quad \\text{otherwise},

  optax's (and PyTorch's) convention: ``optax.add_decayed_weights(wd, mask)`` with the
  mask of the groups, on which it is built. Per-slice groups
  (:func:`normreg.sliced`) decay only their grouped slices: AdamW that decays exactly
  the scale-invariant weights of a fused q/k/v kernel is
  ``optax.chain(optax.scale_by_adam(), add_decayed_weights(wd, groups),
  optax.scale_by_learning_rate(lr))``.

  Args:
    weight_decay: ``wd >= 0`` (float or scalar array).
    groups: groups pytree, or a callable ``params -> groups``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with empty state; it needs ``params``.

  Examples:
    >>> import jax.numpy as jnp, optax, normreg
    >>> params = {"gate_up": jnp.ones((2, 3, 4))}
    >>> groups = {"gate_up": normreg.sliced(None, normreg.TENSOR)}  # the gate: not invariant
    >>> tx = normreg.add_decayed_weights(0.5, groups)
    >>> updates, _ = tx.update({"gate_up": jnp.zeros((2, 3, 4))}, tx.init(params), params)
    >>> updates["gate_up"][:, 0, 0].tolist()
    [0.0, 0.5]

  References:
    Loshchilov & Hutter, *Decoupled weight decay regularization*, 2019.
  """
  _checks.non_negative("weight_decay", weight_decay, "add_decayed_weights")
  return groups_lib.checked_at_init("add_decayed_weights", groups, optax.add_decayed_weights(
      weight_decay, mask=lambda params: groups_lib.mask_like(groups, params)))

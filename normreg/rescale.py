"""Effective-learning-rate rescaling: step the direction of ``w`` at a fixed rate.

For a weight whose function is scale-invariant, SGD turns the direction
``w/||w||`` with effective learning rate ``eta/||w||^2`` and Adam with
``eta/||w||`` (see :mod:`normreg.metrics`). Multiplying each unit's update by
``||w||**power`` cancels that dependence: the direction then moves as it would
at ``||w|| = 1``, whatever the norm has drifted to, and the whole trajectory is
equivariant to the scale of the weights (``w0 -> a w0`` gives ``w_t -> a w_t``).
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from normreg import groups as groups_lib
from normreg import reductions
from normreg import slicing


@slicing.honours_slices
def scale_by_weight_norm(groups: groups_lib.GroupsOrFn,
                         power: float = 2) -> optax.GradientTransformationExtraArgs:
  """Multiplies each unit's (or tensor's) update by ``||w||**power``.

  .. math::

    u_i \\leftarrow \\|w_i\\|^{p}\\, u_i,

  with ``w_i`` a group: a unit of a UNIT leaf (a slice along the last axis, the
  norm over all other axes), a whole TENSOR leaf, per copy for stacked groups,
  over all members of a joint group; ``p`` is the ``power``. Ungrouped leaves
  pass through.

  Placement:

  - SGD, ``power=2``: anywhere in ``optax.chain(scale_by_weight_norm(g), optax.sgd(lr, m))``;
    since ``grad L(a w) = grad L(w)/a``, the step from ``a w`` is exactly ``a``
    times the step from ``w`` and ``eta/||w||^2`` is replaced by ``eta``.
  - Adam, ``power=1``: after the Adam scaling,
    ``optax.chain(optax.adam(lr), scale_by_weight_norm(g, power=1))``.
  - ``power=1`` on the raw gradient turns ``grad L(w)`` into
    ``grad L(w/||w||)``, the gradient at the point on the unit sphere; the
    spherical optimizers start with that (:mod:`normreg.optimizers`).

  Args:
    groups: groups pytree, or a callable ``params -> groups``.
    power: exponent ``p`` (2 for SGD, 1 for Adam).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with empty state; it needs
    ``params`` in ``update``.

  Examples:
    >>> import jax.numpy as jnp, optax, normreg
    >>> params = {"kernel": jnp.array([[3.], [4.]])}
    >>> tx = normreg.scale_by_weight_norm({"kernel": normreg.UNIT}, power=2)
    >>> updates, _ = tx.update({"kernel": jnp.ones((2, 1))}, tx.init(params), params)
    >>> updates["kernel"].ravel()
    Array([25., 25.], dtype=float32)

  References:
    van Laarhoven, 2017 (arXiv 1706.05350), sec. 3; Hoffer et al., 2018.
  """

  def rescale(resolved, updates, params):
    norms = reductions.norms(resolved, params)

    def one(path, group, u, w):
      factor = reductions.expand(group, norms[path] ** jnp.asarray(power, norms[path].dtype),
                                 u.shape)
      return (u.astype(factor.dtype) * factor).astype(u.dtype)

    return reductions.map_groups(one, resolved, updates, params)

  return groups_lib.transform_on_groups("scale_by_weight_norm", groups, rescale)

"""Keeping scale-invariant weights on a sphere: projection and tangent updates.

Forcing ``||w|| = r`` after every step fixes the effective learning rate of a
scale-invariant weight at ``eta / r^2`` (SGD) and removes the L2 coefficient
from the recipe (van Laarhoven 2017, sec. 4). Two transforms:

- :func:`tangent_projection` removes the radial part of an update, so that a
  step moves ``w`` along the sphere to first order;
- :func:`project_to_sphere` puts each unit back on the sphere after the step.
  It rewrites params, so it emits ``new_params - params`` as its update and
  must be the **last** transform of a chain.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Union

import jax.numpy as jnp
import optax

from normreg import _checks
from normreg import groups as groups_lib
from normreg import reductions
from normreg import slicing


class ProjectToSphereState(NamedTuple):
  """State of :func:`project_to_sphere`.

  Attributes:
    radius: with ``radius="init"``, ``{path: initial norm}`` for every grouped
      leaf, one value per group (shape ``(out,)`` for UNIT, ``()`` for TENSOR,
      stack axes first; joint members hold the joint norm); otherwise ``None``.
  """

  radius: Any


@slicing.honours_slices
def project_to_sphere(groups: groups_lib.GroupsOrFn,
                      radius: Union[float, str] = 1.0) -> optax.GradientTransformationExtraArgs:
  """Puts each grouped unit (or tensor) back on the sphere after the step.

  With ``w`` the params, ``u`` the incoming update and ``r`` the radius, per
  group (a unit of a UNIT leaf, a TENSOR leaf, per copy with stack axes, over
  all members of a joint group):

  .. math::

    \\hat w = r\\, \\frac{w}{\\|w\\|}, \\qquad
    w' = r\\, \\frac{\\hat w + u}{\\|\\hat w + u\\|}, \\qquad
    u \\leftarrow w' - w .

  The update is applied at ``w_hat``, the point of the sphere in the direction
  of ``w``: once ``w`` is on the sphere (after the first step) ``w_hat = w``; on
  the first step it makes the result independent of the initial scale of
  ``w``, which is what makes spherical training scale-invariant from step 0.
  Ungrouped leaves pass their update through unchanged.

  **Must be the last transform of a chain**: it computes where the params end
  up, so any transform after it would move them off the sphere.
  ``optax.apply_updates`` then gives ``w'`` up to one rounding.

  Args:
    groups: groups pytree, or a callable ``params -> groups``.
    radius: ``r > 0``, or ``"init"`` to keep each unit at the norm it had when
      ``init`` was called (stored in the state). A unit that is zero at init
      stays at zero with ``"init"``; with a number ``r`` a zero unit has no
      direction (``w_hat = 0``, its norm floored as ``optax.safe_norm``) and
      goes to ``r u / ||u||``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; it needs ``params``.

  Examples:
    >>> import jax.numpy as jnp, optax, normreg
    >>> params = {"kernel": jnp.array([[3.], [4.]])}
    >>> tx = optax.chain(optax.sgd(0.1), normreg.project_to_sphere({"kernel": normreg.UNIT}))
    >>> updates, _ = tx.update({"kernel": jnp.array([[1.], [0.]])}, tx.init(params), params)
    >>> new = optax.apply_updates(params, updates)
    >>> round(float(jnp.linalg.norm(new["kernel"])), 6)
    1.0

  References:
    van Laarhoven, 2017 (arXiv 1706.05350), sec. 4; Salimans & Kingma, 2016.
  """
  use_init = isinstance(radius, str)
  if use_init and radius != "init":
    raise ValueError(f"project_to_sphere: radius must be a positive number or 'init', "
                     f"got {radius!r}.")
  if not use_init:
    _checks.positive("radius", radius, "project_to_sphere")

  def init_fn(params):
    resolved = groups_lib.resolve_at_init(groups, params, "project_to_sphere")
    if not use_init:
      return ProjectToSphereState(radius=None)
    return ProjectToSphereState(radius=reductions.norms(resolved, params))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    _checks.require_params(params, "project_to_sphere")
    resolved = groups_lib.resolve(groups, params, "project_to_sphere")
    old_norms = reductions.norms(resolved, params)

    def r(path):
      return state.radius[path] if use_init else jnp.asarray(radius, old_norms[path].dtype)

    def step(path, group, u, w):
      # w_hat = r w/||w|| on the sphere, then one step from there.
      w = w.astype(reductions.compute_dtype(w.dtype))
      return w * reductions.expand(group, r(path) / old_norms[path], w.shape) + u.astype(w.dtype)

    stepped = reductions.map_groups(step, resolved, updates, params)
    new_norms = reductions.norms(resolved, stepped)

    def project(path, group, u, new, w):
      new = new * reductions.expand(group, r(path) / new_norms[path], new.shape)
      return (new - w.astype(new.dtype)).astype(u.dtype)

    return reductions.map_groups(project, resolved, updates, stepped, params), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@slicing.honours_slices
def tangent_projection(groups: groups_lib.GroupsOrFn) -> optax.GradientTransformationExtraArgs:
  """Removes the radial component of each unit's update (the part along ``w``).

  .. math::

    u_i \\leftarrow u_i - \\frac{\\langle u_i, w_i \\rangle}{\\|w_i\\|^2}\\, w_i

  per group (unit, tensor, copy, joint group). For a scale-invariant weight the
  data gradient is already tangent (``<w, grad L(w)> = 0``); what this removes
  is the radial part that L2 penalties, momentum carried over from earlier
  points, or Adam's per-coordinate scaling add (as in AdamP, Heo et al. 2021).

  Args:
    groups: groups pytree, or a callable ``params -> groups``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with empty state; it needs
    ``params``.

  Examples:
    >>> import jax.numpy as jnp, normreg
    >>> params = {"w": jnp.array([1., 0.])}
    >>> tx = normreg.tangent_projection({"w": normreg.TENSOR})
    >>> updates, _ = tx.update({"w": jnp.array([3., 4.])}, tx.init(params), params)
    >>> updates["w"]
    Array([0., 4.], dtype=float32)

  References:
    Heo et al., *AdamP*, 2021 (arXiv 2006.08217); van Laarhoven, 2017.
  """

  return groups_lib.transform_on_groups(
      "tangent_projection", groups,
      lambda resolved, updates, params: reductions.tangential(resolved, updates, params))

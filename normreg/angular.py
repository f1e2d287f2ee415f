"""Angular-update optimizers: control the *direction* of scale-invariant weights.

The paper's insight (the norm of a scale-invariant weight only sets its
effective learning rate) has grown into a family of optimizers that steer the
rotation of each group instead of its norm. Their public code is PyTorch (or one
LLM trainer's), guesses which weights are invariant (a cosine threshold, or
``ndim > 1``) and reduces over axis 0. Here each is an
``optax.GradientTransformationExtraArgs`` on the exact groups of
:mod:`normreg.groups` (per unit, per tensor, per copy of stack axes, over joint
groups), written from the papers' equations. Notation, per group ``w``:
``u`` the incoming update, ``g`` the gradient, ``eta`` the learning rate,
``u_perp = u - <u, w_hat> w_hat`` its tangent part, ``r_0`` the norm at ``init``.

- :func:`rotational` (Kosson, Messmer & Jaggi, *Rotational Equilibrium*, ICML
  2024): wraps any optimizer; each group keeps ``||w|| = r_0`` and turns by a
  target angle per step from the first step on.
- :func:`adamp`, :func:`sgdp` (Heo et al., ICLR 2021): the radial part of the
  step removed, weight decay times ``wd_ratio``, on the grouped weights; their
  cosine heuristic is an option (:func:`cosine_groups`).
- :func:`nero` (Liu et al., ICML 2021): per-group relative steps normalized by a
  running average of the gradient norm, groups kept zero-mean and at unit norm.
- :func:`adamh` (Hyperball Adam, Wen et al. 2025, the levanter trainer): the
  Adam step normalized and scaled by ``r_0``, then back to norm ``r_0``.
- :func:`add_corrected_decayed_weights` (Defazio 2025): decoupled decay scaled
  by ``eta_t / eta_max``, so that the equilibrium survives a decaying schedule.

The angles these reach at equilibrium are in :mod:`normreg.theory`.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from normreg import _checks
from normreg import groups as groups_lib
from normreg import reductions

ScalarOrSchedule = optax.ScalarOrSchedule


def _value(x: ScalarOrSchedule, count: jax.Array) -> jax.Array:
  return jnp.asarray(x(count) if callable(x) else x, jnp.float32)


def _bias_corrected(avg: jax.Array, decay: float, count: jax.Array) -> jax.Array:
  return avg / (1 - jnp.asarray(decay, jnp.float32) ** count.astype(jnp.float32))


# ---------------------------------------------------------------- rotational wrapper


class RotationalState(NamedTuple):
  """State of :func:`rotational`.

  Attributes:
    inner: the wrapped optimizer's state.
    count: steps taken (int32).
    rms: ``{path: running mean of ||u_perp||^2}`` per group.
    radius: ``{path: r_0}``, each group's norm at ``init``.
  """
  inner: Any
  count: jax.Array
  rms: Any
  radius: Any


def rotational(inner: optax.GradientTransformation, groups: groups_lib.GroupsOrFn,
               target_angle: ScalarOrSchedule, decay: float = 0.99,
               eps: float = 1e-30) -> optax.GradientTransformationExtraArgs:
  """Rotational variant of ``inner``: each group turns by ``target_angle`` per step.

  Per group, with ``u`` the update of ``inner`` (its learning rate included) and
  ``theta_t`` the target angle (a float or a schedule of the step count):

  .. math::

    u_\\perp = u - \\langle u, \\hat w\\rangle \\hat w, \\quad
    \\nu_t = \\beta \\nu_{t-1} + (1-\\beta) \\|u_\\perp\\|^2, \\quad
    \\hat\\nu_t = \\nu_t / (1 - \\beta^t),

  .. math::

    w' = w + \\theta_t\\, r_0\\, u_\\perp / \\sqrt{\\hat\\nu_t}, \\qquad
    w \\leftarrow r_0\\, w' / \\|w'\\| ,

  so ``||w||`` stays at its initial ``r_0`` and the expected angle of a step is
  ``theta_t`` from the first step on (``nu_1 = ||u_perp||^2``), with no warm-up
  to an equilibrium (Kosson et al. 2024, sec. 5). Ungrouped leaves get ``u``.
  A unit that is zero at init has ``r_0 = 0`` and stays at zero. Choose ``target_angle`` as the equilibrium angle of the recipe it replaces
  (:func:`normreg.theory.equilibrium_angle_sgd`,
  :func:`normreg.theory.equilibrium_angle_adamw`). **Last in a chain** (it
  computes where the grouped params end up).

  Args:
    inner: the optimizer whose direction is used, without weight decay on the
      grouped weights (``optax.sgd(lr, momentum)``, ``optax.adam(lr)``, ...).
    groups: groups pytree, or a callable ``params -> groups``.
    target_angle: radians per step, a float or an optax schedule.
    decay: ``beta`` of the running mean of ``||u_perp||^2``.
    eps: floor under ``nu_hat``.

  Example:

    >>> import jax.numpy as jnp, optax, normreg
    >>> params = {"w": jnp.array([3., 4.])}
    >>> tx = normreg.rotational(optax.sgd(0.1), {"w": normreg.TENSOR}, target_angle=0.01)
    >>> u, _ = tx.update({"w": jnp.array([1., 0.])}, tx.init(params), params)
    >>> new = params["w"] + u["w"]
    >>> float(jnp.linalg.norm(new))  # the norm is kept
    5.0
    >>> angle = normreg.angular_update(params, {"w": new}, {"w": normreg.TENSOR})["w"]
    >>> round(float(angle), 5)  # the turn is the target (arctan of it, exactly)
    0.01

  References:
    Kosson, Messmer & Jaggi, *Rotational Equilibrium: How Weight Decay Balances
    Learning Across Neural Networks*, ICML 2024 (arXiv 2305.17212).
  """
  _checks.non_negative("target_angle", target_angle, "rotational")

  def init_fn(params):
    resolved = groups_lib.resolve(groups, params, "rotational")
    radius = reductions.norms(resolved, params)
    return RotationalState(inner.init(params), jnp.zeros([], jnp.int32),
                           {p: jnp.zeros_like(r) for p, r in radius.items()}, radius)

  def update_fn(updates, state, params=None, **extra_args):
    _checks.require_params(params, "rotational")
    resolved = groups_lib.resolve(groups, params, "rotational")
    inner_updates, inner_state = inner.update(updates, state.inner, params, **extra_args)
    count = state.count + 1
    tangent = reductions.tangential(resolved, inner_updates, params)
    sq = reductions.group_sums(resolved, jnp.square, tangent)
    rms = {p: decay * state.rms[p] + (1 - decay) * sq[p] for p in sq}
    theta = _value(target_angle, state.count)

    def step(path, group, u, w):
      scale = theta * state.radius[path] / jnp.sqrt(
          jnp.maximum(_bias_corrected(rms[path], decay, count), eps))
      w32 = w.astype(reductions.compute_dtype(w.dtype))
      return w32 + reductions.expand(group, scale, w.shape) * u.astype(w32.dtype)

    stepped = reductions.map_groups(step, resolved, tangent, params)
    projected = reductions.project_to_radius(resolved, stepped, state.radius)
    out = reductions.map_groups(lambda p, g, u, new, w: (new - w.astype(new.dtype)).astype(
        u.dtype), resolved, inner_updates, projected, params)
    return out, RotationalState(inner_state, count, rms, state.radius)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------------- AdamP, SGDP


def cosine_groups(grads: Any, params: Any, delta: float = 0.1,
                  eps: float = 1e-8) -> Any:
  """AdamP's heuristic (Heo et al. 2021): which leaves it would treat as scale-invariant.

  For a leaf with ``ndim > 1``: ``UNIT`` if ``max_units |cos(g, w)| < delta /
  sqrt(unit size)`` (a unit is a slice along the LAST axis here, Flax's output
  axis; the PyTorch code uses axis 0), else ``TENSOR`` if ``|cos(g, w)| < delta /
  sqrt(size)`` over the whole leaf, else not. Decided from values, so it must run
  on concrete arrays (not under ``jit``). Returns a groups pytree to compare
  with the exact groups.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top

  def decide(g, w):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    if w.ndim <= 1:
      return None
    axes = tuple(range(w.ndim - 1))
    cos_units = np.abs(np.sum(g * w, axes)) / np.maximum(
        np.sqrt(np.sum(g * g, axes) * np.sum(w * w, axes)), eps)
    if cos_units.max() < delta / np.sqrt(np.prod(w.shape[:-1])):
      return groups_lib.UNIT
    cos = abs(np.sum(g * w)) / max(np.sqrt(np.sum(g * g) * np.sum(w * w)), eps)
    return groups_lib.TENSOR if cos < delta / np.sqrt(w.size) else None

  return jax.tree.map(decide, grads, params)


def _cosine_projection(u: jax.Array, g: jax.Array, w: jax.Array, delta: float, eps: float
                       ) -> tuple[jax.Array, jax.Array]:
  """AdamP's heuristic under ``jit``: ``(u with its radial part removed per unit, per
  tensor or not at all, whether it was)`` for one leaf (Flax layout)."""
  w32, u32, g32 = (x.astype(reductions.compute_dtype(w.dtype)) for x in (w, u, g))
  axes = tuple(range(w.ndim - 1))

  def cos(a, b, ax):
    return jnp.abs(jnp.sum(a * b, ax, keepdims=True)) / jnp.maximum(
        jnp.sqrt(jnp.sum(a * a, ax, keepdims=True) * jnp.sum(b * b, ax, keepdims=True)), eps)

  def project(ax):
    n = w32 / jnp.maximum(jnp.sqrt(jnp.sum(w32 * w32, ax, keepdims=True)), eps)
    return u32 - n * jnp.sum(n * u32, ax, keepdims=True)

  per_unit = jnp.max(cos(g32, w32, axes)) < delta / jnp.sqrt(float(max(1, w.size // w.shape[-1])))
  per_layer = jnp.max(cos(g32, w32, None)) < delta / jnp.sqrt(float(w.size))
  out = jnp.where(per_unit, project(axes), jnp.where(per_layer, project(None), u32))
  return out.astype(u.dtype), per_unit | per_layer


def _projected_decayed(caller: str, direction: optax.GradientTransformation,
                       learning_rate: ScalarOrSchedule, groups: groups_lib.GroupsOrFn,
                       decay: float, wd_ratio: float, heuristic: bool, delta: float,
                       eps: float) -> optax.GradientTransformationExtraArgs:
  """``-lr * (d_perp + decay * wd_ratio * w)`` on the grouped (or cosine-picked) leaves,
  ``-lr * d`` elsewhere, with ``d`` the update of ``direction`` (AdamP/SGDP's step)."""
  _checks.positive("learning_rate", learning_rate, caller)
  _checks.non_negative("weight_decay", decay, caller)

  def init_fn(params):
    if not heuristic:
      groups_lib.resolve(groups, params, caller)
    return (direction.init(params), jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    _checks.require_params(params, caller)
    inner_state, count = state
    d, inner_state = direction.update(updates, inner_state, params)
    lr = _value(learning_rate, count)
    masked = groups_lib._leaf_or_masked
    if heuristic:
      def one(u, g, w):
        if masked(u):
          return u
        if w.ndim <= 1:  # never projected, fully decayed (AdamP's code: wd_ratio 1)
          return (-lr * (u + decay * w.astype(u.dtype))).astype(u.dtype)
        u_perp, chosen = _cosine_projection(u, g, w, delta, eps)
        factor = jnp.where(chosen, wd_ratio, 1.0) * decay
        return (-lr * (u_perp + factor * w.astype(u_perp.dtype))).astype(u.dtype)

      out = jax.tree.map(one, d, updates, params, is_leaf=masked)
    else:
      resolved = groups_lib.resolve(groups, params, caller)
      d_perp = reductions.tangential(resolved, d, params)  # ungrouped leaves pass through

      def one(path, u, w):
        if masked(u):
          return u
        if groups_lib.path_str(path) in resolved.by_path:
          return (-lr * (u + decay * wd_ratio * w.astype(u.dtype))).astype(u.dtype)
        return (-lr * u).astype(u.dtype)

      out = jax.tree_util.tree_map_with_path(one, d_perp, params, is_leaf=masked)
    return out, (inner_state, count + 1)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def adamp(learning_rate: ScalarOrSchedule, groups: groups_lib.GroupsOrFn,
          b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 0.0, wd_ratio: float = 0.1, nesterov: bool = False,
          heuristic: bool = False, delta: float = 0.1) -> optax.GradientTransformationExtraArgs:
  """AdamP: Adam with the radial part of its step removed on scale-invariant weights.

  With ``m_hat, v_hat`` Adam's bias-corrected moments of the gradient and
  ``d = m_hat / (sqrt(v_hat) + eps)``, per group of a grouped leaf:

  .. math::

    w \\leftarrow w - \\eta\\,\\big(d - \\langle d, \\hat w\\rangle \\hat w
    + \\lambda\\, r\\, w\\big),

  with ``lambda`` the ``weight_decay`` and ``r`` the ``wd_ratio`` (the decay is
  decoupled and multiplied by ``eta``, as AdamW's); ungrouped leaves take the
  plain Adam step ``-eta d`` and no decay. Removing the radial part stops the
  norm growth that momentum adds (Heo et al. 2021, sec. 3); the equilibrium
  angle is ``sqrt(2 eta lambda r)`` (:func:`normreg.theory.equilibrium_angle_adamp`).
  With ``heuristic=True`` the grouped leaves are those the paper's cosine test
  picks at every step (:func:`cosine_groups`, among leaves with ``ndim > 1``),
  every other leaf (1-D ones too) gets the full decay ``lambda``, as in the
  paper's code, and ``groups`` is ignored: mask the leaves that should not
  decay with ``optax.masked``.

  Args:
    learning_rate: ``eta > 0``, float or schedule.
    groups: groups pytree, or a callable ``params -> groups``.
    b1, b2, eps: as in ``optax.adam``; ``nesterov``: optax's NAdam form.
    weight_decay: ``lambda >= 0`` on the grouped weights.
    wd_ratio: ``r``, the fraction of the decay the projected weights get.
    heuristic: use the cosine test instead of ``groups``.
    delta: the cosine test's threshold.

  References:
    Heo et al., *AdamP: Slowing Down the Slowdown for Momentum Optimizers on
    Scale-invariant Weights*, ICLR 2021 (arXiv 2006.08217).
  """
  return _projected_decayed("adamp", optax.scale_by_adam(b1, b2, eps, nesterov=nesterov),
                            learning_rate, groups, weight_decay, wd_ratio, heuristic, delta,
                            eps)


def sgdp(learning_rate: ScalarOrSchedule, groups: groups_lib.GroupsOrFn,
         momentum: float = 0.9, nesterov: bool = False, weight_decay: float = 0.0,
         wd_ratio: float = 0.1, heuristic: bool = False, delta: float = 0.1,
         eps: float = 1e-8) -> optax.GradientTransformationExtraArgs:
  """SGDP: SGD with heavy-ball momentum, the radial part of its step removed.

  With ``m <- mu m + g`` and ``d = m`` (or ``g + mu m``, Nesterov):

  .. math::

    w \\leftarrow w - \\eta\\,\\Big(d - \\langle d, \\hat w\\rangle \\hat w
    + \\frac{\\lambda\\, r}{1-\\mu}\\, w\\Big)

  on grouped leaves (the paper divides the decay by ``1 - mu``); ``-eta d``
  elsewhere. Equilibrium angle ``sqrt(2 eta lambda r / (1-mu))``
  (:func:`normreg.theory.equilibrium_angle_sgdp`). Arguments as :func:`adamp`.

  References:
    Heo et al., ICLR 2021 (arXiv 2006.08217), Algorithm 1 (SGDP).
  """
  _checks.non_negative("momentum", momentum, "sgdp")
  trace = optax.trace(momentum, nesterov=nesterov) if momentum else optax.identity()
  return _projected_decayed("sgdp", trace, learning_rate, groups,
                            weight_decay / (1 - momentum), wd_ratio, heuristic, delta, eps)


# ---------------------------------------------------------------------------- Nero


class NeroState(NamedTuple):
  """State of :func:`nero`: step count, running mean of the squared gradient norm per
  group (grouped leaves) or per element (the others), and the others' scale."""
  count: jax.Array
  grouped: Any
  ungrouped: Any
  scale: Any


def nero(learning_rate: ScalarOrSchedule, groups: groups_lib.GroupsOrFn,
         b2: float = 0.999, eps: float = 1e-8,
         min_scale: float = 1e-2) -> optax.GradientTransformationExtraArgs:
  """Nero (the neuronal rotator): per-group relative steps on balanced groups.

  Per group ``w`` of a grouped leaf (a neuron, per unit; a tensor or copy otherwise):

  .. math::

    \\bar g^2_t = \\beta \\bar g^2_{t-1} + (1-\\beta)\\|g\\|^2, \\quad
    w' = w - \\eta\\, \\|w\\|\\, \\frac{g}{\\sqrt{\\bar g^2_t / (1-\\beta^t)}}, \\quad
    w \\leftarrow \\frac{w' - \\mathrm{mean}(w')}{\\|w' - \\mathrm{mean}(w')\\|},

  so every group stays zero-mean at unit norm and turns by about ``eta`` per
  step. Ungrouped leaves (gains, biases, the last layer) take per element
  ``b <- b - eta sigma g / sqrt(bar g^2 / (1-beta^t))``, ``sigma`` their RMS at
  ``init`` (at least ``min_scale``), as the paper's biases. No momentum, no weight
  decay. Written from the paper (its reference code's licence forbids copying).

  Args:
    learning_rate: ``eta > 0`` (the paper's default 0.01), float or schedule.
    groups: groups pytree, or a callable ``params -> groups``.
    b2: ``beta`` (0.999 in the paper).
    eps: floor under the normalizer.
    min_scale: the least ``sigma`` of an ungrouped leaf (an all-zero bias at init).

  References:
    Liu, Bernstein, Meister & Yue, *Learning by Turning: Neural Architecture
    Aware Optimisation*, ICML 2021 (arXiv 2102.07227), Algorithm 1.
  """
  _checks.positive("learning_rate", learning_rate, "nero")

  def init_fn(params):
    resolved = groups_lib.resolve(groups, params, "nero")
    grouped = {p: jnp.zeros_like(n) for p, n in reductions.norms(resolved, params).items()}

    def free(path, w):  # an ungrouped array leaf (not a None / optax.MaskedNode)
      return not (groups_lib._leaf_or_masked(w) or groups_lib.path_str(path) in resolved.by_path)

    ungrouped = jax.tree_util.tree_map_with_path(
        lambda path, w: jnp.zeros(w.shape, jnp.float32) if free(path, w) else None,
        params, is_leaf=groups_lib._leaf_or_masked)
    scale = jax.tree_util.tree_map_with_path(
        lambda path, w: jnp.maximum(jnp.sqrt(jnp.mean(jnp.square(w.astype(jnp.float32)))),
                                    min_scale) if free(path, w) else None,
        params, is_leaf=groups_lib._leaf_or_masked)
    return NeroState(jnp.zeros([], jnp.int32), grouped, ungrouped, scale)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    _checks.require_params(params, "nero")
    resolved = groups_lib.resolve(groups, params, "nero")
    count = state.count + 1
    lr = _value(learning_rate, state.count)
    sq = reductions.group_sums(resolved, jnp.square, updates)
    grouped = {p: b2 * state.grouped[p] + (1 - b2) * sq[p] for p in sq}
    norms = reductions.norms(resolved, params)

    def relative(path, group, g, w):
      denom = jnp.sqrt(jnp.maximum(_bias_corrected(grouped[path], b2, count), eps ** 2))
      w32 = w.astype(reductions.compute_dtype(w.dtype))
      return w32 - lr * reductions.expand(group, norms[path] / denom, w.shape) * g.astype(
          w32.dtype)

    stepped = reductions.map_groups(relative, resolved, updates, params)
    means = reductions.group_means(resolved, stepped)
    centered = reductions.map_groups(
        lambda p, g, x: x - reductions.expand(g, means[p], x.shape), resolved, stepped)
    balanced = reductions.project_to_radius(
        resolved, centered, {p: jnp.ones_like(m) for p, m in means.items()})

    def others(v, g):
      if v is None or groups_lib._leaf_or_masked(g):
        return v
      return b2 * v + (1 - b2) * jnp.square(g.astype(jnp.float32))

    ungrouped = jax.tree.map(others, state.ungrouped, updates,
                             is_leaf=lambda x: x is None)

    def out(path, g, new, w, v, s):
      if groups_lib._leaf_or_masked(g):
        return g
      if groups_lib.path_str(path) in resolved.by_path:
        return (new - w.astype(new.dtype)).astype(g.dtype)
      step = lr * s * g.astype(jnp.float32) / jnp.sqrt(
          jnp.maximum(_bias_corrected(v, b2, count), eps ** 2))
      return (-step).astype(g.dtype)

    result = jax.tree_util.tree_map_with_path(
        out, updates, balanced, params, ungrouped, state.scale,
        is_leaf=groups_lib._leaf_or_masked)
    return result, NeroState(count, grouped, ungrouped, state.scale)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------- Hyperball Adam


class HyperballState(NamedTuple):
  """State of :func:`adamh`: Adam's state, the step count and ``{path: r_0}``."""
  adam: Any
  count: jax.Array
  radius: Any


def adamh(learning_rate: ScalarOrSchedule, groups: groups_lib.GroupsOrFn,
          b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          ungrouped_learning_rate: Optional[ScalarOrSchedule] = None
          ) -> optax.GradientTransformationExtraArgs:
  """Hyperball Adam (AdamH): the Adam step normalized, scaled by ``r_0``, on the sphere.

  With ``u`` Adam's step (``m_hat/(sqrt(v_hat)+eps)``) and ``r_0`` the group's norm
  at ``init``, per group of a grouped leaf:

  .. math::

    w' = w - \\eta\\, r_0\\, \\frac{u}{\\|u\\|}, \\qquad
    w \\leftarrow r_0\\, \\frac{w'}{\\|w'\\|},

  so the norm never moves and each step turns the group by about ``eta`` (at
  most ``arctan(eta)``, the radial part of ``u`` does not turn it). Ungrouped
  leaves take plain Adam at ``ungrouped_learning_rate`` (default ``eta``). The
  levanter trainer applies it per weight matrix; here per group.

  References:
    Wen, Dang, Lyu, Ma & Liang, *Fantastic Pretraining Optimizers and Where to
    Find Them 2.1: Hyperball Optimization* (2025), and levanter's ``AdamHConfig``.
  """
  _checks.positive("learning_rate", learning_rate, "adamh")
  adam = optax.scale_by_adam(b1, b2, eps)
  other_lr = learning_rate if ungrouped_learning_rate is None else ungrouped_learning_rate

  def init_fn(params):
    resolved = groups_lib.resolve(groups, params, "adamh")
    return HyperballState(adam.init(params), jnp.zeros([], jnp.int32),
                          reductions.norms(resolved, params))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    _checks.require_params(params, "adamh")
    resolved = groups_lib.resolve(groups, params, "adamh")
    u, adam_state = adam.update(updates, state.adam, params)
    lr = _value(learning_rate, state.count)
    norms = reductions.norms(resolved, u)

    def step(path, group, d, w):
      w32 = w.astype(reductions.compute_dtype(w.dtype))
      scale = lr * state.radius[path] / norms[path]
      return w32 - reductions.expand(group, scale, w.shape) * d.astype(w32.dtype)

    stepped = reductions.map_groups(step, resolved, u, params)
    projected = reductions.project_to_radius(resolved, stepped, state.radius)
    lr_other = _value(other_lr, state.count)
    def out_fn(path, d, new, w):
      if groups_lib._leaf_or_masked(d):
        return d
      if groups_lib.path_str(path) in resolved.by_path:
        return (new - w.astype(new.dtype)).astype(d.dtype)
      return (-lr_other * d).astype(d.dtype)

    out = jax.tree_util.tree_map_with_path(out_fn, u, projected, params,
                                           is_leaf=groups_lib._leaf_or_masked)
    return out, HyperballState(adam_state, state.count + 1, state.radius)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ------------------------------------------------------------ corrected weight decay


def add_corrected_decayed_weights(weight_decay: float, learning_rate: ScalarOrSchedule,
                                  groups: groups_lib.GroupsOrFn,
                                  peak_learning_rate: Optional[float] = None
                                  ) -> optax.GradientTransformationExtraArgs:
  """Decoupled weight decay scaled by ``eta_t / eta_max`` on the grouped weights.

  .. math::

    u_i \\leftarrow u_i + \\lambda\\, \\frac{\\eta_t}{\\eta_{\\max}}\\, w_i
    \\quad (\\text{grouped } w_i),

  placed where ``optax.add_decayed_weights`` goes (before the learning rate), so
  the decay applied to ``w`` is ``lambda eta_t^2 / eta_max``. With plain decoupled
  decay the equilibrium ``||w||`` depends on ``eta_t`` and lags a decaying
  schedule, and the gradient norm rises at the end of training; with the
  correction the angle per step at equilibrium, ``~ sqrt(eta_t lambda_t)``, falls
  in proportion to ``eta_t`` (Defazio 2025).

  Args:
    weight_decay: ``lambda >= 0``.
    learning_rate: the schedule ``eta_t`` the chain uses (a float: no correction).
    groups: groups pytree, or a callable ``params -> groups``.
    peak_learning_rate: ``eta_max``; default ``learning_rate(0)``, which is right
      for a decaying schedule but not after a warmup (``learning_rate(0)`` is then
      below the peak, or 0): pass the peak there.

  Raises:
    ValueError: if ``eta_max`` (given or ``learning_rate(0)``) is not > 0.

  References:
    Defazio, *Why Gradients Rapidly Increase Near the End of Training*, 2025
    (arXiv 2506.02285).
  """
  _checks.non_negative("weight_decay", weight_decay, "add_corrected_decayed_weights")
  peak = peak_learning_rate if peak_learning_rate is not None else (
      learning_rate(0) if callable(learning_rate) else learning_rate)
  if not float(peak) > 0:
    where = "peak_learning_rate" if peak_learning_rate is not None else (
        "learning_rate(0) (a warmup? pass peak_learning_rate)")
    raise ValueError(f"add_corrected_decayed_weights: eta_max = {where} must be > 0, got "
                     f"{float(peak)}.")

  def init_fn(params):
    groups_lib.resolve(groups, params, "add_corrected_decayed_weights")
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    _checks.require_params(params, "add_corrected_decayed_weights")
    resolved = groups_lib.resolve(groups, params, "add_corrected_decayed_weights")
    factor = jnp.float32(weight_decay) * _value(learning_rate, state.count) / jnp.asarray(
        peak, jnp.float32)
    out = reductions.map_groups(
        lambda p, g, u, w: (u + factor.astype(u.dtype) * w.astype(u.dtype)), resolved,
        updates, params)
    return out, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


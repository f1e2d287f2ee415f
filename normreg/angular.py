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

import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from normreg import _checks
from normreg import groups as groups_lib
from normreg import reductions
from normreg import slicing

ScalarOrSchedule = optax.ScalarOrSchedule


def _dtype() -> Any:
  """The default float dtype: float32, or float64 when JAX runs with x64 enabled."""
  return jnp.result_type(float)


def _value(x: ScalarOrSchedule, count: jax.Array) -> jax.Array:
  """A hyperparameter (a float or a schedule of the step count) in the default float
  dtype, so that nothing is rounded to float32 when JAX runs in float64."""
  return jnp.asarray(x(count) if callable(x) else x, _dtype())


def _bias_correction(decay: float, count: jax.Array) -> jax.Array:
  """``1 - decay**count`` as ``-expm1(count * log(decay))``: no cancellation (``1 - b**t``
  in float32 loses 1.3e-5 of its value at ``b = 0.999, t = 1``), with ``log(decay)``
  taken in float64 on the host."""
  log = (math.log(decay) if isinstance(decay, (int, float))
         else jnp.log(jnp.asarray(decay, _dtype())))  # traced (optax.inject_hyperparams)
  return -jnp.expm1(count.astype(_dtype()) * log)


def _bias_corrected(avg: jax.Array, decay: float, count: jax.Array) -> jax.Array:
  return avg / _bias_correction(decay, count).astype(avg.dtype)


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
               target_angle: ScalarOrSchedule, decay: float = 0.9, eps: float = 1e-8,
               zero_mean: bool = False) -> optax.GradientTransformationExtraArgs:
  """Rotational variant of ``inner``: each group turns by ``target_angle`` per step.

  Per group, with ``u`` the update of ``inner`` (its learning rate included) and
  ``theta_t`` the target angle (a float or a schedule of the step count):

  .. math::

    u_\\perp = u - \\frac{\\langle u, w\\rangle}{\\|w\\|^2} w, \\quad
    \\nu_t = \\beta \\nu_{t-1} + (1-\\beta) \\|u_\\perp\\|^2, \\quad
    \\hat\\nu_t = \\nu_t / (1 - \\beta^t),

  .. math::

    w' = w + \\theta_t\\, r_0\\, \\frac{u_\\perp}{\\sqrt{\\hat\\nu_t} + \\epsilon}, \\qquad
    w \\leftarrow r_0\\, w' / \\|w'\\| ,

  so ``||w||`` stays at its initial ``r_0`` and the expected angle of a step is
  ``theta_t`` from the first step on (``nu_1 = ||u_perp||^2``), with no warm-up
  to an equilibrium (Kosson et al. 2024, sec. 5). Ungrouped leaves get ``u``.
  A unit that is zero at init has ``r_0 = 0`` and stays at zero. Choose ``target_angle`` as the equilibrium angle of the recipe it replaces
  (:func:`normreg.theory.equilibrium_angle_sgd`,
  :func:`normreg.theory.equilibrium_angle_adamw`). **Last in a chain** (it
  computes where the grouped params end up).

  With ``zero_mean=True`` every group is also kept at zero mean: before each step
  ``w`` is centred and rescaled to ``r_0`` (a change only at the first step) and
  ``u_perp`` is centred.

  Against the official code (``RotationalWrapper`` of github.com/epfml/REQ, which
  ``tests/test_goldens.py`` replays): the same trajectory to float precision, with
  ``inner`` the wrapper's inner optimizer without decay on the grouped leaves,
  ``decay`` its ``update_norm_decay_factor`` (0.9 in both), ``zero_mean`` its
  ``zero_mean`` and ``eps = lr * rotational_eps`` (REQ adds ``eps`` to the RMS of
  the update *before* the learning rate; ``u`` here includes it). Two defaults
  differ. REQ's ``zero_mean=True`` centres every kernel at construction, which
  changes the network's function before the first step, so normreg leaves it off:
  on the golden problem the trajectories then differ by up to 2.3e-2 relative
  (SGD inside) and 8.6e-3 (AdamW inside) within 24 steps. And ``eps = 1e-8`` here
  against ``lr * 1e-8`` there: identical but for units whose update is near ``eps``
  (a nearly dead unit, gradients of 1e-10, moves about 20 times further here), which
  puts the trajectories 4.8e-4 (SGD) and 1.9e-4 (AdamW) apart after 24 steps.

  Args:
    inner: the optimizer whose direction is used, without weight decay on the
      grouped weights (``optax.sgd(lr, momentum)``, ``optax.adam(lr)``, ...).
    groups: groups pytree, or a callable ``params -> groups``.
    target_angle: radians per step, a float or an optax schedule.
    decay: ``beta`` of the running mean of ``||u_perp||^2``.
    eps: added to ``sqrt(nu_hat)``.
    zero_mean: keep each group at zero mean (REQ's default).

  Examples:
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
    Learning Across Neural Networks*, ICML 2024 (arXiv 2305.17212); their code,
    github.com/epfml/REQ (``shared/optimizers/rotational_wrapper.py``).
  """
  _checks.non_negative("target_angle", target_angle, "rotational")

  def init_fn(params):
    # Per-slice groups are split into leaves for the geometry only (normreg.slicing);
    # ``inner`` sees the trees as they are.
    _, resolved, (flat_params,) = slicing.resolve(groups, params, caller="rotational",
                                                  at_init=True)
    radius = reductions.norms(resolved, flat_params)
    return RotationalState(inner.init(params), jnp.zeros([], jnp.int32),
                           {p: jnp.zeros_like(r) for p, r in radius.items()}, radius)

  def update_fn(updates, state, params=None, **extra_args):
    _checks.require_params(params, "rotational")
    g, resolved, (flat_params,) = slicing.resolve(groups, params, caller="rotational")
    split = lambda tree: slicing.split(g, tree, caller="rotational")[1]
    start = (_balanced(resolved, flat_params, state.radius) if zero_mean else flat_params)
    inner_updates, inner_state = inner.update(
        updates, state.inner, slicing.merge(g, start, params) if zero_mean else params,
        **extra_args)
    count = state.count + 1
    tangent = reductions.tangential(resolved, split(inner_updates), start)
    if zero_mean:
      tangent = _centred(resolved, tangent)
    sq = reductions.group_sums(resolved, jnp.square, tangent)
    rms = {p: decay * state.rms[p] + (1 - decay) * sq[p] for p in sq}
    theta = _value(target_angle, state.count)

    def step(path, group, u, w):
      w32 = w.astype(reductions.compute_dtype(w.dtype))
      scale = theta * state.radius[path] / (jnp.sqrt(_bias_corrected(rms[path], decay, count))
                                            + eps)
      return w32 + reductions.expand(group, scale.astype(w32.dtype), w.shape) * u.astype(
          w32.dtype)

    stepped = reductions.map_groups(step, resolved, tangent, start)
    projected = reductions.project_to_radius(resolved, stepped, state.radius)
    out = reductions.map_groups(lambda p, g, u, new, w: (new - w.astype(new.dtype)).astype(
        u.dtype), resolved, split(inner_updates), projected, flat_params)
    return slicing.merge(g, out, updates), RotationalState(inner_state, count, rms,
                                                           state.radius)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _centred(resolved: groups_lib.Resolved, tree: Any) -> Any:
  """Each group of ``tree`` minus its mean (over all members of a joint group)."""
  means = reductions.group_means(resolved, tree)
  return reductions.map_groups(
      lambda p, g, x: (x.astype(means[p].dtype) - reductions.expand(g, means[p], x.shape)
                       ).astype(x.dtype), resolved, tree)


def _balanced(resolved: groups_lib.Resolved, tree: Any, radius: dict) -> Any:
  """Each group of ``tree`` centred and rescaled to ``radius`` (Nero's and REQ's balance)."""
  return reductions.project_to_radius(resolved, _centred(resolved, tree), radius)


# ---------------------------------------------------------------------- AdamP, SGDP


def cosine_groups(grads: Any, params: Any, delta: float = 0.1,
                  eps: float = 1e-8, unit_axis: int = -1) -> Any:
  """AdamP's heuristic (Heo et al. 2021): which leaves it would treat as scale-invariant.

  For a leaf with ``ndim > 1``: ``UNIT`` if ``max_units |cos(g, w)| < delta /
  sqrt(unit size)`` (a unit is a slice along ``unit_axis``: the LAST axis by
  default, Flax's output axis; 0 for equinox and PyTorch layouts, as the paper's
  code), else ``TENSOR`` if ``|cos(g, w)| < delta / sqrt(size)`` over the whole
  leaf, else not. The cosine is PyTorch's
  ``cosine_similarity``: ``<g, w> / (max(||g||, eps) max(||w||, eps))``. Decided
  from values, so it must run on concrete arrays (not under ``jit``). Returns a
  groups pytree to compare with the exact groups.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top

  def decide(g, w):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    if w.ndim <= 1:
      return None

    def cos(axes):
      return np.abs(np.sum(g * w, axes)) / (np.maximum(np.sqrt(np.sum(g * g, axes)), eps) *
                                            np.maximum(np.sqrt(np.sum(w * w, axes)), eps))

    unit = unit_axis % w.ndim
    if cos(tuple(a for a in range(w.ndim) if a != unit)).max() < delta / np.sqrt(
        w.size // w.shape[unit]):
      return groups_lib.unit(axis=unit_axis)
    return groups_lib.TENSOR if cos(None) < delta / np.sqrt(w.size) else None

  return jax.tree.map(decide, grads, params)


def _cosine_projection(u: jax.Array, g: jax.Array, w: jax.Array, delta: float, eps: float,
                       unit_axis: int) -> tuple[jax.Array, jax.Array]:
  """AdamP's heuristic under ``jit``: ``(u with its radial part removed per unit, per
  tensor or not at all, whether it was)`` for one leaf (Flax layout), in the official
  code's arithmetic: ``cosine_similarity`` and ``w_hat = w / (||w|| + eps)``."""
  w32, u32, g32 = (x.astype(reductions.compute_dtype(w.dtype)) for x in (w, u, g))
  unit = unit_axis % w.ndim
  axes = tuple(a for a in range(w.ndim) if a != unit)

  def norm(x, ax):
    return jnp.sqrt(jnp.sum(x * x, ax, keepdims=True))

  def cos(ax):
    return jnp.abs(jnp.sum(g32 * w32, ax, keepdims=True)) / (
        jnp.maximum(norm(g32, ax), eps) * jnp.maximum(norm(w32, ax), eps))

  def project(ax):
    n = w32 / (norm(w32, ax) + eps)
    return u32 - n * jnp.sum(n * u32, ax, keepdims=True)

  per_unit = jnp.max(cos(axes)) < delta / math.sqrt(max(1, w.size // w.shape[unit]))
  per_layer = jnp.max(cos(None)) < delta / math.sqrt(w.size)
  out = jnp.where(per_unit, project(axes), jnp.where(per_layer, project(None), u32))
  return out.astype(u.dtype), per_unit | per_layer


class _Pair(NamedTuple):
  """Two results per leaf of one tree.map (a type of its own: never a user's container)."""
  d_perp: Any
  update: Any


# A direction for _projected_decayed: ``init(params) -> state`` and
# ``step(grads, state) -> (d, finish)``, ``finish(d_perp) -> new state``.
Direction = tuple[Callable[[Any], Any], Callable[[Any, Any], tuple[Any, Callable[[Any], Any]]]]


def _adamp_direction(b1: float, b2: float, eps: float, nesterov: bool) -> Direction:
  """AdamP's step before the learning rate: ``m / (sqrt(v / (1 - b2^t)) + eps) / (1 - b1^t)``,
  with ``b1 m + (1 - b1) g`` for ``m`` under Nesterov (the official code's form, not
  optax's NAdam)."""

  def init(params):
    return optax.ScaleByAdamState(jnp.zeros([], jnp.int32), optax.tree.zeros_like(params),
                                  optax.tree.zeros_like(params))

  def step(grads, state):
    count = optax.safe_increment(state.count)
    mu = optax.tree.update_moment(grads, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(grads, state.nu, b2, 2)
    bc1, bc2 = _bias_correction(b1, count), _bias_correction(b2, count)

    def one(g, m, v):
      if g is None:
        return None
      num = b1 * m + (1 - b1) * g if nesterov else m
      denom = jnp.sqrt(v) / jnp.sqrt(bc2).astype(v.dtype) + eps
      return num / denom / bc1.astype(num.dtype)

    d = jax.tree.map(one, grads, mu, nu, is_leaf=lambda x: x is None)
    return d, lambda d_perp: optax.ScaleByAdamState(count, mu, nu)

  return init, step


def _sgdp_direction(momentum: float, dampening: float, nesterov: bool,
                    project_momentum: bool) -> Direction:
  """SGDP's step before the learning rate: ``b <- mu b + (1 - dampening) g`` and ``b``, or
  ``g + mu b`` under Nesterov. With ``project_momentum`` (and no Nesterov) the buffer
  itself is replaced by the projected step, as the official code does in place."""

  def init(params):
    return optax.TraceState(trace=optax.tree.zeros_like(params))

  def step(grads, state):
    buf = jax.tree.map(lambda g, b: None if g is None else momentum * b + (1 - dampening) * g,
                       grads, state.trace, is_leaf=lambda x: x is None)
    d = jax.tree.map(lambda g, b: None if g is None else g + momentum * b, grads, buf,
                     is_leaf=lambda x: x is None) if nesterov else buf
    if project_momentum and not nesterov:
      return d, lambda d_perp: optax.TraceState(trace=d_perp)
    return d, lambda d_perp: optax.TraceState(trace=buf)

  return init, step


def _projected_decayed(caller: str, direction: Direction, learning_rate: ScalarOrSchedule,
                       groups: groups_lib.GroupsOrFn, decay: float, wd_ratio: float,
                       heuristic: bool, delta: float, eps: float, unit_axis: int = -1
                       ) -> optax.GradientTransformationExtraArgs:
  """``-lr * (d_perp + decay * wd_ratio * w)`` on the grouped (or cosine-picked) leaves,
  ``-lr * d`` elsewhere (``-lr * (d + decay * w)`` with the heuristic), ``d`` the
  ``direction``'s step (AdamP/SGDP's). ``d_perp = d - <d, w_hat> w_hat`` per group,
  ``w_hat = w / (||w|| + eps)`` as in the official code."""
  _checks.positive("learning_rate", learning_rate, caller)
  _checks.non_negative("weight_decay", decay, caller)
  init_direction, step_direction = direction

  def init_fn(params):
    if not heuristic:
      groups_lib.resolve_at_init(groups, params, caller)
    return (init_direction(params), jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    _checks.require_params(params, caller)
    inner_state, count = state
    d, finish = step_direction(updates, inner_state)
    lr = _value(learning_rate, count)
    masked = groups_lib._leaf_or_masked
    if heuristic:
      def one(u, g, w):
        if masked(u):
          return u, u
        if w.ndim <= 1:  # never projected, fully decayed (AdamP's code: wd_ratio 1)
          return u, (-lr * (u + decay * w.astype(u.dtype))).astype(u.dtype)
        u_perp, chosen = _cosine_projection(u, g, w, delta, eps, unit_axis)
        factor = jnp.where(chosen, wd_ratio, 1.0) * decay
        return u_perp, (-lr * (u_perp + factor * w.astype(u_perp.dtype))).astype(u.dtype)

      pairs = jax.tree.map(lambda *a: _Pair(*one(*a)), d, updates, params, is_leaf=masked)
      is_pair = lambda x: isinstance(x, _Pair)
      d_perp = jax.tree.map(lambda x: x.d_perp, pairs, is_leaf=is_pair)
      out = jax.tree.map(lambda x: x.update, pairs, is_leaf=is_pair)
    else:
      resolved = groups_lib.resolve(groups, params, caller)
      d_perp = reductions.tangential(resolved, d, params, eps=eps)  # ungrouped leaves pass

      def one(path, u, w):
        if masked(u):
          return u
        if groups_lib.path_str(path) in resolved.by_path:
          return (-lr * (u + decay * wd_ratio * w.astype(u.dtype))).astype(u.dtype)
        return (-lr * u).astype(u.dtype)

      out = jax.tree_util.tree_map_with_path(one, d_perp, params, is_leaf=masked)
    return out, (finish(d_perp), count + 1)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@slicing.honours_slices
def adamp(learning_rate: ScalarOrSchedule, groups: groups_lib.GroupsOrFn,
          b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 0.0, wd_ratio: float = 0.1, nesterov: bool = False,
          heuristic: bool = False, delta: float = 0.1,
          unit_axis: int = -1) -> optax.GradientTransformationExtraArgs:
  """AdamP: Adam with the radial part of its step removed on scale-invariant weights.

  With ``m, v`` Adam's moments of the gradient, ``t`` the step and
  ``d = m / (sqrt(v / (1 - b2^t)) + eps) / (1 - b1^t)`` (``b1 m + (1 - b1) g`` for
  ``m`` with ``nesterov``), per group of a grouped leaf:

  .. math::

    w \\leftarrow w - \\eta\\,\\big(d - \\langle d, \\hat w\\rangle \\hat w
    + \\lambda\\, r\\, w\\big), \\qquad \\hat w = \\frac{w}{\\|w\\| + \\epsilon},

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

  This is the official code's arithmetic (clovaai's ``adamp`` 0.3.0, which
  ``tests/test_goldens.py`` replays to 1e-5 in float32 and 1e-9 in float64, with and
  without Nesterov and decay, on the exact groups and by the cosine test): its
  Nesterov form (not optax's NAdam, which differs by 2e-2 after one step), its
  ``w_hat`` and PyTorch's ``cosine_similarity``. The official code has no exact
  groups; on them, give the ungrouped parameters its ``weight_decay=0``.

  Args:
    learning_rate: ``eta > 0``, float or schedule.
    groups: groups pytree, or a callable ``params -> groups``.
    b1: as in ``optax.adam``.
    b2: as in ``optax.adam``.
    eps: as in ``optax.adam``; it also guards ``w_hat`` and the cosine.
    weight_decay: ``lambda >= 0`` on the grouped weights.
    wd_ratio: ``r``, the fraction of the decay the projected weights get.
    nesterov: the official Nesterov momentum.
    heuristic: use the cosine test instead of ``groups``.
    delta: the cosine test's threshold.
    unit_axis: the unit's axis for the cosine test (-1, Flax; 0 for output-first
      layouts, as the official code). The exact groups name theirs (``unit(axis=...)``).

  References:
    Heo et al., *AdamP: Slowing Down the Slowdown for Momentum Optimizers on
    Scale-invariant Weights*, ICLR 2021 (arXiv 2006.08217); github.com/clovaai/AdamP.
  """
  return _projected_decayed("adamp", _adamp_direction(b1, b2, eps, nesterov), learning_rate,
                            groups, weight_decay, wd_ratio, heuristic, delta, eps, unit_axis)


@slicing.honours_slices
def sgdp(learning_rate: ScalarOrSchedule, groups: groups_lib.GroupsOrFn,
         momentum: float = 0.9, nesterov: bool = False, weight_decay: float = 0.0,
         wd_ratio: float = 0.1, heuristic: bool = False, delta: float = 0.1,
         eps: float = 1e-8, dampening: float = 0.0, project_momentum: bool = True,
         unit_axis: int = -1) -> optax.GradientTransformationExtraArgs:
  """SGDP: SGD with heavy-ball momentum, the radial part of its step removed.

  With ``b <- mu b + (1 - dampening) g`` and ``d = b`` (or ``g + mu b``, Nesterov):

  .. math::

    w \\leftarrow w - \\eta\\,\\Big(d - \\langle d, \\hat w\\rangle \\hat w
    + \\frac{\\lambda\\, r}{1-\\mu}\\, w\\Big), \\qquad \\hat w = \\frac{w}{\\|w\\| + \\epsilon}

  on grouped leaves (the paper divides the decay by ``1 - mu``); ``-eta d``
  elsewhere. Equilibrium angle ``sqrt(2 eta lambda r / (1-mu))``
  (:func:`normreg.theory.equilibrium_angle_sgdp`). Arguments as :func:`adamp`.

  ``project_momentum`` (default, and without Nesterov only): the momentum buffer
  itself loses its radial part, ``b <- d_perp``, wherever the step is projected. The
  official code does this by aliasing (``d_p`` is the buffer and is projected in
  place); ``tests/test_goldens.py`` replays it to 1e-5 in float32 and 1e-9 in float64.
  With ``project_momentum=False`` only the step is projected and the buffer keeps
  its radial part: on the golden problem (gradients tangent to ``w``, so the radial
  part comes from ``w`` moving) 1e-3 relative off the official trajectory after 24
  steps; more where the gradients have a radial part.

  References:
    Heo et al., ICLR 2021 (arXiv 2006.08217), Algorithm 1 (SGDP);
    github.com/clovaai/AdamP (``adamp/sgdp.py``).
  """
  _checks.non_negative("momentum", momentum, "sgdp")
  if not momentum < 1:
    raise ValueError(f"sgdp: momentum must be < 1, got {momentum!r}.")
  return _projected_decayed(
      "sgdp", _sgdp_direction(momentum, dampening, nesterov, project_momentum), learning_rate,
      groups, weight_decay / (1 - momentum), wd_ratio, heuristic, delta, eps, unit_axis)


# ---------------------------------------------------------------------------- Nero


class NeroState(NamedTuple):
  """State of :func:`nero`: step count, running mean of the squared gradient norm per
  group (grouped leaves) or per element (the others), and the others' scale."""
  count: jax.Array
  grouped: Any
  ungrouped: Any
  scale: Any


@slicing.honours_slices
def nero(learning_rate: ScalarOrSchedule, groups: groups_lib.GroupsOrFn,
         b2: float = 0.999, eps: float = 0.0,
         zero_scale: float = 1e-2) -> optax.GradientTransformationExtraArgs:
  """Nero (the neuronal rotator): per-group relative steps on balanced groups.

  Per group ``w`` of a grouped leaf (a neuron, per unit; a tensor or copy otherwise),
  first balanced (``w <- (w - mean(w)) / ||w - mean(w)||``, a change only at the first
  step), then:

  .. math::

    \\bar g^2_t = \\beta \\bar g^2_{t-1} + (1-\\beta)\\|g\\|^2, \\quad
    w' = w - \\eta\\, \\|w\\|\\, \\frac{g}{\\sqrt{\\bar g^2_t / (1-\\beta^t)}}, \\quad
    w \\leftarrow \\frac{w' - \\mathrm{mean}(w')}{\\|w' - \\mathrm{mean}(w')\\|},

  so every group stays zero-mean at unit norm and turns by about ``eta`` per
  step. Ungrouped leaves (gains, biases, the last layer) take per element
  ``b <- b - eta sigma g / sqrt(bar g^2 / (1-beta^t))``, ``sigma`` their mean
  ``|b|`` at ``init`` (``zero_scale`` where that is 0), as the paper's biases. A
  zero normalizer gives a zero step (a dead unit stays where it is). No momentum,
  no weight decay.

  Against the official code (``nero.py`` of github.com/jxbz/nero, which
  ``tests/test_goldens.py`` replays to 1e-5 in float32 and 1e-9 in float64 with every
  parameter of two or more axes grouped per unit): the official constructor
  balances the parameters in place before the first forward pass, here the first
  update does it, so the two agree from an unbalanced start given the same
  gradients; for the same first *gradient*, balance the params before training
  (:func:`balance`). Written from the paper and checked against that code, never
  copied (its licence, CC BY-NC-SA, forbids it).

  Args:
    learning_rate: ``eta > 0`` (the paper's default 0.01), float or schedule.
    groups: groups pytree, or a callable ``params -> groups``.
    b2: ``beta`` (0.999 in the paper).
    eps: floor under the normalizer (0, as the official code).
    zero_scale: ``sigma`` of an ungrouped leaf that is all zero at ``init``.

  References:
    Liu, Bernstein, Meister & Yue, *Learning by Turning: Neural Architecture
    Aware Optimisation*, ICML 2021 (arXiv 2102.07227), Algorithm 1.
  """
  _checks.positive("learning_rate", learning_rate, "nero")

  def normalized(g, avg, count):
    """``g / sqrt(avg_hat)``, 0 where the normalizer is 0 (the official code's NaN -> 0)."""
    denom = jnp.sqrt(_bias_corrected(avg, b2, count))
    safe = jnp.where(denom > 0, jnp.maximum(denom, eps), 1.0)
    return jnp.where(denom > 0, g / safe, 0.0)

  def init_fn(params):
    resolved = groups_lib.resolve_at_init(groups, params, "nero")
    grouped = {p: jnp.zeros_like(n) for p, n in reductions.norms(resolved, params).items()}

    def free(path, w):  # an ungrouped array leaf (not a None / optax.MaskedNode)
      return not (groups_lib._leaf_or_masked(w) or groups_lib.path_str(path) in resolved.by_path)

    def sigma(w):
      mean_abs = jnp.mean(jnp.abs(w.astype(reductions.compute_dtype(w.dtype))))
      return jnp.where(mean_abs == 0, jnp.asarray(zero_scale, mean_abs.dtype), mean_abs)

    ungrouped = jax.tree_util.tree_map_with_path(
        lambda path, w: jnp.zeros(w.shape, reductions.compute_dtype(w.dtype)) if free(path, w)
        else None, params, is_leaf=groups_lib._leaf_or_masked)
    scale = jax.tree_util.tree_map_with_path(
        lambda path, w: sigma(w) if free(path, w) else None,
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
    start = balance(params, resolved)
    norms = reductions.norms(resolved, start)

    def relative(path, group, g, w):
      w32 = w.astype(reductions.compute_dtype(w.dtype))
      g_hat = normalized(g.astype(w32.dtype), reductions.expand(group, grouped[path], w.shape),
                         count)
      return w32 - (lr * reductions.expand(group, norms[path], w.shape)).astype(
          w32.dtype) * g_hat

    stepped = reductions.map_groups(relative, resolved, updates, start)
    balanced = balance(stepped, resolved)

    def others(v, g):
      if v is None or groups_lib._leaf_or_masked(g):
        return v
      return b2 * v + (1 - b2) * jnp.square(g.astype(v.dtype))

    ungrouped = jax.tree.map(others, state.ungrouped, updates,
                             is_leaf=lambda x: x is None)

    def out(path, g, new, w, v, s):
      if groups_lib._leaf_or_masked(g):
        return g
      if groups_lib.path_str(path) in resolved.by_path:
        return (new - w.astype(new.dtype)).astype(g.dtype)
      step = (lr * s).astype(v.dtype) * normalized(g.astype(v.dtype), v, count)
      return (-step).astype(g.dtype)

    result = jax.tree_util.tree_map_with_path(
        out, updates, balanced, params, ungrouped, state.scale,
        is_leaf=groups_lib._leaf_or_masked)
    return result, NeroState(count, grouped, ungrouped, state.scale)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def balance(params: Any, groups: groups_lib.GroupsOrFn | groups_lib.Resolved) -> Any:
  """``params`` with every group centred and at unit norm (Nero's constraint).

  .. math::

    w \\leftarrow \\frac{w - \\mathrm{mean}(w)}{\\|w - \\mathrm{mean}(w)\\|}

  per group (per unit, per copy of stack axes, over all members of a joint
  group); other leaves unchanged. The official Nero constructor does this to every
  parameter of two or more axes before the first forward pass; apply it to the
  initial params to start where it starts.

  Examples:
    >>> import jax.numpy as jnp, normreg
    >>> from normreg import angular
    >>> w = angular.balance({"w": jnp.array([[1., 3.], [3., 5.]])}, {"w": normreg.UNIT})["w"]
    >>> w.tolist()  # per unit (column): zero mean, unit norm
    [[-0.7071067690849304, -0.7071067690849304], [0.7071067690849304, 0.7071067690849304]]
  """
  if isinstance(groups, groups_lib.Resolved):
    resolved, flat = groups, params
  else:
    groups, resolved, (flat,) = slicing.resolve(groups, params, caller="balance")
  out = _balanced(resolved, flat, {p: jnp.ones_like(n) for p, n in
                                   reductions.norms(resolved, flat).items()})
  return out if isinstance(groups, groups_lib.Resolved) else slicing.merge(groups, out, params)


# ---------------------------------------------------------------- Hyperball Adam


class HyperballState(NamedTuple):
  """State of :func:`adamh`: Adam's state, the step count and ``{path: r_0}``."""
  adam: Any
  count: jax.Array
  radius: Any


@slicing.honours_slices
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
    resolved = groups_lib.resolve_at_init(groups, params, "adamh")
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


@slicing.honours_slices
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
  if not callable(peak) and jnp.ndim(peak) != 0:
    raise ValueError(f"add_corrected_decayed_weights: eta_max must be a scalar, got shape "
                     f"{jnp.shape(peak)}.")
  peak_value = _checks.concrete(peak)  # None when traced (checked where it is concrete)
  if peak_value is not None and not peak_value > 0:
    where = "peak_learning_rate" if peak_learning_rate is not None else (
        "learning_rate(0) (a warmup? pass peak_learning_rate)")
    raise ValueError(f"add_corrected_decayed_weights: eta_max = {where} must be > 0, got "
                     f"{peak_value}.")

  def init_fn(params):
    groups_lib.resolve_at_init(groups, params, "add_corrected_decayed_weights")
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


"""Finding the scale-invariant weights of a function by automatic differentiation.

A function ``f`` is invariant to the scale of a group ``G`` of its parameters
(``f(..., a w_G, ...) = f(...)`` for all ``a > 0``) exactly when its derivative
along ``w_G`` itself is zero, that is when, for every output direction ``r``,
the gradient of ``<r, f>`` is orthogonal to ``w`` within the group:

.. math::

  \\frac{d}{da} \\langle r, f\\big((1 + a) w_G\\big)\\rangle\\Big|_{a=0}
  = \\langle J^\\top r, w\\rangle_G = 0 .

So one vector-Jacobian product per random ``r`` (a few of them, vmapped: one
compiled program for all leaves) gives every gradient ``J^T r``, and every
candidate grouping is tested on it without running ``f`` again: the per-group
sums ``<J^T r, w>_G`` must vanish against the same sums along a random direction
of the same norm (``<J^T r, d>_G``), which says how much the leaf matters at all:
the root mean square of the first (over the groups, summed, and the probes ``r``)
must be at most ``rtol`` times that of the second.
The candidates of a leaf of shape ``(s_1, ..., out)`` are, finest first: per
copy of its ``k`` leading axes and per unit (``unit(stack=k)``), then per unit,
then per copy (``tensor(stack=k)``), then the whole tensor; the finest that
passes wins. Leaves of one module (``dense/kernel``, ``dense/bias``) that fail
alone are then tried together, as a joint group tagged with the module's path.

Invariance is a property of the function, not of the point: a leaf that is
zero (biases, BatchNorm shifts at init) has a zero derivative along itself
whatever the function does. So the test runs at randomized parameter values
``p + 0.5 * rms(p) * u``, ``u`` noise of variance 1 (``rms`` replaced by 1 for an
all-zero leaf).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from normreg import epsilon
from normreg import groups as groups_lib

PROBES = 2
"""Random output directions ``r`` at eps -> 0; each adds a VJP to the one compiled program."""
EPS_LIMIT = 1e-8
"""The normalizations' epsilons are multiplied by this for "as eps -> 0"
(:mod:`normreg.epsilon`): 1e-6 becomes 1e-14, far below the mean square of any
activation at a small init, while a normalized zero row stays 0 rather than NaN."""
EPS_DOMINATES = 0.1
"""A grouped leaf is reported with its epsilon dominating (a warning, and
:meth:`Detection.eps_dominated`) where, at the model's own epsilons, the derivative
along it is more than this fraction of the derivative along a random direction of the
same norm."""
# A leaf whose first (or second) axis has this many entries or fewer, and two or more axes
# besides, is also tried per slice along it: fused q/k/v (3, ...) and gate/up (2, ...)
# kernels, and the same behind a layer axis stacked by scan.
MAX_SLICES = 8
# Which of the probe's sums: at eps -> 0 (the decisions), at the model's own eps.
_LIMIT, _MODEL = 0, 1
# Siblings tried together as one joint group, at most.
MAX_JOINT = 4
# A joint member may hold one element per group (a bias beside a kernel's units): the
# per-element sums come back from the device for vectors up to this size, and for leaves of
# more axes (biases stacked by scan) up to MAX_PER_ELEMENT_STACKED: not for kernels, whose
# per-element products would be most of the program's traffic.
MAX_PER_ELEMENT = 1 << 16
MAX_PER_ELEMENT_STACKED = 1 << 12


def _noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
  """Float32 noise of mean 0 and variance 1, uniform on ``[-sqrt(3), sqrt(3)]``: generic
  enough for the tests, and drawn 2-3 times faster than a normal on the host."""
  x = rng.random(shape, np.float32)
  x -= np.float32(0.5)
  x *= np.float32(np.sqrt(12.0))
  return x


def _randomize(leaf: Any, rng: np.random.Generator) -> np.ndarray:
  """``leaf + 0.5 rms(leaf) u`` (``rms`` 1 for a zero leaf; ``u`` :func:`_noise`), drawn
  and summed in float32, in the leaf's dtype. ``leaf`` is a non-empty floating array."""
  x = np.asarray(leaf, np.float32)
  rms = float(np.sqrt(np.mean(np.square(x))))
  noise = _noise(rng, x.shape)
  noise *= np.float32(0.5 * (rms if rms > 0 else 1.0))
  noise += x
  return noise.astype(leaf.dtype)


def _direction(w: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """A random direction (:func:`_noise`) of ``w``'s norm, in float32; nonzero a.s."""
  d = _noise(rng, w.shape)
  d *= np.float32(np.linalg.norm(w.astype(np.float32)) / np.linalg.norm(d))
  return d


def _candidates(shape: tuple[int, ...], unit_axis: int = -1) -> list[groups_lib.Group]:
  """Groupings a leaf of ``shape`` may have, finest (most groups) first.

  ``unit(stack=k, axis=0)`` and ``tensor(stack=k + 1)`` are one partition, read two ways
  (output units on the first axis after ``k`` stack axes, or one more stack axis): the
  first is kept for output-first layouts (``unit_axis=0``), the second otherwise.
  Among as many groups, the unit on ``unit_axis`` comes first, and a tensor grouping
  before a unit grouping on an axis of one element (the same groups).
  """
  ndim = len(shape)
  first = unit_axis == 0
  axes = lambda k: sorted({-1, *range(ndim - k - 1)} - (set() if first else {0}),
                          key=lambda a: (a != unit_axis, a))
  # No unit on an axis of one element: that is the tensor grouping (ties go to TENSOR).
  out = [groups_lib.unit(stack=k, axis=a) for k in range(ndim - 1)  # none below two axes
         for a in axes(k) if shape[k + a % (ndim - k)] > 1]
  out += [groups_lib.tensor(stack=k) for k in range(ndim)
          if not (first and 0 < k < ndim)]
  return sorted(out, key=lambda g: -math.prod(g.group_shape(shape)))


def find_scale_invariant(fn: Callable[..., Any], params: Any, *args: Any, seed: int = 0,
                         rtol: float = 1e-3, joint: bool = True,
                         unit_axis: int | None = None, **kwargs: Any) -> groups_lib.Groups:
  """Decides, per parameter, whether ``fn`` is invariant to its scale, and how.

  Each leaf gets the finest grouping that passes (see the module docstring):

  - ``normreg.UNIT``: a random factor per output unit leaves ``fn`` unchanged
    (a kernel followed by BatchNorm, a WeightNorm ``v``);
  - ``normreg.unit(stack=k)``: the same per copy of the first ``k`` axes too
    (layers stacked by ``nnx.scan``/``nnx.vmap``, each followed by BatchNorm);
  - ``normreg.TENSOR``, ``normreg.tensor(stack=k)``: only the whole tensor (per
    copy) may be rescaled (a kernel followed by LayerNorm or GroupNorm);
  - ``tensor(joint=path)`` (or ``unit(joint=...)``): leaves of one module that
    are invariant only together (a kernel and its bias before LayerNorm), with
    ``joint=True``. A joint group must hold a kernel or matrix (two axes
    besides its stack axes): the (scale, bias) vectors of a normalization
    followed by ReLU and another normalized layer are jointly invariant too
    (van Laarhoven 2017, sec. 5), but stay ungrouped, as in the paper;
  - ``None`` otherwise, for leaves that do not affect ``fn`` at all (a bias
    just before BatchNorm: its gradient is zero, it is no scale group; the
    derivative along a random direction is below ``1e-5 * ||fn||``) and for
    leaves that are not floating point.

  - a :func:`normreg.sliced` group, where the slices of a fused kernel (along its
    first or second axis, or concatenated along one axis of a two-axis kernel)
    make more groups that pass one by one than any whole-leaf grouping: q/k/v
    ``(3, heads, d, head_dim)`` behind QK-norm is ``sliced(tensor(stack=1),
    tensor(stack=1), ...)``.

  A grouping "passes" when the per-group derivatives along ``w`` are at most
  ``rtol`` times those along a random direction of the same norm (root mean
  square over the groups and the random output directions), with every
  normalization's epsilon sent to 0 (:mod:`normreg.epsilon`): invariant by design.
  At a small initialization the epsilon is not negligible and the function at
  these params does depend on the scale; such groups are found all the same, and
  one warning line names them (:data:`EPS_DOMINATES`). The test runs with every
  kernel brought up to at least a variance-scaling size (``rms >= 1/sqrt(fan_in)``),
  so that a path around a normalization is not negligible because of a small init;
  at eps -> 0 that moves no invariant weight.

  What it cannot see:

  - a normalization in eval mode, which divides by running statistics: the
    function is then *not* invariant, and nothing is found. Call it with
    ``fn`` in training mode (batch statistics).
  - joint groups across modules (a kernel in one module, the bias in
    another): only siblings are tried together. Declare such groups with
    :func:`normreg.groups_from_rules`.
  - stacked vectors, from their shape: the (scale, bias) of a normalization
    stacked by scan, shape ``(layers, C)``, look like a kernel to the joint search,
    and, followed by ReLU and a normalized layer, come out as one joint
    ``tensor`` group over the stack. Pass ``joint=False`` (or declare groups by
    rules) to leave them alone.
  - invariance that holds only on part of the input space; the check uses the
    ``args`` you pass, so pass a typical batch (batch statistics of a batch of
    one are degenerate). Where a grouping passes only because some slices of a
    leaf do not act at these inputs (a 3x3 kernel on a 1x1 feature map acts through
    its centre tap), the coarser grouping that does not need them is reported, with
    one warning line: detect on full-size inputs.

  Finding no invariant leaf at all logs one warning line (a normalization in
  evaluation mode, a batch of one): transforms given such groups do nothing.

  Cost: two traces of ``fn`` (one finds the epsilons) and one compiled program
  (``jax.vjp`` of ``fn`` vmapped over ``PROBES`` output directions at eps -> 0 and one
  at the model's eps, with the group sums) and numpy sums, whatever the number of
  leaves. :func:`scale_invariance_report` returns each leaf's decision and ratios.

  Args:
    fn: ``fn(params, *args, **kwargs)`` returning an array or a dict (any pytree but a
      tuple or list) of arrays: the logits, say; not a scalar loss, which hides too
      much, and not haiku's ``(output, state)``, which is refused.
    params: the params pytree of arrays: an NNX ``State``, Linen or haiku dicts, or an
      equinox Module filtered to its arrays (``eqx.partition(model,
      eqx.is_inexact_array)``; a leaf that is not an array is refused, naming it).
    *args: positional arguments of ``fn`` after ``params`` (an input batch).
    seed: seed of the randomization.
    rtol: relative tolerance of the test (see above).
    joint: also try the siblings that fail alone as one joint group.
    unit_axis: where output units are: -1 (Flax, haiku: ``(..., in, out)``) or 0
      (equinox, PyTorch ports: ``(out, in, ...)``); default 0 for an equinox Module, else
      -1. It decides how a grouping along the first axis is reported: ``unit(axis=0)``
      (output units) or ``tensor(stack=1)`` (copies stacked by scan): the same groups.
    **kwargs: keyword arguments of ``fn``.

  Returns:
    A groups pytree shaped like ``params``: ``Group``, ``Sliced`` or ``None`` leaves.

  Examples:
    >>> import jax, jax.numpy as jnp, normreg
    >>> from flax import nnx
    >>> class Net(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.conv = nnx.Conv(3, 8, (3, 3), use_bias=False, rngs=rngs)
    ...     self.bn = nnx.BatchNorm(8, rngs=rngs)
    ...     self.dense = nnx.Linear(8, 8, rngs=rngs)
    ...     self.ln = nnx.LayerNorm(8, rngs=rngs)
    ...     self.head = nnx.Linear(8, 10, rngs=rngs)
    ...   def __call__(self, x):
    ...     x = jax.nn.relu(self.bn(self.conv(x))).mean((1, 2))
    ...     return self.head(jax.nn.relu(self.ln(self.dense(x))))
    >>> graphdef, params, rest = nnx.split(Net(nnx.Rngs(0)), nnx.Param, ...)
    >>> fn = lambda p, x: nnx.merge(graphdef, p, rest, copy=True)(x)
    >>> groups = normreg.find_scale_invariant(fn, params, jnp.ones((8, 6, 6, 3)))
    >>> print(normreg.groups.summary(groups))
    bn/bias                                          -
    bn/scale                                         -
    conv/kernel                                      unit
    dense/bias                                       tensor joint=dense
    dense/kernel                                     tensor joint=dense
    head/bias                                        -
    head/kernel                                      -
    ln/bias                                          -
    ln/scale                                         -

  References:
    van Laarhoven, 2017 (arXiv 1706.05350), sec. 2.
  """
  return scale_invariance_report(fn, params, *args, seed=seed, rtol=rtol, joint=joint,
                                 unit_axis=unit_axis, **kwargs).groups


@dataclasses.dataclass(frozen=True)
class LeafReport:
  """What detection decided for one parameter leaf, and why.

  Attributes:
    path: the leaf's ``"/"``-joined path.
    shape: its shape.
    group: the decision: a ``Group``, a :class:`~normreg.groups.Sliced` or ``None``.
    reason: ``"invariant"``, ``"per slice"``, ``"joint"``, ``"not invariant"``,
      ``"no effect"`` or ``"not floating"``.
    effect: ``|J d| / |f|``, how much the leaf moves ``fn`` at all.
    candidates: ``((group, ratio), ...)``, every uniform grouping tried, finest first,
      with its violation ratio ``rms <J^T r, w>_G / rms <J^T r, d>_G`` as the
      normalizations' epsilons go to 0; a grouping passes at ``ratio <= rtol``.
    slices: for a leaf tried per slice (along its first or second axis: fused
      kernels, scanned or not), each slice's ``(group, ratio)`` (its finest passing
      grouping, or ``(None, None)``), along the axis whose slices make the most groups;
      else ``()``.
    ratio_at_eps: the decision's violation ratio at the model's own epsilons (the
      largest over slices and joint members); large (see :data:`EPS_DOMINATES`) where an
      epsilon dominates its normalization's input. ``None`` where nothing is grouped or
      no epsilon was found.
  """

  path: str
  shape: tuple
  group: Any
  reason: str
  effect: float = 0.0
  candidates: tuple = ()
  slices: tuple = ()
  ratio_at_eps: Optional[float] = None

  def __str__(self) -> str:
    ratios = dict(self.candidates)
    ratio = ratios.get(self.group) if not isinstance(self.group, groups_lib.Sliced) else max(
        (r for _, r in self.slices if r is not None), default=None)
    figures = (f"ratio {ratio:.1e}" if ratio is not None else "") + (
        f", at the model's eps {self.ratio_at_eps:.1e}" if self.ratio_at_eps is not None else "")
    return f"{self.path:40s} {str(self.group or '-'):32s} {self.reason:13s} {figures}".rstrip()


@dataclasses.dataclass(frozen=True)
class Detection:
  """The result of :func:`scale_invariance_report`: the groups and each leaf's decision.

  Attributes:
    groups: the groups pytree (what :func:`find_scale_invariant` returns).
    leaves: ``{path: LeafReport}``.
    epsilons: how many normalization epsilons were found and sent to 0
      (:mod:`normreg.epsilon`).
    rtol: the tolerance the decisions used.
  """

  groups: Any
  leaves: dict
  epsilons: int
  rtol: float

  def eps_dominated(self, threshold: Optional[float] = None) -> list[str]:
    """Paths of grouped leaves whose invariance fails at the model's own epsilons at these
    params by more than ``threshold`` (default :data:`EPS_DOMINATES`): the derivative
    along ``w`` is that fraction of the derivative along a random direction, because
    their normalizations' inputs are small against epsilon."""
    threshold = EPS_DOMINATES if threshold is None else threshold
    return [p for p, leaf in self.leaves.items()
            if leaf.ratio_at_eps is not None and leaf.ratio_at_eps > threshold]

  def __str__(self) -> str:
    return "\n".join(str(leaf) for leaf in self.leaves.values())


def scale_invariance_report(fn: Callable[..., Any], params: Any, *args: Any, seed: int = 0,
                            rtol: float = 1e-3, joint: bool = True,
                            unit_axis: int | None = None, **kwargs: Any) -> Detection:
  """:func:`find_scale_invariant`, with each leaf's candidates, ratios and decision.

  Takes the same arguments; returns a :class:`Detection` whose ``groups`` are what
  :func:`find_scale_invariant` returns. Each decision is also logged at INFO.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from normreg import detect
    >>> def fn(p, x):  # a kernel behind an RMSNorm whose eps dominates at this tiny init
    ...   h = x @ p["w"]
    ...   return h * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + 1e-2) @ p["head"]
    >>> params = {"w": 1e-3 * jnp.ones((4, 8)), "head": jnp.ones((8, 2))}
    >>> x = jax.random.normal(jax.random.key(0), (16, 4))
    >>> report = detect.scale_invariance_report(fn, params, x)
    >>> report.groups["w"], report.leaves["w"].reason, report.eps_dominated()
    (normreg.TENSOR, 'invariant', ['w'])
  """
  # A None in params is no leaf here, and comes back as None in the result.
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [groups_lib.path_str(p) for p, _ in leaves]
  arrays = [x for _, x in leaves]
  _check_leaves(paths, arrays)
  layout_axis = (0 if _is_equinox(params) else -1) if unit_axis is None else unit_axis
  is_float = [jnp.issubdtype(jnp.result_type(x), jnp.floating) and np.size(x) > 0
              for x in arrays]
  float_idx = [i for i, ok in enumerate(is_float) if ok]
  shapes = [tuple(np.shape(arrays[i])) for i in float_idx]
  # numpy draws on the host: jax.random inside the program below makes it several times
  # slower to compile and run on a CPU (threefry's rounds over every parameter).
  rng = np.random.default_rng(seed)
  primals = [_randomize(arrays[i], rng) for i in float_idx]
  directions = [_direction(w, rng) for w in primals]
  # Every test below is a sum of J^T r * w (or * d) over some axes of one leaf: which
  # axes is known from the shapes. So the whole test runs in one compiled program:
  # randomized params, random directions, the vmapped VJP and the sums, and only the
  # sums come back (not the gradients, as large as the params).
  needed = [_summed_axes(shape, layout_axis) for shape in shapes]

  def rebuild(float_leaves):
    full = list(arrays)
    for i, x in zip(float_idx, float_leaves):
      full[i] = x
    return treedef.unflatten(full)

  forward = lambda q: fn(rebuild(q), *args, **kwargs)
  # The same function with every normalization's epsilon multiplied by t: the test runs
  # at t = EPS_LIMIT (as designed) and t = 1 (the model as it is), in one program.
  forward_t, n_eps, out = epsilon.with_scaled_eps(forward, primals, return_shape=True)
  if isinstance(out, (tuple, list)):
    raise ValueError(
        f"find_scale_invariant: fn returned a {type(out).__name__} of {len(out)}; pass a "
        "function that returns the network's output only (haiku's apply with state returns "
        "(output, state): use lambda p, x: apply(p, state, None, x)[0]). The state, "
        "BatchNorm's running statistics, is not scale-invariant and would hide every group.")
  cotangents = jax.tree.map(
      lambda o: jnp.asarray(rng.standard_normal((PROBES,) + o.shape), o.dtype), out)

  # One vmap over (t, r) pairs, each with its own forward: every probe r at eps -> 0 (the
  # decisions), then the first probe alone at the model's eps (the report's ratio there).
  # (A vmap over t around the vmap over r, sharing the forward between probes, compiles
  # wrongly on jax 0.10's CPU backend: a forward that depends on the outer batched t gave
  # wrong gradients for the second probe under jit, right ones without it.)
  at_model = 1 if n_eps else 0
  pairs_t = jnp.asarray([EPS_LIMIT if n_eps else 1.0] * PROBES + [1.0] * at_model, jnp.float32)
  pairs_r = jax.tree.map(lambda c: jnp.concatenate([c, c[:at_model]]), cotangents)
  # The decisions are taken with every kernel at least at a variance-scaling size
  # (_generic_scales): as eps -> 0 a weight that feeds a normalization AND a path around it
  # would otherwise look invariant at a small enough init (the path around shrinks with
  # ||w||, the derivative through the normalization does not). At eps -> 0 this moves no
  # invariant weight; the model's-eps check stays at the model's own size.
  generic = _generic_scales(primals, layout_axis)
  # One (pairs,) array per leaf, not one (pairs, leaves) array sliced per leaf: XLA then
  # moves each scalar factor out of the matmuls (the weights stay unbatched), and the
  # program compiles in a third of the time (12-layer transformer: 1.9 s, not 5.8 s).
  # Where no kernel is raised, none is scaled: the weights are then the same in every pair,
  # which a convolution needs to stay fast (a batched kernel makes it a grouped convolution:
  # the paper's CNN, 7.7 s of run instead of 1.5 s).
  pairs_s = None if np.all(generic == 1) else [
      jnp.asarray([s] * PROBES + [1.0] * at_model, jnp.float32) for s in generic]

  @jax.jit
  def probe(primals, pairs_t, pairs_r, pairs_s, directions):
    def one(t, r, scale):
      scale = scale or [jnp.ones((), jnp.float32)] * len(primals)
      primals_s = [(w * s.astype(w.dtype)) for w, s in zip(primals, scale)]
      value, vjp = jax.vjp(lambda q: forward_t(t, q), primals_s)
      norm = jnp.sqrt(sum(jnp.sum(jnp.square(v.astype(jnp.float32)))
                          for v in jax.tree.leaves(value)))
      grads = vjp(r)[0]
      sums = []
      for g, w, d, s, axes_sets in zip(grads, primals_s, directions, scale, needed):
        dtype = jnp.promote_types(g.dtype, jnp.float32)
        # Along w and along d stacked: one product and one reduction per set of axes (run
        # 3.4 s -> 2.2 s on a 12-layer transformer).
        along = g.astype(dtype)[None] * jnp.stack([w.astype(dtype), (d * s).astype(dtype)])
        lifted = {axes: tuple(a + 1 for a in axes) for axes in axes_sets}
        both = _nested_sums(along, set(lifted.values()))
        sums.append({axes: (both[l][0], both[l][1]) for axes, l in lifted.items()})
      return norm, sums

    return jax.vmap(one)(pairs_t, pairs_r, pairs_s)

  lowered = probe.lower(primals, pairs_t, pairs_r, pairs_s, directions)
  # The program runs once: on a CPU, XLA's backend optimizations cost more compile time
  # than they save (12-layer transformer: 3.6 s + 1.7 s optimized, 2.4 s + 1.9 s not).
  fast = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
  try:
    compiled = lowered.compile(compiler_options=fast)
  except Exception:  # pylint: disable=broad-except (an option this backend or jax lacks)
    compiled = lowered.compile()
  out_norms, sums = compiled(primals, pairs_t, pairs_r, pairs_s, directions)
  out_norm = float(out_norms[0])
  # The pairs back to (the probes at eps -> 0, the probe at the model's eps).
  split = lambda x: (x[:PROBES], x[PROBES:] if at_model else x[:PROBES])
  sums = {i: {axes: tuple(split(np.asarray(x, np.float64)) for x in pair)
              for axes, pair in s.items()}
          for i, s in zip(float_idx, jax.device_get(sums))}
  # A leaf whose random-direction derivative is this small relative to the output
  # has no effect on fn (float32 noise is ~1e-7): it is no scale group.
  negligible = 1e-5 * out_norm
  ndims = {i: len(shape) for i, shape in zip(float_idx, shapes)}
  limit, model = _LIMIT, _MODEL

  def dots(axes, i, which, at=limit):
    """Sums of J^T r * w (``which`` 0) or * d (1) over ``axes`` of leaf ``i``: (probes, ...)."""
    return sums[i][axes][which][at]

  def passes(group, members, at=limit):
    along_w = sum(dots(group.reduced_axes(ndims[i]), i, 0, at) for i in members)
    along_d = sum(dots(group.reduced_axes(ndims[i]), i, 1, at) for i in members)
    return _rms(along_w) <= rtol * _rms(along_d), _rms(along_w), _rms(along_d)

  results: list[Any] = [None] * len(paths)
  reports: dict[str, LeafReport] = {}
  for i, path in enumerate(paths):
    if not is_float[i]:
      reports[path] = LeafReport(path, tuple(np.shape(arrays[i])), None, "not floating")
  effect = {}
  for i in float_idx:
    shape = shapes[float_idx.index(i)]
    effect[i] = _rms(dots(tuple(range(ndims[i])), i, 1))
    relative = effect[i] / max(out_norm, 1e-30)
    if not effect[i] > negligible or not np.isfinite(effect[i]):
      reports[paths[i]] = LeafReport(paths[i], shape, None, "no effect", relative)
      continue
    tried = tuple((g, _ratio(dots(g.reduced_axes(ndims[i]), i, 0),
                             dots(g.reduced_axes(ndims[i]), i, 1)))
                  for g in _candidates(shape, layout_axis))
    inert_fallback = None
    for group, r in tried:
      if not r <= rtol:
        continue
      inert = _inert_slices(group, ndims[i],
                            lambda axis: dots(_all_but(axis, ndims[i]), i, 1), layout_axis)
      if inert:  # passes only because some slices do nothing: not what it means
        inert_fallback = inert_fallback or (group, *inert)
        continue
      results[i] = group
      break
    else:
      if inert_fallback:
        results[i] = inert_fallback[0]
    if inert_fallback:
      logging.warning(
          "find_scale_invariant: %s: only %d of the %d slices along axis %d affect fn at "
          "these inputs (a feature map smaller than the kernel?), so %s would pass; "
          "reported as %s. Detect on full-size inputs.", paths[i], inert_fallback[2],
          inert_fallback[3], inert_fallback[1], inert_fallback[0], results[i] or "None")
    axis, per_slice = _per_slice(shape, layout_axis, rtol, negligible, dots, i) or (
        0, None)
    part = shape[:axis] + shape[axis + 1:]
    blocks = None
    if ndims[i] == 2:  # slices concatenated along one axis (PyTorch ports' fused q/k/v)
      options = [(_blocks(dots(_all_but(a, 2), i, 0), dots(_all_but(a, 2), i, 1), rtol,
                          negligible), a) for a in (0, 1)]
      options = [(found, a) for found, a in options if found is not None]
      if options:
        blocks = max(options, key=lambda o: o[0][2])
    best_uniform = max(_count([results[i]], shape),
                       _count([g for g, _ in per_slice], part) if per_slice else 0)
    if blocks is not None and blocks[0][2] > best_uniform:
      (view, per_block, _), a = blocks
      results[i] = _block_groups(view, per_block, a)
      reason, per_slice = "per slice", [(g, r) for g, (_, r) in zip(results[i].groups,
                                                                    per_block)]
      rows = lambda which: dots(_all_but(a, 2), i, which, model)
      at_eps = max(r for b, r in _blocks_at(rows(0), rows(1), view,
                                             [b for b, _ in per_block]) if b)
    elif per_slice and _count([g for g, _ in per_slice], part) > _count([results[i]], shape):
      results[i] = groups_lib.sliced(*(g for g, _ in per_slice), axis=axis)
      reason = "per slice"
      lifted = lambda g: _lift(g, ndims[i], axis)
      at_eps = max(_ratio(_take(dots(lifted(g), i, 0, model), lifted(g), axis, k),
                          _take(dots(lifted(g), i, 1, model), lifted(g), axis, k))
                   for k, (g, _) in enumerate(per_slice) if g is not None)
    elif results[i] is None:
      reason, at_eps = "not invariant", None
    else:
      reason = "invariant"
      at_eps = _ratio(dots(results[i].reduced_axes(ndims[i]), i, 0, model),
                     dots(results[i].reduced_axes(ndims[i]), i, 1, model))
    reports[paths[i]] = LeafReport(paths[i], shape, results[i], reason, relative, tried,
                                   tuple(per_slice or ()), at_eps if n_eps else None)

  if joint:
    for members, group in _find_joint(paths, float_idx, results, effect, negligible,
                                      dict(zip(float_idx, shapes)), passes):
      _, along_w, along_d = passes(group, members, model)
      for i in members:
        reports[paths[i]] = dataclasses.replace(
            reports[paths[i]], group=results[i], reason="joint",
            ratio_at_eps=along_w / max(along_d, 1e-300) if n_eps else None)
    # Then per slice, for a kernel and its bias that no whole-leaf joint group took.
    for members, at_eps, ratios in _find_joint_blocks(
        paths, float_idx, results, effect, negligible, dict(zip(float_idx, shapes)), dots, rtol):
      for i in members:
        reports[paths[i]] = dataclasses.replace(
            reports[paths[i]], group=results[i], reason="joint",
            slices=tuple(zip(results[i].groups, ratios)), ratio_at_eps=at_eps if n_eps else None)
  report = Detection(treedef.unflatten(results), {p: reports[p] for p in paths}, n_eps, rtol)
  for leaf in report.leaves.values():
    logging.info("find_scale_invariant: %s", leaf)
  if not any(r is not None for r in results):
    logging.warning(
        "find_scale_invariant: no scale-invariant parameter among %d leaves. Is the "
        "normalization in evaluation mode (running statistics), the batch a single example, "
        "or the model without normalization? Transforms given these groups do nothing.",
        len(paths))
  dominated = report.eps_dominated()
  if dominated:
    logging.warning(
        "find_scale_invariant: %d grouped leaves are invariant by design (as the "
        "normalizations' epsilon goes to 0) but not at the model's own epsilon at these "
        "params: %s. Their normalizations' inputs are small against epsilon (a small "
        "initialization); weight decay shrinks them further into that regime, and a method "
        "that keeps the initial norm (rotational, adamh, project_to_sphere(radius='init')) "
        "keeps them there. See docs/transformers.md.", len(dominated),
        ", ".join(f"{p} ({report.leaves[p].ratio_at_eps:.2g})" for p in dominated[:8]) + (
            ", ..." if len(dominated) > 8 else ""))
  return report


def _nested_sums(x: jax.Array, axes_sets) -> dict:
  """``{axes: x summed over axes}``, each from the largest already summed subset of its
  axes: one pass over ``x`` per finest set, the coarser ones from those (a tensor's sum
  from its per-unit sums)."""
  out: dict = {}
  for axes in sorted(axes_sets, key=len):
    base = max((done for done in out if done and set(done) < set(axes)), key=len, default=())
    rest = tuple(a - sum(b < a for b in base) for a in axes if a not in base)
    out[axes] = jnp.sum(out[base] if base else x, rest)
  return out


def _generic_scales(primals: list, layout_axis: int) -> np.ndarray:
  """Per leaf, the factor that brings a kernel (two axes or more) up to rms
  ``1 / sqrt(fan_in)`` (``fan_in``: its size over its output axis), where it is more than
  2x smaller: a variance-scaling size, where no non-linearity is saturated by it and no
  path is negligible because of it. 1 for vectors and for kernels already about that
  large (a variance-scaling initialization, drawn: within 2x)."""
  out = []
  for w in primals:
    factor = 1.0
    if np.ndim(w) >= 2:
      fan_in = np.size(w) / np.shape(w)[layout_axis]
      rms = float(np.sqrt(np.mean(np.square(np.asarray(w, np.float32)))))
      if 0 < rms < 0.5 / np.sqrt(fan_in):  # within 2x of that size: left as it is
        factor = 1 / (np.sqrt(fan_in) * rms)
    out.append(factor)
  return np.asarray(out, np.float32)


def _ratio(along_w: np.ndarray, along_d: np.ndarray) -> float:
  """The violation ratio: rms of the sums along ``w`` over rms of those along ``d``."""
  return _rms(along_w) / max(_rms(along_d), 1e-300)


def _rms(dots: np.ndarray) -> float:
  """Root mean square over the probes (first axis) of the sum of squares of the rest."""
  dots = dots.reshape(dots.shape[0], -1)
  return float(np.sqrt(np.mean(np.sum(np.square(dots), axis=1))))


def _lift(group: groups_lib.Group, ndim: int, axis: int = 0) -> tuple[int, ...]:
  """The axes of a whole leaf of ``ndim`` axes that ``group``, the group of a slice along
  ``axis``, sums over."""
  return tuple(a + (a >= axis) for a in group.reduced_axes(ndim - 1))


def _slice_axes(shape: tuple[int, ...]) -> list[int]:
  """The axes a leaf of ``shape`` is tried per slice along: the first or the second (behind
  a layer axis stacked by scan), where it has 2 to ``MAX_SLICES`` entries and the slices
  two axes or more."""
  return [a for a in (0, 1) if len(shape) >= 3 + a and 2 <= shape[a] <= MAX_SLICES]


def _take(sums: np.ndarray, axes: tuple[int, ...], axis: int, k: int) -> np.ndarray:
  """Slice ``k`` along ``axis`` of per-group sums over ``axes`` (the probes first)."""
  return np.take(sums, k, axis=1 + sum(1 for a in range(axis) if a not in axes))


def _count(groups: list, shape: tuple[int, ...]) -> int:
  """How many groups the groupings ``groups`` (``None`` for none) of leaves of ``shape``
  make together."""
  return sum(math.prod(g.group_shape(shape)) for g in groups if g is not None)


def _per_slice(shape, layout_axis, rtol, negligible, dots, i):
  """``(axis, [(group, ratio)])``: the finest passing grouping of each slice of a fused leaf
  (``(None, None)`` where none passes or the slice has no effect), along the axis of
  :func:`_slice_axes` whose slices make the most groups; ``None`` if there is none."""
  ndim, best = len(shape), None
  for axis in _slice_axes(shape):
    rest = tuple(a for a in range(ndim) if a != axis)
    effects = [_rms(_take(dots(rest, i, 1), rest, axis, k)) for k in range(shape[axis])]
    if min(effects) <= 1e-6 * max(effects):  # inert slices (a kernel's taps off a small map)
      continue
    part, out = shape[:axis] + shape[axis + 1:], []
    for k in range(shape[axis]):
      found = (None, None)
      if effects[k] > negligible:
        for group in _candidates(part, layout_axis):
          axes = _lift(group, ndim, axis)
          r = _ratio(_take(dots(axes, i, 0), axes, axis, k),
                     _take(dots(axes, i, 1), axes, axis, k))
          if r <= rtol:
            found = (group, r)
            break
      out.append(found)
    if best is None or _count([g for g, _ in out], part) > _count(
        [g for g, _ in best[1]], shape[:best[0]] + shape[best[0] + 1:]):
      best = (axis, out)
  return best


def _blocks(rows_w: np.ndarray, rows_d: np.ndarray, rtol: float, negligible: float):
  """Slices concatenated along one axis: ``(view, [(block, ratio)], groups made)`` or None.

  ``rows_w``, ``rows_d``: ``(probes, n)``, the sums of ``J^T r * w`` (``* d``) over all
  axes but one, per row of it. The axis is cut into ``k`` slices of ``m = n / k`` rows (2:
  gate/up, 3: q/k/v), and each slice into blocks of ``b`` consecutive rows (a head is
  ``head_dim`` rows; ``b = m``: the whole slice): a block's sums are sums of its rows'. Per
  slice, the finest ``b`` that passes; then one block for all (the least common multiple
  of the finer ones, which every finer passing grouping passes at too) and the view
  ``(k, m // b, b)``. The ``k`` that makes the most groups wins.
  """
  n, best = rows_w.shape[1], None
  for k in (2, 3):
    m = n // k
    if n % k or m < 2:
      continue
    effects = [_rms(rows_d[:, s * m:(s + 1) * m]) for s in range(k)]
    if min(effects) <= 1e-6 * max(effects):
      continue
    finest = []
    for s in range(k):
      w, d = rows_w[:, s * m:(s + 1) * m], rows_d[:, s * m:(s + 1) * m]
      found = None
      if effects[s] > negligible:
        for b in (b for b in range(1, m + 1) if m % b == 0):
          if _rms(_sum_blocks(w, b)) <= rtol * _rms(_sum_blocks(d, b)):
            found = b
            break
      finest.append(found)
    if all(b is None for b in finest):
      continue
    block = math.lcm(*[b for b in finest if b is not None and b < m] or [m])
    view = (k, m // block, block) if block < m else (k, m)
    per_block = _blocks_at(rows_w, rows_d, view, [b and (block if b < m else m) for b in finest])
    made = sum(m // b for b, _ in per_block if b)
    if best is None or made > best[2]:
      best = (view, per_block, made)
  return best


def _sum_blocks(rows: np.ndarray, b: int) -> np.ndarray:
  return rows.reshape(rows.shape[0], -1, b).sum(-1)


def _blocks_at(rows_w, rows_d, view, blocks):
  """``[(block, ratio)]`` per slice of ``view`` at the given block sizes (``None``: none)."""
  m = math.prod(view[1:])
  return [(b, _ratio(_sum_blocks(rows_w[:, s * m:(s + 1) * m], b),
                     _sum_blocks(rows_d[:, s * m:(s + 1) * m], b)) if b else None)
          for s, b in enumerate(blocks)]


def _block_groups(view, per_block, axis, joint=None, ndim=2) -> groups_lib.Sliced:
  """The :class:`~normreg.groups.Sliced` of :func:`_blocks`' answer for a leaf of ``ndim``
  axes sliced along ``axis``: per block, ``unit`` on the slice's block axis (where the
  view put it); per slice, ``TENSOR``; optionally tagged ``joint + "[slice i]"``."""
  m = math.prod(view[1:])
  tag = lambda s: None if joint is None else f"{joint}[slice {s}]"  # no path is spelled so
  unit_axis = axis % ndim  # the view's block-count axis, in the slice (the slice axis gone)
  return groups_lib.sliced(*(
      None if b is None else groups_lib.tensor(joint=tag(s)) if b == m
      else groups_lib.unit(axis=unit_axis, joint=tag(s))
      for s, (b, _) in enumerate(per_block)), axis=axis % ndim, view=view)


def _find_joint_blocks(paths, float_idx, results, effect, negligible, shapes, dots, rtol):
  """A 2-D kernel and the bias beside it, both ungrouped, that pass together per
  concatenated slice (:func:`_blocks` on their summed rows: equinox's and PyTorch ports'
  fused q/k/v ``Linear`` with biases). Returns ``[(members, ratio at the model's eps,
  [ratio per slice])]``."""
  joined = []
  by_path = {paths[i]: i for i in float_idx}
  for i in float_idx:
    parent, _, name = paths[i].rpartition("/")
    j = by_path.get(f"{parent}/bias")
    if (name in ("kernel", "weight", "w") and j is not None and results[i] is None
        and results[j] is None and effect[i] > negligible and len(shapes[i]) == 2
        and len(shapes[j]) == 1 and _per_element(shapes[j])):
      for a in (0, 1):
        if shapes[i][a] != shapes[j][0]:
          continue
        rows = lambda which, at=_LIMIT: (dots(_all_but(a, 2), i, which, at) +
                                         dots((), j, which, at))
        found = _blocks(rows(0), rows(1), rtol, negligible)
        if found is None:
          continue
        view, per_block, _ = found
        results[i] = _block_groups(view, per_block, a, joint=parent)
        results[j] = _block_groups(view, per_block, 0, joint=parent, ndim=1)
        at_eps = max(r for b, r in _blocks_at(rows(0, _MODEL), rows(1, _MODEL), view,
                                               [b for b, _ in per_block]) if b)
        joined.append(([i, j], at_eps, [r for _, r in per_block]))
        logging.info("find_scale_invariant: %s and %s form joint groups per slice, %s",
                     paths[i], paths[j], results[i])
        break
  return joined


def _is_equinox(params: Any) -> bool:
  """Whether ``params`` is an equinox Module (output-first layouts: ``(out, in, ...)``)."""
  return any(c.__module__.split(".")[0] == "equinox" for c in type(params).__mro__)


def _check_leaves(paths: list[str], arrays: list[Any]) -> None:
  """Refuses params with leaves that are not arrays (an unfiltered equinox model holds its
  activation functions and static fields among them), naming the first."""
  for path, x in zip(paths, arrays):
    if not isinstance(x, (jax.Array, np.ndarray, np.generic, float, int, complex)):
      raise ValueError(
          f"find_scale_invariant: params leaf {path!r} is a {type(x).__name__}, not an array. "
          "Pass the arrays only; for an equinox model: params, static = "
          "eqx.partition(model, eqx.is_inexact_array) and fn = lambda p, x: "
          "eqx.combine(p, static)(x) (or filter the model with eqx.filter).")


def _all_but(axis: int, ndim: int) -> tuple[int, ...]:
  return tuple(a for a in range(ndim) if a != axis)


def _summed_axes(shape: tuple[int, ...], layout_axis: int) -> set[tuple[int, ...]]:
  """Every set of axes a test sums a leaf of ``shape`` over: each candidate's reduced axes
  (alone and in a joint group), every axis but one (the slices of :func:`_inert_slices`)
  and, for a small leaf, none (a joint member with one element per group)."""
  ndim = len(shape)
  groups = _candidates(shape, layout_axis) + [groups_lib.Group(kind, k)
                                              for kind in groups_lib.Invariance
                                              for k in range(ndim)
                                              if kind is groups_lib.Invariance.TENSOR or k < ndim - 1]
  out = {g.reduced_axes(ndim) for g in groups} | {_all_but(a, ndim) for a in range(ndim)}
  for axis in _slice_axes(shape):  # per slice (fused kernels)
    out |= {_lift(g, ndim, axis) for g in _candidates(shape[:axis] + shape[axis + 1:],
                                                      layout_axis)}
    out.add(_all_but(axis, ndim))
  if _per_element(shape):
    out.add(())
  return out


def _inert_slices(group: groups_lib.Group, ndim: int, slice_sums: Callable[[int], np.ndarray],
                  layout_axis: int) -> tuple[int, int, int] | None:
  """``(axis, active, total)`` for the first axis that ``group`` splits into groups (a stack
  axis, or a unit axis other than the layout's) and along which some slices do not
  affect ``fn`` (their derivative along a random direction at most 1e-6 of the largest
  slice's); ``None`` if there is none. ``slice_sums(axis)`` gives that derivative per
  probe and slice, ``(probes, n)``.

  Such a grouping passes the test vacuously on those slices: a 3x3 kernel applied to a
  1x1 feature map acts through its centre tap only, and per-tap groups then pass. A
  dead output unit along the layout's unit axis is not such a case and is not counted.
  """
  axes = list(range(group.stack))
  if group.kind is groups_lib.Invariance.UNIT:
    unit = group.unit_axis(ndim)
    if unit != group.stack + layout_axis % (ndim - group.stack):
      axes.append(unit)
  for axis in axes:
    per_slice = np.sqrt(np.sum(np.square(slice_sums(axis)), axis=0))
    active = int(np.sum(per_slice > 1e-6 * per_slice.max()))
    if active < per_slice.size:
      return axis, active, per_slice.size
  return None


def _find_joint(paths, float_idx, results, effect, negligible, shapes, passes) -> None:
  """Tags sibling leaves that fail alone but pass together (largest set first); returns
  ``[(member indices, group)]``."""
  joined = []
  parents: dict[str, list[int]] = {}
  for i in float_idx:
    if results[i] is None and effect[i] > negligible:
      parent, _, _ = paths[i].rpartition("/")
      parents.setdefault(parent, []).append(i)
  for parent, siblings in parents.items():
    siblings = siblings[:MAX_JOINT]
    for size in range(len(siblings), 1, -1):
      found = False
      for members in itertools.combinations(siblings, size):
        for group in _joint_candidates([shapes[i] for i in members]):
          if passes(group, list(members))[0]:
            tag = parent or "+".join(paths[i] for i in members)
            for i in members:
              results[i] = groups_lib.Group(group.kind, group.stack, tag)
            logging.info("find_scale_invariant: %s form one joint group, %s",
                         [paths[i] for i in members], group)
            joined.append((list(members), group))
            found = True
            break
        if found:
          break
      if found:
        break
  return joined


def _per_element(shape: tuple[int, ...]) -> bool:
  """Whether a leaf's per-element sums are computed (a joint member with one element per
  group: a bias, or biases stacked by scan)."""
  size = math.prod(shape)
  return size <= (MAX_PER_ELEMENT if len(shape) <= 1 else MAX_PER_ELEMENT_STACKED)


def _strip_leading_ones(shape: tuple[int, ...]) -> tuple[int, ...]:
  """``(1, 1, 1, C) -> (C,)``: a vector stored broadcastable, as haiku's BatchNorm stores
  its scale and offset; ``(3, 1)``, a one-unit kernel, stays."""
  while shape and shape[0] == 1:
    shape = shape[1:]
  return shape


def _joint_candidates(shapes: list[tuple[int, ...]]) -> list[groups_lib.Group]:
  """Groupings every member can have with one per-group shape, finest first."""
  common = None
  for shape in shapes:
    # A member may hold one element per group (a bias beside a kernel's units).
    per_element = bool(shape) and _per_element(shape)
    options = _candidates(shape) + ([groups_lib.unit(stack=len(shape) - 1)] if per_element
                                    else [])
    keys = {(g.kind, g.stack) for g in options}
    common = keys if common is None else common & keys
  out = []
  for kind, stack in common or ():
    group = groups_lib.Group(kind, stack)
    # A joint group holds a kernel or matrix (two axes of more than one element besides
    # the stack axes): the (scale, bias) vectors of an inner normalization followed by ReLU
    # are jointly invariant too, but are left alone, as the paper leaves them, also when
    # stored as (1, ..., 1, C) as haiku's BatchNorm does.
    if (len({group.group_shape(s) for s in shapes}) == 1
        and any(len(_strip_leading_ones(s[stack:])) >= 2 for s in shapes)):
      out.append(group)
  # Most groups first; ties (a set's order is arbitrary) by kind, then fewer stack axes.
  return sorted(out, key=lambda g: (-math.prod(g.group_shape(shapes[0])), g.kind.value,
                                    g.stack))

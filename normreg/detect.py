"""Finding the scale-invariant weights of a function by automatic differentiation.

For a leaf ``w`` of the params and the function ``f`` (the network's output),
scale invariance ``f(a w) = f(w)`` for all ``a > 0`` means that the directional
derivative of ``f`` along ``w`` itself is zero:

.. math::

  \\frac{d}{da} f\\big((1 + a) w\\big)\\Big|_{a=0} = J_w\\, w = 0 ,

and per-unit invariance means ``J_w (w * c) = 0`` for a random positive factor
``c`` per output unit (broadcast along the last axis). Both are one
Jacobian-vector product (``jax.jvp``), compared against the JVP along a random
direction of the same norm, which says how much the leaf matters at all.

Invariance is a property of the function, not of the point: a leaf that is
zero (biases, BatchNorm shifts at init) has a zero JVP along itself whatever
the function does. So the test runs at randomized parameter values
``p + 0.5 * rms(p) * N(0, 1)`` (``rms`` replaced by 1 for an all-zero leaf).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from normreg import groups as groups_lib


def _sq_norm(tree: Any) -> jax.Array:
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return sum((jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves), jnp.float32(0))


def _randomize(leaf: jax.Array, rng: np.random.Generator) -> jax.Array:
  x = np.asarray(leaf, np.float32)
  rms = float(np.sqrt(np.mean(np.square(x)))) if x.size else 0.0
  scale = 0.5 * (rms if rms > 0 else 1.0)
  return jnp.asarray(x + scale * rng.standard_normal(x.shape, np.float32), leaf.dtype)


def find_scale_invariant(fn: Callable[..., Any], params: Any, *args: Any, seed: int = 0,
                         rtol: float = 1e-3, **kwargs: Any) -> groups_lib.Groups:
  """Decides, per parameter, whether ``fn`` is invariant to its scale.

  Each leaf gets one of:

  - ``normreg.UNIT`` if ``J_w (w * c) ~ 0`` for a random per-unit factor ``c``
    (a kernel followed by BatchNorm, a WeightNorm ``v``);
  - ``normreg.TENSOR`` if only ``J_w w ~ 0`` (a kernel followed by LayerNorm or
    GroupNorm);
  - ``None`` otherwise, and for leaves that do not affect ``fn`` at all (a bias
    just before BatchNorm: its gradient is zero, it is no scale group; the JVP
    along a random direction is below ``1e-5 * ||fn||``) or are not floating
    point.

  "~ 0" means ``||J_w t|| <= rtol * ||J_w r||`` with ``r`` a random direction
  of the same norm as ``t``. Normalizations add ``eps`` to the variance, so the
  invariance is exact only up to about ``eps / var``; ``rtol`` leaves room for
  that.

  What it cannot see:

  - a normalization in eval mode, which divides by running statistics: the
    function is then *not* invariant, and nothing is found. Call it with
    ``fn`` in training mode (batch statistics).
  - groups that span two leaves, such as a Dense kernel *and* its bias before
    a LayerNorm: only the pair is invariant, so neither leaf is reported.
    Declare such groups by hand, or drop the bias.
  - invariance that holds only on part of the input space; the check uses the
    ``args`` you pass, so pass a typical batch (batch statistics of a batch of
    one are degenerate).

  Args:
    fn: ``fn(params, *args, **kwargs)`` returning an array or pytree of arrays
      (logits, say; not a scalar loss, which hides too much).
    params: the params pytree (Linen dict or NNX ``State``).
    *args: positional arguments of ``fn`` after ``params`` (an input batch).
    seed: seed of the randomization.
    rtol: relative tolerance of the test (see above).
    **kwargs: keyword arguments of ``fn``.

  Returns:
    A groups pytree shaped like ``params``.

  Example (NNX):

    >>> import jax, jax.numpy as jnp, normreg
    >>> from flax import nnx
    >>> class Net(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.conv = nnx.Conv(3, 8, (3, 3), use_bias=False, rngs=rngs)
    ...     self.bn = nnx.BatchNorm(8, rngs=rngs)
    ...     self.head = nnx.Linear(8, 10, rngs=rngs)
    ...   def __call__(self, x):
    ...     return self.head(jax.nn.relu(self.bn(self.conv(x))).mean((1, 2)))
    >>> graphdef, params, rest = nnx.split(Net(nnx.Rngs(0)), nnx.Param, ...)
    >>> fn = lambda p, x: nnx.merge(graphdef, p, rest, copy=True)(x)
    >>> groups = normreg.find_scale_invariant(fn, params, jnp.ones((8, 6, 6, 3)))
    >>> print(normreg.groups.summary(groups))
    bn/bias                                          -
    bn/scale                                         -
    conv/kernel                                      unit
    head/bias                                        -
    head/kernel                                      -

  References:
    van Laarhoven, 2017 (arXiv 1706.05350), sec. 2.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=groups_lib._is_none)
  paths = [groups_lib.path_str(p) for p, _ in leaves]
  arrays = [x for _, x in leaves]
  is_float = [x is not None and jnp.issubdtype(jnp.result_type(x), jnp.floating)
              and np.size(x) > 0 for x in arrays]
  # numpy draws: no per-shape compilation of jax.random ops on the host.
  rng = np.random.default_rng(seed)
  randomized = [_randomize(x, rng) if ok else x for x, ok in zip(arrays, is_float)]

  float_idx = [i for i, ok in enumerate(is_float) if ok]

  def rebuild(float_leaves):
    full = list(randomized)
    for i, x in zip(float_idx, float_leaves):
      full[i] = x
    return treedef.unflatten(full)

  @jax.jit
  def jvp_norms(primals, tangents):
    """||J t|| for a stack of tangents (leading axis) of the float leaves."""

    def one(t):
      _, out = jax.jvp(lambda q: fn(rebuild(q), *args, **kwargs), (primals,), (t,))
      return jnp.sqrt(_sq_norm(out))

    return jax.vmap(one)(tangents)

  primals = [randomized[i] for i in float_idx]
  # A leaf whose random-direction JVP is this small relative to the output has
  # no effect on fn (float32 noise is ~1e-7): it is no scale group.
  out_norm = float(jnp.sqrt(_sq_norm(fn(rebuild(primals), *args, **kwargs))))
  negligible = 1e-5 * out_norm
  zeros = [np.zeros((3,) + x.shape, x.dtype) for x in primals]
  results = []
  for i, (path, w, ok) in enumerate(zip(paths, randomized, is_float)):
    if not ok:
      results.append(None)
      continue
    unit_shape = (1,) * (w.ndim - 1) + w.shape[-1:]  # one factor per output unit
    c = rng.uniform(0.5, 1.5, unit_shape).astype(np.float32)
    w32 = np.asarray(w, np.float32)
    direction = rng.standard_normal(w.shape, np.float32)
    direction *= np.linalg.norm(w32) / np.linalg.norm(direction)
    stack = jnp.asarray(np.stack([w32, w32 * c, direction]), w.dtype)
    tangents = list(zeros)
    tangents[float_idx.index(i)] = stack
    along_w, along_units, along_random = np.asarray(jvp_norms(primals, tangents))
    if not along_random > negligible or not np.isfinite(along_random):
      group = None  # The leaf does not affect fn (or fn is not differentiable there).
    elif along_units <= rtol * along_random:
      group = groups_lib.UNIT if w.ndim >= 2 else groups_lib.TENSOR
    elif along_w <= rtol * along_random:
      group = groups_lib.TENSOR
    else:
      group = None
    logging.info(
        "find_scale_invariant: %-40s %-7s |J r|/|f| = %.1e, |J w|/|J r| = %.1e, "
        "|J wc|/|J r| = %.1e", path, group.value if group else "None",
        along_random / max(out_norm, 1e-30), along_w / max(along_random, 1e-30),
        along_units / max(along_random, 1e-30))
    results.append(group)
  return treedef.unflatten(results)

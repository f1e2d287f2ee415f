"""A traced function with its normalizations' epsilons scaled: ``eps -> t * eps``.

A normalization computes ``x / sqrt(mean(x^2) + eps)`` (RMSNorm; LayerNorm,
BatchNorm and GroupNorm centre ``x`` first), and is invariant to the scale of
``x`` only where ``mean(x^2) >> eps``. "Invariant by design" is the limit
``eps -> 0``: for a weight ``w`` that feeds the normalization,

.. math::

  f_{\\epsilon}(a w) = f_{\\epsilon / a^2}(w),

so at a small initialization, where ``mean(x^2)`` is close to ``eps``, the
function does depend on ``||w||``, and no tolerance on the function itself can
tell that from a weight with a small but real effect. :func:`with_scaled_eps`
evaluates the function with every epsilon multiplied by a traced ``t``, so a
test can run at ``t = 1`` (the model as it is) and ``t -> 0`` (the model as
designed) in one program.

How the epsilons are found, in the function's jaxpr (``jax.make_jaxpr``,
interpreted equation by equation as ``jax.core.eval_jaxpr`` does): an ``add``
of a constant ``0 < c <= MAX_EPS`` (a literal or a closed-over scalar) whose
result reaches, through casts, broadcasts and reshapes only, a ``rsqrt``, a
``sqrt``, the base of a ``pow`` or the denominator of a ``div``. That is
``rsqrt(var + eps)`` in flax, haiku and equinox alike, and ``x / (norm + eps)``.
Calls (``jit``, ``remat``, ``custom_jvp_call``, ``custom_vjp_call``) that hold an
epsilon are inlined (their custom derivative rules give way to the rules of their
primal computation), and ``scan`` and ``cond`` bodies are interpreted in place;
anything without an epsilon is bound as it was.

Not found, and so left as they are: an epsilon inside a ``while_loop``, a clamp
(``x / max(norm, eps)``), and one computed at run time rather than a constant. A
``custom_vjp`` that holds an epsilon is differentiated through its primal
computation: a straight-through estimator inside it loses its rule. In float16,
``t * eps`` underflows to 0 for small ``t``: a normalized row of zeros is then NaN.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ("with_scaled_eps", "epsilon_sites", "count", "MAX_EPS")

# The largest constant read as a normalization's epsilon (1e-5 and 1e-6 are usual).
MAX_EPS = 1e-2
_THROUGH = frozenset({"convert_element_type", "broadcast_in_dim", "reshape", "squeeze",
                      "expand_dims", "copy", "copy_p"})
_INLINED = frozenset({"jit", "pjit", "closed_call", "core_call", "remat", "remat2",
                      "checkpoint", "custom_jvp_call", "custom_vjp_call",
                      "custom_vjp_call_jaxpr"})


def _const(var: Any, constants: dict, producers: dict) -> np.ndarray | None:
  """The value of ``var`` if it is a constant scalar (through casts and broadcasts)."""
  if isinstance(var, jex.Literal):
    value = np.asarray(var.val)
  elif var in constants:
    value = np.asarray(constants[var]) if np.size(constants[var]) == 1 else None
  elif var in producers and producers[var].primitive.name in _THROUGH:
    return _const(producers[var].invars[0], constants, producers)
  else:
    return None
  if value is None or value.size != 1 or not np.issubdtype(value.dtype, np.floating):
    return None
  return value


def _feeds_a_root(var: Any, consumers: dict) -> bool:
  """Whether ``var`` reaches a ``rsqrt``/``sqrt``/``pow`` or a ``div``'s denominator."""
  for eqn, position in consumers.get(var, ()):
    name = eqn.primitive.name
    if name in ("rsqrt", "sqrt") or (name == "pow" and position == 0) or (
        name == "div" and position == 1) or (
        name == "integer_pow" and eqn.params.get("y", 0) < 0):
      return True
    if name in _THROUGH and _feeds_a_root(eqn.outvars[0], consumers):
      return True
  return False


def epsilon_sites(jaxpr: Any, consts: Any = ()) -> dict[int, int]:
  """``{equation index: operand position of the epsilon}`` of ``jaxpr``'s own equations."""
  constants = dict(zip(jaxpr.constvars, consts))
  producers, consumers = {}, {}
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      producers[v] = eqn
    for position, v in enumerate(eqn.invars):
      if not isinstance(v, jex.Literal):
        consumers.setdefault(v, []).append((eqn, position))
  sites = {}
  for index, eqn in enumerate(jaxpr.eqns):
    if eqn.primitive.name != "add":
      continue
    for position in (0, 1):
      value = _const(eqn.invars[position], constants, producers)
      if value is not None and 0 < float(value.reshape(-1)[0]) <= MAX_EPS and (
          _const(eqn.invars[1 - position], constants, producers) is None) and _feeds_a_root(
              eqn.outvars[0], consumers):
        sites[index] = position
        break
  return sites


def _sub(eqn: Any) -> list[tuple[Any, Any]]:
  """``[(jaxpr, consts)]`` of the sub-jaxprs of an equation's params."""
  out = []
  for value in eqn.params.values():
    for item in value if isinstance(value, tuple) else (value,):
      if isinstance(item, jex.ClosedJaxpr):
        out.append((item.jaxpr, item.consts))
      elif isinstance(item, jex.Jaxpr):
        out.append((item, ()))
  return out


_COUNTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def count(jaxpr: Any, consts: Any = ()) -> int:
  """How many epsilons :func:`with_scaled_eps` scales in ``jaxpr`` (and its calls).

  Remembered per jaxpr: an unrolled model calls the same few sub-jaxprs (an einsum, a
  softmax) hundreds of times."""
  try:
    return _COUNTS[jaxpr]
  except (KeyError, TypeError):
    pass
  total = len(epsilon_sites(jaxpr, consts))
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in _INLINED | {"scan", "cond"}:
      total += sum(count(j, c) for j, c in _sub(eqn))
  try:
    _COUNTS[jaxpr] = total
  except TypeError:  # not weakly referenceable: count again next time
    pass
  return total


def _eval(jaxpr: Any, consts: Any, args: list, t: jax.Array) -> list:
  env: dict = {}
  read = lambda v: v.val if isinstance(v, jex.Literal) else env[v]
  env.update(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  sites = epsilon_sites(jaxpr, consts)
  for index, eqn in enumerate(jaxpr.eqns):
    invals = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    subs = _sub(eqn)
    if not subs and index not in sites:
      outs = _bind(eqn, invals)
    elif index in sites:
      position = sites[index]
      dtype = eqn.outvars[0].aval.dtype
      eps = jnp.asarray(invals[position], dtype) * t.astype(dtype)
      x = invals[1 - position]
      outs = [jnp.add(x, eps).astype(dtype)]
    elif subs and not any(count(j, c) for j, c in subs):
      outs = _bind(eqn, invals)
    elif name in _INLINED:
      (sub, sub_consts), = subs[:1]
      outs = _eval(sub, sub_consts, invals, t)
    elif name == "scan":
      outs = _scan(eqn, invals, t)
    elif name == "cond":
      branches = [lambda *ops, b=b: _eval(b.jaxpr, b.consts, list(ops), t)
                  for b in eqn.params["branches"]]
      outs = lax.switch(invals[0], branches, *invals[1:])
    else:  # a while loop holding an epsilon: left as it is
      outs = _bind(eqn, invals)
    if not eqn.primitive.multiple_results and not isinstance(outs, (list, tuple)):
      outs = [outs]
    for v, value in zip(eqn.outvars, outs):
      env[v] = value
  return [read(v) for v in jaxpr.outvars]


def _bind(eqn: Any, invals: list) -> Any:
  """The equation applied as it is (``jax.core.eval_jaxpr``'s way, custom rules kept)."""
  bind = eqn.primitive.get_bind_params(eqn.params)
  subfuns, params = bind if isinstance(bind, tuple) else ((), bind)  # (subfuns, ...) before 0.7
  with eqn.ctx.manager:
    return eqn.primitive.bind(*subfuns, *invals, **params)


def _scan(eqn: Any, invals: list, t: jax.Array) -> list:
  p = eqn.params
  body, n_consts, n_carry = p["jaxpr"], p["num_consts"], p["num_carry"]
  consts, carry, xs = invals[:n_consts], invals[n_consts:n_consts + n_carry], invals[
      n_consts + n_carry:]

  def step(carry, x):
    outs = _eval(body.jaxpr, body.consts, list(consts) + list(carry) + list(x), t)
    return outs[:n_carry], outs[n_carry:]

  carry, ys = lax.scan(step, carry, xs, length=p["length"], reverse=p["reverse"],
                       unroll=p["unroll"])
  return list(carry) + list(ys)


def with_scaled_eps(fn: Callable[..., Any], *example_args: Any, return_shape: bool = False
                    ) -> tuple[Any, ...]:
  """``(fn_t, n)``: ``fn_t(t, *args) = fn(*args)`` with each of the ``n`` normalization
  epsilons of ``fn`` multiplied by ``t`` (a scalar, traced or not).

  ``fn`` is traced once on ``example_args`` (``jax.make_jaxpr``); ``fn_t`` takes
  arguments of the same structure, shapes and dtypes. With ``return_shape``, also the
  output's ``jax.ShapeDtypeStruct`` pytree, as ``jax.make_jaxpr`` gives it:
  ``(fn_t, n, shape)``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> rms_norm = lambda x: x * jax.lax.rsqrt(jnp.mean(x * x) + 1e-2)
    >>> fn_t, n = with_scaled_eps(rms_norm, jnp.full(4, 0.1))
    >>> n, float(fn_t(1.0, jnp.full(4, 0.1))[0]), float(fn_t(0.0, jnp.full(4, 0.1))[0])
    (1, 0.7071067690849304, 1.0)
  """
  closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*example_args)
  out_tree = jax.tree.structure(out_shape)
  n = count(closed.jaxpr, closed.consts)

  def fn_t(t, *args):
    outs = _eval(closed.jaxpr, closed.consts, jax.tree.leaves(args), jnp.asarray(t))
    return jax.tree.unflatten(out_tree, outs)

  return (fn_t, n, out_shape) if return_shape else (fn_t, n)

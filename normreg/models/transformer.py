"""A decoder-only transformer with today's normalization layouts (Flax NNX, RMSNorm).

One block, with ``N`` an RMSNorm, ``x`` the residual stream and every option on:

.. math::

  h = N_{\\mathrm{pre}}(x), \\quad q_h = N_q(h W_{q,h}), \\ k_h = N_k(h W_{k,h}), \\
  v_h = h W_{v,h}, \\quad x \\leftarrow x + N_{\\mathrm{post}}\\Big(\\sum_h
  \\mathrm{softmax}\\big(q_h k_h^\\top / \\sqrt{d_h}\\big) v_h W_{o,h}\\Big),

.. math::

  x \\leftarrow x + N_{\\mathrm{post}}'\\Big(\\big(\\mathrm{GELU}(h' W_g) \\odot h' W_u\\big)
  W_d\\Big), \\quad h' = N'_{\\mathrm{pre}}(x).

The options:

- ``pre_norm`` (Llama, Gemma): ``N_pre`` before attention and MLP.
- ``qk_norm``: ``"head"`` (Gemma 3, Qwen 3: over each head's ``d_h``), ``"whole"``
  (OLMo 2: over all heads of q and of k) or ``None``.
- ``post_norm`` (Gemma 2 and 3's sandwich, OLMo 2's reordered norm): ``N_post`` on
  what attention and the MLP add to the stream.
- ``ngpt`` (Loshchilov et al. 2024, nGPT): no pre-norm; q and k normalized per head,
  attention's and the MLP's outputs normalized, and the stream renormalized after each
  update, ``x <- N(x + a * (N(A(x)) - x))`` with learned per-channel rates ``a``
  (the "eigen learning rates"). The unit-norm constraint nGPT puts on every matrix
  after each step is a choice of optimizer (``normreg.project_to_sphere``), not part
  of the forward pass.
- ``qkv``: ``"separate"``: ``q`` ``(heads, d, d_h)``, ``k`` and ``v`` ``(kv_heads, d,
  d_h)``; ``"q_kv"`` (Gemma's grouped-query layout): ``q`` and ``kv`` ``(2, kv_heads, d,
  d_h)``; ``"fused"``: one kernel ``(3, heads, d, d_h)`` (needs ``kv_heads == heads``).
- ``kv_heads``: grouped-query attention (``heads % kv_heads == 0``).
- ``fused_mlp``: gate and up in one kernel ``(2, d, hidden)``; otherwise ``gate`` and
  ``up`` ``(d, hidden)``.
- ``scan``: the blocks stacked on a leading axis and run by ``nnx.scan``.

Which weights are then scale-invariant, and how, is docs/transformers.md's table; the
tests write it out for every option and hold ``normreg.find_scale_invariant`` to it.
Kernels are drawn from a normal of std ``init_std`` (0.02 by default; LLM code often
uses 0.01 or less, where the post-norms' epsilon is not negligible: see
docs/transformers.md), norm scales start at 1.

Examples:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from normreg.models import Transformer
  >>> model = Transformer(vocab=11, layers=2, width=16, heads=4, kv_heads=2, qk_norm="head",
  ...                     post_norm=True, qkv="q_kv", rngs=nnx.Rngs(0))
  >>> model(jnp.zeros((3, 8), jnp.int32)).shape
  (3, 8, 11)
  >>> nnx.state(model, nnx.Param)["blocks"][0]["attn"]["kv"].shape  # (k/v, kv_heads, d, d_h)
  (2, 2, 16, 4)

References:
  Team Gemma, *Gemma 3 technical report*, 2025; Team OLMo, *2 OLMo 2 Furious*, 2024;
  Loshchilov et al., *nGPT: normalized transformer with representation learning on the
  hypersphere*, 2024 (arXiv 2410.01131).
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from normreg.models.norms import List

QK_NORMS = (None, "head", "whole")
QKV_LAYOUTS = ("separate", "q_kv", "fused")
# Today's block layouts, as Transformer options (docs/transformers.md's table).
LAYOUTS = {
    "llama": dict(qk_norm=None),  # pre-norm only (Llama 2, GPT-2 with RMSNorm)
    "qwen3": dict(qk_norm="head"),  # pre-norm and QK-norm per head
    "gemma3": dict(qk_norm="head", post_norm=True, qkv="q_kv"),  # pre-, QK-, sandwich norms
    "gemma3_fused": dict(qk_norm="head", post_norm=True, qkv="fused", fused_mlp=True),
    "olmo2": dict(pre_norm=False, qk_norm="whole", post_norm=True),  # reordered norms
    "ngpt": dict(pre_norm=False, ngpt=True),  # normalized transformer
}


class RMSNorm(nnx.Module):
  """``x / sqrt(mean(x^2) + eps) * scale`` over the last axis (the scale optional)."""

  def __init__(self, width: int, *, epsilon: float, use_scale: bool = True):
    self.epsilon = epsilon
    self.scale = nnx.Param(jnp.ones((width,))) if use_scale else None

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.epsilon)
    return (y if self.scale is None else y * _row(self.scale[...], y.ndim)).astype(x.dtype)


def _row(v: jax.Array, ndim: int) -> jax.Array:
  """A per-channel vector shaped to broadcast over the last axis of an ``ndim``-array."""
  return v.reshape((1,) * (ndim - 1) + v.shape)


def _param(rngs: nnx.Rngs, std: float, *shape: int) -> nnx.Param:
  return nnx.Param(std * jax.random.normal(rngs.params(), shape))


class Attention(nnx.Module):
  """Causal multi-head (or grouped-query) attention with optional QK-norm."""

  def __init__(self, width: int, heads: int, kv_heads: int, *, qk_norm: Optional[str],
               qkv: str, epsilon: float, init_std: float, rngs: nnx.Rngs):
    head_dim = width // heads
    self.heads, self.kv_heads, self.head_dim, self.qk_norm = heads, kv_heads, head_dim, qk_norm
    if qkv == "fused":
      self.qkv = _param(rngs, init_std, 3, heads, width, head_dim)
    else:
      self.q = _param(rngs, init_std, heads, width, head_dim)
      if qkv == "q_kv":
        self.kv = _param(rngs, init_std, 2, kv_heads, width, head_dim)
      else:
        self.k, self.v = (_param(rngs, init_std, kv_heads, width, head_dim) for _ in range(2))
    self.o = _param(rngs, init_std, heads, head_dim, width)
    if qk_norm is not None:
      q_width = head_dim if qk_norm == "head" else heads * head_dim
      k_width = head_dim if qk_norm == "head" else kv_heads * head_dim
      self.q_norm = RMSNorm(q_width, epsilon=epsilon)
      self.k_norm = RMSNorm(k_width, epsilon=epsilon)

  def _norm(self, norm: RMSNorm, x: jax.Array) -> jax.Array:
    if self.qk_norm == "head":
      return norm(x)
    b, t, h, d = x.shape
    return norm(x.reshape(b, t, h * d)).reshape(b, t, h, d)

  def __call__(self, x: jax.Array) -> jax.Array:
    project = lambda w: jnp.einsum("btd,hdk->bthk", x, w[...])
    if hasattr(self, "qkv"):
      q, k, v = jnp.einsum("btd,shdk->sbthk", x, self.qkv[...])
    elif hasattr(self, "kv"):
      q, (k, v) = project(self.q), jnp.einsum("btd,shdk->sbthk", x, self.kv[...])
    else:
      q, k, v = project(self.q), project(self.k), project(self.v)
    if self.qk_norm is not None:
      q, k = self._norm(self.q_norm, q), self._norm(self.k_norm, k)
    repeat = self.heads // self.kv_heads
    k, v = jnp.repeat(k, repeat, axis=2), jnp.repeat(v, repeat, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(self.head_dim)
    t = x.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    weights = jax.nn.softmax(jnp.where(causal[None, None], logits, -1e30), axis=-1)
    weights = weights.astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    return jnp.einsum("bqhd,hdw->bqw", out, self.o[...])


class MLP(nnx.Module):
  """A gated MLP, ``(GELU(x W_g) * x W_u) W_d``, gate and up fused or not."""

  def __init__(self, width: int, hidden: int, *, fused: bool, init_std: float,
               rngs: nnx.Rngs):
    if fused:
      self.gate_up = _param(rngs, init_std, 2, width, hidden)
    else:
      self.gate, self.up = (_param(rngs, init_std, width, hidden) for _ in range(2))
    self.down = _param(rngs, init_std, hidden, width)

  def __call__(self, x: jax.Array) -> jax.Array:
    if hasattr(self, "gate_up"):
      gate, up = jnp.einsum("btd,sdf->sbtf", x, self.gate_up[...])
    else:
      gate, up = x @ self.gate[...], x @ self.up[...]
    return (nnx.gelu(gate) * up) @ self.down[...]


class Block(nnx.Module):
  """One transformer block (see the module docstring)."""

  def __init__(self, width: int, heads: int, kv_heads: int, hidden: int, *, pre_norm: bool,
               qk_norm: Optional[str], post_norm: bool, ngpt: bool, qkv: str,
               fused_mlp: bool, epsilon: float, init_std: float, rngs: nnx.Rngs):
    self.pre_norm, self.post_norm, self.ngpt = pre_norm, post_norm, ngpt
    self.attn = Attention(width, heads, kv_heads, qk_norm=qk_norm, qkv=qkv,
                          epsilon=epsilon, init_std=init_std, rngs=rngs)
    self.mlp = MLP(width, hidden, fused=fused_mlp, init_std=init_std, rngs=rngs)
    norm = lambda: RMSNorm(width, epsilon=epsilon)
    if pre_norm:
      self.attn_pre, self.mlp_pre = norm(), norm()
    if post_norm:
      self.attn_post, self.mlp_post = norm(), norm()
    if ngpt:
      self.unit = RMSNorm(width, epsilon=epsilon, use_scale=False)
      self.attn_rate = nnx.Param(jnp.full((width,), 0.05))
      self.mlp_rate = nnx.Param(jnp.full((width,), 0.05))

  def _add(self, x, f, pre, post, rate):
    if self.ngpt:  # x <- N(x + a (N(f(x)) - x))
      return self.unit(x + _row(rate[...], x.ndim) * (self.unit(f(x)) - x))
    y = f(pre(x) if self.pre_norm else x)
    return x + (post(y) if self.post_norm else y)

  def __call__(self, x: jax.Array) -> jax.Array:
    get = lambda name: getattr(self, name, None)
    x = self._add(x, self.attn, get("attn_pre"), get("attn_post"), get("attn_rate"))
    return self._add(x, self.mlp, get("mlp_pre"), get("mlp_post"), get("mlp_rate"))


class Transformer(nnx.Module):
  """Token embeddings, ``layers`` blocks, a final RMSNorm (a unit norm for nGPT) and a head.

  Args:
    vocab: vocabulary size (256: bytes).
    layers: number of blocks.
    width: model width ``d``.
    heads: query heads (``width % heads == 0``; ``d_h = width // heads``).
    kv_heads: key/value heads (default ``heads``; fewer for grouped-query attention).
    hidden: the MLP's hidden width (default ``4 * width``).
    pre_norm: RMSNorm before attention and the MLP (see the module docstring).
    qk_norm: ``"head"``, ``"whole"`` or ``None``.
    post_norm: RMSNorm on what attention and the MLP add to the stream (sandwich).
    ngpt: the normalized transformer's block (no pre- or post-norms with it).
    qkv: ``"separate"``, ``"q_kv"`` or ``"fused"`` (see the module docstring).
    fused_mlp: gate and up in one ``(2, d, hidden)`` kernel.
    scan: the blocks stacked on a leading axis and run by ``nnx.scan``.
    epsilon: every RMSNorm's epsilon.
    init_std: std of the normal every kernel and the embedding are drawn from.
    rngs: ``nnx.Rngs`` with a ``params`` stream.

  Raises:
    ValueError: for head counts that do not divide, an unknown ``qk_norm`` or ``qkv``,
      ``qkv="fused"`` with grouped-query attention, or ``ngpt`` with pre- or post-norms.
  """

  def __init__(self, *, vocab: int = 256, layers: int = 2, width: int = 64, heads: int = 4,
               kv_heads: Optional[int] = None, hidden: Optional[int] = None,
               pre_norm: bool = True, qk_norm: Optional[str] = "head", post_norm: bool = False,
               ngpt: bool = False, qkv: str = "separate", fused_mlp: bool = False,
               scan: bool = False, epsilon: float = 1e-6, init_std: float = 0.02,
               rngs: nnx.Rngs):
    kv_heads = kv_heads or heads
    if width % heads or heads % kv_heads:
      raise ValueError(f"Transformer: width={width} must be divisible by heads={heads}, and "
                       f"heads by kv_heads={kv_heads}.")
    if qk_norm not in QK_NORMS:
      raise ValueError(f"Transformer: qk_norm={qk_norm!r} must be one of {QK_NORMS}.")
    if qkv not in QKV_LAYOUTS:
      raise ValueError(f"Transformer: qkv={qkv!r} must be one of {QKV_LAYOUTS}.")
    if qkv == "fused" and kv_heads != heads:
      raise ValueError(f"Transformer: qkv='fused' needs kv_heads == heads, got kv_heads="
                       f"{kv_heads}, heads={heads}.")
    if ngpt and (pre_norm or post_norm):
      raise ValueError("Transformer: ngpt normalizes the stream itself; pass pre_norm=False "
                       "and post_norm=False with it.")
    qk_norm = "head" if ngpt else qk_norm
    self.ngpt, self.scan = ngpt, scan
    self.embed = _param(rngs, init_std, vocab, width)
    options = dict(pre_norm=pre_norm, qk_norm=qk_norm, post_norm=post_norm, ngpt=ngpt,
                   qkv=qkv, fused_mlp=fused_mlp, epsilon=epsilon,
                   init_std=init_std)
    make = lambda rngs: Block(width, heads, kv_heads, hidden or 4 * width, rngs=rngs,
                              **options)
    if scan:
      self.blocks = nnx.split_rngs(splits=layers)(nnx.vmap(make, in_axes=0, out_axes=0))(rngs)
    else:
      self.blocks = List([make(rngs) for _ in range(layers)])
    self.final_norm = RMSNorm(width, epsilon=epsilon, use_scale=not ngpt)
    self.head = _param(rngs, init_std, width, vocab)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embed[...][tokens]
    if self.scan:
      x = nnx.scan(lambda x, block: block(x), in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(
          x, self.blocks)
    else:
      for block in self.blocks:
        x = block(x)
    return self.final_norm(x) @ self.head[...]


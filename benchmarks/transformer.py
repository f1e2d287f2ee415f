"""A small decoder-only transformer (Flax NNX) whose normalizations make weights scale-invariant.

The benchmarks' stand-in for the models normreg meets beyond CNNs: hundreds of
parameter leaves (one per layer and projection), or a few stacked ones when the
layers are scanned. Each block is pre-LayerNorm with two more normalizations
that put weights in scale-invariance groups:

.. math::

  h = \\mathrm{LN}_1(x), \\quad
  q = \\mathrm{LN}_q(h W_q), \\ k = \\mathrm{LN}_k(h W_k), \\ v = h W_v, \\quad
  x \\leftarrow x + \\mathrm{attn}(q, k, v) W_o,

.. math::

  x \\leftarrow x + \\mathrm{GELU}\\big(\\mathrm{LN}_m(\\mathrm{LN}_2(x) W_i + b_i)\\big) W_m + b_m .

So ``q/kernel`` and ``k/kernel`` (QK-norm over the whole width) are each
invariant as a whole (``TENSOR``), and ``mlp_in/kernel`` with ``mlp_in/bias``
only together (one joint ``TENSOR`` group): four grouped leaves per block;
with the blocks scanned, the same four leaves with a leading ``layers`` axis
(``stack=1``). ``v``, ``o``, ``mlp_out``, the embeddings, the head and every
LayerNorm's scale and bias are not invariant. Attention is causal, multi-head,
computed in float32.

``layers=12, width=768, mlp=3072`` has about 85M parameters (GPT-2 small's
blocks) with a byte vocabulary.

Example:

  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> model = Transformer(layers=2, width=16, heads=2, vocab=11, seq_len=8,
  ...                     rngs=nnx.Rngs(0))
  >>> model(jnp.zeros((3, 8), jnp.int32)).shape
  (3, 8, 11)
  >>> scanned = Transformer(layers=2, width=16, heads=2, vocab=11, seq_len=8, scan=True,
  ...                       rngs=nnx.Rngs(0))
  >>> nnx.state(scanned, nnx.Param)["blocks"]["q"]["kernel"].shape
  (2, 16, 16)
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from normreg.models.norms import List

# The leaves of a block that normreg.find_scale_invariant puts in groups.
GROUPED_PER_BLOCK = ("q/kernel", "k/kernel", "mlp_in/kernel", "mlp_in/bias")


def rules(scan: bool = False) -> list:
  """``normreg.groups_from_rules`` rules giving the groups detection finds (unscanned or
  scanned blocks): for when detecting them would cost too much (``tests`` check both agree)."""
  import normreg  # pylint: disable=g-import-not-at-top
  stack = 1 if scan else 0
  return [(r"blocks/(\d+/)?(q|k)/kernel", normreg.tensor(stack=stack)),
          (r"(blocks/(\d+/)?mlp_in)/(kernel|bias)", normreg.tensor(stack=stack, joint=r"\1")),
          (".*", None)]


class Block(nnx.Module):
  """One pre-LN block with QK-norm and a normalized MLP (see the module docstring)."""

  def __init__(self, width: int, heads: int, mlp: int, *, dtype: Optional[Any] = None,
               rngs: nnx.Rngs):
    if width % heads:
      raise ValueError(f"width={width} must be divisible by heads={heads}.")
    self.heads = heads
    dense = lambda i, o, bias=False: nnx.Linear(i, o, use_bias=bias, dtype=dtype, rngs=rngs)
    norm = lambda n: nnx.LayerNorm(n, dtype=dtype, rngs=rngs)
    self.ln1, self.ln2 = norm(width), norm(width)
    self.q, self.k, self.v, self.o = (dense(width, width) for _ in range(4))
    self.q_norm, self.k_norm = norm(width), norm(width)
    self.mlp_in, self.mlp_norm = dense(width, mlp, bias=True), norm(mlp)
    self.mlp_out = dense(mlp, width, bias=True)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, d = x.shape
    h = self.ln1(x)
    split = lambda y: y.reshape(b, t, self.heads, d // self.heads).astype(jnp.float32)
    q, k, v = split(self.q_norm(self.q(h))), split(self.k_norm(self.k(h))), split(self.v(h))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(d // self.heads)
    causal = jnp.tril(jnp.ones((t, t), bool))
    weights = jax.nn.softmax(jnp.where(causal[None, None], logits, -1e30), axis=-1)
    att = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, d).astype(x.dtype)
    x = x + self.o(att)
    return x + self.mlp_out(nnx.gelu(self.mlp_norm(self.mlp_in(self.ln2(x)))))


class Transformer(nnx.Module):
  """Token and position embeddings, ``layers`` blocks, a final LayerNorm and a head.

  Args:
    layers: number of blocks.
    width: model width ``d``.
    heads: attention heads (``width % heads == 0``).
    mlp: hidden width of the MLP (default ``4 * width``).
    vocab: vocabulary size (default 256, bytes).
    seq_len: longest input sequence (learned positions).
    scan: stack the blocks on a leading axis (``nnx.vmap`` at init) and run
      them with ``nnx.scan``; otherwise one leaf per block and parameter.
    dtype: computation dtype (params stay float32).
    rngs: ``nnx.Rngs`` with a ``params`` stream.
  """

  def __init__(self, *, layers: int, width: int, heads: int, mlp: Optional[int] = None,
               vocab: int = 256, seq_len: int = 256, scan: bool = False,
               dtype: Optional[Any] = None, rngs: nnx.Rngs):
    mlp = mlp or 4 * width
    self.embed = nnx.Embed(vocab, width, dtype=dtype, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (seq_len, width)))
    self.scan = scan
    if scan:
      @nnx.split_rngs(splits=layers)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def make_blocks(rngs):
        return Block(width, heads, mlp, dtype=dtype, rngs=rngs)

      self.blocks = make_blocks(rngs)
    else:
      self.blocks = List([Block(width, heads, mlp, dtype=dtype, rngs=rngs)
                          for _ in range(layers)])
    self.ln_f = nnx.LayerNorm(width, dtype=dtype, rngs=rngs)
    self.head = nnx.Linear(width, vocab, dtype=dtype, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    pos = self.pos[None, :tokens.shape[1]].astype(self.embed.dtype or jnp.float32)
    x = self.embed(tokens) + pos
    if self.scan:
      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
      def forward(x, block):
        return block(x)

      x = forward(x, self.blocks)
    else:
      for block in self.blocks:
        x = block(x)
    return self.head(self.ln_f(x))


def count_params(params: Any) -> int:
  return sum(x.size for x in jax.tree.leaves(params))


def lm_loss(graphdef, params, tokens: jax.Array) -> jax.Array:
  """Next-token cross-entropy of ``tokens`` (``(batch, seq_len + 1)`` int32), float32."""
  logits = nnx.merge(graphdef, params)(tokens[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                         tokens[:, 1:]).mean()


def make_lm_step(graphdef, tx: optax.GradientTransformation,
                 extra: Optional[Callable[[Any, Any], Any]] = None) -> Callable:
  """``step((params, opt_state), tokens) -> ((params, opt_state), out)``, pure, to be jitted.

  One optimizer step on the next-token loss. ``out`` is the loss, or
  ``(loss, extra(params_before, params_after))`` with ``extra`` (per-group
  metrics, say).
  """

  def step(state, tokens):
    params, opt_state = state
    loss, grads = jax.value_and_grad(lambda p: lm_loss(graphdef, p, tokens))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    new = optax.apply_updates(params, updates)
    return (new, opt_state), (loss if extra is None else (loss, extra(params, new)))

  return step


def random_tokens(batch: int, seq_len: int, vocab: int = 256, seed: int = 0) -> jax.Array:
  """``(batch, seq_len + 1)`` random int32 tokens (inputs and their next tokens)."""
  return jax.random.randint(jax.random.key(seed), (batch, seq_len + 1), 0, vocab, jnp.int32)


def detected(batch: int, *, seq_len: int, scan: bool = False, **kwargs) -> dict:
  """A :class:`Transformer` (``kwargs``), split, its groups found, and two first calls timed.

  Returns ``graphdef``, ``params``, ``tokens`` (random, ``(batch, seq_len + 1)``),
  ``groups`` (``normreg.find_scale_invariant`` on the inputs), ``grad`` (the
  jitted gradient of :func:`lm_loss`), ``detection_s`` (the first
  ``find_scale_invariant`` call: trace, compile and run its vmapped VJP, the
  numpy tests), ``fwd_bwd_first_s`` (the first ``grad`` call: compile and run),
  and the counts ``params_count``, ``leaves``, ``grouped``.
  """
  import time  # pylint: disable=g-import-not-at-top
  import normreg  # pylint: disable=g-import-not-at-top
  model = Transformer(seq_len=seq_len, scan=scan, rngs=nnx.Rngs(0), **kwargs)
  graphdef, params = nnx.split(model, nnx.Param)
  tokens = random_tokens(batch, seq_len, kwargs.get("vocab", 256))
  t0 = time.perf_counter()
  groups = normreg.find_scale_invariant(lambda p, x: nnx.merge(graphdef, p)(x), params,
                                        tokens[:, :-1])
  detection_s = time.perf_counter() - t0
  grad = jax.jit(jax.grad(lambda p: lm_loss(graphdef, p, tokens)))
  t0 = time.perf_counter()
  jax.block_until_ready(grad(params))
  fwd_bwd_first_s = time.perf_counter() - t0
  leaves = jax.tree.leaves(groups, is_leaf=lambda g: g is None)
  return {"graphdef": graphdef, "params": params, "tokens": tokens, "groups": groups,
          "grad": grad, "detection_s": detection_s, "fwd_bwd_first_s": fwd_bwd_first_s,
          "params_count": count_params(params), "leaves": len(leaves),
          "grouped": sum(g is not None for g in leaves)}

"""Transformers from JAX model libraries that nobody here wrote, with a brute-force truth.

Each builder makes a tiny model (2 blocks, width 32, 4 heads, vocabulary 64, sequence
8, batch 4) with the library's own code and initialization, in float32, and returns
``(fn, params, args, truth)``:

- ``fn(params, *args)``: the logits (float32), the library's model at its own
  normalization epsilon;
- ``params``: the parameters as the library keeps them (see each builder), a pytree of
  arrays;
- ``args``: ``(tokens,)`` (``(images,)`` for the ViT);
- ``truth``: ``{path: grouping}`` for every floating leaf (paths as
  ``normreg.groups.param_paths`` writes them), found by brute force (:func:`brute_force`)
  on the same architecture with every normalization epsilon set to 0, independent of
  normreg's detection. A grouping is one of

  - ``None``: no candidate below leaves the logits unchanged (or the leaf does not act
    on them at all: equimo's key-norm bias, which adds the same to every key);
  - ``"unit"``: a random positive factor per output unit (per element of the output
    axes) leaves them unchanged;
  - ``"heads"``: a factor per attention head does;
  - ``"whole"``: only one factor for the whole tensor does;
  - ``"stack:unit"``, ``"stack:heads"``, ``"stack:whole"``: the same, per copy of a
    leading layer axis (penzai's ``LayerStack``);
  - a list of the above, one per slice of a fused axis (a fused q/k/v or gate/up
    kernel): slice ``i`` scaled alone, the other slices left as they are.

  The finest candidate that passes is reported. Which axes "unit" and "heads" are for
  a leaf is in its :class:`Roles`; ``with_roles=True`` returns them as a fifth item.
  A kernel and its bias that are both ``None`` alone but invariant together add an
  entry ``"joint:<module path>"`` (equimo's q/k/v with biases).

Epsilon 0 is "invariant by design" (DESIGN.md section 10): with eps > 0 a norm is
invariant only where its input's mean square is much larger than eps, which a small
initialization (gemma's std 0.01) does not give.

Initialization is the library's own (its initializers, distributions and defaults),
drawn with JAX's ``rbg`` generator (:func:`_init_key`), which compiles in a fraction of
threefry's time on a CPU. Building a model and its truth takes 1.5-2 s (penzai) to
3.5-4.5 s (equimo) on two CPU cores; ``python tests/external_transformers.py [name ...]``
prints each truth beside what ``normreg.find_scale_invariant`` finds.

The builders import their library lazily: a missing library raises ImportError (use
``pytest.importorskip``). penzai and equimo are light (pure Python, no pins on jax or
flax); gemma pulls in TensorFlow and kauldron, so its builder is for a machine that
has it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from normreg import groups as groups_lib

VOCAB = 64
SEQ = 8
BATCH = 4
WIDTH = 32
HEADS = 4
HEAD_DIM = WIDTH // HEADS
HIDDEN = 64
BLOCKS = 2


@dataclasses.dataclass(frozen=True)
class Roles:
  """What the axes of one leaf are, for the brute force.

  Attributes:
    view: the shape the leaf is read in (a reshape of it: equinox's fused ``(3 * width,
      width)`` q/k/v kernel is read as ``(3, heads, head_dim, width)``); ``None``: its own.
    unit: axes of ``view`` that index output units.
    heads: axes of ``view`` that index attention heads, or ``None``.
    stack: leading axes of ``view`` that index copies of a layer (a scanned stack).
    fused: an axis of ``view`` whose slices are different weights (q, k, v), or ``None``.
  """

  unit: tuple[int, ...] = (-1,)
  heads: Optional[tuple[int, ...]] = None
  stack: tuple[int, ...] = ()
  fused: Optional[int] = None
  view: Optional[tuple[int, ...]] = None


def _init_key(seed: int) -> jax.Array:
  """The key the libraries initialize with: JAX's ``rbg`` generator. The initializers and
  their distributions are the library's; the default threefry generator would give other
  draws and take 3-4 s more to compile on a CPU (one random program per leaf shape)."""
  return jax.random.key(seed, impl="rbg")


def _small(params: Any) -> Any:
  """Every leaf of two axes or more rescaled to rms 0.01 (gemma's init std, common in LLM
  code), the vectors (norm scales, biases) left as they are."""
  def rescale(x):
    if np.ndim(x) < 2 or not jnp.issubdtype(x.dtype, jnp.floating):
      return x
    return x * (0.01 / jnp.sqrt(jnp.mean(jnp.square(x))))
  return jax.tree.map(rescale, params)


def _tokens(seed: int = 1) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (BATCH, SEQ)), jnp.int32)


def _randomize(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """``x + 0.5 rms(x) n`` (rms 1 for a zero leaf), ``n`` standard normal: a generic point,
  where a zero bias or a norm scale of ones does not make a scaling vacuous."""
  x = np.asarray(x, np.float64)
  rms = float(np.sqrt(np.mean(np.square(x)))) or 1.0
  return x + 0.5 * rms * rng.standard_normal(x.shape)


def _factors(rng: np.random.Generator, view: tuple[int, ...], kept: Sequence[int],
             fused: Optional[int], index: Optional[int]) -> np.ndarray:
  """Random positive factors, one per index of the ``kept`` axes (broadcast over the rest),
  ``|log f|`` in [0.3, 0.7]; on a ``fused`` axis only slice ``index`` is scaled."""
  shape = [view[a] if a in kept else 1 for a in range(len(view))]
  logf = rng.uniform(0.3, 0.7, shape) * rng.choice([-1.0, 1.0], shape)
  if fused is not None:
    keep = np.zeros(view[fused], bool)
    keep[index] = True
    shape_f = [1] * len(view)
    shape_f[fused] = view[fused]
    logf = np.where(keep.reshape(shape_f), np.broadcast_to(logf, np.broadcast_shapes(
        logf.shape, tuple(shape_f))), 0.0)
  return np.exp(logf)


def brute_force(fn: Callable[..., Any], params: Any, args: Sequence[Any],
                roles: dict[str, Roles], *, rtol: float = 1e-3, seed: int = 0,
                joint: bool = True, errors: Optional[dict[str, Any]] = None
                ) -> dict[str, Any]:
  """The finest grouping per leaf that leaves ``fn(params, *args)`` unchanged.

  At a randomized point of ``params`` (:func:`_randomize`), each leaf in turn is
  multiplied by random positive factors per group of each candidate (per output unit,
  per head, the whole tensor; per copy of a stack axis; per slice of a fused axis,
  that slice alone). The change of the logits, ``max |f' - f| / max |f|``, is compared
  with the change a factor per element of the same sizes makes (the leaf's effect): a
  candidate passes at most ``rtol`` times that. Measured on the models here: at most
  7e-6 times where invariant (float32 rounding), at least 1e-2 times where not. A
  leaf whose effect is below 1e-6 does not act on ``fn``: ``None``. (A fixed tolerance on
  the logits would not do: at rms 0.01 without pre-norms the queries move the logits by
  1e-5 only.)

  With ``joint``, a ``weight``/``kernel`` and the ``bias`` beside it that are both
  ``None`` (every slice) are tried together, the bias scaled by the kernel's factors
  (its axes are the kernel's leading axes: equinox's ``(out, in)``): the result is
  ``truth["joint:" + module path]``, only where some candidate passes.

  ``errors``, if given, receives ``{path: {candidate: relative error}}``.
  """
  f = jax.jit(fn)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  rng = np.random.default_rng(seed)
  base = [_randomize(x, rng).astype(np.asarray(x).dtype)
          if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x for _, x in leaves]
  run = lambda values: np.asarray(f(treedef.unflatten(values), *args), np.float64)
  ref = run(base)
  size = float(np.max(np.abs(ref)))
  if not np.isfinite(size) or size == 0:
    raise ValueError(f"brute_force: the logits are not usable (max |f| = {size})")

  def error(changes):
    """Relative change of the logits with ``{leaf index: new float64 value}``."""
    new = list(base)
    for i, x in changes.items():
      new[i] = x.astype(base[i].dtype)
    return float(np.max(np.abs(run(new) - ref)) / size)

  names = [groups_lib.path_str(p) for p, _ in leaves]
  index = {n: i for i, n in enumerate(names)}
  logs = errors if errors is not None else {}

  def search(members, name):
    """Finest grouping of ``members`` (leaf indices; the first one's roles decide, the
    others' axes are its leading axes), scaled together."""
    i0 = members[0]
    r = roles.get(names[i0], Roles())
    shapes = {i: np.shape(leaves[i][1]) for i in members}
    view = tuple(r.view or shapes[i0])
    assert math.prod(view) == math.prod(shapes[i0]), (names[i0], view, shapes[i0])
    nd = len(view)
    norm = lambda axes: tuple(sorted(a % nd for a in axes))
    stack = norm(r.stack)
    cands = [("unit", norm(r.unit))] + ([("heads", norm(r.heads))] if r.heads else [])
    cands = [(n, tuple(sorted(set(stack) | set(k)))) for n, k in cands] + [("whole", stack)]
    seen, ordered = set(), []  # finest (most groups) first; one per set of axes
    for n, k in sorted(cands, key=lambda c: -math.prod(view[a] for a in c[1])):
      if k not in seen:
        seen.add(k)
        ordered.append((("stack:" if stack else "") + n, k))
    # a joint member spans the first one's leading axes: own_nd[i] of them
    own_nd = {i: nd if i == i0 else
              next(k for k in range(nd + 1) if math.prod(view[:k]) == math.prod(shapes[i]))
              for i in members}
    log = logs.setdefault(name, {})
    found = []
    for j in (range(view[r.fused]) if r.fused is not None else [None]):
      answer = None
      for n, kept in ordered:
        if any(a >= own_nd[i] for a in kept for i in members[1:]):
          continue
        fac = _factors(rng, view, kept, r.fused, j)
        changes = {}
        for i in members:
          k = own_nd[i]
          fi = fac.reshape(fac.shape[:k]) if k < nd else fac
          v = np.asarray(base[i], np.float64)
          changes[i] = (v.reshape(view[:k]) * fi).reshape(shapes[i])
        err = error(changes)
        log[n if j is None else f"{j}:{n}"] = err
        if err <= rtol * effect[i0]:
          answer = n
          break
      found.append(answer)
    return found if r.fused is not None else found[0]

  truth, effect = {}, {}
  for i, (name, x) in enumerate(zip(names, base)):
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
      continue
    v = np.asarray(x, np.float64)
    effect[i] = error({i: v * _factors(rng, v.shape, range(v.ndim), None, None)})
    logs.setdefault(name, {})["effect"] = effect[i]
    truth[name] = None if effect[i] <= 1e-6 else search([i], name)

  if joint:
    none = lambda t: t is None or (isinstance(t, list) and not any(t))
    for name in names:
      module, _, leaf = name.rpartition("/")
      bias = f"{module}/bias"
      if (leaf in ("weight", "kernel", "w") and bias in truth and none(truth.get(name))
          and none(truth[bias])):
        found = search([index[name], index[bias]], f"joint:{module}")
        if not none(found):
          truth[f"joint:{module}"] = found
  return truth


# --------------------------------------------------------------------------- penzai


def penzai_llamalike(*, kv_heads: int = HEADS, post_norms: bool = True,
                     qk_norm: Optional[str] = None, pre_norms: bool = True,
                     layer_stack: bool = False, small_init: bool = False, seed: int = 0,
                     with_roles: bool = False):
  """penzai's llama-like transformer (``penzai.models.transformer.variants.
  llamalike_common``), the family of its Gemma 1-2, Llama and Mistral variants: GeGLU
  MLP, RoPE, RMSNorm, tied embeddings, logit soft caps as Gemma 2.

  Args:
    kv_heads: ``HEADS`` (multi-head: axes ``heads``), 1 (multi-query: ``query_heads``),
      or 2 (grouped-query: ``head_groups`` x ``query_heads``).
    post_norms: Gemma 2's sandwich norms (``use_post_attn_norm``, ``use_post_ffw_norm``).
    qk_norm: ``None``; ``"head"`` (Gemma 3: RMSNorm of q and k per head) or ``"whole"``
      (OLMo 2: over all of q, all of k). penzai 0.2.5 has no QK-norm option: it is
      inserted with penzai's own editing tools (``pz.select``) and its own
      ``pz.nn.RMSLayerNorm`` after the query and key projections (before RoPE).
    pre_norms: ``False`` removes the pre-attention and pre-MLP norms (OLMo 2, with
      ``post_norms`` and ``qk_norm="whole"``), by the same editing tools.
    layer_stack: the blocks as one ``LayerStack`` (a leading ``blocks`` axis on every
      block parameter; no QK-norm edits then).
    small_init: the matrices and the embedding table rescaled to rms 0.01 after penzai's
      init (Xavier uniform, rms 0.14-0.2; embeddings rms 0.18).

  ``params`` is ``{label: array}`` (penzai's parameter labels less ``transformer/``, the
  arrays of its NamedArrays in their axis order); ``fn`` binds them into the model. eps
  is ``rms_norm_eps`` of the config (penzai's default 1e-6): the truth's model is built
  from the same config with ``rms_norm_eps=0``.
  """
  from penzai import pz  # pylint: disable=g-import-not-at-top
  from penzai.models.transformer.variants import llamalike_common as ll  # pylint: disable=g-import-not-at-top

  if layer_stack and (qk_norm or not pre_norms):
    raise ValueError("penzai_llamalike: layer_stack takes no QK-norm or pre-norm edits")
  config = ll.LlamalikeTransformerConfig(
      num_kv_heads=kv_heads, query_head_multiplier=HEADS // kv_heads, embedding_dim=WIDTH,
      projection_dim=HEAD_DIM, mlp_hidden_dim=HIDDEN, num_decoder_blocks=BLOCKS,
      vocab_size=VOCAB, mlp_variant="geglu_approx", tie_embedder_and_logits=True,
      use_post_attn_norm=post_norms, use_post_ffw_norm=post_norms,
      final_logit_softcap=30.0, attn_logits_soft_cap=50.0, use_layer_stack=layer_stack)

  def build(config, rng):
    model = ll.build_llamalike_transformer(config, init_base_rng=rng)
    if qk_norm:
      model = _penzai_qk_norm(pz, model, qk_norm, config, rng)
    if not pre_norms:
      model = (pz.select(model).at_instances_of(pz.nn.RMSLayerNorm)
               .where(lambda norm: "/pre_" in _penzai_label(norm.sublayers[1]))
               .apply(lambda _: pz.nn.Identity()))
    return model

  values = jax.jit(lambda key: {v.label: v.value for v in pz.unbind_params(
      build(config, key), freeze=True)[1]})(_init_key(seed))
  prefix = "transformer/"
  axes = {k.removeprefix(prefix): tuple(v.named_axes) for k, v in values.items()}
  params = {k.removeprefix(prefix): v.unwrap(*v.named_axes) for k, v in values.items()}
  if small_init:
    params = _small(params)

  def make_fn(config):
    unbound = build(config, None)  # parameter slots, no initialization

    def fn(params, tokens):
      model = pz.bind_variables(unbound, [
          pz.ParameterValue(value=pz.nx.wrap(params[k]).tag(*axes[k]), label=prefix + k)
          for k in params])
      return model(pz.nx.wrap(tokens).tag("batch", "seq")).unwrap(
          "batch", "seq", "vocabulary").astype(jnp.float32)

    return fn

  fn = make_fn(config)
  fn0 = make_fn(dataclasses.replace(config, rms_norm_eps=0.0))
  roles = {k: _penzai_roles(k, a) for k, a in axes.items()}
  args = (_tokens(),)
  truth = brute_force(fn0, params, args, roles)
  return (fn, params, args, truth, roles) if with_roles else (fn, params, args, truth)


def _penzai_label(linear) -> str:
  return linear.weights.label


def _penzai_qk_norm(pz, model, kind, config, rng):
  """Inserts ``pz.nn.RMSLayerNorm`` after the query and key projections of every
  ``pz.nn.Attention``: across ``projection`` (per head) or across the head axes too."""

  def edit(attn):
    q_lin, *q_rest = attn.input_to_query.sublayers
    k_lin, *k_rest = attn.input_to_key.sublayers
    where = _penzai_label(q_lin).rpartition("/")[0]
    across = lambda heads: ({"projection": config.projection_dim} if kind == "head" else
                            {**heads, "projection": config.projection_dim})
    norm = lambda name, heads: pz.nn.RMSLayerNorm.from_config(
        name=f"{where}/{name}", init_base_rng=rng, across_axes=across(heads),
        epsilon=config.rms_norm_eps)
    return dataclasses.replace(
        attn,
        input_to_query=pz.nn.Sequential([q_lin, norm("query_norm", heads_q), *q_rest]),
        input_to_key=pz.nn.Sequential([k_lin, norm("key_norm", heads_k), *k_rest]))

  common, query_only = model.metadata.common_head_axes, model.metadata.query_only_head_axes
  heads_q, heads_k = {**common, **query_only}, common
  if kind not in ("head", "whole"):
    raise ValueError(f"qk_norm must be None, 'head' or 'whole', got {kind!r}")
  return pz.select(model).at_instances_of(pz.nn.Attention).apply(edit)


_PENZAI_HEADS = ("heads", "head_groups", "query_heads")


def _penzai_roles(label: str, axes: tuple[str, ...]) -> Roles:
  """Output axes by layer (penzai names its axes, not their roles): q/k/v project onto the
  head and projection axes, the attention output onto ``embedding``, the MLP onto
  ``neurons`` then ``embedding``; a norm's scale, a per-head norm's scale and the
  embedding table: per element of their last axes."""
  index = {a: i for i, a in enumerate(axes)}
  heads = tuple(index[a] for a in _PENZAI_HEADS if a in index) or None
  stack = (index["blocks"],) if "blocks" in index else ()
  leaf = label.rpartition("/")[2]
  if leaf in ("query.weights", "key.weights", "value.weights"):
    unit = tuple(i for a, i in index.items() if a in _PENZAI_HEADS or a == "projection")
  elif leaf in ("output.weights", "out_linear.weights"):
    unit = (index["embedding"],)
  elif leaf in ("gating_linear.weights", "value_linear.weights"):
    unit = (index["neurons"],)
  else:  # scales, embedding table
    unit = tuple(i for a, i in index.items() if a not in ("blocks", "vocabulary"))
  return Roles(unit=unit, heads=heads, stack=stack)


# --------------------------------------------------------------------------- equimo


def equimo_vit(*, qk_norm: bool = True, qkv_bias: bool = False, norm: str = "layernorm",
               small_init: bool = False, seed: int = 0, with_roles: bool = False):
  """equimo's ``VisionTransformer`` (equinox), pre-norm, with ViT-22B's QK-norm (a norm of
  q and k per head) behind a fused q/k/v ``eqx.nn.Linear`` of weight ``(3 * width,
  width)``: rows ``[s * width + h * head_dim + p]`` for s in q, k, v.

  8x8x3 images in patches of 2 (16 tokens and a class token), 10 classes. ``params`` is
  ``eqx.partition(model, eqx.is_inexact_array)[0]`` (an equinox Module: normreg reads it
  output-first). eps is the model's ``eps`` (equimo's default 1e-5, every norm, static
  fields of ``eqx.nn.LayerNorm``/``RMSNorm``): the truth's model is the same
  constructor and key with ``eps=0``.

  Args:
    qk_norm: the QK-norm (equimo's ``qk_norm``).
    qkv_bias: biases on q, k, v (equimo's default True): then a q or k slice of the
      kernel is not invariant alone, only with its bias.
    norm: equimo's ``norm_layer``: ``"layernorm"`` or ``"rmsnorm"``.
    small_init: the kernels, class token and position table rescaled to rms 0.01 after
      equimo's init (equinox's uniform, rms ~0.1; class token and positions rms 1).
  """
  import equinox as eqx  # pylint: disable=g-import-not-at-top
  from equimo.models import VisionTransformer  # pylint: disable=g-import-not-at-top

  kwargs = dict(img_size=8, in_channels=3, dim=WIDTH, patch_size=2, num_heads=HEADS,
                depths=[BLOCKS], num_classes=10, reg_tokens=0, mlp_ratio=HIDDEN / WIDTH,
                qk_norm=qk_norm, qkv_bias=qkv_bias, norm_layer=norm)
  # One compiled program (equinox initializes leaf by leaf, eagerly); the eps=0 model's
  # structure only, its arrays being the same.
  model = eqx.filter_jit(lambda key: VisionTransformer(**kwargs, key=key))(_init_key(seed))
  model0 = eqx.filter_eval_shape(lambda key: VisionTransformer(**kwargs, eps=0.0, key=key),
                                 _init_key(seed))
  params, static = eqx.partition(model, eqx.is_inexact_array)
  if small_init:
    params = _small(params)
  params0, static0 = eqx.partition(model0, lambda x: isinstance(x, jax.ShapeDtypeStruct)
                                   and jnp.issubdtype(x.dtype, jnp.inexact))
  treedef0 = jax.tree_util.tree_structure(params0)
  key = _init_key(0)  # dropout is off (inference=True, rates 0)

  def fn(params, images):
    net = eqx.combine(params, static)
    return jax.vmap(lambda x: net(x, key=key, inference=True))(images)

  def fn0(params, images):  # eps is static: the treedefs differ, the leaves do not
    net = eqx.combine(treedef0.unflatten(jax.tree_util.tree_leaves(params)), static0)
    return jax.vmap(lambda x: net(x, key=key, inference=True))(images)

  images = jnp.asarray(np.random.default_rng(1).standard_normal((BATCH, 3, 8, 8)), jnp.float32)
  roles = {}
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = groups_lib.path_str(path)
    if name.endswith("qkv/weight"):
      roles[name] = Roles(view=(3, HEADS, HEAD_DIM, WIDTH), unit=(1, 2), heads=(1,), fused=0)
    elif name.endswith("qkv/bias"):
      roles[name] = Roles(view=(3, HEADS, HEAD_DIM), unit=(1, 2), heads=(1,), fused=0)
    elif name.endswith("attn/proj/weight"):  # input side per head
      roles[name] = Roles(view=(WIDTH, HEADS, HEAD_DIM), unit=(0,), heads=(1,))
    elif np.ndim(x) >= 2 and not name.endswith(("cls_token", "pos_embed/weight")):
      roles[name] = Roles(unit=(0,))  # (out, in, ...)
    else:  # vectors, class token (1, width), position table (tokens, width)
      roles[name] = Roles(unit=(-1,))
  args = (images,)
  truth = brute_force(fn0, params, args, roles)
  return (fn, params, args, truth, roles) if with_roles else (fn, params, args, truth)


# --------------------------------------------------------------------------- gemma


def gemma3(*, kv_heads: int = HEADS, seed: int = 0, with_roles: bool = False):
  """google-deepmind/gemma's ``gm.nn.Transformer`` (flax linen) at a Gemma 3 config:
  QK-norm per head, sandwich norms, GeGLU, tied embeddings, init std 0.01 (gemma's
  ``Einsum`` default: a small initialization).

  ``kv_heads == HEADS``: one fused ``qkv_einsum/w`` ``(3, heads, width, head_dim)``;
  else ``q_einsum/w`` ``(heads, width, head_dim)`` and ``kv_einsum/w`` ``(2, kv_heads,
  width, head_dim)``. ``mlp/gating_einsum`` is ``(2, hidden, width)`` (gate, up),
  ``mlp/linear`` ``(hidden, width)``. ``params`` is the linen ``params`` dict. eps is a
  literal 1e-6 in ``gemma.gm.nn._layers.RMSNorm``: the truth's model swaps that class,
  while it is traced, for a subclass that is the same computation with eps 0.

  Needs ``pip install gemma`` (TensorFlow, kauldron and ~110 other packages).
  """
  from gemma import gm  # pylint: disable=g-import-not-at-top
  from gemma.gm.nn import _layers  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  config = gm.nn.config.TransformerConfig(
      num_embed=VOCAB, embed_dim=WIDTH, hidden_dim=HIDDEN, num_heads=HEADS,
      head_dim=HEAD_DIM, num_kv_heads=kv_heads, final_logit_softcap=None,
      use_post_attn_norm=True, use_post_ffw_norm=True, use_qk_norm=True,
      attention_types=(gm.nn.AttentionType.GLOBAL,) * BLOCKS,
      transpose_gating_einsum=True)
  model = gm.nn.Transformer(config=config, dtype=jnp.float32)
  tokens = _tokens()
  params = jax.jit(lambda key: model.init(key, tokens)["params"])(_init_key(seed))

  def fn(params, tokens):
    return model.apply({"params": params}, tokens).logits.astype(jnp.float32)

  original = _layers.RMSNorm

  class RMSNormEps0(original):  # pylint: disable=missing-class-docstring

    @nn.compact
    def __call__(self, x):
      scale = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1]))
      normed = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True))
      return normed * (1 + jnp.expand_dims(scale, axis=range(len(x.shape) - 1)))

  # Transformer.__call__ is an nn.jit with the module static: its trace is cached per
  # module, so the eps=0 model is another instance (equal but for a field that changes
  # nothing here), traced while the class is swapped.
  model0 = gm.nn.Transformer(config=config, dtype=jnp.float32, return_last_only=False)

  def fn0(params, tokens):
    _layers.RMSNorm = RMSNormEps0
    try:
      return model0.apply({"params": params}, tokens).logits.astype(jnp.float32)
    finally:
      _layers.RMSNorm = original

  roles = {}
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = groups_lib.path_str(path)
    if name.endswith(("qkv_einsum/w", "kv_einsum/w")):
      roles[name] = Roles(unit=(1, 3), heads=(1,), fused=0)  # (s, heads, d, head_dim)
    elif name.endswith("q_einsum/w"):
      roles[name] = Roles(unit=(0, 2), heads=(0,))  # (heads, d, head_dim)
    elif name.endswith("attn_vec_einsum/w"):
      roles[name] = Roles(unit=(2,), heads=(0,))  # (heads, head_dim, d): input per head
    elif name.endswith("gating_einsum"):
      roles[name] = Roles(unit=(1,), fused=0)  # (2, hidden, d)
    elif name.endswith("mlp/linear"):
      roles[name] = Roles(unit=(1,))  # (hidden, d)
    else:  # norm scales, the embedding table (vocab, d)
      roles[name] = Roles(unit=(-1,))
  args = (tokens,)
  truth = brute_force(fn0, params, args, roles)
  return (fn, params, args, truth, roles) if with_roles else (fn, params, args, truth)


# --------------------------------------------------------------------------- registry

MODELS: dict[str, Callable[..., Any]] = {
    # penzai: Gemma 2 (sandwich norms), multi-head and grouped-query layouts
    "penzai_gemma2_mha": functools.partial(penzai_llamalike),
    "penzai_gemma2_gqa": functools.partial(penzai_llamalike, kv_heads=2),
    "penzai_gemma2_stack": functools.partial(penzai_llamalike, layer_stack=True),
    # penzai: Llama-style pre-norm only (nothing invariant alone)
    "penzai_prenorm": functools.partial(penzai_llamalike, post_norms=False),
    # penzai, edited with its own tools: Gemma 3 (QK-norm per head) and OLMo 2
    "penzai_gemma3_gqa": functools.partial(penzai_llamalike, kv_heads=2, qk_norm="head"),
    "penzai_olmo2": functools.partial(penzai_llamalike, qk_norm="whole", pre_norms=False),
    # the same at a small init (rms 0.01): penzai's own is Xavier (rms ~0.18)
    "penzai_gemma3_gqa_small": functools.partial(penzai_llamalike, kv_heads=2, qk_norm="head",
                                                 small_init=True),
    "penzai_olmo2_small": functools.partial(penzai_llamalike, qk_norm="whole",
                                            pre_norms=False, small_init=True),
    # equimo (equinox): ViT with QK-norm per head behind a fused q/k/v Linear
    "equimo_vit_qknorm": functools.partial(equimo_vit),
    "equimo_vit_qknorm_bias": functools.partial(equimo_vit, qkv_bias=True),
    "equimo_vit_qknorm_rms": functools.partial(equimo_vit, norm="rmsnorm"),
    "equimo_vit_qknorm_small": functools.partial(equimo_vit, small_init=True),
    # gemma (heavy, optional): Gemma 3, fused q/k/v and grouped-query; its own init is
    # small already (std 0.01)
    "gemma3_fused": functools.partial(gemma3),
    "gemma3_gqa": functools.partial(gemma3, kv_heads=2),
}


def main(names: Sequence[str]) -> None:
  """Prints, per model, the time to build it with its truth, and each leaf's truth beside
  what ``normreg.find_scale_invariant`` finds: ``python tests/external_transformers.py
  [name ...]`` (every model of :data:`MODELS` whose library is installed by default)."""
  import time  # pylint: disable=g-import-not-at-top
  import normreg  # pylint: disable=g-import-not-at-top

  for name in names or MODELS:
    start = time.perf_counter()
    try:
      fn, params, args, truth = MODELS[name]()
    except ImportError as e:
      print(f"{name}: skipped ({e})")
      continue
    built = time.perf_counter() - start
    start = time.perf_counter()
    found = groups_lib.groups_by_path(normreg.find_scale_invariant(fn, params, *args), name)
    print(f"{name}: built with its truth in {built:.2f} s, detected in "
          f"{time.perf_counter() - start:.2f} s")
    for path, want in truth.items():
      got = "" if path.startswith("joint:") else str(found.get(path))
      print(f"  {path:48s} {str(want):28s} {got}")


if __name__ == "__main__":
  import sys  # pylint: disable=g-import-not-at-top
  main(sys.argv[1:])

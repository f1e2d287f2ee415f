"""Detection on normreg.models.Transformer, option by option, against groups written by hand.

Each option's groups are written out below from the architecture (docs/transformers.md's
table), and checked twice, independently of detection: by brute force, scaling each group by
random positive factors in the same model with every RMSNorm's epsilon set to 0 (so the
table itself is right), and then against ``find_scale_invariant`` at the model's own small
initialization (std 0.01), where the epsilons are not negligible.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import normreg
from normreg.models import Transformer

T, T1, T2 = normreg.TENSOR, normreg.tensor(stack=1), normreg.tensor(stack=2)
OPTIONS = {
    "gemma3_gqa": dict(qk_norm="head", post_norm=True, kv_heads=2, qkv="q_kv"),
    "gemma3_fused": dict(qk_norm="head", post_norm=True, qkv="fused", fused_mlp=True),
    "olmo2": dict(pre_norm=False, qk_norm="whole", post_norm=True),
    "ngpt": dict(pre_norm=False, ngpt=True, fused_mlp=True, kv_heads=2, qkv="q_kv"),
    "qk_norm_only": dict(qk_norm="head", qkv="fused"),
    "pre_norm_only": dict(qk_norm=None, kv_heads=2),
    "gemma3_scanned": dict(qk_norm="head", post_norm=True, kv_heads=2, qkv="q_kv", scan=True),
}
LAYERS, VOCAB = 2, 32


def _lift(group):
  """The group of a leaf with one more (layer) axis in front."""
  if group is None:
    return None
  if isinstance(group, normreg.Sliced):
    return normreg.sliced(*(_lift(g) for g in group.groups), axis=group.axis + 1)
  return normreg.tensor(stack=group.stack + 1)


def by_hand(pre_norm=True, qk_norm="head", post_norm=False, ngpt=False, qkv="separate",
            fused_mlp=False, kv_heads=None, scan=False):
  """Each leaf's by-design group, from the architecture alone."""
  del kv_heads
  post = post_norm or ngpt  # what attention and the MLP add is normalized
  qk = {"head": T1, "whole": T, None: None}["head" if ngpt else qk_norm]
  v = T if post else None
  block = {"attn/o": v, "attn/q_norm/scale": None, "attn/k_norm/scale": None}
  if qk is None:
    block = {"attn/o": v}
  def fused(*parts):
    if all(g is T for g in parts):
      return T1  # each slice as a whole: one more stack axis says it
    return normreg.sliced(*parts) if any(parts) else None

  if qkv == "fused":
    block["attn/qkv"] = fused(qk, qk, v)
  elif qkv == "q_kv":
    block["attn/q"], block["attn/kv"] = qk, fused(qk, v)
  else:
    block["attn/q"], block["attn/k"], block["attn/v"] = qk, qk, v
  if fused_mlp:
    block["mlp/gate_up"] = normreg.sliced(None, T) if post else None
  else:
    block["mlp/gate"], block["mlp/up"] = None, (T if post else None)
  block["mlp/down"] = T if post else None
  if pre_norm:
    # Everything after the attention's pre-norm is normalized (q, k) or post-normalized (v).
    block["attn_pre/scale"] = T if (qk is not None and post_norm) else None
    block["mlp_pre/scale"] = None  # it feeds the gate's GELU
  if post_norm:
    block["attn_post/scale"] = block["mlp_post/scale"] = None
  if ngpt:
    block["attn_rate"] = block["mlp_rate"] = None
  out = {"embed": None, "head": None}
  if not ngpt:
    out["final_norm/scale"] = None
  for name, group in block.items():
    if scan:
      out[f"blocks/{name}"] = _lift(group)
    else:
      out.update({f"blocks/{i}/{name}": group for i in range(LAYERS)})
  return out


def _model(options, epsilon=1e-6):
  model = Transformer(vocab=VOCAB, layers=LAYERS, width=32, heads=4, init_std=0.01,
                      epsilon=epsilon, rngs=nnx.Rngs(0), **options)
  graphdef, params = nnx.split(model, nnx.Param)
  return (lambda p, x: nnx.merge(graphdef, p)(x)), params


TOKENS = jax.random.randint(jax.random.key(1), (4, 8), 0, VOCAB)


def _flat(tree):
  return {normreg.groups.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: x is None or isinstance(x, normreg.Sliced))[0]}


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_the_hand_written_groups_are_invariant_at_eps_zero_by_brute_force(name):
  fn, params = _model(OPTIONS[name], epsilon=0.0)
  groups = by_hand(**OPTIONS[name])
  assert set(_flat(groups)) == set(normreg.param_paths(params))
  forward = jax.jit(fn)
  want = np.asarray(forward(params, TOKENS))
  rng = np.random.default_rng(0)
  flat = _flat(groups)
  scaled = jax.tree_util.tree_map_with_path(
      lambda p, x: _numpy_scaled(np.asarray(x), flat[normreg.groups.path_str(p)], rng), params)
  np.testing.assert_allclose(forward(scaled, TOKENS), want, rtol=2e-4, atol=2e-4 * np.abs(
      want).max())
  # And nothing left out is invariant: scaling it alone (a leaf, or an ungrouped slice of a
  # fused leaf: the gate) by 3 moves the logits.
  moved_alone = lambda path, change: jax.tree_util.tree_map_with_path(
      lambda p, x: change(np.asarray(x)) if normreg.groups.path_str(p) == path else x, params)
  for path, group in flat.items():
    changes = []
    if group is None and "rate" not in path:
      changes.append(lambda x: 3 * x)
    elif isinstance(group, normreg.Sliced):
      changes += [lambda x, i=i, a=group.axis: _scale_slice(x, a, i, 3.0)
                  for i, g in enumerate(group.groups) if g is None]
    for change in changes:
      moved = np.asarray(forward(moved_alone(path, change), TOKENS))
      assert np.abs(moved - want).max() / np.abs(want).max() > 1e-5, path  # rounding: 1e-7


def _scale_slice(x, axis, i, factor):
  x = np.array(x)
  index = [slice(None)] * x.ndim
  index[axis] = i
  x[tuple(index)] *= factor
  return x


def _numpy_scaled(x, group, rng):
  """``x`` times a random positive factor per group of ``group`` (the tensor groups of the
  table: one per copy of the ``stack`` leading axes; per slice for a sliced leaf), in
  numpy, independently of normreg's reductions."""
  if group is None:
    return x
  if isinstance(group, normreg.Sliced):
    x = np.array(x)
    for i, g in enumerate(group.groups):
      index = [slice(None)] * x.ndim
      index[group.axis] = i
      x[tuple(index)] = _numpy_scaled(x[tuple(index)], g, rng)
    return x
  assert group.kind is normreg.Invariance.TENSOR  # the table's only kind
  shape = x.shape[:group.stack] + (1,) * (x.ndim - group.stack)
  return x * rng.uniform(0.2, 5.0, shape).astype(x.dtype)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_detection_finds_each_options_groups_at_a_small_init(name):
  fn, params = _model(OPTIONS[name])
  found = normreg.find_scale_invariant(fn, params, TOKENS)
  assert _flat(found) == _flat(by_hand(**OPTIONS[name]))


def test_detection_at_a_width_where_a_nested_vmap_miscompiled():
  # 1 block of width 256, 64 tokens: with the eps scale vmapped around the probes' vmap,
  # jax 0.10's CPU backend gave the second probe wrong gradients under jit, and q per head
  # came out not invariant (detection now vmaps over (eps scale, probe) pairs at once).
  model = Transformer(vocab=VOCAB, layers=1, width=256, heads=4, rngs=nnx.Rngs(0),
                      qk_norm="head", post_norm=True, qkv="q_kv")
  graphdef, params = nnx.split(model, nnx.Param)
  tokens = jax.random.randint(jax.random.key(1), (4, 64), 0, VOCAB)
  found = normreg.find_scale_invariant(lambda p, x: nnx.merge(graphdef, p)(x), params, tokens)
  want = {k.replace("blocks/1/", "blocks/0/"): v for k, v in by_hand(
      qk_norm="head", post_norm=True, qkv="q_kv").items() if not k.startswith("blocks/1/")}
  assert _flat(found) == want

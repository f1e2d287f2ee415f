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
    "gemma3_gqa": dict(qk_norm="head", post_norm=True, kv_heads=2),
    "gemma3_fused": dict(qk_norm="head", post_norm=True, fused_qkv=True, fused_mlp=True),
    "olmo2": dict(pre_norm=False, qk_norm="whole", post_norm=True),
    "ngpt": dict(pre_norm=False, ngpt=True, fused_mlp=True, kv_heads=2),
    "qk_norm_only": dict(qk_norm="head", fused_qkv=True),
    "pre_norm_only": dict(qk_norm=None),
    "gemma3_scanned": dict(qk_norm="head", post_norm=True, kv_heads=2, scan=True),
}
LAYERS, VOCAB = 2, 32


def _lift(group):
  """The group of a leaf with one more (layer) axis in front."""
  if group is None:
    return None
  if isinstance(group, normreg.Sliced):
    return normreg.sliced(*(_lift(g) for g in group.groups), axis=group.axis + 1)
  return normreg.tensor(stack=group.stack + 1)


def by_hand(pre_norm=True, qk_norm="head", post_norm=False, ngpt=False, fused_qkv=False,
            fused_mlp=False, kv_heads=None, scan=False):
  """Each leaf's by-design group, from the architecture alone."""
  del kv_heads
  post = post_norm or ngpt  # what attention and the MLP add is normalized
  qk = {"head": T1, "whole": T, None: None}["head" if ngpt else qk_norm]
  v = T if post else None
  block = {"attn/o": v, "attn/q_norm/scale": None, "attn/k_norm/scale": None}
  if qk is None:
    block = {"attn/o": v}
  parts = (qk, qk, v) if fused_qkv else (qk, v)
  if all(g is T for g in parts):
    fused = T1  # each slice as a whole: one more stack axis says it
  elif any(parts):
    fused = normreg.sliced(*parts)
  else:
    fused = None
  if fused_qkv:
    block["attn/qkv"] = fused
  else:
    block["attn/q"], block["attn/kv"] = qk, fused
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
  factor = lambda shape: rng.uniform(0.2, 5.0, shape)  # one per group: per head, per slice, ...
  scaled = normreg.rescale_groups(params, groups, factor)
  np.testing.assert_allclose(forward(scaled, TOKENS), want, rtol=2e-4, atol=2e-4 * np.abs(
      want).max())
  # And no leaf left out is invariant: scaling it alone by 3 moves the logits.
  for path, group in _flat(groups).items():
    if group is None and "rate" not in path:
      moved = jax.tree_util.tree_map_with_path(
          lambda p, x, path=path: 3 * x if normreg.groups.path_str(p) == path else x, params)
      change = np.abs(np.asarray(forward(moved, TOKENS)) - want).max() / np.abs(want).max()
      assert change > 1e-5, path  # float32 rounding is ~1e-7; a small init, small effects


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_detection_finds_each_options_groups_at_a_small_init(name):
  fn, params = _model(OPTIONS[name])
  found = normreg.find_scale_invariant(fn, params, TOKENS)
  assert _flat(found) == _flat(by_hand(**OPTIONS[name]))

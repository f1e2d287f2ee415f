"""Detection on transformers that nobody here wrote, against a brute-force truth.

The models and their truth are built by ``tests/external_transformers.py``: penzai's
llama-like transformer (Gemma 2's sandwich norms, and Gemma 3 and OLMo 2 layouts made with
penzai's own editing tools and norms) and equimo's ViT (equinox) with QK-norm behind a
fused q/k/v ``Linear``, each with its library's own initialization (and at rms 0.01).
The truth there is brute force on the same architecture with every normalization epsilon
set to 0, independent of normreg; here each leaf's detected groups must be the same
partition of its elements as the truth's: every invariant kernel at its finest, nothing
unsound, nothing ungrouped that the truth groups.
"""
import os

import numpy as np
import pytest

import normreg
import external_transformers as ext

# Light enough for CI (2-4 s to build with the truth, 2-3 s to detect, each); the others of
# ext.MODELS with NORMREG_ALL_EXTERNAL=1 (gemma's need `pip install gemma`).
CI_MODELS = ("penzai_gemma3_gqa_small", "penzai_olmo2_small", "penzai_gemma2_stack",
             "penzai_prenorm", "equimo_vit_qknorm_small", "equimo_vit_qknorm_bias")
MODELS = sorted(ext.MODELS) if os.environ.get("NORMREG_ALL_EXTERNAL") else CI_MODELS


def _index_labels(shape, kept):
  """Each element's index over the ``kept`` axes (its group), as an array of ``shape``."""
  grids = np.indices(shape)
  sizes = [shape[a] for a in kept]
  return np.ravel_multi_index([grids[a] for a in kept], sizes) if kept else np.zeros(
      shape, int)


def truth_labels(want, roles, shape):
  """The truth's partition of a leaf: a group number per element, -1 where ungrouped."""
  view = tuple(roles.view or shape)
  nd = len(view)
  norm = lambda axes: sorted({a % nd for a in axes})

  def kept(label, drop=None):
    stack, _, kind = label.rpartition(":")
    axes = set(norm(roles.stack)) if stack else set()
    axes |= set(norm({"unit": roles.unit, "heads": roles.heads or (), "whole": ()}[kind]))
    return sorted(axes - {drop})

  if want is None:
    return np.full(shape, -1)
  if not isinstance(want, list):
    return _index_labels(view, kept(want)).reshape(shape)
  fused = roles.fused % nd
  out = np.full(view, -1)
  for j, label in enumerate(want):
    if label is not None:
      part = _index_labels(view, kept(label, fused)) * view[fused] + j
      np.copyto(out, part, where=np.indices(view)[fused] == j)
  return out.reshape(shape)


def detected_labels(group, shape):
  """The same for a detected group, from what its reduced axes mean."""
  if group is None:
    return np.full(shape, -1)
  if not isinstance(group, normreg.Sliced):
    return _index_labels(shape, [a for a in range(len(shape))
                                 if a not in group.reduced_axes(len(shape))])
  full = group.viewed(shape)
  axis = group.slice_axis(len(shape))
  out = np.full(full, -1)
  for j, g in enumerate(group.groups):
    if g is not None:
      kept = [a + (a >= axis) for a in range(len(full) - 1)
              if a not in g.reduced_axes(len(full) - 1)]
      np.copyto(out, _index_labels(full, kept) * len(group.groups) + j,
                where=np.indices(full)[axis] == j)
  return out.reshape(shape)


def same_partition(a, b):
  """Whether two group-number arrays group the same elements together (-1: ungrouped)."""
  if not np.array_equal(a < 0, b < 0):
    return False
  pairs = set(zip(a[a >= 0].tolist(), b[b >= 0].tolist()))
  return len(pairs) == len(set(a[a >= 0].tolist())) == len(set(b[b >= 0].tolist()))


@pytest.mark.parametrize("name", MODELS)
def test_detection_matches_the_brute_force_truth(name):
  try:
    fn, params, args, truth, roles = ext.MODELS[name](with_roles=True)
  except ImportError as e:
    pytest.skip(f"{name}: {e}")
  found = normreg.groups.groups_by_path(normreg.find_scale_invariant(fn, params, *args), name)
  shapes = {normreg.groups.path_str(p): np.shape(x) for p, x in
            __import__("jax").tree_util.tree_flatten_with_path(params)[0]}
  joint = {key.removeprefix("joint:"): want for key, want in truth.items()
           if key.startswith("joint:")}
  wrong = []
  for path, want in truth.items():
    if path.startswith("joint:"):
      continue
    module = path.rpartition("/")[0]
    if module in joint:  # invariant only with its sibling: the joint truth, per member
      want = joint[module]
      group = found[path]
      tags = {g.joint for g in (group.groups if isinstance(group, normreg.Sliced) else [group])
              if g is not None}
      if not tags or None in tags:
        wrong.append((path, "not in a joint group", group))
    expected = truth_labels(want, roles.get(path, ext.Roles()), shapes[path])
    if not same_partition(expected, detected_labels(found[path], shapes[path])):
      wrong.append((path, want, found[path]))
  assert not wrong, wrong
  assert any(g is not None for g in found.values()) or name == "penzai_prenorm"


def test_the_partitions_compare_what_they_should():
  # A guard on the comparison itself: q per head in a (3, heads, d, head_dim) kernel.
  roles = ext.Roles(unit=(1, 3), heads=(1,), fused=0)
  want = truth_labels(["heads", "heads", "whole"], roles, (3, 2, 4, 5))
  t1 = normreg.tensor(stack=1)
  assert same_partition(want, detected_labels(normreg.sliced(t1, t1, normreg.TENSOR),
                                              (3, 2, 4, 5)))
  assert not same_partition(want, detected_labels(normreg.sliced(t1, t1, t1), (3, 2, 4, 5)))
  assert not same_partition(want, detected_labels(normreg.tensor(stack=1), (3, 2, 4, 5)))
  assert not same_partition(want, detected_labels(None, (3, 2, 4, 5)))

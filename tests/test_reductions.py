"""normreg.reductions, function by function, against numpy written out per leaf.

Every transform rests on these sums, norms and projections; here each is checked on
its own, on one tree that holds every kind of group (per unit on the last axis and
on axis 0, per tensor, per copy of a stack axis, a joint group over two leaves) next
to an ungrouped leaf and masked ones, with the reduced axes typed out by hand.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import normreg
from normreg import groups as groups_lib
from normreg import reductions

GROUPS = {"unit": normreg.UNIT, "axis0": normreg.unit(axis=0), "tensor": normreg.TENSOR,
          "stacked": normreg.unit(stack=1), "j1": normreg.tensor(joint="j"),
          "j2": normreg.tensor(joint="j"), "free": None}
SHAPES = {"unit": (4, 3), "axis0": (3, 4), "tensor": (3, 5), "stacked": (2, 3, 4),
          "j1": (2, 3), "j2": (4,), "free": (3,)}
# Per leaf, the axes its group sums over, and the per-group shape (written out by hand).
AXES = {"unit": (0,), "axis0": (1,), "tensor": (0, 1), "stacked": (1,)}
GROUP_SHAPES = {"unit": (3,), "axis0": (3,), "tensor": (), "stacked": (2, 4), "j1": (),
                "j2": ()}


def _tree(seed, dtype=np.float32):
  rng = np.random.default_rng(seed)
  return {k: rng.standard_normal(s).astype(dtype) for k, s in SHAPES.items()}


def _np_sums(f, *trees):
  """``{path: per-group sum of f}`` in float64, keepdims, the joint members summed."""
  out = {}
  for k in AXES:
    v = f(*(np.asarray(t[k], np.float64) for t in trees))
    out[k] = np.sum(v, axis=AXES[k], keepdims=True)
  joint = sum(np.sum(f(*(np.asarray(t[k], np.float64) for t in trees))) for k in ("j1", "j2"))
  out["j1"] = np.full((1, 1), joint)
  out["j2"] = np.full((1,), joint)
  return out


def _resolved(tree):
  return groups_lib.resolve(GROUPS, tree, "test")


def _check_per_group(ours, expected, rtol):
  assert sorted(ours) == sorted(expected)
  for k, want in expected.items():
    assert ours[k].shape == GROUP_SHAPES[k], k
    np.testing.assert_allclose(np.asarray(ours[k], np.float64).reshape(want.shape), want,
                               rtol=rtol, err_msg=k)


def test_compute_dtype_upcasts_only_low_precision():
  assert reductions.compute_dtype(jnp.bfloat16) == jnp.float32
  assert reductions.compute_dtype(jnp.float16) == jnp.float32
  assert reductions.compute_dtype(jnp.float32) == jnp.float32
  assert reductions.compute_dtype(np.float64) == np.float64


def test_norms_and_dots_of_every_kind_of_group_against_numpy():
  a, b = _tree(0), _tree(1)
  resolved = _resolved(a)
  _check_per_group(reductions.norms(resolved, a),
                   {k: np.sqrt(v) for k, v in _np_sums(np.square, a).items()}, 1e-6)
  _check_per_group(reductions.dots(resolved, a, b), _np_sums(np.multiply, a, b), 1e-5)
  _check_per_group(reductions.group_sums(resolved, lambda x, y: x * y * y, a, b),
                   _np_sums(lambda x, y: x * y * y, a, b), 1e-5)
  # the joint members share one value, the sum over both
  np.testing.assert_array_equal(reductions.norms(resolved, a)["j1"],
                                reductions.norms(resolved, a)["j2"])


def test_a_joint_group_of_three_members_sums_all_three():
  tree = {"x": jnp.full((2,), 1.0), "y": jnp.full((3,), 2.0), "z": jnp.full((1,), 4.0)}
  groups = {k: normreg.tensor(joint="j") for k in tree}
  sums = reductions.group_sums(groups_lib.resolve(groups, tree, "test"), lambda x: x, tree)
  assert {k: float(v) for k, v in sums.items()} == {"x": 12.0, "y": 12.0, "z": 12.0}


def test_masked_and_none_leaves_are_skipped_wherever_they_are():
  """A grouped leaf that is None or optax.MaskedNode has no sum; the leaves after it
  (in path order) still have theirs."""
  a = _tree(0)
  resolved = _resolved(a)
  for hole in (None, optax.MaskedNode()):
    tree = dict(a, axis0=hole, j1=hole, j2=hole)  # "axis0" comes first in path order
    sums = reductions.group_sums(resolved, jnp.square, tree)
    assert sorted(sums) == ["stacked", "tensor", "unit"]
    want = _np_sums(np.square, a)
    for k in sums:
      np.testing.assert_allclose(np.asarray(sums[k]).reshape(want[k].shape), want[k],
                                 rtol=1e-6)


def test_a_joint_group_split_by_a_mask_is_an_error():
  a = _tree(0)
  with pytest.raises(ValueError, match="joint group 'j' is split"):
    reductions.norms(_resolved(a), dict(a, j2=None))


def test_bf16_leaves_are_summed_in_float32():
  a = _tree(0, np.float32)
  a16 = {k: jnp.asarray(v, jnp.bfloat16) for k, v in a.items()}
  exact = {k: np.asarray(v, np.float64) for k, v in a16.items()}  # the bf16 values, exactly
  sums = reductions.group_sums(_resolved(a), jnp.square, a16)
  assert all(v.dtype == jnp.float32 for v in sums.values())
  want = _np_sums(np.square, exact)
  for k, v in sums.items():
    np.testing.assert_allclose(np.asarray(v, np.float64).reshape(want[k].shape), want[k],
                               rtol=1e-6, err_msg=k)


def test_safe_sqrt_values_and_gradients():
  sq = jnp.array([4.0, 0.0, 1e-31, 1e-20], jnp.float32)
  np.testing.assert_allclose(reductions.safe_sqrt(sq), [2.0, 1e-15, 1e-15, 1e-10], rtol=1e-6)
  grad = jax.grad(lambda s: jnp.sum(reductions.safe_sqrt(s)))(sq)
  np.testing.assert_allclose(grad, [0.25, 0.0, 0.0, 0.5e10], rtol=1e-6)
  # a zero unit's norm has a zero gradient with respect to the weights, not NaN
  w = {"w": jnp.array([[0.0, 3.0], [0.0, 4.0]])}
  resolved = groups_lib.resolve({"w": normreg.UNIT}, w, "test")
  g = jax.grad(lambda p: jnp.sum(reductions.norms(resolved, p)["w"]))(w)["w"]
  np.testing.assert_allclose(g, [[0.0, 0.6], [0.0, 0.8]], rtol=1e-6)
  with jax.enable_x64(True):
    sq64 = jnp.array([0.0, 2.0])
    out = reductions.safe_sqrt(sq64)
    assert out.dtype == jnp.float64
    np.testing.assert_allclose(out, [1e-15, np.sqrt(2.0)], rtol=1e-15)


def test_expand_broadcasts_against_the_leaf():
  for k in AXES:
    shape = SHAPES[k]
    values = jnp.arange(float(np.prod(GROUP_SHAPES[k]) or 1)).reshape(GROUP_SHAPES[k])
    out = reductions.expand(GROUPS[k], values, shape)
    want = [1 if a in AXES[k] else n for a, n in enumerate(shape)]
    assert out.shape == tuple(want), k


@pytest.mark.parametrize("eps", [0.0, 0.5])
def test_tangential_against_numpy(eps):
  """``u - <u, w>/(||w|| + eps)^2 w`` per group; a small ``w`` makes eps matter."""
  u, w = _tree(2), {k: v * 0.3 for k, v in _tree(3).items()}
  resolved = _resolved(w)
  ours = (reductions.tangential(resolved, u, w) if eps == 0 else
          reductions.tangential(resolved, u, w, eps=eps))
  dot, sq = _np_sums(np.multiply, u, w), _np_sums(np.square, w)
  for k in SHAPES:
    if k == "free":
      np.testing.assert_array_equal(ours[k], u[k])  # ungrouped: untouched
      continue
    want = u[k] - dot[k] / (np.sqrt(sq[k]) + eps) ** 2 * w[k]
    np.testing.assert_allclose(ours[k], want, rtol=1e-5, atol=1e-6, err_msg=k)
  if eps == 0:  # the tangent part: orthogonal to w per group
    for k, v in reductions.dots(resolved, ours, w).items():
      np.testing.assert_allclose(v, 0.0, atol=1e-5, err_msg=k)


def test_tangential_keeps_bf16_updates_bf16():
  u = {k: jnp.asarray(v, jnp.bfloat16) for k, v in _tree(2).items()}
  w = {k: jnp.asarray(v, jnp.bfloat16) for k, v in _tree(3).items()}
  ours = reductions.tangential(_resolved(w), u, w)
  assert all(v.dtype == jnp.bfloat16 for v in ours.values())
  u64 = {k: np.asarray(v, np.float64) for k, v in u.items()}
  w64 = {k: np.asarray(v, np.float64) for k, v in w.items()}
  dot, sq = _np_sums(np.multiply, u64, w64), _np_sums(np.square, w64)
  want = u64["unit"] - dot["unit"] / sq["unit"] * w64["unit"]
  np.testing.assert_allclose(np.asarray(ours["unit"], np.float64), want, rtol=2e-2, atol=2e-2)


def test_group_means_against_numpy():
  a = _tree(4)
  means = reductions.group_means(_resolved(a), a)
  for k in AXES:
    np.testing.assert_allclose(np.asarray(means[k]).reshape(-1),
                               np.mean(a[k], axis=AXES[k]).reshape(-1), rtol=1e-5, atol=1e-7)
  joint = np.concatenate([a["j1"].ravel(), a["j2"]]).mean()  # over all 10 elements
  for k in ("j1", "j2"):
    np.testing.assert_allclose(means[k], joint, rtol=1e-5)


def test_project_to_radius_against_numpy():
  a = _tree(5)
  resolved = _resolved(a)
  radius = {k: jnp.full(GROUP_SHAPES[k], 0.5 + i) for i, k in enumerate(GROUP_SHAPES)}
  ours = reductions.project_to_radius(resolved, a, radius)
  sq = _np_sums(np.square, a)
  for k in GROUP_SHAPES:
    want = a[k] * np.asarray(radius[k]).reshape(sq[k].shape) / np.sqrt(sq[k])
    np.testing.assert_allclose(ours[k], want, rtol=1e-5, err_msg=k)
  np.testing.assert_array_equal(ours["free"], a["free"])
  a16 = {k: jnp.asarray(v, jnp.bfloat16) for k, v in a.items()}
  assert all(v.dtype == jnp.bfloat16 for v in
             reductions.project_to_radius(resolved, a16, radius).values())


def test_map_groups_calls_fn_on_grouped_leaves_only():
  a, b = _tree(0), _tree(1)
  resolved = _resolved(a)
  seen = []

  def fn(path, group, x, y):
    seen.append((path, group))
    return x + 2 * y

  tree = dict(a, unit=None, axis0=optax.MaskedNode())
  out = reductions.map_groups(fn, resolved, tree, b)
  assert sorted(seen) == sorted((k, GROUPS[k]) for k in ("j1", "j2", "stacked", "tensor"))
  for k in ("j1", "j2", "stacked", "tensor"):
    np.testing.assert_allclose(out[k], a[k] + 2 * b[k], rtol=1e-6)
  assert out["unit"] is None and isinstance(out["axis0"], optax.MaskedNode)
  np.testing.assert_array_equal(out["free"], a["free"])  # ungrouped: as it was


def test_rescale_groups_against_numpy():
  a = _tree(6)
  scaled = normreg.rescale_groups(a, GROUPS, 3.0)
  for k in SHAPES:
    np.testing.assert_allclose(scaled[k], a[k] * (1.0 if k == "free" else 3.0), rtol=1e-6)
  # a callable is called once per group with the per-group shape; joint members share
  # its draw; each group gets its own
  calls = []

  def factor(shape):
    calls.append(shape)
    return np.full(shape, float(len(calls) + 1))

  scaled = normreg.rescale_groups(a, GROUPS, factor)
  assert sorted(calls) == sorted(GROUP_SHAPES[k] for k in GROUP_SHAPES if k != "j2")
  ratios = {k: np.unique(np.round(np.asarray(scaled[k]) / a[k], 4)) for k in SHAPES}
  assert all(len(r) == 1 for r in ratios.values()), ratios
  assert ratios["free"][0] == 1.0 and ratios["j1"][0] == ratios["j2"][0]
  drawn = [ratios[k][0] for k in ("unit", "axis0", "tensor", "stacked", "j1")]
  assert sorted(drawn) == [2.0, 3.0, 4.0, 5.0, 6.0]
  # per unit: a factor per unit, along the unit's axis
  per_unit = normreg.rescale_groups(a, GROUPS, lambda shape: np.arange(1.0, 1.0 + np.prod(
      shape)).reshape(shape))
  np.testing.assert_allclose(per_unit["unit"], a["unit"] * np.array([1.0, 2.0, 3.0]),
                             rtol=1e-6)
  np.testing.assert_allclose(per_unit["axis0"], a["axis0"] * np.array([[1.0], [2.0], [3.0]]),
                             rtol=1e-6)
  bf16 = normreg.rescale_groups({k: jnp.asarray(v, jnp.bfloat16) for k, v in a.items()},
                                GROUPS, 3.0)
  assert all(v.dtype == jnp.bfloat16 for v in bf16.values())


def test_rescale_groups_names_itself_in_its_errors():
  with pytest.raises(ValueError, match="^rescale_groups: the groups pytree does not match"):
    normreg.rescale_groups({"w": jnp.ones((2, 2))}, {"v": normreg.UNIT}, 2.0)

"""Groups from path rules, paths of Linen dicts and NNX State, masks."""

import logging

import numpy as np

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import normreg
import toy


class _Net(nnx.Module):

  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 4, (3, 3), use_bias=False, rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    self.layers = nnx.List([nnx.Linear(4, 4, rngs=rngs), nnx.Linear(4, 2, rngs=rngs)])


RULES = [
    (r"conv/kernel", normreg.UNIT),
    (r"layers/0/kernel", normreg.TENSOR),
    (r".*", None),
]


def test_paths_of_nnx_state_and_linen_dict_agree():
  _, params, _ = nnx.split(_Net(nnx.Rngs(0)), nnx.Param, ...)
  expected = ["bn/bias", "bn/scale", "conv/kernel", "layers/0/bias", "layers/0/kernel",
              "layers/1/bias", "layers/1/kernel"]
  assert normreg.param_paths(params) == expected
  linen_like = nnx.to_pure_dict(params)
  assert normreg.param_paths(linen_like) == expected


def test_rules_first_match_wins_on_nnx_state():
  _, params, _ = nnx.split(_Net(nnx.Rngs(0)), nnx.Param, ...)
  groups = normreg.groups_from_rules(params, RULES)
  # Matched by path (the State keeps Param nodes, some with None values): every leaf.
  by_path = normreg.groups.groups_by_path(groups, "test")
  assert by_path == {"bn/bias": None, "bn/scale": None, "conv/kernel": normreg.UNIT,
                     "layers/0/bias": None, "layers/0/kernel": normreg.TENSOR,
                     "layers/1/bias": None, "layers/1/kernel": None}
  lines = dict(line.split() for line in normreg.groups.summary(groups).splitlines())
  assert lines == {p: (str(g) if g else "-") for p, g in by_path.items()}
  # An earlier, broader rule shadows a later one, which then matches nothing:
  # that is reported, not silently ignored.
  with pytest.raises(ValueError, match=r"\['layers/0/kernel'\] match no parameter"):
    normreg.groups_from_rules(
        params, [(r".*kernel", normreg.UNIT), (r"layers/0/kernel", normreg.TENSOR), (".*", None)])


def test_groups_from_rules_drive_a_transform_on_nnx_state():
  _, params, _ = nnx.split(_Net(nnx.Rngs(0)), nnx.Param, ...)
  groups = normreg.groups_from_rules(params, RULES)
  tx = normreg.project_to_sphere(groups, radius=2.0)
  zeros = jax.tree.map(jnp.zeros_like, params)
  new = optax.apply_updates(params, tx.update(zeros, tx.init(params), params)[0])
  norms = normreg.unit_norms(new, groups)
  assert jnp.allclose(norms["conv"]["kernel"].get_value(), 2.0, rtol=1e-5)
  assert jnp.allclose(new["bn"]["scale"].get_value(), params["bn"]["scale"].get_value())


def test_rule_matching_nothing_is_an_error_naming_it():
  with pytest.raises(ValueError, match=r"\['encoder/\.\*'\] match no parameter"):
    normreg.groups_from_rules(toy.init(jax.random.key(0)),
                              [("encoder/.*", normreg.UNIT), (".*", None)])


def test_parameter_without_rule_is_an_error_naming_it():
  with pytest.raises(ValueError, match=r"no rule covers parameter\(s\) \['bn/bias'"):
    normreg.groups_from_rules(toy.init(jax.random.key(0)),
                              [("w.*", normreg.UNIT), ("head/.*", None), ("bn/scale", None)])


def test_fullmatch_not_search():
  # "w" alone would match "w1" under re.search; fullmatch makes it match nothing.
  with pytest.raises(ValueError, match="match no parameter"):
    normreg.groups_from_rules(toy.init(jax.random.key(0)), [("w", normreg.UNIT), (".*", None)])


def test_bad_group_value_and_bad_regex_are_errors():
  params = toy.init(jax.random.key(0))
  with pytest.raises(ValueError, match="must be normreg.UNIT, normreg.TENSOR, normreg.unit"):
    normreg.groups_from_rules(params, [(".*", "per-unit")])
  with pytest.raises(ValueError, match="not a valid regex"):
    normreg.groups_from_rules(params, [("w[", normreg.UNIT)])


def test_rules_reproduce_the_hand_written_groups():
  params = toy.init(jax.random.key(0))
  groups = normreg.groups_from_rules(
      params, [("w1", normreg.UNIT), ("w2", normreg.TENSOR), (".*", None)])
  assert groups == toy.GROUPS


def test_as_mask_feeds_optax_add_decayed_weights():
  params = toy.init(jax.random.key(0))
  mask = normreg.as_mask(toy.GROUPS)
  assert mask == {"w1": True, "w2": True, "bn": {"scale": False, "bias": False},
                  "head": {"kernel": False, "bias": False}}
  tx = optax.add_decayed_weights(0.5, mask=mask)
  zeros = jax.tree.map(jnp.zeros_like, params)
  out, _ = tx.update(zeros, tx.init(params), params)
  assert jnp.allclose(out["w1"], 0.5 * params["w1"])
  assert jnp.all(out["head"]["kernel"] == 0)


@pytest.mark.parametrize("group, ndim, axes", [
    (normreg.UNIT, 4, (0, 1, 2)),        # conv kernel: all but the output axis
    (normreg.TENSOR, 4, (0, 1, 2, 3)),
    (normreg.UNIT, 1, ()),               # a bias: one value per unit, nothing to reduce
    ("tensor", 2, (0, 1)),               # the string form is accepted
    (normreg.unit(stack=1), 4, (1, 2)),  # scanned conv kernel: per layer and unit
    (normreg.tensor(stack=1), 3, (1, 2)),
    (normreg.unit(stack=1), 2, ()),      # scanned bias
    (normreg.tensor(stack=2), 2, ()),    # only stack axes: one group per copy
])
def test_reduction_axes(group, ndim, axes):
  assert normreg.groups.reduction_axes(group, ndim) == axes


def test_group_repr_and_str():
  assert repr(normreg.Invariance.UNIT) == "normreg.Invariance.UNIT"
  assert repr(normreg.UNIT) == "normreg.UNIT"
  assert repr(normreg.tensor()) == "normreg.TENSOR"
  assert repr(normreg.unit(stack=1)) == "normreg.unit(stack=1)"
  assert repr(normreg.unit(joint="d")) == "normreg.unit(joint='d')"
  assert repr(normreg.tensor(stack=2, joint="d")) == "normreg.tensor(stack=2, joint='d')"
  assert str(normreg.UNIT) == "unit"
  assert str(normreg.unit(stack=1)) == "unit stack=1"
  assert str(normreg.tensor(stack=2, joint="d")) == "tensor stack=2 joint=d"


def test_group_fields_are_checked_and_kind_is_converted():
  g = normreg.groups.Group("unit", 1)
  assert g.kind is normreg.Invariance.UNIT and g.reduced_axes(3) == (1,)
  for stack in (-1, 1.5, True):
    with pytest.raises(ValueError, match="stack must be an integer >= 0"):
      normreg.groups.Group(normreg.Invariance.UNIT, stack)
  for joint in (5, ""):
    with pytest.raises(ValueError, match="joint tag must be a non-empty string"):
      normreg.groups.Group(normreg.Invariance.TENSOR, 0, joint)


def test_none_and_masked_leaves_are_parameters_for_rules_and_masks():
  # optax.masked hands inner transforms MaskedNode leaves; they keep their paths.
  params = {"k": jnp.ones((2, 3)), "m": optax.MaskedNode(), "n": None}
  assert normreg.groups.param_paths(params) == ["k", "m", "n"]
  groups = normreg.groups_from_rules(params, [("k", normreg.UNIT), ("m|n", None)])
  assert groups == {"k": normreg.UNIT, "m": None, "n": None}
  assert normreg.groups.mask_like(groups, params) == {"k": True, "m": False, "n": False}


def test_errors_name_the_function_that_was_called():
  params = {"k": jnp.ones((2, 3))}
  with pytest.raises(ValueError, match=r"^rule '\.\*': a group must be"):
    normreg.groups_from_rules(params, [(".*", "per-unit")])
  with pytest.raises(ValueError, match=r"^groups_from_rules: 'k': a unit stack=2 group needs"):
    normreg.groups_from_rules(params, [(".*", normreg.unit(stack=2))])
  with pytest.raises(ValueError, match="^mask_like: the groups pytree does not match"):
    normreg.groups.mask_like({"other": normreg.UNIT}, params)
  with pytest.raises(ValueError, match="^reduction_axes: a group must be"):
    normreg.groups.reduction_axes("per-unit", 2)
  with pytest.raises(ValueError, match="^summary: a group must be"):
    normreg.groups.summary({"k": "per-unit"})


def test_summary_and_rule_logging(caplog):
  params = {"conv": {"kernel": jnp.ones((3, 3, 2, 4))}, "bn": {"scale": jnp.ones(4)}}
  with caplog.at_level(logging.INFO, logger="absl"):
    groups = normreg.groups_from_rules(params, [(".*kernel", normreg.UNIT), (".*", None)])
  logged = [r.getMessage() for r in caplog.records]
  assert any("conv/kernel" in m and "unit" in m and "'.*kernel'" in m for m in logged)
  assert normreg.groups.summary(groups).splitlines() == [
      f"{'bn/scale':48s} -", f"{'conv/kernel':48s} unit"]


def test_map_grouped_applies_fn_by_path():
  tree = {"a": jnp.ones(2), "b": jnp.ones(2), "c": {"d": jnp.ones(3)}, "m": optax.MaskedNode()}
  groups = {"a": normreg.UNIT, "b": None, "c": {"d": normreg.TENSOR}, "m": normreg.UNIT}
  fn = lambda g, x: x * (2.0 if g is normreg.UNIT else 3.0)
  want = {"a": [2.0, 2.0], "b": [1.0, 1.0], "c": {"d": [3.0] * 3}}
  as_function = lambda t: jax.tree.map(lambda _, g: g, t, groups,
                                       is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  for g in (groups, as_function, normreg.groups.groups_by_path(groups, "test")):
    out = normreg.groups.map_grouped(fn, g, tree)
    assert out["m"] == optax.MaskedNode()  # passed through
    assert jax.tree.map(lambda x: x.tolist(), {k: out[k] for k in want}) == want
  with pytest.raises(ValueError, match="^map_grouped: groups leaf 'a': a group must be"):
    normreg.groups.map_grouped(fn, {"a": "per-unit"}, tree)


def test_transform_on_groups_checks_params_under_its_callers_name():
  tx = normreg.groups.stateless_on_groups("my_tx", {"k": normreg.UNIT},
                                          lambda g, u, p: 2 * u + p)
  params = {"k": jnp.ones((2, 3))}
  state = tx.init(params)
  updates, _ = tx.update({"k": jnp.full((2, 3), 0.5)}, state, params)
  assert jnp.array_equal(updates["k"], jnp.full((2, 3), 2.0))
  with pytest.raises(ValueError, match="^my_tx needs the current params"):
    tx.update(params, state)
  other = {"k": jnp.ones((2, 3)), "extra": jnp.ones(2)}
  with pytest.raises(ValueError, match="^my_tx: the groups pytree does not match"):
    tx.update(other, state, other)
  with pytest.raises(ValueError, match="^my_tx: the groups pytree does not match"):
    tx.init(other)


def test_resolve_accepts_what_a_params_tree_holds():
  resolve = normreg.groups.resolve
  # a single array, tuples, Python floats, masked leaves (grouped, but not shape-checked)
  assert resolve(normreg.UNIT, jnp.ones((2, 3)), "t").by_path == {"": normreg.UNIT}
  assert resolve((normreg.UNIT, None), (jnp.ones((2, 3)), jnp.ones(3)), "t").by_path == {
      "0": normreg.UNIT}
  params = {"k": jnp.ones((2, 3)), "lr": 0.1, "m": optax.MaskedNode(), "s": jnp.float32(2.0)}
  groups = {"k": normreg.UNIT, "lr": None, "m": normreg.UNIT, "s": normreg.TENSOR}
  got = resolve(groups, params, "t")
  assert got.group_shapes == {"k": (3,), "s": ()} and set(got.by_path) == {"k", "m", "s"}
  # a function of the params, as optax.masked's mask
  rules = lambda p: normreg.groups_from_rules(p, [("k|s", normreg.TENSOR), (".*", None)])
  assert resolve(rules, params, "t").by_path == {"k": normreg.TENSOR, "s": normreg.TENSOR}


@pytest.mark.parametrize("group, shape, ok", [
    (normreg.UNIT, (3,), True), (normreg.unit(stack=1), (3,), False),
    (normreg.unit(stack=1), (2, 3), True), (normreg.TENSOR, (), True),
    (normreg.tensor(stack=1), (3,), True), (normreg.tensor(stack=2), (3,), False),
])
def test_group_fits_shape(group, shape, ok):
  params = {"w": jnp.ones(shape)}
  if ok:
    normreg.groups.resolve({"w": group}, params, "t")
  else:
    with pytest.raises(ValueError, match=rf"^t: 'w': a {group} group needs at least"):
      normreg.groups.resolve({"w": group}, params, "t")


def test_resolve_errors_name_caller_and_paths():
  resolve = normreg.groups.resolve
  params = {"a": jnp.ones((2, 3)), "b": jnp.ones((4, 3))}
  with pytest.raises(ValueError, match=r"^t: groups leaf 'a': a group must be"):
    resolve({"a": "per-unit", "b": None}, params, "t")
  with pytest.raises(ValueError, match=r"but not in groups: \['b'\]; in groups but not in "
                     r"params: \['c'\]"):
    resolve({"a": None, "c": None}, params, "t")
  with pytest.raises(ValueError, match=r"^t: joint group 'j' mixes unit joint=j \('a'\) and "
                     r"tensor joint=j \('b'\)"):
    resolve({"a": normreg.unit(joint="j"), "b": normreg.tensor(joint="j")}, params, "t")
  one = resolve({"a": normreg.unit(joint="j"), "b": None}, params, "t")  # a joint group of one
  assert one.members == {"j": ("a",)} and one.key("a") == "joint:j" and "b" not in one.by_path


def test_path_str_of_every_jax_key_kind():
  tu = jax.tree_util
  path = (tu.GetAttrKey("a"), tu.SequenceKey(2), tu.DictKey("b"), tu.FlattenedIndexKey(3),
          "raw", tu.GetAttrKey("value"))
  assert normreg.groups.path_str(path) == "a/2/b/3/raw"  # NNX's trailing value dropped
  assert normreg.groups.path_str(path[:2]) == "a/2"


def test_as_group_accepts_the_kind_by_name_or_enum():
  as_group = normreg.groups.as_group
  assert as_group("unit", "t") is normreg.UNIT and as_group("tensor", "t") is normreg.TENSOR
  assert as_group(normreg.Invariance.UNIT, "t") is normreg.UNIT
  assert as_group(normreg.groups.Group("tensor"), "t") is normreg.TENSOR  # interned
  assert as_group(None, "t") is None


def test_a_groups_pytree_is_never_called_even_when_its_container_is_callable():
  @jax.tree_util.register_pytree_with_keys_class
  class CallableTree:  # as an equinox Module: a pytree node with a __call__ (its forward)
    def __init__(self, kernel, scale):
      self.kernel, self.scale = kernel, scale

    def __call__(self, *args):
      raise AssertionError("a groups pytree was called")

    def tree_flatten_with_keys(self):
      key = jax.tree_util.GetAttrKey
      return ((key("kernel"), self.kernel), (key("scale"), self.scale)), None

    @classmethod
    def tree_unflatten(cls, _, children):
      return cls(*children)

  params = CallableTree(jnp.ones((2, 3)), jnp.ones(3))
  groups = CallableTree(normreg.unit(axis=0), None)
  assert not normreg.groups.is_function(groups)
  assert normreg.groups.resolve(groups, params, "t").by_path == {"kernel": normreg.unit(axis=0)}
  np.testing.assert_allclose(normreg.unit_norms(params, groups).kernel, np.sqrt([3.0, 3.0]))
  masked = normreg.groups.map_grouped(lambda g, w: 2 * w, groups, params)
  np.testing.assert_allclose(masked.kernel, 2.0)
  # A plain function of the params is still called, as optax.masked's mask is.
  fn = lambda p: CallableTree(normreg.UNIT, None)
  assert normreg.groups.is_function(fn)
  np.testing.assert_allclose(normreg.unit_norms(params, fn).kernel, np.sqrt([2.0] * 3))


@pytest.mark.parametrize("axis, shape, want", [
    (0, (4, 3), (4,)), (-1, (4, 3), (3,)), (1, (2, 3, 4), (3,)), (0, (5, 2, 3, 3), (5,)),
])
def test_unit_axis_reduces_over_every_other_axis(axis, shape, want):
  rng = np.random.default_rng(0)
  w = rng.standard_normal(shape)
  group = normreg.unit(axis=axis)
  norms = normreg.unit_norms({"w": jnp.asarray(w)}, {"w": group})["w"]
  keep = axis % len(shape)
  expect = np.sqrt(np.sum(w ** 2, axis=tuple(a for a in range(len(shape)) if a != keep)))
  assert norms.shape == want
  np.testing.assert_allclose(norms, expect, rtol=1e-6)
  # With a stack axis in front, the axis counts after it: one norm per copy and unit.
  stacked = np.stack([w, 2 * w])
  got = normreg.unit_norms({"w": jnp.asarray(stacked)},
                           {"w": normreg.unit(stack=1, axis=axis)})["w"]
  np.testing.assert_allclose(got, np.stack([expect, 2 * expect]), rtol=1e-6)
  assert str(normreg.unit(stack=1, axis=axis)) == f"unit axis={axis} stack=1" if axis != -1 \
      else str(normreg.unit(stack=1)) == "unit stack=1"
  with pytest.raises(ValueError, match="a tensor group has no unit axis"):
    normreg.Group(normreg.Invariance.TENSOR, axis=0)

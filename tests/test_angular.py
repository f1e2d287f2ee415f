"""normreg.angular's helpers and options, each against numpy or hand-written values.

tests/test_references.py replays every angular optimizer's trajectory against a numpy
loop and tests/test_goldens.py against the official code; these tests pin what those
leave free: the helpers on their own (``balance``, the bias correction, the cosine
test), the arguments the trajectories keep at their defaults, and what a call
refuses and how its message reads.
"""

import jax.numpy as jnp
import numpy as np
import pytest

import normreg
from normreg import angular


def test_balance_centres_and_normalizes_every_group():
  rng = np.random.default_rng(0)
  params = {"unit": rng.standard_normal((4, 3)) + 2.0, "tensor": rng.standard_normal((2, 3)),
            "free": rng.standard_normal(3)}
  groups = {"unit": normreg.UNIT, "tensor": normreg.TENSOR, "free": None}
  out = angular.balance({k: jnp.asarray(v, jnp.float32) for k, v in params.items()}, groups)
  c = params["unit"] - params["unit"].mean(0, keepdims=True)
  np.testing.assert_allclose(out["unit"], c / np.sqrt((c * c).sum(0, keepdims=True)),
                             rtol=1e-5, atol=1e-6)
  c = params["tensor"] - params["tensor"].mean()
  np.testing.assert_allclose(out["tensor"], c / np.sqrt((c * c).sum()), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["free"], params["free"], rtol=1e-6)  # ungrouped: as it was
  bf16 = angular.balance({k: jnp.asarray(v, jnp.bfloat16) for k, v in params.items()}, groups)
  assert all(v.dtype == jnp.bfloat16 for v in bf16.values())


def test_balance_names_itself_in_its_errors():
  with pytest.raises(ValueError, match="^balance: the groups pytree does not match"):
    angular.balance({"w": jnp.ones((2, 2))}, {"v": normreg.UNIT})

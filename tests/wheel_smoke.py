"""Trains a tiny model with the installed normreg wheel alone (CI runs it; not a pytest file).

``.ci/run`` builds the wheel, installs it without extras in a fresh virtual
environment and runs this script from a folder outside the checkout::

  cd "$(mktemp -d)" && python /path/to/normreg/tests/wheel_smoke.py

It checks what a user of ``pip install normreg`` gets: the package imports from
site-packages, with none of the launcher's dependencies (tensorflow-datasets,
TensorFlow, matplotlib, pyarrow) and no ``experiments`` package; a small flax NNX
network with BatchNorm is found scale-invariant per unit and trained by
``normreg.spherical_sgd``: the loss falls and every grouped unit keeps norm 1.
Importing this file (pytest's ``--doctest-modules`` does) runs nothing.
"""

import importlib.util
import os
import sys


def check_install() -> None:
  """normreg comes from site-packages, and the heavy or foreign packages are absent."""
  import normreg  # pylint: disable=g-import-not-at-top
  where = os.path.dirname(os.path.abspath(normreg.__file__))
  assert "site-packages" in where, f"normreg imported from {where}, not an installed wheel"
  for name in ("experiments", "tensorflow", "tensorflow_datasets", "matplotlib", "pyarrow"):
    assert importlib.util.find_spec(name) is None, (
        f"{name} is importable: the wheel or its dependencies installed it")
  print(f"normreg from {where}; no experiments, TensorFlow, tfds, matplotlib or pyarrow",
        flush=True)


def train(steps: int = 30) -> None:
  """A conv + BatchNorm + linear net on a learnable synthetic task, by spherical SGD."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import normreg  # pylint: disable=g-import-not-at-top

  class Net(nnx.Module):

    def __init__(self, rngs):
      self.conv = nnx.Conv(3, 16, (3, 3), use_bias=False, rngs=rngs)
      self.bn = nnx.BatchNorm(16, rngs=rngs)
      self.head = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
      return self.head(jax.nn.relu(self.bn(self.conv(x))).mean((1, 2)))

  x = jax.random.normal(jax.random.key(0), (64, 8, 8, 3))
  y = jnp.argmax(x.mean((1, 2)) @ jax.random.normal(jax.random.key(1), (3, 4)), -1)
  model = Net(nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  groups = normreg.find_scale_invariant(
      lambda p, x: nnx.merge(graphdef, p, rest, copy=True)(x), params, x)
  found = normreg.groups.groups_by_path(groups, "wheel_smoke")
  assert found["conv/kernel"] == normreg.UNIT, normreg.groups.summary(groups)
  assert found["head/kernel"] is None, normreg.groups.summary(groups)  # no norm after it
  optimizer = nnx.Optimizer(model, normreg.spherical_sgd(0.1, groups, momentum=0.9),
                            wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(steps)]
  norms = normreg.unit_norms(nnx.state(model, nnx.Param), groups)["conv"]["kernel"][...]
  print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {steps} steps; conv unit norms "
        f"{float(norms.min()):.6f}..{float(norms.max()):.6f}")
  assert losses[-1] < 0.7 * losses[0], losses
  assert jnp.allclose(norms, 1.0, atol=1e-5), norms


if __name__ == "__main__":
  check_install()
  train()
  print("wheel smoke test: ok")
  sys.exit(0)

"""A toy task, regression on random features: the one place it is defined.

Importing this module registers the task, as a task module of a user's does:
``tests/test_tasks.py`` imports it, and names it to the command line
(``--task_module=toy_task``).
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import errors
from experiments import tasks


class _Net(nnx.Module):
  """x -> Linear (no bias) -> LayerNorm (no scale) -> relu -> Linear -> a number per row:
  the first kernel is scale-invariant as a whole (the LayerNorm divides its scale out)."""

  def __init__(self, features: int, hidden: int, rngs: nnx.Rngs):
    self.inner = nnx.Linear(features, hidden, use_bias=False, rngs=rngs)
    self.norm = nnx.LayerNorm(hidden, use_scale=False, use_bias=False, rngs=rngs)
    self.outer = nnx.Linear(hidden, 1, rngs=rngs)

  def __call__(self, x):
    return self.outer(jax.nn.relu(self.norm(self.inner(x))))[:, 0]


class ToyRegression(tasks.Task):
  """Rows of Gaussian features, targets ``tanh(x @ w)``; mean squared error; test RMSE."""

  name = "toy_regression"
  headline = "rmse"
  higher_is_better = False
  unit = "rows"
  help = "regression on random features (a test)"
  options = {"features": tasks.Option(6, "Input features of the toy regression."),
             "rows": tasks.Option(100, "Training rows; a third as many test rows."),
             "hidden": tasks.Option(16, "Hidden units of the toy regression's network.")}

  def validate(self, config):
    if not config.rows > 0:
      raise errors.InputError(f"--rows must be > 0, got {config.rows}.")

  def load(self, config):
    rng = np.random.default_rng(config.seed)
    w = rng.standard_normal(config.features)
    x = rng.standard_normal((config.rows + config.rows // 3, config.features))
    y = np.tanh(x @ w)
    n = config.rows
    return ({"x": x[:n].astype(np.float32), "y": y[:n].astype(np.float32)},
            {"x": x[n:].astype(np.float32), "y": y[n:].astype(np.float32)})

  def arrays(self, data):
    return data

  def chance(self, data):
    return float(np.sqrt(np.mean(np.square(data[1]["y"]))))  # predicting 0

  def create_model(self, config, data):
    return _Net(config.features, config.hidden, nnx.Rngs(config.seed))

  def prepare(self, config, batch, stats, key):
    return batch["x"]

  def loss(self, config, outputs, batch):
    return jnp.mean(jnp.square(outputs - batch["y"]))

  def eval_sums(self, config, outputs, batch, weights):
    return {"squares": jnp.sum(weights * jnp.square(outputs - batch["y"]))}

  def eval_metrics(self, config, sums, n):
    return {"loss": sums["squares"] / n, "rmse": float(np.sqrt(sums["squares"] / n))}


TOY = ToyRegression()
if TOY.name not in tasks.REGISTRY:  # (once, whatever name the module is imported under)
  tasks.register(TOY)

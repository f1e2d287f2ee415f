"""Data parallelism and bf16 compute, on the CPU.

The 8-device test runs in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the flag must be set
before JAX starts): training on 8 devices (batch split, params replicated,
BatchNorm statistics over the global batch) ends with the same parameters as
training on one.
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np

from experiments import trainer
from experiments.config import Config

import runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = textwrap.dedent("""
    import sys, tempfile
    import jax, numpy as np
    sys.path.insert(0, {tests!r})
    from runs import tiny_dataset
    from experiments import trainer
    from experiments.config import Config
    assert jax.device_count() == 8, jax.devices()
    ds = tiny_dataset()
    out = {{}}
    for method in ("l2", "spherical"):
      config = Config(dataset="cifar10", method=method, model="cnn", width=4, epochs=2,
                      batch_size=16, log_every=2, lr=0.05)
      finals = []
      for devices in (jax.devices()[:1], jax.devices()):
        with tempfile.TemporaryDirectory() as workdir:
          state = trainer.train_and_evaluate(config, workdir, dataset=ds, progress=False,
                                             devices=devices)
        leaves = jax.tree.leaves(state.params)
        for x in jax.tree.leaves(state):  # replicated: the whole array on every device
          assert len(x.sharding.device_set) == len(devices)
          assert x.sharding.is_fully_replicated, x.sharding
          assert tuple(x.sharding.spec) in ((), (None,) * x.ndim), x.sharding.spec
          assert all(s.data.shape == x.shape for s in x.addressable_shards)
        finals.append([np.asarray(x) for x in leaves])
      err = max(float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-12))
                for a, b in zip(*finals))
      print(method, "max relative difference 1 vs 8 devices:", err)
      assert err < 1e-4, (method, err)
    print("OK")
""")


def test_eight_devices_give_the_same_parameters_as_one():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-c", _SCRIPT.format(tests=os.path.join(ROOT, "tests"))],
      capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert result.stdout.strip().endswith("OK")


def test_batch_not_divisible_by_devices_is_refused(tmp_path):
  config = Config(dataset="cifar10", model="cnn", width=4, epochs=1, batch_size=15)
  fake_devices = [jax.devices()[0]] * 2
  try:
    trainer.train_and_evaluate(config, str(tmp_path), dataset=runs.tiny_dataset(),
                               progress=False, devices=fake_devices)
  except ValueError as e:
    assert "--batch_size=15 must be divisible by the number of devices (2)" in str(e)
  else:
    raise AssertionError("no error")


def test_bfloat16_compute_keeps_float32_params_and_state(tmp_path):
  config = Config(dataset="cifar10", method="spherical", model="cnn", width=4, epochs=1,
                  batch_size=16, log_every=2, lr=0.05, dtype="bfloat16")
  state = trainer.train_and_evaluate(config, str(tmp_path), dataset=runs.tiny_dataset(),
                                     progress=False)
  for leaf in jax.tree.leaves((state.params, state.opt_state)):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(jax.tree.leaves(state.params)[0])))


def test_bfloat16_inside_the_jitted_train_step():
  """The compiled step itself: its convolutions run in bf16 (from the lowered program),
  while the params and optimizer state it returns are float32."""
  config = Config(dataset="cifar10", method="spherical", model="cnn", width=4, epochs=1,
                  batch_size=16, log_every=2, lr=0.05, dtype="bfloat16")
  ds = runs.tiny_dataset()
  model, schedule, tx, state = trainer.initial_state(config, ds)
  mean, std = (jnp.asarray(a) for a in trainer.data_lib.channel_stats(ds.train_images))
  step = jax.jit(trainer.make_train_step(model.graphdef, tx, mean, std, augment=True,
                                         key=jax.random.key(0)))
  args = (state, jnp.asarray(ds.train_images), jnp.asarray(ds.train_labels),
          jnp.arange(16, dtype=jnp.int32))
  hlo = step.lower(*args).as_text()
  convs = [l for l in hlo.splitlines() if "stablehlo.convolution" in l]
  assert convs and all("xbf16>" in l.split("->")[-1] for l in convs), convs[:2]
  new_state, metrics = step(*args)
  for leaf in jax.tree.leaves((new_state.params, new_state.opt_state)):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32
  assert np.isfinite(float(metrics["loss"]))

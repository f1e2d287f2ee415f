"""Test configuration shared by the whole suite.

As in equinox's tests/conftest.py, implicit rank promotion is an error, so a
reduction over the wrong axis (the classic bug when porting PyTorch per-unit
norms, which reduce over axis 0, to Flax kernels, which keep the output axis
last) fails loudly instead of broadcasting silently.

Strict dtype promotion is not global because optax's own schedules and Adam
mix Python floats with int32 step counts; the dtype tests of our transforms
turn it on with ``jax.numpy_dtype_promotion("strict")`` around our own code.
"""
import jax

jax.config.update("jax_numpy_rank_promotion", "raise")

"""Test configuration shared by the whole suite.

As in equinox's tests/conftest.py, implicit rank promotion is an error, so a
reduction over the wrong axis (the classic bug when porting PyTorch per-unit
norms, which reduce over axis 0, to Flax kernels, which keep the output axis
last) fails loudly instead of broadcasting silently; and dtype promotion is
strict, so a bf16 parameter silently promoted to float32 shows up.
"""
import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

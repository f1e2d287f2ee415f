"""Test configuration shared by the whole suite.

As in equinox's tests/conftest.py, implicit rank promotion is an error, so a
reduction over the wrong axis (the classic bug when porting PyTorch per-unit
norms, which reduce over axis 0, to Flax kernels, which keep the output axis
last) fails loudly instead of broadcasting silently.

Strict dtype promotion is not global because optax's own schedules and Adam
mix Python floats with int32 step counts; the dtype tests of our transforms
turn it on with ``jax.numpy_dtype_promotion("strict")`` around our own code.

The session, its xdist workers and the commands the tests start share one
persistent compilation cache (JAX's own, in a temporary folder removed at the
end; a JAX_COMPILATION_CACHE_DIR already set is used and kept): a fresh process
compiles the same small programs again, and a 48-step command run takes 4 s
from the cache instead of 12 s. The environment is set before JAX is imported
and before xdist starts its workers, which inherit it.
"""
import os
import shutil
import tempfile

_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _OWN_CACHE = tempfile.mkdtemp(prefix="normreg-tests-jax-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
if _OWN_CACHE:  # in case a plugin imported JAX before this file ran
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
  if _OWN_CACHE and not hasattr(config, "workerinput"):  # the controller made it
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


# The longest files first (their whole time, on CI's 2 cores, in the order measured there):
# xdist's --dist loadfile hands files to workers in collection order, so a long file collected
# last (test_reproduce.py, about 8 minutes with its smoke reproduction) ran alone at the end.
_LONGEST_FIRST = ("test_reproduce.py", "test_accelerator.py", "test_compare.py",
                  "test_sweep.py", "test_multihost.py", "test_frameworks.py",
                  "test_benchmarks.py", "test_parallel.py", "test_experiments.py",
                  "test_workdir.py", "test_cloud.py", "test_readme.py")


def pytest_collection_modifyitems(config, items):
  del config
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: in-file order kept

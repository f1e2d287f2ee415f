"""Argument checks shared by the transforms: fail early, naming the argument.

Values that are traced (inside jit, or injected by ``optax.inject_hyperparams``
under jit) cannot be checked in Python and are let through.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def concrete(value: Any) -> float | None:
  """``float(value)`` if it is a concrete scalar, else ``None`` (traced or callable)."""
  if callable(value):
    return None
  try:
    return float(np.asarray(value))
  except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    return None


def non_negative(name: str, value: Any, caller: str) -> None:
  v = concrete(value)
  if v is not None and not v >= 0:
    raise ValueError(f"{caller}: {name} must be >= 0, got {value!r}.")


def positive(name: str, value: Any, caller: str) -> None:
  v = concrete(value)
  if v is not None and not v > 0:
    raise ValueError(f"{caller}: {name} must be > 0, got {value!r}.")


def require_params(params: Any, caller: str) -> None:
  if params is None:
    raise ValueError(f"{caller} needs the current params: call "
                     "tx.update(updates, state, params).")

"""Flax NNX networks with a choice of normalization, for the experiments.

``CNN`` (VGG-style) and ``ResNet20`` (He et al. 2016), each with ``norm`` one
of :data:`NORMS`: ``'batch'``, ``'layer'``, ``'group'``, ``'weight'`` (our own
pure :class:`WeightNormConv`) or ``'none'``. Every conv before a
normalization is scale-invariant (per unit for BatchNorm and WeightNorm's
``v``, as a whole for LayerNorm and GroupNorm); the ``head`` classifier never
is. Inputs are NHWC; params are ``nnx.Param`` and BatchNorm statistics
``nnx.BatchStat``, so ``nnx.split(model, nnx.Param, ...)`` separates them.

This package imports nothing else from normreg.

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from normreg import models
  >>> model = models.create('resnet20', num_classes=10, norm='weight', width=4,
  ...                       rngs=nnx.Rngs(0))
  >>> model(jnp.ones((2, 8, 8, 3))).shape
  (2, 10)
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
from flax import nnx

from normreg.models.cnn import CNN
from normreg.models.norms import NORMS
from normreg.models.resnet import ResNet20
from normreg.models.weight_norm import WeightNormConv
from normreg.models.weight_norm import WeightNormLinear

MODELS = ("cnn", "resnet20")
_CLASSES = {"cnn": CNN, "resnet20": ResNet20}


def create(name: str, *, num_classes: int = 10, norm: str = "batch",
           width: Optional[int] = None, in_channels: int = 3,
           dtype: Optional[jnp.dtype] = None, param_dtype: jnp.dtype = jnp.float32,
           rngs: nnx.Rngs) -> nnx.Module:
  """Builds the model ``name`` (one of :data:`MODELS`).

  Args:
    name: ``'cnn'`` (:class:`CNN`) or ``'resnet20'`` (:class:`ResNet20`).
    num_classes: number of logits.
    norm: one of :data:`NORMS`.
    width: first-stage width; ``None`` for the model's default (64 for the CNN,
      16 for ResNet-20).
    in_channels: channels of the input images.
    dtype: computation dtype (``None``: from the inputs).
    param_dtype: dtype of all params.
    rngs: ``nnx.Rngs`` with a ``params`` stream.

  Returns:
    The ``nnx.Module``, in training mode.

  Raises:
    ValueError: for an unknown ``model`` name or ``norm``.
  """
  if name not in _CLASSES:
    raise ValueError(f"Unknown model={name!r}; `model` must be one of {MODELS}.")
  kwargs = {} if width is None else {"width": width}
  return _CLASSES[name](num_classes=num_classes, norm=norm, in_channels=in_channels,
                        dtype=dtype, param_dtype=param_dtype, rngs=rngs, **kwargs)


__all__ = ("CNN", "MODELS", "NORMS", "ResNet20", "WeightNormConv", "WeightNormLinear",
           "create")

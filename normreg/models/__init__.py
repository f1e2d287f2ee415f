"""Flax NNX networks with a choice of normalization, for the experiments.

``CNN`` (VGG-style), ``ResNet20`` (He et al. 2016) and ``ScanCNN`` (residual
blocks stacked on a leading axis and run by ``nnx.scan``), each with ``norm`` one
of :data:`NORMS`: ``'batch'``, ``'layer'``, ``'group'``, ``'weight'`` (our own
pure :class:`WeightNormConv`) or ``'none'``. Every conv before a
normalization is scale-invariant (per unit for BatchNorm and WeightNorm's
``v``, as a whole for LayerNorm and GroupNorm); the ``head`` classifier never
is. Inputs are NHWC; params are ``nnx.Param`` and BatchNorm statistics
``nnx.BatchStat``, so ``nnx.split(model, nnx.Param, ...)`` separates them.

This package imports nothing else from normreg.

Examples:
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
from normreg.models.scan import ScanCNN
from normreg.models.transformer import Transformer
from normreg.models.weight_norm import WeightNormConv
from normreg.models.weight_norm import WeightNormLinear

MODELS = ("cnn", "resnet20", "scan_cnn")
"""The names that :func:`create` builds."""
_CLASSES = {"cnn": CNN, "resnet20": ResNet20, "scan_cnn": ScanCNN}


def create(name: str, *, num_classes: int = 10, norm: str = "batch",
           width: Optional[int] = None, in_channels: int = 3,
           dtype: Optional[jnp.dtype] = None, param_dtype: jnp.dtype = jnp.float32,
           epsilon: Optional[float] = None, rngs: nnx.Rngs) -> nnx.Module:
  """Builds the model ``name`` (one of :data:`MODELS`).

  Args:
    name: ``'cnn'`` (:class:`CNN`), ``'resnet20'`` (:class:`ResNet20`) or
      ``'scan_cnn'`` (:class:`ScanCNN`, residual blocks stacked and scanned).
    num_classes: number of logits.
    norm: one of :data:`NORMS`.
    width: first-stage width; ``None`` for the model's default (64 for the CNN,
      16 for ResNet-20 and the scanned CNN).
    in_channels: channels of the input images.
    dtype: computation dtype (``None``: from the inputs).
    param_dtype: dtype of all params.
    epsilon: the normalizations' epsilon (``None``:
      :data:`normreg.models.norms.EPSILON`, 1e-5).
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
                        dtype=dtype, param_dtype=param_dtype, epsilon=epsilon, rngs=rngs,
                        **kwargs)


__all__ = ("CNN", "MODELS", "NORMS", "ResNet20", "ScanCNN", "Transformer", "WeightNormConv",
           "WeightNormLinear", "create")

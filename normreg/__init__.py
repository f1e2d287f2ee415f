"""normreg: honest weight decay for normalized networks, as optax transforms.

Weights that feed a normalization (BatchNorm, LayerNorm, GroupNorm, WeightNorm)
are scale-invariant: L2 on them does not regularize, it sets their norm and
with it the effective learning rate (van Laarhoven 2017, arXiv 1706.05350).
normreg finds those weights, decays, rescales or projects them as composable
``optax.GradientTransformation``s, and measures their effective learning rate.
"""

from normreg.angular import add_corrected_decayed_weights
from normreg.angular import adamh
from normreg.angular import adamp
from normreg.angular import cosine_groups
from normreg.angular import nero
from normreg.angular import rotational
from normreg.angular import sgdp
from normreg.detect import find_scale_invariant
from normreg.groups import TENSOR
from normreg.groups import UNIT
from normreg.groups import Group
from normreg.groups import Invariance
from normreg.groups import Sliced
from normreg.groups import as_mask
from normreg.groups import groups_from_rules
from normreg.groups import param_paths
from normreg.groups import sliced
from normreg.groups import tensor
from normreg.groups import unit
from normreg.metrics import angular_update
from normreg.metrics import effective_learning_rate
from normreg.metrics import unit_norms
from normreg.optimizers import scale_by_learning_rates
from normreg.optimizers import sgd_l2
from normreg.optimizers import spherical_adam
from normreg.optimizers import spherical_sgd
from normreg.penalty import add_decayed_weights
from normreg.penalty import add_l2_penalty
from normreg.reductions import rescale_groups
from normreg.rescale import scale_by_weight_norm
from normreg.sphere import ProjectToSphereState
from normreg.sphere import project_to_sphere
from normreg.sphere import tangent_projection

__version__ = "0.1.0"


def __getattr__(name):
  # normreg.models (Flax NNX networks) is imported on first use: the transforms
  # themselves need only jax and optax.
  if name == "models":
    import importlib
    return importlib.import_module("normreg.models")
  raise AttributeError(f"module 'normreg' has no attribute {name!r}")

__all__ = (
    "UNIT",
    "TENSOR",
    "Group",
    "Invariance",
    "unit",
    "tensor",
    "Sliced",
    "sliced",
    "rescale_groups",
    "find_scale_invariant",
    "groups_from_rules",
    "as_mask",
    "param_paths",
    "add_l2_penalty",
    "add_decayed_weights",
    "scale_by_weight_norm",
    "project_to_sphere",
    "ProjectToSphereState",
    "tangent_projection",
    "scale_by_learning_rates",
    "sgd_l2",
    "spherical_sgd",
    "spherical_adam",
    "rotational",
    "adamp",
    "sgdp",
    "cosine_groups",
    "nero",
    "adamh",
    "add_corrected_decayed_weights",
    "unit_norms",
    "effective_learning_rate",
    "angular_update",
    "models",
)

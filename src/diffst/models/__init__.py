"""Denoisers: Diff-ST, the Guided-DM baseline and the regressor baselines, their configuration and components.

Importing this package registers every model (:mod:`diffst.models.registry`): ``diffst``, ``guided_dm``,
``unet``, ``unetpp``, ``attention_unet`` and ``histogene`` (:mod:`diffst.models.baselines`), so
``build_model(ModelConfig(arch=...))`` finds them.
"""

from diffst.models.base import Conditions, Denoiser, DenoiserOutput
from diffst.models.config import ModelConfig, model_preset
from diffst.models.diffst import DiffST
from diffst.models.graph import coexpression_matrix
from diffst.models.guided_dm import GuidedDMBaseline
from diffst.models.registry import MODELS, build_model, register_model

__all__ = [
    "Conditions",
    "Denoiser",
    "DenoiserOutput",
    "ModelConfig",
    "build_model",
    "model_preset",
    "DiffST",
    "GuidedDMBaseline",
    "coexpression_matrix",
    "MODELS",
    "register_model",
]

# Registers the regressor baselines ("unet", "unetpp", "attention_unet", "histogene"); last, as they build on
# the modules above.
import diffst.models.baselines  # noqa: E402, F401

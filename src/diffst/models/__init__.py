"""Denoisers: Diff-ST and the Guided-DM baseline, their configuration and components."""

from diffst.models.base import DenoiserOutput
from diffst.models.config import ModelConfig, build_model, model_preset
from diffst.models.diffst import DiffST
from diffst.models.graph import coexpression_matrix
from diffst.models.guided_dm import GuidedDMBaseline
from diffst.models.histology import curriculum_threshold, kept_patch_mask

__all__ = [
    "DenoiserOutput",
    "ModelConfig",
    "build_model",
    "model_preset",
    "DiffST",
    "GuidedDMBaseline",
    "coexpression_matrix",
    "curriculum_threshold",
    "kept_patch_mask",
]

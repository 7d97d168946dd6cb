"""Deterministic regressor baselines of the paper's comparison: U-Net, U-Net++, Attention U-Net, HisToGene.

Importing this package registers them (:mod:`diffst.models.registry`) as ``"unet"``, ``"unetpp"``,
``"attention_unet"`` and ``"histogene"``. They map the conditions (LR maps and histology image) straight
to HR maps and ignore the noisy input and the timestep: train them with ``train.objective: regression``.
"""

from diffst.models.baselines.attention_unet import AttentionUNetRegressor
from diffst.models.baselines.histogene import HisToGeneRegressor
from diffst.models.baselines.unet import RegressorBaseline, UNetRegressor
from diffst.models.baselines.unetpp import UNetPlusPlusRegressor

__all__ = [
    "AttentionUNetRegressor",
    "HisToGeneRegressor",
    "RegressorBaseline",
    "UNetPlusPlusRegressor",
    "UNetRegressor",
]

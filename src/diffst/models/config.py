"""Model configuration: one validated, serialisable object describing a denoiser, plus presets.

``ModelConfig.model_dump()`` gives a plain dict that can be saved with a run and turned back into the
same model with ``build_model(ModelConfig(**d))`` (:func:`diffst.models.registry.build_model`, which
builds the model registered under ``arch``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from diffst.models.registry import model_class

__all__ = ["ModelConfig", "model_preset"]


class ModelConfig(BaseModel):
    """Hyper-parameters of a Diff-ST or Guided-DM denoiser.

    Attributes
    ----------
    arch
        Name of a registered model (:mod:`diffst.models.registry`): ``"diffst"`` (the paper's model) or
        ``"guided_dm"`` (the guided-diffusion SR baseline), or any model added with ``@register_model``.
    n_genes
        Number of genes N generated jointly (one channel each).
    image_channels
        Channels of the histology image: 3 for H&E RGB, 1 for DAPI, k for k-plex fluorescence.
    base_channels
        Width of the first U-Net level.
    channel_mult
        Width multiplier of each U-Net level; ``len(channel_mult) - 1`` downsamplings, so inputs are
        padded internally to a multiple of ``2 ** (len(channel_mult) - 1)``.
    num_res_blocks
        Residual blocks per encoder level (the decoder has one more, as in guided-diffusion).
    attention_resolutions
        Feature-map sizes (at an HR input of ``hr_size``) where self-attention is used, as in
        guided-diffusion. Translated into U-Net levels once, so any input size works.
    hr_size
        Reference HR size used only to translate ``attention_resolutions`` into levels.
    num_heads
        Heads of the U-Net self-attention.
    dropout
        Dropout inside residual blocks.
    learn_sigma
        If True the output has 2N channels (epsilon, then the variance interpolation v).
    d_tissue, d_cell, d_attn
        Channels of F_tissue, of F_cell and of the cell-to-tissue attention (paper: d_t = d_c = d = 128).
    cam_window
        Window side ``a`` of cross-modal adaptive modulation (paper: 32).
    condition_level
        U-Net level at which the fused histology/LR features are injected; their map is
        ``padded_HR / 2 ** condition_level`` (level 2 gives 64 x 64 at 256 x 256).
    graph_alpha
        Graph balancing weight alpha: ``F_out = alpha F_mid + (1 - alpha) F``.
    graph_node_size
        Side of the per-gene node feature map; node dimension C = graph_node_size ** 2 (paper: 26 -> 676).
    graph_hidden
        Hidden channels of the shared per-gene encoder of the graph.
    use_hierarchical, use_cam, use_graph, use_disentangle
        Switches for the paper's components (the ablations of Table 2 and the disentangling loss).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: str = "diffst"
    n_genes: int = Field(25, ge=1)
    image_channels: int = Field(3, ge=1)
    base_channels: int = Field(32, ge=4)
    channel_mult: tuple[int, ...] = (1, 2, 4, 8)
    num_res_blocks: int = Field(1, ge=1)
    attention_resolutions: tuple[int, ...] = (32, 16, 8)
    hr_size: int = Field(256, ge=1)
    num_heads: int = Field(4, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    learn_sigma: bool = True
    d_tissue: int = Field(128, ge=1)
    d_cell: int = Field(128, ge=1)
    d_attn: int = Field(128, ge=1)
    cam_window: int = Field(32, ge=1)
    condition_level: int = Field(2, ge=0)
    graph_alpha: float = Field(0.2, ge=0.0, le=1.0)
    graph_node_size: int = Field(26, ge=1)
    graph_hidden: int = Field(8, ge=1)
    use_hierarchical: bool = True
    use_cam: bool = True
    use_graph: bool = True
    use_disentangle: bool = True

    @field_validator("arch")
    @classmethod
    def _registered(cls, arch: str) -> str:
        model_class(arch)  # raises naming the registered models
        return arch

    @model_validator(mode="after")
    def _check_consistency(self) -> ModelConfig:
        if not self.channel_mult or any(m < 1 for m in self.channel_mult):
            raise ValueError(f"channel_mult must be a non-empty tuple of positive ints, got {self.channel_mult}")
        if self.condition_level >= len(self.channel_mult):
            raise ValueError(
                f"condition_level={self.condition_level} must index a U-Net level "
                f"(0..{len(self.channel_mult) - 1})"
            )
        for level, mult in enumerate(self.channel_mult):
            width = self.base_channels * mult
            if self.hr_size // 2**level in self.attention_resolutions and width % self.num_heads:
                raise ValueError(f"level {level} width {width} is not divisible by num_heads={self.num_heads}")
        deepest = self.base_channels * self.channel_mult[-1]
        if deepest % self.num_heads:
            raise ValueError(f"middle-block width {deepest} is not divisible by num_heads={self.num_heads}")
        return self

    @property
    def out_channels(self) -> int:
        """Channels of the prediction: 2N with learned sigma, else N."""
        return 2 * self.n_genes if self.learn_sigma else self.n_genes


def model_preset(
    name: Literal["paper", "cpu"], n_genes: int = 25, image_channels: int = 3, **overrides
) -> ModelConfig:
    """Return a named configuration.

    Parameters
    ----------
    name
        ``"paper"``: the paper's hyper-parameters (1 res-block, attention at 32/16/8, d_t = d_c = d = 128,
        a = 32, alpha = 0.2, C = 676) on a U-Net of about the authors' parameter budget: 32 channels at
        full resolution, widths x (1, 2, 4, 8) over four levels, 14.2 M parameters with 25 genes and RGB
        (the authors' released model: 13.4 M). Guided-diffusion's own 256 x 256 layout (128 channels,
        x (1, 1, 2, 2, 4, 4), 88 M parameters) is ``base_channels=128, channel_mult=(1, 1, 2, 2, 4, 4)``:
        380 GFLOP per forward at the paper geometry against 99 (its quality at that size is not measured).
        ``"cpu"``: a small model (32 channels, 3 levels, a = 8) that trains on 20..64 px HR tiles in
        minutes on a laptop CPU.
    n_genes, image_channels
        Number of genes and of histology channels.
    **overrides
        Any other ``ModelConfig`` field (e.g. ``arch="guided_dm"`` or ``use_cam=False``).
    """
    if name == "paper":
        values: dict = {}
    elif name == "cpu":
        values = dict(
            base_channels=32,
            channel_mult=(1, 2, 2),
            attention_resolutions=(16,),
            hr_size=64,
            d_tissue=32,
            d_cell=32,
            d_attn=32,
            cam_window=8,
            condition_level=1,
            graph_node_size=8,
        )
    else:
        raise ValueError(f"unknown preset {name!r}; choose 'paper' or 'cpu'")
    values.update(n_genes=n_genes, image_channels=image_channels)
    values.update(overrides)
    return ModelConfig(**values)


"""Diff-ST: super-resolved spatial transcriptomics with a cross-modal conditional diffusion model."""

__version__ = "0.1.0"

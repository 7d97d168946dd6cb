"""Inference: predict HR maps in counts from a trained run and write AnnData."""

"""Metrics, the noise ceiling and split reports."""

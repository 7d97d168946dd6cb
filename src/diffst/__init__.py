"""Diff-ST: super-resolved spatial transcriptomics with a cross-modal conditional diffusion model."""

import os

# With OpenMP's default busy-waiting, a torch process sharing a small CPU with any other busy process
# slows down by 20-50x (measured here: 0.3 s -> 18 s per training step on 2 cores). Passive waiting
# avoids that at little cost; it only takes effect if set before torch loads, and a user's value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

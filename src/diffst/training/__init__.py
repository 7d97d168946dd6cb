"""Training: the run loop (Accelerate, data-parallel), EMA, atomic resumable checkpoints.

Public API: :func:`train`, :func:`load_config` (re-exported from :mod:`diffst.config`) and
:func:`load_checkpoint`.
"""

from diffst.config import RunConfig, load_config
from diffst.training.checkpoint import latest_checkpoint, load_checkpoint, read_training_state
from diffst.training.loop import train

__all__ = ["train", "load_config", "load_checkpoint", "latest_checkpoint", "read_training_state", "RunConfig"]

"""Non-learned reference methods every evaluation shows next to Diff-ST."""

from diffst.baselines.interpolation import interpolate_lr

__all__ = ["interpolate_lr"]

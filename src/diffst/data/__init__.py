"""Datasets: from samples (:mod:`diffst.core.sample`) to prepared tiles on disk and back as a torch Dataset.

:mod:`~diffst.data.tiling` cuts registered tiles, :mod:`~diffst.data.prepare` writes a prepared dataset,
:mod:`~diffst.data.normalise` maps counts to model space, :mod:`~diffst.data.dataset` reads the tiles.
"""

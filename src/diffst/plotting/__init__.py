"""Figures: tile previews (:mod:`~diffst.plotting.preview`) and comparisons (:mod:`~diffst.plotting.compare`).

Drawn with matplotlib's object-oriented API on an Agg canvas: importing or using these modules neither
selects nor changes matplotlib's backend, and no pyplot figure is left open.
"""

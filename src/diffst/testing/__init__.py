"""Test support: data generators and writers used by the test suite, never by the pipeline itself.

* :func:`synthetic_slide`: a small synthetic tissue section (cells, point transcripts, H&E-like image)
  for tests of geometry, scale, tiling and readers; its expression model is a toy, so no accuracy
  claim may rest on it.
* :func:`write_visium` / :func:`write_10x_h5`: write Space Ranger-style ``outs/`` folders (Visium and
  Visium HD) that :func:`diffst.io.read_visium` reads back, for reader round trips.
* :func:`spots_from_transcripts` / :func:`spot_lattice`: a spot-only sample (Visium-like hexagonal or
  legacy-ST-like square spots) aggregated from a point-data sample, for the self-supervised mode.

Nothing here is imported by ``import diffst`` or by the pipeline.
"""

from diffst.testing.spots import spot_lattice, spots_from_transcripts
from diffst.testing.synthetic import synthetic_slide
from diffst.testing.visium import write_10x_h5, write_visium

__all__ = ["spot_lattice", "spots_from_transcripts", "synthetic_slide", "write_10x_h5", "write_visium"]

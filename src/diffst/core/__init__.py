"""Core types on the ground floor: what readers, datasets and models share.

The readers (:mod:`diffst.io`), the datasets (:mod:`diffst.data`), the models and everything above them
import these modules; nothing here imports another diffst package but :mod:`diffst.errors`.

* :mod:`diffst.core.sample`: :class:`~diffst.core.sample.Sample` and :class:`~diffst.core.sample.SpotTable`,
  one tissue section in memory (expression in slide microns, genes, image);
* :mod:`diffst.core.image`: :class:`~diffst.core.image.SlideImage`, a histology / morphology image placed in
  the slide's micron frame, plus :func:`~diffst.core.image.resample_area` and
  :func:`~diffst.core.image.tiff_pixel_size_um`;
* :mod:`diffst.core.geometry`: :class:`~diffst.core.geometry.TileGeometry` and
  :func:`~diffst.core.geometry.tile_preset`, how a tile and every modality in it are gridded;
* :mod:`diffst.core.curriculum`: the entropy curriculum of the cell patches (patch entropy, the rising
  threshold schedule, the selection mask).

Import from the modules; this package face re-exports nothing, so importing one module loads only what it needs.
"""

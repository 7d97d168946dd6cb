"""The built-in example: a compact copy of the real 10x Xenium breast cancer crop (510 x 382 µm).

All decoded transcripts (qv >= 20) of the public 10x Xenium FFPE human breast preview crop, and its
DAPI image at 0.425 µm/px (half of Xenium's native 0.2125 µm/px). Made by ``scripts/make_example.py``.
"""

from __future__ import annotations

from pathlib import Path

EXAMPLE_DIR = Path(__file__).resolve().parent
# Slide micron coordinates of the image's top-left corner (the crop corner).
EXAMPLE_ORIGIN_UM = (1062.0, 212.0)
# Held-out region for honest evaluation: the right-most 200 µm of the crop.
EXAMPLE_TEST_REGION = (1372.0, 212.0, 1572.0, 594.5)


def load_example():
    """Read the built-in Xenium example as a :class:`~diffst.data.sample.Sample`."""
    from diffst.io.xenium import read_xenium

    return read_xenium(
        EXAMPLE_DIR / "transcripts.parquet",
        image=EXAMPLE_DIR / "morphology_mip.ome.tif",
        image_origin_um=EXAMPLE_ORIGIN_UM,
        name="xenium_breast_crop",
    )

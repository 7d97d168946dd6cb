"""The built-in example: a compact copy of the real 10x Xenium breast cancer crop (510 x 382 µm).

All decoded transcripts (qv >= 20) of the public 10x Xenium FFPE human breast preview crop, and its
DAPI image at 0.425 µm/px (half of Xenium's native 0.2125 µm/px). Made by ``scripts/make_example.py``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from diffst.errors import InputError

if TYPE_CHECKING:
    from diffst.config import RunConfig

log = logging.getLogger("diffst.example")

EXAMPLE_DIR = Path(__file__).resolve().parent
# Slide micron coordinates of the image's top-left corner (the crop corner).
EXAMPLE_ORIGIN_UM = (1062.0, 212.0)
# Held-out region for honest evaluation: the right-most 200 µm of the crop.
EXAMPLE_TEST_REGION = (1372.0, 212.0, 1572.0, 594.5)


def load_example():
    """Read the built-in Xenium example as a :class:`~diffst.core.sample.Sample`."""
    from diffst.io.xenium import read_xenium

    return read_xenium(
        EXAMPLE_DIR / "transcripts.parquet",
        image=EXAMPLE_DIR / "morphology_mip.ome.tif",
        image_origin_um=EXAMPLE_ORIGIN_UM,
        name="xenium_breast_crop",
    )


def prepare_example_data(cfg: RunConfig, sample=None, progress: bool = False) -> Path | None:
    """Prepare the built-in example into ``data.path`` when ``data.example`` asks for it.

    Only into an absent or empty folder: a ``data.path`` that already holds a prepared dataset is used as
    it is, and anything else there may be the user's, so it is an error rather than replaced. Training
    never prepares data; ``diffst train``, ``diffst demo`` and ``python -m diffst.training`` call this first.

    Parameters
    ----------
    cfg
        The run configuration (``data.example``, ``data.path``, ``run_dir``).
    sample
        The example, if already read (:func:`diffst.example.load_example`).
    progress
        Show progress bars.

    Returns
    -------
    Path or None
        ``data.path`` when the example was prepared there (``dataset.json``, ``tiles.csv``, the split
        arrays and ``preview.png``), else None (no ``data.example``, or a dataset already there).

    Raises
    ------
    InputError
        If ``run_dir`` lies inside ``data.path``, or ``data.path`` is a file or a folder that is not empty
        and holds no prepared dataset (nothing is touched).
    """
    example = cfg.data.example
    path = Path(cfg.data.path).expanduser().resolve()
    if example is None or (path / "dataset.json").is_file():
        return None
    run_dir = Path(cfg.run_dir).expanduser().resolve()
    if run_dir == path or path in run_dir.parents:
        raise InputError(f"run_dir {run_dir} lies inside data.path {path}, where the built-in example is to be "
                         "prepared; choose a run_dir outside data.path")
    if path.exists() and not (path.is_dir() and not any(path.iterdir())):
        kind = "a file" if not path.is_dir() else "a folder that is not empty"
        raise InputError(
            f"data.path {path} is {kind} and holds no prepared dataset (no dataset.json), so the built-in "
            "example is not prepared there (that would replace what it holds); set data.path to a new or "
            "empty folder, or to a dataset made by `diffst prepare`"
        )
    from diffst.core.geometry import tile_preset
    from diffst.data.prepare import SplitSpec, prepare_dataset

    log.info("preparing the built-in example into %s", path)
    return prepare_dataset(
        [sample or load_example()], path, tile_preset(example.preset, example.scale), n_genes=example.n_genes,
        split=SplitSpec(test_region=EXAMPLE_TEST_REGION, train_stride_um=example.train_stride_um), progress=progress,
    )

"""Shared fixtures: the real Xenium breast crop, from ../shared/data when present, else the packaged example.

The same real 10x Xenium crop exists twice (``../shared/data/README.md``):

* ``../shared/data/xenium_breast_crop``: ``transcripts.csv.gz`` and ``morphology_mip.tif``, a plain TIFF at
  Xenium's native 0.2125 µm/px (no metadata), whose top-left corner sits at (1062, 212) µm;
* the built-in example ``src/diffst/example`` (:func:`diffst.example.load_example`): all its transcripts
  (qv >= 20) as Parquet and the same DAPI image 2x downsampled to 0.425 µm/px as an OME-TIFF, same corner.

Tests use the shared copy when it sits beside the repository and fall back to the packaged one on a clean
clone, so the whole suite runs everywhere. Only the legacy ST tests need ``../shared/data/her2st_C2_C3``
(there is no packaged copy of it) and skip without it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
XENIUM_DIR = SHARED_DATA / "xenium_breast_crop"
HER2ST_DIR = SHARED_DATA / "her2st_C2_C3"
# Both copies of the crop share the slide frame: image corner and held-out region are the same.
XENIUM_ORIGIN_UM = (1062.0, 212.0)
XENIUM_TEST_REGION = (1372.0, 212.0, 1572.0, 594.5)
XENIUM_NATIVE_UM_PER_PX = 0.2125


def pytest_configure(config):
    import torch

    torch.set_num_threads(2)


@dataclass(frozen=True)
class XeniumCrop:
    """The real Xenium crop as a Xenium-style folder: ``transcripts.*`` and a metadata-free ``morphology_mip.tif``.

    ``source`` is "shared" (``../shared/data``, full resolution) or "example" (the packaged example's files,
    its OME image rewritten as a plain TIFF so that a wrong ``pixel_size_um`` reaches the placement check
    instead of the OME metadata check). ``read_kw`` is what :func:`diffst.io.read_xenium` needs besides the
    origin to read the folder right: nothing for Xenium's native pixel size, else ``pixel_size_um``.
    """

    source: str
    folder: Path
    transcripts: Path
    image: Path
    pixel_size_um: float
    origin_um: tuple[float, float] = XENIUM_ORIGIN_UM
    read_kw: dict = field(default_factory=dict)

    @property
    def downsampling(self) -> int:
        """The image's pixel size over Xenium's native 0.2125 µm/px (1 or 2)."""
        return round(self.pixel_size_um / XENIUM_NATIVE_UM_PER_PX)

    @property
    def kind(self) -> str:
        """How :meth:`diffst.core.sample.Sample.check_placement` names this image's pixel size."""
        return "a full-resolution" if self.downsampling == 1 else f"a {self.downsampling}x downsampled"

    def table(self, nrows: int | None = None):
        """The crop's transcripts in Xenium's column layout (``feature_name``, ``x_location``, ... ``qv``)."""
        import pandas as pd

        if self.transcripts.suffix == ".parquet":
            table = pd.read_parquet(self.transcripts)
            table = table.head(nrows) if nrows is not None else table
            return table.astype({"feature_name": str, "x_location": float, "y_location": float, "qv": float})
        return pd.read_csv(self.transcripts, nrows=nrows)


@pytest.fixture(scope="session")
def xenium_crop(tmp_path_factory) -> XeniumCrop:
    """The real crop's files: ../shared/data/xenium_breast_crop, else the packaged example (see the module doc)."""
    if XENIUM_DIR.exists():
        return XeniumCrop("shared", XENIUM_DIR, XENIUM_DIR / "transcripts.csv.gz", XENIUM_DIR / "morphology_mip.tif",
                          XENIUM_NATIVE_UM_PER_PX)
    import tifffile

    from diffst.example import EXAMPLE_DIR, EXAMPLE_ORIGIN_UM

    assert tuple(EXAMPLE_ORIGIN_UM) == XENIUM_ORIGIN_UM
    folder = tmp_path_factory.mktemp("packaged") / "xenium_breast_crop"
    folder.mkdir()
    shutil.copyfile(EXAMPLE_DIR / "transcripts.parquet", folder / "transcripts.parquet")
    with tifffile.TiffFile(EXAMPLE_DIR / "morphology_mip.ome.tif") as tif:
        pixel_size = float(tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Pixels"]["PhysicalSizeX"])
        tifffile.imwrite(folder / "morphology_mip.tif", tif.asarray())  # plain TIFF, like the shared one
    return XeniumCrop("example", folder, folder / "transcripts.parquet", folder / "morphology_mip.tif", pixel_size,
                      read_kw={"pixel_size_um": pixel_size})


@pytest.fixture(scope="session")
def xenium_sample():
    """The real crop as a :class:`~diffst.core.sample.Sample`: the shared full-resolution copy, else the packaged
    example (:func:`diffst.example.load_example`, 0.425 µm/px from its OME metadata)."""
    if not XENIUM_DIR.exists():
        from diffst.example import load_example

        return load_example()
    from diffst.io.xenium import read_xenium

    return read_xenium(XENIUM_DIR, image_origin_um=XENIUM_ORIGIN_UM)


@pytest.fixture(scope="session")
def prepared_xenium(xenium_sample, tmp_path_factory):
    """A small prepared dataset of the real crop: cpu preset, s = 5, 8 genes, right 200 µm held out."""
    from diffst.core.geometry import tile_preset
    from diffst.data.prepare import SplitSpec, prepare_dataset

    out = tmp_path_factory.mktemp("prepared") / "xenium_s5"
    return prepare_dataset([xenium_sample], out, tile_preset("cpu", 5), n_genes=8,
                           split=SplitSpec(test_region=XENIUM_TEST_REGION, train_stride_um=50), progress=False)


@pytest.fixture(scope="session")
def tiny_xenium_run(prepared_xenium, tmp_path_factory):
    """A real 4-step training run of the tiny preset on ``prepared_xenium`` (s = 5, 8 genes); read-only for tests."""
    from diffst.config import parse_config
    from diffst.training import train

    cfg = parse_config({
        "preset": "tiny",
        "data": {"path": str(prepared_xenium)},
        "train": {"steps": 4, "log_every": 1, "checkpoint_every": 4},
        "sampler": {"method": "ddim", "steps": 2},
        "seed": 1, "device": "cpu", "run_dir": str(tmp_path_factory.mktemp("run") / "run"),
    }, "test")
    return train(cfg)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Path:
    """The built-in example prepared small dataset of the real Xenium crop (8 genes, DAPI, 5x, 20 x 20 HR tiles)."""
    from diffst.core.geometry import tile_preset
    from diffst.data.prepare import SplitSpec, prepare_dataset
    from diffst.example import EXAMPLE_TEST_REGION, load_example

    out = tmp_path_factory.mktemp("training") / "prep"
    prepare_dataset(
        [load_example()], out, tile_preset("cpu", 5), n_genes=8,
        split=SplitSpec(test_region=EXAMPLE_TEST_REGION, train_stride_um=50),
        overwrite=True, progress=False, preview=False,
    )
    return out


@pytest.fixture
def one_thread():
    """Single-threaded torch, as in the subprocesses, so in- and out-of-process runs agree bit for bit."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

"""Shared fixtures: the real datasets in ../shared/data, read in place."""

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
XENIUM_DIR = SHARED_DATA / "xenium_breast_crop"
HER2ST_DIR = SHARED_DATA / "her2st_C2_C3"
XENIUM_ORIGIN_UM = (1062.0, 212.0)
XENIUM_TEST_REGION = (1372.0, 212.0, 1572.0, 594.5)


def pytest_configure(config):
    import torch

    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def xenium_sample():
    if not XENIUM_DIR.exists():
        pytest.skip(f"real data not found at {XENIUM_DIR} (the shared folder must sit beside the repository)")
    from diffst.io.xenium import read_xenium

    return read_xenium(XENIUM_DIR, image_origin_um=XENIUM_ORIGIN_UM)


@pytest.fixture(scope="session")
def prepared_xenium(xenium_sample, tmp_path_factory):
    """A small prepared dataset of the real crop: cpu preset, s = 5, 8 genes, right 200 µm held out."""
    from diffst.data.geometry import tile_preset
    from diffst.data.prepare import SplitSpec, prepare_dataset

    out = tmp_path_factory.mktemp("prepared") / "xenium_s5"
    return prepare_dataset([xenium_sample], out, tile_preset("cpu", 5), n_genes=8,
                           split=SplitSpec(test_region=XENIUM_TEST_REGION, train_stride_um=50), progress=False)

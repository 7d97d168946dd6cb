"""``diffst predict --input STORE.zarr``: a whole slide predicted from a SpatialData store, end to end via the CLI.

The store is the built-in Xenium crop as spatialdata-io lays out a Xenium run (transcripts in microns mapped to
the morphology pixel frame, a multiscale ``morphology_focus``), written with the builders of
``test_inputs_scverse``; the run is the session's tiny run trained on the same crop. Needs the ``spatial`` extra.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from diffst.cli import app

sd = pytest.importorskip("spatialdata")

from test_inputs_scverse import _example_image, _example_points, _write, _xenium_frames  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module")
def xenium_store(tmp_path_factory) -> Path:
    """The crop as spatialdata-io writes a Xenium run: points ``transcripts`` and image ``morphology_focus``."""
    image_tf, points_tf = _xenium_frames("pixels")
    points, _ = _example_points({"global": points_tf})
    sdata = sd.SpatialData(images={"morphology_focus": _example_image({"global": image_tf})},
                           points={"transcripts": points})
    return _write(sdata, tmp_path_factory.mktemp("store") / "xenium.zarr")


def _tree(path: Path) -> tuple[int, str]:
    """Total size and the digest of a folder as the provenance module documents it, computed independently."""
    lines, total = [], 0
    for dirpath, _, names in os.walk(path):
        for name in names:
            file = Path(dirpath) / name
            data = file.read_bytes()
            total += len(data)
            lines.append(f"{file.relative_to(path).as_posix()}\t{len(data)}\t{hashlib.sha256(data).hexdigest()}\n")
    return total, hashlib.sha256("".join(sorted(lines)).encode()).hexdigest()


def test_predict_cli_from_spatialdata_store(tiny_xenium_run, xenium_store, tmp_path):
    import anndata as ad

    from diffst.runs import load_run

    out = tmp_path / "slide.h5ad"
    result = runner.invoke(app, ["predict", "--checkpoint", str(tiny_xenium_run), "--input", str(xenium_store),
                                 "--out", str(out), "--samples", "2", "--device", "cpu", "--seed", "5", "--stride", "200"])
    assert result.exit_code == 0, result.output
    assert "across tile edges" in result.output
    adata = ad.read_h5ad(out)
    x = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    assert adata.n_obs > 0 and np.isfinite(x).all() and (x >= 0).all() and x.sum() > 0
    assert list(adata.var_names) == list(load_run(tiny_xenium_run, device="cpu").dataset.genes)
    assert set(adata.obs["sample"]) == {"xenium"}

    info = adata.uns["diffst"]
    record = info["input"]
    assert info["blend"] == "window" and record["kind"] == "raw" and info["seed"] == 5
    store = str(xenium_store.resolve())
    assert list(record["given"]) == [store]
    # The store is one entry of the file list: its path, total bytes and the digest over its files.
    files = record["files"]
    assert list(files["path"]) == [store]
    size, digest = _tree(xenium_store)
    assert int(files["size_bytes"][0]) == size and files["sha256"][0] == digest
    assert list(files["kind"]) == ["tree"]
    # Only the prediction is left: the temporary tiling beside it is gone, and no metrics for a whole slide.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slide.h5ad"]

    # The points element given as the input: the same prediction, and the provenance still hashes the whole store.
    element = xenium_store / "points" / "transcripts"
    again = tmp_path / "element.h5ad"
    result = runner.invoke(app, ["predict", "--checkpoint", str(tiny_xenium_run), "--input", str(element),
                                 "--out", str(again), "--samples", "2", "--device", "cpu", "--seed", "5", "--stride", "200"])
    assert result.exit_code == 0, result.output
    other = ad.read_h5ad(again)
    np.testing.assert_array_equal(other.X.toarray() if hasattr(other.X, "toarray") else other.X, x)
    record = other.uns["diffst"]["input"]
    assert list(record["given"]) == [str(element.resolve())] and list(record["files"]["path"]) == [store]
    assert list(record["files"]["sha256"]) == [digest]

"""Provenance of inputs: a folder (a zarr store of many chunk files) is one "tree" row with its total size and a
digest over its files; files keep their own sha256, and a missing path says so.

The store is a real zarr store written by zarr (a chunked array of the real Xenium crop's DAPI image, 64 chunk
files) - small, so the test takes well under a second.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tifffile

from diffst.example import EXAMPLE_DIR
from diffst.hashing import sha256_file
from diffst.inference.provenance import (
    checkpoint_files,
    file_table,
    prediction_provenance,
    source_files,
    tree_digest,
)


@pytest.fixture
def store(tmp_path) -> Path:
    zarr = pytest.importorskip("zarr")
    dapi = tifffile.imread(EXAMPLE_DIR / "morphology_mip.ome.tif")[:256, :256]
    path = tmp_path / "dapi.zarr"
    root = zarr.open_group(path, mode="w")
    root.attrs["source"] = "xenium_breast_crop"
    array = root.create_array("image", shape=dapi.shape, chunks=(32, 32), dtype=dapi.dtype)
    array[:] = dapi
    return path


def _files(folder: Path) -> dict[str, bytes]:
    return {(Path(d) / n).relative_to(folder).as_posix(): (Path(d) / n).read_bytes()
            for d, _, names in os.walk(folder) for n in names}


def _reference(folder: Path) -> tuple[int, str]:
    """The documented digest, computed here from whole files (they are tiny)."""
    files = _files(folder)
    lines = [f"{rel}\t{len(data)}\t{hashlib.sha256(data).hexdigest()}\n" for rel, data in sorted(files.items())]
    return sum(len(d) for d in files.values()), hashlib.sha256("".join(lines).encode()).hexdigest()


def _chunk_files(folder: Path) -> list[Path]:
    return sorted(p for p in (folder / "image").rglob("*") if p.is_file() and p.name != "zarr.json")


def test_tree_digest_of_a_zarr_store(store, tmp_path):
    files = _files(store)
    chunks = _chunk_files(store)
    assert len(chunks) == 64 and len(files) == 66  # 8 x 8 chunks, the group's and the array's zarr.json
    size, digest = tree_digest(store)
    # Sizes add up, and the digest is the documented one (sorted "path\tsize\tsha256\n" lines, sha256 over them).
    assert size == sum(len(d) for d in files.values()) == sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
    assert (size, digest) == _reference(store)
    assert len(digest) == 64 and digest != hashlib.sha256(b"").hexdigest()
    # Stable: hashed again, and the same store copied elsewhere (the digest does not depend on where it lies).
    assert tree_digest(store) == (size, digest)
    copy = shutil.copytree(store, tmp_path / "elsewhere" / "copy.zarr")
    assert tree_digest(copy) == (size, digest)
    # The shell recipe of the module docstring gives the same digest.
    recipe = ("cd \"$1\" && find . -type f -printf '%P\\n' | LC_ALL=C sort | while IFS= read -r f; do "
              "printf '%s\\t%s\\t%s\\n' \"$f\" \"$(stat -c %s \"$f\")\" \"$(sha256sum < \"$f\" | cut -d' ' -f1)\"; "
              "done | sha256sum")
    shell = subprocess.run(["bash", "-c", recipe, "recipe", str(store)], capture_output=True, text=True, check=True)
    assert shell.stdout.split()[0] == digest

    # One byte of one chunk file changed (same size): the digest changes, the size does not.
    chunk = chunks[len(chunks) // 2]
    original = chunk.read_bytes()
    chunk.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    changed = tree_digest(store)
    assert changed[0] == size and changed[1] != digest and changed == _reference(store)
    chunk.write_bytes(original)  # restored: the digest is back
    assert tree_digest(store) == (size, digest)
    # A chunk renamed or removed changes it too; the sizes still add up.
    chunk.rename(chunk.with_name(chunk.name + "_moved"))
    assert tree_digest(store)[1] != digest and tree_digest(store)[0] == size
    chunk.with_name(chunk.name + "_moved").unlink()
    assert tree_digest(store) == (size - len(original), _reference(store)[1])


def test_file_table_rows_for_files_folders_and_missing_paths(store, tmp_path):
    big = tmp_path / "big.bin"  # several read blocks: a file is hashed block by block
    data = np.random.default_rng(0).integers(0, 256, 3 * (1 << 20) + 17, dtype=np.uint8).tobytes()
    big.write_bytes(data)
    table = file_table([store, big, tmp_path / "gone.parquet", str(store / "image") + "/"])
    assert set(table) == {"path", "kind", "size_bytes", "sha256"}
    assert len({len(column) for column in table.values()}) == 1
    assert table["path"][:3] == [str(store.resolve()), str(big.resolve()), str((tmp_path / "gone.parquet").resolve())]
    assert table["kind"] == ["tree", "file", "missing", "tree"]
    assert table["size_bytes"][:3] == [tree_digest(store)[0], len(data), -1]
    assert table["sha256"][:3] == [tree_digest(store)[1], hashlib.sha256(data).hexdigest(), ""]
    assert sha256_file(big) == hashlib.sha256(data).hexdigest()
    # A folder inside the store is its own tree: its files' paths are relative to it.
    assert (table["size_bytes"][3], table["sha256"][3]) == _reference(store / "image")
    # An empty folder is a tree of no files, not a missing path.
    (tmp_path / "empty").mkdir()
    assert file_table([tmp_path / "empty"])["kind"] == ["tree"]
    assert file_table([tmp_path / "empty"])["size_bytes"] == [0]


def test_source_files_name_stores_and_readers_files():
    meta = {"samples": [
        {"meta": {"spatialdata_store": "/data/xenium.zarr", "coordinate_system": "global", "image_element": "m"}},
        {"meta": {"transcripts_file": "/data/tx.parquet", "min_qv": "20"}},
        {"meta": {"anndata_file": "/data/c2.h5ad", "layer": "None"}},
        {"meta": {"matrix_file": "None"}},
    ]}
    assert source_files(meta) == ["/data/xenium.zarr", "/data/tx.parquet", "/data/c2.h5ad"]


def test_anndata_input_is_named(tmp_path):
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    from diffst.io import read_anndata

    tx = pd.read_parquet(EXAMPLE_DIR / "transcripts.parquet").head(5000)
    col = np.floor((tx["x_location"] - tx["x_location"].min()) / 20).astype(int).to_numpy()
    row = np.floor((tx["y_location"] - tx["y_location"].min()) / 20).astype(int).to_numpy()
    codes, genes = pd.factorize(tx["feature_name"].astype(str), sort=True)
    keys, inverse = np.unique(np.column_stack([col, row]), axis=0, return_inverse=True)
    counts = sp.csr_matrix((np.ones(len(codes)), (inverse.ravel(), codes)), shape=(len(keys), len(genes)))
    adata = ad.AnnData(X=counts, var=pd.DataFrame(index=list(genes)))
    adata.obsm["spatial"] = (keys + 0.5) * 20.0
    path = tmp_path / "bins.h5ad"
    adata.write_h5ad(path)
    sample = read_anndata(path, image=None, coords_unit="um")
    assert sample.meta["anndata_file"] == str(path)
    assert "anndata_file" not in read_anndata(adata, image=None, coords_unit="um").meta


def test_checkpoint_files_and_provenance_columns_are_parallel(tiny_xenium_run, prepared_xenium):
    import json

    checkpoint = sorted((tiny_xenium_run / "checkpoints").iterdir())[-1]
    table = checkpoint_files(checkpoint)
    assert len({len(column) for column in table.values()}) == 1 and set(table["kind"]) == {"file"}
    meta = json.loads((prepared_xenium / "dataset.json").read_text())
    extras = {"checkpoint": checkpoint, "step": 4, "sampler": {"method": "ddim"}, "seed": 0}
    record = prediction_provenance(extras, prepared_xenium, "test", meta, 1)
    for name in ("files", "source_files"):
        files = record["input"][name]
        assert len({len(column) for column in files.values()}) == 1
        assert "missing" not in files["kind"] and all(len(h) == 64 for h in files["sha256"])


def test_a_visium_folder_input_lists_the_files_read(tmp_path):
    """A Space Ranger folder given as a folder: each file the reader used is a hashed row, none missing."""
    from diffst.inference.whole_slide import raw_input_record
    from diffst.io import read_sample
    from diffst.testing import synthetic_slide, write_visium

    write_visium(synthetic_slide(160, 120, seed=2), tmp_path / "outs", bin_size_um=8)
    sample = read_sample(tmp_path / "outs")
    record = raw_input_record([sample], [tmp_path / "outs"], {})
    files = record["files"]
    names = [Path(p).name for p in files["path"]]
    assert {"filtered_feature_bc_matrix.h5", "tissue_positions.parquet", "scalefactors_json.json"} <= set(names)
    assert any(n.startswith("tissue_hires_image") for n in names)
    assert set(files["kind"]) == {"file"}
    for path, size, digest in zip(files["path"], files["size_bytes"], files["sha256"], strict=True):
        data = Path(path).read_bytes()
        assert size == len(data) > 0 and digest == hashlib.sha256(data).hexdigest()
    assert record["given"] == [str((tmp_path / "outs").resolve())]

"""Peak memory of whole-slide ``diffst predict`` from 4 to 64 mm² of tissue (target: within 1.2x).

Synthetic Xenium-like slides (a ``transcripts.parquet`` and a DAPI-like ``morphology_mip.ome.tif`` at
0.5 µm/px) of about 4, 16 and 64 mm² of tissue are generated (:func:`write_slide`: cells on a jittered grid
whose density follows a smooth field, a few transcripts per cell of the model's genes, a nucleus blob per
cell in the image), and a tiny model is trained on the built-in example (``preset: tiny``, 8 steps, s = 5,
8 genes: memory is the point, not accuracy; its sampler: DDIM, 1 step, K = 2, the point estimate the mean
of the samples, so that the 64 mm² slide predicts in minutes on 2 cores). Each measurement is a fresh
process that writes its own peak resident set size (``VmHWM`` of ``/proc/self/status``) when it exits:

* ``predict_input``: ``diffst predict --checkpoint RUN --input SLIDE --out slide.h5ad`` end to end (read
  the raw files, tile all tissue at a half-tile stride, predict, blend, write), what the target is about;
* ``tiling``: only the reading and tiling part of it (the same ``whole_slide_tiles`` call in a child
  process, kept as a prepared dataset);
* ``predict_data``: ``diffst predict --checkpoint RUN --data TILED --out tiles.h5ad`` on that prepared
  dataset: prediction, stitching and writing only;
* ``predict_zarr``: the same with ``--out tiles.zarr`` (a SpatialData store: histology, HR-bin labels,
  LR spots, tables).

Results: ``benchmarks/results/bench_memory.json`` (per size: tissue mm², tiles, HR bins, seconds and peak
RSS of each measurement, and the ratios RSS(largest) / RSS(smallest)) and ``bench_memory.png``.

Usage::

    python benchmarks/bench_memory.py [--sizes 4,16,64] [--work DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PIXEL_UM = 0.5


# -- synthetic slide ---------------------------------------------------------------------------------------
def write_slide(folder: Path, side_um: float, genes: list[str], seed: int = 0, spacing_um: float = 15.0,
                per_cell: float = 12.0) -> dict:
    """Write a Xenium-like folder of a square tissue ``side_um`` wide: transcripts.parquet + an OME-TIFF.

    Cells sit on a jittered grid (``spacing_um``), kept with a probability that follows a smooth field
    (denser and sparser regions); each has a type (from a second smooth field) that raises its own marker
    genes; ``per_cell`` transcripts on average fall within 5 µm of its centre. The image (uint8, one
    channel, 0.5 µm/px) has a Gaussian nucleus blob at each cell, brighter where cells are denser.

    Returns
    -------
    dict
        ``side_um``, ``tissue_mm2``, ``n_cells``, ``n_transcripts``, ``image_px``.
    """
    import pandas as pd
    import tifffile
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    grid = np.arange(spacing_um / 2, side_um, spacing_um)
    cx, cy = np.meshgrid(grid, grid)
    xy = np.column_stack([cx.ravel(), cy.ravel()]) + rng.uniform(-3, 3, (cx.size, 2))
    coarse = max(2, int(side_um // 200))

    def field(sigma: float) -> np.ndarray:
        f = ndimage.gaussian_filter(rng.standard_normal((coarse, coarse)), sigma)
        f = (f - f.mean()) / (f.std() or 1)
        idx = np.clip((xy / side_um * coarse).astype(int), 0, coarse - 1)
        return f[idx[:, 1], idx[:, 0]]

    keep = rng.random(len(xy)) < np.clip(0.7 + 0.2 * field(2.0), 0.3, 0.98)
    types = np.digitize(field(3.0)[keep], [-0.5, 0.5])  # 3 types
    xy = xy[keep]
    n_cells, n_genes = len(xy), len(genes)
    rates = np.full((n_cells, n_genes), per_cell * 0.3 / n_genes)
    for t in range(3):
        rates[np.ix_(types == t, np.arange(t, n_genes, 3))] += per_cell * 0.7 / len(range(t, n_genes, 3))
    counts = rng.poisson(rates)
    cell_of = np.repeat(np.arange(n_cells), counts.sum(axis=1))
    gene_of = np.concatenate([np.repeat(np.arange(n_genes), row) for row in counts])
    radius = 5.0 * np.sqrt(rng.random(len(cell_of)))
    angle = rng.uniform(0, 2 * np.pi, len(cell_of))
    x = np.clip(xy[cell_of, 0] + radius * np.cos(angle), 0, side_um - 1e-3)
    y = np.clip(xy[cell_of, 1] + radius * np.sin(angle), 0, side_um - 1e-3)
    table = pd.DataFrame({"feature_name": pd.Categorical.from_codes(gene_of, categories=genes),
                          "x_location": x.astype(np.float32), "y_location": y.astype(np.float32),
                          "z_location": np.zeros(len(x), np.float32), "qv": np.full(len(x), 40.0, np.float32),
                          "overlaps_nucleus": (radius < 3).astype(np.int8)})
    table.to_parquet(folder / "transcripts.parquet", index=False)

    # The image, in strips of rows (a 64 mm² slide is 16000 x 16000 px).
    side_px = int(round(side_um / PIXEL_UM))
    image = np.zeros((side_px, side_px), np.uint8)
    sigma_px = 2.5 / PIXEL_UM
    pad = int(4 * sigma_px)
    centres = np.floor(xy / PIXEL_UM).astype(int)
    order = np.argsort(centres[:, 1])
    rows_sorted = centres[order, 1]
    strip = 1024
    for top in range(0, side_px, strip):
        bottom = min(top + strip, side_px)
        lo, hi = np.searchsorted(rows_sorted, [top - pad, bottom + pad])
        pts = centres[order[lo:hi]]
        canvas = np.zeros((bottom - top + 2 * pad, side_px), np.float32)
        np.add.at(canvas, (pts[:, 1] - top + pad, np.clip(pts[:, 0], 0, side_px - 1)), 1.0)
        blurred = ndimage.gaussian_filter(canvas, sigma_px)[pad : pad + bottom - top]
        image[top:bottom] = np.clip(blurred * (2 * np.pi * sigma_px**2) * 200 + 10, 0, 255).astype(np.uint8)
    tifffile.imwrite(folder / "morphology_mip.ome.tif", image, ome=True, tile=(512, 512),
                     metadata={"axes": "YX", "PhysicalSizeX": PIXEL_UM, "PhysicalSizeY": PIXEL_UM,
                               "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"})
    return {"side_um": side_um, "tissue_mm2": side_um**2 / 1e6, "n_cells": int(n_cells),
            "n_transcripts": int(len(x)), "image_px": side_px}


# -- model -------------------------------------------------------------------------------------------------
def train_tiny(work: Path) -> Path:
    """Train the tiny model on the built-in example (prepared at s = 5, 8 genes) and return its run folder."""
    import yaml

    run = work / "run"
    if (run / "checkpoints").is_dir() or any(run.glob("**/manifest.json")):
        return run
    prepared = work / "example_prepared"
    if not prepared.exists():
        from diffst.core.geometry import tile_preset
        from diffst.data.prepare import SplitSpec, prepare_dataset
        from diffst.example import EXAMPLE_TEST_REGION, load_example

        prepare_dataset([load_example()], prepared, tile_preset("cpu", 5), n_genes=8, progress=False, preview=False,
                        split=SplitSpec(test_region=EXAMPLE_TEST_REGION, train_stride_um=50))
    config = {"preset": "tiny", "data": {"path": str(prepared)}, "train": {"steps": 8, "checkpoint_every": 8},
              "sampler": {"method": "ddim", "steps": 1, "num_samples": 2, "point_estimate": "sample_mean"},
              "seed": 0, "device": "cpu", "run_dir": str(run)}
    (work / "tiny.yaml").write_text(yaml.safe_dump(config))
    _run([sys.executable, "-m", "diffst.cli", "train", "--config", str(work / "tiny.yaml")])
    return run


def _run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, cwd=ROOT, env=_env())


def _env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


# -- measuring ---------------------------------------------------------------------------------------------
# A child's own peak: VmHWM of its address space, written when it exits. (The kernel's ru_maxrss is no good
# here: a child inherits the parent's peak at fork and keeps it through exec, and this parent is big.)
PEAK_AT_EXIT = """
import atexit, os, runpy, sys
def _report():
    with open("/proc/self/status") as fh:
        kb = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM"))
    with open(os.environ["BENCH_PEAK_FILE"], "w") as out:
        out.write(str(kb))
atexit.register(_report)
"""
RUN_MODULE = PEAK_AT_EXIT + """
module = sys.argv[1]
sys.argv = [module, *sys.argv[2:]]
runpy.run_module(module, run_name="__main__")
"""


def measure(args: list[str], log: Path, code: str = RUN_MODULE) -> dict:
    """Run ``python -c code *args`` as a child; return its wall seconds and its own peak RSS (MB, VmHWM)."""
    peak_file = log.with_suffix(".peak")
    peak_file.unlink(missing_ok=True)
    start = time.monotonic()
    with open(log, "w") as fh:
        proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env={**_env(), "BENCH_PEAK_FILE":
                              str(peak_file)}, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}); see {log}")
    return {"seconds": round(time.monotonic() - start, 1), "peak_rss_mb": round(int(peak_file.read_text()) / 1024, 1)}


TILE_CHILD = PEAK_AT_EXIT + """
import sys, shutil
from pathlib import Path
from diffst.io import read_sample
from diffst.inference.whole_slide import whole_slide_tiles
from diffst.runs import load_run
slide, run, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
samples = [read_sample(slide)]
with whole_slide_tiles(samples, load_run(run, device="cpu"), out.parent, progress=False) as data:
    shutil.copytree(data, out)
"""


def bench_size(area_mm2: float, run: Path, genes: list[str], work: Path) -> dict:
    """Generate one slide and measure tiling, predict --data and predict --input on it."""
    side_um = float(np.sqrt(area_mm2) * 1000)
    slide = work / f"slide_{area_mm2:g}mm2"
    info_file = slide / "slide.json"
    if info_file.exists():
        info = json.loads(info_file.read_text())
    else:
        started = time.monotonic()
        info = write_slide(slide, side_um, genes)
        info["generate_seconds"] = round(time.monotonic() - started, 1)
        info_file.write_text(json.dumps(info))
    print(f"[{area_mm2:g} mm²] slide: {info}", flush=True)
    row = {"area_mm2": area_mm2, "slide": info}
    tiles = work / f"tiles_{area_mm2:g}mm2"
    shutil.rmtree(tiles, ignore_errors=True)
    row["tiling"] = measure([str(slide), str(run), str(tiles)], work / f"tiling_{area_mm2:g}.log", TILE_CHILD)
    meta = json.loads((tiles / "dataset.json").read_text())
    row["n_tiles"] = int(meta["n_tiles"]["test"])
    print(f"[{area_mm2:g} mm²] tiling: {row['tiling']}, {row['n_tiles']} tiles", flush=True)
    out = work / f"pred_data_{area_mm2:g}.h5ad"
    out.unlink(missing_ok=True)
    row["predict_data"] = measure(["diffst.cli", "predict", "--checkpoint", str(run), "--data",
                                   str(tiles), "--out", str(out), "--no-evaluate", "--device", "cpu"],
                                  work / f"predict_data_{area_mm2:g}.log")
    print(f"[{area_mm2:g} mm²] predict --data: {row['predict_data']}", flush=True)
    out = work / f"pred_data_{area_mm2:g}.zarr"
    shutil.rmtree(out, ignore_errors=True)
    row["predict_zarr"] = measure(["diffst.cli", "predict", "--checkpoint", str(run), "--data",
                                   str(tiles), "--out", str(out), "--no-evaluate", "--device", "cpu"],
                                  work / f"predict_zarr_{area_mm2:g}.log")
    print(f"[{area_mm2:g} mm²] predict --data, SpatialData out: {row['predict_zarr']}", flush=True)
    out = work / f"pred_input_{area_mm2:g}.h5ad"
    out.unlink(missing_ok=True)
    row["predict_input"] = measure(["diffst.cli", "predict", "--checkpoint", str(run),
                                    "--input", str(slide), "--out", str(out), "--device", "cpu"],
                                   work / f"predict_input_{area_mm2:g}.log")
    import h5py

    with h5py.File(out, "r") as fh:
        row["hr_bins"] = int(fh["X"].shape[0])
        row["output_mb"] = round(out.stat().st_size / 2**20, 1)
    print(f"[{area_mm2:g} mm²] predict --input: {row['predict_input']}, {row['hr_bins']} HR bins", flush=True)
    return row


def plot(report: dict, path: Path) -> None:
    """Peak RSS against tissue area for the three measurements, with the 1.2x band of the smallest slide."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["sizes"]
    area = [r["area_mm2"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, label, style in (("predict_input", "predict --input (end to end)", "o-"),
                              ("tiling", "reading + tiling only", "s--"),
                              ("predict_data", "predict --data (predict, stitch, write)", "^-"),
                              ("predict_zarr", "predict --data, SpatialData .zarr out", "v:")):
        ax.plot(area, [r[key]["peak_rss_mb"] for r in rows], style, label=label)
    base = rows[0]["predict_input"]["peak_rss_mb"]
    ax.axhspan(base, 1.2 * base, color="tab:blue", alpha=0.1, label="1.2x of the smallest end-to-end run")
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(area, [f"{a:g}" for a in area])
    ax.set_xlabel("tissue area (mm²)")
    ax.set_ylabel("peak RSS (MB)")
    ax.set_ylim(0, None)
    ax.set_title("diffst predict, whole slide: peak memory vs slide size")
    for r in rows:
        ax.annotate(f"{r['n_tiles']} tiles", (r["area_mm2"], r["predict_input"]["peak_rss_mb"]),
                    textcoords="offset points", xytext=(4, 6), fontsize=8)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="4,16,64", help="Tissue areas in mm², comma-separated.")
    parser.add_argument("--work", type=Path, default=Path("/tmp/diffst_bench_memory"), help="Scratch folder.")
    parser.add_argument("--keep", action="store_true", help="Keep the scratch folder.")
    args = parser.parse_args()
    sizes = [float(s) for s in args.sizes.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    run = train_tiny(args.work)
    from diffst.runs import load_run

    genes = list(load_run(run, device="cpu").dataset.genes)
    rows = [bench_size(a, run, genes, args.work) for a in sizes]
    first, last = rows[0], rows[-1]
    ratios = {key: round(last[key]["peak_rss_mb"] / first[key]["peak_rss_mb"], 3)
              for key in ("predict_input", "tiling", "predict_data", "predict_zarr")}
    import torch

    report = {
        "what": "peak RSS (VmHWM at exit) of fresh processes on synthetic Xenium-like slides",
        "command": " ".join(["python", "benchmarks/bench_memory.py", *sys.argv[1:]]),
        "model": "tiny preset, 8 training steps on the built-in example (s = 5, 8 genes); sampler DDIM 1 step, "
                 "K = 2, point estimate = sample mean",
        "target": "RSS(largest) / RSS(smallest) of predict --input (and of each output format) <= 1.2",
        "ratio_largest_over_smallest": ratios,
        "sizes": rows,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": str(torch.__version__),
                    "platform": platform.platform()},
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_memory.json").write_text(json.dumps(report, indent=2))
    plot(report, RESULTS / "bench_memory.png")
    print(json.dumps({"ratios": ratios, **{f"{r['area_mm2']:g}mm2": {k: r[k]["peak_rss_mb"] for k in ratios}
                                          for r in rows}}, indent=2))
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Memory and time of the readers and of ``prepare``: transcripts held per row, JPEG decoding, tile writing.

Every figure comes from a fresh Python process (one per task), so one task's memory never inflates
another's. Peak memory of a stage is the largest resident set (VmRSS) a 5 ms sampling thread sees while
the stage runs (``peak_rss_mb``, with ``rss_before_mb`` at its start), and ``process_max_rss_mb`` is the
kernel's peak for the whole task process (imports and set-up included), which a sampling thread cannot
miss. Tasks:

* ``xenium_crop``: :func:`diffst.io.read_xenium` on the real crop (``../shared/data/xenium_breast_crop``,
  ``transcripts.csv.gz`` + DAPI TIFF): seconds, peak RSS and the bytes held per transcript by
  ``sample.transcripts`` (``DataFrame.memory_usage(deep=True)`` over the rows);
* ``xenium_synthetic_csv`` / ``xenium_synthetic_parquet``: the same on a synthetic Xenium table of
  ``--rows`` rows (default 4 M; every Xenium column, string cell ids as Xenium >= 1.3 writes them, 2 %
  control probes, 5 % below qv 20), written once to ``--cache``;
* ``jpeg_fine`` / ``jpeg_coarse``: open the HER2ST C2 H&E JPEG (9270 x 9920 px, 0.69 µm/px) and read one
  region at 0.5 µm/px (full resolution needed) or at 6.25 µm/px (the self-supervised geometry's pixel);
* ``legacy_prepare_selfsup``: read C2 and prepare it in the self-supervised mode (``diffst prepare
  --self-supervised``: scale 2, the pitch geometry);
* ``legacy_prepare_cpu``: read C2 and prepare it with the ``cpu`` preset (s = 10, 0.5 µm/px image);
* ``prepare_example``: prepare the built-in example as the test fixture does (cpu, s = 5, 8 genes);
* ``prepare_stride50`` / ``prepare_stride10``: the example (cpu, s = 5, 25 genes) with training tiles every
  50 µm or every 10 µm: the same transcripts and image, ~20x more tiles;
* ``prepare_mirror2`` / ``prepare_mirror4``: prepare the example mirrored 2 x 2 and 4 x 4 into a larger
  slide (cpu, s = 5, 25 genes, training stride 50 µm): transcripts, image and tiles all grow with the area.

Usage::

    python benchmarks/bench_readers.py --label after [--tasks a,b] [--rows 4000000]
    PYTHONPATH=/path/to/old/src python benchmarks/bench_readers.py --label before

Results are merged into ``benchmarks/results/bench_readers.json`` under the label.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared" / "data"
XENIUM_DIR = SHARED / "xenium_breast_crop"
C2_DIR = SHARED / "her2st_C2_C3" / "C2"
RESULTS = HERE / "results" / "bench_readers.json"
TASKS = ("xenium_crop", "xenium_synthetic_csv", "xenium_synthetic_parquet", "jpeg_fine", "jpeg_coarse",
         "legacy_prepare_selfsup", "legacy_prepare_cpu", "prepare_example", "prepare_stride50", "prepare_stride10",
         "prepare_mirror2", "prepare_mirror4")


def rss_mb() -> float:
    """Resident set of this process now (MB)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class PeakRSS:
    """Context manager sampling VmRSS every 5 ms; ``peak_mb`` is the largest seen (and at exit)."""

    def __enter__(self):
        self.before_mb = rss_mb()
        self.peak_mb = self.before_mb
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._t0 = time.perf_counter()
        return self

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak_mb = max(self.peak_mb, rss_mb())

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._t0
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, rss_mb())
        return False

    def report(self) -> dict:
        return {"seconds": round(self.seconds, 3), "rss_before_mb": round(self.before_mb, 1),
                "peak_rss_mb": round(self.peak_mb, 1), "peak_increase_mb": round(self.peak_mb - self.before_mb, 1)}


# ---------------------------------------------------------------------------------------------- data
def synthetic_transcripts(cache: Path, rows: int, kind: str) -> Path:
    """A Xenium-layout transcripts table of ``rows`` rows (written once, then reused)."""
    import numpy as np
    import pandas as pd

    folder = cache / f"xenium_synthetic_{rows}"
    path = folder / ("transcripts.csv.gz" if kind == "csv" else "transcripts.parquet")
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    genes = [f"GENE{i:03d}" for i in range(300)]
    genes += [f"NegControlProbe_{i:02d}" for i in range(10)] + [f"BLANK_{i:04d}" for i in range(10)]
    weights = np.r_[np.full(300, 0.98 / 300), np.full(20, 0.02 / 20)]
    gene = rng.choice(len(genes), size=rows, p=weights)
    letters = np.array(list("abcdefghijklmnop"))
    cell_codes = rng.integers(0, 16, size=(200_000, 8))
    cells = np.array(["".join(letters[c]) + "-1" for c in cell_codes] + ["UNASSIGNED"], dtype=object)
    cell = rng.integers(0, len(cells), size=rows)
    table = pd.DataFrame({
        "transcript_id": np.arange(rows, dtype=np.uint64) + 281_000_000_000_000,
        "cell_id": cells[cell],
        "overlaps_nucleus": rng.integers(0, 2, size=rows).astype(np.uint8),
        "feature_name": pd.Categorical.from_codes(gene, genes),
        "x_location": rng.uniform(0, 8000, size=rows).astype(np.float32),
        "y_location": rng.uniform(0, 6000, size=rows).astype(np.float32),
        "z_location": rng.uniform(5, 25, size=rows).astype(np.float32),
        "qv": np.where(rng.random(rows) < 0.05, rng.uniform(5, 20, rows), 40.0).astype(np.float32),
    })
    tmp = path.with_suffix(".partial")
    if kind == "csv":
        table.to_csv(tmp, index=False, compression="gzip")
    else:
        table.to_parquet(tmp, row_group_size=1_000_000)
    tmp.rename(path)
    return path


def mirrored_example(k: int):
    """The built-in example mirrored k x k into one larger slide (image and transcripts)."""
    import numpy as np
    import pandas as pd

    from diffst.core.image import SlideImage
    from diffst.core.sample import Sample
    from diffst.example import EXAMPLE_ORIGIN_UM, load_example

    sample = load_example()
    pixels = np.asarray(sample.image.overview(max_side=100_000))[..., 0]
    rows, cols = pixels.shape
    px = sample.image.pixel_size_um
    w, h = cols * px, rows * px
    image = np.block([[pixels[:: -1 if i % 2 else 1, :: -1 if j % 2 else 1] for j in range(k)] for i in range(k)])
    tx = sample.transcripts
    x = tx["x_um"].to_numpy(dtype=float) - EXAMPLE_ORIGIN_UM[0]
    y = tx["y_um"].to_numpy(dtype=float) - EXAMPLE_ORIGIN_UM[1]
    parts = []
    for i in range(k):
        for j in range(k):
            xx = (w - x if j % 2 else x) + j * w
            yy = (h - y if i % 2 else y) + i * h
            keep = (xx < (j + 1) * w) & (yy < (i + 1) * h) & (xx >= j * w) & (yy >= i * h)
            parts.append(pd.DataFrame({"gene": tx["gene"].to_numpy()[keep], "x_um": xx[keep], "y_um": yy[keep]}))
    table = pd.concat(parts, ignore_index=True)
    return Sample(f"mirror{k}", sample.genes, SlideImage(image, pixel_size_um=px), table, platform="xenium")


# ---------------------------------------------------------------------------------------------- tasks
def task_xenium(path: Path, **kw) -> dict:
    from diffst.io.xenium import read_xenium

    with PeakRSS() as probe:
        sample = read_xenium(path, **kw)
    tx = sample.transcripts
    n = len(tx)
    held = int(tx.memory_usage(deep=True, index=True).sum())
    return {**probe.report(), "transcripts": n, "bytes_held": held, "bytes_per_transcript": round(held / n, 2),
            "columns": {c: str(tx[c].dtype) for c in tx.columns}}


def task_jpeg(pixel_um: float, size_um: float) -> dict:
    from diffst.core.image import SlideImage

    path = next(C2_DIR.glob("*.jpg"))
    with PeakRSS() as probe:
        image = SlideImage(path, pixel_size_um=0.6934)
        opened = time.perf_counter() - probe._t0
        rows, cols = image.shape_px
        x, y = cols * 0.6934 / 2, rows * 0.6934 / 2
        region = image.read_region_um(x, y, size_um, size_um, pixel_um)
    return {**probe.report(), "open_seconds": round(opened, 3), "region_px": list(region.shape),
            "region_mean": round(float(region.mean()), 5)}


def task_legacy_prepare(out: Path, selfsup: bool) -> dict:
    from diffst.core.geometry import spot_pitch_geometry, tile_preset
    from diffst.data.prepare import prepare_dataset
    from diffst.io.legacy_st import find_legacy_st, read_legacy_st

    with PeakRSS() as probe:
        sample = read_legacy_st(**find_legacy_st(C2_DIR))
        geometry = spot_pitch_geometry(sample, 2) if selfsup else tile_preset("cpu", 10)
        prepare_dataset([sample], out, geometry, n_genes=25, progress=False, preview=False, self_supervised=selfsup)
    meta = json.loads((out / "dataset.json").read_text())
    return {**probe.report(), "image_pixel_um": geometry.image_pixel_um, "n_tiles": meta["n_tiles"]}


def task_prepare(out: Path, sample_fn, **kw) -> dict:
    from diffst.core.geometry import tile_preset
    from diffst.data.prepare import prepare_dataset

    sample = sample_fn()
    with PeakRSS() as probe:
        prepare_dataset([sample], out, tile_preset("cpu", 5), progress=False, preview=False, **kw)
    meta = json.loads((out / "dataset.json").read_text())
    return {**probe.report(), "n_tiles": meta["n_tiles"]}


def run_task(name: str, cache: Path, rows: int) -> dict:
    from diffst.data.prepare import SplitSpec
    from diffst.example import EXAMPLE_ORIGIN_UM, EXAMPLE_TEST_REGION, load_example

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "prepared"
        if name == "xenium_crop":
            return task_xenium(XENIUM_DIR, image_origin_um=EXAMPLE_ORIGIN_UM)
        if name.startswith("xenium_synthetic_"):
            return task_xenium(synthetic_transcripts(cache, rows, name.rsplit("_", 1)[1]))
        if name == "jpeg_fine":
            return task_jpeg(0.5, 200.0)
        if name == "jpeg_coarse":
            return task_jpeg(6.25, 1600.0)
        if name.startswith("legacy_prepare_"):
            return task_legacy_prepare(out, name.endswith("selfsup"))
        if name == "prepare_example":
            return task_prepare(out, load_example, n_genes=8,
                                split=SplitSpec(test_region=EXAMPLE_TEST_REGION, train_stride_um=50))
        if name.startswith("prepare_stride"):
            return task_prepare(out, load_example, n_genes=25, split=SplitSpec(train_stride_um=float(name[14:])))
        if name.startswith("prepare_mirror"):
            k = int(name[-1])
            return task_prepare(out, lambda: mirrored_example(k), n_genes=25, split=SplitSpec(train_stride_um=50))
    raise SystemExit(f"unknown task {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="after", help="key of this run in the results file (before / after)")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of " + ", ".join(TASKS))
    parser.add_argument("--rows", type=int, default=4_000_000, help="rows of the synthetic Xenium tables")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "diffst_bench_readers")
    parser.add_argument("--task", help=argparse.SUPPRESS)  # internal: run one task in this process
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.task:
        import resource

        result = run_task(args.task, args.cache, args.rows)
        result["process_max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        print("RESULT " + json.dumps(result))
        return
    results = {}
    for name in args.tasks.split(","):
        if name.startswith("xenium_synthetic_"):  # write the table outside the measured process
            subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(HERE)!r}); import bench_readers "
                            f"as b; from pathlib import Path; b.synthetic_transcripts(Path({str(args.cache)!r}), "
                            f"{args.rows}, {name.rsplit('_', 1)[1]!r})"], check=True)
        proc = subprocess.run([sys.executable, __file__, "--task", name, "--cache", str(args.cache), "--rows",
                               str(args.rows)], capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        results[name] = json.loads(line[-1][7:]) if line else {"error": proc.stderr[-2000:]}
        print(name, json.dumps(results[name]), flush=True)
    record = {}
    if args.out.exists():
        record = json.loads(args.out.read_text())
    previous = record.get(args.label, {})
    command = " ".join(["python", "benchmarks/bench_readers.py", *sys.argv[1:]])
    pythonpath = os.environ.get("PYTHONPATH")
    record[args.label] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "commands": [*previous.get("commands", []), (f"PYTHONPATH={pythonpath} " if pythonpath else "") + command],
        "rows_synthetic": args.rows,
        "tasks": {**previous.get("tasks", {}), **results},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()

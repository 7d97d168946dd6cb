"""Training-free and linear baselines on the built-in example's held-out region, beside bicubic.

Prepares the example (cpu preset, right-most 200 µm held out, 25 genes) at 5x and 10x, fits the histology
ridge on the training tiles, and scores bicubic, nearest, the ridge and the TESLA-style filter on the same
test tiles: signed PCC per map and pooled, RMSE / MAE in counts, SSIM, with bootstrap 95 % intervals of the
per-tile PCC. Writes benchmarks/results/baselines.json and prints a table. About a minute on 2 cores.

    python benchmarks/bench_baselines.py
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from diffst.baselines.interpolation import interpolate_lr
from diffst.baselines.ridge import HistologyRidge
from diffst.baselines.tesla import tesla_like
from diffst.core.geometry import tile_preset
from diffst.data.dataset import PreparedTiles
from diffst.data.prepare import SplitSpec, prepare_dataset
from diffst.evaluation.metrics import bootstrap_interval, evaluate_maps, pearson_per_map
from diffst.example import EXAMPLE_TEST_REGION, load_example

RESULTS = Path(__file__).resolve().parent / "results" / "baselines.json"


def score(pred: np.ndarray, truth: np.ndarray) -> dict:
    """Metrics of one method plus the bootstrap interval of its per-tile PCC."""
    metrics = evaluate_maps(pred, truth)
    per_tile = np.nanmean(pearson_per_map(pred, truth), axis=1)
    metrics["pcc_ci95"] = bootstrap_interval(per_tile)
    return metrics


def main() -> None:
    """Run every baseline at both scales and write the results."""
    sample = load_example()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for scale in (5, 10):
            path = prepare_dataset([sample], Path(tmp) / f"s{scale}", tile_preset("cpu", scale), n_genes=25,
                                   split=SplitSpec(test_region=EXAMPLE_TEST_REGION, train_stride_um=20), progress=False)
            train, test = PreparedTiles(path, "train"), PreparedTiles(path, "test")
            lr, tissue, truth = (np.asarray(a) for a in (test.lr_counts, test.tissue, test.hr_counts))
            hw = truth.shape[-2:]
            ridge = HistologyRidge().fit(np.asarray(train.lr_counts), np.asarray(train.tissue),
                                         np.asarray(train.hr_counts), scale)
            preds = {"bicubic": interpolate_lr(lr, hw, scale), "nearest": interpolate_lr(lr, hw, scale, "nearest"),
                     "histology ridge": ridge.predict(lr, tissue, hw, scale), "tesla-style": tesla_like(lr, tissue, hw, scale)}
            results[f"s{scale}"] = {"test_tiles": len(test), "train_tiles": len(train),
                                    "methods": {k: score(p, truth) for k, p in preds.items()}}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print("scale  method            PCC [95% CI]           pooled  RMSE   MAE    SSIM")
    for key, block in results.items():
        for name, m in block["methods"].items():
            lo, hi = m["pcc_ci95"]
            print(f"{key:5s}  {name:16s}  {m['pcc']:.3f} [{lo:.3f}, {hi:.3f}]  {m['pcc_pooled']:.3f}   "
                  f"{m['rmse_counts']:.3f}  {m['mae_counts']:.3f}  {m['ssim']:.3f}")
    print(f"Wrote {RESULTS}")


if __name__ == "__main__":
    main()

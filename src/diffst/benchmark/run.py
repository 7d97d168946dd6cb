"""Run the region k-fold benchmark: prepare folds, run methods, store one JSON cell per (scale, fold, method).

Layout of the output folder::

    prepared/s<scale>/<sample>_fold<i>/     prepared fold datasets (reused)
    runs/s<scale>/<sample>_fold<i>/<method>-<budget>-seed<seed>/   training runs (resumed / reused)
    cells/s<scale>/<sample>_fold<i>/<method>.json   one result per cell, written atomically (reused)
    cells/s<scale>/<sample>_fold<i>/<method>.npz    its predicted counts of the test tiles (``counts``)
    cells/s<scale>/<sample>_fold<i>/_fold.json      the fold's status (skipped folds say why)
    cells/s<scale>/<sample>_fold<i>/_ceiling.json   split-half noise ceiling of the fold's test tiles
    benchmark.json, benchmark.md, figures/          summary (:mod:`diffst.benchmark.report`)

A cell is reused when its ``setup`` (geometry, scale, folds, genes, budget, seed, strides) matches the
current run; otherwise it is computed again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from diffst.benchmark.folds import Fold, make_folds
from diffst.benchmark.methods import BUDGETS, ENSEMBLED, METHODS, TRAINED, predict_method
from diffst.benchmark.store import read_json, write_json
from diffst.core.sample import Sample
from diffst.errors import InputError
from diffst.evaluation.report import scoring_mask
from diffst.training.recipe import STAGE_ONE_MEMBERS

log = logging.getLogger("diffst.benchmark")
#: Training tissue (in tile areas) a fold must keep beside its validation region for the region to be used.
MIN_TRAIN_TILE_AREAS = 4.0
#: Genes (the first of the gene list: the most counted) whose stitched maps each cell keeps for the report.
N_EXAMPLE_GENES = 3


def _cell_metrics(pred: np.ndarray, truth: np.ndarray, normaliser, origins_um: np.ndarray,
                  bin_um: float, mask: np.ndarray | None = None) -> dict[str, Any]:
    """Metrics of one cell (per tile and on the stitched region), plus what the summary pools and draws.

    Writes the keys ``metrics`` (:func:`~diffst.evaluation.metrics.evaluate_maps` and
    :func:`~diffst.evaluation.metrics.region_metrics`; with a ``mask``, :func:`~diffst.evaluation.report.scoring_mask`'s bins only:
    :func:`~diffst.evaluation.report.evaluate_masked_maps`, plus ``scored_fraction``), ``per_tile_pcc``,
    ``per_tile_mse``, ``per_gene_pcc`` and ``example`` (the stitched region of the first
    :data:`N_EXAMPLE_GENES` genes, prediction and truth, for the report's example maps).
    """
    from diffst.evaluation.metrics import evaluate_maps, mosaic, pearson_per_map, region_metrics
    from diffst.evaluation.report import evaluate_masked_maps, masked_pearson_per_map

    if not np.isfinite(pred).all():
        raise InputError("a method produced non-finite predictions; its cell is not written.")
    pred, truth = np.asarray(pred, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    if mask is None:
        r = pearson_per_map(pred, truth)  # (T, N)
        per_tile_mse = ((pred - truth) ** 2).reshape(len(pred), -1).mean(axis=1)
        metrics = evaluate_maps(pred, truth, normaliser)
    else:
        r = masked_pearson_per_map(pred, truth, mask[:, None])
        full = np.broadcast_to(mask[:, None], pred.shape)
        with _quiet():
            per_tile_mse = np.where(full, (pred - truth) ** 2, 0.0).reshape(len(pred), -1).sum(axis=1) \
                / full.reshape(len(pred), -1).sum(axis=1)
        metrics = {**evaluate_masked_maps(pred, truth, mask, normaliser), "scored_fraction": float(mask.mean())}
    with _quiet():
        per_tile = np.nanmean(r, axis=1)
        per_gene = np.nanmean(r, axis=0)
    shown = slice(0, N_EXAMPLE_GENES)
    example_pred, covered = mosaic(pred[:, shown], origins_um, bin_um)
    example_true, _ = mosaic(truth[:, shown], origins_um, bin_um)
    if mask is not None:
        scored, _ = mosaic(mask[:, None].astype(np.float64), origins_um, bin_um)
        covered = covered & (scored[0] > 0.5)
    example = {"pred": np.where(covered, example_pred, np.nan).round(3),
               "truth": np.where(covered, example_true, np.nan)}
    metrics.update(region_metrics(pred, truth, origins_um, bin_um, mask))
    return {"metrics": metrics, "per_tile_pcc": per_tile, "per_tile_mse": per_tile_mse, "per_gene_pcc": per_gene,
            "example": example}


def _save_prediction(path: Path, pred: np.ndarray, drawn: np.ndarray | None) -> None:
    """Keep a cell's predicted counts (and samples) beside its JSON: float32, compressed, written atomically."""
    from diffst.atomic import atomic_output

    arrays = {"counts": np.asarray(pred, dtype=np.float32)}
    if drawn is not None:
        arrays["samples"] = np.asarray(drawn, dtype=np.float32)
    with atomic_output(path, directory=False) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, **arrays)


def _coverage(drawn: np.ndarray, pred: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None) -> dict[str, Any]:
    """Coverage of held-out observed counts by the raw 50 % and 90 % intervals, overall and (90 %) per gene.

    With a ``mask`` (:func:`~diffst.evaluation.report.scoring_mask`, (T, H, W)) only its bins count.
    """
    from diffst.inference.intervals import coverage, interval_bounds

    b = interval_bounds(drawn, pred)
    if mask is not None:  # (T, N, H, W) -> (N, bins) of the scored bins, gene by gene
        keep = np.asarray(mask, dtype=bool)
        b = {k: np.moveaxis(v, 1, -1)[keep].T for k, v in b.items()}
        truth = np.moveaxis(truth, 1, -1)[keep].T
        per_gene = [coverage(b["q05"][g], b["q95"][g], truth[g]) for g in range(truth.shape[0])]
    else:
        per_gene = [coverage(b["q05"][:, g], b["q95"][:, g], truth[:, g]) for g in range(truth.shape[1])]
    return {"50": coverage(b["q25"], b["q75"], truth), "90": coverage(b["q05"], b["q95"], truth),
            "90_per_gene": per_gene, "n_bins": int(truth.size)}


def calibrate_folds(out: Path, cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Cross-fitted interval calibration: each fold's spread factor is fitted on the other folds' tiles.

    For every scale and sampling method with at least two folds, the factor of fold i
    (:func:`~diffst.inference.intervals.fit_spread`, 90 % level) comes from the held-out tiles of the other
    folds, and fold i's coverage is measured with it; so no fold is calibrated on itself.

    Returns
    -------
    dict
        ``{"s<scale>": {method: {"raw_50", "raw_90", "calibrated_50", "calibrated_90", "spread"}}}``:
        bin-weighted coverages and the factors per fold.
    """
    from diffst.data.dataset import PreparedTiles
    from diffst.inference.intervals import coverage, fit_spread, interval_bounds

    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for c in cells:
        if c.get("coverage"):
            groups.setdefault((c["scale"], c["method"]), []).append(c)
    result: dict[str, Any] = {}
    for (scale, method), mine in sorted(groups.items()):
        if len(mine) < 2:
            continue
        data = []
        for c in mine:
            with np.load(out / "cells" / f"s{scale}" / c["fold"] / f"{method}.npz") as z:
                truth = np.asarray(PreparedTiles(out / "prepared" / f"s{scale}" / c["fold"], "test").hr_counts)
                data.append((z["samples"], z["counts"], truth))
        sums = {"raw_50": 0.0, "raw_90": 0.0, "calibrated_50": 0.0, "calibrated_90": 0.0}
        spreads, total = [], 0
        for i, (drawn, pred, truth) in enumerate(data):
            rest = [d for j, d in enumerate(data) if j != i]
            factor = fit_spread(np.concatenate([d[0].reshape(len(d[0]), -1) for d in rest], axis=1),
                                np.concatenate([d[1].ravel() for d in rest]), np.concatenate([d[2].ravel() for d in rest]))
            raw, cal = interval_bounds(drawn, pred), interval_bounds(drawn, pred, spread=factor)
            n = truth.size
            sums["raw_50"] += coverage(raw["q25"], raw["q75"], truth) * n
            sums["raw_90"] += coverage(raw["q05"], raw["q95"], truth) * n
            sums["calibrated_50"] += coverage(cal["q25"], cal["q75"], truth) * n
            sums["calibrated_90"] += coverage(cal["q05"], cal["q95"], truth) * n
            spreads.append(factor)
            total += n
        result.setdefault(f"s{scale}", {})[method] = {**{k: v / total for k, v in sums.items()}, "spread": spreads}
    return result


def _cell_setup(setup: dict[str, Any], status: dict[str, Any] | None, method: str, members: int) -> dict[str, Any]:
    """Return what a method's cell depends on: the run's setup and the fold's validation region if any.

    A stage-one method's cell also depends on its seed-ensemble size (a key of those methods only, so the
    other methods' cells stay valid when it changes).
    """
    val = (status or {}).get("val_region")
    cell = {**setup, "val_region": val} if val else dict(setup)
    if method in ENSEMBLED and members != 1:
        cell["members"] = members
    return cell


def _cached_cells(cell_dir: Path, methods: Sequence[str], setup: dict[str, Any], status: dict[str, Any] | None,
                  members: int) -> dict[str, dict]:
    """Finished cells of this fold whose setup matches (reused as they are)."""
    cells = {m: read_json(cell_dir / f"{m}.json") for m in methods}
    return {m: c for m, c in cells.items() if c and c.get("setup") == _cell_setup(setup, status, m, members)}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence numpy's warnings about all-NaN slices (genes without counts in a tile)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _prepare_fold(samples: list[Sample], fold: Fold, geometry, path: Path, genes: list[str],
                  train_stride_um: float | None, min_tissue: float, self_supervised: bool = False) -> dict[str, Any]:
    """Prepare (or reuse) one fold's dataset; returns its status (``ok`` or ``skipped`` with a reason).

    The fold's validation region is used when at least :data:`MIN_TRAIN_TILE_AREAS` tiles' worth of
    training tissue is left beside it and the test region; otherwise the fold has no validation split (the
    trained methods then train a fixed length). The status says which (``val_region``, ``validation``).
    A sample split (``fold.test_samples``) prepares all ``samples`` and holds the test samples out whole.
    """
    from diffst.data.prepare import SplitSpec

    args = (samples, geometry, path, genes, min_tissue, self_supervised)
    if fold.test_samples:
        split = SplitSpec(test_samples=list(fold.test_samples), train_stride_um=train_stride_um)
        return {**_prepare_split(split, *args), "val_region": None,
                "validation": "none: a sample split (the test samples are held out whole)"}
    status = None
    if fold.val_region is not None:
        split = SplitSpec(test_region=fold.region, val_region=fold.val_region, train_stride_um=train_stride_um)
        status = _prepare_split(split, *args)
        if status["status"] == "ok" and status.get("n_val_tiles") and status["train_tile_areas"] >= MIN_TRAIN_TILE_AREAS:
            return {**status, "val_region": list(fold.val_region),
                    "validation": f"{status['n_val_tiles']} tiles of the region farthest from the test region"}
        why = (status.get("reason") if status["status"] != "ok" else
               f"{status['train_tile_areas']:.1f} tile areas of training tissue would be left beside it "
               f"(at least {MIN_TRAIN_TILE_AREAS} needed)")
    else:
        why = "one fold only"
    split = SplitSpec(test_region=fold.region, train_stride_um=train_stride_um)
    status = _prepare_split(split, *args)
    return {**status, "val_region": None, "validation": f"none: {why}"}


def _prepare_split(split, samples: list[Sample], geometry, path: Path, genes: list[str], min_tissue: float,
                   self_supervised: bool) -> dict[str, Any]:
    from diffst.data.dataset import PreparedTiles
    from diffst.data.prepare import is_prepared_dataset, load_meta, prepare_dataset
    from diffst.errors import GeometryError

    meta = load_meta(path) if is_prepared_dataset(path) else None
    fresh = meta is None or meta["genes"] != genes or meta["split"] != json.loads(split.model_dump_json()) \
        or meta["geometry"] != geometry.to_dict() or meta["min_tissue_fraction"] != min_tissue \
        or bool(meta.get("self_supervised", False)) != self_supervised
    if fresh:
        try:
            prepare_dataset(samples, path, geometry, genes=genes, split=split, min_tissue_fraction=min_tissue,
                            overwrite=meta is not None, progress=False, preview=False,
                            self_supervised=self_supervised)
        except (InputError, GeometryError) as exc:
            return {"status": "skipped", "reason": str(exc)}
        meta = load_meta(path)
    n = meta["n_tiles"]
    if not n.get("train") or not n.get("test"):
        return {"status": "skipped", "reason": f"{n.get('train', 0)} train and {n.get('test', 0)} test tiles "
                                               f"with at least {min_tissue:.0%} tissue"}
    train = PreparedTiles(path, "train")
    origins = np.stack([train.tiles["x0_um"], train.tiles["y0_um"]], axis=1)
    return {"status": "ok", "n_train_tiles": n["train"], "n_test_tiles": n["test"], "n_val_tiles": n.get("val", 0),
            "train_tile_areas": _covered_tile_areas(origins, geometry.tile_um, geometry.hr_bin_um)}


def _covered_tile_areas(origins_um: np.ndarray, tile_um: float, bin_um: float) -> float:
    """Area covered by tiles at ``origins_um`` (union, on the HR bin grid), in units of one tile's area."""
    if not len(origins_um):
        return 0.0
    from diffst.evaluation.metrics import mosaic

    side = int(round(tile_um / bin_um))
    _, covered = mosaic(np.zeros((len(origins_um), 1, side, side)), origins_um, bin_um)
    return float(covered.sum() / side**2)


def run_benchmark(
    samples: Sequence[Sample],
    out: str | Path,
    *,
    preset: str = "cpu",
    scales: Sequence[int] = (10,),
    k: int = 4,
    layout: str = "auto",
    methods: Sequence[str] = ("bicubic", "ridge", "diffst"),
    budget: str = "tiny",
    n_genes: int = 25,
    genes: Sequence[str] | None = None,
    train_stride_um: float | None = None,
    min_tissue: float = 0.5,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    self_supervised: bool = False,
    test_samples: Sequence[str] | None = None,
    tile_lr: int | None = None,
    members: int = STAGE_ONE_MEMBERS,
) -> dict[str, Any]:
    """Run (or resume) the benchmark and write its cells, ``benchmark.json``, ``benchmark.md`` and figures.

    Parameters
    ----------
    samples
        Raw samples (:func:`diffst.io.read_sample`); each is cross-validated on its own folds.
    out
        Output folder (layout in this module's docstring).
    preset, scales
        Tile geometry preset (``cpu`` or ``paper``) and super-resolution factors.
    k, layout
        Number of region folds per sample and their layout (:func:`~diffst.benchmark.folds.grid_regions`).
    methods
        Names from :data:`~diffst.benchmark.methods.METHODS`; ``bicubic`` is always added (the reference
        of the gap closed).
    budget
        ``tiny`` or ``full`` training budget of the trained methods.
    n_genes, genes
        The genes: a given list, else the top ``n_genes`` by total counts over all samples, fixed for all
        folds so that methods and folds are compared on the same genes.
    train_stride_um, min_tissue
        Stride of training tiles (default a tenth of a tile: overlapping crops, as the demo trains on) and
        the minimum tissue fraction of a tile.
    seed, device
        Seed of training, prediction and the ceiling; torch device of the trained methods.
    progress
        Show a progress bar over cells.
    self_supervised
        Spot-only slides (Visium, legacy ST): HR = the spots, LR = the sum of each s x s block of spots
        (:func:`~diffst.core.geometry.spot_pitch_geometry`); scored on measured spots of measured blocks
        (:func:`~diffst.evaluation.report.scoring_mask`).
    test_samples
        A sample split instead of region folds: train on the other samples, test on these whole (one fold;
        e.g. HER2ST C2 -> C3). The genes are then counted on the training samples only.
    tile_lr
        Self-supervised mode: LR blocks per tile side (default: tiles of about 16 x 16 spots); smaller tiles
        leave room for region folds inside one small section.
    members
        Seed-ensemble size of Diff-ST's stage one and its ablations (:data:`~diffst.benchmark.methods.ENSEMBLED`;
        default :data:`~diffst.training.recipe.STAGE_ONE_MEMBERS`, as ``diffst train --two-stage`` trains).

    Returns
    -------
    dict
        The content of ``benchmark.json``: ``setup``, ``folds``, ``cells`` and ``summary``.
    """
    from diffst.benchmark.folds import sample_fold
    from diffst.benchmark.report import summarise, write_report
    from diffst.core.geometry import spot_pitch_geometry, tile_preset
    from diffst.data.dataset import PreparedTiles
    from diffst.data.prepare import select_genes

    if budget not in BUDGETS:
        raise InputError(f"Unknown budget '{budget}'; choose one of {list(BUDGETS)}.")
    if members < 1:
        raise InputError(f"members={members}: a seed ensemble has at least one member (1: a single run).")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise InputError(f"Unknown method(s) {unknown}; choose from {', '.join(METHODS)}.")
    methods = list(dict.fromkeys(["bicubic", *methods]))
    out = Path(out)
    test_samples = list(dict.fromkeys(test_samples or []))
    split_fold = sample_fold(samples, test_samples) if test_samples else None
    exclude = {s.name: [] for s in samples if s.name not in test_samples} if test_samples else None
    gene_list = select_genes(samples, n_genes, genes, exclude)
    by_name = {s.name: s for s in samples}
    has_points = all(s.has_points for s in samples)
    all_cells, fold_rows = [], []
    if self_supervised:
        geometries = {scale: spot_pitch_geometry(samples, scale, tile_lr, preset=preset) for scale in scales}
    else:
        geometries = {scale: tile_preset(preset, scale) for scale in scales}
    if train_stride_um is None:  # overlapping training tiles: more distinct crops of the little training tissue
        # (a tenth of a tile, on the HR grid so that overlapping tiles share bins)
        train_stride_um = min(max(1, round(g.tile_hr / 10)) * g.hr_bin_um for g in geometries.values())
    plan = [(scale, fold) for scale in scales
            for fold in ([split_fold] if split_fold else make_folds(samples, geometries[scale], k, layout))]
    bar = tqdm(total=len(plan) * len(methods), desc="Benchmark cells", unit="cell", disable=not progress)
    for scale, fold in plan:
        geom = geometries[scale]
        setup = {"preset": preset, "scale": scale, "k": k, "layout": layout,
                 "region": list(fold.region) if fold.region else None, "cell": list(fold.cell) if fold.cell else None,
                 "genes": gene_list, "budget": budget, "seed": seed, "train_stride_um": train_stride_um,
                 "min_tissue": min_tissue}
        if self_supervised or fold.test_samples:  # keys only these protocols have: older cells stay valid
            setup.update(self_supervised=self_supervised, test_samples=list(fold.test_samples), tile_lr=tile_lr)
        cell_dir = out / "cells" / f"s{scale}" / fold.name
        data_path = out / "prepared" / f"s{scale}" / fold.name
        fold_file = cell_dir / "_fold.json"
        status = read_json(fold_file)
        cached = _cached_cells(cell_dir, methods, setup, status, members)
        if not (status and status.get("setup") == setup and (status["status"] == "skipped" or len(cached) == len(methods))):
            fold_samples = list(samples) if fold.test_samples else [by_name[fold.sample]]
            status = {**_prepare_fold(fold_samples, fold, geom, data_path, gene_list, train_stride_um,
                                      min_tissue, self_supervised), "setup": setup}
            write_json(fold_file, status)
            cached = _cached_cells(cell_dir, methods, setup, status, members)
        fold_rows.append({"scale": scale, "fold": fold.name, "sample": fold.sample, "index": fold.index,
                          "cell": setup["cell"], "region": setup["region"], "test_samples": list(fold.test_samples),
                          **{k_: v for k_, v in status.items() if k_ != "setup"}})
        if status["status"] == "skipped":
            log.warning("fold %s at s=%d skipped: %s", fold.name, scale, status["reason"])
            bar.update(len(methods))
            continue
        test = None
        ceiling_sample = fold.test_samples[0] if len(fold.test_samples) == 1 else fold.sample
        if has_points and ceiling_sample in by_name:
            ceiling_file = cell_dir / "_ceiling.json"
            ceiling = read_json(ceiling_file)
            if not (ceiling and ceiling.get("setup") == setup):
                from diffst.evaluation.ceiling import split_half_ceiling

                test = PreparedTiles(data_path, "test")
                origins = list(zip(test.tiles["x0_um"], test.tiles["y0_um"], strict=True))
                with _quiet():
                    per_gene = split_half_ceiling(by_name[ceiling_sample], gene_list, origins, geom.hr_bin_um,
                                                  geom.tile_hr, seed=seed)
                ceiling = {"setup": setup, "per_gene": per_gene, "n_test_tiles": len(origins)}
                write_json(ceiling_file, ceiling)
            fold_rows[-1]["ceiling_per_gene"] = ceiling["per_gene"]
        for method in methods:
            bar.set_postfix_str(f"s{scale} {fold.name} {method}")
            cell = cached.get(method)
            if cell is None:
                if test is None:
                    test = PreparedTiles(data_path, "test")
                run_dir = out / "runs" / f"s{scale}" / fold.name / f"{method}-{budget}-seed{seed}"
                start = time.perf_counter()
                pred, drawn = predict_method(method, data_path, run_dir=run_dir if method in TRAINED else None,
                                             budget=budget, seed=seed, device=device, samples=True, members=members)
                truth = np.asarray(test.hr_counts)
                mask = scoring_mask(test)
                cell = {"setup": _cell_setup(setup, status, method, members), "scale": scale, "fold": fold.name, "sample": fold.sample, "method": method,
                        "n_test_tiles": len(truth), "tile_ids": list(test.tiles["tile_id"]), "genes": gene_list,
                        **_cell_metrics(pred, truth, test.normaliser,
                                        np.stack([test.tiles["x0_um"], test.tiles["y0_um"]], axis=1), geom.hr_bin_um,
                                        mask),
                        **({} if drawn is None else {"coverage": _coverage(drawn, pred, truth, mask)}),
                        "seconds": round(time.perf_counter() - start, 2)}
                _save_prediction(cell_dir / f"{method}.npz", pred, drawn)  # metrics can be recomputed without a rerun
                write_json(cell_dir / f"{method}.json", cell)
                cell = read_json(cell_dir / f"{method}.json")
            all_cells.append(cell)
            bar.update(1)
    bar.close()
    if not all_cells:
        raise InputError("Every fold was skipped (see the reasons above): no fold left both train and test tiles. "
                         "Use fewer folds (--folds), another --fold-layout, a smaller --preset or a lower --min-tissue.")
    result = {"setup": {"preset": preset, "scales": list(scales), "k": k, "layout": layout, "methods": methods,
                        "budget": budget, "budget_preset": BUDGETS[budget], "seed": seed, "genes": gene_list,
                        "samples": [s.name for s in samples], "train_stride_um": train_stride_um,
                        "min_tissue": min_tissue, "self_supervised": self_supervised, "test_samples": test_samples,
                        "tile_lr": tile_lr, "members": members},
              "folds": fold_rows, "cells": [{k_: v for k_, v in c.items() if k_ != "setup"} for c in all_cells]}
    result["summary"] = summarise(result, seed=seed)
    result["calibration"] = calibrate_folds(out, result["cells"])
    write_report(out, result)
    return result


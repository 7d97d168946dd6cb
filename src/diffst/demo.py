"""The main job on the built-in real example: prepare, train the cpu preset briefly, predict the held-out
region, compare with bicubic interpolation and the noise ceiling, save AnnData, metrics and figures."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from diffst.atomic import atomic_output
from diffst.config import parse_config
from diffst.data.geometry import tile_preset
from diffst.data.prepare import SplitSpec, prepare_dataset
from diffst.diffusion.config import SamplerConfig
from diffst.errors import InputError
from diffst.evaluation.ceiling import split_half_ceiling
from diffst.evaluation.report import evaluate_split
from diffst.example import EXAMPLE_TEST_REGION, load_example
from diffst.inference.predict import predict_checkpoint, to_anndata, write_h5ad
from diffst.plotting.compare import plot_comparison


def cpu_run_config(prepared: Path, run_dir: Path, steps: int, seed: int = 0, device: str = "auto") -> dict:
    """The cpu-preset run configuration used by the demo and the benchmarks (as a plain dict)."""
    return {
        "data": {"path": str(prepared), "augment": True, "batch_size": 4},
        "model": {"preset": "cpu", "hr_size": 20, "attention_resolutions": [10]},
        "diffusion": {"num_timesteps": 1000, "loss": "hybrid", "target": "residual", "parameterization": "v"},
        "train": {"steps": steps, "lr": 2e-3, "weight_decay": 1e-5, "ema_decay": 0.995, "ema_warmup": True,
                  "disentangle_weight": 0.01, "curriculum": True, "grad_clip": 1.0, "log_every": 10,
                  "checkpoint_every": max(steps // 4, 1), "keep_last": 2},
        "sampler": {"method": "dpmpp", "steps": 20},
        "seed": seed,
        "device": device,
        "run_dir": str(run_dir),
    }


def prepare_example(out: Path, scale: int, n_genes: int = 25, progress: bool = True, sample=None) -> Path:
    """The built-in example (or its already-read ``sample``), cpu tiles at ``scale``, right-most 200 µm
    held out as the test region."""
    return prepare_dataset([sample or load_example()], out, tile_preset("cpu", scale), n_genes=n_genes,
                           split=SplitSpec(test_region=EXAMPLE_TEST_REGION, train_stride_um=20),
                           overwrite=True, progress=progress)


def run_demo(out: str | Path = "demo_output", scale: int = 10, steps: int = 2000, sampler_steps: int = 20,
             num_samples: int = 4, seed: int = 0, device: str = "auto", progress: bool = True) -> dict:
    """Run the whole job; returns the metrics dict also written to ``out/metrics_s<scale>.json``."""
    from diffst.training import train
    from diffst.training.checkpoint import latest_checkpoint

    out = Path(out)
    # Everything the user chose is checked before minutes of training.
    sampler = SamplerConfig(method="dpmpp", steps=sampler_steps, num_samples=num_samples)
    if steps < 1:
        raise InputError(f"steps={steps}: the demo trains for at least one step.")
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    t0 = time.time()
    example = load_example()
    prepared = prepare_example(out / f"prepared_s{scale}", scale, progress=progress, sample=example)
    timings["prepare_s"] = time.time() - t0

    t0 = time.time()
    run_dir = out / f"run_s{scale}"
    cfg = parse_config(cpu_run_config(prepared, run_dir, steps, seed, device), "demo")
    train(cfg, resume=latest_checkpoint(run_dir) is not None)
    timings["train_s"] = time.time() - t0

    t0 = time.time()
    dataset, preds, extras = predict_checkpoint(run_dir, prepared, split="test", sampler=sampler, seed=seed,
                                                device=device, progress=progress)
    timings["predict_s"] = time.time() - t0
    adata = to_anndata(dataset, preds, extra_uns={"checkpoint": extras["checkpoint"], "sampler": extras["sampler"]})
    write_h5ad(adata, out / f"prediction_s{scale}.h5ad")

    report = evaluate_split(dataset, {"diffst": preds.mean})
    origins = list(zip(dataset.tiles["x0_um"], dataset.tiles["y0_um"], strict=True))
    geom = dataset.geometry
    ceiling = split_half_ceiling(example, dataset.genes, origins, geom.hr_bin_um, geom.tile_hr, seed=seed)
    report["noise_ceiling"] = {"pcc": float(np.mean(ceiling))}
    report["timings"] = {k: round(v, 1) for k, v in timings.items()}
    report["setup"] = {"scale": scale, "train_steps": steps, "sampler": extras["sampler"], "test_tiles": len(dataset),
                       "genes": dataset.genes, "hr_bin_um": geom.hr_bin_um, "lr_bin_um": geom.lr_bin_um}
    with atomic_output(out / f"metrics_s{scale}.json", directory=False) as tmp:
        tmp.write_text(json.dumps(report, indent=2))

    tile = int(np.argmax(dataset.tiles["n_counts"].to_numpy()))
    truth = np.asarray(dataset.hr_counts[tile])
    from diffst.baselines import interpolate_lr

    bicubic = interpolate_lr(np.asarray(dataset.lr_counts[tile]), (geom.tile_hr, geom.tile_hr), geom.scale)
    show = [dataset.genes.index(g) for g in ("ERBB2", "KRT7", "POSTN", "LUM") if g in dataset.genes][:3] or [0, 1, 2]
    plot_comparison(dataset.tissue[tile], dataset.lr_counts[tile],
                    {"bicubic": bicubic, "Diff-ST": preds.mean[tile], "std (K samples)": preds.std[tile],
                     "observed": truth},
                    dataset.genes, show, out / f"comparison_s{scale}.png",
                    title=f"Held-out tile, {geom.lr_bin_um:g} µm -> {geom.hr_bin_um:g} µm (s = {scale}); "
                          f"PCC Diff-ST {report['diffst']['pcc']:.3f}, bicubic {report['bicubic']['pcc']:.3f}")
    return report

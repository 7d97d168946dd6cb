"""Command line: ``diffst prepare | train | predict | demo``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diffst.errors import DiffSTError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Diff-ST: super-resolved spatial transcriptomics.")


@app.callback()
def _root() -> None:
    """Diff-ST: super-resolved spatial transcriptomics from spots and histology."""


def _floats(text: str | None, n: int, what: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != n:
        raise typer.BadParameter(f"{what} needs {n} comma-separated numbers, got '{text}'.")
    return values


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


@app.command()
def prepare(
    inputs: Annotated[list[Path] | None, typer.Argument(help="Sample folders/files (Xenium outs, Visium outs, legacy ST folder, .h5ad).")] = None,
    out: Annotated[Path, typer.Option(help="Output folder of the prepared dataset.")] = Path("prepared"),
    example: Annotated[bool, typer.Option(help="Use the built-in real Xenium example.")] = False,
    platform: Annotated[str, typer.Option(help="auto, xenium, visium, visium_hd, legacy_st or anndata.")] = "auto",
    image: Annotated[Path | None, typer.Option(help="Image file, when not found in the sample folder.")] = None,
    pixel_size: Annotated[float | None, typer.Option(help="Image microns per pixel (else from metadata).")] = None,
    image_origin: Annotated[str | None, typer.Option(help="x,y microns of the image's top-left corner (Xenium crops).")] = None,
    preset: Annotated[str, typer.Option(help="Tile geometry preset: cpu or paper.")] = "cpu",
    scale: Annotated[int, typer.Option(help="Super-resolution factor s (5 or 10).")] = 10,
    n_genes: Annotated[int, typer.Option(help="Top-N genes by training counts.")] = 25,
    genes: Annotated[str | None, typer.Option(help="Comma-separated gene list (overrides --n-genes).")] = None,
    test_region: Annotated[str | None, typer.Option(help="x0,y0,x1,y1 µm held out for testing.")] = None,
    val_region: Annotated[str | None, typer.Option(help="x0,y0,x1,y1 µm held out for validation.")] = None,
    test_sample: Annotated[list[str] | None, typer.Option(help="Sample name held out for testing (repeatable).")] = None,
    val_sample: Annotated[list[str] | None, typer.Option(help="Sample name held out for validation (repeatable).")] = None,
    train_stride: Annotated[float | None, typer.Option(help="Stride (µm) between training tiles; default half a tile.")] = None,
    eval_stride: Annotated[float | None, typer.Option(help="Stride (µm) between val/test tiles; default half a tile.")] = None,
    min_tissue: Annotated[float, typer.Option(help="Minimum fraction of a tile that shows tissue.")] = 0.5,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
) -> None:
    """Tile samples into a prepared dataset (arrays + dataset.json + tiles.csv + preview.png)."""
    from diffst.data.geometry import tile_preset
    from diffst.data.prepare import SplitSpec, prepare_dataset

    try:
        samples = _read_inputs(inputs or [], example, platform, image, pixel_size, _floats(image_origin, 2, "--image-origin"))
        split = SplitSpec(
            test_samples=test_sample or [], val_samples=val_sample or [],
            test_region=_floats(test_region, 4, "--test-region"), val_region=_floats(val_region, 4, "--val-region"),
            train_stride_um=train_stride, eval_stride_um=eval_stride,
        )
        if example and split.test_region is None and not split.test_samples:
            from diffst.example import EXAMPLE_TEST_REGION

            split.test_region = EXAMPLE_TEST_REGION
        geometry = tile_preset(preset, scale)
        typer.echo(f"Geometry: {geometry.describe()}")
        path = prepare_dataset(samples, out, geometry, n_genes=n_genes, genes=genes.split(",") if genes else None,
                               split=split, min_tissue_fraction=min_tissue, overwrite=overwrite)
    except DiffSTError as exc:
        _fail(exc)
    import json

    meta = json.loads((path / "dataset.json").read_text())
    typer.echo(f"Wrote {path}: tiles {meta['n_tiles']}, {len(meta['genes'])} genes, preview {path / 'preview.png'}")


def _read_inputs(inputs, example, platform, image, pixel_size, origin):
    if example:
        from diffst.example import load_example

        return [load_example()]
    if not inputs:
        raise typer.BadParameter("Give at least one sample path, or --example for the built-in data.")
    from diffst import io

    kwargs = {"image": image, "pixel_size_um": pixel_size, "image_origin_um": origin}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    readers = {"auto": io.read_sample, "xenium": io.read_xenium, "visium": io.read_visium,
               "visium_hd": io.read_visium, "legacy_st": io.read_sample, "anndata": io.read_anndata}
    if platform not in readers:
        raise typer.BadParameter(f"Unknown platform '{platform}'; choose one of {sorted(readers)}.")
    return [readers[platform](p, **kwargs) for p in inputs]


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()

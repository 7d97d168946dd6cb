"""Draw the README's scverse pictures of one prediction: squidpy over the ``.h5ad``, spatialdata-plot over the ``.zarr``.

Both files are what ``diffst predict`` writes for the same checkpoint, tiles, seed and K (``--out NAME.h5ad`` and
``--out NAME.zarr``). Needs the ``spatial`` extra.

Usage::

    python docs/scverse_figures.py PRED.h5ad PRED.zarr --gene ERBB2 --out docs/figures
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    """Parse the command line and write both pictures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("h5ad", type=Path)
    parser.add_argument("zarr", type=Path)
    parser.add_argument("--gene", default="ERBB2")
    parser.add_argument("--out", type=Path, default=Path("docs/figures"))
    parser.add_argument("--suffix", default="s10", help="File name suffix: squidpy_<suffix>.png, spatialdata_<suffix>.png")
    args = parser.parse_args()

    import anndata as ad
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import spatialdata as sd
    import spatialdata_plot  # noqa: F401 - registers the .pl accessor
    import squidpy as sq

    args.out.mkdir(parents=True, exist_ok=True)
    adata = ad.read_h5ad(args.h5ad)
    library = str(adata.obs["sample"].cat.categories[0])
    bin_um = adata.uns["diffst"]["geometry"]["hr_bin_um"]
    sq.pl.spatial_scatter(adata, color=args.gene, library_id=library, img=True, img_res_key="hires", shape="square",
                          alpha=0.7, title=f"{args.gene}, Diff-ST counts per {bin_um:g} µm bin, over the histology")
    plt.savefig(args.out / f"squidpy_{args.suffix}.png", dpi=110, bbox_inches="tight")
    plt.close("all")

    sdata = sd.read_zarr(args.zarr)
    bins = next(name for name in sdata.labels if name.endswith("_hr_bins"))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    sdata.pl.render_images(cmap="gray", colorbar=False).pl.show(ax=axes[0], title="histology (µm)")
    (sdata.pl.render_images(cmap="gray", colorbar=False)
     .pl.render_labels(bins, color=args.gene, table_name="table", fill_alpha=0.75)
     .pl.show(ax=axes[1], title=f"{args.gene} (counts per bin), labels '{bins}'"))
    fig.tight_layout()
    fig.savefig(args.out / f"spatialdata_{args.suffix}.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {args.out / f'squidpy_{args.suffix}.png'} and {args.out / f'spatialdata_{args.suffix}.png'}")


if __name__ == "__main__":
    main()

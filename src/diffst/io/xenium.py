"""10x Xenium output: transcripts table, morphology image, optional H&E with its alignment matrix."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from diffst.core.image import XENIUM_PIXEL_SIZE_UM, SlideImage, origin_xy, positive_number, tiff_pixel_size_um
from diffst.core.sample import Sample
from diffst.errors import GeometryError, InputError

log = logging.getLogger("diffst.io")

CONTROL_PREFIXES = (
    "NegControlProbe_",
    "NegControlCodeword_",
    "BLANK_",
    "UnassignedCodeword_",
    "DeprecatedCodeword_",
    "Intergenic_Region",
    "antisense_",
)
_REQUIRED = ("feature_name", "x_location", "y_location")


def _find(folder: Path, names: Sequence[str]) -> Path | None:
    for name in names:
        if (folder / name).exists():
            return folder / name
    return None


#: Rows read at a time: a few MB of parsed columns per chunk, whatever the size of the file.
CHUNK_ROWS = 1 << 16
#: Bytes of a Parquet column chunk read at a time: a row group (Xenium writes ~1M rows per group; a file
#: written in one piece is a single group) is streamed page by page instead of loaded whole.
PARQUET_BUFFER_BYTES = 1 << 20
#: Optional Xenium columns kept per transcript (1 byte each); cell_id, qv (once filtered on), z_location and
#: transcript_id are not read at all.
_KEPT_EXTRAS = ("overlaps_nucleus",)


def read_transcripts(path: str | Path, min_qv: float | None = 20.0, drop_controls: bool = True,
                     chunk_rows: int | None = None) -> pd.DataFrame:
    """Read a Xenium ``transcripts.csv.gz`` / ``transcripts.parquet``, streaming and compact.

    Only ``feature_name``, ``x_location``, ``y_location``, ``qv`` and ``overlaps_nucleus`` are read,
    ``chunk_rows`` (default :data:`CHUNK_ROWS`) rows at a time (``pandas.read_csv`` chunks / Parquet
    record batches); rows below ``min_qv`` (a missing qv counts as low) and, with ``drop_controls``,
    control probes are dropped chunk by chunk, so memory follows the transcripts kept, not the file.

    Returns
    -------
    pandas.DataFrame
        ``feature_name`` (categorical; its categories are the genes kept, sorted), ``x_um`` and ``y_um``
        (float32 microns, the precision Xenium writes) and, when the file has it, ``overlaps_nucleus``
        (int8: 1, 0, or -1 where empty): 11 bytes per transcript with a small panel.

    Raises
    ------
    InputError
        For a missing, unreadable or empty file, missing columns, non-numeric values (named with their
        count and first row), empty gene names, or nothing left after the filters.
    GeometryError
        For empty, NaN or infinite coordinates.
    """
    names, codes, columns = _read_compact(path, min_qv, drop_controls, chunk_rows)
    return pd.DataFrame({"feature_name": pd.Categorical.from_codes(codes, names), **columns}, copy=False)


def _read_compact(path: str | Path, min_qv: float | None, drop_controls: bool,
                  chunk_rows: int | None) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
    """Read what :func:`read_transcripts` keeps as arrays: (sorted gene names, codes into them, other columns).

    The codes are int16 (int32 beyond 32767 genes); the other columns ``x_um``, ``y_um`` (float32) and
    ``overlaps_nucleus`` (int8) when the file has it. Memory: the kept columns, once, plus one chunk.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"Transcript file not found: {path}. Expected transcripts.csv.gz or transcripts.parquet.")
    columns = _header(path)
    missing = [c for c in _REQUIRED if c not in columns]
    if missing:
        raise InputError(
            f"{path} lacks the Xenium column(s) {missing}; found {list(columns)[:10]}. "
            "Is this a Xenium transcripts table?"
        )
    wanted = [*_REQUIRED, *(c for c in ("qv", *_KEPT_EXTRAS) if c in columns)]
    acc = _Accumulator(path, min_qv, drop_controls)
    for codes, categories, numbers in _chunks(path, wanted, max(1, int(chunk_rows or CHUNK_ROWS))):
        acc.add(codes, categories, numbers)
        del codes, categories, numbers
    result = acc.finish()
    from diffst.memory import release_memory

    release_memory()  # the chunks' memory (Arrow's pool, the heap), freed, goes back to the system
    return result


def _header(path: Path) -> list[str]:
    """Column names of a transcripts table, reading only its header (CSV) or schema (Parquet)."""
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return list(pq.ParquetFile(path).schema_arrow.names)
        return list(pd.read_csv(path, nrows=0).columns)
    except pd.errors.EmptyDataError as exc:
        raise InputError(f"{path} is empty: not even a header line. Is the file complete?") from exc
    except Exception as exc:
        raise InputError(f"Cannot read transcripts from {path}: {exc}. The file may be truncated or corrupt.") from exc


def _chunks(path: Path, wanted: list[str], chunk_rows: int):
    """Yield (gene codes, -1 where empty; their names; the other wanted columns as a DataFrame) per chunk."""
    numeric = [c for c in wanted if c != "feature_name"]
    try:
        if path.suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.compute as pc
            import pyarrow.parquet as pq

            # Column chunks streamed through a small buffer, not pre-buffered whole, and decoded on this
            # thread (Arrow's worker threads each keep a heap): memory follows the batch, not the row group.
            source = pq.ParquetFile(path, pre_buffer=False, buffer_size=PARQUET_BUFFER_BYTES)
            for batch in source.iter_batches(batch_size=chunk_rows, columns=wanted, use_threads=False):
                names = batch.column("feature_name")
                if not pa.types.is_dictionary(names.type):
                    names = pc.dictionary_encode(names)
                codes = pc.fill_null(names.indices, -1).to_numpy(zero_copy_only=False)
                categories = [v.decode("utf-8") if isinstance(v, bytes) else v for v in names.dictionary.to_pylist()]
                yield codes.astype(np.int64), categories, batch.select(numeric).to_pandas()
        else:
            reader = pd.read_csv(path, usecols=wanted, chunksize=chunk_rows, dtype={"feature_name": "category"})
            with reader:
                for chunk in reader:
                    names = chunk["feature_name"].cat
                    yield names.codes.to_numpy(np.int64), list(names.categories), chunk[numeric]
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"Cannot read transcripts from {path}: {exc}. The file may be truncated or corrupt.") from exc


class _Accumulator:
    """Filter and keep each chunk's transcripts compactly; count what is wrong for one error at the end.

    Problems are counted over the whole file, as a single read would (the messages give the count over
    all rows and the first data row); once one is found the remaining chunks are only counted.
    """

    def __init__(self, path: Path, min_qv: float | None, drop_controls: bool):
        self.path, self.min_qv, self.drop_controls = path, min_qv, drop_controls
        self.rows = self.low_qv = self.controls = 0
        self.vocabulary: dict[str, int] = {}  # gene name -> code in order of first appearance
        self.is_control: list[bool] = []
        self.parts: dict[str, list[np.ndarray]] = {"gene": [], "x_um": [], "y_um": [], **{c: [] for c in _KEPT_EXTRAS}}
        self.non_numeric: dict[str, list] = {}  # column -> [count, first value, first row]
        self.non_finite: list = [0, None]  # count, first row
        self.no_name: list = [0, None]

    def _count(self, record: list, mask: np.ndarray, first_value=None) -> None:
        n = int(mask.sum())
        if n:
            if record[-1] is None:
                where = int(np.flatnonzero(mask)[0])
                record[-1] = self.rows + where + 1
                if first_value is not None:
                    record[1] = first_value.iloc[where]
            record[0] += n

    def add(self, codes: np.ndarray, categories: list, numbers: pd.DataFrame) -> None:
        values = {}
        for column in ("x_location", "y_location", "qv"):
            if column in numbers.columns:
                raw = numbers[column]
                parsed = pd.to_numeric(raw, errors="coerce")
                record = self.non_numeric.setdefault(column, [0, None, None])
                self._count(record, (parsed.isna() & raw.notna()).to_numpy(), raw)
                values[column] = parsed.to_numpy(dtype=np.float64)
        x, y = values["x_location"], values["y_location"]
        self._count(self.non_finite, ~(np.isfinite(x) & np.isfinite(y)))
        self._count(self.no_name, codes < 0)
        n = len(codes)
        if self.failed:
            self.rows += n
            return
        lut = np.empty(len(categories) + 1, dtype=np.int64)  # the last entry serves code -1 (none here)
        for i, name in enumerate(categories):
            name = str(name)
            if name not in self.vocabulary:
                self.vocabulary[name] = len(self.vocabulary)
                self.is_control.append(name.startswith(CONTROL_PREFIXES))
            lut[i] = self.vocabulary[name]
        lut[-1] = -1
        gene = lut[codes]
        keep = np.ones(n, dtype=bool)
        low = np.zeros(n, dtype=bool)
        if "qv" in values and self.min_qv is not None:
            low = ~(values["qv"] >= self.min_qv)  # NaN qv counts as low quality
            keep &= ~low
        control = np.asarray(self.is_control, dtype=bool)[gene] if self.drop_controls and n else np.zeros(n, bool)
        keep &= ~control
        self.low_qv += int(low.sum())
        self.controls += int((control & ~low).sum())
        self.parts["gene"].append(gene[keep].astype(np.int32))
        self.parts["x_um"].append(x[keep].astype(np.float32))
        self.parts["y_um"].append(y[keep].astype(np.float32))
        for column in _KEPT_EXTRAS:
            if column in numbers.columns:
                flag = pd.to_numeric(numbers[column], errors="coerce").to_numpy(dtype=np.float64)[keep]
                self.parts[column].append(np.where(np.isnan(flag), -1, flag != 0).astype(np.int8))
        self.rows += n

    @property
    def failed(self) -> bool:
        return any(r[0] for r in self.non_numeric.values()) or bool(self.non_finite[0] or self.no_name[0])

    def finish(self) -> pd.DataFrame:
        path = self.path
        if self.rows == 0:
            raise InputError(f"{path} holds no transcripts (0 rows below the header). Is the file complete?")
        for column, (count, value, row) in self.non_numeric.items():
            if count:
                raise InputError(
                    f"Column '{column}' of {path} holds {count} non-numeric value(s) of {self.rows} rows, e.g. "
                    f"{value!r} in data row {row}; expected numbers (microns for x_location / y_location). Fix or "
                    "drop those rows."
                )
        if self.non_finite[0]:
            raise GeometryError(
                f"x_location / y_location of {path} are empty, NaN or infinite in {self.non_finite[0]} of {self.rows} "
                f"rows (e.g. data row {self.non_finite[1]}); drop or fix those rows."
            )
        if self.no_name[0]:
            raise InputError(
                f"{path}: {self.no_name[0]} row(s) have an empty feature_name (e.g. data row {self.no_name[1]}); "
                "every transcript needs its gene name."
            )
        gene_parts = self.parts.pop("gene")
        if sum(len(part) for part in gene_parts) == 0:
            raise InputError(
                f"No transcripts left in {path}: {self.rows} rows read, {self.low_qv} removed by qv < min_qv "
                f"({self.min_qv}), {self.controls} more removed as control probes "
                f"({', '.join(p.rstrip('_') for p in CONTROL_PREFIXES[:3])}, ...). Lower the keyword min_qv of "
                "read_xenium (the diffst prepare command line has no option for it and uses 20) or keep controls "
                "with drop_controls=False."
            )
        names = np.array(list(self.vocabulary), dtype=object)
        used = np.zeros(len(names), dtype=bool)
        for part in gene_parts:
            used[np.unique(part)] = True
        present = np.flatnonzero(used)
        order = present[np.argsort(names[present].astype(str), kind="stable")]
        code_type = np.int16 if len(order) <= np.iinfo(np.int16).max else np.int32
        remap = np.full(len(names), -1, dtype=code_type)
        remap[order] = np.arange(len(order))
        codes = _join_parts(gene_parts, code_type, remap)
        columns = {"x_um": _join_parts(self.parts.pop("x_um")), "y_um": _join_parts(self.parts.pop("y_um"))}
        for column, parts in self.parts.items():
            if parts:
                columns[column] = _join_parts(parts)
        return names[order].tolist(), codes, columns


def _join_parts(parts: list[np.ndarray], dtype=None, lut: np.ndarray | None = None) -> np.ndarray:
    """Concatenate ``parts`` (through ``lut`` when given), freeing each part once copied: one copy at a time.

    ``parts`` is emptied.
    """
    out = np.empty(sum(len(part) for part in parts), dtype=dtype or (lut if lut is not None else parts[0]).dtype)
    parts.reverse()
    start = 0
    while parts:
        part = parts.pop()
        out[start : start + len(part)] = part if lut is None else lut[part]
        start += len(part)
    return out


def read_xenium(
    path: str | Path,
    *,
    image: str | Path | None = None,
    pixel_size_um: float | None = None,
    image_origin_um: Sequence[float] = (0.0, 0.0),
    he_image: str | Path | None = None,
    he_alignment: str | Path | np.ndarray | None = None,
    use_he: bool = False,
    min_qv: float = 20.0,
    drop_controls: bool = True,
    name: str | None = None,
    force_pixel_size: bool = False,
) -> Sample:
    """Read a Xenium output folder (or a transcripts file) into a :class:`Sample`.

    Parameters
    ----------
    path
        The Xenium ``outs`` folder, or a ``transcripts.csv.gz`` / ``.parquet`` file.
    image
        Morphology image (TIFF / OME-TIFF). Defaults to ``morphology_focus.ome.tif``,
        ``morphology_mip.ome.tif`` or ``morphology_mip.tif`` in the folder.
    pixel_size_um
        Microns per pixel of the morphology image; read from OME metadata when present, else
        Xenium's native 0.2125.
    image_origin_um
        Micron coordinates of the morphology image's top-left corner: (0, 0) for a full Xenium
        image, the crop corner for a cropped one.
    he_image, he_alignment
        An H&E image and Xenium's 3 x 3 alignment matrix (CSV or array) mapping H&E pixels to
        morphology-image pixels. With ``use_he=True`` the H&E becomes the sample's image.
    min_qv, drop_controls
        Transcript quality filter and removal of negative-control / blank codewords.
    name
        Sample name; defaults to the folder name.
    force_pixel_size
        Use ``pixel_size_um`` even when it disagrees with the image's OME metadata, and only warn when
        image and transcripts do not line up (:meth:`Sample.check_placement`).

    Returns
    -------
    Sample
        Point data (``transcripts``) with the morphology (or, with ``use_he``, the H&E) image.

    Raises
    ------
    GeometryError
        When ``pixel_size_um`` disagrees with the OME metadata, the transcripts miss the image, or the
        image intensity fits the transcripts clearly better at another pixel size or origin.
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    tx_path = path if path.is_file() else _find(folder, ["transcripts.parquet", "transcripts.csv.gz", "transcripts.csv"])
    if tx_path is None:
        raise InputError(f"No transcripts.parquet or transcripts.csv.gz in {folder}; point to a Xenium output folder.")
    genes, codes, columns = _read_compact(tx_path, min_qv, drop_controls, None)
    # The arrays as they are (no copy, no consolidation of x and y into one block).
    transcripts = pd.DataFrame({"gene": codes, **columns}, copy=False)
    del codes, columns

    morphology = None
    if image is None:
        image = _find(folder, ["morphology_focus.ome.tif", "morphology_mip.ome.tif", "morphology.ome.tif", "morphology_mip.tif"])
        if image is None and (folder / "morphology_focus").is_dir():
            image = _find(folder / "morphology_focus", ["morphology_focus_0000.ome.tif"])
    if image is not None:
        is_tiff = Path(image).suffix.lower() in (".tif", ".tiff", ".btf") and Path(image).is_file()
        ome_px = tiff_pixel_size_um(image) if is_tiff else None  # a missing file is reported by SlideImage
        if pixel_size_um is None:
            # No OME size: Xenium's native one. A present but invalid one is rejected by SlideImage.
            morphology = SlideImage(image, XENIUM_PIXEL_SIZE_UM if ome_px is None else None, image_origin_um)
        elif ome_px and abs(positive_number(pixel_size_um, "pixel_size_um (--pixel-size)") / ome_px - 1) > 0.01:
            message = (
                f"pixel_size_um (--pixel-size) {float(pixel_size_um):g} disagrees with the OME metadata of {image}, "
                f"PhysicalSizeX = {ome_px:g} µm."
            )
            if not force_pixel_size:
                raise GeometryError(
                    f"{message} Omit --pixel-size to use the metadata; if the metadata is wrong, pass "
                    "force_pixel_size=True to read_xenium."
                )
            log.warning("%s Using %g µm/px as forced (force_pixel_size=True).", message, float(pixel_size_um))
        if morphology is None:
            morphology = SlideImage(image, pixel_size_um=pixel_size_um, origin_um=image_origin_um)
    chosen = morphology
    if he_image is not None:
        if he_alignment is None:
            raise InputError("An H&E image needs Xenium's alignment matrix (he_alignment, the *_imagealignment.csv file).")
        try:
            matrix = he_alignment if isinstance(he_alignment, np.ndarray) else np.loadtxt(he_alignment, delimiter=",")
            matrix = np.asarray(matrix, dtype=float)
        except (OSError, ValueError) as exc:
            raise InputError(
                f"Cannot read the H&E alignment matrix {he_alignment} ({exc}); expected Xenium's *_imagealignment.csv "
                "(3 rows of 3 comma-separated numbers)."
            ) from exc
        if matrix.shape != (3, 3) or not np.isfinite(matrix).all() or abs(np.linalg.det(matrix[:2, :2])) < 1e-12:
            raise InputError(f"The H&E alignment matrix must be an invertible 3 x 3 matrix of numbers, got {matrix.tolist()}.")
        if morphology is not None:
            px, (ox, oy) = morphology.pixel_size_um, morphology.px_to_um[:2, 2]
        else:
            px = positive_number(XENIUM_PIXEL_SIZE_UM if pixel_size_um is None else pixel_size_um, "pixel_size_um (--pixel-size)")
            ox, oy = origin_xy(image_origin_um)
        # H&E pixel -> morphology pixel (matrix) -> microns; invert for microns -> H&E pixel.
        he_to_um = np.array([[px, 0, ox], [0, px, oy], [0, 0, 1]]) @ matrix
        um_to_he = np.linalg.inv(he_to_um)
        he_px_size = float(np.sqrt(abs(np.linalg.det(he_to_um[:2, :2]))))
        he = SlideImage(he_image, pixel_size_um=he_px_size, um_to_px=um_to_he)
        if use_he:
            chosen = he
    sample = Sample(
        name=name or folder.name,
        genes=list(genes),
        image=chosen,
        transcripts=transcripts,
        platform="xenium",
        meta={"transcripts_file": str(tx_path), "min_qv": min_qv},
    )
    sample.check_registration()
    sample.check_placement(strict=not force_pixel_size)
    return sample

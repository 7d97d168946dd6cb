"""Metrics of a training run.

One CSV row per step (``metrics.csv``), one per validation pass (``val.csv``) and, when TensorBoard is
installed and enabled, its event files (``tensorboard/``).
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any

__all__ = ["MetricsLogger", "metric_columns", "val_columns"]

log = logging.getLogger("diffst.training")


def metric_columns(terms: tuple[str, ...]) -> list[str]:
    """Name the columns of ``metrics.csv``.

    Parameters
    ----------
    terms
        The objective's terms (its ``terms`` attribute).

    Returns
    -------
    list of str
        step, epoch, loss, the terms, grad_norm, lr, gamma, seconds.
    """
    return ["step", "epoch", "loss", *terms, "grad_norm", "lr", "gamma", "seconds"]


def val_columns(val_terms: tuple[str, ...]) -> list[str]:
    """Name the columns of ``val.csv``.

    Parameters
    ----------
    val_terms
        The validation columns of the objective (the keys of its ``val_terms``).

    Returns
    -------
    list of str
        step, split, then ``val_<term>`` for the live weights and ``val_<term>_ema`` for the EMA weights.
    """
    return ["step", "split", *(f"val_{k}{tag}" for tag in ("", "_ema") for k in val_terms)]


class _CsvLog:
    """Append-only CSV; on resume, rows after the resumed step are dropped."""

    def __init__(self, path: Path, columns: list[str], keep_until: int | None):
        self.columns = columns
        if keep_until is not None and path.exists():
            with open(path, newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if int(float(r["step"])) <= keep_until]
            tmp = path.with_suffix(".tmp")
            with open(tmp, "w", newline="") as fh:
                writer = csv.DictWriter(fh, columns)
                writer.writeheader()
                writer.writerows(rows)
            os.replace(tmp, path)
        else:
            with open(path, "w", newline="") as fh:
                csv.DictWriter(fh, columns).writeheader()
        self.fh = open(path, "a", newline="")
        self.writer = csv.DictWriter(self.fh, columns)

    def write(self, row: dict[str, Any]) -> None:
        self.writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in self.columns})
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


def _tensorboard(run_dir: Path, enabled: bool):
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.info("tensorboard is not installed; metrics go to metrics.csv only (pip install diffst[tensorboard])")
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


class MetricsLogger:
    """Writes the metrics of a run; does nothing unless ``enabled`` (only the main process writes).

    Parameters
    ----------
    run_dir
        The run folder: writes ``metrics.csv``, ``val.csv`` (when ``val_cols`` is given) and ``tensorboard/``.
    columns, val_cols
        Columns of the two CSV files (:func:`metric_columns`, :func:`val_columns`).
    keep_until
        On resume, the resumed step: later rows are dropped. None starts new files.
    tensorboard
        Also write TensorBoard events (when installed).
    enabled
        False on the processes that write nothing.
    """

    def __init__(self, run_dir: Path, columns: list[str], val_cols: list[str] | None, keep_until: int | None,
                 tensorboard: bool, enabled: bool = True):
        self.enabled = enabled
        self.metrics = self.val = self.writer = None
        if enabled:
            self.metrics = _CsvLog(run_dir / "metrics.csv", columns, keep_until)
            self.val = _CsvLog(run_dir / "val.csv", val_cols, keep_until) if val_cols else None
            self.writer = _tensorboard(run_dir, tensorboard)

    def step(self, row: dict[str, Any], to_tensorboard: bool) -> None:
        """Append one training step to ``metrics.csv`` (and TensorBoard).

        Parameters
        ----------
        row
            Values keyed by column (None is written as an empty cell).
        to_tensorboard
            Also add the values to the TensorBoard events (every ``train.log_every`` steps).
        """
        if not self.enabled:
            return
        self.metrics.write(row)
        if to_tensorboard:
            self._scalars("train", {k: v for k, v in row.items() if k not in ("step", "epoch")}, row["step"])

    def validation(self, row: dict[str, Any]) -> None:
        """Append one validation pass to ``val.csv`` (and TensorBoard).

        Parameters
        ----------
        row
            ``step``, ``split`` and the ``val_*`` values.
        """
        if not self.enabled:
            return
        self.val.write(row)
        self._scalars("val", {k: v for k, v in row.items() if k.startswith("val_")}, row["step"])

    def _scalars(self, group: str, values: dict[str, Any], step: int) -> None:
        if self.writer is not None:
            for k, v in values.items():
                if v is not None:
                    self.writer.add_scalar(f"{group}/{k}", v, step)

    def close(self) -> None:
        """Close the files (idempotent)."""
        for handle in (self.metrics, self.val, self.writer):
            if handle is not None:
                handle.close()
        self.metrics = self.val = self.writer = None
        self.enabled = False

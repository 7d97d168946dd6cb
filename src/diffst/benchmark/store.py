"""The benchmark's files: strict JSON, written atomically (an old complete file or a new complete file)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from diffst.atomic import atomic_output

__all__ = ["clean_json", "read_json", "write_json"]


def clean_json(value: Any) -> Any:
    """Make ``value`` strict JSON: NaN / inf become None, numpy scalars and arrays plain Python."""
    if isinstance(value, dict):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return clean_json(value.tolist())
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as strict JSON, atomically (old complete file or new complete file)."""
    with atomic_output(path, directory=False) as tmp:
        tmp.write_text(json.dumps(clean_json(data), indent=1))


def read_json(path: Path) -> Any | None:
    """Read a JSON file; None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None

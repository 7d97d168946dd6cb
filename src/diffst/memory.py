"""Handing memory back to the system: what readers, tiling and prediction call between large chunks.

A process that reads a whole slide in chunks would otherwise keep every freed chunk (glibc's heap, Arrow's
pool) and every memory-mapped page it touched, and grow with the slide.
"""

from __future__ import annotations

import contextlib

__all__ = ["release_memory", "release_pages"]


def release_pages(*arrays) -> None:
    """Drop the pages of memory-mapped arrays from this process's resident memory (they stay in the page cache).

    Reading a prepared dataset's tiles through its memory maps leaves every page read resident, so a
    process that reads all tiles of a slide once would grow with the slide; released pages are read again
    from the page cache if needed. Arrays that are not memory maps are ignored.
    """
    import mmap

    for array in arrays:
        while array is not None and not hasattr(array, "_mmap") and getattr(array, "base", None) is not None:
            array = array.base
        handle = getattr(array, "_mmap", None)
        if handle is not None and hasattr(mmap, "MADV_DONTNEED"):
            with contextlib.suppress(OSError, ValueError):
                handle.madvise(mmap.MADV_DONTNEED)


def release_memory() -> None:
    """Hand freed memory back to the system (Arrow's pool and glibc's heap keep it otherwise).

    Arrow's pool only when pyarrow is loaded; a no-op where neither applies.
    """
    import ctypes
    import sys

    if "pyarrow" in sys.modules:
        with contextlib.suppress(Exception):
            sys.modules["pyarrow"].default_memory_pool().release_unused()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)

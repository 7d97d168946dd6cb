"""Safe outputs: refuse protected paths, write beside the final place, swap in atomically, clean leftovers.

Paths that must never be replaced are refused, outputs are built beside their final place and swapped in
atomically, and the leftovers of runs that were killed are cleared.

Every output Diff-ST writes (prepared datasets, predictions, metrics) goes through here, so one set of
rules holds everywhere:

* an existing output is replaced only when it is one Diff-ST wrote (the caller says how to recognise
  it), never the working directory, the home folder, the filesystem root or one of their parents;
* the new output is written under a hidden temporary name ``.<name>.partial-<pid>-<n>`` in the same
  folder and renamed into place when complete; a folder that already exists is exchanged with the
  new one in a single ``renameat2(RENAME_EXCHANGE)`` on Linux (elsewhere: moved aside as
  ``.<name>.old-<pid>``, restored by the next run if the process died in between);
* leftovers of dead processes (``.partial-`` and ``.old-`` names whose process no longer exists) are
  removed, or restored, before the next write.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from diffst.errors import InputError

log = logging.getLogger("diffst.io")

_counter = itertools.count()
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)(?:-\d+)?$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def protected_paths() -> list[Path]:
    """List the folders that are never replaced.

    These are the filesystem root, the home folder, the working directory and its parents.
    """
    cwd = Path.cwd().resolve()
    return [Path(cwd.anchor), Path.home().resolve(), cwd, *cwd.parents]


def check_writable_target(path: str | Path, what: str, folder: bool = False) -> Path:
    """Check, before any work starts, that ``path`` can be created; return it absolute.

    It must not be a protected folder, no ancestor may be a file, and the nearest existing folder must be
    writable. With ``folder``, the output is a folder that is written into, so an existing file there is
    refused too.
    """
    path = Path(path).expanduser()
    resolved = path.resolve()
    if resolved in protected_paths():
        raise InputError(
            f"Refusing to write the {what} to {path} ({resolved}): it is the working directory, the home folder, "
            "the filesystem root or a parent of the working directory. Give a new folder name, e.g. --out prepared/run1."
        )
    if folder and resolved.exists() and not resolved.is_dir():
        raise InputError(f"Cannot write the {what} to {path}: it is a file, and the {what} is a folder. "
                         "Give a folder path.")
    ancestor = resolved.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"Cannot write the {what} to {path}: {ancestor} is a file, not a folder. Choose another path.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(f"Cannot write the {what} to {path}: the folder {ancestor} is not writable. Choose another path.")
    return resolved


def check_replaceable(path: str | Path, what: str, is_ours: Callable[[Path], bool], overwrite: bool,
                      flag: str = "--overwrite") -> Path:
    """Validate an output path before any work: writable and, if something is there, replaceable.

    Writability is checked by :func:`check_writable_target`.

    An existing path may be replaced only with ``overwrite`` and only when ``is_ours(path)`` says Diff-ST
    wrote it (an empty folder counts as free). Returns the absolute path.
    """
    resolved = check_writable_target(path, what)
    if not resolved.exists() and not resolved.is_symlink():
        return resolved
    if resolved.is_dir() and not any(resolved.iterdir()):
        return resolved
    if not is_ours(resolved):
        kind = "folder" if resolved.is_dir() else "file"
        raise InputError(
            f"Refusing to replace {path}: that {kind} exists and is not a {what} written by Diff-ST, so it may hold "
            "your data. Choose a new path, or move it away yourself."
        )
    if not overwrite:
        raise InputError(f"The {what} {path} already exists; pass {flag} to replace it, or choose a new path.")
    return resolved


def clean_leftovers(target: str | Path) -> None:
    """Remove the temporary outputs of dead processes beside ``target``.

    A moved-aside original whose replacement never arrived is restored instead.
    """
    target = Path(target).resolve()
    parent = target.parent
    if not parent.is_dir():
        return
    for child in parent.iterdir():
        match = _LEFTOVER.match(child.name)
        if not match or match["name"] != target.name or _pid_alive(int(match["pid"])):
            continue
        if match["kind"] == "old" and not target.exists():
            log.warning("restoring %s from %s (a replacement was interrupted)", target, child)
            os.replace(child, target)
            continue
        log.info("removing %s, left by an interrupted run", child)
        _remove(child)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def temporary_path(target: Path) -> Path:
    """Return a hidden sibling path of ``target`` that this process owns."""
    return target.parent / f".{target.name}.partial-{os.getpid()}-{next(_counter)}"


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


@functools.cache
def _renameat2():
    """Look up the C library's renameat2 once (None where the platform lacks it)."""
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    except (OSError, TypeError):  # no C library of the process to open (e.g. Windows)
        return None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False when the platform cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    return fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def swap_into_place(new: Path, target: Path) -> None:
    """Move the complete output ``new`` to ``target``, replacing what is there.

    At every moment the target is either the old complete output or the new one.
    """
    if target.resolve() in protected_paths():  # last line of defence, whatever the caller checked
        raise InputError(f"Refusing to replace {target}: it is the filesystem root, the home folder, the working "
                         "directory or one of its parents.")
    if not target.exists():
        os.replace(new, target)
        return
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
        os.replace(new, target)
        return
    if target.is_file():  # a file rename replaces atomically everywhere
        os.replace(new, target)
        return
    if _exchange(new, target):
        _remove(new)  # now holds the old output
        return
    aside = target.parent / f".{target.name}.old-{os.getpid()}"
    os.replace(target, aside)
    os.replace(new, target)
    _remove(aside)


@contextlib.contextmanager
def atomic_output(target: str | Path, *, directory: bool) -> Iterator[Path]:
    """Write an output under a temporary name and move it to ``target`` when the block succeeds.

    Yields the temporary path (a created folder when ``directory``, else a file path not yet created).
    On any exception the temporary output is removed and ``target`` is untouched. Leftovers of killed
    runs beside ``target`` are cleared first.
    """
    target = Path(target).expanduser().resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(target)
    tmp = temporary_path(target)
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        swap_into_place(tmp, target)
    except BaseException:
        _remove(tmp)
        raise

"""Exceptions raised for bad inputs. Every message names the value, what was expected and how to fix it."""


class DiffSTError(Exception):
    """Base class of all errors Diff-ST raises on purpose."""


class InputError(DiffSTError, ValueError):
    """A file, value or array given by the user is missing, corrupt or inconsistent."""


class GeometryError(InputError):
    """Coordinates, pixel sizes or tile sizes that do not fit together."""


class TrainingInterrupted(DiffSTError):
    """Training stopped on SIGINT / SIGTERM after saving a checkpoint; the message says how to resume."""

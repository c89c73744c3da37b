"""Exceptions meant for people: one line naming the file, option or value at fault.

The CLI turns a :class:`LensforgeError` into a one-line message and exit code 2
(a :class:`UsageError`) or 1 (anything else); the traceback only with ``--debug``.
"""

from __future__ import annotations


class LensforgeError(Exception):
    """Base class for errors lensforge reports to the user without a traceback."""

    exit_code = 1


class UsageError(LensforgeError):
    """Bad input from the user: a path, option or value that cannot work (exit code 2)."""

    exit_code = 2


class DataError(UsageError):
    """A data source, image file or manifest that cannot be read as asked."""


class ConfigError(UsageError):
    """A configuration value of the wrong type, out of range, or unknown."""


class ArtifactError(LensforgeError):
    """A run folder or bundle that is incomplete, altered or inconsistent."""

    exit_code = 2


class ExportError(LensforgeError):
    """Export failed, or the exported model does not match the PyTorch model."""


class ChanceLevelError(LensforgeError):
    """A model scores at chance level: it learned nothing usable (exit code 4).

    Raised where such a model would be used as if it worked: autopilot's result, a parent
    for compression, a candidate for selection (``--force`` overrides the last two).
    """

    exit_code = 4

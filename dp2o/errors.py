"""The root of every error meant for a user rather than a developer.

The CLI prints a `Dp2oError` as one line (no traceback) and exits non-zero; anything else is a bug and keeps
its traceback. Subclasses say which part of the pipeline refused: a config, a stage, a backend, a metric.
"""

from __future__ import annotations


class Dp2oError(Exception):
    """Something the user can fix; the message says what and how."""


class StageError(Dp2oError, RuntimeError):
    """A stage cannot run or finish (bad inputs, too many failures, missing upstream); the message says why."""

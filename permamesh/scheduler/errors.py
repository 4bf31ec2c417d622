"""The scheduler package's exception family."""

from __future__ import annotations

from permamesh.errors import PermameshError


class SchedulerError(PermameshError):
    """A node profile, a registry row, a weights file or a job was malformed or out of range."""

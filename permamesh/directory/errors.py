"""The directory's exception family."""

from __future__ import annotations

from permamesh.errors import PermameshError


class DirectoryError(PermameshError):
    """The directory could not be read, did not check out, or named no usable node."""

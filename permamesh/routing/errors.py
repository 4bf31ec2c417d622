"""The routing package's exception family."""

from __future__ import annotations

from permamesh.errors import PermameshError


class RoutingError(PermameshError):
    """A routing input was malformed: a bad block size, token, salt, chain or worker id."""

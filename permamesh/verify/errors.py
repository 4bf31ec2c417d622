"""The verification package's exception family."""

from __future__ import annotations

from permamesh.errors import PermameshError


class VerifyError(PermameshError):
    """A challenge, an answer to score, or a reputation input was malformed or out of range."""

"""The overlay's exception family: every rejected clove, cell or path request raises one."""

from __future__ import annotations

from permamesh.routing.errors import RoutingError


class OverlayError(RoutingError):
    """An overlay input was rejected: a malformed, forged, replayed or oversized clove or cell,
    or a path request the relay set cannot satisfy. The message says which and why."""


def require_bytes(value: object, what: str, min_len: int, max_len: int) -> bytes:
    """``value`` as bytes if it is bytes-like and ``min_len <= len <= max_len``; else an
    :class:`OverlayError` naming ``what`` and the defect (wrong type, truncated, oversized)."""
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise OverlayError(f"{what} rejected: expected bytes, got {type(value).__name__}")
    data = bytes(value)
    if len(data) < min_len:
        raise OverlayError(f"{what} rejected: truncated ({len(data)} bytes < {min_len})")
    if len(data) > max_len:
        raise OverlayError(f"{what} rejected: oversized ({len(data)} bytes > {max_len})")
    return data


class NotDelivered(OverlayError):
    """Fewer than k cloves of a request were acknowledged, even after every replacement path:
    the entry worker most likely could not rebuild it. Sending it again over fresh paths is
    the caller's choice (an entry that did rebuild it, and whose acks were lost, runs it twice)."""


"""OverlayConfig: what an overlay client sends per request, and how long it waits.

Split, paths and resends (``n``, ``k``, ``max_cloves``, ``hops``, ``resends``, the timeouts),
path reuse and preparation (``keep_paths``, ``prepare``), and the streamed answer's chunk
blocks, repairs and top-ups (``stream_*``; docs/paths.md section 9). Checked on construction.

Who reads it: :class:`~permamesh.overlay.inflight.InFlight` (one request) and
:class:`~permamesh.overlay.sender.OverlayClient` (sessions, kits, guards).
"""

from __future__ import annotations

import dataclasses

from permamesh.overlay.envelope import MAX_CHUNK_BLOCKS
from permamesh.overlay.errors import OverlayError
from permamesh.overlay.relay import DEFAULT_EPOCH_S

__all__ = ["OverlayConfig"]


@dataclasses.dataclass(frozen=True)
class OverlayConfig:
    n: int = 4  # cloves sent at once, one path each
    k: int = 3  # cloves that rebuild a message
    max_cloves: int = 16  # cloves of the split; resends, repairs and probes use the unused ones
    hops: int = 3  # relays per path
    resends: int = 3  # rounds of replacement paths at most
    ack_timeout_s: float = 1.0  # a path not acknowledged this long after sending has failed
    answer_grace_s: float = 3.0  # some answer cloves came, the rest not this long after: resend
    answer_timeout_s: float = 600.0  # the whole request, at most
    epoch_s: float = DEFAULT_EPOCH_S  # replay-guard epoch length (relays use the same)
    keep_paths: bool = True  # a session's requests share its path set (docs/paths.md 5); else fresh per request
    prepare: bool = True  # between requests, do the X25519 work of the next request's paths
    stream_blocks: int = 12  # chunk reply blocks per path for a streamed answer (0: answers come whole)
    stream_idle_s: float = 10.0  # a begun stream silent this long gets a probe; twice: the entry is gone
    stream_repair_s: float = 0.3  # a chunk short of k cloves this long: one more clove over a fresh path
    stream_topup_ahead: int = 4  # chunks before the blocks run out when the live paths are topped up
    stream_max_blocks: int = 1024  # chunk blocks sent for one request, at most (first paths and top-ups)

    def __post_init__(self) -> None:
        if not 1 <= self.k <= self.n <= self.max_cloves <= 255:
            raise OverlayError("overlay needs 1 <= k <= n <= max_cloves <= 255")
        if not 0 <= self.stream_blocks <= MAX_CHUNK_BLOCKS or self.stream_idle_s <= 0 or self.stream_topup_ahead < 1:
            raise OverlayError(f"overlay needs 0 <= stream_blocks <= {MAX_CHUNK_BLOCKS}, stream_idle_s > 0 "
                               "and stream_topup_ahead >= 1")
        if self.stream_max_blocks < 0:
            raise OverlayError("overlay needs stream_max_blocks >= 0")

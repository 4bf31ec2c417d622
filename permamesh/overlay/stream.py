"""A streamed answer over reply blocks: when the entry worker cuts a chunk, and what it sends.

The client puts ``stream_blocks`` single-use *chunk blocks* in every clove's envelope (over the
same reversed path as its ack and answer blocks, ``docs/paths.md`` section 9). The entry
worker gathers the pieces its job streams (a model's :class:`~permamesh.wire.TokenChunk`, a
container's :class:`~permamesh.containers.messages.RunOutput`) and, chunk by chunk, signs the
gathered pieces as one message of the same type, splits that frame by S-IDA (any k of the
cloves rebuild it) and sends one clove over the next unused chunk block of each path it holds.
When fewer than k paths have a chunk block left, the chunk waits (its pieces keep gathering)
until the client tops the paths up (:mod:`~permamesh.overlay.topup`) or the final answer,
which goes over the answer blocks exactly as an unstreamed answer does, brings the rest.

- :class:`StreamOut` (entry worker): one streamed job's paths (:class:`Lane`: a path's chunk
  blocks), its pieces, its timer; it signs, splits and seals each chunk; top-ups append
  blocks to a lane (:meth:`StreamOut.extend_lane`).
- :class:`StreamConfig` / :class:`ChunkBuffer` (entry worker): chunk ``s`` leaves when it holds
  :meth:`StreamConfig.tokens` tokens (container output: ``output_bytes_per_token`` bytes a
  token) or its first piece has waited :meth:`StreamConfig.wait_s`, whichever comes first.
  Both thresholds grow geometrically, so few blocks cover long answers and the chunk count
  reveals an answer's length only to within a geometric bucket.

The client's side, which rebuilds chunks and releases them in order, is
:mod:`~permamesh.overlay.reassembly`.

Who calls it: :mod:`permamesh.workers.inbox` (StreamOut, StreamConfig).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import OrderedDict
from collections.abc import Callable

from permamesh.containers.messages import RunOutput
from permamesh.overlay.clove import Clove
from permamesh.overlay.envelope import chunk_message_id, encode_chunk_item
from permamesh.overlay.errors import OverlayError
from permamesh.overlay.reply import ReplyBlock
from permamesh.overlay.sida import split
from permamesh.overlay.topup import lane_id
from permamesh.wire import TokenChunk, WireError

log = logging.getLogger(__name__)

__all__ = ["ChunkBuffer", "Lane", "Piece", "StreamConfig", "StreamOut"]

Piece = TokenChunk | RunOutput  # what a streamed job sends before its answer


@dataclasses.dataclass(frozen=True)
class StreamConfig:
    """When the entry worker cuts chunk ``seq`` of a streamed answer."""

    first_tokens: int = 1  # chunk 0 leaves with this many tokens (time to first token)
    chunk_tokens: int = 4  # tokens of chunk 1; chunk s holds chunk_tokens * growth**(s-1)
    interval_s: float = 0.05  # seconds chunk 1's first token may wait; grows like the tokens
    growth: float = 1.5  # per chunk; 1.0 for fixed-size chunks
    max_tokens: int = 256  # a chunk's token threshold never exceeds this
    max_interval_s: float = 1.0  # seconds; a chunk's wait never exceeds this
    spare_cloves: int = 2  # cloves of each chunk's split kept for paths that join later (repairs)
    keep_recent: int = 8  # chunks whose spare cloves are kept
    output_bytes_per_token: int = 16  # container output: bytes that count as one token

    def __post_init__(self) -> None:
        if self.first_tokens < 1 or self.chunk_tokens < 1 or self.max_tokens < 1 or self.output_bytes_per_token < 1:
            raise OverlayError("stream chunk sizes must be >= 1 token (and a token >= 1 byte of output)")
        if self.interval_s < 0 or self.max_interval_s < 0 or self.growth < 1.0:
            raise OverlayError("stream intervals must be >= 0 and growth >= 1")

    def tokens(self, seq: int) -> int:
        if seq == 0:
            return self.first_tokens
        return min(self.max_tokens, max(1, round(self.chunk_tokens * self.growth ** (seq - 1))))

    def wait_s(self, seq: int) -> float:
        if seq == 0:
            return 0.0
        return min(self.max_interval_s, self.interval_s * self.growth ** (seq - 1))

    def size(self, part: Piece) -> int:
        """``part``'s size in tokens (container output: its bytes over output_bytes_per_token, rounded up)."""
        if isinstance(part, TokenChunk):
            return len(part.token_ids)
        return -(-(len(part.stdout) + len(part.stderr)) // self.output_bytes_per_token)


def merge(request_id: str, parts: list[Piece]) -> Piece:
    """One piece of the type of ``parts`` holding all of them, in order."""
    if isinstance(parts[0], RunOutput):
        return RunOutput(request_id, b"".join(p.stdout for p in parts), b"".join(p.stderr for p in parts))
    return TokenChunk(request_id, parts[0].index, "".join(p.text for p in parts),
                      tuple(t for p in parts for t in p.token_ids), *(_joined(parts, name) for name in PER_TOKEN))


PER_TOKEN = ("logprobs", "tokens", "top_logprobs")  # a TokenChunk's fields with one entry per token


def _joined(parts: list[TokenChunk], name: str) -> tuple:
    """``name`` of every part in order, where every part with tokens has it (else none: the
    client then takes them from the final answer)."""
    if all(len(getattr(p, name)) == len(p.token_ids) for p in parts):
        return tuple(x for p in parts for x in getattr(p, name))
    return ()


class ChunkBuffer:
    """The entry worker's side of one streamed job: pieces in, merged chunks out.

    :meth:`add` takes each piece the job streams (all of one type) and says whether the
    buffered chunk is due by its size; :meth:`due_in` says how long until it is due by time;
    :meth:`take` hands it out as one merged piece and moves to the next number."""

    def __init__(self, request_id: str, config: StreamConfig = StreamConfig()) -> None:
        self.request_id, self.config = request_id, config
        self.seq = 0  # the number of the chunk being gathered
        self._parts: list[Piece] = []
        self._size = 0  # tokens gathered
        self._since: float | None = None  # when its first piece came

    def __len__(self) -> int:
        return self._size

    def add(self, part: Piece, now: float) -> bool:
        if self._parts and type(part) is not type(self._parts[0]):
            raise OverlayError(f"a {type(part).__name__} in a stream of {type(self._parts[0]).__name__}")
        if not self._parts:
            self._since = now
        self._parts.append(part)
        self._size += self.config.size(part)
        return self.due()

    def due(self) -> bool:
        """Whether the gathered chunk is due by its size."""
        return bool(self._parts) and self._size >= self.config.tokens(self.seq)

    def due_in(self, now: float) -> float | None:
        """Seconds until the gathered chunk is due by time (None when nothing is gathered)."""
        if self._since is None:
            return None
        return max(0.0, self._since + self.config.wait_s(self.seq) - now)

    def take(self) -> tuple[int, Piece] | None:
        if not self._parts:
            return None
        parts, self._parts, self._since, self._size = self._parts, [], None, 0
        seq, self.seq = self.seq, self.seq + 1
        return seq, merge(self.request_id, parts)


@dataclasses.dataclass
class Lane:
    """One path's chunk blocks (used in order; top-ups append more) and its answer block's key
    (names the path's delayed ack, which a chunk clove makes moot, and, digested, the lane)."""

    ack_key: bytes
    blocks: list[ReplyBlock]

    @property
    def id(self) -> bytes:
        return lane_id(self.ack_key)


Seal = Callable[[bytes, ReplyBlock, bytes], None]  # (lane's ack key, block, reply item): send it


class StreamOut:
    """The entry worker's side of one streamed job (``message_id``, rebuilt from ``k`` cloves).

    :meth:`on_tokens` takes each piece the job streams (event-loop thread); due chunks are
    signed with ``sign`` (a piece -> its frame), split into one clove per lane that has a
    block left (plus ``spare_cloves`` kept back), and handed to ``seal``. A lane that joins
    later (the client repairing a stalled stream over a fresh path) first gets one spare clove
    of each of the ``keep_recent`` last chunks, so a chunk that lost a clove on a dead path
    rebuilds after all. When fewer than k lanes have a block left, the due chunk waits for a
    top-up (:meth:`extend_lane`, or :meth:`add_lane` with ``repair=False``). :meth:`stop` ends
    it (the final answer carries the rest). ``counts`` gets ``chunks``, ``chunks_repaired``,
    ``streams_starved`` (times a due chunk found too few lanes) and ``chunk_failed``."""

    def __init__(self, message_id: bytes, request_id: str, k: int, lanes: list[Lane],
                 sign: Callable[[Piece], bytes], seal: Seal, counts, config: StreamConfig = StreamConfig()) -> None:
        self.mid, self.k, self.lanes, self.sign, self.seal, self.counts = message_id, k, lanes, sign, seal, counts
        self.config = config
        self.buffer: ChunkBuffer | None = ChunkBuffer(request_id, config)
        self.starved = False  # a due chunk waits for lanes
        self._timer: asyncio.TimerHandle | None = None
        self._spares: OrderedDict[int, list[Clove]] = OrderedDict()  # chunk number -> cloves not sent

    @property
    def active(self) -> bool:
        return self.buffer is not None

    @property
    def unused(self) -> int:
        """Chunk blocks held and not yet used."""
        return sum(len(lane.blocks) for lane in self.lanes)

    def add_lane(self, lane: Lane, repair: bool = True) -> None:
        """A path whose envelope came after the job started: it carries later chunks and, when
        ``repair`` (a resend or repair path, not a top-up's new lane), first a spare clove of
        each recent chunk."""
        if not self.active:
            return
        for seq, spare in self._spares.items():
            if repair and spare and lane.blocks:
                self.seal(lane.ack_key, lane.blocks.pop(0), encode_chunk_item(seq, spare.pop(0)))
                self.counts["chunks_repaired"] += 1
        self.lanes.append(lane)
        self._fed()

    def has_lane(self, lane: bytes) -> bool:
        return any(x.id == lane for x in self.lanes)

    def extend_lane(self, lane: bytes, blocks: list[ReplyBlock]) -> bool:
        """A top-up: append ``blocks`` to the lane named ``lane`` (False if there is none)."""
        found = next((x for x in self.lanes if x.id == lane), None)
        if found is None or not self.active:
            return False
        found.blocks.extend(blocks)
        self._fed()
        return True

    def _fed(self) -> None:
        if self.starved:  # a chunk was due and waited for blocks
            self.starved = False
            self.send()

    def on_tokens(self, part: Piece, now: float) -> None:
        if self.buffer is None:
            return
        if self.buffer.add(part, now):
            self.send()
        elif self._timer is None and not self.starved:
            self._timer = asyncio.get_running_loop().call_later(self.buffer.due_in(now) or 0.0, self.send)

    def send(self) -> None:
        """Send the gathered chunk now (when it is due by size or by time)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.buffer is None:
            return
        lanes = [lane for lane in self.lanes if lane.blocks]
        if len(lanes) < self.k:  # too few paths left to carry a chunk: wait for a top-up (or the answer)
            if not self.starved:
                self.counts["streams_starved"] += 1
                log.debug("stream %s: %d lanes with blocks, %d needed; the chunk waits", self.mid.hex()[:8],
                          len(lanes), self.k)
            self.starved = True
            return
        taken = self.buffer.take()
        if taken is None:
            return
        seq, chunk = taken
        try:
            cloves = split(self.sign(chunk), n=len(lanes) + self.config.spare_cloves, k=self.k,
                           message_id=chunk_message_id(self.mid, seq))
        except (OverlayError, WireError) as exc:
            self.counts["chunk_failed"] += 1
            log.info("cannot send chunk %d: %s", seq, exc)
            self.stop()
            return
        for lane, clove in zip(lanes, cloves):
            self.seal(lane.ack_key, lane.blocks.pop(0), encode_chunk_item(seq, clove))
        self._spares[seq] = cloves[len(lanes):]
        while len(self._spares) > self.config.keep_recent:
            self._spares.popitem(last=False)
        self.counts["chunks"] += 1

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self.buffer, self.lanes, self.starved = None, None, [], False
        self._spares.clear()

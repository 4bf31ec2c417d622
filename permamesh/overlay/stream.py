"""A streamed answer over reply blocks: when the entry worker cuts a chunk, and how the client
puts chunks back in order.

The client puts ``stream_blocks`` single-use *chunk blocks* in every clove's envelope (over the
same reversed path as its ack and answer blocks, ``docs/paths.md`` section 9). The entry
worker gathers the tokens its job streams and, chunk by chunk, signs the gathered tokens as one
:class:`~permamesh.wire.TokenChunk`, splits that frame by S-IDA (any k of the cloves rebuild
it) and sends one clove over the next unused chunk block of each path it holds. When fewer
than k paths have a chunk block left, streaming stops and the rest of the text arrives with
the final answer, which goes over the answer blocks exactly as an unstreamed answer does.

- :class:`StreamOut` (entry worker): one streamed job's paths (:class:`Lane`: a path's chunk
  blocks), its tokens, its timer; it signs, splits and seals each chunk. A long answer gets
  more lanes mid-stream: the client sends extending paths
  (:data:`~permamesh.overlay.envelope.EXTEND`) before the blocks run out.
- :class:`StreamConfig` / :class:`ChunkBuffer` (entry worker): chunk ``s`` leaves when it holds
  :meth:`StreamConfig.tokens` tokens or its first token has waited :meth:`StreamConfig.wait_s`,
  whichever comes first. Both thresholds grow geometrically, so a bounded number of blocks
  covers long answers and the chunk count reveals an answer's length only to within a
  geometric bucket.
- :class:`ChunkReassembly` (client): rebuilds each chunk from any k of its cloves, checks the
  entry worker's signature, releases chunks strictly in order to ``on_text``, and at the end
  releases whatever the final answer holds beyond the released text (a chunk that never
  rebuilt, or text past the last chunk block), refusing an answer that contradicts its chunks.

Who calls it: :mod:`permamesh.workers.inbox` (StreamOut) and
:mod:`~permamesh.overlay.inflight` (ChunkReassembly).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from permamesh.overlay.clove import Clove
from permamesh.overlay.envelope import ChunkClove, chunk_message_id, encode_chunk_item
from permamesh.overlay.errors import OverlayError
from permamesh.overlay.reply import ReplyBlock
from permamesh.overlay.sida import Rebuilder, split
from permamesh.wire import TokenChunk, WireError, decode

log = logging.getLogger(__name__)

__all__ = ["ChunkBuffer", "ChunkReassembly", "Lane", "StreamConfig", "StreamOut"]


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

    def __post_init__(self) -> None:
        if self.first_tokens < 1 or self.chunk_tokens < 1 or self.max_tokens < 1:
            raise OverlayError("stream chunk sizes must be >= 1 token")
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


class ChunkBuffer:
    """The entry worker's side of one streamed job: tokens in, merged chunks out.

    :meth:`add` takes each :class:`TokenChunk` the job streams and says whether the buffered
    chunk is due by its size; :meth:`due_in` says how long until it is due by time;
    :meth:`take` hands it out as one merged :class:`TokenChunk` and moves to the next number."""

    def __init__(self, request_id: str, config: StreamConfig = StreamConfig()) -> None:
        self.request_id, self.config = request_id, config
        self.seq = 0  # the number of the chunk being gathered
        self._parts: list[TokenChunk] = []
        self._since: float | None = None  # when its first token came

    def __len__(self) -> int:
        return sum(len(p.token_ids) for p in self._parts)

    def add(self, part: TokenChunk, now: float) -> bool:
        if not self._parts:
            self._since = now
        self._parts.append(part)
        return len(self) >= self.config.tokens(self.seq)

    def due_in(self, now: float) -> float | None:
        """Seconds until the gathered chunk is due by time (None when nothing is gathered)."""
        if self._since is None:
            return None
        return max(0.0, self._since + self.config.wait_s(self.seq) - now)

    def take(self) -> tuple[int, TokenChunk] | None:
        if not self._parts:
            return None
        parts, self._parts, self._since = self._parts, [], None
        seq, self.seq = self.seq, self.seq + 1
        merged = TokenChunk(self.request_id, parts[0].index, "".join(p.text for p in parts),
                            tuple(t for p in parts for t in p.token_ids))
        return seq, merged


@dataclasses.dataclass
class Lane:
    """One path's chunk blocks (used in order) and its answer block's key (names the path's
    delayed ack, which a chunk clove makes moot)."""

    ack_key: bytes
    blocks: list[ReplyBlock]


Seal = Callable[[bytes, ReplyBlock, bytes], None]  # (lane's ack key, block, reply item): send it


class StreamOut:
    """The entry worker's side of one streamed job (``message_id``, rebuilt from ``k`` cloves).

    :meth:`on_tokens` takes each :class:`TokenChunk` the job streams (event-loop thread);
    due chunks are signed with ``sign`` (a TokenChunk -> its frame), split into one clove per
    lane that has a block left (plus ``spare_cloves`` kept back), and handed to ``seal``. A
    lane that joins later (the client repairing a stalled stream over a fresh path) first gets
    one spare clove of each of the ``keep_recent`` last chunks, so a chunk that lost a clove on
    a dead path rebuilds after all. :meth:`stop` ends it (the final answer carries the rest);
    it also stops itself when fewer than k lanes have a block left. ``counts`` gets
    ``chunks``, ``chunks_repaired``, ``stream_extended`` (extending lanes taken),
    ``streams_exhausted`` and ``chunk_failed``."""

    def __init__(self, message_id: bytes, request_id: str, k: int, lanes: list[Lane],
                 sign: Callable[[TokenChunk], bytes], seal: Seal, counts, config: StreamConfig = StreamConfig()) -> None:
        self.mid, self.k, self.lanes, self.sign, self.seal, self.counts = message_id, k, lanes, sign, seal, counts
        self.config = config
        self.buffer: ChunkBuffer | None = ChunkBuffer(request_id, config)
        self._timer: asyncio.TimerHandle | None = None
        self._spares: OrderedDict[int, list[Clove]] = OrderedDict()  # chunk number -> cloves not sent

    @property
    def active(self) -> bool:
        return self.buffer is not None

    def add_lane(self, lane: Lane, repair: bool = True) -> None:
        """A path whose clove came after the job started: it carries later chunks and, when
        ``repair`` (a resend or repair path, not one that only extends the stream), first a
        spare clove of each recent chunk."""
        if not self.active:
            return
        if not repair:
            self.counts["stream_extended"] += 1
        for seq, spare in self._spares.items():
            if repair and spare and lane.blocks:
                self.seal(lane.ack_key, lane.blocks.pop(0), encode_chunk_item(seq, spare.pop(0)))
                self.counts["chunks_repaired"] += 1
        self.lanes.append(lane)

    def on_tokens(self, part: TokenChunk, now: float) -> None:
        if self.buffer is None:
            return
        if self.buffer.add(part, now):
            self.send()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.buffer.due_in(now) or 0.0, self.send)

    def send(self) -> None:
        """Send the gathered chunk now (when it is due by size or by time)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.buffer is None:
            return
        lanes = [lane for lane in self.lanes if lane.blocks]
        if len(lanes) < self.k:  # too few paths left to carry a chunk: the answer brings the rest
            self.counts["streams_exhausted"] += 1
            self.stop()
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
        self._timer, self.buffer, self.lanes = None, None, []
        self._spares.clear()


class ChunkReassembly:
    """The client's side of one streamed answer to request ``message_id`` from the entry
    worker whose signing key is ``signer``: chunk cloves in, text out in order."""

    def __init__(self, message_id: bytes, signer: bytes, on_text: Callable[[str], None] | None) -> None:
        self.mid, self.signer, self.on_text = message_id, signer, on_text
        self._rebuilder = Rebuilder()
        self._ready: dict[int, str] = {}  # chunks rebuilt, not yet released
        self.next_seq = 0  # the next chunk to release
        self.released: list[str] = []
        self._first_clove: dict[int, float] = {}  # chunk not yet rebuilt -> when its first clove came
        self._rebuilt: set[int] = set()
        self.rebuilt = 0  # chunks rebuilt (released or waiting)
        self.highest = -1  # the highest chunk number rebuilt
        self.dropped = 0  # chunk cloves refused

    @property
    def text(self) -> str:
        return "".join(self.released)

    def add(self, item: ChunkClove) -> bool:
        """Take one chunk clove; True when it completed a chunk (released now or later)."""
        if item.clove.message_id != chunk_message_id(self.mid, item.seq) or item.seq < self.next_seq:
            self.dropped += 1
            return False
        if item.seq in self._rebuilt:
            return False
        self._first_clove.setdefault(item.seq, time.monotonic())
        frame = self._rebuilder.add(item.clove)
        if frame is None:
            return False
        try:
            received = decode(frame)
        except WireError as exc:
            self.dropped += 1
            log.info("chunk %d is not a valid frame: %s", item.seq, exc)
            return False
        if received.sender != self.signer or not isinstance(received.msg, TokenChunk):
            self.dropped += 1
            log.info("chunk %d is not a token chunk signed by the entry worker", item.seq)
            return False
        self.rebuilt += 1
        self._rebuilt.add(item.seq)
        self._first_clove.pop(item.seq, None)
        self.highest = max(self.highest, item.seq)
        self._ready[item.seq] = received.msg.text
        while self.next_seq in self._ready:
            self._release(self._ready.pop(self.next_seq))
            self.next_seq += 1
        return True

    def stalled_since(self) -> float | None:
        """When the first clove of the oldest chunk still short of k cloves came (None if
        none is): the cloves of one chunk travel together, so a chunk short for long lost
        some on a dead path."""
        return min(self._first_clove.values(), default=None)

    def finish(self, text: str) -> None:
        """The final answer's ``text`` came: release what the chunks did not carry. Raises
        :class:`OverlayError` if it does not begin with the text already released."""
        done = self.text
        if not text.startswith(done):
            raise OverlayError(f"the answer contradicts its streamed chunks after {len(done)} characters")
        self._ready.clear()
        self._first_clove.clear()
        if len(text) > len(done):
            self._release(text[len(done):])

    def _release(self, text: str) -> None:
        if not text:
            return
        self.released.append(text)
        if self.on_text is not None:
            self.on_text(text)

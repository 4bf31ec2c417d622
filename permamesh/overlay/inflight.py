"""One overlay request in flight on the client: its cloves, paths, acks, resends and answer.

:class:`InFlight` carries out the rules of ``docs/paths.md`` section 6 for one request of an
:class:`~permamesh.overlay.sender.OverlayClient` (whose module docstring lists them in
order): the first n cloves over the session's path set with their prepared kits, per-path
ack timeouts, replacement cloves over fresh paths, a generation job's streamed chunks
or a container job's output released in order (:class:`~permamesh.overlay.reassembly.ChunkReassembly`, section 9), the
answer rebuilt from any k answer cloves and checked against the entry worker's key, and the
paths it stopped waiting for handed to the client's late evidence.

A chunk still short of k cloves ``stream_repair_s`` after its first clove came lost some on
a dead path: one more clove goes over a fresh path, and the entry worker sends spare cloves
of its recent chunks over it (and later chunks too), so the stream goes on. A stream that
began and then falls silent for ``stream_idle_s`` while chunk blocks are left
gets one probe (a further clove over a fresh path, which a live entry worker acknowledges);
silence for another ``stream_idle_s`` ends the request with an :class:`OverlayError` saying how
much was streamed, never with a silently truncated answer. A long answer outgrows the chunk
blocks of the first paths: when the chunks rebuilt come within ``stream_topup_ahead`` of the
last one that k live paths still have blocks for, each live path (up to n; fresh paths when
fewer than k are left) gets a top-up (:mod:`~permamesh.overlay.topup`) with ``stream_blocks``
new chunk blocks, one round at a time, until ``stream_max_blocks`` chunk blocks were sent for
the request; after that the rest comes with the final answer. Top-ups spend no clove of the
request. :class:`Delivery` is what the last request did.

Who calls it: :meth:`OverlayClient.submit <permamesh.overlay.sender.OverlayClient.submit>` only.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from permamesh.directory.workers import WorkerRecord
from permamesh.directory.relays import RelayRecord
from permamesh.containers.messages import RunOutput, RunResult
from permamesh.overlay.config import OverlayConfig
from permamesh.overlay.envelope import (
    STARTED, Ack, ChunkClove, decode_reply_item, encode_envelope, encode_topup_envelope,
)
from permamesh.identity import NodeIdentity
from permamesh.overlay.errors import NotDelivered, OverlayError
from permamesh.overlay.late import LateEvidence
from permamesh.overlay.messages import RelayCell, RelayDelivery
from permamesh.overlay.onion import build_forward
from permamesh.overlay.prepared import KitPreparer, PathKit, prepare_kit
from permamesh.overlay.reply import ReplyKeys, open_reply
from permamesh.overlay.reassembly import ChunkReassembly, OnOutput
from permamesh.overlay.sida import Rebuilder, split
from permamesh.overlay.stream import StreamConfig
from permamesh.overlay.topup import NEW_LANE, lane_id, make_topup, topup_key
from permamesh.transport import DealerClient, poll_readable
from permamesh.wire import ErrorReply, GenerateResult, Message, TokenChunk, WireError, decode, encode


log = logging.getLogger(__name__)

REPAIR_SPARES = StreamConfig().keep_recent  # chunk blocks a repair path may spend on spare cloves (the entry's default)

__all__ = ["Delivery", "InFlight", "OverlayConfig", "Sender"]


@dataclasses.dataclass
class _Path:
    """One forward cell of the request: a clove, or a top-up (``clove`` None)."""

    relays: tuple[RelayRecord, ...]
    clove: int | None  # index of the clove it carries; None for a top-up
    depth: int  # 0 for the first n, r for a replacement in round r
    sent_at: float
    chunk_end: int = 0  # chunks below this number its lane's blocks can carry (a conservative guess)
    lane: bytes = NEW_LANE  # the entry's name of the lane its chunk blocks opened (none: NEW_LANE)
    topup_of: int | None = None  # a top-up of this path's lane (its chunk_end counts there)
    acked: bool = False
    failed: bool = False


@dataclasses.dataclass(frozen=True)
class Delivery:
    """How the last request went (for benchmarks and the demo)."""

    cloves_sent: int
    paths_failed: int
    rounds: int  # deepest replacement round used
    elapsed_s: float
    entry: str  # node id of the entry worker
    paths: tuple[tuple[str, ...], ...]  # relay node ids of each path, first hop first
    acked: tuple[bool, ...]  # per path: did the entry worker acknowledge its clove
    topups: int = 0  # top-ups sent (more chunk blocks for a long streamed answer)
    chunks: int = 0  # chunks of the streamed answer released (in order) before the answer


class Sender(Protocol):
    """What an :class:`InFlight` uses of the client that owns it.

    Implemented by :class:`~permamesh.overlay.sender.OverlayClient`; declared here so this module
    needs nothing from the one above it.
    """

    config: OverlayConfig
    session: NodeIdentity  # signs the request
    client_id: bytes
    preparer: KitPreparer | None
    late: LateEvidence
    guards: dict[str, DealerClient]  # open links to first hops, by relay node id
    last: Delivery | None

    def epoch(self) -> int: ...

    def select(self, count: int, exclude: set[bytes], session: str | None = None) -> list[tuple[RelayRecord, ...]]: ...

    def path_set(self, session: str) -> list[tuple[RelayRecord, ...]]: ...

    def path_failed(self, session: str, relays: tuple[RelayRecord, ...]) -> None: ...

    def guard(self, relay: RelayRecord) -> DealerClient: ...


class InFlight:
    """The state of one request on the client (see the module docstring for the rules)."""

    def __init__(self, client: Sender, worker: WorkerRecord, req: Message, session: str,
                 results: tuple[type[Message], ...] = (GenerateResult, ErrorReply),
                 on_text: Callable[[str], None] | None = None, on_output: OnOutput | None = None,
                 on_chunk: Callable[[TokenChunk], None] | None = None) -> None:
        self.c, self.worker, self.req, self.session, self.results = client, worker, req, session, results
        self.mid = os.urandom(16)
        cfg = client.config
        frame = encode(req, client.session)
        self.cloves = split(frame, n=cfg.max_cloves, k=cfg.k, message_id=self.mid)
        self.cloves_used = 0
        self.topup_key = topup_key(frame)  # only the entry worker can rebuild it (docs/paths.md 9.9)
        self.topups = 0  # top-ups sent
        self.blocks_sent = 0  # chunk blocks sent, first paths and top-ups
        self.paths: list[_Path] = []
        self.replies: dict[bytes, tuple[ReplyKeys, int]] = {}  # reply id -> (keys, path index)
        self.avoid: set[bytes] = set()  # relays of failed paths
        self.answers = Rebuilder()
        self.started = False
        self.first_answer_at: float | None = None
        kind = RunOutput if RunResult in results else TokenChunk  # a container job streams its output
        self.stream = ChunkReassembly(self.mid, bytes.fromhex(worker.sign_key), on_text, on_output, kind, on_chunk)
        self.heard_at = 0.0  # when the last reply of this request came
        self.probed = False  # a probe went out since the stream last spoke
        self.repaired_at = 0.0  # when the last repair clove went out
        self.topping: list[_Path] = []  # the last round of top-ups (the next waits for them)

    def run(self) -> Message:
        cfg, t0 = self.c.config, time.monotonic()
        paths = self.c.path_set(self.session)
        keys = [tuple(r.node_id_bytes for r in relays) for relays in paths]
        kits = self.c.preparer.take(keys) if self.c.preparer is not None else [None] * len(paths)
        epoch = self.c.epoch()
        for relays, kit in zip(paths, kits):
            self._send_kit(relays, kit or self._kit(relays, epoch), depth=0)
        deadline = t0 + cfg.answer_timeout_s
        while True:
            now = time.monotonic()
            if now > deadline:
                raise OverlayError(f"no answer within {cfg.answer_timeout_s:g} s")
            self._check_timeouts(now)
            guards = list(self.c.guards.values())
            for guard in poll_readable(guards, 0.05):
                frame = guard.recv(0)
                result = self._on_frame(frame) if frame is not None else None
                if result is not None:
                    self._hold_unheard()
                    cloves = [p for p in self.paths if p.clove is not None]
                    self.c.last = Delivery(self.cloves_used, sum(p.failed for p in self.paths),
                                           max(p.depth for p in self.paths), time.monotonic() - t0, self.worker.node_id,
                                           tuple(tuple(r.node_id for r in p.relays) for p in cloves),
                                           tuple(p.acked for p in cloves), self.topups, self.stream.next_seq)
                    if isinstance(result, ErrorReply):
                        raise OverlayError(f"the entry worker refused the request: {result.code}: {result.message}")
                    if isinstance(result, GenerateResult):
                        self.stream.finish(result.text)
                    elif isinstance(result, RunResult):
                        self.stream.finish_output(result.stdout, result.stderr)
                    return result

    def _hold_unheard(self) -> None:
        for index, path in enumerate(self.paths):
            if not (path.acked or path.failed):
                keys = {rid: k for rid, (k, i) in self.replies.items() if i == index}
                self.c.late.hold(self.session, path.relays, path.sent_at, keys)

    # ------------------------------------------------------------------ sending
    def _send_new(self, count: int, depth: int) -> int:
        count = min(count, self.c.config.max_cloves - self.cloves_used)
        drawn = self._fresh(count)
        epoch = self.c.epoch()
        for relays in drawn:
            self._send_kit(relays, self._kit(relays, epoch), depth)
        return len(drawn)

    def _fresh(self, count: int) -> list[tuple[RelayRecord, ...]]:
        """``count`` fresh paths, avoiding failed relays (and live ones, where the mesh allows)."""
        if count <= 0:
            return []
        live = {r.node_id.encode("ascii") for p in self.paths if not p.failed for r in p.relays}
        try:
            return self.c.select(count, self.avoid | live, self.session)
        except OverlayError:
            try:  # a small mesh: share relays with live paths rather than give up
                return self.c.select(count, self.avoid, self.session)
            except OverlayError as exc:
                log.info("no fresh path: %s", exc)
                return []

    def _kit(self, relays: tuple[RelayRecord, ...], epoch: int) -> PathKit:
        return prepare_kit([r.hop() for r in relays], self.c.client_id, epoch, chunks=self.c.config.stream_blocks)

    def _send_kit(self, relays: tuple[RelayRecord, ...], kit: PathKit, depth: int,
                  topup_of: int | None = None) -> None:
        """Send the next clove over ``relays`` with ``kit``'s blocks; or, with ``topup_of`` (a
        path index, -1 for a new lane), a top-up of that path's lane instead of a clove."""
        index = len(self.paths)
        blocks, first = len(kit.chunks), self.stream.highest + 1  # the entry sends chunk >= first next
        (ack_block, ack_keys), (answer_block, answer_keys) = kit.ack, kit.answer
        chunk_blocks = tuple(b for b, _ in kit.chunks)
        self.replies[ack_keys.reply_id] = (ack_keys, index)
        self.replies[answer_keys.reply_id] = (answer_keys, index)
        for _, chunk_keys in kit.chunks:
            self.replies[chunk_keys.reply_id] = (chunk_keys, index)
        path = _Path(relays, None, depth, time.monotonic(), lane=lane_id(answer_block.header[:32]) if blocks else NEW_LANE)
        if topup_of is not None:
            lane = self.paths[topup_of] if topup_of >= 0 else None
            name = lane.lane if lane is not None else NEW_LANE
            if lane is not None:  # its blocks go on where the lane's end: they carry the chunks after
                lane.chunk_end = max(lane.chunk_end, first) + blocks
                path.topup_of, path.lane = topup_of, lane.lane
            else:  # a lane of its own, from the entry's next chunk
                path.chunk_end = first + blocks
            topup = make_topup(self.topup_key, self.mid, self.topups, name, chunk_blocks)
            envelope = encode_topup_envelope(topup, ack_block, answer_block, chunk_blocks)
            self.topups += 1
        else:
            # one of the first n: from chunk 0; a late path: from the entry's next chunk, after
            # the spare cloves of recent chunks that a repair path carries first
            path.chunk_end = blocks if depth == 0 else first + blocks - min(blocks, REPAIR_SPARES)
            path.clove = self.cloves_used
            envelope = encode_envelope(self.cloves[self.cloves_used], ack_block, answer_block, chunk_blocks)
            self.cloves_used += 1
        self.blocks_sent += blocks
        _, cell = build_forward([r.hop() for r in relays], self.worker.node_id.encode("ascii"), envelope,
                                epoch=kit.epoch, secrets=kit.forward)
        self.paths.append(path)
        self.c.guard(relays[0]).send(encode(RelayCell(cell), self.c.session))

    def _check_timeouts(self, now: float) -> None:
        cfg = self.c.config
        for path in list(self.paths):
            if path.acked or path.failed or now - path.sent_at < cfg.ack_timeout_s:
                continue
            path.failed = True
            for other in self.paths:  # the same relays (a path and its top-ups): the same dead reply path
                other.failed = other.failed or other.relays == path.relays
            self.avoid |= {r.node_id_bytes for r in path.relays}
            self.c.path_failed(self.session, path.relays)
            if not self.started and path.depth < cfg.resends:  # rule 6 of docs/paths.md
                self._send_new(1, path.depth + 1)
        if not self.started and not any(not p.acked and not p.failed for p in self.paths):
            acked = sum(p.acked for p in self.paths)
            if acked < cfg.k:
                raise NotDelivered(
                    f"request not delivered: {acked} of {cfg.k} cloves acknowledged after {self.cloves_used} cloves "
                    f"over {len(self.paths)} paths ({sum(p.failed for p in self.paths)} failed)")
        self._check_stream(now)
        if self.first_answer_at is not None and now - self.first_answer_at > cfg.answer_grace_s:
            self.first_answer_at = now  # some answer cloves were lost on the way back: ask again
            if self._send_new(1, 1) == 0:
                raise OverlayError("the answer was lost on the way back and no fresh path is left")

    def _check_stream(self, now: float) -> None:
        """The rule for an entry worker that falls silent mid-stream (module docstring)."""
        cfg, stream = self.c.config, self.stream
        stalled = stream.stalled_since()
        if (stalled is not None and self.first_answer_at is None and now - stalled >= cfg.stream_repair_s
                and now - self.repaired_at >= max(cfg.stream_repair_s, cfg.ack_timeout_s)):
            self.repaired_at = now  # a chunk lost cloves on a dead path: a fresh path brings spares
            log.info("chunk cloves were lost on the way back; repairing over a fresh path")
            self._send_new(1, 1)
        capacity = self._chunk_capacity()
        if (stream.rebuilt and self.first_answer_at is None and stream.highest + 1 + cfg.stream_topup_ahead >= capacity
                and all(p.acked or p.failed for p in self.topping)):  # one round at a time
            self._top_up(stream.highest, capacity)
        if (stream.rebuilt == 0 or self.first_answer_at is not None or now - self.heard_at < cfg.stream_idle_s
                or stream.highest + 1 >= capacity):  # not begun, ending, talking, or out of blocks
            return
        if not self.probed:
            self.probed, self.heard_at = True, now
            log.info("the stream went silent after %d chunks; probing the entry worker", stream.rebuilt)
            self._send_new(1, 1)
            return
        raise OverlayError(
            f"the entry worker went silent mid-stream: {stream.rebuilt} chunks ({stream.amount()}) "
            f"arrived, then nothing for {2 * cfg.stream_idle_s:g} s, not even an ack of a probe; the answer is incomplete")

    def _top_up(self, highest: int, capacity: int) -> None:
        """More chunk blocks for a long answer: a top-up over each live lane (up to n, the
        ones that reach furthest), new lanes over fresh paths when fewer than k are live;
        within ``stream_max_blocks`` (docs/paths.md 9.9)."""
        cfg = self.c.config
        affordable = (cfg.stream_max_blocks - self.blocks_sent) // max(cfg.stream_blocks, 1)  # top-ups
        if cfg.stream_blocks == 0 or affordable < cfg.k:
            self.topping = []
            return  # the budget is spent: the answer brings the rest
        lanes = sorted((i for i, p in enumerate(self.paths) if p.acked and not p.failed and p.topup_of is None
                        and p.lane != NEW_LANE), key=lambda i: -self.paths[i].chunk_end)[:min(cfg.n, affordable)]
        fresh = self._fresh(min(cfg.k, affordable) - len(lanes))
        targets = [(self.paths[i].relays, i) for i in lanes] + [(relays, -1) for relays in fresh]
        epoch, before = self.c.epoch(), len(self.paths)
        for relays, lane in targets:
            self._send_kit(relays, self._kit(relays, epoch), 0, topup_of=lane)
        self.topping = self.paths[before:]
        log.debug("stream at chunk %d of %d: %d top-ups sent (%d chunk blocks so far)", highest, capacity,
                  len(targets), self.blocks_sent)

    def _chunk_capacity(self) -> int:
        """The chunk number from which fewer than k live paths have chunk blocks (by each
        path's conservative guess): the entry worker's stream waits there."""
        ends = sorted((p.chunk_end for p in self.paths if not p.failed), reverse=True)
        return ends[self.c.config.k - 1] if len(ends) >= self.c.config.k else 0

    # ------------------------------------------------------------------ receiving
    def _on_frame(self, frame: bytes) -> Message | None:
        try:
            msg = decode(frame).msg
        except WireError as exc:
            log.debug("dropped a frame from a guard: %s", exc)
            return None
        if not isinstance(msg, RelayDelivery):
            return None
        if msg.reply_id not in self.replies:
            self.c.late.offer(msg)  # perhaps a path an earlier request stopped waiting for
            return None
        keys, index = self.replies.pop(msg.reply_id)
        try:
            item = decode_reply_item(open_reply(keys, msg.payload))
        except OverlayError as exc:
            log.info("dropped a reply on path %d: %s", index, exc)
            return None
        path = self.paths[index]
        if isinstance(item, ChunkClove):
            if not path.failed:
                path.acked, self.started = True, True
            self.heard_at, self.probed = time.monotonic(), False
            self.stream.add(item)
            return None
        if isinstance(item, Ack):
            if item.message_id == self.mid and not path.failed:
                path.acked = True
                self.started = self.started or item.status >= STARTED
                self.heard_at, self.probed = time.monotonic(), False
            return None
        if item.message_id != self.mid:
            return None
        path.acked = True
        self.started = True
        self.first_answer_at = self.first_answer_at or time.monotonic()
        frame = self.answers.add(item)
        if frame is None:
            return None
        try:
            received = decode(frame)
        except WireError as exc:
            raise OverlayError(f"the rebuilt answer is not a valid frame: {exc}") from exc
        if received.sender != bytes.fromhex(self.worker.sign_key):
            raise OverlayError("the answer is not signed by the entry worker")
        if not isinstance(received.msg, self.results):
            raise OverlayError(f"the answer is a {received.msg.TAG}, not a result")
        return received.msg

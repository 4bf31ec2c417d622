"""One overlay request in flight on the client: its cloves, paths, acks, resends and answer.

:class:`InFlight` carries out the rules of ``docs/paths.md`` section 6 for one request of an
:class:`~permamesh.overlay.sender.OverlayClient` (whose module docstring lists them in
order): the first n cloves over the session's path set with their prepared kits, per-path
ack timeouts, replacement cloves over fresh paths, a generation job's streamed chunks
released in order (:class:`~permamesh.overlay.stream.ChunkReassembly`, section 9), the
answer rebuilt from any k answer cloves and checked against the entry worker's key, and the
paths it stopped waiting for handed to the client's late evidence.

A chunk still short of k cloves ``stream_repair_s`` after its first clove came lost some on
a dead path: one more clove goes over a fresh path, and the entry worker sends spare cloves
of its recent chunks over it (and later chunks too), so the stream goes on. A stream that
began and then falls silent for ``stream_idle_s`` while chunk blocks are left
gets one probe (a further clove over a fresh path, which a live entry worker acknowledges);
silence for another ``stream_idle_s`` ends the request with an :class:`OverlayError` saying how
much was streamed, never with a silently truncated answer. A long answer outgrows the chunk
blocks of the first paths: when the chunks rebuilt come within ``stream_extend_ahead`` of the
last one that k live paths still have blocks for, k more cloves go over fresh paths marked
:data:`~permamesh.overlay.envelope.EXTEND`, each with ``stream_blocks`` new chunk blocks (as
long as the split has k + 1 cloves left: one stays for a probe; after that the rest of the
text comes with the final answer). :class:`Delivery` is what the last request did.

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
from permamesh.overlay.envelope import MAX_CHUNK_BLOCKS, STARTED, Ack, ChunkClove, decode_reply_item, encode_envelope
from permamesh.identity import NodeIdentity
from permamesh.overlay.errors import NotDelivered, OverlayError
from permamesh.overlay.late import LateEvidence
from permamesh.overlay.messages import RelayCell, RelayDelivery
from permamesh.overlay.onion import build_forward
from permamesh.overlay.prepared import KitPreparer, PathKit, prepare_kit
from permamesh.overlay.relay import DEFAULT_EPOCH_S
from permamesh.overlay.reply import ReplyKeys, open_reply
from permamesh.overlay.sida import Rebuilder, split
from permamesh.overlay.stream import ChunkReassembly, StreamConfig
from permamesh.transport import DealerClient, poll_readable
from permamesh.wire import ErrorReply, GenerateResult, Message, WireError, decode, encode


log = logging.getLogger(__name__)

REPAIR_SPARES = StreamConfig().keep_recent  # chunk blocks a repair path may spend on spare cloves (the entry's default)

__all__ = ["Delivery", "InFlight", "OverlayConfig", "Sender"]


@dataclasses.dataclass(frozen=True)
class OverlayConfig:
    n: int = 4  # cloves sent at once, one path each
    k: int = 3  # cloves that rebuild a message
    max_cloves: int = 16  # cloves of the split; resends, repairs and stream extensions use the unused ones
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
    stream_extend_ahead: int = 4  # chunks before the blocks run out when k extending paths go out

    def __post_init__(self) -> None:
        if not 1 <= self.k <= self.n <= self.max_cloves <= 255:
            raise OverlayError("overlay needs 1 <= k <= n <= max_cloves <= 255")
        if not 0 <= self.stream_blocks <= MAX_CHUNK_BLOCKS or self.stream_idle_s <= 0 or self.stream_extend_ahead < 1:
            raise OverlayError(f"overlay needs 0 <= stream_blocks <= {MAX_CHUNK_BLOCKS}, stream_idle_s > 0 "
                               "and stream_extend_ahead >= 1")


@dataclasses.dataclass
class _Path:
    relays: tuple[RelayRecord, ...]
    clove: int  # index of the clove it carries
    depth: int  # 0 for the first n, r for a replacement in round r
    sent_at: float
    chunk_end: int = 0  # chunks below this number its chunk blocks can carry (a conservative guess)
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
                 on_text: Callable[[str], None] | None = None) -> None:
        self.c, self.worker, self.req, self.session, self.results = client, worker, req, session, results
        self.mid = os.urandom(16)
        cfg = client.config
        self.cloves = split(encode(req, client.session), n=cfg.max_cloves, k=cfg.k, message_id=self.mid)
        self.paths: list[_Path] = []
        self.replies: dict[bytes, tuple[ReplyKeys, int]] = {}  # reply id -> (keys, path index)
        self.avoid: set[bytes] = set()  # relays of failed paths
        self.answers = Rebuilder()
        self.started = False
        self.first_answer_at: float | None = None
        self.stream = ChunkReassembly(self.mid, bytes.fromhex(worker.sign_key), on_text)
        self.heard_at = 0.0  # when the last reply of this request came
        self.probed = False  # a probe went out since the stream last spoke
        self.repaired_at = 0.0  # when the last repair clove went out
        self.extending: list[_Path] = []  # the last extending paths sent (the next wait for them)

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
                    self.c.last = Delivery(len(self.paths), sum(p.failed for p in self.paths),
                                           max(p.depth for p in self.paths), time.monotonic() - t0, self.worker.node_id,
                                           tuple(tuple(r.node_id for r in p.relays) for p in self.paths),
                                           tuple(p.acked for p in self.paths))
                    if isinstance(result, ErrorReply):
                        raise OverlayError(f"the entry worker refused the request: {result.code}: {result.message}")
                    if isinstance(result, GenerateResult):
                        self.stream.finish(result.text)
                    return result

    def _hold_unheard(self) -> None:
        for index, path in enumerate(self.paths):
            if not (path.acked or path.failed):
                keys = {rid: k for rid, (k, i) in self.replies.items() if i == index}
                self.c.late.hold(self.session, path.relays, path.sent_at, keys)

    # ------------------------------------------------------------------ sending
    def _send_new(self, count: int, depth: int, extend: bool = False) -> int:
        cfg = self.c.config
        count = min(count, cfg.max_cloves - len(self.paths))
        if count <= 0:
            return 0
        live = {r.node_id.encode("ascii") for p in self.paths if not p.failed for r in p.relays}
        try:
            drawn = self.c.select(count, self.avoid | live, self.session)
        except OverlayError:
            try:  # a small mesh: share relays with live paths rather than give up
                drawn = self.c.select(count, self.avoid, self.session)
            except OverlayError as exc:
                log.info("no fresh path for a resend: %s", exc)
                return 0
        epoch = self.c.epoch()
        for relays in drawn:
            self._send_kit(relays, self._kit(relays, epoch), depth, extend)
        return len(drawn)

    def _kit(self, relays: tuple[RelayRecord, ...], epoch: int) -> PathKit:
        return prepare_kit([r.hop() for r in relays], self.c.client_id, epoch, chunks=self.c.config.stream_blocks)

    def _send_kit(self, relays: tuple[RelayRecord, ...], kit: PathKit, depth: int, extend: bool = False) -> None:
        index = len(self.paths)
        blocks, first = len(kit.chunks), self.stream.highest + 1  # the entry sends chunk >= first next
        if depth == 0 and not extend:  # one of the first n: from chunk 0
            end = blocks
        else:  # a late path: from the entry's next chunk, after the spares a repair path carries
            end = first + blocks - (0 if extend else min(blocks, REPAIR_SPARES))
        (ack_block, ack_keys), (answer_block, answer_keys) = kit.ack, kit.answer
        self.replies[ack_keys.reply_id] = (ack_keys, index)
        self.replies[answer_keys.reply_id] = (answer_keys, index)
        for _, chunk_keys in kit.chunks:
            self.replies[chunk_keys.reply_id] = (chunk_keys, index)
        envelope = encode_envelope(self.cloves[index], ack_block, answer_block, tuple(b for b, _ in kit.chunks),
                                   extend=extend and bool(kit.chunks))
        _, cell = build_forward([r.hop() for r in relays], self.worker.node_id.encode("ascii"), envelope,
                                epoch=kit.epoch, secrets=kit.forward)
        self.paths.append(_Path(relays, index, depth, time.monotonic(), end))
        self.c.guard(relays[0]).send(encode(RelayCell(cell), self.c.session))

    def _check_timeouts(self, now: float) -> None:
        cfg = self.c.config
        for path in list(self.paths):
            if path.acked or path.failed or now - path.sent_at < cfg.ack_timeout_s:
                continue
            path.failed = True
            self.avoid |= {r.node_id_bytes for r in path.relays}
            self.c.path_failed(self.session, path.relays)
            if not self.started and path.depth < cfg.resends:  # rule 6 of docs/paths.md
                self._send_new(1, path.depth + 1)
        if not self.started and not any(not p.acked and not p.failed for p in self.paths):
            acked = sum(p.acked for p in self.paths)
            if acked < cfg.k:
                raise NotDelivered(
                    f"request not delivered: {acked} of {cfg.k} cloves acknowledged after {len(self.paths)} cloves "
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
        if (stream.rebuilt and self.first_answer_at is None and stream.highest + 1 + cfg.stream_extend_ahead >= capacity
                and all(p.acked or p.failed for p in self.extending) and len(self.paths) + cfg.k < cfg.max_cloves):
            # (one round at a time, each once the last is heard of; a clove stays in reserve for a probe)
            before = len(self.paths)
            self._send_new(cfg.k, 0, extend=True)  # a long answer: k more paths with fresh blocks; not a resend
            self.extending = self.paths[before:]
            log.debug("stream at chunk %d of %d: %d extending paths sent", stream.highest, capacity, len(self.extending))
        if (stream.rebuilt == 0 or self.first_answer_at is not None or now - self.heard_at < cfg.stream_idle_s
                or stream.highest + 1 >= capacity):  # not begun, ending, talking, or out of blocks
            return
        if not self.probed:
            self.probed, self.heard_at = True, now
            log.info("the stream went silent after %d chunks; probing the entry worker", stream.rebuilt)
            self._send_new(1, 1)
            return
        raise OverlayError(
            f"the entry worker went silent mid-stream: {stream.rebuilt} chunks ({len(stream.text)} characters) "
            f"arrived, then nothing for {2 * cfg.stream_idle_s:g} s, not even an ack of a probe; the answer is incomplete")

    def _chunk_capacity(self) -> int:
        """The chunk number from which fewer than k live paths have chunk blocks (by each
        path's conservative guess): the entry worker stops streaming there."""
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

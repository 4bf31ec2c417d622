"""The entry worker's end of the overlay: rebuild requests from cloves, answer over reply blocks.

A proxy hands each clove to the entry worker as a :class:`CloveDrop` whose envelope holds the
clove and two reply blocks (an ack block and an answer block, over the reverse of the clove's
path). For every valid clove the inbox keeps the answer block and acknowledges over the ack
block (so the client learns within one round trip which paths work), unless an answer clove
goes over the same path within ``ack_delay_s``: an answer proves the path as well as an ack
does, and a short job then costs one reply cell per path instead of two (delayed acks, as in
TCP). When k valid cloves
rebuild the request (a signed :class:`GenerateRequest` or container :class:`RunRequest` frame
from the client's session key), the job runs like any other (routed inside the worker group, or here), under a local peer id that
collects its final message instead of sending it on a socket. The final message, signed by
this worker, is split into ``answer_cloves`` cloves (any ``k`` rebuild, the request's own k) and each kept answer
block carries one; blocks that arrive later (the client resending over fresh paths) get the
next cloves of the same split, from a bounded cache of recent answers.

A request whose envelopes carry chunk blocks is streamed (``docs/paths.md`` section 9): the
job runs with ``stream=True``, its pieces (a model's :class:`TokenChunk` messages, a
container's :class:`RunOutput`) go to a :class:`~permamesh.overlay.stream.StreamOut` and each
chunk, signed and split (any k rebuild), goes out as one clove over the next chunk block of
every path held; a path's first chunk clove also stands for its ack. When fewer than k paths
have a chunk block left the chunk waits for a *top-up* (an envelope flagged ``TOPUP``: more
chunk blocks for a path's lane, :mod:`~permamesh.overlay.topup`), which is taken only if its
tag verifies under the request's key, it is not a replay and it stays within
``InboxConfig.topup``; a refused one is logged with the reason and answered with nothing.
The final answer still goes over the answer blocks and holds the whole text or output.

A clove of a message already rebuilt must carry the fingerprint vector the message was
rebuilt from, and blocks that came with cloves before the rebuild are kept only if theirs
matches it: a relay that saw one clove cannot forge further ones (its own vector) to collect
chunk or answer cloves over blocks of its own (counted ``forged_clove``).

Each clove is taken once: a second clove with the same message id and index (a replayed
envelope, or a proxy that duplicates) is dropped and counted (``duplicate``), never acked nor
answered. At most ``max_cloves_per_message`` cloves of one message and ``max_held_cloves`` in
all are held (with their answer blocks); beyond, cloves are dropped and counted
(``overflow``, ``inbox_full``).

Nothing here learns who asked: the cloves came from proxies, and the answers go to the first
relays of reply blocks. Malformed envelopes or cloves are dropped and counted, never answered.

Who calls it: :class:`permamesh.workers.server.WorkerServer` calls :meth:`Inbox.on_clove` from
its event loop for each :class:`CloveDrop`, and :meth:`Inbox.close` when it stops. The inbox
calls back ``server.dispatch(peer, request)`` to run a job and ``server.add_sink`` to collect
its answer.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from typing import Callable, Mapping

from permamesh.containers.messages import RunOutput, RunRequest, RunResult
from permamesh.overlay.envelope import (
    ANSWERED, HELD, STARTED, Ack, Envelope, decode_envelope, encode_ack, encode_answer_item,
)
from permamesh.overlay.clove import Clove
from permamesh.overlay.errors import OverlayError
from permamesh.overlay.messages import RelayCell
from permamesh.overlay.reply import ReplyBlock, seal_reply
from permamesh.overlay.sida import Rebuilder, RebuilderConfig, split
from permamesh.overlay.stream import Lane, StreamConfig, StreamOut
from permamesh.overlay.topup import NEW_LANE, TOPUP_INDEX, TopUpGate, TopUpLimits, topup_key
from permamesh.transport import AsyncDealer
from permamesh.wire import ErrorReply, GenerateRequest, GenerateResult, Message, TokenChunk, WireError, decode, encode
from permamesh.workers.host import WorkerHost


log = logging.getLogger(__name__)

SINK_PREFIX = b"\x00overlay:"  # local peer ids of overlay jobs (zmq identities never start with 0)


@dataclasses.dataclass(frozen=True)
class InboxConfig:
    answer_cloves: int = 8  # cloves of each answer's split (blocks beyond use them in turn)
    ack_delay_s: float = 0.02  # an ack waits this long for an answer clove that makes it moot
    max_jobs: int = 1024  # overlay jobs remembered (running or answered), oldest dropped
    answer_ttl_s: float = 300.0  # answers kept this long for late or resent cloves
    rebuild_ttl_s: float = 60.0  # incomplete messages dropped after this long
    max_cloves_per_message: int = 32  # distinct cloves (and answer blocks) held per message id
    max_held_cloves: int = 16_384  # distinct cloves held for all messages (pending or answered)
    prune_every_s: float = 1.0  # how often message ids no longer held are forgotten
    stream: StreamConfig = StreamConfig()  # when a streamed answer's chunks leave
    topup: TopUpLimits = TopUpLimits()  # what one streamed job takes in top-ups


@dataclasses.dataclass
class _Job:
    created: float
    k: int  # cloves that rebuild the answer: as many as rebuilt the request
    blocks: list[ReplyBlock]  # answer blocks waiting for the answer
    vector: tuple[bytes, ...]  # the fingerprints of the cloves the request was rebuilt from
    gate: TopUpGate  # checks its top-ups (keyed by the request frame)
    cloves: list | None = None  # the answer's cloves once it is ready
    next_clove: int = 0
    stream: StreamOut | None = None  # a streamed job's chunks out (docs/paths.md 9)

    def stop_stream(self) -> None:
        if self.stream is not None:
            self.stream.stop()


class Inbox:
    def __init__(self, server: WorkerHost, relays: Callable[[], Mapping[bytes, str]],
                 config: InboxConfig = InboxConfig()) -> None:
        self.server, self.relays, self.config = server, relays, config
        self.rebuilder = Rebuilder(RebuilderConfig(ttl_s=config.rebuild_ttl_s))
        self.jobs: collections.OrderedDict[bytes, _Job] = collections.OrderedDict()
        # message id -> (clove's fingerprint vector, answer block / lane) of cloves before the rebuild
        self.waiting: dict[bytes, list[tuple[tuple[bytes, ...], ReplyBlock]]] = {}
        self.waiting_lanes: dict[bytes, list[tuple[tuple[bytes, ...], Lane]]] = {}
        self.dealers: dict[str, AsyncDealer] = {}
        self.pending_acks: dict[bytes, asyncio.TimerHandle] = {}  # answer block alpha -> its ack
        self.counts: collections.Counter[str] = collections.Counter()
        self.taken: dict[bytes, set[int]] = {}  # message id -> indexes of the cloves taken
        self.held = 0  # cloves in ``taken``, all messages
        self.next_prune = 0.0
        self.closed = False

    # ------------------------------------------------------------------ cloves in
    def on_clove(self, envelope: bytes) -> None:
        now = time.monotonic()
        self._expire(now)
        try:
            env = decode_envelope(envelope)
        except OverlayError as exc:
            self.counts["bad_envelope"] += 1
            log.debug("dropped an envelope: %s", exc)
            return
        if env.topup is not None:
            self._on_topup(env)
            return
        clove, mid = env.clove, env.clove.message_id
        if not clove.is_self_consistent():  # its content does not match its own fingerprint
            self.counts["bad_clove"] += 1
            return
        job = self.jobs.get(mid)
        if job is not None and clove.fingerprints != job.vector:
            self.counts["forged_clove"] += 1
            log.info("dropped a clove of request %s: not of the split the request was rebuilt from", mid.hex()[:8])
            return
        if not self._take(mid, clove.index):
            return
        self.counts["cloves"] += 1
        if job is not None:  # a late or resent clove of a known message
            status = ANSWERED if job.cloves is not None else STARTED
        else:
            try:
                message = self.rebuilder.add(clove, now)
            except OverlayError as exc:
                self.counts["bad_clove"] += 1
                log.debug("dropped a clove: %s", exc)
                return
            status = HELD if message is None else STARTED
        if env.ack_block is not None and not (status == ANSWERED and env.answer_block is not None):
            self._ack(env, status)
        lane = Lane(env.answer_block.header[:32], list(env.chunk_blocks)) if env.chunk_blocks else None
        if job is None:
            if env.answer_block is not None:
                self.waiting.setdefault(mid, []).append((clove.fingerprints, env.answer_block))
            if lane is not None:
                self.waiting_lanes.setdefault(mid, []).append((clove.fingerprints, lane))
            if status == HELD:
                return
            job = self._start(mid, message, now, clove)
            if job is None:
                return
            self._flush(job)
            return
        if lane is not None and job.stream is not None:
            job.stream.add_lane(lane)  # a late path: spares of recent chunks, then later chunks
        if env.answer_block is not None:
            job.blocks.append(env.answer_block)
        self._flush(job)

    def _take(self, mid: bytes, index: int) -> bool:
        """Whether clove ``index`` of ``mid`` is new and there is room to hold it (counted if not)."""
        taken = self.taken.get(mid)
        if taken is not None and index in taken:
            self.counts["duplicate"] += 1
            return False
        if taken is not None and len(taken) >= self.config.max_cloves_per_message:
            self.counts["overflow"] += 1
            return False
        if self.held >= self.config.max_held_cloves:
            self.counts["inbox_full"] += 1
            return False
        if taken is None:
            taken = self.taken[mid] = set()
        taken.add(index)
        self.held += 1
        return True

    def _forget(self, mid: bytes) -> None:
        self.waiting.pop(mid, None)
        self.waiting_lanes.pop(mid, None)
        self.held -= len(self.taken.pop(mid, ()))

    def _ack(self, env: Envelope, status: int) -> None:
        """Acknowledge ``env``'s clove now, or after ``ack_delay_s`` unless its answer block
        carries an answer clove by then."""
        delay = self.config.ack_delay_s
        if delay <= 0 or env.answer_block is None:
            self._seal(env.ack_block, encode_ack(Ack(env.clove.message_id, env.clove.index, status)))
            return
        key = env.answer_block.header[:32]  # the block's alpha: fresh per block
        old = self.pending_acks.pop(key, None)
        if old is not None:  # the same block twice: a replayed envelope; keep the newer ack
            old.cancel()
        self.pending_acks[key] = asyncio.get_running_loop().call_later(delay, self._late_ack, key, env)

    def _late_ack(self, key: bytes, env: Envelope) -> None:
        self.pending_acks.pop(key, None)
        mid = env.clove.message_id
        job = self.jobs.get(mid)
        status = HELD if job is None else ANSWERED if job.cloves is not None else STARTED
        self._seal(env.ack_block, encode_ack(Ack(mid, env.clove.index, status)))

    def _start(self, mid: bytes, frame: bytes, now: float, last: Clove) -> _Job | None:
        """``last``: the clove that completed ``frame`` (its vector is the request's)."""
        vector = last.fingerprints
        lanes = [lane for fps, lane in self.waiting_lanes.pop(mid, []) if fps == vector]
        blocks = [block for fps, block in self.waiting.pop(mid, []) if fps == vector]
        try:
            received = decode(frame)
        except WireError as exc:
            self.counts["bad_request"] += 1
            log.info("a rebuilt overlay message is not a valid frame: %s", exc)
            return None
        req = received.msg
        if not isinstance(req, (GenerateRequest, RunRequest)):
            self.counts["bad_request"] += 1
            log.info("a rebuilt overlay message is a %s, not a request", req.TAG)
            return None
        req = dataclasses.replace(req, stream=bool(lanes))  # a model's tokens or a container's output
        job = _Job(now, last.k, blocks, vector, TopUpGate(topup_key(frame), self.config.topup))
        if lanes:
            job.stream = StreamOut(mid, req.request_id, last.k, lanes, lambda chunk: encode(chunk, self.server.identity),
                                   self._seal_chunk, self.counts, self.config.stream)
        self.jobs[mid] = job
        while len(self.jobs) > self.config.max_jobs:
            old, old_job = self.jobs.popitem(last=False)
            old_job.stop_stream()
            self._forget(old)
        peer = SINK_PREFIX + mid
        self.server.add_sink(peer, lambda msg: self._on_answer(mid, peer, msg))
        self.counts["requests"] += 1
        reply = self.server.dispatch(peer, req)
        if reply is not None:
            self._on_answer(mid, peer, reply)
        return job

    # ------------------------------------------------------------------ answers out
    def _on_topup(self, env: Envelope) -> None:
        """More chunk blocks for a streamed job (docs/paths.md 9.9): checked, then appended to
        the lane it names (or a new lane); acknowledged at once. Refused: logged, unanswered."""
        topup, blocks = env.topup, list(env.chunk_blocks)
        job = self.jobs.get(topup.message_id)
        stream = job.stream if job is not None and job.stream is not None and job.stream.active else None
        answered = job is not None and job.cloves is not None
        if job is None:
            reason = "its request is not held here (unknown, or forgotten)"
        else:
            reason = job.gate.check(topup, blocks, stream.unused if stream is not None else 0)
        if reason is None and not answered and stream is None:
            reason = "its request is not streamed"
        if reason is None and not answered and topup.lane != NEW_LANE and not stream.has_lane(topup.lane):
            reason = "it names no lane of the stream"
        if reason is not None:
            self.counts["topup_refused"] += 1
            log.info("refused top-up %d of request %s: %s", topup.number, topup.message_id.hex()[:8], reason)
            return
        job.gate.take(topup, blocks)
        self.counts["topups"] += 1
        self._seal(env.ack_block, encode_ack(Ack(topup.message_id, TOPUP_INDEX, ANSWERED if answered else STARTED)))
        if answered:  # the answer is ready: this path, known alive, brings a clove of it
            job.blocks.append(env.answer_block)
            self._flush(job)
        elif topup.lane == NEW_LANE:
            stream.add_lane(Lane(env.answer_block.header[:32], blocks), repair=False)
        else:
            stream.extend_lane(topup.lane, blocks)

    def _on_answer(self, mid: bytes, peer: bytes, msg: Message) -> None:
        if isinstance(msg, (TokenChunk, RunOutput)):
            job = self.jobs.get(mid)
            if job is not None and job.stream is not None:
                job.stream.on_tokens(msg, time.monotonic())
            return
        if not isinstance(msg, (GenerateResult, RunResult, ErrorReply)):
            return  # Accepted, Progress: the client learns progress from acks
        self.server.remove_sink(peer)
        job = self.jobs.get(mid)
        if job is None:
            return
        job.stop_stream()  # the answer holds the whole text
        frame = encode(msg, self.server.identity)
        job.cloves = split(frame, n=max(self.config.answer_cloves, job.k), k=job.k, message_id=mid)
        self.counts["answers"] += 1
        self._flush(job)

    def _seal_chunk(self, ack_key: bytes, block: ReplyBlock, item: bytes) -> None:
        pending = self.pending_acks.pop(ack_key, None)
        if pending is not None:  # a chunk clove proves its path as well as an ack
            pending.cancel()
            self.counts["acks_saved"] += 1
        self._seal(block, item)

    def _flush(self, job: _Job) -> None:
        if job.cloves is None:
            return
        while job.blocks:
            block = job.blocks.pop(0)
            pending = self.pending_acks.pop(block.header[:32], None)
            if pending is not None:  # the answer clove acknowledges this path
                pending.cancel()
                self.counts["acks_saved"] += 1
            clove = job.cloves[job.next_clove % len(job.cloves)]
            job.next_clove += 1
            self._seal(block, encode_answer_item(clove))

    def _seal(self, block: ReplyBlock, item: bytes) -> None:
        if self.closed:  # stopping: the sockets are gone; the client resends elsewhere
            self.counts["dropped_closing"] += 1
            return
        endpoint = self.relays().get(block.first_hop)
        if endpoint is None:
            self.counts["unknown_first_hop"] += 1
            log.info("no relay %s for a reply", block.first_hop.decode("ascii", "replace"))
            return
        try:
            _, cell = seal_reply(block, item)
        except OverlayError as exc:
            self.counts["seal_failed"] += 1
            log.info("cannot seal a reply: %s", exc)
            return
        dealer = self.dealers.get(endpoint)
        if dealer is None:
            dealer = self.dealers[endpoint] = AsyncDealer(endpoint)
        asyncio.ensure_future(dealer.send(encode(RelayCell(cell), self.server.identity)))
        self.counts["replies"] += 1

    def _expire(self, now: float) -> None:
        self.rebuilder.expire(now)
        while self.jobs:
            mid, job = next(iter(self.jobs.items()))
            if now - job.created <= self.config.answer_ttl_s:
                break
            self.jobs.popitem(last=False)
            job.stop_stream()
            self.server.remove_sink(SINK_PREFIX + mid)
            self._forget(mid)
        if now >= self.next_prune:
            self.next_prune = now + self.config.prune_every_s
            for mid in [m for m in self.taken if m not in self.jobs and m not in self.rebuilder]:
                self._forget(mid)  # a message the rebuilder gave up on (or evicted)

    def close(self) -> None:
        self.closed = True
        for job in self.jobs.values():
            job.stop_stream()
        for pending in self.pending_acks.values():
            pending.cancel()
        self.pending_acks.clear()
        for dealer in self.dealers.values():
            dealer.close()
        self.dealers.clear()

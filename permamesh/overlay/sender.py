"""The client's end of the overlay: send a request as S-IDA cloves over onion paths, get the
answer back as cloves over reply blocks, and resend over fresh paths when paths fail.

One request (:meth:`OverlayClient.generate`):

1. The request is a signed :class:`GenerateRequest` frame (signed with this client's session
   key, never a long-term one), split once into ``max_cloves`` cloves of which any ``k`` rebuild.
2. ``n`` cloves leave at once, each over its own path of the session's path set
   (:class:`SessionPaths` over a :class:`PathSelector`: disjoint, diverse, weighted, kept for
   ``max_uses`` requests or ``max_age_s``; ``keep_paths=False`` draws a fresh set per request);
   each clove carries an ack block and an answer block over the reverse of its path, so a
   path works both ways or not at all.
3. A path whose ack does not come within ``ack_timeout_s`` is failed: its relays are avoided
   for this request and, as suspects, by the session's set (the path is replaced there), and
   the next unused clove goes over a fresh path (at most ``resends`` rounds deep, at most
   ``max_cloves`` cloves in all). That is the rule of ``docs/paths.md``.
4. The answer comes back as cloves (any ``k`` rebuild), signed by the entry worker, whose key
   is pinned from the registry; before it, a generation job's text streams back in chunks
   over each path's chunk blocks (``stream_blocks`` per path, topped up for long answers),
   released in order to ``on_text`` (:mod:`~permamesh.overlay.stream`, ``reassembly`` and
   ``topup``); a container job's output likewise to ``on_output``. If some answer cloves came but fewer than ``k`` within
   ``answer_grace_s``, another clove goes out over a fresh path, and the worker answers it from
   its cache. A clove's ack may be left out when its path carries an answer clove soon enough:
   an answer clove proves its path works just as well.
5. Paths a request stopped waiting for (it returned at k answer cloves) are judged before the
   next request (:mod:`~permamesh.overlay.late`): one still unheard from after
   ``ack_timeout_s`` is replaced in its session's set like a path that timed out.
6. A request either returns its :class:`GenerateResult` or raises :class:`OverlayError` saying
   what failed (never hangs past ``answer_timeout_s``).

Between requests a background thread does the public-key work of the next request's paths (``prepare``, see :mod:`~permamesh.overlay.prepared`), so a request only seals its
cloves; resends and requests that find no set ready build their own kits.

The client talks only to the first relays of its paths (its guards), over one connection each
on which it has attached its ``client_id`` for deliveries.

Who calls it: ``permamesh submit --overlay``, the demo, and the overlay benchmark.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Sequence

from permamesh.identity import NodeIdentity
from permamesh.directory.workers import WorkerRecord
from permamesh.directory.relays import RelayRecord
from permamesh.overlay.errors import OverlayError
from permamesh.overlay.inflight import Delivery, InFlight, OverlayConfig  # OverlayConfig re-exported
from permamesh.overlay.late import LateEvidence
from permamesh.overlay.messages import RelayAttach, RelayDelivery
from permamesh.overlay.paths import PathPolicy, PathSelector
from permamesh.overlay.prepared import KitPreparer
from permamesh.overlay.relay import current_epoch
from permamesh.overlay.sessions import SessionPaths
from permamesh.transport import DealerClient
from permamesh.wire import (ChatMessage, ErrorReply, GenerateRequest, GenerateResult, Message, TokenChunk, WireError,
                            decode, encode)

log = logging.getLogger(__name__)


class OverlayClient:
    def __init__(self, relays: Sequence[RelayRecord], workers: Sequence[WorkerRecord],
                 config: OverlayConfig = OverlayConfig(), rng: random.Random | None = None) -> None:
        if not workers:
            raise OverlayError("no entry worker: start a worker first")
        self.config, self.workers = config, list(workers)
        self.relays = {r.node_id.encode("ascii"): r for r in relays}
        self.rng = rng or random.Random()
        self.selector = PathSelector([r.descriptor() for r in relays], PathPolicy(hops=config.hops, n_paths=config.n),
                                     random.Random(self.rng.getrandbits(64)))
        self.session = NodeIdentity.generate()  # signs requests; unlinkable to any long-term key
        self.client_id = os.urandom(16)
        self.guards: dict[str, DealerClient] = {}
        self.last: Delivery | None = None
        self.sessions = SessionPaths(self.selector)
        self._select_lock = threading.Lock()  # selector and sessions are shared with the preparer thread
        self._next_session = ""  # the session the preparer prepares for: the last one used
        self.preparer = (KitPreparer(self._draw_next, self.client_id, self.epoch, config.stream_blocks)
                         if config.prepare and config.keep_paths else None)
        self.late = LateEvidence(config.ack_timeout_s, self.path_failed)  # paths a request stopped waiting for

    def epoch(self) -> int:
        return current_epoch(self.config.epoch_s)

    def select(self, count: int, exclude: set[bytes], session: str | None = None) -> list[tuple[RelayRecord, ...]]:
        """``count`` fresh paths avoiding ``exclude`` and ``session``'s suspects (raises
        OverlayError when the rules cannot be met)."""
        with self._select_lock:
            if session is not None:
                exclude = exclude | self.sessions.suspects(session)
            drawn = self.selector.select(count, exclude=exclude)
        return [self._records(descriptors) for descriptors in drawn]

    def path_set(self, session: str) -> list[tuple[RelayRecord, ...]]:
        """The paths of ``session``'s next request (one use of its set)."""
        if not self.config.keep_paths:
            return self.select(self.config.n, set())
        with self._select_lock:
            self._next_session = session
            return [self._records(p) for p in self.sessions.paths_for(session)]

    def path_failed(self, session: str, relays: tuple[RelayRecord, ...]) -> None:
        """A path of ``session`` timed out: its set replaces it and suspects its relays."""
        if self.config.keep_paths:
            with self._select_lock:
                self.sessions.path_failed(session, {r.node_id_bytes for r in relays})

    def _records(self, descriptors) -> tuple[RelayRecord, ...]:
        return tuple(self.relays[d.node_id] for d in descriptors)

    def _draw_next(self) -> list[list]:
        with self._select_lock:
            paths = self.sessions.peek(self._next_session)
        return [[self.relays[d.node_id].hop() for d in path] for path in paths]

    def wait_prepared(self, timeout_s: float = 5.0) -> bool:
        """Block until the next request's path kits are ready; False without preparation."""
        return self.preparer is not None and self.preparer.wait_ready(timeout_s)

    def close(self) -> None:
        if self.preparer is not None:
            self.preparer.close()
        for guard in self.guards.values():
            guard.close()
        self.guards.clear()

    def __enter__(self) -> OverlayClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ one request
    def generate(self, prompt: str | None = None, *, messages: Sequence[dict | ChatMessage] = (),
                 max_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 stop: Sequence[str] = (), logprobs: bool = False, top_logprobs: int = 0,
                 presence_penalty: float = 0.0, frequency_penalty: float = 0.0, grammar_kind: str = "",
                 grammar: str = "", model: str = "", session: str = "", entry: str | None = None,
                 on_text: Callable[[str], None] | None = None,
                 on_chunk: Callable[[TokenChunk], None] | None = None) -> GenerateResult:
        """Run one generation job; every field travels in the request, so the entry worker
        runs it exactly as a direct one (penalties, top log-probs, a grammar the answer is
        decoded under: ``docs/gateway.md``). ``on_text`` gets the answer's text in order, chunk
        by chunk as it is generated (``docs/paths.md`` section 9), the last piece once the
        signed result is checked, so the pieces always join to ``result.text``; ``on_chunk``
        gets each chunk whole (its tokens' log-probabilities with it), not that last piece."""
        req = GenerateRequest(os.urandom(16).hex(), prompt=prompt,
                              messages=tuple(m if isinstance(m, ChatMessage) else ChatMessage(m["role"], m["content"])
                                             for m in messages),
                              max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                              stop=tuple(stop), logprobs=logprobs, top_logprobs=top_logprobs,
                              presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                              grammar_kind=grammar_kind, grammar=grammar, model=model, session=session)
        req = dataclasses.replace(req, logprobs=True)  # always (checked as asked above): see submit()
        result = self.submit(req, entry, on_text=on_text, on_chunk=on_chunk)
        # the caller gets the log-probs only if it asked for them
        return result if logprobs else dataclasses.replace(result, logprobs=(), tokens=())

    def submit(self, req: Message, entry: str | None = None,
               results: tuple[type[Message], ...] = (GenerateResult, ErrorReply),
               on_text: Callable[[str], None] | None = None,
               on_output: Callable[[bytes, bytes], None] | None = None,
               on_chunk: Callable[[TokenChunk], None] | None = None) -> Message:
        """Send a ready request (validators send their challenges this way) and return the
        entry worker's answer as it came: one of ``results`` (a container job's
        :class:`~permamesh.containers.messages.RunRequest` expects its ``RunResult``; its
        stdout and stderr stream to ``on_output(stdout, stderr)`` as the job writes them,
        the pieces joining to the result's output; a model's chunks go whole to ``on_chunk``). Every
        generation request should ask for log-probs, so the committee's challenges, which need
        them, look like any other request. Every request carries ``stream_blocks`` chunk blocks
        per path whether or not ``on_text`` is given, so streamed and unstreamed jobs (and
        challenges) look alike to the entry worker and the relays."""
        worker = self._entry(entry)
        self.settle_paths()
        try:
            return InFlight(self, worker, req, getattr(req, "session", ""), results, on_text, on_output,
                            on_chunk).run()
        finally:
            if self.preparer is not None:
                self.preparer.refill()

    def settle_paths(self) -> None:
        """Read what came back for earlier requests since they returned, then judge their
        unheard paths (a dead one is replaced in its session's set). Runs before each request;
        call it when idle to judge sooner."""
        if not len(self.late):
            return
        for guard in list(self.guards.values()):
            while (frame := guard.recv(0)) is not None:
                try:
                    msg = decode(frame).msg
                except WireError:
                    continue
                if isinstance(msg, RelayDelivery):
                    self.late.offer(msg)
        self.late.settle(time.monotonic())

    def _entry(self, entry: str | None) -> WorkerRecord:
        if entry is None:
            return self.rng.choice(self.workers)
        for w in self.workers:
            if w.node_id == entry:
                return w
        raise OverlayError(f"no worker {entry} in the registry")

    def guard(self, relay: RelayRecord) -> DealerClient:
        guard = self.guards.get(relay.endpoint)
        if guard is None:
            guard = self.guards[relay.endpoint] = DealerClient(relay.endpoint)
            guard.send(encode(RelayAttach(self.client_id), self.session))
        return guard

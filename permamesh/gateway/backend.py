"""The gateway's way into the mesh: generation jobs through the anonymous overlay (or direct).

:class:`MeshBackend` is blocking (the server calls it from worker threads). For each job it
finds the workers serving the requested model in the committee's directory, picks one as the entry
worker, and sends the job like any client would:

- ``via="overlay"`` (the default): S-IDA cloves over onion paths through an
  :class:`~permamesh.overlay.sender.OverlayClient`; the answer streams back in chunks over
  reply blocks (``docs/paths.md`` section 9), each handed to ``on_chunk`` (its text and its
  tokens' log-probabilities: SSE deltas) as soon as the overlay rebuilds it;
- ``via="direct"``: straight to a worker with :class:`permamesh.Client`, whose token chunks
  go to ``on_chunk`` as the worker produces them (not anonymous: the worker sees the
  gateway's address).

Either way what the chunks did not carry (the overlay's last piece) is in the result, which
the caller has.

Overlay clients are pooled (one per concurrent job, each with its own session paths) and
rebuilt when the directory's relays or workers change.

Who calls it: :mod:`permamesh.gateway.server`.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from permamesh.gateway.errors import ApiError
from permamesh.wire import GenerateRequest, GenerateResult, TokenChunk

log = logging.getLogger(__name__)

REFRESH_S = 30.0  # a pooled overlay client older than this is rebuilt from the directory
REGISTRY_S = 1.0  # the directory's workers are re-read at most this often


class MeshBackend:
    def __init__(self, data_dir: Path, via: str = "overlay", timeout_s: float = 300.0, rng: random.Random | None = None,
                 directory=None) -> None:
        """``directory``: a started :class:`~permamesh.directory.committee.CommitteeDirectory`
        (``permamesh gateway --join``): workers and relays come from the committee's directory."""
        if via not in ("overlay", "direct"):
            raise ValueError(f"via must be overlay or direct, not {via!r}")
        self.data_dir, self.via, self.timeout_s = Path(data_dir), via, timeout_s
        self.directory = directory
        self.rng = rng or random.Random()
        self._lock = threading.Lock()
        self._idle: list[tuple[float, object]] = []  # (built at, OverlayClient)
        self._closed = False
        self._registry: tuple[float, list] | None = None  # (read at, workers)

    # ------------------------------------------------------------------ what is served
    def models(self) -> list[str]:
        return sorted({w.model for w in self._workers()})

    def check_model(self, model: str) -> None:
        """ApiError 404 unless some registered worker serves ``model``."""
        self._entries(model)

    def _workers(self) -> list:
        """The registry's workers, read at most once per ``REGISTRY_S`` (every job asks)."""
        now = time.monotonic()
        with self._lock:
            if self._registry is None or now - self._registry[0] > REGISTRY_S:
                found = self.directory.workers() if self.directory is not None else []
                self._registry = (now, found)
            return self._registry[1]

    def _entries(self, model: str) -> list:
        workers = [w for w in self._workers() if w.model == model]
        if not workers:
            served = ", ".join(self.models()) or "none"
            raise ApiError(404, f"the model '{model}' is not served by this mesh (served: {served})",
                           param="model", code="model_not_found")
        return workers

    # ------------------------------------------------------------------ jobs
    def generate(self, model: str, fields: dict,
                 on_chunk: Callable[[TokenChunk], None] | None = None) -> GenerateResult:
        """Run one job to its result; ``on_chunk`` gets the answer's chunks as they come."""
        entries = self._entries(model)
        if self.via == "direct":
            return self._direct(entries, model, fields, on_chunk)
        req = GenerateRequest(uuid.uuid4().hex, model=model, **{**fields, "logprobs": True})
        entry = self.rng.choice(entries).node_id
        client = self._take()
        ok = False
        try:
            result = client.submit(req, entry, on_chunk=on_chunk)  # chunks as the overlay rebuilds them
            ok = True
        except Exception as exc:  # OverlayError: not delivered, or the worker refused
            raise _mesh_error(exc) from None
        finally:
            self._give(client, ok)
        if not fields.get("logprobs"):  # asked of the worker for verification's samples, not by the client
            result = dataclasses.replace(result, logprobs=(), tokens=())
        return result

    def _direct(self, entries: list, model: str, fields: dict, on_chunk) -> GenerateResult:
        from permamesh.client.blocking import Client, ClientError

        endpoints = [w.endpoint for w in entries]
        self.rng.shuffle(endpoints)
        params = {k: v for k, v in fields.items() if k not in ("prompt", "messages")}
        try:
            with Client(endpoints, timeout_s=self.timeout_s) as client:
                for msg in client.events(fields.get("prompt"), messages=fields.get("messages", ()), model=model,
                                         stream=on_chunk is not None, **params):
                    if isinstance(msg, TokenChunk) and on_chunk is not None:
                        on_chunk(msg)
                    elif isinstance(msg, GenerateResult):
                        return msg
        except ClientError as exc:
            raise _mesh_error(exc) from None
        raise ApiError(502, "the worker ended the job without a result", code="mesh_error")

    # ------------------------------------------------------------------ the overlay client pool
    def _take(self):
        from permamesh.overlay.sender import OverlayClient, OverlayConfig

        now = time.monotonic()
        with self._lock:
            while self._idle:
                built, client = self._idle.pop()
                if now - built < REFRESH_S:
                    return client
                client.close()
        relays = self.directory.relays() if self.directory is not None else []
        config = OverlayConfig(answer_timeout_s=self.timeout_s)
        if len(relays) < config.n * config.hops:
            raise ApiError(503, f"the overlay needs {config.n * config.hops} relays and the directory has "
                                f"{len(relays)}; start relays (`permamesh relay`) or run the gateway with --direct",
                           code="mesh_unavailable")
        client = OverlayClient(relays, self._workers(), config, random.Random(self.rng.getrandbits(64)))
        client.built_at = now
        return client

    def _give(self, client, ok: bool) -> None:
        with self._lock:
            if ok and not self._closed:
                self._idle.append((client.built_at, client))
                return
        client.close()  # a failed client's paths may be bad: build a fresh one next time

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for _, client in idle:
            client.close()
        if self.directory is not None:
            self.directory.close()


def _mesh_error(exc: Exception) -> ApiError:
    text = str(exc)
    if "context_length_exceeded" in text:
        return ApiError(400, f"the prompt is longer than the model's context: {text}", code="context_length_exceeded",
                        param="messages")
    for code, status in (("queue_full", 503), ("shutting_down", 503), ("model_mismatch", 404),
                         ("bad_request", 400)):
        if code in text:
            return ApiError(status, f"the mesh refused the job: {text}", code=code)
    if "within" in text or "no answer" in text or "lost" in text:
        return ApiError(504, f"the mesh did not answer in time: {text}", code="timeout")
    return ApiError(502, f"the mesh could not run the job: {text}", code="mesh_error")

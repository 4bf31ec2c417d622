"""``permamesh gateway``: the OpenAI-compatible HTTP API in front of the mesh, plus the
dashboard, health checks and metrics. Built on aiohttp (docs/dependencies.md says why).

Routes:

- ``GET /v1/models`` and ``GET /v1/models/{id}``; ``POST /v1/chat/completions`` and
  ``POST /v1/completions``, streamed by server-sent events (``"stream": true``) or not, with
  usage counts, ``n`` choices (one job each) and log-probabilities; errors in the OpenAI
  shape ``{"error": {"message", "type", "param", "code"}}`` and the matching HTTP status
  (any other path: 404 ``Invalid URL``, naming what is served); a quota 429 carries
  ``x-should-retry: false`` (the official clients would otherwise retry it);
- ``GET /dashboard`` (the page) and ``GET /api/mesh`` (what it shows, as JSON);
- ``GET /api/health`` (the health checks of every node) and ``GET /healthz`` (the gateway's own);
- ``GET /metrics``: Prometheus text (requests by route and status, latency, time to first
  token, tokens, refusals); the route label is the matched route's pattern (or ``unmatched``),
  never the raw path, so made-up paths cannot grow the series;
- ``GET /api/presence?challenge=HEX`` (a gateway with a descriptor): its key's signature over
  the challenge, what committee members' probes check (:mod:`permamesh.directory.presence`).

Every job enters the mesh through :class:`~permamesh.gateway.backend.MeshBackend` from a
thread pool, so the event loop only parses, checks and writes. Each request is authorized
by its API key (:class:`~permamesh.gateway.accounts.KeyRing`) and admitted and paid by that
key's committee credit (:class:`~permamesh.gateway.accounts.Credit`).

Bad input is the client's problem, never a 500: a body that is not JSON, not valid Unicode
(lone surrogates) or not decodable under its ``Content-Encoding`` is a 400 (and a body that
could not be read closes the connection). A streaming client that goes away mid-answer is
logged at INFO; its job still ends in its thread and is settled (counted and paid), since the
worker did the work.

Who calls it: :mod:`permamesh.gateway.process` (the process) and tests (:class:`GatewayThread`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from prometheus_client import Counter, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from permamesh.directory.presence import PresenceError, parse_challenge, presence_answer
from permamesh.gateway import openai_api as oa
from permamesh.gateway import responses as rs
from permamesh.gateway import streaming
from permamesh.gateway.accounts import Credit, KeyRing
from permamesh.gateway.backend import MeshBackend
from permamesh.gateway.errors import ApiError, GatewayError
from permamesh.gateway.traffic import TrafficMeter
from permamesh.identity import NodeIdentity
from permamesh.ops.metrics import histogram, new_registry
from permamesh.transport import ServingThread

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20
_CLOSE = web.RequestKey("close_connection", bool)  # set on a request whose body could not be read to its end
STATIC = Path(__file__).with_name("static")
VIEW_CACHE_S = 1.0  # seconds a health, mesh or models view is reused (metrics are never reused)


@dataclass(frozen=True)
class GatewayConfig:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 0  # 0 = any free port
    threads: int = 16  # jobs in flight at once (each waits on the mesh in a thread)
    identity: NodeIdentity | None = None  # the key of its directory descriptor (None: an unlisted gateway)


class Gateway:
    def __init__(self, config: GatewayConfig, backend: MeshBackend, keys: KeyRing, credit: Credit,
                 mesh_view: Callable[[], dict] | None = None, health: Callable[[], dict] | None = None) -> None:
        self.config, self.backend, self.keys, self.credit = config, backend, keys, credit
        self.mesh_view, self.health = mesh_view, health
        self.endpoint: str | None = None
        self.pool = concurrent.futures.ThreadPoolExecutor(config.threads, thread_name_prefix="gateway")
        # the read-only views (health, mesh, metrics) never wait in, or take from, the jobs' pool;
        # concurrent asks for one view share one computation, kept for VIEW_CACHE_S
        self.views = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="gateway-views")
        self._view_cache: dict[str, tuple[float, object]] = {}
        self._view_running: dict[str, asyncio.Future] = {}
        self.registry = new_registry()
        self.requests = Counter("permamesh_gateway_requests", "HTTP requests by route and status", ("route", "status"),
                                registry=self.registry)
        self.tokens = Counter("permamesh_gateway_tokens", "Tokens of answered jobs", ("kind",), registry=self.registry)
        self.latency = histogram(self.registry, "permamesh_gateway_request_latency_seconds",
                                 "Seconds from a request's arrival to its last byte", ("route",))
        self.ttft = histogram(self.registry, "permamesh_gateway_ttft_seconds",
                              "Seconds from a job's arrival to its first answer text (streamed jobs)", ())
        self.traffic = TrafficMeter(self.registry)
        self.app = self._app()

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._errors])
        app.add_routes([
            web.get("/v1/models", self.models),
            web.get("/v1/models/{model}", self.model),
            web.post("/v1/chat/completions", self.chat),
            web.post("/v1/completions", self.completions),
            web.get("/metrics", self.metrics),
            web.get("/healthz", self.healthz),
            web.get("/api/mesh", self.api_mesh),
            web.get("/api/health", self.api_health),
            web.get("/api/presence", self.api_presence),
            web.get("/dashboard", self.dashboard),
            web.get("/", self.root),
            web.route("*", "/v1/{rest:.*}", self.unknown_endpoint),
        ])
        return app

    # ------------------------------------------------------------------ plumbing
    @web.middleware
    async def _errors(self, request: web.Request, handler) -> web.StreamResponse:
        started, route = time.monotonic(), _route(request)
        try:
            response = await handler(request)
        except ApiError as exc:
            response = web.json_response(exc.body(), status=exc.status, headers=_error_headers(exc))
        except web.HTTPException as exc:  # 404, 405, 413 from aiohttp itself: the same shape
            if exc.status < 400:
                raise
            response = web.json_response(ApiError(exc.status, exc.reason).body(), status=exc.status)
        except Exception as exc:  # noqa: BLE001 - a bug answers 500, the gateway keeps serving
            log.exception("request %s %s failed", request.method, request.path)
            response = web.json_response(ApiError(500, f"internal error: {type(exc).__name__}").body(), status=500)
        if request.get(_CLOSE):
            response.force_close()  # the rest of a broken body must not be read as the next request
        self.requests.labels(route, str(response.status)).inc()
        self.latency.labels(route).observe(time.monotonic() - started)
        return response

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def _view(self, name: str, fn, keep_s: float = VIEW_CACHE_S):
        """``fn()`` on the views' own threads; callers within ``keep_s`` of a result, or while
        one is being computed, share it (a flood costs one computation per period)."""
        cached = self._view_cache.get(name)
        if cached is not None and time.monotonic() - cached[0] < keep_s:
            return cached[1]
        running = self._view_running.get(name)
        if running is None:
            running = asyncio.get_running_loop().run_in_executor(self.views, fn)
            self._view_running[name] = running
            try:
                value = await running
                self._view_cache[name] = (time.monotonic(), value)
                return value
            finally:
                self._view_running.pop(name, None)
        return await asyncio.shield(running)

    async def _body(self, request: web.Request):
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise ApiError(413, f"the request body exceeds {MAX_BODY_BYTES} bytes") from None
        except web.RequestPayloadError as exc:  # e.g. "Content-Encoding: gzip" over bytes that are not
            request[_CLOSE] = True
            request.content.feed_eof()  # nothing more to read: aiohttp must not drain it again
            encoding = request.headers.get("Content-Encoding", "")
            raise ApiError(400, f"the request body could not be read (Content-Encoding {encoding[:32]!r}): "
                                f"{str(exc).strip()[:200]}") from None
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested too deeply
            raise ApiError(400, "the request body is not valid JSON") from None

    # ------------------------------------------------------------------ the OpenAI API
    async def models(self, request: web.Request) -> web.Response:
        self.keys.authorize(request.headers.get("Authorization"))
        names = await self._run(self.backend.models)
        return web.json_response({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "permamesh"} for name in names]})

    async def model(self, request: web.Request) -> web.Response:
        self.keys.authorize(request.headers.get("Authorization"))
        name = request.match_info["model"]
        if name not in await self._run(self.backend.models):
            await self._run(self.backend.check_model, name)  # the 404 naming what is served
        return web.json_response({"id": name, "object": "model", "created": 0, "owned_by": "permamesh"})

    async def unknown_endpoint(self, request: web.Request) -> web.Response:
        raise ApiError(404, f"Invalid URL ({request.method} {request.path[:200]}): this gateway serves GET /v1/models, "
                            "GET /v1/models/{id}, POST /v1/chat/completions and POST /v1/completions",
                       code="unknown_url", type="invalid_request_error")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, oa.parse_chat, "chatcmpl", rs.chat_response, streaming.chat_chunks)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, oa.parse_completion, "cmpl", rs.completion_response,
                                    streaming.completion_chunks)

    async def _generate(self, request: web.Request, parse, prefix: str, shape, chunks) -> web.StreamResponse:
        caller = self.keys.authorize(request.headers.get("Authorization"))
        parsed = parse(await self._body(request))
        fields = parsed.fields
        text = fields.get("prompt") or "".join(m.content for m in fields.get("messages", ()))
        rid, created = rs.new_id(prefix), int(time.time())
        if not parsed.stream and parsed.n == 1:  # one thread hop for the whole job: check, admit, run, pay
            results = [await self._run(self._admitted_job, caller, parsed.model, text, fields)]
        elif not parsed.stream:  # admit every choice together, then one thread hop per choice: run, pay
            reserved = await self._run(self._admit, caller, parsed.model, text, fields["max_tokens"], parsed.n)
            results = await asyncio.gather(*(self._run(self._whole_job, caller, parsed.model, reserved[i],
                                                       oa.choice_fields(parsed, i)) for i in range(parsed.n)))
        if not parsed.stream:
            body = shape(results, parsed.model, rid, created)
            if parsed.functions:
                body = rs.chat_response(results, parsed.model, rid, created, parsed.functions)
            if parsed.echo:
                body = rs.completion_response(results, parsed.model, rid, created, parsed.echo)
            return web.json_response(body)
        reserved = await self._run(self._admit, caller, parsed.model, text, fields["max_tokens"], parsed.n)
        return await streaming.stream(self, request, caller, reserved, parsed, rid, created, chunks)

    def _admit(self, caller, model: str, text: str, max_tokens: int, n: int = 1) -> list[int]:
        """404 unless the model is served, then the key's credit check for all ``n`` jobs at
        once; each job's share of the reservation (a pool thread)."""
        self.backend.check_model(model)
        total = self.credit.admit(caller, text, max_tokens, n)
        return [total // n + (i < total % n) for i in range(n)]

    def _admitted_job(self, caller, model: str, text: str, fields: dict):
        return self._whole_job(caller, model, self._admit(caller, model, text, fields["max_tokens"])[0], fields)

    def _whole_job(self, caller, model: str, reserved: int, fields: dict):
        result = self.backend.generate(model, fields)
        self._settle(caller, reserved, result)
        return result

    def _settle(self, caller, reserved: int, result) -> None:
        """Count the tokens and pay the worker (a pool thread)."""
        self.tokens.labels("prompt").inc(result.prompt_tokens)
        self.tokens.labels("cached").inc(result.cached_tokens)
        self.tokens.labels("completion").inc(result.completion_tokens)
        try:
            self.credit.settle(caller, reserved, result.worker_id, result.prompt_tokens, result.completion_tokens,
                               result.cached_tokens)
        except Exception:  # noqa: BLE001 - the answer is the caller's either way; the receipt is logged
            log.exception("settling a job of %s failed", caller.name)

    # ------------------------------------------------------------------ the rest
    async def metrics(self, request: web.Request) -> web.Response:
        body = await self._view("metrics", lambda: generate_latest(self.registry), keep_s=0.0)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(self, request: web.Request) -> web.Response:
        models = await self._view("models", self.backend.models)
        return web.json_response({"status": "ok" if models else "no_workers", "models": models})

    async def api_mesh(self, request: web.Request) -> web.Response:
        view = await self._view("mesh", self.mesh_view) if self.mesh_view else {}
        credit = await self._view("credit", lambda: self.credit.remaining(self.keys), keep_s=5.0)
        usage = {name: {**use, **credit.get(name, {})} for name, use in self.credit.usage().items()}
        for name, left in credit.items():
            usage.setdefault(name, dict(left))
        return web.json_response({**view, "usage": usage, "traffic": self.traffic.rates()})

    async def api_health(self, request: web.Request) -> web.Response:
        return web.json_response(await self._view("health", self.health) if self.health else {"nodes": []})

    async def api_presence(self, request: web.Request) -> web.Response:
        if self.config.identity is None:
            raise ApiError(404, "this gateway has no directory descriptor (it runs unlisted)", code="not_found")
        try:
            challenge = parse_challenge(request.query.get("challenge"))
        except PresenceError as exc:
            raise ApiError(400, str(exc), param="challenge", code="bad_request") from None
        return web.json_response(presence_answer(self.config.identity, challenge))

    async def dashboard(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "dashboard.html")

    async def root(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/dashboard")

    # ------------------------------------------------------------------ serving
    async def serve(self, stop: asyncio.Event, on_ready: Callable[[str], None] | None = None) -> None:
        runner = web.AppRunner(self.app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.config.host, self.config.port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise GatewayError(f"cannot listen on {self.config.host}:{self.config.port}: {exc.strerror}") from None
        port = runner.addresses[0][1]
        self.endpoint = f"http://{self.config.host}:{port}"
        log.info("gateway on %s (OpenAI API at %s/v1, dashboard at %s/dashboard)", self.endpoint, self.endpoint,
                 self.endpoint)
        try:
            if on_ready is not None:
                on_ready(self.endpoint)
            await stop.wait()
        finally:
            await runner.cleanup()
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.views.shutdown(wait=False, cancel_futures=True)
            self.backend.close()
            self.credit.close()  # the committee client (the dashboard's view shares it)


def _route(request: web.Request) -> str:
    """The metrics label of a request: its matched route's pattern (a bounded set), never the
    raw path; a path no route matches is ``unmatched``."""
    info = request.match_info
    resource = info.route.resource if info is not None and info.route is not None else None
    if resource is None or getattr(info, "http_exception", None) is not None:
        return "unmatched"
    canonical = resource.canonical
    return "unmatched" if canonical == "/v1/{rest}" else canonical


def _error_headers(exc: ApiError) -> dict[str, str] | None:
    """A quota refusal will not pass by waiting: tell the official clients not to retry it."""
    return {"x-should-retry": "false"} if exc.status == 429 and exc.code == "insufficient_quota" else None


class GatewayThread(ServingThread):
    error, what = GatewayError, "gateway"

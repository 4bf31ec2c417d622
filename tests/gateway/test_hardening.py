"""Requests a fuzzer sent the gateway that got a 500 and a traceback: lone surrogates in JSON,
a body that lies about its Content-Encoding, and a streaming client that hangs up. Each now
gets a clean OpenAI-shaped 400, or (the hang-up) is settled quietly, and the gateway keeps
serving. Raw sockets, so the bytes on the wire are exactly the fuzzer's."""

from __future__ import annotations

import json
import logging
import socket
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

MODEL = "tiny-random"


def _post(stack, body: bytes, headers: dict | None = None):
    request = urllib.request.Request(stack.url + "/v1/chat/completions", data=body, method="POST",
                                     headers={"Authorization": f"Bearer {stack.key}",
                                              "Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _chat(content: str = "hi", **extra) -> bytes:
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4,
                       "temperature": 0, **extra}).encode()


def _still_serves(stack) -> None:
    status, body = _post(stack, _chat())
    assert status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length"), body


def _no_errors_logged(caplog) -> None:
    loud = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not loud, [f"{r.name}: {r.getMessage()}" for r in loud]


@pytest.fixture
def watched(caplog):
    caplog.set_level(logging.INFO)
    return caplog


@pytest.mark.parametrize("where", ["content", "model", "stop"])
def test_a_lone_surrogate_in_the_json_is_a_400_naming_the_field(stack, watched, where):
    raw = {"content": _chat().replace(b'"hi"', b'"abc\\ud800"'),
           "model": _chat().replace(b'"tiny-random"', b'"\\udfff"'),
           "stop": _chat(stop=["x"]).replace(b'["x"]', b'["\\ud83d"]')}[where]
    status, body = _post(stack, raw)
    assert status == 400, body
    assert body["error"]["type"] == "invalid_request_error"
    assert "surrogate" in body["error"]["message"]
    assert body["error"]["param"] == {"content": "messages[0].content", "model": "model", "stop": "stop[0]"}[where]
    _no_errors_logged(watched)
    _still_serves(stack)


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_a_body_that_is_not_what_its_content_encoding_says_is_a_400(stack, watched, encoding):
    status, body = _post(stack, _chat(), {"Content-Encoding": encoding})
    assert status == 400, body
    assert body["error"]["type"] == "invalid_request_error" and encoding in body["error"]["message"]
    time.sleep(0.2)  # aiohttp would log its own traceback just after answering, when draining the body
    _no_errors_logged(watched)
    _still_serves(stack)


def _open_stream(stack) -> socket.socket:
    url = urllib.parse.urlsplit(stack.url)
    body = _chat("tell me a story", stream=True, max_tokens=16)
    sock = socket.create_connection((url.hostname, url.port), timeout=60)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
                 + f"Authorization: Bearer {stack.key}\r\nContent-Type: application/json\r\n".encode()
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock


def _settled(stack) -> int:
    return stack.gateway.credit.usage()["alice"]["requests"] if "alice" in stack.gateway.credit.usage() else 0


def _wait_settled(stack, count: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while _settled(stack) < count:
        assert time.monotonic() < deadline, "the abandoned job was never settled: its reservation leaked"
        time.sleep(0.1)


@pytest.mark.parametrize("when", ["after_the_first_chunk", "before_the_headers"])
def test_a_client_that_hangs_up_mid_stream_is_settled_quietly(stack, watched, when):
    before = _settled(stack)
    sock = _open_stream(stack)
    try:
        if when == "after_the_first_chunk":
            got = b""
            while b"data: " not in got:
                chunk = sock.recv(4096)
                assert chunk, got
                got += chunk
            assert got.startswith(b"HTTP/1.1 200")
    finally:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # reset
        sock.close()
    _wait_settled(stack, before + 1)  # the worker did the work: it is counted and paid
    time.sleep(0.2)
    assert any("disconnected mid-stream" in r.getMessage() for r in watched.records)
    _no_errors_logged(watched)
    _still_serves(stack)


def test_a_flood_of_health_requests_never_touches_the_jobs_pool(tmp_path):
    """200 concurrent GET /api/health: the health checks run on the views' own threads, once
    per VIEW_CACHE_S however many ask, so jobs never queue behind them (the gateway runs on a
    thread with an instrumented health callable and no mesh: only the views are exercised)."""
    import concurrent.futures
    import threading

    from permamesh.gateway.accounts import Credit, KeyRing
    from permamesh.gateway.backend import MeshBackend
    from permamesh.gateway.server import Gateway, GatewayConfig, GatewayThread

    calls: list[str] = []
    lock = threading.Lock()

    def health() -> dict:
        time.sleep(0.2)  # a slow health pass (it probes every node): the cost being flooded
        with lock:
            calls.append(threading.current_thread().name)
        return {"nodes": []}

    gateway = Gateway(GatewayConfig(tmp_path, port=0), MeshBackend(tmp_path), KeyRing(tmp_path, open_access=True),
                      Credit(), health=health)
    thread = GatewayThread(gateway)
    url = thread.start()
    try:
        def ask(_):
            with urllib.request.urlopen(url + "/api/health", timeout=30) as response:
                return json.loads(response.read())

        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(50) as flood:
            answers = list(flood.map(ask, range(200)))
        elapsed = time.monotonic() - started
    finally:
        thread.stop()
    assert all(a == {"nodes": []} for a in answers)
    assert calls and all(name.startswith("gateway-views") for name in calls), calls[:3]
    assert len(calls) <= elapsed / 1.0 + 2  # coalesced: about one pass per VIEW_CACHE_S, not 200

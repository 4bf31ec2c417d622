"""Inputs a fuzzer found that broke a worker after passing its checks: one frame that silenced a
worker for good (a signed ``result`` with a 100 KB request id), and temperatures so small that
the sampler overflowed. Each is replayed against a real worker."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import time
import uuid

import msgpack
import pytest
import torch

from permamesh.identity import NodeIdentity
from permamesh.transport import DealerClient
from permamesh.wire import ErrorReply, GenerateRequest, GenerateResult, StatusReply, StatusRequest, encode
from permamesh.wire import codec
from permamesh.wire.messages import MIN_TEMPERATURE
from permamesh.workers.engine import Engine, SamplingParams
from permamesh.workers.sampling import generator
from permamesh.workers.server import ServerThread, WorkerServer

from .test_worker import _read_until_final, recv_msg

MALLORY = NodeIdentity.generate()


def mallorys_result_frame(request_id_chars: int = 100_000) -> bytes:
    """A correctly signed ``result`` (a type no worker takes) whose request id is huge. Built by
    hand: our own encoder refuses to produce it."""
    fields = {"request_id": "r" * request_id_chars, "text": "", "finish_reason": "stop",
              "prompt_tokens": 0, "completion_tokens": 0}
    body = msgpack.packb(fields, use_bin_type=True)
    sig = MALLORY.sign(codec._signed_bytes("result", body))
    return msgpack.packb([codec.PROTOCOL_VERSION, "result", body, MALLORY.public.sign_key, sig], use_bin_type=True)


def _job(**kw) -> GenerateRequest:
    kw.setdefault("prompt", "hello mesh")
    kw.setdefault("max_tokens", 6)
    return GenerateRequest(request_id=uuid.uuid4().hex, **kw)


def _answer(sock: DealerClient, req: GenerateRequest) -> GenerateResult | ErrorReply:
    sock.send(encode(req, MALLORY))
    return _read_until_final(sock)[-1]


# ------------------------------------------------------------------ one frame must not silence a worker


def test_a_worker_process_shrugs_off_mallorys_result_frame_then_serves_and_stops_on_sigterm(home):
    proc = subprocess.Popen([sys.executable, "-m", "permamesh", "worker", "--model", "tiny-random", "--name", "w1",
                             "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = proc.stdout.readline().split()
        assert ready and ready[0] == "READY", proc.stderr.read()
        with DealerClient(ready[1]) as sock:
            sock.send(mallorys_result_frame())
            refusal = recv_msg(sock)
            assert isinstance(refusal, ErrorReply) and refusal.code == "bad_frame", refusal
            assert "request_id" in refusal.message and "exceeds limit" in refusal.message
            answer = _answer(sock, _job())  # the reply loop is alive: a real job is answered
            assert isinstance(answer, GenerateResult) and answer.completion_tokens >= 1, answer
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(10)  # before the fix shutdown waited forever on the dead loop's queue
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail("the worker did not stop within 10 s of SIGTERM")
        finally:
            proc.stdout.close()
            proc.stderr.close()
    assert code == 0


def test_the_reply_loop_outlives_replies_it_cannot_encode_or_deliver(tiny_loaded):
    server = WorkerServer(Engine(tiny_loaded), NodeIdentity.generate())
    thread = ServerThread(server)
    endpoint = thread.start()
    stopped = False
    try:

        def broken_sink(msg):
            raise RuntimeError("an overlay sink with a bug")

        def queue_trouble():
            server.add_sink(b"sink", broken_sink)
            server.send(b"sink", StatusRequest("to the broken sink"))
            server.send(b"nobody", ErrorReply("r" * 100_000, "bad_request", "cannot be encoded as is"))

        thread._loop.call_soon_threadsafe(queue_trouble)
        with DealerClient(endpoint) as sock:
            sock.send(encode(StatusRequest("after"), MALLORY))
            status = recv_msg(sock, timeout_s=5.0)
            assert isinstance(status, StatusReply) and status.dropped_replies == 2
            assert isinstance(_answer(sock, _job()), GenerateResult)
        started = time.monotonic()
        thread.stop(timeout_s=10.0)
        stopped = True
        assert time.monotonic() - started < 10.0
    finally:
        if not stopped:
            thread.stop(timeout_s=10.0)


# ------------------------------------------------------------------ temperatures that broke the sampler


@pytest.fixture
def worker(tiny_loaded):
    thread = ServerThread(WorkerServer(Engine(tiny_loaded), NodeIdentity.generate()))
    endpoint = thread.start()
    yield endpoint
    thread.stop()


# (1e-300, 5e-324 and 1e-45 are now refused when the request is built or decoded: tests/wire)
@pytest.mark.parametrize("temperature", [MIN_TEMPERATURE, 1e-30, 1e-8])
def test_a_vanishing_temperature_answers_like_greedy(worker, temperature):
    with DealerClient(worker) as sock:
        greedy = _answer(sock, _job(temperature=0.0, max_tokens=8))
        tiny = _answer(sock, _job(temperature=temperature, top_p=0.9, seed=1, max_tokens=8))
    assert isinstance(tiny, GenerateResult), tiny  # before the fix: ErrorReply "internal" from the sampler
    assert tiny.token_ids == greedy.token_ids


LOGITS = {
    "normal": torch.randn(64, generator=torch.Generator().manual_seed(0)),
    "float32_extremes": torch.tensor([3.0e38, -3.0e38, 1.0, 0.0]),
    "nan_and_minus_inf": torch.tensor([math.nan, -math.inf, 2.0, math.nan]),
    "all_minus_inf": torch.full((5,), -math.inf),
    "plus_inf": torch.tensor([0.0, math.inf, 1.0]),
    "all_nan": torch.full((3,), math.nan),
}


@pytest.mark.parametrize("top_p", [5e-324, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [0.0, 5e-324, 1e-300, 1e-3, 0.7, 10.0, 1e300])
@pytest.mark.parametrize("name", sorted(LOGITS))
def test_the_sampler_never_raises_on_finite_parameters(name, temperature, top_p):
    logits = LOGITS[name]
    token, logprob = Engine.sample(logits, SamplingParams(temperature=temperature, top_p=top_p),
                                   generator(3))
    assert 0 <= token < logits.numel()
    assert math.isfinite(logprob) and logprob <= 0.0


def test_the_sampler_never_picks_an_impossible_token():
    logits = torch.tensor([math.nan, -math.inf, 1.0, 1.0, -math.inf])
    gen = generator(5)
    picks = {Engine.sample(logits, SamplingParams(temperature=t), gen)[0]
             for t in (1e-300, 0.5, 1.0, 1e35, 1e300) for _ in range(20)}
    assert picks <= {2, 3}
    assert picks == {2, 3}  # a tie at a tiny temperature is shared, not broken one way


# ------------------------------------------------------------------ a replayed request runs once


def test_a_replayed_direct_request_runs_once(worker):
    """The same signed frame sent 20 times: one answer, 19 refusals, one job served."""
    frame = encode(_job(max_tokens=2), MALLORY)
    with DealerClient(worker) as sock:
        sock.send(frame)
        first = _read_until_final(sock)[-1]
        refusals = []
        for _ in range(19):
            sock.send(frame)
            refusals.append(_read_until_final(sock)[-1])
        sock.send(encode(StatusRequest("s"), MALLORY))
        status = recv_msg(sock)
    assert isinstance(first, GenerateResult)
    assert all(isinstance(r, ErrorReply) and r.code == "duplicate" for r in refusals)
    assert isinstance(status, StatusReply) and status.served == 1


def test_a_stream_of_junk_frames_logs_one_line_per_window_not_one_per_frame(tiny_loaded, caplog):
    """A peer sending junk must not grow the worker's log without bound; the count stays exact."""
    import logging

    from permamesh.workers.engine import Engine
    from permamesh.workers.server import WorkerServer

    server = WorkerServer(Engine(tiny_loaded), NodeIdentity.generate())
    with caplog.at_level(logging.WARNING, logger="permamesh.workers.server"):
        replies = [server._handle(b"p" * 16, b"junk %d" % i) for i in range(500)]
    assert all(r.code == "bad_frame" for r in replies) and server._rejected == 500
    assert len([r for r in caplog.records if "rejected frame" in r.message]) == 1

"""A worker serving tiny-random over real zmq sockets on loopback, seen by a client and by a
misbehaving peer ("mallory")."""

from __future__ import annotations

import threading
import uuid

import msgpack
import pytest

from permamesh.client.blocking import Client, ClientError
from permamesh.identity import NodeIdentity
from permamesh.transport import DealerClient
from permamesh.wire import (
    Accepted,
    ErrorReply,
    GenerateRequest,
    GenerateResult,
    Progress,
    StatusReply,
    StatusRequest,
    TokenChunk,
    decode,
    encode,
)
from permamesh.workers.engine import Engine, SamplingParams
from permamesh.workers.server import ServerConfig, ServerThread, WorkerServer


class GatedEngine(Engine):
    """The real engine, held at a gate before each request so tests can fill the queue
    deterministically (a test double around the real model; nothing else is faked)."""

    def __init__(self, loaded):
        super().__init__(loaded)
        self.gate = threading.Event()
        self.waiting = threading.Semaphore(0)
        self.started: list[tuple[int, ...]] = []  # prompt ids, in the order jobs were admitted

    def start(self, prompt_ids, *args, **kwargs):
        self.started.append(tuple(prompt_ids))
        self.waiting.release()
        self.gate.wait(30)
        return super().start(prompt_ids, *args, **kwargs)


def _serve(engine, config=ServerConfig(), identity=None):
    thread = ServerThread(WorkerServer(engine, identity or NodeIdentity.generate(), config))
    return thread, thread.start()


@pytest.fixture
def worker(tiny_loaded):
    thread, endpoint = _serve(Engine(tiny_loaded))
    yield endpoint
    thread.stop()


@pytest.fixture(params=[3])
def gated(tiny_loaded, request):
    """A gated worker; ``max_queue`` comes from the param (indirect parametrization)."""
    engine = GatedEngine(tiny_loaded)
    thread, endpoint = _serve(engine, ServerConfig(max_queue=request.param))
    yield engine, thread, endpoint
    engine.gate.set()
    thread.stop()


def _request(**kw) -> GenerateRequest:
    kw.setdefault("prompt", "hello mesh")
    kw.setdefault("max_tokens", 12)
    return GenerateRequest(request_id=uuid.uuid4().hex, **kw)


def recv_msg(sock: DealerClient, timeout_s: float = 10.0):
    """The next message that is not a keep-alive."""
    while True:
        frame = sock.recv(timeout_s)
        assert frame is not None, f"no answer within {timeout_s} s"
        msg = decode(frame).msg
        if not isinstance(msg, Progress):
            return msg


def _read_until_final(sock: DealerClient, count: int = 1, timeout_s: float = 30.0):
    """Collect messages until ``count`` results or errors arrived."""
    got, finals = [], 0
    while finals < count:
        msg = recv_msg(sock, timeout_s)
        got.append(msg)
        finals += isinstance(msg, (GenerateResult, ErrorReply))
    return got


def test_a_client_gets_a_streamed_answer_with_logprobs(worker):
    with Client([worker]) as client:
        pieces = []
        result = client.generate("The mesh", max_tokens=20, temperature=0.8, seed=7, logprobs=True, on_text=pieces.append)
    assert result.completion_tokens == len(result.token_ids) > 0
    assert len(result.logprobs) == len(result.token_ids)
    assert all(lp <= 0.0 for lp in result.logprobs)
    assert "".join(pieces) == result.text
    assert result.finish_reason in ("stop", "length")
    assert result.model == "tiny-random"


def test_stream_chunks_carry_every_token_in_order(worker):
    with Client([worker]) as client:
        events = list(client.events("abc", max_tokens=10, temperature=1.0, seed=3, stream=True, logprobs=True))
    assert isinstance(events[0], Accepted)
    chunks = [e for e in events if isinstance(e, TokenChunk)]
    result = events[-1]
    assert isinstance(result, GenerateResult)
    assert tuple(t for c in chunks for t in c.token_ids) == result.token_ids
    assert tuple(lp for c in chunks for lp in c.logprobs) == result.logprobs
    assert "".join(c.text for c in chunks) == result.text


def test_same_seed_same_answer_and_greedy_ignores_the_seed(worker):
    with Client([worker]) as client:
        a = client.generate("seeded", max_tokens=16, temperature=1.0, seed=42)
        b = client.generate("seeded", max_tokens=16, temperature=1.0, seed=42)
        c = client.generate("seeded", max_tokens=16, temperature=1.0, seed=43)
        g1 = client.generate("seeded", max_tokens=16, seed=1)
        g2 = client.generate("seeded", max_tokens=16, seed=2)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    assert g1.token_ids == g2.token_ids


def test_stop_string_cuts_the_answer_before_it(worker):
    with Client([worker]) as client:
        full = client.generate("stop here", max_tokens=24, temperature=1.0, seed=11)
        text = full.text
        start = next(i for i in range(1, len(text) - 1) if "\ufffd" not in text[i:i + 2])
        stop = text[start:start + 2]
        cut = client.generate("stop here", max_tokens=24, temperature=1.0, seed=11, stop=[stop])
    assert cut.text == text[: text.find(stop)]
    assert cut.finish_reason == "stop"


def test_chat_messages_are_served(worker):
    with Client([worker]) as client:
        result = client.generate(messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}], max_tokens=5)
    assert result.prompt_tokens > len("be brief hi")


@pytest.mark.parametrize("gated", [64], indirect=True)
def test_concurrent_requests_are_queued_in_order_not_dropped(gated):
    engine, thread, endpoint = gated
    with DealerClient(endpoint) as sock:
        me = NodeIdentity.generate()
        requests = [_request(prompt=f"hello {i}") for i in range(4)]
        for req in requests:
            sock.send(encode(req, me))
        accepted = [recv_msg(sock) for _ in requests]
        assert [a.queue_position for a in accepted] == [0, 1, 2, 3]
        assert engine.waiting.acquire(timeout=10)  # the first job is running, three wait
        sock.send(encode(StatusRequest("s1"), me))
        status = recv_msg(sock)
        assert isinstance(status, StatusReply) and status.queue_length == 3 and status.busy
        engine.gate.set()
        results = [m for m in _read_until_final(sock, 4) if isinstance(m, GenerateResult)]
    assert sorted(r.request_id for r in results) == sorted(r.request_id for r in requests)
    assert engine.started == [tuple(engine.prompt_ids(r)) for r in requests]  # admitted in arrival order


def test_a_long_answer_does_not_hold_back_a_short_ones_first_token(tiny_loaded):
    """Per-step scheduling: a job admitted while another decodes gets its answer long before
    the long one ends, and both answers equal what each gets alone (temperature 0)."""
    engine = Engine(tiny_loaded)
    alone = {n: engine.generate(engine.tokenizer.encode(p), SamplingParams(max_tokens=n)).token_ids
             for p, n in (("a long story", 200), ("short", 3))}
    thread, endpoint = _serve(engine)
    try:
        with DealerClient(endpoint) as sock:
            me = NodeIdentity.generate()
            long_req = _request(prompt="a long story", max_tokens=200, stream=True)
            short_req = _request(prompt="short", max_tokens=3)
            sock.send(encode(long_req, me))
            assert isinstance(recv_msg(sock), Accepted)
            while not isinstance(recv_msg(sock), TokenChunk):  # the long one is decoding
                pass
            sock.send(encode(short_req, me))
            finals = [m for m in _read_until_final(sock, 2) if isinstance(m, GenerateResult)]
    finally:
        thread.stop()
    assert [r.request_id for r in finals] == [short_req.request_id, long_req.request_id]
    assert finals[0].token_ids == alone[3] and finals[1].token_ids == alone[200]


def test_a_full_queue_refuses_clearly(gated):
    engine, thread, endpoint = gated
    with DealerClient(endpoint) as sock:
        me = NodeIdentity.generate()
        sock.send(encode(_request(), me))
        assert isinstance(recv_msg(sock), Accepted)
        assert engine.waiting.acquire(timeout=10)
        for _ in range(3):
            sock.send(encode(_request(), me))
            assert isinstance(recv_msg(sock), Accepted)
        sock.send(encode(_request(), me))
        refused = recv_msg(sock)
    assert isinstance(refused, ErrorReply) and refused.code == "queue_full"


def test_stopping_answers_every_queued_request(tiny_loaded):
    engine = GatedEngine(tiny_loaded)
    thread, endpoint = _serve(engine)
    with DealerClient(endpoint) as sock:
        me = NodeIdentity.generate()
        for _ in range(3):
            sock.send(encode(_request(max_tokens=200), me))
        for _ in range(3):
            assert isinstance(recv_msg(sock), Accepted)
        assert engine.waiting.acquire(timeout=10)
        stopper = threading.Thread(target=thread.stop)
        stopper.start()
        engine.gate.set()
        finals = [m for m in _read_until_final(sock, 3) if isinstance(m, (GenerateResult, ErrorReply))]
        stopper.join(30)
    assert len(finals) == 3
    assert all(isinstance(m, GenerateResult) or m.code == "shutting_down" for m in finals)
    assert any(isinstance(m, ErrorReply) for m in finals)


def test_mallory_cannot_crash_a_worker_with_bad_frames(worker):
    me = NodeIdentity.generate()
    good = encode(_request(), me)
    outer = msgpack.unpackb(good)
    forged = msgpack.packb([outer[0], outer[1], outer[2].replace(b"hello", b"HELLO"), outer[3], outer[4]])
    with DealerClient(worker) as sock:
        for bad in (b"\x00garbage\xff", b"", msgpack.packb({"t": "generate"}), forged):
            sock.send(bad)
            reply = recv_msg(sock)
            assert isinstance(reply, ErrorReply) and reply.code == "bad_frame", reply
        sock.send_parts([b"part one", b"part two"])
        assert recv_msg(sock).code == "bad_frame"
        sock.send(encode(StatusRequest("after"), me))
        status = recv_msg(sock)
        assert status.rejected_frames == 5
        sock.send(good)
        assert any(isinstance(m, GenerateResult) for m in _read_until_final(sock))


def test_forged_signature_reply_names_the_reason(worker):
    me = NodeIdentity.generate()
    outer = msgpack.unpackb(encode(_request(), me))
    other = NodeIdentity.generate().public.sign_key
    with DealerClient(worker) as sock:
        sock.send(msgpack.packb([outer[0], outer[1], outer[2], other, outer[4]]))
        reply = recv_msg(sock)
    assert reply.code == "bad_frame" and "signature" in reply.message


def test_wrong_model_is_refused(worker):
    with Client([worker]) as client, pytest.raises(ClientError) as err:
        client.generate("x", model="smollm2-135m")
    assert err.value.code == "model_mismatch"


def test_client_moves_on_from_a_dead_worker(worker, tmp_path):
    with Client(["tcp://127.0.0.1:1", worker], accept_timeout_s=0.5) as client:
        result = client.generate("still served", max_tokens=4)
    assert result.completion_tokens >= 1


def test_client_drops_replies_signed_by_an_unexpected_key(tiny_loaded, home):
    """The directory pins worker A's key; a server answering with key B is not believed."""
    thread, endpoint = _serve(Engine(tiny_loaded))
    try:
        impostor_pin = NodeIdentity.generate()
        with Client([endpoint], pins={endpoint: impostor_pin.public.sign_key}, accept_timeout_s=0.5) as client, \
                pytest.raises(ClientError) as err:
            client.generate("x", max_tokens=2)
        assert err.value.code == "no_answer"
    finally:
        thread.stop()


def test_status_reports_rates_after_work(worker):
    with Client([worker]) as client:
        client.generate("warm up the rates " * 4, max_tokens=8)  # >= 32 tokens: a rate sample
        (status,) = client.status()
    assert status.served == 1 and status.prefill_tok_per_s > 0 and status.decode_tok_per_s > 0

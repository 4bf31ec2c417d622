"""A streamed answer end to end through the overlay in one process: real relays (RelayThread)
on loopback, a real tiny-random worker with its inbox, the OverlayClient and
``Client(anonymous=True)``. Chunks come back over each path's chunk blocks before the final
answer exists, in order, and join to its text; long answers top up their paths' chunk blocks;
dead relays (drop_all) cost nothing; an entry worker that stops mid-stream ends the request
with a clear error."""

from __future__ import annotations

import dataclasses
import random
import threading
import time

import pytest

from permamesh.overlay.errors import OverlayError
from permamesh.overlay.sender import OverlayClient
from permamesh.overlay.stream import StreamConfig
from permamesh.workers.server import WorkerServer
from tests.overlay.test_overlay_e2e import FAST, hold_after_second_step, overlay_mesh

STREAM = dataclasses.replace(FAST, stream_idle_s=1.0)


@pytest.fixture
def mesh(home, tiny_loaded, request):
    """(relay records, worker record, worker server, worker thread, relay threads);
    ``request.param`` = indices of dead relays."""
    with overlay_mesh(tiny_loaded, getattr(request, "param", set())) as parts:
        yield parts


class Pieces:
    """``on_text``: records each piece and how many final answers the entry had made by then.

    With ``hold=True`` the worker's decoding waits after its second step until the client has its
    first piece (at most 30 s), so "the first piece came before the answer" does not depend on
    how busy the machine is; a stream that only arrives at the end still fails it."""

    def __init__(self, server: WorkerServer, hold: bool = False) -> None:
        self.server, self.texts, self.answers_then = server, [], []
        self.first = threading.Event()
        if hold:
            hold_after_second_step(server, self.first)

    def __call__(self, text: str) -> None:
        self.texts.append(text)
        self.answers_then.append(self.server.inbox.counts["answers"])
        self.first.set()


def test_chunks_arrive_in_order_before_the_answer_and_join_to_its_text(mesh):
    records, worker, server, *_ = mesh
    pieces = Pieces(server, hold=True)
    with OverlayClient(records, [worker], STREAM, random.Random(1)) as client:
        result = client.generate("tell me a story", max_tokens=24, on_text=pieces)
    assert "".join(pieces.texts) == result.text and result.completion_tokens == 24
    assert len(pieces.texts) >= 2
    assert pieces.answers_then[0] == 0  # the first chunk came before the entry had the answer
    assert server.inbox.counts["chunks"] >= 2 and server.inbox.counts["answers"] == 1
    assert client.last.paths_failed == 0


def test_a_streamed_answer_equals_the_unstreamed_one(mesh):
    records, worker, server, *_ = mesh
    whole = dataclasses.replace(STREAM, stream_blocks=0)
    with OverlayClient(records, [worker], whole, random.Random(2)) as client:
        plain = client.generate("same answer?", max_tokens=10)
    assert server.inbox.counts["chunks"] == 0
    pieces = Pieces(server)
    with OverlayClient(records, [worker], STREAM, random.Random(3)) as client:
        streamed = client.generate("same answer?", max_tokens=10, on_text=pieces)
    assert streamed.token_ids == plain.token_ids and "".join(pieces.texts) == plain.text


def test_the_anonymous_client_streams_through_on_text(mesh):
    records, worker, server, *_ = mesh
    from permamesh.client.blocking import Client

    pieces = Pieces(server, hold=True)
    with Client([worker.endpoint]) as client:  # its overlay client, made here from the same records
        client.anonymous = True
        client._overlay = OverlayClient(records, [worker], STREAM, random.Random(4))
        result = client.generate("hello", max_tokens=16, on_text=pieces)
    assert "".join(pieces.texts) == result.text and len(pieces.texts) >= 2
    assert pieces.answers_then[0] == 0


@pytest.mark.parametrize("mesh", [{0, 5, 10}], indirect=True)
def test_streams_complete_in_order_despite_dead_relays(mesh):
    records, worker, server, *_ = mesh
    with OverlayClient(records, [worker], STREAM, random.Random(7)) as client:
        for i in range(5):
            pieces = Pieces(server)
            result = client.generate(f"question {i}", max_tokens=12, on_text=pieces)
            assert "".join(pieces.texts) == result.text and result.completion_tokens == 12


def test_a_relay_that_dies_mid_stream_loses_nothing(mesh):
    records, worker, server, _, relay_threads = mesh
    by_id = {r.node_id_bytes: t for r, t in zip(records, relay_threads)}
    pieces: list[str] = []
    with OverlayClient(records, [worker], STREAM, random.Random(11)) as client:
        client.generate("warm up the paths", max_tokens=2)
        victims = [path[1].node_id for path in client.sessions.peek("")[:2]]  # the middle relays of two paths

        def on_text(text: str) -> None:
            pieces.append(text)
            if len(pieces) == 1:  # the stream has begun: two reply paths die under it
                for node_id in victims:
                    threading.Thread(target=by_id[node_id].stop, daemon=True).start()

        result = client.generate("a longer answer, please", max_tokens=48, on_text=on_text)
    assert "".join(pieces) == result.text and result.completion_tokens == 48
    assert len(pieces) >= 2


def _slow_engine(server: WorkerServer, step_s: float) -> None:
    """tiny-random decodes hundreds of tokens in a fraction of a second; slowed to ``step_s``
    a step it runs at a small model's pace on a partner's CPU."""
    step = server.engine.step

    def slow_step(*args, **kwargs):
        time.sleep(step_s)
        return step(*args, **kwargs)

    server.engine.step = slow_step


def test_a_long_answer_tops_up_its_paths_round_after_round(mesh):
    """Four chunk blocks per path would carry four chunks; the entry cuts a chunk every 0.1 s
    of a longer answer, so the client tops up its live paths (each top-up appends blocks to
    its path's lane) before the blocks run out, round after round, spending no clove."""
    records, worker, server, *_ = mesh
    server.inbox.config = dataclasses.replace(server.inbox.config, stream=StreamConfig(
        chunk_tokens=10_000, interval_s=0.1, growth=1.0))  # chunks by time only
    _slow_engine(server, 0.015)
    short = dataclasses.replace(STREAM, stream_blocks=4, stream_topup_ahead=2)
    pieces = Pieces(server)
    with OverlayClient(records, [worker], short, random.Random(12)) as client:
        result = client.generate("a long answer, please", max_tokens=120, on_text=pieces)
    assert "".join(pieces.texts) == result.text and result.completion_tokens == 120
    counts = server.inbox.counts
    assert counts["chunks"] > 2 * short.stream_blocks and counts["topups"] >= 2 * short.n, counts
    assert counts["topup_refused"] == 0 and counts["cloves"] == short.n  # top-ups spend no clove
    assert client.last.rounds == 0 and client.last.cloves_sent == short.n and client.last.topups == counts["topups"]
    assert client.last.chunks == counts["chunks"]  # every chunk released, in order, before the answer


def test_an_answer_of_forty_chunks_streams_whole_and_in_order(mesh):
    """With the default 12 chunk blocks per path, a stream used to end at 36 chunks (three
    rounds of extending paths, then the split ran out) and the rest waited for the answer.
    Chunks here leave every 0.04 s of a 3 s answer: top-ups keep all of them streaming."""
    records, worker, server, *_ = mesh
    server.inbox.config = dataclasses.replace(server.inbox.config, stream=StreamConfig(
        chunk_tokens=10_000, interval_s=0.04, growth=1.0))
    _slow_engine(server, 0.012)
    pieces = Pieces(server)
    with OverlayClient(records, [worker], STREAM, random.Random(13)) as client:
        result = client.generate("the longest answer", max_tokens=250, on_text=pieces)
    counts = server.inbox.counts
    assert "".join(pieces.texts) == result.text and result.completion_tokens == 250
    assert counts["chunks"] >= 40 and counts["streams_starved"] == 0, counts  # never short of blocks
    assert client.last.chunks == counts["chunks"]  # all released in order before the answer came
    assert client.last.topups >= 3 * STREAM.n and client.last.cloves_sent == STREAM.n


def test_an_entry_worker_stopped_mid_stream_gives_a_clear_error(mesh):
    records, worker, server, worker_thread, _ = mesh
    stopped = threading.Event()
    pieces: list[str] = []

    def on_text(text: str) -> None:
        pieces.append(text)
        if not stopped.is_set():  # the first chunk is in: the entry worker goes away
            stopped.set()
            threading.Thread(target=worker_thread.stop, daemon=True).start()

    with OverlayClient(records, [worker], STREAM, random.Random(9)) as client:
        with pytest.raises(OverlayError, match="silent mid-stream|refused"):
            client.generate("a long answer, please", max_tokens=400, on_text=on_text)
    assert stopped.is_set() and pieces  # some text came, and then an error, not a short answer

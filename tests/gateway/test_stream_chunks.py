"""Streamed log-probabilities arrive chunk by chunk, and the new fields travel through the
overlay: a gateway in this process in front of the in-process overlay of
tests/overlay/test_overlay_e2e.py (real relays, a real tiny-random worker with its inbox),
by the overlay and direct, asked with the official ``openai`` client (alternatives included).
The worker's decoding waits after its second step until the client has its first chunk with
log-probabilities, so
"before the answer" does not depend on how busy the machine is; a stream that only carries
them at the end fails it."""

from __future__ import annotations

import json
import random
import threading

import openai
import pytest

from permamesh.client.blocking import Client
from permamesh.gateway.accounts import Credit, KeyRing
from permamesh.gateway.backend import MeshBackend
from permamesh.gateway.server import Gateway, GatewayConfig, GatewayThread
from permamesh.overlay.sender import OverlayClient
from tests.overlay.test_overlay_e2e import FAST, hold_after_second_step, overlay_mesh

SCHEMA = ('{"type":"object","properties":{"n":{"type":"integer","minimum":0,"maximum":9}},"required":["n"],'
          '"additionalProperties":false}')


class Directory:
    """The committee directory's two lists, for a mesh that lives in this process."""

    def __init__(self, relays, worker) -> None:
        self._relays, self._workers = list(relays), [worker]

    def relays(self):
        return self._relays

    def workers(self):
        return self._workers

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def mesh(tiny_loaded):
    with overlay_mesh(tiny_loaded, set()) as parts:
        yield parts


def _gateway(tmp_path, mesh, via: str):
    records, worker, *_ = mesh
    backend = MeshBackend(tmp_path, via, timeout_s=60.0, rng=random.Random(1), directory=Directory(records, worker))
    return GatewayThread(Gateway(GatewayConfig(tmp_path), backend, KeyRing(tmp_path, open_access=True), Credit()))


@pytest.mark.parametrize("via", ["overlay", "direct"])
def test_streamed_logprobs_come_with_their_chunks_before_the_answer(tmp_path, mesh, via):
    server = mesh[2]
    thread = _gateway(tmp_path, mesh, via)
    url = thread.start()
    try:
        with openai.OpenAI(base_url=url + "/v1", api_key="any", max_retries=0, timeout=60) as client:
            ask = dict(model="tiny-random", messages=[{"role": "user", "content": "tell me a story"}], max_tokens=12,
                       temperature=0, logprobs=True, top_logprobs=2)
            whole = client.chat.completions.create(**ask).choices[0]
            first, served_then, chunks = threading.Event(), [], []
            release = hold_after_second_step(server, first, 20.0)
            try:
                for chunk in client.chat.completions.create(**ask, stream=True):
                    chunks.append(chunk)
                    if chunk.choices and chunk.choices[0].logprobs and not first.is_set():
                        served_then.append(server.executor.served)
                        first.set()
            finally:
                release()
            entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
            def seen(e):
                return e.token, round(e.logprob, 4), [(t.token, round(t.logprob, 4)) for t in e.top_logprobs]

            assert [seen(e) for e in entries] == [seen(e) for e in whole.logprobs.content]
            assert all(len(e.top_logprobs) == 2 for e in entries)
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.message.content
            assert served_then == [server.executor.served - 1]  # the first came while the answer was being made
            # the completions API's shape, chunk by chunk, offsets running on over the chunks
            text = client.completions.create(model="tiny-random", prompt="Once upon", max_tokens=8, temperature=0,
                                             logprobs=2).choices[0]
            pieces = [c.choices[0] for c in client.completions.create(
                model="tiny-random", prompt="Once upon", max_tokens=8, temperature=0, logprobs=2, stream=True)
                if c.choices and c.choices[0].logprobs]
            assert [t for p in pieces for t in p.logprobs.tokens] == text.logprobs.tokens
            assert [o for p in pieces for o in p.logprobs.text_offset] == text.logprobs.text_offset
            assert [t for p in pieces for t in p.logprobs.top_logprobs] == text.logprobs.top_logprobs
    finally:
        thread.stop()


def test_constraints_penalties_and_top_logprobs_work_through_the_overlay_as_direct(mesh):
    records, worker, *_ = mesh
    ask = dict(max_tokens=16, temperature=0.8, seed=5, logprobs=True, top_logprobs=3, presence_penalty=0.5,
               frequency_penalty=0.3, grammar_kind="json_schema", grammar=SCHEMA)
    with Client([worker.endpoint]) as direct:
        plain = direct.generate(messages=[{"role": "user", "content": "a number?"}], **ask)
    with OverlayClient(records, [worker], FAST, random.Random(2)) as overlay:
        anonymous = overlay.generate(messages=[{"role": "user", "content": "a number?"}], **ask)
    with Client([worker.endpoint]) as client:  # Client(anonymous=True), its overlay client made from the same records
        client.anonymous = True
        client._overlay = OverlayClient(records, [worker], FAST, random.Random(3))
        through_client = client.generate(messages=[{"role": "user", "content": "a number?"}], **ask)
    assert 0 <= json.loads(plain.text)["n"] <= 9  # the grammar held
    for result in (anonymous, through_client):
        assert result.token_ids == plain.token_ids and result.text == plain.text
        assert result.top_logprobs == plain.top_logprobs and len(result.top_logprobs[0].tokens) == 3

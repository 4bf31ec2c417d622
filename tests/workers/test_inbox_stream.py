"""The entry worker's inbox streaming an answer (docs/paths.md section 9), with a stand-in
host: a request whose envelopes carry chunk blocks runs streamed, its tokens (or a container
job's output) leave as signed chunks split over the paths' chunk blocks (in order, one block
per path per chunk), a chunk clove stands for its path's ack, a chunk waits when the blocks
run out, and the final answer still goes over the answer blocks. The client's
ChunkReassembly reads what it sent."""

from __future__ import annotations

import asyncio

from permamesh.identity import NodeIdentity
from permamesh.overlay.envelope import ChunkClove, decode_reply_item, encode_envelope
from permamesh.overlay.onion import HopInfo
from permamesh.overlay.reply import build_reply_block
from permamesh.overlay.sida import split
from permamesh.containers.messages import RunOutput, RunRequest, RunResult
from permamesh.overlay.reassembly import ChunkReassembly
from permamesh.overlay.stream import StreamConfig
from permamesh.wire import GenerateRequest, GenerateResult, TokenChunk, encode
from permamesh.workers.inbox import SINK_PREFIX, Inbox, InboxConfig
from tests.workers.test_inbox_hardening import Host

RELAYS = [HopInfo.from_identity(NodeIdentity.generate().public) for _ in range(3)]
CLIENT = NodeIdentity.generate()
EVERY_TOKEN = StreamConfig(first_tokens=1, chunk_tokens=1, growth=1.0, interval_s=10.0)


def _block():
    return build_reply_block(RELAYS, CLIENT.node_id.encode("ascii"))[0]


def _run(chunk_blocks: int, tokens: list[str], *, ack_delay_s: float = 5.0, stream: StreamConfig = EVERY_TOKEN,
         late_path_after: int | None = None, paths: list | None = None):
    """Three cloves of a request in, ``tokens`` streamed, then the result: (inbox, host, sent
    items as (block, item) in order, request); ``paths`` gets each envelope's chunk blocks."""

    async def scenario():
        host = Host()
        inbox = Inbox(host, lambda: {}, InboxConfig(ack_delay_s=ack_delay_s, stream=stream))
        sent: list = []
        inbox._seal = lambda block, item: sent.append((block, item))
        request = GenerateRequest("r", prompt="hi", max_tokens=len(tokens))
        mid = b"q" * 16
        cloves = split(encode(request, CLIENT), n=4, k=3, message_id=mid)

        def envelope(clove) -> bytes:
            blocks = tuple(_block() for _ in range(chunk_blocks))
            if paths is not None:
                paths.append({b.header for b in blocks})
            return encode_envelope(clove, _block(), _block(), blocks)

        for clove in cloves[:3]:
            inbox.on_clove(envelope(clove))
        sink = host.sinks[SINK_PREFIX + mid]
        for i, text in enumerate(tokens):
            if i == late_path_after:  # the client repairs over a fresh path
                inbox.on_clove(envelope(cloves[3]))
            sink(TokenChunk("r", i, text, (i,)))
            await asyncio.sleep(0)
        sink(GenerateResult("r", "".join(tokens), "length", 2, len(tokens), tuple(range(len(tokens)))))
        await asyncio.sleep(0.01)
        inbox.close()
        return inbox, host, sent, mid

    return asyncio.run(scenario())


def _read(sent, mid, host) -> tuple[list[str], list]:
    """What the client would release from the chunk items, and the other items."""
    seen: list[str] = []
    stream = ChunkReassembly(mid, bytes.fromhex(host.identity.public.sign_key.hex()), seen.append)
    others = []
    for _, item in sent:
        decoded = decode_reply_item(item)
        if isinstance(decoded, ChunkClove):
            stream.add(decoded)
        else:
            others.append(decoded)
    return seen, others


def test_a_request_with_chunk_blocks_streams_its_tokens_as_chunks_before_the_answer():
    inbox, host, sent, mid = _run(4, ["The", " cat", " sat"])
    assert host.jobs[0][1].stream is True
    assert inbox.counts["chunks"] == 3 and inbox.counts["answers"] == 1
    seen, others = _read(sent, mid, host)
    assert seen == ["The", " cat", " sat"]
    kinds = [decode_reply_item(item).__class__.__name__ for _, item in sent]
    assert kinds[:9] == ["ChunkClove"] * 9 and kinds[9:] == ["Clove"] * 3  # chunks first, then the answer
    blocks = [block for block, _ in sent]
    assert len(set(b.header for b in blocks)) == len(blocks)  # every block used once


def test_without_chunk_blocks_the_answer_comes_whole():
    inbox, host, sent, _ = _run(0, ["a", "b"])
    assert host.jobs[0][1].stream is False
    assert inbox.counts["chunks"] == 0 and len(sent) == 3  # one answer clove per path


def test_a_chunk_waits_when_the_blocks_run_out_and_without_a_top_up_the_answer_brings_the_rest():
    inbox, host, sent, mid = _run(2, ["one", " two", " three", " four"])
    assert inbox.counts["chunks"] == 2 and inbox.counts["streams_starved"] == 1
    seen, others = _read(sent, mid, host)
    assert seen == ["one", " two"] and len(others) == 3


def test_a_chunk_clove_stands_for_its_paths_ack():
    inbox, _, sent, _ = _run(2, ["x"])
    assert inbox.counts["acks_saved"] == 3
    assert not any(decode_reply_item(item).__class__.__name__ == "Ack" for _, item in sent)


def test_tokens_wait_for_a_chunk_that_is_due_by_time():
    slow = StreamConfig(first_tokens=1, chunk_tokens=100, growth=1.0, interval_s=0.001)
    inbox, host, sent, mid = _run(4, ["a", "b", "c"], stream=slow)
    seen, _ = _read(sent, mid, host)
    assert seen[0] == "a" and "".join(seen) in ("a", "abc", "ab")  # later chunks leave on their timer
    assert inbox.counts["chunks"] >= 1


def test_a_path_that_joins_later_brings_spare_cloves_of_recent_chunks():
    paths: list = []
    inbox, host, sent, mid = _run(6, ["a", "b", "c", "d"], late_path_after=2, paths=paths)
    assert inbox.counts["chunks_repaired"] == 2  # one spare clove each of chunks 0 and 1
    # the first path died: every clove over it is lost; chunks 0 and 1 rebuild from the two
    # other paths and the spare over the new one, later chunks from the three live paths
    kept = [(block, item) for block, item in sent if block.header not in paths[0]]
    assert len(kept) < len(sent)
    seen, _ = _read(kept, mid, host)
    assert seen == ["a", "b", "c", "d"]
    without_repair = [(block, item) for block, item in kept if block.header not in paths[3]]
    assert _read(without_repair, mid, host)[0] == []  # without the new path: nothing rebuilds


def test_a_container_jobs_output_streams_as_chunks_and_joins_to_its_result():
    """A RunRequest whose envelopes carry chunk blocks runs with stream set; each RunOutput
    piece the job writes leaves as a signed chunk, and the pieces join to the RunResult."""

    async def scenario():
        host = Host()
        inbox = Inbox(host, lambda: {}, InboxConfig(ack_delay_s=5.0, stream=EVERY_TOKEN))
        sent: list = []
        inbox._seal = lambda block, item: sent.append((block, item))
        mid = b"c" * 16
        frame = encode(RunRequest("job", b"manifest", b"config", ("/bin/sh",)), CLIENT)
        for clove in split(frame, n=4, k=3, message_id=mid)[:3]:
            inbox.on_clove(encode_envelope(clove, _block(), _block(), tuple(_block() for _ in range(4))))
        sink = host.sinks[SINK_PREFIX + mid]
        for out, err in ((b"hello\n", b""), (b"", b"careful\n"), (b"bye\n", b"")):
            sink(RunOutput("job", out, err))
            await asyncio.sleep(0)
        sink(RunResult("job", 0, b"hello\nbye\n", b"careful\n"))
        await asyncio.sleep(0.01)
        inbox.close()
        return inbox, host, sent, mid

    inbox, host, sent, mid = asyncio.run(scenario())
    assert host.jobs[0][1].stream is True and inbox.counts["chunks"] == 3
    seen: list = []
    stream = ChunkReassembly(mid, bytes.fromhex(host.identity.public.sign_key.hex()),
                             on_output=lambda out, err: seen.append((out, err)), kind=RunOutput)
    for _, item in sent:
        decoded = decode_reply_item(item)
        if isinstance(decoded, ChunkClove):
            stream.add(decoded)
    assert seen == [(b"hello\n", b""), (b"", b"careful\n"), (b"bye\n", b"")]
    stream.finish_output(b"hello\nbye\n", b"careful\n")  # nothing left over, nothing contradicted
    assert len(seen) == 3

"""The OutputPump, without a container: pieces fed from another thread leave as RunOutput
messages on the event loop, the first at once, the rest gathered (a job writing a byte at a
time costs a bounded number of messages), and after flush() they join to exactly what was fed."""

from __future__ import annotations

import asyncio
import threading

from permamesh.containers.messages import RunOutput
from permamesh.containers.output import OutputPump


def test_pieces_from_a_thread_are_gathered_and_join_to_what_was_fed():
    async def scenario():
        sent: list[RunOutput] = []
        pump = OutputPump(asyncio.get_running_loop(), "job", sent.append, interval_s=0.05, piece_bytes=4096)

        def job() -> None:  # the runner's thread: 2000 one-byte writes to stdout, a few to stderr
            for i in range(2000):
                pump.feed(b"x", b"!" if i % 500 == 0 else b"")

        writer = threading.Thread(target=job)
        writer.start()
        while writer.is_alive():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0)  # the last feeds reach the loop
        first = sent[0] if sent else None
        pump.flush()
        return first, sent

    first, sent = asyncio.run(scenario())
    assert first is not None and first.stdout.startswith(b"x")  # the first piece left at once
    assert b"".join(m.stdout for m in sent) == b"x" * 2000 and b"".join(m.stderr for m in sent) == b"!" * 4
    assert all(m.request_id == "job" for m in sent) and len(sent) < 100  # gathered, not 2000 messages


def test_a_burst_is_cut_into_pieces_within_the_message_cap():
    async def scenario():
        sent: list[RunOutput] = []
        pump = OutputPump(asyncio.get_running_loop(), "job", sent.append, piece_bytes=1000)
        pump.feed(b"a" * 2500, b"")
        await asyncio.sleep(0)
        pump.flush()
        return sent

    sent = asyncio.run(scenario())
    assert [len(m.stdout) for m in sent] == [1000, 1000, 500]

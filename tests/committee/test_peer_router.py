"""The devnet validator's ROUTER (PeerRouter): a reply it cannot deliver is dropped, counted,
and leaves nothing behind. Before the fix a NOBLOCK send on the asyncio socket "succeeded"
(its failure sat in a Future nobody read): the drop went uncounted and asyncio logged one
traceback per lost reply (found by the fuzz harness's slow reader, tests/test_fuzz_ports.py)."""

from __future__ import annotations

import asyncio
import gc

import zmq

from permamesh.committee.devnet.node import PeerRouter


async def _send_and_collect_errors(peer_of) -> tuple[list[bool], int, list[dict]]:
    loop = asyncio.get_running_loop()
    errors: list[dict] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    router = PeerRouter("127.0.0.1", 0)
    try:
        peer = await peer_of(router)
        results = [router.send(peer, b"reply %d" % i) for i in range(3)]
        dropped = router.dropped
    finally:
        router.close()
    gc.collect()  # a failed Future nobody read is reported when it is collected
    await asyncio.sleep(0)
    return results, dropped, errors


def test_a_reply_to_an_unknown_peer_is_dropped_and_counted_without_a_logged_error():
    async def unknown(router):
        return b"\x00nobody-here"

    results, dropped, errors = asyncio.run(_send_and_collect_errors(unknown))
    assert results == [False, False, False]
    assert dropped == 3
    assert not errors, errors


def test_a_reply_to_a_peer_that_left_is_dropped_and_counted():
    async def left(router):
        ctx = zmq.Context.instance()
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(router.endpoint.split("?")[0])
        dealer.send(b"hello")
        peer, _ = await asyncio.wait_for(router.recv(), 5.0)
        dealer.close(0)
        await asyncio.sleep(0.3)  # let the router notice the peer is gone
        return peer

    results, dropped, errors = asyncio.run(_send_and_collect_errors(left))
    assert results == [False, False, False]
    assert dropped == 3
    assert not errors, errors

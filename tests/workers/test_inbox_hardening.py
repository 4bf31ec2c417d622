"""The entry worker's inbox under a mallory who replays envelopes: each clove is taken once,
and what the inbox holds stays bounded per message and in all, while an honest request still
runs exactly once."""

from __future__ import annotations

from permamesh.identity import NodeIdentity
from permamesh.overlay.envelope import encode_envelope
from permamesh.overlay.onion import HopInfo
from permamesh.overlay.reply import build_reply_block
from permamesh.overlay.sida import split
from permamesh.wire import GenerateRequest, encode
from permamesh.workers.inbox import Inbox, InboxConfig

RELAYS = [HopInfo.from_identity(NodeIdentity.generate().public) for _ in range(3)]
CLIENT = NodeIdentity.generate()


class Host:
    """The part of a worker the inbox calls: it records the jobs it is asked to run."""

    def __init__(self) -> None:
        self.identity = NodeIdentity.generate()
        self.jobs: list[tuple[bytes, object]] = []
        self.sinks: dict[bytes, object] = {}

    def add_sink(self, peer, fn) -> None:
        self.sinks[peer] = fn

    def remove_sink(self, peer) -> None:
        self.sinks.pop(peer, None)

    def dispatch(self, peer, request):
        self.jobs.append((peer, request))
        return None


def _blocks():
    client_id = CLIENT.node_id.encode("ascii")
    return build_reply_block(RELAYS, client_id)[0], build_reply_block(RELAYS, client_id)[0]


def _envelope(clove) -> bytes:
    return encode_envelope(clove, *_blocks())


def _inbox(**config) -> tuple[Inbox, Host]:
    host = Host()
    return Inbox(host, lambda: {}, InboxConfig(ack_delay_s=0, **config)), host


def _held(inbox: Inbox) -> int:
    return sum(map(len, inbox.waiting.values())) + sum(len(j.blocks) for j in inbox.jobs.values())


def test_a_replayed_clove_is_dropped_not_held_again():
    inbox, host = _inbox()
    request = encode(GenerateRequest("r", prompt="hi", max_tokens=2), CLIENT)
    cloves = split(request, n=4, k=3)
    first = _envelope(cloves[0])
    for _ in range(500):
        inbox.on_clove(first)
    assert inbox.counts["duplicate"] == 499
    assert _held(inbox) == 1  # one answer block, not 500
    for clove in cloves[1:3]:
        inbox.on_clove(_envelope(clove))
        inbox.on_clove(_envelope(clove))  # each duplicated once more
    assert len(host.jobs) == 1  # the request ran, once
    assert inbox.counts["duplicate"] == 501
    assert _held(inbox) == 3


def test_cloves_held_per_message_are_bounded():
    inbox, _ = _inbox(max_cloves_per_message=8)
    cloves = split(b"x" * 200, n=40, k=40)  # a message that never completes before the cap
    for clove in cloves[:30]:
        inbox.on_clove(_envelope(clove))
    assert _held(inbox) == 8 and inbox.held == 8
    assert inbox.counts["overflow"] == 22


def test_cloves_held_in_all_are_bounded_and_freed_when_messages_go():
    inbox, _ = _inbox(max_held_cloves=50, rebuild_ttl_s=1.0, prune_every_s=0.0)
    for _ in range(120):  # one clove each of 120 messages, none complete
        inbox.on_clove(_envelope(split(b"y" * 100, n=4, k=3)[0]))
    assert inbox.held == 50 and _held(inbox) == 50
    assert inbox.counts["inbox_full"] == 70
    inbox.rebuilder.expire(10**9)  # the rebuilder gives up on them all
    inbox._expire(10**9)
    assert inbox.held == 0 and _held(inbox) == 0 and not inbox.taken
    inbox.on_clove(_envelope(split(b"z" * 100, n=4, k=3)[0]))  # room again
    assert inbox.held == 1

"""Late evidence (docs/paths.md 6.3): paths a request stopped waiting for are cleared by an
authenticated late reply or judged failed once their timeout has passed. Times are passed in
explicitly (no sleeping); reply blocks and relays' layers are real crypto."""

from __future__ import annotations

import os

from permamesh.identity import NodeIdentity
from permamesh.overlay.cells import HopInfo
from permamesh.overlay.envelope import Ack, encode_ack
from permamesh.overlay.late import LateEvidence
from permamesh.overlay.messages import RelayDelivery
from permamesh.overlay.onion import ReplayGuard, ReplyDelivery, peel
from permamesh.overlay.reply import build_reply_block, seal_reply


def _path(n: int = 3):
    ids = [NodeIdentity.generate() for _ in range(n)]
    return ids, [HopInfo.from_identity(i.public) for i in ids]


def _deliver(ids, block, item: bytes) -> RelayDelivery:
    """Carry a sealed reply through the real relay layers, as the path would."""
    _, cell = seal_reply(block, item)
    for identity in ids:
        out = peel(identity.kex, cell, ReplayGuard())
        if isinstance(out, ReplyDelivery):
            return RelayDelivery(out.reply_id, out.payload)
        cell = out.cell
    raise AssertionError("the reply never reached its last hop")


def test_a_silent_path_fails_after_its_timeout_and_a_late_answer_clears_another():
    failed = []
    late = LateEvidence(0.5, lambda session, relays: failed.append((session, relays)))
    ids, hops = _path()
    client = os.urandom(16)
    quiet_block, quiet_keys = build_reply_block(hops, client)
    slow_block, slow_keys = build_reply_block(hops, client)
    late.hold("chat", ("r1", "r2", "r3"), 10.0, {quiet_keys.reply_id: quiet_keys})
    late.hold("chat", ("r4", "r5", "r6"), 10.0, {slow_keys.reply_id: slow_keys})
    assert late.settle(10.4) == 0 and len(late) == 2  # not yet due
    ack = encode_ack(Ack(os.urandom(16), 1, 0))
    assert late.offer(_deliver(ids, slow_block, ack))  # the slow path did answer
    assert late.settle(10.6) == 1
    assert failed == [("chat", ("r1", "r2", "r3"))] and late.failed == 1 and late.cleared == 1
    assert len(late) == 0


def test_forged_or_unknown_late_replies_clear_nothing():
    late = LateEvidence(0.5, lambda *_: None)
    ids, hops = _path()
    block, keys = build_reply_block(hops, os.urandom(16))
    late.hold("s", ("r",), 0.0, {keys.reply_id: keys})
    real = _deliver(ids, block, encode_ack(Ack(os.urandom(16), 0, 0)))
    forged = RelayDelivery(real.reply_id, bytes(len(real.payload)))
    assert not late.offer(forged) and not late.offer(RelayDelivery(os.urandom(16), real.payload))
    assert len(late) == 1 and late.settle(1.0) == 1


def test_holding_is_bounded_and_the_oldest_is_judged_first():
    failed = []
    late = LateEvidence(60.0, lambda session, relays: failed.append(relays), capacity=2)
    _, hops = _path()
    for i in range(3):
        _, keys = build_reply_block(hops, os.urandom(16))
        late.hold("s", (f"path{i}",), float(i), {keys.reply_id: keys})
    assert len(late) == 2 and failed == [("path0",)]

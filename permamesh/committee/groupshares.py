"""Worker groups' salts on the ledger: who may hold a share, who may seal one, who still waits.

A worker's *group* is the one its own descriptor names (``Announce.group``) while its partner
registers it as a worker; otherwise it has none. Rows (beside :mod:`ledger`'s):

| ns | key | value |
|---|---|---|
| ``share`` | recipient node key | ``group``, ``sealed`` (:mod:`sealing`), ``sender`` |
| ``group`` | group name | ``fingerprint`` of its salt, ``shares`` (how many workers hold one) |
| ``gwait`` | group name, NUL, node key | (empty: that worker of the group holds no share yet) |

Invariants, kept by every tx that touches a node, its descriptor or a share:

- a ``share`` row's group is its worker's current group, and was sealed to the worker's current
  ``kex_key``; one share per worker, so the rows never outnumber registered nodes;
- a ``gwait`` row exists exactly for each worker with a group and no share of it;
- a ``group`` row exists exactly while some worker holds a share of it.

A :class:`txs.GroupShare` is accepted when its sender is a worker of the group and either
holds a share of it (and seals the group's salt: the same fingerprint), or is the recipient
itself and the group has no share yet (it *founds* the group). When two founders race, the
first in the block founds and the second is refused (it then receives a share like any
newcomer). A second share for the same worker is refused.

A worker that re-announces into another group (or whose partner makes it a relay, or gives it a
new ``kex_key``) gives up its share: the row goes and it waits for a share of its new group.
It still knows the old salt; salts are not rotated when members leave. A group whose last
share goes is unfounded, and the next worker to join it founds a fresh salt.

Who calls it: :class:`permamesh.committee.ledger.Ledger` (GroupShare, Announce and RegisterNode
rules) and :mod:`permamesh.committee.queries` (``/group_share``, ``/group_waiting``).
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from permamesh.committee import txs
from permamesh.committee.errors import TxError

log = logging.getLogger(__name__)

SHARE, GROUP, GWAIT = b"share", b"group", b"gwait"
Effects = list[tuple[bytes, bytes, object]]


class Ledger(Protocol):
    """What these rules read of :class:`permamesh.committee.ledger.Ledger` (which calls them)."""

    store: Any

    def read(self, ns: bytes, key: bytes, committed: bool) -> Any: ...

    def registered(self, key: bytes, committed: bool) -> bool: ...

    def group_of(self, key: bytes, committed: bool) -> str: ...


def wait_key(group: str, node: bytes) -> bytes:
    return group.encode() + b"\0" + node  # group names hold no NUL (txs._GROUP)


def group_of(node: dict | None, desc: dict | None) -> str:
    """A node's current group: its descriptor's, while it is registered and announced as a worker."""
    if node is None or desc is None or node["role"] != "worker" or desc["role"] != "worker":
        return ""
    return desc["group"]


def membership(ledger: Ledger, key: bytes, node: dict | None, desc: dict | None, old_group: str,
               committed: bool, rekeyed: bool = False) -> Effects:
    """The share and wait rows of ``key`` after its registration or descriptor changed (to
    ``node`` and ``desc``; its group was ``old_group``); ``rekeyed``: a new kex_key."""
    group = group_of(node, desc)
    effects: Effects = []
    share = ledger.read(SHARE, key, committed)
    if share is not None and (share["group"] != group or rekeyed):
        effects += _drop(ledger, key, share, committed)
        share = None
    if old_group and old_group != group:
        effects.append((GWAIT, wait_key(old_group, key), None))
    if group and share is None:
        effects.append((GWAIT, wait_key(group, key), b""))
    return effects


def _drop(ledger: Ledger, key: bytes, share: dict, committed: bool) -> Effects:
    row = ledger.read(GROUP, share["group"].encode(), committed)
    left = (row or {"shares": 1})["shares"] - 1
    log.debug("node %s gives up its share of %s (%d left)", key.hex()[:16], share["group"], left)
    return [(SHARE, key, None),
            (GROUP, share["group"].encode(), None if left <= 0 else row | {"shares": left})]


def apply_share(ledger: Ledger, tx: txs.GroupShare, sender: bytes, committed: bool) -> tuple[Effects, bool]:
    """The rules of a GroupShare (see the module docstring): its effects, and whether it
    founds the group. Raises :class:`TxError` with the reason of a refusal."""
    group = tx.group
    sender_group = ledger.group_of(sender, committed)
    if sender_group != group:
        raise TxError(txs.UNAUTHORIZED, f"only a worker announced in group {group!r} may seal its salt "
                      f"(the sender's group is {sender_group!r})")
    if not ledger.registered(tx.recipient, committed):
        raise TxError(txs.UNKNOWN, f"recipient {tx.recipient.hex()[:16]} is not registered")
    recipient_group = ledger.group_of(tx.recipient, committed)
    if recipient_group != group:
        raise TxError(txs.INVALID, f"recipient {tx.recipient.hex()[:16]} is not a worker announced in "
                      f"group {group!r} (its group is {recipient_group!r})")
    if ledger.read(SHARE, tx.recipient, committed) is not None:
        raise TxError(txs.DUPLICATE, f"recipient {tx.recipient.hex()[:16]} already holds a share "
                      f"of {group!r}")
    row = ledger.read(GROUP, group.encode(), committed)
    if row is None and sender != tx.recipient:
        raise TxError(txs.UNAUTHORIZED, f"group {group!r} has no salt yet: its first worker founds "
                      "it by sealing one to itself")
    if row is not None:
        if ledger.read(SHARE, sender, committed) is None:
            raise TxError(txs.UNAUTHORIZED, f"group {group!r} already has a salt and the sender holds "
                          "no share of it (a member seals it to newcomers)")
        if tx.fingerprint != bytes(row["fingerprint"]):
            raise TxError(txs.INVALID, f"the share's salt fingerprint is not group {group!r}'s")
    shares = 1 if row is None else row["shares"] + 1
    effects: Effects = [
        (SHARE, tx.recipient, {"group": group, "sealed": tx.sealed, "sender": sender}),
        (GROUP, group.encode(), {"fingerprint": tx.fingerprint, "shares": shares}),
        (GWAIT, wait_key(group, tx.recipient), None)]
    return effects, row is None


# --------------------------------------------------------------------------------- queries


def share_answer(ledger: Ledger, key: bytes) -> dict:
    """``/group_share``: the node's current group, whether that group has a salt, its
    fingerprint, and the node's share (null until it has one)."""
    group = ledger.group_of(key, committed=True)
    row = ledger.read(GROUP, group.encode(), True) if group else None
    share = ledger.read(SHARE, key, True)
    return {"node": key.hex(), "group": group, "founded": row is not None,
            "fingerprint": "" if row is None else bytes(row["fingerprint"]).hex(),
            "share": None if share is None else {"group": share["group"], "sealed": bytes(share["sealed"]).hex(),
                                                 "sender": bytes(share["sender"]).hex()}}


def waiting_answer(ledger: Ledger, data: bytes) -> dict:
    """``/group_waiting``: the group's workers that hold no share yet, sorted by key."""
    try:
        group = data.decode("ascii")
    except UnicodeDecodeError:
        group = ""
    if not txs.valid_group(group):
        raise TxError(txs.INVALID, "query data must be a group name")
    prefix = wait_key(group, b"")
    row = ledger.read(GROUP, group.encode(), True)
    waiting = [key[len(prefix):].hex() for key, _ in ledger.store.scan(GWAIT, committed=True)
               if key.startswith(prefix) and len(key) == len(prefix) + 32]
    return {"group": group, "founded": row is not None, "shares": 0 if row is None else row["shares"],
            "fingerprint": "" if row is None else bytes(row["fingerprint"]).hex(), "waiting": waiting}

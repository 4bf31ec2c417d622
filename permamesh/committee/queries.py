"""ABCI Query paths over committed ledger state; every answer is canonical JSON.

| path | data | answer |
|---|---|---|
| ``/status`` | | chain id, height, app hash, current epoch and probe period, members |
| ``/registry`` | | every node: partner, role, endpoint, profile, reputation, descriptor, liveness, physics |
| ``/node`` | node key (32 bytes or hex) | one node, as in ``/registry`` |
| ``/directory`` | | height, app hash, period, and every node as a client dials it (below) |
| ``/reputation`` | | node -> reputation ppm, excluded, epochs, window |
| ``/trusted`` | | the nodes routing may use (not excluded), sorted, with reputation |
| ``/account`` | key | balance, earned, spent, credit limit, available |
| ``/balances`` | | every account as above |
| ``/nonce`` | key | the next nonce that key must use |
| ``/partners`` | | partner tiers and candidates' vouches |
| ``/payouts`` | epoch (decimal) or empty | service payouts with their "why" |
| ``/epochs`` | | what closing each epoch did |
| ``/group_share`` | node key | its group, whether the group has a salt, the salt's fingerprint, its sealed share or null |
| ``/group_waiting`` | group name | whether it has a salt, how many workers hold it, the workers still waiting for a share |

``/directory`` nodes are sorted by key and flat: ``node``, ``node_id``, ``role``, ``partner``,
``kex_key`` and ``profile`` from the partner's registration; ``transport_key``, ``endpoint``,
``model``, ``engine``, ``group``, ``layers``, ``version`` and ``seq`` from the node's own descriptor (empty
strings and seq 0 until it announces, and again if its partner changes its role);
``reputation_ppm`` and ``excluded``; ``running``, ``rtt_us`` (null until counted up) and
``seen_period`` (-1 until counted up) from the members' liveness reports. ``height`` and
``app_hash`` name the committed state the answer reflects, so a reader can check it against
another validator's app hash at that height; ``period`` is ``height // probe_blocks``.

``physics`` in ``/registry`` and ``/node`` says whether the members' own round trips allow the
node's claimed location (:func:`permamesh.scheduler.physics.check_location`): ``possible``,
``probes`` (distinct probe places), ``insufficient`` (possible, but fewer than 3 probes),
``why``, ``worst_violation_km`` (0.1 km) and ``member`` (hex key of the member whose round trip
refutes the claim most, null if none; ``why`` names it by its first 16 hex digits). It is null
when no located member measured the node. The probes: in the two periods the ledger keeps
(``p - 1`` and the current ``p``, the window that decides ``running``), each member's most
recent round trip to the node, placed where the member is registered. A member is a probe only
if a seed partner registered it as a ``validator`` with a location: a (0, 0) profile claims
none, and an unknown probe place proves nothing. The node's own claim is checked whatever it
is, (0, 0) included. Float math, so it lives here and never in ledger state; it reads
committed rows only, in key order, so every validator answers alike.

Who calls it: :meth:`LedgerApp.query` (CometBFT's ``abci_query`` RPC, or the devnet's query
socket); readers are routing (``/trusted``), the scheduler and admission (``/registry``,
``/account``), every node and client (``/directory``), dashboards and
``permamesh validator query``; workers (``/group_share`` for their own, ``/group_waiting`` to
serve newcomers: :mod:`permamesh.directory.groupsalt`).
"""

from __future__ import annotations

import json

from permamesh.committee import groupshares, txs
from permamesh.committee.errors import TxError
from permamesh.committee.ledger import (ACCOUNT, CAND, DESC, EPOCH, LIVE, NODE, NONCE, PARTNER,
                                        PAYOUT, PROBE, REP, Ledger, is_running, unpack)
from permamesh.identity import PublicIdentity
from permamesh.scheduler.physics import check_location

Probe = tuple[bytes, tuple[float, float], int]  # (member key, its registered (lat, lon), rtt_us)

_NO_DESCRIPTOR = {"transport_key": "", "endpoint": "", "model": "", "group": "", "layers": "",
                  "version": "", "seq": 0, "engine": ""}


def _key(data: bytes) -> bytes:
    if len(data) == 32:
        return data
    try:
        key = bytes.fromhex(data.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        key = b""
    if len(key) != 32:
        raise TxError(txs.INVALID, "query data must be a 32-byte key or its hex")
    return key


def _plain(value: object) -> object:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _rows(ledger: Ledger, ns: bytes):
    for key, raw in ledger.store.scan(ns, committed=True):
        yield key, unpack(raw)


def _descriptor(ledger: Ledger, key: bytes, row: dict) -> dict | None:
    """The node's descriptor, None if it never announced or announced under another role."""
    desc = ledger.read(DESC, key, committed=True)
    return None if desc is None or desc["role"] != row["role"] else _plain(desc)


def _liveness(ledger: Ledger, key: bytes, period: int) -> dict:
    live = ledger.read(LIVE, key, committed=True)
    return {"running": is_running(live, period), "rtt_us": None if live is None else live["rtt_us"],
            "seen_period": -1 if live is None else live["period"]}


def _located_members(ledger: Ledger) -> dict[bytes, tuple[float, float]]:
    """member key -> (lat, lon) of each member a seed partner registered as a located validator."""
    out = {}
    for member in sorted(ledger.members):
        row = ledger.read(NODE, member, committed=True)
        if (row is None or row["role"] != "validator"
                or bytes(row["partner"]) not in ledger.genesis.seed_partners):
            continue
        lat_e6, lon_e6 = row["profile"]["lat_e6"], row["profile"]["lon_e6"]
        if lat_e6 or lon_e6:  # (0, 0) claims no location
            out[member] = (lat_e6 / 1e6, lon_e6 / 1e6)
    return out


def _probes(ledger: Ledger) -> dict[bytes, list[Probe]]:
    """node key -> each located member's most recent round trip to it in periods p - 1 and p,
    sorted by member key."""
    located, period = _located_members(ledger), ledger.period_of(ledger.store.height)
    newest: dict[bytes, dict[bytes, tuple[int, int]]] = {}  # node -> member -> (period, rtt_us)
    for key, raw in ledger.store.scan(PROBE, committed=True):
        reported, member = int.from_bytes(key[:8], "big"), key[8:]
        if reported < period - 1 or member not in located:
            continue
        for node_key, rtt_us in unpack(raw):
            seen = newest.setdefault(bytes(node_key), {})
            if reported >= seen.get(member, (-1, 0))[0]:
                seen[member] = (reported, rtt_us)
    return {node: [(m, located[m], rtt) for m, (_, rtt) in sorted(by_member.items())]
            for node, by_member in newest.items()}


def _physics(row: dict, probes: list[Probe]) -> dict | None:
    """The ``physics`` verdict on one node's claimed location (module docstring), or None."""
    if not probes:
        return None
    claim = (row["profile"]["lat_e6"] / 1e6, row["profile"]["lon_e6"] / 1e6)
    verdict = check_location(claim, [(place, rtt / 1000) for _, place, rtt in probes],
                             names=[f"member {m.hex()[:16]}" for m, _, _ in probes])
    return {"possible": verdict.possible, "probes": verdict.probes,
            "insufficient": verdict.insufficient, "why": verdict.why,
            "worst_violation_km": round(verdict.worst_violation_km, 1),
            "member": probes[verdict.worst_probe][0].hex() if verdict.worst_probe >= 0 else None}


def _node(ledger: Ledger, key: bytes, row: dict, probes: dict[bytes, list[Probe]]) -> dict:
    rep = ledger.read(REP, key, committed=True) or {}
    period = ledger.period_of(ledger.store.height)
    return (_plain(row) | {"node": key.hex(), "reputation_ppm": rep.get("reputation_ppm"),
                           "excluded": rep.get("excluded"), "epochs": rep.get("epochs"),
                           "descriptor": _descriptor(ledger, key, row),
                           "physics": _physics(row, probes.get(key, []))}
            | _liveness(ledger, key, period))


def _directory_entry(ledger: Ledger, key: bytes, row: dict, period: int) -> dict:
    rep = ledger.read(REP, key, committed=True) or {}
    desc = _descriptor(ledger, key, row) or _NO_DESCRIPTOR
    kex = bytes(row["kex"])
    return ({"node": key.hex(), "node_id": PublicIdentity(key, kex).node_id, "role": row["role"],
             "partner": bytes(row["partner"]).hex(), "kex_key": kex.hex(),
             "profile": _plain(row["profile"]), "reputation_ppm": rep.get("reputation_ppm"),
             "excluded": bool(rep.get("excluded"))}
            | {name: desc.get(name, empty) for name, empty in _NO_DESCRIPTOR.items()}
            | _liveness(ledger, key, period))


def _account(ledger: Ledger, key: bytes) -> dict:
    account = ledger.account(key, committed=True)
    limit = ledger.credit_limit(account)
    return account | {"account": key.hex(), "credit_limit": limit,
                      "available": account["balance"] + limit}


def answer(ledger: Ledger, path: str, data: bytes) -> bytes:
    """The JSON bytes answering ``path``; :class:`TxError` for an unknown path or bad data."""
    store = ledger.store
    if path == "/status":
        value = {"chain_id": ledger.genesis.chain_id, "height": store.height,
                 "app_hash": store.app_hash.hex(), "epoch": ledger.epoch_of(store.height + 1),
                 "members": sorted(k.hex() for k in ledger.members),
                 "blocks_per_epoch": ledger.rules.blocks_per_epoch,
                 "period": ledger.period_of(store.height),
                 "probe_blocks": ledger.rules.probe_blocks}
    elif path == "/registry":
        probes = _probes(ledger)
        value = [_node(ledger, key, row, probes) for key, row in _rows(ledger, NODE)]
    elif path == "/node":
        key = _key(data)
        row = ledger.read(NODE, key, committed=True)
        if row is None:
            raise TxError(txs.UNKNOWN, "node not registered")
        value = _node(ledger, key, row, _probes(ledger))
    elif path == "/directory":
        period = ledger.period_of(store.height)
        value = {"height": store.height, "app_hash": store.app_hash.hex(), "period": period,
                 "nodes": [_directory_entry(ledger, key, row, period)
                           for key, row in _rows(ledger, NODE)]}
    elif path == "/reputation":
        value = {key.hex(): _plain(row) for key, row in _rows(ledger, REP)}
    elif path == "/trusted":
        value = [{"node": key.hex(), "reputation_ppm": rep["reputation_ppm"],
                  "role": (ledger.read(NODE, key, committed=True) or {}).get("role")}
                 for key, rep in _rows(ledger, REP) if not rep["excluded"]]
    elif path == "/account":
        value = _account(ledger, _key(data))
    elif path == "/balances":
        value = [_account(ledger, key) for key, _ in _rows(ledger, ACCOUNT)]
    elif path == "/nonce":
        value = {"next": (ledger.read(NONCE, _key(data), committed=True) or 0) + 1}
    elif path == "/partners":
        value = {"partners": {key.hex(): _plain(row) for key, row in _rows(ledger, PARTNER)}
                 | {k.hex(): {"tier": 3, "seed": True} for k in ledger.genesis.seed_partners},
                 "candidates": {key.hex(): _plain(row) for key, row in _rows(ledger, CAND)}}
    elif path == "/payouts":
        wanted = None
        if data:
            try:
                wanted = int(data.decode("ascii"))
            except (UnicodeDecodeError, ValueError):
                raise TxError(txs.INVALID, "payouts data must be an epoch number") from None
        value = [_plain(row) | {"epoch": int.from_bytes(key[:8], "big"), "node": key[8:].hex()}
                 for key, row in _rows(ledger, PAYOUT)
                 if wanted is None or int.from_bytes(key[:8], "big") == wanted]
    elif path == "/epochs":
        value = [_plain(row) for _, row in _rows(ledger, EPOCH)]
    elif path == "/group_share":
        value = groupshares.share_answer(ledger, _key(data))
    elif path == "/group_waiting":
        value = groupshares.waiting_answer(ledger, data)
    else:
        raise TxError(txs.UNKNOWN, f"unknown query path {path[:64]!r}")
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()

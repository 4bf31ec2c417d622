"""ABCI Query paths over committed ledger state; every answer is canonical JSON.

| path | data | answer |
|---|---|---|
| ``/status`` | | chain id, height, app hash, current epoch, counts |
| ``/registry`` | | every node: partner, role, endpoint, profile, reputation |
| ``/node`` | node key (32 bytes or hex) | one node |
| ``/reputation`` | | node -> reputation ppm, excluded, epochs, window |
| ``/trusted`` | | the nodes routing may use (not excluded), sorted, with reputation |
| ``/account`` | key | balance, earned, spent, credit limit, available |
| ``/balances`` | | every account as above |
| ``/nonce`` | key | the next nonce that key must use |
| ``/partners`` | | partner tiers and candidates' vouches |
| ``/payouts`` | epoch (decimal) or empty | service payouts with their "why" |
| ``/epochs`` | | what closing each epoch did |

Who calls it: :meth:`LedgerApp.query` (CometBFT's ``abci_query`` RPC, or the devnet's query
socket); readers are routing (``/trusted``), the scheduler and admission (``/registry``,
``/account``), dashboards and ``permamesh validator query``.
"""

from __future__ import annotations

import json

from permamesh.committee import txs
from permamesh.committee.errors import TxError
from permamesh.committee.ledger import (ACCOUNT, CAND, EPOCH, NODE, NONCE, PARTNER, PAYOUT, REP,
                                        Ledger, unpack)


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


def _node(ledger: Ledger, key: bytes, row: dict) -> dict:
    rep = ledger.read(REP, key, committed=True) or {}
    return _plain(row) | {"node": key.hex(), "reputation_ppm": rep.get("reputation_ppm"),
                          "excluded": rep.get("excluded"), "epochs": rep.get("epochs")}


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
                 "blocks_per_epoch": ledger.rules.blocks_per_epoch}
    elif path == "/registry":
        value = [_node(ledger, key, row) for key, row in _rows(ledger, NODE)]
    elif path == "/node":
        key = _key(data)
        row = ledger.read(NODE, key, committed=True)
        if row is None:
            raise TxError(txs.UNKNOWN, "node not registered")
        value = _node(ledger, key, row)
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
    else:
        raise TxError(txs.UNKNOWN, f"unknown query path {path[:64]!r}")
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()

"""What CometBFT v0.38's RPC answers, checked field by field into frozen dataclasses.

A node's RPC is an untrusted peer: every answer is parsed here, and anything malformed (not
an object, a field missing or of the wrong type, bad hex or base64, a negative height)
raises :class:`~permamesh.committee.errors.ProtocolError` naming the method and the field,
never a ``KeyError`` or ``TypeError``.

Encodings (CometBFT's JSON, ``libs/json``): 64-bit integers are decimal strings (we also take
JSON numbers), ``[]byte`` is base64 (txs, query keys and values, ``block_results.app_hash``),
``HexBytes`` is upper-case hex (hashes, header app hashes, ``status`` hashes). CometBFT omits
nothing today, but a missing optional field (``code``, ``log``) reads as its zero value, as
protobuf's JSON would write it.

Who calls it: :mod:`permamesh.committee.cometbft.rpc`.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from permamesh.committee.errors import ProtocolError

_MISSING = object()


class Fields:
    """Typed reads from one JSON object of an answer; errors name ``where`` and the key."""

    def __init__(self, value: object, where: str) -> None:
        if not isinstance(value, dict):
            raise ProtocolError(f"{where}: expected an object, got {type(value).__name__}")
        self.value, self.where = value, where

    def _get(self, key: str, default: object):
        value = self.value.get(key, _MISSING)
        if value is _MISSING or (value is None and default is not _MISSING):
            if default is _MISSING:
                raise ProtocolError(f"{self.where}: missing field {key!r}")
            return default
        return value

    def _bad(self, key: str, what: str, value: object) -> ProtocolError:
        shown = repr(value)[:60]
        return ProtocolError(f"{self.where}: field {key!r} is not {what}: {shown}")

    def obj(self, key: str) -> Fields:
        return Fields(self._get(key, _MISSING), f"{self.where}.{key}")

    def integer(self, key: str, default: object = _MISSING, minimum: int = 0) -> int:
        value = self._get(key, default)
        if isinstance(value, str) and value.lstrip("-").isdigit() and len(value) <= 20:
            value = int(value)
        if type(value) is not int or not minimum <= value < 2**63:
            raise self._bad(key, f"an integer >= {minimum}", value)
        return value

    def text(self, key: str, default: object = _MISSING) -> str:
        value = self._get(key, default)
        if not isinstance(value, str):
            raise self._bad(key, "a string", value)
        return value

    def flag(self, key: str, default: object = _MISSING) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise self._bad(key, "a boolean", value)
        return value

    def hexbytes(self, key: str, default: object = _MISSING) -> bytes:
        value = self.text(key, default)
        try:
            return bytes.fromhex(value)
        except ValueError:
            raise self._bad(key, "hex", value) from None

    def b64(self, key: str, default: object = _MISSING) -> bytes:
        return decode_b64(self.text(key, default), self, key)

    def items(self, key: str) -> list:
        value = self._get(key, [])
        if not isinstance(value, list):
            raise self._bad(key, "a list", value)
        return value


def decode_b64(value: object, fields: Fields, key: str) -> bytes:
    if not isinstance(value, str):
        raise fields._bad(key, "base64", value)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise fields._bad(key, "base64", value) from None


# ---------------------------------------------------------------------------------- answers


@dataclass(frozen=True)
class NodeStatus:
    node_id: str  # the node's p2p id (hex of its node key's address)
    network: str  # the chain id
    height: int  # latest committed block
    block_hash: bytes
    header_app_hash: bytes  # from the latest header: the app hash after height - 1
    catching_up: bool


@dataclass(frozen=True)
class AppInfo:
    """abci_info: what the app itself says it has committed."""

    last_block_height: int
    last_block_app_hash: bytes


@dataclass(frozen=True)
class Broadcast:
    """broadcast_tx_sync: the outcome of CheckTx on that node."""

    code: int
    log: str
    codespace: str
    hash: bytes  # SHA-256 of the tx


@dataclass(frozen=True)
class TxResult:
    """One tx's ExecTxResult from FinalizeBlock."""

    code: int
    log: str
    codespace: str


@dataclass(frozen=True)
class CommittedTx:
    hash: bytes
    height: int
    index: int
    result: TxResult


@dataclass(frozen=True)
class QueryAnswer:
    code: int
    log: str
    value: bytes
    height: int
    codespace: str


@dataclass(frozen=True)
class Header:
    height: int
    app_hash: bytes  # the app hash after height - 1 (CometBFT's header rule)
    num_txs: int


@dataclass(frozen=True)
class Block:
    height: int
    hash: bytes
    app_hash: bytes  # the header's: after height - 1
    txs: tuple[bytes, ...]


@dataclass(frozen=True)
class BlockResults:
    height: int
    tx_results: tuple[TxResult, ...]
    app_hash: bytes  # the app hash after this height


def parse_status(result: object) -> NodeStatus:
    top = Fields(result, "status")
    node, sync = top.obj("node_info"), top.obj("sync_info")
    return NodeStatus(node.text("id"), node.text("network"), sync.integer("latest_block_height"),
                      sync.hexbytes("latest_block_hash", ""), sync.hexbytes("latest_app_hash", ""),
                      sync.flag("catching_up", False))


def parse_app_info(result: object) -> AppInfo:
    r = Fields(result, "abci_info").obj("response")
    return AppInfo(r.integer("last_block_height", 0), r.b64("last_block_app_hash", ""))


def parse_broadcast(result: object) -> Broadcast:
    f = Fields(result, "broadcast_tx_sync")
    return Broadcast(f.integer("code", 0), f.text("log", ""), f.text("codespace", ""), f.hexbytes("hash"))


def parse_tx_result(value: object, where: str) -> TxResult:
    f = Fields(value, where)
    return TxResult(f.integer("code", 0), f.text("log", ""), f.text("codespace", ""))


def parse_tx(result: object) -> CommittedTx:
    f = Fields(result, "tx")
    return CommittedTx(f.hexbytes("hash"), f.integer("height", minimum=1), f.integer("index", 0),
                       parse_tx_result(f.value.get("tx_result"), "tx.tx_result"))


def parse_query(result: object) -> QueryAnswer:
    r = Fields(result, "abci_query").obj("response")
    return QueryAnswer(r.integer("code", 0), r.text("log", ""), r.b64("value", ""), r.integer("height", 0),
                       r.text("codespace", ""))


def parse_block(result: object) -> Block:
    top = Fields(result, "block")
    block = top.obj("block")
    header, data = block.obj("header"), block.obj("data")
    txs = tuple(decode_b64(tx, data, "txs") for tx in data.items("txs"))
    return Block(header.integer("height", minimum=1), top.obj("block_id").hexbytes("hash"),
                 header.hexbytes("app_hash", ""), txs)


def parse_block_results(result: object) -> BlockResults:
    f = Fields(result, "block_results")
    results = tuple(parse_tx_result(r, f"block_results.txs_results[{i}]")
                    for i, r in enumerate(f.items("txs_results")))
    return BlockResults(f.integer("height", minimum=1), results, f.b64("app_hash", ""))


def parse_headers(result: object) -> tuple[Header, ...]:
    """blockchain: block metas (newest first, at most 20) as headers in height order."""
    f = Fields(result, "blockchain")
    out = []
    for i, meta in enumerate(f.items("block_metas")):
        m = Fields(meta, f"blockchain.block_metas[{i}]")
        header = m.obj("header")
        out.append(Header(header.integer("height", minimum=1), header.hexbytes("app_hash", ""),
                          m.integer("num_txs", 0)))
    return tuple(sorted(out, key=lambda h: h.height))


def parse_num_unconfirmed(result: object) -> int:
    return Fields(result, "num_unconfirmed_txs").integer("n_txs", 0)

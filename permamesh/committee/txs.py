"""Ledger transactions: signed wire frames, and the result codes CheckTx and FinalizeBlock send.

A transaction is one frame of :mod:`permamesh.wire.codec` (msgpack, typed, Ed25519-signed by
its sender). Every body names the ``chain_id`` (no replay across committees) and a per-sender
``nonce`` that must be exactly one more than the sender's last accepted one (no replay within
the chain, and a total order of one sender's transactions).

| tx | signed by | effect |
|---|---|---|
| :class:`RegisterNode` | a partner (tier >= 1) | registers or updates one of its nodes and its profile |
| :class:`Vouch` | a partner that may vouch (tier >= 2) | vouches for a candidate partner |
| :class:`ScoreReport` | a committee member (genesis) | its verification credits for one epoch |
| :class:`JobReceipt` | a user | spends credit on a job; the worker that served it earns it |

Who calls it: clients build and sign with :func:`sign_tx`; the application parses every tx
with :func:`parse_tx` in CheckTx, ProcessProposal and FinalizeBlock.
"""

from __future__ import annotations

import logging

from permamesh.committee.errors import TxError
from permamesh.identity import NodeIdentity
from permamesh.wire.codec import Message, WireError, decode, encode, message, struct

log = logging.getLogger(__name__)

MAX_TX_BYTES = 16 * 1024

# ABCI result codes (0 is success; CometBFT drops a CheckTx failure from the mempool).
OK = 0
MALFORMED = 1  # not a frame, unknown type, bad field, bad signature
WRONG_CHAIN = 2
BAD_NONCE = 3  # replayed or out of order
UNAUTHORIZED = 4  # the signer may not send this tx
UNKNOWN = 5  # names a node, partner or account the ledger does not know
NO_CREDIT = 6  # the user is out of credit
DUPLICATE = 7  # the same vouch, report or job again
INVALID = 8  # well-formed but breaks a ledger rule (values out of range)
STALE = 9  # an epoch that is closed or not yet open

CODE_NAMES = {OK: "ok", MALFORMED: "malformed", WRONG_CHAIN: "wrong_chain",
              BAD_NONCE: "bad_nonce", UNAUTHORIZED: "unauthorized", UNKNOWN: "unknown",
              NO_CREDIT: "no_credit", DUPLICATE: "duplicate", INVALID: "invalid",
              STALE: "stale_epoch"}
CODESPACE = "permamesh"

ROLES = ("worker", "relay", "validator")


@struct
class NodeProfile:
    """What a partner claims about a node (checked later by the scheduler's physics check)."""

    lat_e6: int  # latitude in millionths of a degree
    lon_e6: int
    grid: str  # power grid / utility region
    isp: str
    asn: int
    datacenter: str = ""
    rack: str = ""
    host: str = ""  # the physical machine, for VMs
    silicon_year: int = 0
    cpu_mhz: int = 0
    idle_w: int = 0
    loaded_w: int = 0
    ram_mb: int = 0
    gpu: str = ""
    backup_power: bool = False
    chaos_opt_in: bool = False
    software: str = ""  # software version string
    models: tuple[str, ...] = ()  # served model names or digests


@message("tx.register_node", max_bytes=MAX_TX_BYTES)
class RegisterNode(Message):
    chain_id: str
    nonce: int
    node_key: bytes  # the node's Ed25519 public key (its id is derived from it)
    kex_key: bytes  # the node's X25519 public key
    role: str
    endpoint: str
    profile: NodeProfile


@message("tx.vouch", max_bytes=MAX_TX_BYTES)
class Vouch(Message):
    chain_id: str
    nonce: int
    subject: bytes  # the candidate partner's public key


@struct
class Score:
    node_key: bytes
    credit_ppm: int  # the epoch credit the reporting validator measured, in ppm
    challenges: int = 0


@message("tx.score_report", max_bytes=MAX_TX_BYTES)
class ScoreReport(Message):
    chain_id: str
    nonce: int
    epoch: int
    scores: tuple[Score, ...]


@message("tx.job_receipt", max_bytes=MAX_TX_BYTES)
class JobReceipt(Message):
    chain_id: str
    nonce: int
    worker: bytes  # the serving node's public key
    units: int  # credit units spent (e.g. tokens generated)
    job_id: bytes  # unique per user; the same job is never paid twice


TX_TYPES = (RegisterNode, Vouch, ScoreReport, JobReceipt)


def sign_tx(tx: Message, signer: NodeIdentity) -> bytes:
    """Encode and sign a transaction."""
    if not isinstance(tx, TX_TYPES):
        raise TxError(MALFORMED, f"{type(tx).__name__} is not a ledger transaction")
    return encode(tx, signer)


def parse_tx(raw: bytes, chain_id: str) -> tuple[Message, bytes]:
    """Stateless checks: a known, well-formed, correctly signed tx for this chain.

    Returns ``(tx, sender_key)``; raises :class:`TxError` with a result code otherwise.
    """
    if not isinstance(raw, (bytes, bytearray)) or len(raw) > MAX_TX_BYTES + 256:
        raise TxError(MALFORMED, "tx is not bytes or is too large")
    try:
        received = decode(bytes(raw), expect=TX_TYPES)
    except WireError as exc:
        raise TxError(MALFORMED, str(exc)) from None
    tx, sender = received.msg, received.sender
    if tx.chain_id != chain_id:
        raise TxError(WRONG_CHAIN, f"tx for chain {tx.chain_id[:64]!r}, this is {chain_id!r}")
    if tx.nonce < 1 or tx.nonce > 2**62:
        raise TxError(BAD_NONCE, "nonce must be in 1..2^62")
    _check_fields(tx)
    return tx, sender


def _check_fields(tx: Message) -> None:
    """Range checks that need no state."""
    if isinstance(tx, RegisterNode):
        p = tx.profile
        if len(tx.node_key) != 32 or len(tx.kex_key) != 32:
            raise TxError(INVALID, "node_key and kex_key must be 32 bytes")
        if tx.role not in ROLES:
            raise TxError(INVALID, f"role must be one of {ROLES}")
        if not (-90_000_000 <= p.lat_e6 <= 90_000_000 and -180_000_000 <= p.lon_e6 <= 180_000_000):
            raise TxError(INVALID, "location out of range")
        if min(p.asn, p.silicon_year, p.cpu_mhz, p.idle_w, p.loaded_w, p.ram_mb) < 0:
            raise TxError(INVALID, "profile numbers must be >= 0")
        if len(p.models) > 64 or len(tx.endpoint) > 256:
            raise TxError(INVALID, "too many models or endpoint too long")
    elif isinstance(tx, Vouch):
        if len(tx.subject) != 32:
            raise TxError(INVALID, "subject must be a 32-byte public key")
    elif isinstance(tx, ScoreReport):
        if tx.epoch < 0 or not tx.scores or len(tx.scores) > 512:
            raise TxError(INVALID, "a report holds 1..512 scores for an epoch >= 0")
        keys = [s.node_key for s in tx.scores]
        if len(set(keys)) != len(keys):
            raise TxError(DUPLICATE, "a node appears twice in one report")
        for s in tx.scores:
            if len(s.node_key) != 32 or not 0 <= s.credit_ppm <= 1_000_000 or s.challenges < 0:
                raise TxError(INVALID, "scores need a 32-byte key and credit in 0..1e6 ppm")
    elif isinstance(tx, JobReceipt):
        if len(tx.worker) != 32 or not 0 < tx.units <= 10**9 or not 0 < len(tx.job_id) <= 64:
            raise TxError(INVALID, "a receipt needs a 32-byte worker, 1..1e9 units, a job id")

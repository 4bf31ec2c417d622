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
| :class:`Announce` | a registered node, itself | its descriptor: transport key, endpoints, model |
| :class:`Liveness` | a committee member (genesis) | the nodes it found up in one probe period |
| :class:`GroupShare` | a worker of the group | the group's salt sealed to one worker of it |

Who calls it: clients build and sign with :func:`sign_tx`; the application parses every tx
with :func:`parse_tx` in CheckTx, ProcessProposal and FinalizeBlock.
"""

from __future__ import annotations

import ipaddress
import logging
import re

from permamesh.committee import sealing
from permamesh.committee.errors import TxError
from permamesh.identity import NodeIdentity
from permamesh.wire.codec import Message, WireError, decode, encode, message, struct

log = logging.getLogger(__name__)

TX_BYTES = 16 * 1024  # body limit of every tx but a liveness report
MAX_SEEN = 4096  # nodes one liveness report may list
MAX_RTT_US = 60_000_000  # a round trip above 60 s is not "up"
MAX_TX_BYTES = 256 * 1024  # the largest body of any tx (a full liveness report: ~56 B a node)

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
STALE = 9  # an epoch or probe period not open for reports; a descriptor seq not above the last

CODE_NAMES = {OK: "ok", MALFORMED: "malformed", WRONG_CHAIN: "wrong_chain",
              BAD_NONCE: "bad_nonce", UNAUTHORIZED: "unauthorized", UNKNOWN: "unknown",
              NO_CREDIT: "no_credit", DUPLICATE: "duplicate", INVALID: "invalid",
              STALE: "stale_epoch"}
CODESPACE = "permamesh"

ROLES = ("worker", "relay", "validator", "gateway")


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


@message("tx.register_node", max_bytes=TX_BYTES)
class RegisterNode(Message):
    chain_id: str
    nonce: int
    node_key: bytes  # the node's Ed25519 public key (its id is derived from it)
    kex_key: bytes  # the node's X25519 public key
    role: str
    endpoint: str
    profile: NodeProfile


@message("tx.vouch", max_bytes=TX_BYTES)
class Vouch(Message):
    chain_id: str
    nonce: int
    subject: bytes  # the candidate partner's public key


@struct
class Score:
    node_key: bytes
    credit_ppm: int  # the epoch credit the reporting validator measured, in ppm
    challenges: int = 0


@message("tx.score_report", max_bytes=TX_BYTES)
class ScoreReport(Message):
    chain_id: str
    nonce: int
    epoch: int
    scores: tuple[Score, ...]


@message("tx.job_receipt", max_bytes=TX_BYTES)
class JobReceipt(Message):
    chain_id: str
    nonce: int
    worker: bytes  # the serving node's public key
    units: int  # credit units spent (e.g. tokens generated)
    job_id: bytes  # unique per user; the same job is never paid twice


@message("tx.announce", max_bytes=TX_BYTES)
class Announce(Message):
    """A node's descriptor, signed by the node itself (its partner registered it first)."""

    chain_id: str
    nonce: int
    transport_key: bytes  # X25519 public key: the CurveZMQ server key of its links
    endpoint: str  # where peers reach it: tcp://HOST:PORT (no key; transport_key names it)
    model: str  # the model it serves ("" for relays and validators)
    group: str  # its worker group ("" for none)
    layers: str  # its layer server, tcp://HOST:PORT, or ""
    version: str  # its software version
    seq: int  # above the node's last accepted descriptor's (a later restart wins)
    engine: str = ""  # what computes its answers ("torch", "llamacpp"; "" = torch): the committee scores with its tolerance


@struct
class Seen:
    node_key: bytes
    rtt_us: int  # the probe's round trip, in microseconds


@message("tx.liveness", max_bytes=MAX_TX_BYTES)
class Liveness(Message):
    """One member's probe results for one period: the nodes it found up."""

    chain_id: str
    nonce: int
    period: int  # height // probe_blocks at the time of probing
    up: tuple[Seen, ...]  # sorted by node key, each node once; may be empty


@message("tx.group_share", max_bytes=TX_BYTES)
class GroupShare(Message):
    """A worker group's block-hash salt sealed to one worker of the group (:mod:`sealing`),
    signed by a worker that holds it, or by the group's founder to itself."""

    chain_id: str
    nonce: int
    group: str  # as the workers' descriptors name it
    recipient: bytes  # the receiving worker's node key (its registered kex_key opens the share)
    sealed: bytes  # sealing.SEALED_BYTES: ephemeral X25519 key, then the AEAD box
    fingerprint: bytes  # sealing.fingerprint(salt, group): the same in every share of the group


TX_TYPES = (RegisterNode, Vouch, ScoreReport, JobReceipt, Announce, Liveness, GroupShare)


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
    elif isinstance(tx, Announce):
        _check_announce(tx)
    elif isinstance(tx, GroupShare):
        _check_share(tx)
    elif isinstance(tx, Liveness):
        if not 0 <= tx.period <= 2**62 or len(tx.up) > MAX_SEEN:
            raise TxError(INVALID, f"a liveness report holds 0..{MAX_SEEN} nodes, period >= 0")
        previous = b""
        for seen in tx.up:
            if len(seen.node_key) != 32 or not 0 <= seen.rtt_us <= MAX_RTT_US:
                raise TxError(INVALID, f"a node needs a 32-byte key and rtt_us in 0..{MAX_RTT_US}")
            if seen.node_key == previous:
                raise TxError(DUPLICATE, "a node appears twice in one liveness report")
            if seen.node_key < previous:
                raise TxError(INVALID, "the nodes of a liveness report must be sorted by key")
            previous = seen.node_key


# ------------------------------------------------------------------------------ descriptors

MAX_ENDPOINT = 200
_ENDPOINT = re.compile(
    r"tcp://(?:\[([0-9A-Fa-f:.]{2,45})\]|([A-Za-z0-9.-]{1,253})):([1-9][0-9]{0,4})")
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_OCTET = re.compile(r"0|[1-9][0-9]{0,2}")
_MODEL = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII, no spaces
_ENGINE = re.compile(r"[a-z0-9._-]{1,32}")
_GROUP = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}")  # a worker's default: its model
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+_-]{0,63}")
_P = 2**255 - 19
_SMALL_ORDER_U = frozenset({  # X25519 points of order 1, 2, 4 or 8 (on the curve or its twist)
    0, 1, _P - 1,
    325606250916557431795983626356110631294008115727848805560023387167927233504,
    39382357235489614581723060781553021112529911719440698176882885853963445705823})


def valid_group(name: str) -> bool:
    """A non-empty group name as descriptors and group shares spell it."""
    return bool(_GROUP.fullmatch(name))


def _ipv4_problem(octets: list[str]) -> str | None:
    if len(octets) != 4 or not all(_OCTET.fullmatch(o) and int(o) <= 255 for o in octets):
        return "is not a DNS name or a dotted IPv4 address"
    first = int(octets[0])
    if first == 0 or first >= 224:
        return "is unspecified, multicast or reserved"
    return None


def endpoint_problem(endpoint: str) -> str | None:
    """Why ``endpoint`` is not an address peers can dial (None when it is): ``tcp://HOST:PORT``
    with HOST a DNS name, a dotted IPv4 address or a bracketed IPv6 address, never an
    unspecified (0.0.0.0, ::), multicast or reserved one, and PORT in 1..65535, no leading 0.

    Every validator must decide alike, so dotted IPv4 is parsed here (Python's own parser
    changed across versions); bracketed IPv6 goes to :mod:`ipaddress` only after a character
    check (no zone ids)."""
    if not endpoint:
        return "is empty"
    if len(endpoint) > MAX_ENDPOINT:
        return f"is longer than {MAX_ENDPOINT} characters"
    m = _ENDPOINT.fullmatch(endpoint)
    if m is None:
        return "is not tcp://HOST:PORT"
    ipv6, name, port = m.groups()
    if int(port) > 65535:
        return "has a port above 65535"
    if ipv6 is not None:
        try:
            address = ipaddress.IPv6Address(ipv6)
        except ValueError:
            return "has a malformed IPv6 address"
        if address.is_unspecified or address.is_multicast:
            return "has an unspecified or multicast IPv6 address"
        mapped = address.ipv4_mapped
        return None if mapped is None else _ipv4_problem(str(mapped).split("."))
    labels = name.split(".")
    if labels[-1].isdigit():  # no top-level domain is all digits: this means an IPv4 address
        return _ipv4_problem(labels)
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        return "has a host that is not a DNS name"
    return None


def _check_announce(tx: Announce) -> None:
    key = tx.transport_key
    if len(key) != 32:
        raise TxError(INVALID, "transport_key must be a 32-byte X25519 public key")
    if int.from_bytes(key, "little") % 2**255 % _P in _SMALL_ORDER_U:
        raise TxError(INVALID, "transport_key is a small-order X25519 point (no secret behind it)")
    for name in ("endpoint", "layers"):
        value = getattr(tx, name)
        if name == "layers" and value == "":
            continue
        problem = endpoint_problem(value)
        if problem:
            raise TxError(INVALID, f"{name} {value[:64]!r} {problem}")
    for name, pattern, rule in (
            ("model", _MODEL, "1..128 printable ASCII characters without spaces"),
            ("group", _GROUP, "1..128 of A-Z a-z 0-9 . _ : / @ + -, first a letter or digit"),
            ("engine", _ENGINE, "1..32 of a-z 0-9 . _ -")):
        value = getattr(tx, name)
        if value and not pattern.fullmatch(value):
            raise TxError(INVALID, f"{name} {value[:64]!r}: \"\" or {rule}")
    if not _VERSION.fullmatch(tx.version):
        raise TxError(INVALID, f"version {tx.version[:64]!r}: 1..64 of A-Z a-z 0-9 . + _ -")
    if not 1 <= tx.seq <= 2**62:
        raise TxError(INVALID, "seq must be in 1..2^62")


def _check_share(tx: GroupShare) -> None:
    if not _GROUP.fullmatch(tx.group):
        raise TxError(INVALID, f"group {tx.group[:64]!r}: 1..128 of A-Z a-z 0-9 . _ : / @ + -, "
                      "first a letter or digit")
    if len(tx.recipient) != 32:
        raise TxError(INVALID, "recipient must be a 32-byte node key")
    if len(tx.sealed) != sealing.SEALED_BYTES:
        raise TxError(INVALID, f"sealed must be {sealing.SEALED_BYTES} bytes (ephemeral X25519 key, "
                      f"sealed salt, tag), not {len(tx.sealed)}")
    if int.from_bytes(tx.sealed[:32], "little") % 2**255 % _P in _SMALL_ORDER_U:
        raise TxError(INVALID, "the share's ephemeral key is a small-order X25519 point")
    if len(tx.fingerprint) != sealing.FINGERPRINT_BYTES:
        raise TxError(INVALID, f"fingerprint must be {sealing.FINGERPRINT_BYTES} bytes")

"""S-IDA (Krawczyk's secret-sharing information dispersal): split a message into n cloves,
any k of which rebuild it, while k-1 reveal nothing of it.

:func:`split` encrypts the message under a fresh 32-byte ChaCha20-Poly1305 key (zero nonce,
safe because the key is used once; the message id is the associated data), erasure-codes the
ciphertext into n shares (:mod:`~permamesh.overlay.erasure`), Shamir-splits the key
into n shares (:mod:`~permamesh.overlay.shamir`) and packs share i of each into clove
i (:class:`~permamesh.overlay.clove.Clove`), every clove carrying the fingerprints
of all n.

:class:`Rebuilder` is the receiving side (entry worker for requests, client for replies). It
takes cloves one at a time and returns the message once k that agree have arrived:

- a clove whose content does not match its own entry in the vector it carries is forged or
  corrupted: it is counted, logged at debug level and treated as missing;
- cloves of one message are grouped by the vector they carry, and only members of one group
  are combined, so a forger's self-consistent fake vector forms its own group and cannot
  poison the honest one;
- the AEAD tag must verify; if it does not, other k-subsets of the group are tried as more
  cloves arrive (at most ``max_subset_tries`` per group, after which the group is shut, so a
  forger's groups cannot spend the honest group's attempts);
- memory is bounded (pending messages, cloves per message, bytes in all), duplicates and late
  cloves of completed messages are ignored, and :meth:`Rebuilder.expire` drops stale
  messages by a clock the caller passes in: nothing here reads the wall clock.

What S-IDA does not give is sender authentication: whoever holds k cloves' worth of
positions can make a message of their own under any id. The onion layers and the session
keys above them authenticate who sent what; S-IDA gives confidentiality against fewer than
k relays, integrity against corruption, and availability despite n-k lost or forged cloves.

Callers: the client and the relay/proxy integration call :func:`split`,
:func:`~permamesh.overlay.clove.encode_clove`,
:func:`~permamesh.overlay.clove.decode_clove` and :class:`Rebuilder`; tests and the
benchmark (:mod:`permamesh.bench.codecs`) also call :func:`rebuild`.
"""

from __future__ import annotations

import itertools
import logging
import secrets
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field, fields

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from permamesh.overlay.clove import (
    MAX_MESSAGE_BYTES,
    MESSAGE_ID_BYTES,
    Clove,
    fingerprint,
)
from permamesh.overlay.erasure import DEFAULT_CODEC, ErasureCodec, check_params, get_codec
from permamesh.overlay.errors import OverlayError
from permamesh.overlay.shamir import combine, split_secret

logger = logging.getLogger(__name__)

_NONCE = bytes(12)  # every key encrypts exactly one message


def split(
    message: bytes,
    n: int = 4,
    k: int = 3,
    codec: ErasureCodec = DEFAULT_CODEC,
    message_id: bytes | None = None,
) -> list[Clove]:
    """The n cloves of ``message`` (at most 1 MiB); any k rebuild it. A fresh random
    ``message_id`` is drawn unless one is given (16 bytes)."""
    if not isinstance(message, (bytes, bytearray, memoryview)):
        raise OverlayError(f"message must be bytes, got {type(message).__name__}")
    if len(message) > MAX_MESSAGE_BYTES:
        raise OverlayError(f"message of {len(message)} bytes exceeds {MAX_MESSAGE_BYTES}")
    check_params(k, n)
    if not isinstance(codec, ErasureCodec):
        raise OverlayError(f"codec must be an ErasureCodec, got {type(codec).__name__}")
    if message_id is None:
        message_id = secrets.token_bytes(MESSAGE_ID_BYTES)
    if not isinstance(message_id, bytes) or len(message_id) != MESSAGE_ID_BYTES:
        raise OverlayError(f"message_id must be {MESSAGE_ID_BYTES} bytes")
    key = ChaCha20Poly1305.generate_key()
    ciphertext = ChaCha20Poly1305(key).encrypt(_NONCE, bytes(message), message_id)
    data_shares = codec.encode(ciphertext, k, n)
    key_shares = split_secret(key, k, n)
    length = len(ciphertext)
    cid = codec.codec_id
    fps = tuple(
        fingerprint(message_id, i, n, k, cid, length, key_shares[i][1], data_shares[i])
        for i in range(n)
    )
    return [
        Clove(message_id, i, n, k, cid, length, key_shares[i][1], data_shares[i], fps)
        for i in range(n)
    ]


def _open(cloves: list[Clove]) -> bytes | None:
    """The message from k cloves of one group, or None if the AEAD tag fails."""
    first = cloves[0]
    key = combine([(c.index + 1, c.key_share) for c in cloves])
    codec = get_codec(first.codec_id)
    shares = {c.index: c.data_share for c in cloves}
    ciphertext = codec.decode(shares, first.k, first.n, first.ciphertext_length)
    try:
        return ChaCha20Poly1305(key).decrypt(_NONCE, ciphertext, first.message_id)
    except InvalidTag:
        return None


@dataclass(frozen=True)
class RebuilderConfig:
    max_pending: int = 1024  # messages being rebuilt at once; the oldest is evicted beyond
    max_cloves_per_message: int = 16  # cloves kept per message id, all groups together
    max_pending_bytes: int = 64 << 20  # share bytes held in all; oldest messages evicted beyond
    max_completed: int = 4096  # completed message ids remembered (late cloves ignored)
    ttl_s: float = 30.0  # expire(now) drops a message first seen more than this long ago
    max_subset_tries: int = 16  # AEAD attempts per group of agreeing cloves, then it is shut

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) <= 0:
                raise OverlayError(f"RebuilderConfig.{f.name} must be positive")


@dataclass(frozen=True)
class RebuilderStats:
    """Counters since the rebuilder was made (a snapshot; see :meth:`Rebuilder.stats`)."""

    accepted: int = 0  # cloves kept for a pending message
    completed: int = 0  # messages rebuilt
    rejected: int = 0  # cloves whose content did not match their own fingerprint
    duplicates: int = 0  # cloves already held
    late: int = 0  # cloves of messages already rebuilt or given up on
    overflow: int = 0  # cloves dropped because their message held max_cloves_per_message
    decrypt_failures: int = 0  # k-subsets whose AEAD tag failed
    evicted: int = 0  # pending messages dropped to stay within memory bounds
    expired: int = 0  # pending messages dropped by expire()


@dataclass
class _Group:
    members: dict[int, Clove] = field(default_factory=dict)  # by index
    tries: int = 0  # AEAD attempts made with this group


@dataclass
class _Pending:
    first_seen: float
    groups: dict[tuple, _Group] = field(default_factory=dict)  # by vector and parameters
    cloves: int = 0
    size: int = 0  # share bytes held


def _group_key(clove: Clove) -> tuple:
    return (clove.fingerprints, clove.k, clove.codec_id, clove.ciphertext_length)


class Rebuilder:
    """Collects cloves of many messages; :meth:`add` returns each message once rebuilt."""

    def __init__(self, config: RebuilderConfig | None = None) -> None:
        self.config = config or RebuilderConfig()
        self._pending: OrderedDict[bytes, _Pending] = OrderedDict()
        self._done: OrderedDict[bytes, None] = OrderedDict()
        self._bytes = 0
        self._now = 0.0
        self._counts = {f.name: 0 for f in fields(RebuilderStats)}

    def stats(self) -> RebuilderStats:
        return RebuilderStats(**self._counts)

    @property
    def pending(self) -> int:
        """Messages with some cloves in and not yet rebuilt."""
        return len(self._pending)

    def __contains__(self, message_id: object) -> bool:
        """Whether ``message_id`` has cloves in and is not yet rebuilt."""
        return message_id in self._pending

    def add(self, clove: Clove, now: float | None = None) -> bytes | None:
        """Take one clove; the message if this clove completes it, else None.

        ``now`` (seconds on the caller's clock) stamps a message's first clove for
        :meth:`expire`; left out, the last time seen by ``add`` or ``expire`` is used.
        """
        if not isinstance(clove, Clove):
            raise OverlayError(f"Rebuilder.add takes a Clove, got {type(clove).__name__}")
        if now is not None:
            self._now = now
        mid = clove.message_id
        if mid in self._done:
            self._counts["late"] += 1
            return None
        if not clove.is_self_consistent():
            self._counts["rejected"] += 1
            logger.debug("clove %d of %s rejected: content does not match its fingerprint",
                         clove.index, mid.hex())
            return None
        entry = self._pending.get(mid)
        if entry is None:
            entry = self._pending[mid] = _Pending(first_seen=self._now)
        if entry.cloves >= self.config.max_cloves_per_message:
            self._counts["overflow"] += 1
            return None
        group = entry.groups.setdefault(_group_key(clove), _Group())
        if clove.index in group.members:  # same vector entry, so same content
            self._counts["duplicates"] += 1
            return None
        if group.tries >= self.config.max_subset_tries:
            self._counts["overflow"] += 1
            return None
        group.members[clove.index] = clove
        size = len(clove.data_share) + len(clove.key_share)
        entry.cloves += 1
        entry.size += size
        self._bytes += size
        self._counts["accepted"] += 1
        message = self._try_open(mid, group, clove) if len(group.members) >= clove.k else None
        if message is None:
            self._enforce_bounds(keep=mid)
        return message

    def _try_open(self, mid: bytes, group: _Group, new: Clove) -> bytes | None:
        """Try the k-subsets of ``group`` that include the newly added clove (the others were
        tried when their last member came in), within the group's attempt budget."""
        others = sorted(i for i in group.members if i != new.index)
        for subset in itertools.combinations(others, new.k - 1):
            if group.tries >= self.config.max_subset_tries:
                logger.info("message %s: a clove group used its %d AEAD attempts; shut",
                            mid.hex(), group.tries)
                return None
            group.tries += 1
            message = _open([group.members[i] for i in subset] + [new])
            if message is not None:
                self._finish(mid)
                self._counts["completed"] += 1
                return message
            self._counts["decrypt_failures"] += 1
            logger.debug("message %s: AEAD failed for cloves %s", mid.hex(), (*subset, new.index))
        return None

    def _finish(self, mid: bytes) -> None:
        entry = self._pending.pop(mid, None)
        if entry is not None:
            self._bytes -= entry.size
        self._done[mid] = None
        while len(self._done) > self.config.max_completed:
            self._done.popitem(last=False)

    def _drop(self, mid: bytes, reason: str) -> None:
        entry = self._pending.pop(mid)
        self._bytes -= entry.size
        self._counts[reason] += 1
        logger.debug("message %s %s with %d clove(s)", mid.hex(), reason, entry.cloves)

    def _enforce_bounds(self, keep: bytes) -> None:
        cfg = self.config
        while len(self._pending) > cfg.max_pending or self._bytes > cfg.max_pending_bytes:
            oldest = next(iter(self._pending))
            if oldest == keep:
                if len(self._pending) == 1:
                    break
                self._pending.move_to_end(keep)
                continue
            self._drop(oldest, "evicted")

    def expire(self, now: float) -> int:
        """Drop messages first seen more than ``ttl_s`` before ``now``; how many were dropped."""
        self._now = now
        stale = [m for m, e in self._pending.items() if now - e.first_seen > self.config.ttl_s]
        for mid in stale:
            self._drop(mid, "expired")
        return len(stale)


def rebuild(cloves: Iterable[Clove]) -> bytes:
    """The message from a batch of cloves (any order, forged ones allowed); raises
    :class:`OverlayError` if no k of them agree and decrypt."""
    rebuilder = Rebuilder(RebuilderConfig(max_cloves_per_message=255 * 4))
    seen = 0
    for clove in cloves:
        seen += 1
        message = rebuilder.add(clove)
        if message is not None:
            return message
    stats = rebuilder.stats()
    raise OverlayError(
        f"cannot rebuild from {seen} clove(s): {stats.rejected} rejected, "
        f"{stats.decrypt_failures} failed to decrypt, too few agreeing"
    )

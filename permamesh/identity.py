"""Node identity: the long-term keys a permamesh node signs and agrees keys with.

Every node holds one Ed25519 signing key (who it is; its ``node_id`` is derived from it) and
one X25519 key-exchange key (for the onion layers). Servers call
:meth:`NodeIdentity.load_or_create` at start-up; clients call :meth:`NodeIdentity.generate`
per session; the wire, routing and committee code call :func:`verify_signature` and
:meth:`PublicIdentity.verify` on whatever peers send. All use of the ``cryptography`` library
stays inside this module.

Key files are PKCS8 PEM without encryption, one per key: ``<dir>/<name>.ed25519`` and
``<dir>/<name>.x25519``, mode 0600 in a directory created with mode 0700.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import re
import secrets
import stat
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from permamesh.errors import PermameshError

logger = logging.getLogger(__name__)

SIGNATURE_BYTES = 64
PUBLIC_KEY_BYTES = 32
PRIVATE_KEY_BYTES = 32
_MAX_HKDF_BYTES = 255 * 32  # RFC 5869 limit for SHA-256
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
_P = 2**255 - 19  # edwards25519 field prime
_D = -121665 * pow(121666, _P - 2, _P) % _P  # edwards25519 curve constant d


class IdentityError(PermameshError):
    """A key, key file or peer public key could not be used."""


def _is_small_order(public_key: bytes) -> bool:
    """True if the Ed25519 point's order divides 8 (OpenSSL accepts such keys).

    With a small-order key one signature can be valid for many messages, so such keys are
    refused (as libsodium does). Doubling on edwards25519 depends on y alone; y = Y/Z here
    (projective, so no inversions) and [8]P is the identity iff its y is 1.
    """
    y_num, y_den = int.from_bytes(public_key, "little") & ((1 << 255) - 1), 1
    for _ in range(3):
        a, b = y_num * y_num % _P, y_den * y_den % _P  # y^2 = a/b, x^2 = n/m
        n, m = (a - b) % _P, (_D * a + b) % _P
        y_num, y_den = (a * m + n * b) % _P, (b * m - _D * n * a) % _P
    return y_den != 0 and y_num == y_den


def verify_signature(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """Ed25519 verify; ``False`` (never an exception) for anything a peer could get wrong.

    Non-bytes or wrong-length arguments, small-order public keys, undecodable points and bad
    signatures all return ``False`` and are logged at debug level.
    """
    if not all(isinstance(v, (bytes, bytearray)) for v in (public_key, signature, data)):
        logger.debug("signature rejected: non-bytes argument")
        return False
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        logger.debug("signature rejected: key %dB, sig %dB", len(public_key), len(signature))
        return False
    if _is_small_order(bytes(public_key)):
        logger.debug("signature rejected: small-order public key")
        return False
    try:
        key = ed25519.Ed25519PublicKey.from_public_bytes(bytes(public_key))
        key.verify(bytes(signature), bytes(data))
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm) as exc:
        logger.debug("signature rejected: %s", type(exc).__name__)
        return False
    return True


def _raw_private(raw: object, what: str) -> bytes:
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != PRIVATE_KEY_BYTES:
        raise IdentityError(f"{what} private key must be {PRIVATE_KEY_BYTES} raw bytes")
    return bytes(raw)


class _PrivateKey:
    """What the two private-key wrappers share; subclasses narrow ``_key``."""

    __slots__ = ("_key",)
    _key: ed25519.Ed25519PrivateKey | x25519.X25519PrivateKey

    def private_bytes(self) -> bytes:
        raw, no_encryption = serialization.Encoding.Raw, serialization.NoEncryption()
        return self._key.private_bytes(raw, serialization.PrivateFormat.Raw, no_encryption)

    @property
    def public_bytes(self) -> bytes:
        return self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def _pem(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def __repr__(self) -> str:  # never shows private material
        return f"{type(self).__name__}(public={self.public_bytes.hex()[:16]}...)"


class SigningKey(_PrivateKey):
    """An Ed25519 private key."""

    __slots__ = ()
    _key: ed25519.Ed25519PrivateKey

    def __init__(self, key: ed25519.Ed25519PrivateKey) -> None:
        self._key = key

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(ed25519.Ed25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> SigningKey:
        return cls(ed25519.Ed25519PrivateKey.from_private_bytes(_raw_private(raw, "Ed25519")))

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)


class KeyExchangeKey(_PrivateKey):
    """An X25519 private key; :meth:`derive` turns an agreement into a symmetric key."""

    __slots__ = ()
    _key: x25519.X25519PrivateKey

    def __init__(self, key: x25519.X25519PrivateKey) -> None:
        self._key = key

    @classmethod
    def generate(cls) -> KeyExchangeKey:
        return cls(x25519.X25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> KeyExchangeKey:
        return cls(x25519.X25519PrivateKey.from_private_bytes(_raw_private(raw, "X25519")))

    def derive(
        self, peer_public: bytes, info: bytes, length: int = 32, salt: bytes | None = None
    ) -> bytes:
        """X25519 with ``peer_public``, then HKDF-SHA256 to ``length`` bytes.

        A malformed peer key (not 32 bytes, or a low-order point giving an all-zero shared
        secret) raises :class:`IdentityError`; a bad ``length`` is a caller bug (ValueError).
        """
        if not 1 <= length <= _MAX_HKDF_BYTES:
            raise ValueError(f"length must be in 1..{_MAX_HKDF_BYTES}, got {length}")
        if not isinstance(peer_public, (bytes, bytearray)) or len(peer_public) != PUBLIC_KEY_BYTES:
            raise IdentityError(f"X25519 peer public key must be {PUBLIC_KEY_BYTES} bytes")
        try:
            peer = x25519.X25519PublicKey.from_public_bytes(bytes(peer_public))
            shared = self._key.exchange(peer)
        except ValueError as exc:
            raise IdentityError(f"unusable X25519 peer public key: {exc}") from exc
        return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(shared)


@dataclass(frozen=True)
class PublicIdentity:
    """What peers know of a node: its two public keys."""

    sign_key: bytes  # Ed25519 public, 32 bytes
    kex_key: bytes  # X25519 public, 32 bytes

    def __post_init__(self) -> None:
        for field, value in (("sign_key", self.sign_key), ("kex_key", self.kex_key)):
            if not isinstance(value, bytes) or len(value) != PUBLIC_KEY_BYTES:
                raise IdentityError(f"PublicIdentity.{field} must be {PUBLIC_KEY_BYTES} bytes")

    @property
    def node_id(self) -> str:
        """First 16 hex chars of sha256(sign_key): a short stable name for logs and registries."""
        return hashlib.sha256(self.sign_key).hexdigest()[:16]

    def verify(self, data: bytes, signature: bytes) -> bool:
        return verify_signature(self.sign_key, signature, data)


def _check_permissions(path: pathlib.Path) -> None:
    if os.name != "posix":
        return
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise IdentityError(
            f"key file {path} has permissions {mode:04o}, open to group/other; "
            f"run `chmod 600 {path}`"
        )


def _read_key(path: pathlib.Path) -> object:
    _check_permissions(path)
    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise IdentityError(f"key file {path} is corrupt or not a PEM private key") from exc


def _write_key(path: pathlib.Path, pem: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    logger.info("created key file %s", path)


def _wrong_kind(path: pathlib.Path, key: object, expected: str) -> IdentityError:
    return IdentityError(f"key file {path} holds a {type(key).__name__}, not an {expected} key")


class NodeIdentity:
    """A node's long-term keys: one Ed25519 signing key, one X25519 key-exchange key."""

    __slots__ = ("signing", "kex")

    def __init__(self, signing: SigningKey, kex: KeyExchangeKey) -> None:
        self.signing = signing
        self.kex = kex

    @classmethod
    def generate(cls) -> NodeIdentity:
        """Fresh keys held only in memory (clients use one per session)."""
        return cls(SigningKey.generate(), KeyExchangeKey.generate())

    @classmethod
    def load_or_create(cls, directory: pathlib.Path | str, name: str = "node") -> NodeIdentity:
        """Load ``<directory>/<name>.ed25519`` and ``.x25519``, creating whichever is missing.

        Files are PKCS8 PEM, unencrypted, written atomically with mode 0600; ``directory`` is
        created with mode 0700 if missing. A key file with group/other permission bits, a
        corrupt file, or a ``name`` outside ``[A-Za-z0-9_.-]+`` raises :class:`IdentityError`.
        Two processes creating the same identity at once is not supported (last writer wins).
        """
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise IdentityError(f"identity name {name!r} must match [A-Za-z0-9_.-]+")
        directory = pathlib.Path(directory)
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            sign_path, kex_path = directory / f"{name}.ed25519", directory / f"{name}.x25519"
            if sign_path.exists():
                key = _read_key(sign_path)
                if not isinstance(key, ed25519.Ed25519PrivateKey):
                    raise _wrong_kind(sign_path, key, "Ed25519")
                signing = SigningKey(key)
            else:
                signing = SigningKey.generate()
                _write_key(sign_path, signing._pem())
            if kex_path.exists():
                kex_key = _read_key(kex_path)
                if not isinstance(kex_key, x25519.X25519PrivateKey):
                    raise _wrong_kind(kex_path, kex_key, "X25519")
                kex = KeyExchangeKey(kex_key)
            else:
                kex = KeyExchangeKey.generate()
                _write_key(kex_path, kex._pem())
        except OSError as exc:
            raise IdentityError(f"cannot load or create identity {name!r}: {exc}") from exc
        identity = cls(signing, kex)
        logger.debug("identity %s loaded from %s", identity.node_id, directory)
        return identity

    @property
    def public(self) -> PublicIdentity:
        return PublicIdentity(sign_key=self.signing.public_bytes, kex_key=self.kex.public_bytes)

    @property
    def node_id(self) -> str:
        return self.public.node_id

    @property
    def transport(self) -> KeyExchangeKey:
        """The node's transport key: the Curve25519 key its servers present on encrypted links
        (CurveZMQ). Derived from the signing key with HKDF under its own label, so it is
        distinct from both long-term keys and needs no key file of its own."""
        seed = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                    info=b"permamesh transport key v1").derive(self.signing.private_bytes())
        return KeyExchangeKey.from_private_bytes(seed)

    def sign(self, data: bytes) -> bytes:
        return self.signing.sign(data)

    def __repr__(self) -> str:
        return f"NodeIdentity(node_id={self.node_id})"

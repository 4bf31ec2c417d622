"""TLS for a CometBFT node's RPC, pinned to the committee member's Ed25519 identity key.

Server side: CometBFT serves its RPC over HTTPS when ``[rpc] tls_cert_file`` and
``tls_key_file`` are both set (paths absolute, or relative to its config directory). The key
file is the member's own identity key (``keys/validator.ed25519``, PKCS#8 PEM, which Go's TLS
stack reads as is), so no second secret exists; :func:`write_certificate` makes the matching
self-signed X.509 certificate (``rpc_cert.pem`` in the validator's home). Nothing in the
certificate but its key matters: no CA signs it, and its dates and names are not checked.

Client side: :class:`PinnedHTTPSConnection` is an ``http.client`` HTTPS connection that
speaks TLS 1.3 only and, after each handshake, compares the key in the peer's certificate
with the pinned one (the ``?key=`` of ``https://HOST:PORT?key=HEX``). TLS 1.3's
CertificateVerify is a signature over the handshake by that key, which OpenSSL checks during
the handshake, so a peer that completes it holds the key: a match authenticates the member, a
mismatch is a :class:`PinMismatch` and the connection is closed before any request is sent.
The connection stays open between requests (one handshake per connection, not per call).

Who calls it: :class:`~permamesh.committee.cometbft.rpc.CometRPC` (client),
:class:`~permamesh.committee.cometbft.network.CometNet` and ``permamesh validator --engine
cometbft`` (certificates).
"""

from __future__ import annotations

import datetime
import hmac
import http.client
import logging
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

from permamesh.committee.errors import CommitteeError
from permamesh.identity import NodeIdentity

log = logging.getLogger(__name__)

CERT_NAME = "rpc_cert.pem"  # in the validator's home, next to keys/
_FOREVER = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.timezone.utc)  # RFC 5280 4.1.2.5


class PinMismatch(CommitteeError):
    """The RPC's TLS certificate holds another key than the endpoint pins (or none we can read)."""


def certificate(identity: NodeIdentity) -> bytes:
    """A self-signed X.509 certificate (PEM) for ``identity``'s Ed25519 signing key."""
    key = ed25519.Ed25519PrivateKey.from_private_bytes(identity.signing.private_bytes())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"permamesh validator {identity.node_id}")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(_FOREVER)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key, None))  # Ed25519 signs without a separate digest
    return cert.public_bytes(serialization.Encoding.PEM)


def certificate_key(pem_or_der: bytes) -> bytes | None:
    """The raw Ed25519 public key a certificate holds; None if it holds another kind, or
    cannot be read."""
    try:
        if pem_or_der.lstrip().startswith(b"-----"):
            cert = x509.load_pem_x509_certificate(pem_or_der)
        else:
            cert = x509.load_der_x509_certificate(pem_or_der)
        key = cert.public_key()
    except (ValueError, TypeError) as exc:
        log.debug("unreadable certificate: %s", exc)
        return None
    return key.public_bytes_raw() if isinstance(key, ed25519.Ed25519PublicKey) else None


def write_certificate(identity: NodeIdentity, path: Path) -> Path:
    """``path`` holding a certificate for ``identity``'s key: kept if it already does, else
    (re)written atomically."""
    path = Path(path)
    try:
        if certificate_key(path.read_bytes()) == identity.public.sign_key:
            return path
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(certificate(identity))
    os.replace(tmp, path)
    log.info("wrote the RPC certificate %s for %s", path, identity.node_id)
    return path


def client_context() -> ssl.SSLContext:
    """TLS 1.3 only; no CA and no host name checks: the key is checked against the pin instead."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


_CONTEXT: ssl.SSLContext | None = None


def _context() -> ssl.SSLContext:
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = client_context()
    return _CONTEXT


def check_pin(sock: ssl.SSLSocket, pin: bytes, where: str) -> None:
    """Raise :class:`PinMismatch` unless the peer's certificate holds the key ``pin``."""
    der = sock.getpeercert(binary_form=True)
    held = certificate_key(der) if der else None
    if held is None:
        raise PinMismatch(f"{where}: the RPC's TLS certificate holds no Ed25519 key; refused (the "
                          f"endpoint pins {pin.hex()[:16]}...)")
    if not hmac.compare_digest(held, pin):
        raise PinMismatch(f"{where}: the RPC's TLS certificate holds key {held.hex()[:16]}..., not the "
                          f"pinned key {pin.hex()[:16]}... named in ?key=: refused (a wrong key, or "
                          "not that validator)")


class PinnedHTTPSConnection(http.client.HTTPSConnection):
    """An HTTPS connection whose every handshake must end at the key ``pin``."""

    def __init__(self, host: str, port: int, pin: bytes, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=_context())
        self.pin = pin

    def connect(self) -> None:
        super().connect()
        try:
            check_pin(self.sock, self.pin, f"{self.host}:{self.port}")
        except PinMismatch:
            self.sock.close()
            self.sock = None
            raise

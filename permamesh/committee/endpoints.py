"""Committee endpoints: how a node or client names a validator, and which links are allowed.

Every link from a node to a validator is encrypted, and the validator authenticated by a key
the endpoint itself names, the way worker and relay links are (:mod:`permamesh.transport`):

| endpoint | engine | the link |
|---|---|---|
| ``https://HOST:PORT?key=HEX`` | a CometBFT node's RPC | TLS 1.3; HEX is the member's Ed25519 node key (as the ledger knows it), the key its RPC certificate must hold (:mod:`permamesh.committee.cometbft.tls`) |
| ``tcp://HOST:PORT?key=HEX`` | a devnet validator | CurveZMQ; HEX is the member's transport key (``NodeIdentity.transport``) |
| ``http://HOST:PORT`` | a CometBFT node's RPC, plain | only to this machine (loopback): local tooling |
| ``tcp://HOST:PORT`` | a devnet validator, plain ZMTP | only to this machine (loopback) |

Anything else is refused with an :class:`EndpointError` that says what to write instead:
plain links to another host, ``https://`` without a key, a key on ``http://``, a key that is
not 64 hex characters. :func:`parse_endpoint` is the one place that judges; the committee
client, the CometBFT RPC client, ``--join`` and the directory's validator list all go through
it. The canonical form (:meth:`CommitteeEndpoint.__str__`) writes the key in lowercase hex.

Who calls it: :class:`~permamesh.committee.client.CommitteeClient`,
:class:`~permamesh.committee.cometbft.rpc.CometRPC`, ``CometNet`` and ``Devnet`` (their
``endpoints``), :func:`permamesh.directory.committee.parse_join`,
:meth:`permamesh.directory.snapshot.Snapshot.validators`,
:func:`permamesh.directory.announce.publish_validators`.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import urllib.parse
from dataclasses import dataclass

from permamesh.committee.errors import CommitteeError

log = logging.getLogger(__name__)

SCHEMES = ("https", "tcp", "http")
KEY_MARK = "?key="
_HEX64 = re.compile(r"[0-9A-Fa-f]{64}")
FORMS = ("https://HOST:PORT?key=HEX (a CometBFT validator's RPC) or tcp://HOST:PORT?key=HEX "
         "(a devnet validator)")
_KEY_OF = {"https": "its Ed25519 node key", "tcp": "its transport key"}


class EndpointError(CommitteeError):
    """A validator address that is malformed, or names a link we refuse (plain to another host)."""

    def __init__(self, endpoint: str, reason: str) -> None:
        super().__init__(f"{endpoint!r}: {reason}")
        self.endpoint, self.reason = endpoint, reason


@dataclass(frozen=True)
class CommitteeEndpoint:
    """One validator address, checked."""

    scheme: str  # "https", "http" or "tcp"
    host: str  # a name or an IP address, without IPv6 brackets
    port: int
    key: bytes | None  # https: the Ed25519 node key; tcp: the transport key; None: a plain link

    @property
    def hostport(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def address(self) -> str:
        """``scheme://HOST:PORT``, without the key."""
        return f"{self.scheme}://{self.hostport}"

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    def __str__(self) -> str:
        return self.address if self.key is None else f"{self.address}{KEY_MARK}{self.key.hex()}"


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses (127.0.0.0/8, ::1); names are not
    resolved, so a name other than ``localhost`` is never loopback."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _split(text: str) -> tuple[str, str, int, str | None]:
    """(scheme, host, port, key hex or None), or EndpointError for a malformed address."""
    address, mark, key = text.partition(KEY_MARK)
    try:
        url = urllib.parse.urlsplit(address)
        port = url.port
    except ValueError as exc:
        raise EndpointError(text, f"not HOST:PORT ({exc})") from None
    if url.scheme not in SCHEMES:
        raise EndpointError(text, f"a validator address is {FORMS}")
    if (not url.hostname or port is None or not 0 < port < 65536 or url.username is not None
            or url.query or url.fragment or url.path not in ("", "/")):
        raise EndpointError(text, f"a validator address is {url.scheme}://HOST:PORT"
                                  f"{KEY_MARK + 'HEX' if url.scheme != 'http' else ''}, nothing more")
    return url.scheme, url.hostname, port, (key if mark else None)


def parse_endpoint(text: str) -> CommitteeEndpoint:
    """A validator address -> :class:`CommitteeEndpoint`, if it is well formed and allowed."""
    if not isinstance(text, str):
        raise EndpointError(repr(text), "a validator address is a string")
    scheme, host, port, key_hex = _split(text.strip())
    if key_hex is not None and scheme == "http":
        raise EndpointError(text, "plain http:// cannot be pinned to a key: use https://HOST:PORT?key=HEX")
    if key_hex is not None and not _HEX64.fullmatch(key_hex):
        raise EndpointError(text, f"the key must be 64 hex characters ({_KEY_OF[scheme]}, as "
                                  "`permamesh validator` prints it in the endpoint)")
    key = bytes.fromhex(key_hex) if key_hex is not None else None
    endpoint = CommitteeEndpoint(scheme, host, port, key)
    if scheme == "https" and key is None:
        raise EndpointError(text, "https:// needs the validator's key: https://HOST:PORT?key=HEX, HEX "
                                  "being its Ed25519 node key (`permamesh validator` prints the endpoint)")
    if key is None and not endpoint.loopback:
        if scheme == "http":
            raise EndpointError(text, f"plain http:// is allowed only to this machine (loopback); reach "
                                      f"the validator at {host} over TLS pinned to its node key: "
                                      "use https://HOST:PORT?key=HEX")
        raise EndpointError(text, f"a devnet validator at {host} is reached over CurveZMQ: use "
                                  "tcp://HOST:PORT?key=HEX, HEX being its transport key")
    return endpoint


def rpc_endpoint(host: str, port: int, node_key: bytes | None) -> str:
    """A CometBFT RPC endpoint: pinned ``https://`` for ``node_key``, plain ``http://`` for None."""
    scheme = "http" if node_key is None else "https"
    return str(CommitteeEndpoint(scheme, host.strip("[]"), port, node_key))


def devnet_endpoint(host: str, port: int, transport_key: bytes | None) -> str:
    """A devnet validator's endpoint, naming its transport key (None: plain, loopback only)."""
    return str(CommitteeEndpoint("tcp", host.strip("[]"), port, transport_key))

"""A node's signed presence over HTTP: how a committee member probes a gateway.

Workers and relays answer a member's probe on their CURVE link with a signed wire frame
(:mod:`permamesh.committee.liveness`). A gateway speaks HTTP, so it proves it holds its key
the same way over its own port: ``GET /api/presence?challenge=HEX`` answers
``{"node": <its Ed25519 key, hex>, "challenge": HEX, "signature": <hex>}``, the signature over
:data:`DOMAIN` + the challenge bytes. :func:`check_presence` accepts an answer only from the key
the directory names and only for the challenge just sent, so a replayed or relayed answer
proves nothing.

Who calls it: the gateway (:func:`presence_answer`, from its route) and the liveness prober
(:func:`probe_http`).
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request

from permamesh.identity import NodeIdentity, verify_signature

log = logging.getLogger(__name__)

DOMAIN = b"permamesh presence v1\0"
MIN_CHALLENGE, MAX_CHALLENGE = 16, 64  # bytes
MAX_ANSWER_BYTES = 4096


class PresenceError(ValueError):
    """A presence request or answer is malformed."""


def parse_challenge(text: str | None) -> bytes:
    """The ``challenge`` query value (hex) -> bytes, or PresenceError with the reason."""
    try:
        raw = bytes.fromhex(text or "")
    except ValueError:
        raise PresenceError("challenge must be hex") from None
    if not MIN_CHALLENGE <= len(raw) <= MAX_CHALLENGE:
        raise PresenceError(f"challenge must be {MIN_CHALLENGE}..{MAX_CHALLENGE} bytes")
    return raw


def presence_answer(identity: NodeIdentity, challenge: bytes) -> dict:
    """What a gateway answers a probe with."""
    return {"node": identity.public.sign_key.hex(), "challenge": challenge.hex(),
            "signature": identity.sign(DOMAIN + challenge).hex()}


def check_presence(answer: object, node_key: bytes, challenge: bytes) -> bool:
    """Whether ``answer`` is ``node_key``'s signature over this ``challenge``."""
    if not isinstance(answer, dict):
        return False
    try:
        key, echoed = bytes.fromhex(answer["node"]), bytes.fromhex(answer["challenge"])
        signature = bytes.fromhex(answer["signature"])
    except (KeyError, TypeError, ValueError):
        return False
    return key == node_key and echoed == challenge and verify_signature(node_key, signature, DOMAIN + challenge)


def probe_http(endpoint: str, node_key: bytes, timeout_s: float) -> int | None:
    """Round trip in microseconds of a valid presence answer from the node at ``endpoint``
    (``tcp://HOST:PORT`` as announced; asked over HTTP), or None."""
    address = endpoint.removeprefix("tcp://").split("?", 1)[0]
    challenge = os.urandom(32)
    url = f"http://{address}/api/presence?challenge={challenge.hex()}"
    started = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as reply:  # noqa: S310 - http to an announced node
            body = reply.read(MAX_ANSWER_BYTES + 1)
        elapsed = time.monotonic() - started
        if len(body) > MAX_ANSWER_BYTES:
            return None
        answer = json.loads(body)
    except (OSError, urllib.error.URLError, ValueError) as exc:
        log.debug("presence probe of %s: %s", address, exc)
        return None
    return max(1, int(elapsed * 1e6)) if check_presence(answer, node_key, challenge) else None

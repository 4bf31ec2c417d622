"""A group's salt sealed to one worker: the ``sealed`` bytes of a :class:`~txs.GroupShare`.

Workers of a group key their block hashes with a 32-byte salt (:mod:`permamesh.routing.blocks`)
that only they know. The committee's ledger holds it once per worker, sealed to that worker's
registered X25519 key (``kex_key``), so validators store and serve shares they cannot open,
and a relay or observer reading the ledger learns nothing but sizes.

``sealed`` is 80 bytes::

    epk (32) || ChaCha20-Poly1305(key, nonce = 12 zero bytes, salt, aad) (32 + 16-byte tag)
    key = HKDF-SHA256(X25519(ephemeral, recipient kex_key), info = LABEL || epk || kex_key)
    aad = LABEL || chain id || group || recipient node key   (each with a 2-byte length)

The ephemeral key is fresh for every seal, so each AEAD key is used once and the fixed nonce
is safe. The AAD binds a share to its chain, group and recipient: a share copied into another
tx (another chain, group or recipient) does not open.

:func:`fingerprint` is a public 16-byte name of a salt (BLAKE2b keyed with the salt, over the
group name; the salt's 256 random bits make it unguessable). The founder's fingerprint is kept
with the group on the ledger: every later share must carry it, and a recipient checks that
what it opened has it, so a member cannot hand a newcomer a different salt unnoticed.

Who calls it: :mod:`permamesh.directory.groupsalt` (workers seal and open);
:mod:`permamesh.committee.txs` checks the sizes.
"""

from __future__ import annotations

import logging
from hashlib import blake2b

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from permamesh.identity import IdentityError, KeyExchangeKey, NodeIdentity

log = logging.getLogger(__name__)

SALT_BYTES = 32
TAG_BYTES = 16
SEALED_BYTES = 32 + SALT_BYTES + TAG_BYTES  # ephemeral public key, ciphertext, tag
FINGERPRINT_BYTES = 16
LABEL = b"permamesh group share v1"
_NONCE = bytes(12)  # each key seals exactly one salt


def _field(value: bytes) -> bytes:
    return len(value).to_bytes(2, "big") + value


def _aad(chain_id: str, group: str, recipient: bytes) -> bytes:
    return LABEL + _field(chain_id.encode()) + _field(group.encode()) + _field(recipient)


def fingerprint(salt: bytes, group: str) -> bytes:
    """The salt's public name within ``group`` (what the ledger and recipients compare)."""
    return blake2b(group.encode(), key=salt, digest_size=FINGERPRINT_BYTES,
                   person=b"pm/salt-finger").digest()


def seal(salt: bytes, *, chain_id: str, group: str, recipient: bytes, recipient_kex: bytes) -> bytes:
    """``salt`` sealed to the worker whose node key is ``recipient`` and X25519 key is
    ``recipient_kex``. An unusable ``recipient_kex`` raises :class:`IdentityError`."""
    if len(salt) != SALT_BYTES:
        raise ValueError(f"a group salt is {SALT_BYTES} bytes, not {len(salt)}")
    ephemeral = KeyExchangeKey.generate()
    epk = ephemeral.public_bytes
    key = ephemeral.derive(recipient_kex, LABEL + epk + recipient_kex)
    return epk + ChaCha20Poly1305(key).encrypt(_NONCE, salt, _aad(chain_id, group, recipient))


def open_sealed(sealed: bytes, identity: NodeIdentity, *, chain_id: str, group: str) -> bytes | None:
    """The salt in ``sealed`` if it was sealed to ``identity`` for this chain and group; None
    otherwise (another recipient, chain or group, or bytes someone tampered with)."""
    if not isinstance(sealed, bytes) or len(sealed) != SEALED_BYTES:
        log.debug("share refused: %s bytes, not %d", len(sealed) if isinstance(sealed, bytes) else "no",
                  SEALED_BYTES)
        return None
    epk, box = sealed[:32], sealed[32:]
    own_kex = identity.public.kex_key
    try:
        key = identity.kex.derive(epk, LABEL + epk + own_kex)
        return ChaCha20Poly1305(key).decrypt(_NONCE, box, _aad(chain_id, group, identity.public.sign_key))
    except (IdentityError, InvalidTag) as exc:
        log.debug("share does not open for %s: %s", identity.node_id, type(exc).__name__)
        return None

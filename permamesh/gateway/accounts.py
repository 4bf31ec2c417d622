"""API keys and per-key credit: who may call the gateway, and what each key's jobs cost.

- :class:`KeyRing`: the gateway's keys, ``DATA_DIR/gateway/keys.json``, mapping the sha256 of
  each secret to a name (the secret itself is never stored). ``permamesh gateway --new-key
  NAME`` makes one and prints it once. Each name has its own Ed25519 identity
  (``DATA_DIR/keys/gateway-<name>``): that public key is the key's account on the
  committee's ledger, so each key's credit is its own.
- :class:`Credit`: with a committee, every job is admitted by the scheduler's
  :class:`~permamesh.scheduler.admission.Admission` (the account's available credit must
  cover the prompt's estimated tokens + ``max_tokens``; else HTTP 429 ``insufficient_quota``,
  saying the balance and the limit), and paid after its answer by a signed ``JobReceipt`` to
  the worker that served it, for the tokens used (:func:`job_units`: a prompt token whose KV
  came from the worker's prefix cache costs :data:`CACHED_SHARE` of one that was prefilled,
  since caching saved the partner that compute). The gateway has no tokenizer, so admission
  estimates the prompt at :data:`BYTES_PER_TOKEN` bytes a token (byte-level BPE on English
  averages ~4) plus the chat template: a large prompt is no longer refused for credit it
  would not use; the ledger checks the account again when the receipt is applied. Receipts of one key are numbered by a local nonce
  counter (seeded from ``/nonce``, one receipt of a key in flight at a time, resynced and
  retried once on a nonce refusal), so concurrent jobs of one key are all paid. Without a committee, jobs are only counted. Either way
  :meth:`Credit.usage` reports each key's requests and tokens (the dashboard shows them).

Who calls it: :mod:`permamesh.gateway.server` (``authorize`` per request, ``admit`` before
the job, ``settle`` after it).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from permamesh.gateway.errors import ApiError
from permamesh.identity import NodeIdentity

log = logging.getLogger(__name__)

KEY_PREFIX = "pm-"
BYTES_PER_TOKEN = 3  # admission's prompt estimate: bytes per token (byte-level BPE on text averages ~4)
TEMPLATE_TOKENS = 64  # what a chat template may add around the messages
CACHED_SHARE = (1, 4)  # a cached prompt token costs this fraction of a prefilled one


def estimate_tokens(text: str) -> int:
    """The prompt's tokens as admission counts them, before any worker tokenized it."""
    return -(-len(text.encode()) // BYTES_PER_TOKEN) + TEMPLATE_TOKENS


def job_units(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> int:
    """Credit units one answered job costs: prefilled prompt tokens and answer tokens in full,
    cached prompt tokens at :data:`CACHED_SHARE` (rounded up); at least 1."""
    cached = max(0, min(cached_tokens, prompt_tokens))
    num, den = CACHED_SHARE
    return max(1, prompt_tokens - cached + -(-cached * num // den) + completion_tokens)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class Caller:
    name: str
    identity: NodeIdentity  # the account on the ledger


class KeyRing:
    def __init__(self, data_dir: Path, open_access: bool = False) -> None:
        self.data_dir, self.open_access = Path(data_dir), open_access
        self.path = self.data_dir / "gateway" / "keys.json"
        self._identities: dict[str, NodeIdentity] = {}
        self._lock = threading.Lock()
        self._cache: tuple[tuple[int, int], dict[str, str]] | None = None  # ((mtime_ns, size), keys)

    def _load(self) -> dict[str, str]:
        """The keys file, re-read only when it changed (every request authorizes)."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return {}
        stamp = (st.st_mtime_ns, st.st_size)
        cache = self._cache
        if cache is not None and cache[0] == stamp:
            return cache[1]
        keys = self._read()
        self._cache = (stamp, keys)
        return keys

    def _read(self) -> dict[str, str]:
        try:
            keys = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.error("cannot read %s: %s", self.path, exc)
            return {}
        return {k: v for k, v in keys.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(keys, dict) else {}

    def new_key(self, name: str) -> str:
        """A fresh secret for ``name`` (printed once; only its digest is kept)."""
        if not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name):
            raise ApiError(400, "a key name is 1-64 letters, digits, '-', '_' or '.'")
        secret = KEY_PREFIX + secrets.token_urlsafe(24)
        with self._lock:
            keys = self._load()
            keys[_digest(secret)] = name
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(keys, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        self.identity(name)
        return secret

    def identity(self, name: str) -> NodeIdentity:
        with self._lock:
            ident = self._identities.get(name)
            if ident is None:
                ident = self._identities[name] = NodeIdentity.load_or_create(self.data_dir / "keys", f"gateway-{name}")
            return ident

    def names(self) -> list[str]:
        """Every key's name (the dashboard lists each one's credit)."""
        return sorted(set(self._load().values()))

    def authorize(self, header: str | None) -> Caller:
        """The caller named by an ``Authorization: Bearer <key>`` header, or 401."""
        secret = header[7:].strip() if header and header[:7].lower() == "bearer " else ""
        if secret:
            digest = _digest(secret)
            for known, name in self._load().items():
                if hmac.compare_digest(known, digest):
                    return Caller(name, self.identity(name))
        if self.open_access:
            return Caller("anonymous", self.identity("anonymous"))
        raise ApiError(401, "a valid API key is required: Authorization: Bearer <key> (make one with "
                            "`permamesh gateway --new-key NAME`)", code="invalid_api_key")


class SharedCommittee:
    """A CommitteeClient shared by the gateway's threads: one call at a time (its zmq sockets
    belong to whoever holds the lock)."""

    def __init__(self, client) -> None:
        self._client, self._lock = client, threading.Lock()

    def query(self, path: str, data: bytes = b""):
        with self._lock:
            return self._client.query(path, data)

    def submit(self, tx: bytes):
        with self._lock:
            return self._client.submit(tx)

    def close(self) -> None:
        with self._lock:
            self._client.close()


class Credit:
    def __init__(self, committee=None, chain_id: str | None = None) -> None:
        """``committee``: a :class:`~permamesh.committee.client.CommitteeClient`, or None.
        ``chain_id``: the ledger's, for signing receipts; default: asked of the committee."""
        self.committee = committee
        self._admission = None
        if committee is not None:
            from permamesh.scheduler.admission import Admission

            self._admission = Admission(committee.query, chain_id or committee.query("/status")["chain_id"])
        self._lock = threading.Lock()
        self._usage: dict[str, dict[str, int]] = defaultdict(lambda: {"requests": 0, "prompt_tokens": 0,
                                                                     "completion_tokens": 0, "refused": 0, "cached_tokens": 0,
                                                                     "units_paid": 0})
        self._workers: dict[str, bytes] = {}  # worker node id -> its key on the ledger
        self._nonces: dict[bytes, int] = {}  # account key -> the next nonce its receipt uses
        self._key_locks: dict[bytes, threading.Lock] = defaultdict(threading.Lock)  # one receipt in flight per key

    def admit(self, caller: Caller, prompt_text: str, max_tokens: int, n: int = 1) -> int:
        """Units reserved for ``n`` jobs of one request together (0 without a committee); 429
        when credit is short."""
        if self._admission is None:
            return 0
        from permamesh.errors import PermameshError
        from permamesh.scheduler.admission import OutOfCredit

        try:
            return self._admission.admit(caller.identity.public.sign_key, n * estimate_tokens(prompt_text),
                                         n * max_tokens).cost
        except OutOfCredit as exc:
            with self._lock:
                self._usage[caller.name]["refused"] += 1
            raise ApiError(429, f"key '{caller.name}': {exc}", code="insufficient_quota") from None
        except PermameshError as exc:  # the committee did not answer: no job runs unpaid
            raise ApiError(503, f"the committee could not check the credit of key '{caller.name}': {exc}",
                           code="committee_unavailable") from None

    def settle(self, caller: Caller, reserved: int, worker_id: str, prompt_tokens: int, completion_tokens: int,
               cached_tokens: int = 0) -> None:
        """Count the job; with a committee, pay the worker with a signed receipt for
        :func:`job_units` (blocking). ``reserved`` (admission's estimate) does not cap it: the
        ledger refuses a receipt the account cannot cover."""
        with self._lock:
            use = self._usage[caller.name]
            use["requests"] += 1
            use["prompt_tokens"] += prompt_tokens
            use["cached_tokens"] += cached_tokens
            use["completion_tokens"] += completion_tokens
        if self._admission is None:
            return
        worker = self._worker_key(worker_id)
        if worker is None:
            log.warning("worker %s is not in the committee's registry; job of %s not paid", worker_id, caller.name)
            return
        units = job_units(prompt_tokens, completion_tokens, cached_tokens)
        outcome = self._pay(caller.identity, worker, units)
        if outcome.code == 0:
            with self._lock:
                self._usage[caller.name]["units_paid"] += units
        else:
            log.warning("receipt of %s for %d units refused: code %d", caller.name, units, outcome.code)

    def _pay(self, user: NodeIdentity, worker: bytes, units: int):
        """Submit ``user``'s receipt paying ``worker`` for ``units``; the committee's outcome.

        Nonces are allocated from a local counter under the key's lock, held until the
        receipt's outcome is known (submit waits for the commit), so two jobs of one key never
        sign with one nonce nor reach the committee out of order. The counter is seeded from
        ``/nonce``, and dropped (re-read next time) whenever the outcome leaves it unsure; a
        nonce refusal (another gateway, a restart, a lost answer) resyncs it and retries once.
        """
        from permamesh.committee import txs

        key = user.public.sign_key
        with self._lock:
            key_lock = self._key_locks[key]
        with key_lock:
            job_id = os.urandom(16)  # one job, one id: a retry can never pay it twice
            for retry in (False, True):
                nonce = self._nonces.pop(key, None)
                if nonce is None:
                    nonce = self.committee.query("/nonce", key)["next"]
                tx = txs.JobReceipt(chain_id=self._admission.chain_id, nonce=nonce, worker=worker,
                                    units=max(1, units), job_id=job_id)
                outcome = self.committee.submit(txs.sign_tx(tx, user))  # raises: the counter stays dropped
                if outcome.code == 0 or outcome.committed:  # a committed tx consumed its nonce
                    self._nonces[key] = nonce + 1
                if outcome.code != txs.BAD_NONCE or retry:
                    break
                log.info("receipt nonce %d of %s refused (%s); resyncing from the committee", nonce,
                         key.hex()[:16], outcome.log)
            return outcome

    def _worker_key(self, worker_id: str) -> bytes | None:
        from permamesh.committee.trust import node_id_of

        if worker_id not in self._workers:
            for row in self.committee.query("/registry"):
                self._workers[node_id_of(row["node"])] = bytes.fromhex(row["node"])
        return self._workers.get(worker_id)

    def usage(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {name: dict(use) for name, use in sorted(self._usage.items())}

    def close(self) -> None:
        if self.committee is not None:
            self.committee.close()

    def remaining(self, keys: KeyRing) -> dict[str, dict]:
        """Each key's account on the ledger: ``balance`` and ``available`` credit ({} without
        a committee; a key whose account cannot be read shows its error)."""
        if self._admission is None:
            return {}
        out = {}
        for name in keys.names():
            try:
                account = self._admission.account(keys.identity(name).public.sign_key)
                out[name] = {"balance": account.get("balance"), "available": account.get("available")}
            except Exception as exc:  # noqa: BLE001 - one unreadable account must not blank the page
                out[name] = {"error": str(exc)[:200]}
        return out

    def account(self, caller: Caller) -> dict | None:
        return None if self._admission is None else self._admission.account(caller.identity.public.sign_key)

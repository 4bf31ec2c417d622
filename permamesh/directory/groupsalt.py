"""A worker group's block-hash salt, from the committee: the same on every member, unknown to relays.

Workers of a group key their block hashes with one 32-byte salt, so routing shares digests
that only the group can link to prompts (:mod:`permamesh.routing.blocks`). The committee's
ledger holds it sealed to each worker's registered X25519 key (:mod:`permamesh.committee.sealing`,
rules in :mod:`permamesh.committee.groupshares`), so the same salt reaches every host while
relays, observers and the validators themselves never read it.

- :func:`group_salt` gets this worker's salt. Its descriptor must already name the group (the
  ledger seals only to announced workers of the group). It opens its share if it has one;
  founds the group (a random salt sealed to itself) if the group has none; otherwise it waits,
  bounded, until a member seals one to it.
- :class:`SaltDuty` is what every member runs while it serves: a thread that asks the
  committee every ``poll_s`` which workers of its group still wait, and seals the salt to
  them. The recipient's ``kex_key`` comes from the directory snapshot (checked against a
  second validator's app hash), never from a single validator's answer. Members take turns
  by a rank derived from both keys, so one member seals first and the others only follow
  when it has not within ``step_s`` per rank.

Share answers are read from two validators when two are known (the configured ones and those
the directory was confirmed by) and must agree, so one lying validator cannot hand a worker a
salt of its own making.

Who calls it: the worker process started with ``--join``, after announcing its descriptor.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass
from hashlib import blake2b

from permamesh.committee import sealing, txs
from permamesh.committee.client import CommitteeClient
from permamesh.committee.errors import CommitteeError
from permamesh.directory.committee import CommitteeDirectory
from permamesh.directory.errors import DirectoryError
from permamesh.identity import IdentityError, NodeIdentity

log = logging.getLogger(__name__)

POLL_S = 0.25  # how often a worker waiting for its share looks again (s)


@dataclass(frozen=True)
class DutyConfig:
    poll_s: float = 1.0  # how often a member asks which workers of its group wait (s)
    step_s: float = 2.0  # a member of rank r seals to a newcomer once it has waited r * step_s (s)
    max_per_round: int = 8  # shares sealed in one round at most
    retry_s: float = 30.0  # after a refusal other than a duplicate, leave that worker alone (s)


class _Reader:
    """Committee clients for one caller: the configured validators (with failover) for
    submitting, and up to two distinct validators for reading shares."""

    def __init__(self, directory: CommitteeDirectory) -> None:
        self.directory = directory
        self.main = CommitteeClient(directory.endpoints, directory.timeout_s)
        self._single: dict[str, CommitteeClient] = {}
        self._quiet: dict[str, float] = {}  # validator -> skip until (monotonic): it did not answer
        self.chain_id = self.main.query("/status")["chain_id"]

    def _candidates(self) -> list[str]:
        snap = self.directory.snapshot()
        known = [e for e in dict.fromkeys([*self.directory.endpoints, snap.source, *snap.confirmed_by]) if e]
        now = time.monotonic()
        return sorted(known, key=lambda e: self._quiet.get(e, 0.0) > now)  # stable: the quiet ones last

    def share(self, key: bytes) -> dict:
        """``/group_share`` for ``key``, as two validators agree on it (one, if one is known).
        A share only one of them holds yet reads as no share; validators that answer with two
        different shares raise DirectoryError, none answering CommitteeError."""
        answers = []
        for endpoint in self._candidates():
            client = self._single.get(endpoint) or self._single.setdefault(
                endpoint, CommitteeClient([endpoint], self.directory.timeout_s))
            try:
                answers.append(_checked(client.query("/group_share", key)))
            except CommitteeError as exc:
                log.debug("group share from %s: %s", endpoint, exc)
                self._quiet[endpoint] = time.monotonic() + 10.0
            if len(answers) == 2:
                break
        if not answers:
            raise CommitteeError(f"no validator answered for node {key.hex()[:16]}'s group share")
        first, second = answers[0], answers[-1]  # the same answer when only one validator is known
        if first["share"] and second["share"] and first != second:
            raise DirectoryError(f"validators disagree about node {key.hex()[:16]}'s group share")
        return first if first["share"] and second["share"] else first | {"share": None}

    def close(self) -> None:
        self.main.close()
        for client in self._single.values():
            client.close()


def _checked(answer: object) -> dict:
    """A ``/group_share`` answer with the shape :func:`group_salt` reads (it comes from a peer)."""
    share = answer.get("share") if isinstance(answer, dict) else None
    if (not isinstance(answer, dict) or not isinstance(answer.get("group"), str)
            or not isinstance(answer.get("founded"), bool) or not isinstance(answer.get("fingerprint"), str)
            or not (share is None or (isinstance(share, dict) and isinstance(share.get("sealed"), str)
                                      and isinstance(share.get("sender"), str)))):
        raise CommitteeError("a malformed /group_share answer")
    return answer


def _open(answer: dict, identity: NodeIdentity, chain_id: str, group: str) -> bytes:
    share = answer["share"]
    try:
        sealed = bytes.fromhex(share["sealed"])
    except ValueError:
        sealed = b""
    salt = sealing.open_sealed(sealed, identity, chain_id=chain_id, group=group)
    if salt is None or sealing.fingerprint(salt, group).hex() != answer["fingerprint"]:
        raise DirectoryError(f"the share of group {group!r} that {share['sender'][:16]} sealed to "
                             f"{identity.node_id} does not open to the group's salt")
    return salt


def _found(reader: _Reader, identity: NodeIdentity, group: str) -> bytes | None:
    """Seal a fresh salt to ourselves; the salt, or None when the committee refused (another
    worker founded first). If the committee does not answer (CommitteeError), the caller asks
    again: a founding that did commit shows as our own share."""
    salt = secrets.token_bytes(sealing.SALT_BYTES)
    me = identity.public
    tx = txs.GroupShare(chain_id=reader.chain_id, nonce=reader.main.next_nonce(me.sign_key), group=group,
                        recipient=me.sign_key, fingerprint=sealing.fingerprint(salt, group),
                        sealed=sealing.seal(salt, chain_id=reader.chain_id, group=group, recipient=me.sign_key,
                                            recipient_kex=me.kex_key))
    outcome = reader.main.submit(txs.sign_tx(tx, identity))
    if outcome.ok:
        log.info("%s founded the salt of group %r (height %d)", identity.node_id, group, outcome.height)
        return salt
    log.info("%s did not found group %r (%s); waiting for a member to seal its salt",
             identity.node_id, group, outcome.log)
    return None


def group_salt(directory: CommitteeDirectory, identity: NodeIdentity, group: str,
               timeout_s: float = 30.0) -> bytes:
    """This worker's salt of ``group``: its share opened, or a new salt if it founds the
    group, or the share a member seals to it within ``timeout_s`` (DirectoryError after)."""
    deadline = time.monotonic() + timeout_s
    me = identity.public.sign_key
    refused = False  # our founding was refused: wait for a member
    try:
        reader = _Reader(directory)
    except CommitteeError as exc:
        raise DirectoryError(f"cannot reach the committee for group {group!r}'s salt: {exc}") from None
    try:
        while True:
            try:
                answer = reader.share(me)
                if answer["group"] == group and answer["share"]:
                    return _open(answer, identity, reader.chain_id, group)
                if answer["group"] == group and not answer["founded"] and not refused:
                    salt = _found(reader, identity, group)
                    if salt is not None:
                        return salt
                    refused = True
            except CommitteeError as exc:
                answer = {"group": None}
                log.warning("group %r salt: %s", group, exc)
            if time.monotonic() > deadline:
                raise DirectoryError(_timeout_reason(directory, identity, group, answer, timeout_s))
            time.sleep(POLL_S)
    finally:
        reader.close()


def _timeout_reason(directory: CommitteeDirectory, identity: NodeIdentity, group: str, answer: dict,
                    timeout_s: float) -> str:
    if answer["group"] is None:
        return f"the committee did not answer for group {group!r}'s salt within {timeout_s:g} s"
    if answer["group"] != group:
        return (f"{identity.node_id}'s descriptor on the committee names group {answer['group']!r}, not "
                f"{group!r}: announce the worker (with its group) before asking for the group's salt")
    members = [e for e in directory.snapshot().entries if e.role == "worker" and e.group == group
               and e.node_key != identity.public.sign_key]
    running = sum(e.running for e in members)
    return (f"no member of group {group!r} sealed its salt to {identity.node_id} within {timeout_s:g} s "
            f"({len(members)} other workers of the group announced, {running} running; a running member "
            "seals it within seconds)")


def _rank(me: bytes, newcomer: bytes, members: set[bytes]) -> int:
    """My turn among ``members`` (me included) to seal to ``newcomer``: the same order on every
    member with the same view, different for every newcomer."""
    def order(key: bytes) -> bytes:
        return blake2b(key + newcomer, digest_size=16, person=b"pm/salt-turns").digest()
    mine = order(me)
    return sum(order(key) < mine for key in members | {me} if key != newcomer)


class SaltDuty:
    """A member's standing job: seal the group's salt to every announced worker of the group
    that lacks a share. Runs on its own thread; never touches the request path."""

    def __init__(self, directory: CommitteeDirectory, identity: NodeIdentity, group: str, salt: bytes,
                 config: DutyConfig = DutyConfig()) -> None:
        self.directory, self.identity, self.group, self.salt, self.config = directory, identity, group, salt, config
        self.me = identity.public.sign_key
        self._first_seen: dict[bytes, float] = {}  # waiting worker -> when we first saw it wait
        self._refused: dict[bytes, float] = {}  # worker -> leave alone until (monotonic)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._foreign = False  # the ledger's salt of the group is not ours (logged once)
        self.sealed = 0  # shares this member got committed

    def start(self) -> SaltDuty:
        self._thread = threading.Thread(target=self._run, name=f"salt-duty-{self.group}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.directory.timeout_s * 2 + 5)

    def _run(self) -> None:
        reader = None
        while not self._stop.is_set():
            soon = False
            try:
                reader = reader or _Reader(self.directory)
                soon = self._round(reader)
            except (CommitteeError, DirectoryError, KeyError, TypeError, ValueError) as exc:
                log.warning("group %r salt duty: %s", self.group, exc)  # malformed answers too
                if reader is not None:
                    reader.close()
                reader = None
            self._stop.wait(min(0.3, self.config.poll_s) if soon else self.config.poll_s)
        if reader is not None:
            reader.close()

    def _round(self, reader: _Reader) -> bool:
        """One round; True when a waiting worker was not in our directory copy yet (come back
        soon: the directory was nudged)."""
        answer = reader.main.query("/group_waiting", self.group.encode())
        waiting = [bytes.fromhex(k) for k in answer["waiting"] if bytes.fromhex(k) != self.me]
        now = time.monotonic()
        self._first_seen = {k: self._first_seen.get(k, now) for k in waiting}
        self._refused = {k: until for k, until in self._refused.items() if until > now}
        if not waiting:
            return False
        if answer["fingerprint"] != sealing.fingerprint(self.salt, self.group).hex():
            if not self._foreign:
                log.warning("group %r's salt on the ledger is not ours (fingerprint %s): not sealing",
                            self.group, answer["fingerprint"][:16] or "none")
            self._foreign = True
            return False
        self._foreign = False
        snap = self.directory.snapshot()
        entries = {e.node_key: e for e in snap.entries if e.role == "worker" and e.group == self.group}
        members = {e.node_key for e in entries.values() if e.running} - set(waiting)
        missing = [k for k in waiting if k not in entries]
        if missing:
            self.directory.nudge()
        due = [entries[k] for k in waiting if k in entries and self._refused.get(k, 0.0) <= now
               and now - self._first_seen[k] >= _rank(self.me, k, members) * self.config.step_s]
        if due:
            self._seal(reader, due[: self.config.max_per_round])
        return bool(missing)

    def _seal(self, reader: _Reader, entries: list) -> None:
        chain_id, group, fingerprint = reader.chain_id, self.group, sealing.fingerprint(self.salt, self.group)
        nonce = reader.main.next_nonce(self.me)
        raws = []
        for entry in entries:
            try:
                sealed = sealing.seal(self.salt, chain_id=chain_id, group=group, recipient=entry.node_key,
                                      recipient_kex=entry.kex_key)
            except IdentityError as exc:
                log.warning("cannot seal group %r's salt to %s: %s", group, entry.node_id, exc)
                self._refused[entry.node_key] = time.monotonic() + self.config.retry_s
                continue
            tx = txs.GroupShare(chain_id=chain_id, nonce=nonce + len(raws), group=group, recipient=entry.node_key,
                                sealed=sealed, fingerprint=fingerprint)
            raws.append((entry, txs.sign_tx(tx, self.identity)))
        if not raws:
            return
        outcomes = reader.main.submit_many([raw for _, raw in raws], timeout_s=self.directory.timeout_s * 2)
        for (entry, _), outcome in zip(raws, outcomes):
            if outcome.ok:
                self.sealed += 1
                log.info("sealed the salt of group %r to %s (height %d)", group, entry.node_id, outcome.height)
            elif outcome.code in (txs.DUPLICATE, txs.BAD_NONCE, -1):
                log.debug("share for %s not committed (%s): another member was first, or next round",
                          entry.node_id, outcome.log)
            else:
                log.warning("the committee refused our share for %s (%d): %s", entry.node_id, outcome.code,
                            outcome.log)
                self._refused[entry.node_key] = time.monotonic() + self.config.retry_s

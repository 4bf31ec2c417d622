"""CommitteeClient: submit transactions to and query the committee, from any process.

One client speaks to either engine, chosen by each endpoint's scheme:

- ``https://HOST:PORT?key=HEX``: a CometBFT v0.38 node's RPC over TLS, pinned to the member's
  Ed25519 node key (``broadcast_tx_sync``, then the commit; ``abci_query``; ``status``),
  through :class:`~permamesh.committee.cometbft.link.CometLink`;
- ``tcp://HOST:PORT?key=HEX``: a devnet validator over CurveZMQ, authenticated by its
  transport key (``SubmitTx``, ``QueryMsg``, ``StatusMsg`` over a DEALER socket, the devnet's
  answers to the same questions).

Plain ``http://`` and key-less ``tcp://`` are accepted only for loopback hosts; every endpoint
is checked when the client is made (:mod:`permamesh.committee.endpoints`), so a refused form
fails at once with what to write instead. A validator that holds another key than its
endpoint names is refused with a :class:`~permamesh.committee.errors.CommitteeError` that says
so (TLS: the certificate's key; CurveZMQ: the failed handshake), and skipped like a silent one.

The methods and their results are the same for both. Given several validator endpoints it
fails over: a validator that does not answer within the timeout (or answers garbage) is
skipped for the next call, so a killed validator costs one timeout, not the call.

Who calls it: the validator's duties (score reports), routing and the scheduler (``/trusted``,
``/registry``, ``/account``), ``permamesh validator query``, the committee benchmark, tests.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from permamesh.committee.devnet import messages as m
from permamesh.committee.endpoints import parse_endpoint
from permamesh.committee.errors import CommitteeError
from permamesh.committee.txs import BAD_NONCE
from permamesh.identity import NodeIdentity
from permamesh.transport import DealerClient, HandshakeFailed, TransportError
from permamesh.wire.codec import Message, WireError, decode, encode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TxOutcome:
    code: int
    log: str
    height: int
    committed: bool

    @property
    def ok(self) -> bool:
        return self.code == 0


@dataclass(frozen=True)
class CommitteeStatus:
    """One validator's view of the chain, under either engine."""

    height: int  # last committed height
    app_hash: bytes  # the app hash after ``height``
    heights: tuple[int, ...] = ()  # the asked-for heights (first..last) this validator has
    app_hashes: tuple[bytes, ...] = ()  # the app hash after each of ``heights``
    mempool: int = 0  # txs waiting for a block
    misbehaviour: int = 0  # equivocations seen (devnet; CometBFT puts evidence in blocks: 0)
    status_dropped: int = 0  # status asks left unanswered over their budget (devnet; CometBFT: 0)


def _outcome(o) -> TxOutcome:
    return TxOutcome(o.code, o.log, o.height, o.committed)


def _status(s) -> CommitteeStatus:
    return CommitteeStatus(s.height, s.app_hash, tuple(s.heights), tuple(s.app_hashes), s.mempool,
                           getattr(s, "misbehaviour", 0), getattr(s, "status_dropped", 0))


class _DevnetLink:
    """One devnet validator's ROUTER, asked over a DEALER (CurveZMQ when the endpoint names a
    key); answers matched by ``ref``."""

    def __init__(self, endpoint: str, ident: NodeIdentity, refs, keyed: bool) -> None:
        self.endpoint, self._ident, self._refs, self._keyed = endpoint, ident, refs, keyed
        self.sock = DealerClient(endpoint, watch_handshake=True)

    def _recv(self, timeout_s: float) -> bytes | None:
        return self._refused_on_failure(lambda: self.sock.recv(timeout_s))

    def _send(self, frame: bytes) -> None:
        try:
            self._refused_on_failure(lambda: self.sock.send(frame))
        except TransportError as exc:
            raise CommitteeError(str(exc)) from None

    def _refused_on_failure(self, step):
        try:
            return step()
        except HandshakeFailed:
            if self._keyed:
                raise CommitteeError("the CurveZMQ handshake failed: the validator there does not hold the "
                                     "transport key named in ?key= (a wrong key, or not that validator): "
                                     "refused") from None
            raise CommitteeError("the handshake failed: the validator there speaks CurveZMQ; use "
                                 "tcp://HOST:PORT?key=HEX with its transport key") from None

    def _ask(self, make, expect: type[Message], timeout_s: float):
        ref = next(self._refs)
        self._send(encode(make(ref), self._ident))
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            frame = self._recv(left)
            if frame is None:
                return None
            try:
                msg = decode(frame, expect).msg
            except WireError as exc:
                log.debug("ignored a frame from the committee: %s", exc)
                continue
            if msg.ref == ref:
                return msg
        return None

    def submit(self, tx: bytes, wait_commit: bool, timeout_s: float):
        return self._ask(lambda ref: m.SubmitTx(tx, wait_commit, ref), m.TxAck, timeout_s)

    def submit_many(self, raw_txs: list[bytes], timeout_s: float) -> list:
        refs = {}
        for tx in raw_txs:
            ref = next(self._refs)
            refs[ref] = len(refs)
            self._send(encode(m.SubmitTx(tx, True, ref), self._ident))
        out: list = [None] * len(raw_txs)
        deadline, missing = time.monotonic() + timeout_s, len(raw_txs)
        while missing and (left := deadline - time.monotonic()) > 0:
            frame = self._recv(left)
            if frame is None:
                break
            try:
                ack = decode(frame, m.TxAck).msg
            except WireError:
                continue
            index = refs.get(ack.ref)
            if index is not None and out[index] is None:
                out[index] = ack
                missing -= 1
        return out

    def query(self, path: str, data: bytes, timeout_s: float):
        a = self._ask(lambda ref: m.QueryMsg(path, data, ref), m.QueryAnswer, timeout_s)
        return None if a is None else (a.code, a.log, a.value, a.height)

    def status(self, first: int, last: int, timeout_s: float):
        return self._ask(lambda ref: m.StatusMsg(first, last, ref), m.StatusAnswer, timeout_s)

    def close(self) -> None:
        self.sock.close()  # drops frames still queued to a dead validator


class CommitteeClient:
    """Blocking; one per thread. ``endpoints``: CometBFT RPC endpoints
    (``https://HOST:PORT?key=HEX``) or devnet validators' (``tcp://HOST:PORT?key=HEX``); a
    refused form raises :class:`~permamesh.committee.endpoints.EndpointError` here."""

    def __init__(self, endpoints: list[str], timeout_s: float = 10.0) -> None:
        if not endpoints:
            raise CommitteeError("no committee endpoints given")
        self.endpoints = list(endpoints)
        self._parsed = {e: parse_endpoint(e) for e in self.endpoints}
        self.timeout_s = timeout_s
        self._ident = NodeIdentity.generate()
        self._links: dict[str, object] = {}
        self._refs = itertools.count(1)
        self._first = 0

    def _link(self, endpoint: str):
        link = self._links.get(endpoint)
        if link is None:
            parsed = self._parsed.get(endpoint) or parse_endpoint(endpoint)  # status_of may name another
            if parsed.scheme in ("http", "https"):
                from permamesh.committee.cometbft.link import CometLink

                link = CometLink(endpoint, self.timeout_s)
            else:
                link = _DevnetLink(endpoint, self._ident, self._refs, parsed.key is not None)
            self._links[endpoint] = link
        return link

    def _drop(self, endpoint: str) -> None:
        link = self._links.pop(endpoint, None)
        if link is not None:
            link.close()

    def _call(self, ask, timeout_s: float | None = None):
        """``ask(link, timeout_s)`` of each validator in turn, from the last that answered."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        errors = []
        for i in range(len(self.endpoints)):
            index = (self._first + i) % len(self.endpoints)
            endpoint = self.endpoints[index]
            try:
                answer = ask(self._link(endpoint), timeout_s)
            except CommitteeError as exc:  # a malformed answer: this validator is not trusted now
                log.warning("committee validator %s: %s", endpoint, exc)
                errors.append(f"{endpoint} ({exc})")
                self._drop(endpoint)
                continue
            if answer is not None:
                self._first = index
                return answer
            errors.append(endpoint)
            self._drop(endpoint)
        raise CommitteeError(f"no committee validator answered within {timeout_s:g} s: {'; '.join(errors)}")

    # ------------------------------------------------------------------------------ calls

    def submit(self, tx: bytes, wait_commit: bool = True, timeout_s: float | None = None) -> TxOutcome:
        return _outcome(self._call(lambda link, t: link.submit(tx, wait_commit, t), timeout_s))

    def submit_many(self, raw_txs: list[bytes], timeout_s: float = 60.0) -> list[TxOutcome]:
        """Pipeline ``raw_txs`` to one validator (no failover) and wait for every commit.

        Outcomes come back in the order of ``raw_txs``; one still missing at the deadline is
        reported with code -1."""
        endpoint = self.endpoints[self._first]
        try:
            out = self._link(endpoint).submit_many(list(raw_txs), timeout_s)
        except CommitteeError as exc:
            log.warning("committee validator %s: %s", endpoint, exc)
            self._drop(endpoint)
            out = [None] * len(raw_txs)
        return [_outcome(o) if o is not None else TxOutcome(-1, "no answer before the deadline", 0, False)
                for o in out]

    def query_raw(self, path: str, data: bytes = b"") -> tuple[int, str, bytes, int]:
        return self._call(lambda link, t: link.query(path, data, t))

    def query(self, path: str, data: bytes = b""):
        """The JSON answer of a query path (see :mod:`permamesh.committee.queries`)."""
        code, log_, value, _ = self.query_raw(path, data)
        if code:
            raise CommitteeError(f"query {path} failed ({code}): {log_}")
        try:
            return json.loads(value)
        except ValueError:
            raise CommitteeError(f"query {path}: the answer is not JSON") from None

    def status(self, first: int = 0, last: int = 0) -> CommitteeStatus:
        """Height and app hash (and app hashes for heights first..last, at most 1,000)."""
        return _status(self._call(lambda link, t: link.status(first, last, t)))

    def status_of(self, endpoint: str, first: int = 0, last: int = 0,
                  timeout_s: float = 5.0) -> CommitteeStatus | None:
        """One validator's own status (no failover); None if it does not answer (or answers
        garbage)."""
        try:
            answer = self._link(endpoint).status(first, last, timeout_s)
        except CommitteeError as exc:
            log.warning("committee validator %s: %s", endpoint, exc)
            answer = None
        if answer is None:
            self._drop(endpoint)
            return None
        return _status(answer)

    def next_nonce(self, key: bytes) -> int:
        return self.query("/nonce", key)["next"]

    def submit_signed(self, make: Callable[[int], bytes], key: bytes, attempts: int = 3,
                      timeout_s: float | None = None) -> TxOutcome:
        """Submit the tx ``make(nonce)`` signs for ``key`` at its next nonce; when another tx
        of the same key took that nonce first (a member's prober and its score report, say),
        ask again and resubmit, ``attempts`` times at most."""
        outcome = self.submit(make(self.next_nonce(key)), timeout_s=timeout_s)
        for _ in range(attempts - 1):
            if outcome.code != BAD_NONCE:
                break
            log.info("nonce taken for %s (%s); submitting again", key.hex()[:16], outcome.log)
            outcome = self.submit(make(self.next_nonce(key)), timeout_s=timeout_s)
        return outcome

    def close(self) -> None:
        for endpoint in list(self._links):
            self._drop(endpoint)

    def __enter__(self) -> CommitteeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

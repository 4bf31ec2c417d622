"""CommitteeClient: submit transactions to and query the committee, from any process.

It speaks to devnet validators (``SubmitTx``, ``QueryMsg``, ``StatusMsg`` over a DEALER
socket, like CometBFT's ``broadcast_tx_commit`` and ``abci_query`` RPCs). Given several
validator endpoints it fails over: a validator that does not answer within the timeout is
skipped for the next call, so a killed validator costs one timeout, not the call.

Who calls it: the validator's duties (score reports), routing and the scheduler (``/trusted``,
``/registry``, ``/account``), ``permamesh validator query``, the committee benchmark, tests.
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import dataclass

from permamesh.committee.devnet import messages as m
from permamesh.committee.errors import CommitteeError
from permamesh.identity import NodeIdentity
from permamesh.transport import DealerClient
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


class CommitteeClient:
    """Blocking; one per thread. ``endpoints``: devnet validators' ROUTER endpoints."""

    def __init__(self, endpoints: list[str], timeout_s: float = 10.0) -> None:
        if not endpoints:
            raise CommitteeError("no committee endpoints given")
        self.endpoints = list(endpoints)
        self.timeout_s = timeout_s
        self._ident = NodeIdentity.generate()
        self._socks: dict[str, DealerClient] = {}
        self._refs = itertools.count(1)
        self._first = 0

    def _sock(self, endpoint: str) -> DealerClient:
        if endpoint not in self._socks:
            self._socks[endpoint] = DealerClient(endpoint)
        return self._socks[endpoint]

    def _call(self, make, expect: type[Message], timeout_s: float | None = None):
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        errors = []
        for i in range(len(self.endpoints)):
            index = (self._first + i) % len(self.endpoints)
            endpoint = self.endpoints[index]
            ref = next(self._refs)
            sock = self._sock(endpoint)
            sock.send(encode(make(ref), self._ident))
            answer = self._await(sock, ref, expect, timeout_s)
            if answer is not None:
                self._first = index
                return answer
            errors.append(endpoint)
            sock.close()  # drop queued frames to a dead validator
            del self._socks[endpoint]
        raise CommitteeError(f"no committee validator answered within {timeout_s:g} s: {errors}")

    @staticmethod
    def _await(sock: DealerClient, ref: int, expect: type[Message], timeout_s: float):
        import time

        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            frame = sock.recv(left)
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

    # ------------------------------------------------------------------------------ calls

    def submit(self, tx: bytes, wait_commit: bool = True, timeout_s: float | None = None) -> TxOutcome:
        ack = self._call(lambda ref: m.SubmitTx(tx, wait_commit, ref), m.TxAck, timeout_s)
        return TxOutcome(ack.code, ack.log, ack.height, ack.committed)

    def submit_many(self, raw_txs: list[bytes], timeout_s: float = 60.0) -> list[TxOutcome]:
        """Pipeline ``raw_txs`` to one validator (no failover) and wait for every commit.

        Outcomes come back in the order of ``raw_txs``; one still missing at the deadline is
        reported with code -1."""
        import time

        endpoint = self.endpoints[self._first]
        sock = self._sock(endpoint)
        refs = {}
        for tx in raw_txs:
            ref = next(self._refs)
            refs[ref] = len(refs)
            sock.send(encode(m.SubmitTx(tx, True, ref), self._ident))
        out: list[TxOutcome | None] = [None] * len(raw_txs)
        deadline, missing = time.monotonic() + timeout_s, len(raw_txs)
        while missing and (left := deadline - time.monotonic()) > 0:
            frame = sock.recv(left)
            if frame is None:
                break
            try:
                ack = decode(frame, m.TxAck).msg
            except WireError:
                continue
            index = refs.get(ack.ref)
            if index is not None and out[index] is None:
                out[index] = TxOutcome(ack.code, ack.log, ack.height, ack.committed)
                missing -= 1
        return [o or TxOutcome(-1, "no answer before the deadline", 0, False) for o in out]

    def query_raw(self, path: str, data: bytes = b"") -> tuple[int, str, bytes, int]:
        a = self._call(lambda ref: m.QueryMsg(path, data, ref), m.QueryAnswer)
        return a.code, a.log, a.value, a.height

    def query(self, path: str, data: bytes = b""):
        """The JSON answer of a query path (see :mod:`permamesh.committee.queries`)."""
        code, log_, value, _ = self.query_raw(path, data)
        if code:
            raise CommitteeError(f"query {path} failed ({code}): {log_}")
        return json.loads(value)

    def status(self, first: int = 0, last: int = 0) -> m.StatusAnswer:
        return self._call(lambda ref: m.StatusMsg(first, last, ref), m.StatusAnswer)

    def status_of(self, endpoint: str, first: int = 0, last: int = 0,
                  timeout_s: float = 5.0) -> m.StatusAnswer | None:
        """One validator's own status (no failover); None if it does not answer."""
        ref = next(self._refs)
        sock = self._sock(endpoint)
        sock.send(encode(m.StatusMsg(first, last, ref), self._ident))
        answer = self._await(sock, ref, m.StatusAnswer, timeout_s)
        if answer is None:
            sock.close()
            del self._socks[endpoint]
        return answer

    def next_nonce(self, key: bytes) -> int:
        return self.query("/nonce", key)["next"]

    def close(self) -> None:
        for sock in self._socks.values():
            sock.close()
        self._socks.clear()

    def __enter__(self) -> CommitteeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""Admission by credit: a job runs only if its user can pay for it on the committee's ledger.

Credit is mutual (``docs/committee.md``): every account starts at 0 and may overdraw down to
its credit limit (the free base allowance plus a share of everything it earned serving). A
job's cost is its token budget (prompt tokens + ``max_tokens``, one unit a token), an upper
bound of what its receipt will charge (:func:`prompt_bound` bounds the prompt before it is
tokenized); :meth:`Admission.admit` refuses the job with
:class:`OutOfCredit` (saying the balance, the limit and the cost) when the account's
``available`` credit is below it. After the answer, :meth:`Admission.receipt` builds the
signed :class:`~permamesh.committee.txs.JobReceipt` for what was actually used, which moves
the units from the user to the worker that served it.

The ledger checks the same limit again when the receipt is applied, so a user who races two
jobs past an admission check still cannot overdraw (the second receipt fails with code 6).

Who calls it: the demo and clients that submit jobs (and the OpenAI gateway, later), with a
:class:`~permamesh.committee.client.CommitteeClient`'s ``query`` and ``submit``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from permamesh.committee import txs
from permamesh.identity import NodeIdentity
from permamesh.scheduler.errors import SchedulerError

log = logging.getLogger(__name__)


class OutOfCredit(SchedulerError):
    """The user's available credit does not cover the job."""

    def __init__(self, account: dict, cost: int) -> None:
        self.account, self.cost = account, cost
        super().__init__(
            f"out of credit: this job may cost {cost} units but account "
            f"{account['account'][:16]} has {account['available']} available (balance "
            f"{account['balance']}, credit limit {account['credit_limit']}); serve jobs for others "
            "to earn credit, or ask for a smaller max_tokens")


@dataclass(frozen=True)
class Admitted:
    cost: int  # units reserved by the check (an upper bound)
    available: int  # the account's available credit at the check


CHAT_TEMPLATE_TOKENS = 64  # what a chat template may add around the messages, at most


def prompt_bound(text: str) -> int:
    """An upper bound of a prompt's tokens before tokenizing it: a token holds at least one
    byte (byte-level BPE), plus the chat template's own tokens."""
    return len(text.encode()) + CHAT_TEMPLATE_TOKENS


def job_cost(prompt_tokens: int, max_tokens: int) -> int:
    """Units a job may use at most: one per prompt token and per token it may generate."""
    if prompt_tokens < 0 or max_tokens < 0:
        raise SchedulerError("token counts must be >= 0")
    return max(1, prompt_tokens + max_tokens)


class Admission:
    def __init__(self, query: Callable[[str, bytes], object], chain_id: str) -> None:
        self.query, self.chain_id = query, chain_id

    def account(self, user: bytes) -> dict:
        return self.query("/account", user)

    def admit(self, user: bytes, prompt_tokens: int, max_tokens: int) -> Admitted:
        """Check the user's credit for a job; :class:`OutOfCredit` if it does not cover it."""
        cost = job_cost(prompt_tokens, max_tokens)
        account = self.account(user)
        if account["available"] < cost:
            raise OutOfCredit(account, cost)
        return Admitted(cost, account["available"])

    def receipt(self, user: NodeIdentity, worker_key: bytes, units: int,
                job_id: bytes | None = None) -> bytes:
        """The signed receipt for ``units`` actually used (the next nonce from the ledger);
        callers charge at most what they admitted."""
        nonce = self.query("/nonce", user.public.sign_key)["next"]
        tx = txs.JobReceipt(chain_id=self.chain_id, nonce=nonce, worker=worker_key,
                            units=max(1, units), job_id=job_id or os.urandom(16))
        return txs.sign_tx(tx, user)

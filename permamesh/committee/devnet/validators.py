"""The validator set of a devnet height: keys, voting power, thresholds and the proposer rule.

Who calls what: the node builds a :class:`ValidatorSet` from its genesis (and later from the
application's validator updates) and hands it to
:class:`~permamesh.committee.devnet.tendermint.Tendermint` for each height;
:mod:`permamesh.committee.devnet.votes` weighs votes with :meth:`ValidatorSet.power_of`. A
set never changes after it is built; it is a wire :func:`~permamesh.wire.codec.struct`, so
the node can send one, and decoding re-sorts and re-checks it.
"""

from __future__ import annotations

import bisect
import functools
import logging
import math
from collections.abc import Iterable

from permamesh.identity import PUBLIC_KEY_BYTES
from permamesh.wire.codec import WireError, struct

log = logging.getLogger(__name__)

MAX_VALIDATORS = 1024
MAX_POWER = 2**48  # per validator; the total stays far below 2**63


def _require(cond: bool, what: str) -> None:
    if not cond:
        raise WireError(what)


def _is_int(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value < high


def is_key(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == PUBLIC_KEY_BYTES


@struct
class Validator:
    public_key: bytes  # Ed25519, 32 bytes
    power: int  # voting power, in [1, MAX_POWER)

    def __post_init__(self) -> None:
        _require(is_key(self.public_key), f"validator key must be {PUBLIC_KEY_BYTES} bytes")
        _require(_is_int(self.power, 1, MAX_POWER), f"validator power must be in [1, {MAX_POWER})")


@struct
class ValidatorSet:
    """The validators of one height, sorted by public key (given in any order).

    Proposer rule: divide every power by the gcd of all powers, giving weights ``w_i`` with
    sum ``W``; the proposer of (height, round) is the validator whose half-open interval of
    cumulative weight (in key order) holds ``(height + round) mod W``. With equal powers
    this is plain round robin: index ``(height + round) mod n`` of the sorted list; a
    validator with twice the weight proposes twice as many consecutive slots.
    """

    validators: tuple[Validator, ...]

    def __post_init__(self) -> None:
        _require(0 < len(self.validators) <= MAX_VALIDATORS, f"1-{MAX_VALIDATORS} validators")
        ordered = tuple(sorted(self.validators, key=lambda v: v.public_key))
        keys = [v.public_key for v in ordered]
        _require(len(set(keys)) == len(keys), "validator keys must be distinct")
        object.__setattr__(self, "validators", ordered)
        object.__setattr__(self, "_power", {v.public_key: v.power for v in ordered})
        gcd = functools.reduce(math.gcd, (v.power for v in ordered))
        cumulative, total = [], 0
        for v in ordered:
            total += v.power // gcd
            cumulative.append(total)
        object.__setattr__(self, "_cumulative", cumulative)

    @classmethod
    def equal(cls, keys: Iterable[bytes], power: int = 1) -> ValidatorSet:
        return cls(tuple(Validator(k, power) for k in keys))

    @classmethod
    def from_powers(cls, powers: dict[bytes, int]) -> ValidatorSet:
        return cls(tuple(Validator(k, p) for k, p in powers.items()))

    @property
    def total_power(self) -> int:
        return sum(self._power.values())

    @property
    def quorum(self) -> int:
        """The least power that is more than 2/3 of the total (the paper's 2f+1)."""
        return self.total_power * 2 // 3 + 1

    @property
    def one_third_plus(self) -> int:
        """The least power that is more than 1/3 of the total (the paper's f+1)."""
        return self.total_power // 3 + 1

    def power_of(self, public_key: bytes) -> int:
        """Voting power of ``public_key``; 0 for a key outside the set (or not bytes)."""
        return self._power.get(public_key, 0) if isinstance(public_key, bytes) else 0

    def __contains__(self, public_key: object) -> bool:
        return isinstance(public_key, bytes) and public_key in self._power

    def __len__(self) -> int:
        return len(self.validators)

    def proposer(self, height: int, round: int) -> bytes:
        slot = (height + round) % self._cumulative[-1]
        return self.validators[bisect.bisect_right(self._cumulative, slot)].public_key

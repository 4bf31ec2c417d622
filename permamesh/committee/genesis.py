"""Genesis: who the committee and the seed partners are, and the ledger's rules in numbers.

CometBFT hands the application ``app_state_bytes`` from its genesis file in InitChain; the
devnet engine does the same. Ours is JSON of :class:`Genesis` (keys as hex). Every validator
must start from byte-identical genesis, so :meth:`Genesis.to_json` is canonical (sorted keys,
no whitespace).

Who calls it: ``permamesh validator`` and the devnet write it; :class:`LedgerApp` reads it
in InitChain and stores it in the ledger (so a restarted validator needs no file).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from permamesh.committee.errors import CommitteeError
from permamesh.verify.reputation import ReputationConfig


@dataclass(frozen=True)
class LedgerRules:
    """The numbers of the ledger's rules (all integers: the committee must agree exactly)."""

    blocks_per_epoch: int = 50  # an epoch closes every this many blocks
    vouches_required: int = 2  # N independent vouches admit a candidate partner
    trial_epochs: int = 90  # a new partner's trial (the seed's 90 days at one epoch a day)
    base_allowance: int = 10_000  # credit a user may overdraw with nothing earned
    earned_limit_ppm: int = 500_000  # and this share of all it ever earned on top
    max_report_lag: int = 1  # a report for epoch e is accepted until epoch e + this closes
    probe_blocks: int = 10  # a liveness probe period is this many blocks (height // this)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if type(value) is not int or value < 0:
                raise CommitteeError(f"ledger rule {f.name} must be an int >= 0")
        if self.blocks_per_epoch < 1 or self.vouches_required < 1 or self.probe_blocks < 1:
            raise CommitteeError("blocks_per_epoch, vouches_required and probe_blocks must be >= 1")


@dataclass(frozen=True)
class Genesis:
    chain_id: str
    members: tuple[bytes, ...]  # committee members' app keys: who may send score reports
    seed_partners: tuple[bytes, ...]  # original network builders (tier 3)
    rules: LedgerRules = field(default_factory=LedgerRules)
    reputation: ReputationConfig = field(default_factory=ReputationConfig)

    def __post_init__(self) -> None:
        if not self.chain_id or len(self.chain_id) > 50:
            raise CommitteeError("chain_id must be 1..50 characters")
        for key in self.members + self.seed_partners:
            if not isinstance(key, bytes) or len(key) != 32:
                raise CommitteeError("member and partner keys must be 32-byte public keys")
        if not self.members:
            raise CommitteeError("genesis needs at least one committee member")

    def to_json(self) -> bytes:
        data = {
            "chain_id": self.chain_id,
            "members": sorted(k.hex() for k in self.members),
            "seed_partners": sorted(k.hex() for k in self.seed_partners),
            "rules": dataclasses.asdict(self.rules),
            "reputation": dataclasses.asdict(self.reputation),
        }
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> Genesis:
        try:
            data = json.loads(raw)
            return cls(
                chain_id=data["chain_id"],
                members=tuple(sorted(bytes.fromhex(k) for k in data["members"])),
                seed_partners=tuple(sorted(bytes.fromhex(k) for k in data["seed_partners"])),
                rules=LedgerRules(**data.get("rules", {})),
                reputation=ReputationConfig(**data.get("reputation", {})),
            )
        except CommitteeError:
            raise
        except Exception as exc:  # JSON, keys, hex, types: all one outcome for the caller
            raise CommitteeError(f"bad genesis: {exc.__class__.__name__}: {exc}") from None

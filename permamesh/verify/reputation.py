"""Reputation: the per-node, per-epoch math every committee member must agree on bit-for-bit.

The committee scores each node once per epoch T with a credit C(T) in [0, 1] (computed from
its challenges elsewhere in :mod:`permamesh.verify`) and folds it into the node's reputation
with :func:`update`. The rule is PlanetServe's:

- R(T) = alpha R(T-1) + beta C(T), alpha = 0.4, beta = 0.6, R(0) = 0.5.
- The window is the last W = 5 credits *including* C(T). An epoch is abnormal if C < tau = 0.4.
  With c abnormal epochs in the window and c / W > gamma = 0.2, beta is replaced by
  beta' = (W + 1) / (W + c / gamma + 2); alpha stays, so alpha + beta' < 1 and reputation is
  capped until the abnormal epochs leave the window.
- A node is excluded from routing when R < floor = 0.3. An excluded node is readmitted only
  once R >= readmit (0.5) *and* its last W epochs in a row were normal (hysteresis).
- :func:`challenges_per_epoch` rises from 3 at R >= 0.7 to 9 at R <= floor (and for excluded
  nodes), so a doubtful node is sampled harder.

Fixed point: every value is an ``int`` in parts per million (:data:`PPM` = 1.0); no floats,
no clock, no randomness. Products are floored: beta' is floor(PPM (W+1) / (W + c/gamma + 2)),
computed exactly as floor(PPM (W+1) gamma / ((W+2) gamma + c PPM)) with gamma in ppm, and
R(T) = floor((alpha R(T-1) + beta C(T)) / PPM), clamped to [0, PPM].

Off-by-one: PlanetServe's prototype appended C(T) and counted abnormal epochs *before*
trimming its history, i.e. over W + 1 entries. Here the window is trimmed to W first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

from permamesh.verify.errors import VerifyError

PPM = 1_000_000  # 1.0 in parts per million


def _is_int(value: object) -> bool:
    return type(value) is int  # bool is an int subclass; it is never a ppm value here


def _check_ppm(name: str, value: object) -> int:
    if not _is_int(value) or not 0 <= value <= PPM:  # type: ignore[operator]
        raise VerifyError(f"{name} must be an int in [0, {PPM}] ppm, got {value!r}")
    return value  # type: ignore[return-value]


@dataclass(frozen=True)
class ReputationConfig:
    """The committee's reputation parameters (ppm unless noted); one instance for all nodes."""

    alpha_ppm: int = 400_000  # weight of the previous reputation
    beta_ppm: int = 600_000  # weight of this epoch's credit, unless punished
    initial_ppm: int = 500_000  # R(0) of a newly registered node
    floor_ppm: int = 300_000  # below this a node is excluded from routing
    readmit_ppm: int = 500_000  # an excluded node must climb back to this
    window: int = 5  # W, epochs (the current one included)
    abnormal_below_ppm: int = 400_000  # tau: a credit below this is an abnormal epoch
    gamma_ppm: int = 200_000  # punish when abnormal / W exceeds this
    base_challenges: int = 3  # challenges per epoch at R >= full_rate_above_ppm
    max_challenges: int = 9  # challenges per epoch at R <= floor, and while excluded
    full_rate_above_ppm: int = 700_000  # from here up a node gets only base_challenges

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name not in ("window", "base_challenges", "max_challenges"):
                _check_ppm(f.name, getattr(self, f.name))
        if self.alpha_ppm + self.beta_ppm > PPM:
            raise VerifyError("alpha_ppm + beta_ppm must not exceed 1.0")
        if not self.floor_ppm <= self.readmit_ppm:
            raise VerifyError("readmit_ppm must be at or above floor_ppm")
        if not self.floor_ppm < self.full_rate_above_ppm:
            raise VerifyError("full_rate_above_ppm must be above floor_ppm")
        if not 0 < self.gamma_ppm < PPM:
            raise VerifyError("gamma_ppm must be in (0, 1)")
        for name in ("window", "base_challenges", "max_challenges"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise VerifyError(f"{name} must be a positive int")
        if self.base_challenges > self.max_challenges:
            raise VerifyError("base_challenges must not exceed max_challenges")
        first = self.gamma_ppm * self.window // PPM + 1  # the fewest abnormal epochs punished
        if first <= self.window and punished_beta_ppm(first, self) > self.beta_ppm:
            raise VerifyError("this gamma and window would make punishment raise beta")


@dataclass(frozen=True)
class NodeReputation:
    """One node's reputation state, as the committee stores it between epochs.

    ``window`` holds the last <= W credits, oldest first; ``normal_streak`` counts the
    consecutive normal epochs ending at the latest one; ``epochs`` counts all updates.
    Build with :meth:`initial`, advance with :func:`update`, store with :meth:`to_fields`.
    """

    reputation_ppm: int
    window: tuple[int, ...]
    excluded: bool
    normal_streak: int
    epochs: int

    @classmethod
    def initial(cls, config: ReputationConfig) -> NodeReputation:
        """A newly registered node: R(0), no history."""
        return cls(config.initial_ppm, (), config.initial_ppm < config.floor_ppm, 0, 0)

    def to_fields(self) -> dict[str, object]:
        """The canonical plain form (ints, a list of ints, a bool) for the ledger."""
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"window": list(self.window)}

    @classmethod
    def from_fields(cls, data: object, config: ReputationConfig) -> NodeReputation:
        """Rebuild a state from :meth:`to_fields`; anything malformed or inconsistent with
        ``config`` raises :class:`VerifyError` (never another exception)."""
        names = [f.name for f in fields(cls)]
        if not isinstance(data, dict) or set(data) != set(names):
            raise VerifyError(f"reputation fields must be a dict with keys {names}")
        rep, window = _check_ppm("reputation_ppm", data["reputation_ppm"]), data["window"]
        excluded, streak, epochs = data["excluded"], data["normal_streak"], data["epochs"]
        if not isinstance(window, list | tuple) or len(window) > config.window:
            raise VerifyError(f"window must be a list of at most {config.window} credits")
        window = tuple(_check_ppm("window credit", c) for c in window)
        if type(excluded) is not bool:
            raise VerifyError("excluded must be a bool")
        if not (_is_int(streak) and _is_int(epochs) and 0 <= streak <= epochs):
            raise VerifyError("normal_streak and epochs must be ints, 0 <= streak <= epochs")
        state = cls(rep, window, excluded, streak, epochs)
        if len(window) != min(epochs, config.window):
            raise VerifyError("window length does not match the epoch count")
        if min(streak, len(window)) != _trailing_normal(window, config):
            raise VerifyError("normal_streak does not match the window")
        if epochs == 0 and state != cls.initial(config):
            raise VerifyError("a state with no epochs must be the initial state")
        if not excluded and rep < config.floor_ppm:
            raise VerifyError("a node below the floor must be excluded")
        return state


def _trailing_normal(window: Sequence[int], config: ReputationConfig) -> int:
    """How many of the window's newest credits in a row are normal."""
    n = 0
    for credit in reversed(window):
        if credit < config.abnormal_below_ppm:
            break
        n += 1
    return n


def abnormal_count(window: Sequence[int], config: ReputationConfig) -> int:
    """c: the abnormal credits among the last W of ``window`` (oldest first)."""
    recent = window[-config.window :] if len(window) > config.window else window
    return sum(1 for credit in recent if credit < config.abnormal_below_ppm)


def punished_beta_ppm(abnormal: int, config: ReputationConfig) -> int:
    """The beta used with ``abnormal`` abnormal epochs in the window: ``config.beta_ppm``
    when c / W <= gamma, else floor(PPM (W+1) / (W + c / gamma + 2))."""
    w, g = config.window, config.gamma_ppm
    if not _is_int(abnormal) or not 0 <= abnormal <= w:
        raise VerifyError(f"abnormal count must be an int in [0, {w}], got {abnormal!r}")
    if abnormal * PPM <= g * w:  # c / W <= gamma, exactly
        return config.beta_ppm
    # (W+1) / (W + 2 + c PPM / g) = (W+1) g / ((W+2) g + c PPM)
    return PPM * (w + 1) * g // ((w + 2) * g + abnormal * PPM)


def update(state: NodeReputation, credit_ppm: int, config: ReputationConfig) -> NodeReputation:
    """Fold one epoch's credit into a node's state (pure; the committee calls it per node)."""
    credit = _check_ppm("credit_ppm", credit_ppm)
    window = (*state.window, credit)[-config.window :]  # trim to W first, then count
    beta = punished_beta_ppm(abnormal_count(window, config), config)
    rep = (config.alpha_ppm * state.reputation_ppm + beta * credit) // PPM
    rep = min(max(rep, 0), PPM)
    streak = state.normal_streak + 1 if credit >= config.abnormal_below_ppm else 0
    readmitted = rep >= config.readmit_ppm and streak >= config.window
    excluded = rep < config.floor_ppm or (state.excluded and not readmitted)
    return NodeReputation(rep, window, excluded, streak, state.epochs + 1)


def is_trusted(state: NodeReputation, config: ReputationConfig) -> bool:
    """Whether routing may send work to this node (it is not excluded)."""
    return not state.excluded


def routing_reputation(state: NodeReputation, config: ReputationConfig) -> float:
    """What routing reads (``MemberState.reputation``, whose policy floor is 0.3): R while the
    node is trusted, 0 while it is excluded, so the hysteresis above holds in routing too.
    A float only at this edge; the ledger keeps the ppm integer."""
    return state.reputation_ppm / PPM if is_trusted(state, config) else 0.0


def challenges_per_epoch(state_or_ppm: NodeReputation | int, config: ReputationConfig) -> int:
    """How many challenges the committee sends a node this epoch: ``base_challenges`` at
    R >= ``full_rate_above_ppm``, rising linearly to ``max_challenges`` at R <= floor (and
    always the maximum while excluded). Non-increasing in R."""
    if isinstance(state_or_ppm, NodeReputation):
        if state_or_ppm.excluded:
            return config.max_challenges
        rep = state_or_ppm.reputation_ppm
    else:
        rep = _check_ppm("reputation_ppm", state_or_ppm)
    lo, hi = config.floor_ppm, config.full_rate_above_ppm
    rep = min(max(rep, lo), hi)
    span = config.max_challenges - config.base_challenges
    return config.max_challenges - span * (rep - lo) // (hi - lo)


def replay(
    credits: Sequence[int], config: ReputationConfig, start: NodeReputation | None = None
) -> list[NodeReputation]:
    """The states after each epoch of ``credits`` from ``start`` (a new node by default);
    benchmarks plot reputation over epochs with it."""
    state = NodeReputation.initial(config) if start is None else start
    out = []
    for credit in credits:
        state = update(state, credit, config)
        out.append(state)
    return out

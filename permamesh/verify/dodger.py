"""The adaptive dodger: a cheater that learns to tell challenges from user traffic.

:class:`AdaptiveDodger` sees every request a worker sees, as :class:`~permamesh.verify.observe.WorkerView`
rows (every field, timing, entry worker, session history, words), and is given the *truth*
about which past requests were challenges (:meth:`AdaptiveDodger.learn`): the strongest
position a dishonest partner could reach (by colluding with users, or by reading which
epochs cost it credit). It fits a gradient-boosted classifier (scikit-learn), classes weighted
equally, and answers a request cheaply (``cheat``: e.g. layers skipped) only when the
classifier's balanced probability that it is a challenge is below ``1 - confidence``;
otherwise honestly. If challenges are traffic, nothing is below that bar and it saves nothing
(and if it lowers its bar, it cheats on challenges as often as on traffic and is excluded).

The benchmark calls :meth:`AdaptiveDodger.observe` on every request in arrival order (user
requests too, which it serves without being scored) and reads :attr:`AdaptiveDodger.saved`:
the share of user requests it answered cheaply.

Who calls it: :mod:`permamesh.bench.verify`, tests. Needs scikit-learn (a dev dependency).
"""

from __future__ import annotations

import logging

from permamesh.verify.errors import VerifyError
from permamesh.verify.observe import WorkerView
from permamesh.wire.messages import GenerateRequest, GenerateResult

log = logging.getLogger(__name__)

__all__ = ["AdaptiveDodger", "fit_classifier"]


def fit_classifier(rows, labels, seed: int = 0):
    """A gradient-boosted classifier of "challenge (1) or not (0)", classes weighted equally."""
    import numpy as np
    from sklearn.ensemble import HistGradientBoostingClassifier

    x, y = np.asarray(rows, dtype=float), np.asarray(labels, dtype=int)
    if len(set(y.tolist())) < 2:
        raise VerifyError("the dodger needs examples of both challenges and user requests")
    model = HistGradientBoostingClassifier(max_iter=80, learning_rate=0.1, class_weight="balanced",
                                           random_state=seed)
    return model.fit(x, y)


class AdaptiveDodger:
    """Honest unless confident a request is not a challenge (see the module docstring)."""

    def __init__(self, honest, cheat, me: str = "", confidence: float = 0.9, seed: int = 0) -> None:
        if not 0.5 <= confidence < 1.0:
            raise VerifyError(f"confidence must be in [0.5, 1), not {confidence!r}")
        self.honest, self.cheat, self.me, self.confidence, self.seed = honest, cheat, me, confidence, seed
        self.view = WorkerView(me)
        self.model = None
        self._plan: dict[str, bool] = {}  # request id -> cheat?
        self.users = self.users_cheated = 0  # user requests seen, answered cheaply
        self.challenges = self.challenges_cheated = 0

    def learn(self, rows, labels) -> None:
        """Fit on labelled rows (1 = challenge) seen so far, e.g. from :meth:`row` on a history."""
        self.model = fit_classifier(rows, labels, self.seed)

    def row(self, t: float, req: GenerateRequest, entry: str = "") -> list[float]:
        """The request's features (remembered by this dodger's view: call in arrival order)."""
        return self.view.features(t, req, entry)

    def p_challenge(self, row: list[float]) -> float:
        if self.model is None:
            return 1.0  # knows nothing yet: honest
        return float(self.model.predict_proba([row])[0][1])

    def observe(self, t: float, req: GenerateRequest, entry: str = "", *, challenge: bool | None = None) -> bool:
        """See ``req`` arrive; decide whether to cheat on it (returned, and used by __call__).
        ``challenge`` (the benchmark's truth, for the tally only) is never used to decide."""
        cheat = bool(self.p_challenge(self.row(t, req, entry)) < 1.0 - self.confidence)
        self._plan[req.request_id] = cheat
        if challenge is True:
            self.challenges += 1
            self.challenges_cheated += cheat
        elif challenge is False:
            self.users += 1
            self.users_cheated += cheat
        return cheat

    def observe_users(self, arrivals: list[tuple[float, GenerateRequest, str]]) -> int:
        """See user requests ``(t, request, entry)`` arrive (answered off the record: the tally
        of :attr:`saved`); one batched prediction. Returns how many it cheated on."""
        if not arrivals:
            return 0
        rows = [self.row(t, req, entry) for t, req, entry in arrivals]
        if self.model is None:
            cheats = [False] * len(rows)
        else:
            cheats = [bool(p < 1.0 - self.confidence) for p in self.model.predict_proba(rows)[:, 1]]
        self.users += len(rows)
        self.users_cheated += int(sum(cheats))
        return int(sum(cheats))

    @property
    def saved(self) -> float:
        """Share of user requests answered cheaply (times the cheat's saving = compute saved)."""
        return self.users_cheated / self.users if self.users else 0.0

    def __call__(self, req: GenerateRequest, horizon: int | None = None) -> GenerateResult:
        cheat = self._plan.pop(req.request_id, None)
        if cheat is None:
            cheat = self.observe(0.0, req)
            self._plan.pop(req.request_id, None)
        return (self.cheat if cheat else self.honest)(req, horizon)

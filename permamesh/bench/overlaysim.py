"""Delivery under relay failure: how often a request and its answer get through.

:func:`simulate_delivery` is a seeded Monte Carlo of the overlay's data path
(``docs/paths.md`` section 6), vectorised with numpy; :func:`analytic_delivery` is the
formula it is checked against (for the targeted rule a dynamic program over the cloves
delivered). Callers: the overlay bench (:mod:`permamesh.bench.overlay`) and the tests.

The model:

- ``n_relays`` relays. With ``failure_model="dead"`` (the default) a fraction p of them,
  chosen at random, is dead for the whole run and drops everything it gets: clients pick
  paths without knowing which. With ``"transient"`` every relay fails on its own with
  probability p each time a path through it is used (one clove's round trip); then avoiding
  a failed path's relays gains nothing.
- Scheme ``(n, k)``: any k cloves rebuild the request; ``(1, 1)`` is single-path onion
  routing. A path of ``hops`` relays works if all its relays do. Paths of one request never
  share a relay (rule 3.1).
- ``reply_paths="reverse"`` (the default): each clove carries reply blocks built for its own
  relays reversed (one for the entry worker's ack, one for its answer clove), so a path works
  both ways or not at all, and a request whose k cloves arrived gets its answer back over
  the same k paths. A relay that dies between a clove's ack and its answer (or a loss on one
  leg of a round trip only) is a second-order effect and is **not** modelled.
  ``"separate"``: the answer goes back over n further paths the client chose (disjoint from
  the forward ones); both directions need k working paths of n.

Resend rules (``rules``):

- ``"targeted"`` (permamesh): the request is split once into up to ``max_cloves`` cloves and
  the first n go out over n paths. The entry worker acks each clove at once, so after the
  ack timeout the client knows which paths failed. While fewer than k cloves are acked, it
  sends, for each path that failed in the last round, one new clove (the next unused index:
  it combines with those delivered) over a fresh path avoiding every relay used for this
  request so far (those of failed paths because one of them is dead, the others by rule
  3.1); at most ``resends`` such rounds and ``max_cloves`` cloves in all. For onion: resend
  the message over a fresh path, up to ``resends`` times.
- ``"targeted-min"``: the same, but a round sends only the k - acked cloves still missing
  (fewer cloves, less margin): what a client that counts acked plus in-flight cloves
  against k does when its timeouts fire together.
- ``"attempt"`` (the earlier design, kept for comparison): each attempt is a fresh split
  into n cloves over a fresh path set avoiding every relay of every failed path; cloves of
  different attempts never combine; up to ``resends`` extra attempts. With separate reply
  paths the client learns which reply paths failed only when the answer came back short.

Entry workers never fail here (their failures are the routing bench's). Results are plain
dicts (JSON-able), one per (failure rate, scheme, rule, resends), with the simulated rate,
the mean rounds (attempts) and cloves sent per request, and the formula's values.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from permamesh.bench.traces import BenchError

TARGETS = {0.03: 0.995, 0.1: 0.97}  # failure rate -> delivery the overlay must reach there

log = logging.getLogger(__name__)

RULES = ("targeted", "targeted-min", "attempt")
REPLY_MODES = ("reverse", "separate")
FAILURE_MODELS = ("dead", "transient")
DEFAULT_FAILURE_RATES = (0.0, 0.01, 0.03, 0.05, 0.1, 0.15, 0.2)
DEFAULT_SCHEMES = ((1, 1), (4, 3), (5, 3), (6, 3))
DEFAULT_RESENDS = 3  # resend rounds (targeted) or extra attempts
DEFAULT_MAX_CLOVES = 8  # cloves one split yields (targeted)
_MAX_REDRAWS = 1000  # redraws of one column before a relay set counts as too small


def scheme_name(n: int, k: int) -> str:
    return "onion" if (n, k) == (1, 1) else f"sida({n},{k})"


def binomial_tail(n: int, k: int, q: float) -> float:
    """P[Binomial(n, q) >= k]."""
    return sum(math.comb(n, j) * q**j * (1 - q) ** (n - j) for j in range(k, n + 1))


@dataclass(frozen=True)
class Odds:
    """What :func:`analytic_delivery` predicts for one request."""

    rate: float  # P[delivered]
    mean_attempts: float  # rounds sent (targeted) or attempts (attempt), failures included
    mean_cloves: float  # request cloves sent (= forward paths used)


def analytic_delivery(
    n: int, k: int, hops: int, p: float, resends: int = 0, *, rule: str = "targeted",
    reply_paths: str = "reverse", max_cloves: int = DEFAULT_MAX_CLOVES,
) -> Odds:
    """Delivery when every path works independently with q = (1-p)^hops: exact for
    transient failures; with dead relays, avoiding failed paths' relays makes resends very
    slightly better (O(hops/N) per round)."""
    q = (1.0 - p) ** hops
    if rule == "attempt":
        once = binomial_tail(n, k, q) ** (2 if reply_paths == "separate" else 1)
        attempts = sum((1 - once) ** a for a in range(resends + 1))
        return Odds(1 - (1 - once) ** (resends + 1), attempts, n * attempts)
    # pending requests by (cloves acked, paths that failed last round, cloves sent)
    pending: dict[tuple[int, int, int], float] = {(0, n, 0): 1.0}
    rate = rounds = cloves = 0.0
    for _ in range(resends + 1):
        after: dict[tuple[int, int, int], float] = defaultdict(float)
        for (acked, failed, sent), share in pending.items():
            size = min(failed, max_cloves - sent)
            if rule == "targeted-min" and sent:  # a resend round: only what is missing
                size = min(size, k - acked)
            if size == 0:
                continue  # out of cloves: the request has failed
            rounds += share
            cloves += share * size
            for got in range(size + 1):
                odds = share * math.comb(size, got) * q**got * (1 - q) ** (size - got)
                if acked + got >= k:
                    rate += odds
                else:
                    after[acked + got, size - got, sent + size] += odds
        pending = after
    return Odds(rate, rounds, cloves)


def draw_distinct(
    rng: np.random.Generator, n_items: int, rows: int, width: int,
    avoid: np.ndarray | None = None,
) -> np.ndarray:
    """``rows`` x ``width`` item indices: each row a uniform draw without replacement from the
    items its ``avoid`` row (-1 pads) does not name. Rows drawn at once are kept when clean;
    the others are drawn again column by column, redrawing an entry that repeats an earlier
    column or is avoided (sequential sampling: uniform too)."""
    if width > n_items:
        raise BenchError(f"cannot draw {width} distinct items from {n_items}")
    banned = np.empty(0, dtype=np.int64)
    if avoid is not None and avoid.size:
        banned = np.sort((np.arange(rows)[:, None] * n_items + avoid)[avoid >= 0])
    out = rng.integers(0, n_items, (rows, width))
    ordered = np.sort(out, axis=1)
    bad = (ordered[:, 1:] == ordered[:, :-1]).any(axis=1)
    bad |= _banned(banned, np.arange(rows)[:, None], out, n_items).any(axis=1)
    redo = np.flatnonzero(bad)
    for col in range(width):
        todo = redo
        for _ in range(_MAX_REDRAWS):
            if todo.size == 0:
                break
            out[todo, col] = pick = rng.integers(0, n_items, todo.size)
            hit = (out[todo, :col] == pick[:, None]).any(axis=1)
            todo = todo[hit | _banned(banned, todo, pick, n_items)]
        else:
            raise BenchError(f"no {width} distinct allowed items among {n_items}")
    return out


def _banned(banned: np.ndarray, rows: np.ndarray, items: np.ndarray, n_items: int) -> np.ndarray:
    """Which (row, item) pairs the sorted ``row * n_items + item`` keys in ``banned`` name."""
    if banned.size == 0:
        return np.zeros(np.shape(items), dtype=bool)
    keys = rows * n_items + items
    return banned[np.minimum(np.searchsorted(banned, keys), banned.size - 1)] == keys


def _works(rng: np.random.Generator, alive: np.ndarray | None, p: float, relays: np.ndarray,
           hops: int) -> np.ndarray:
    """(rows, paths) booleans: which paths of ``relays`` (rows x paths*hops) work."""
    ok = alive[relays] if alive is not None else rng.random(relays.shape) >= p
    return ok.reshape(relays.shape[0], -1, hops).all(axis=2)


def _run_targeted(rng: np.random.Generator, alive: np.ndarray | None, p: float, n_relays: int,
                  n: int, k: int, hops: int, requests: int, resends: int,
                  max_cloves: int, minimal: bool) -> tuple[int, int, int]:
    """The permamesh rule for ``requests`` requests: (delivered, rounds, cloves sent);
    ``minimal``: a round sends only the cloves still missing (``"targeted-min"``)."""
    used = np.full((requests, max_cloves * hops), -1, dtype=np.int64)  # relays so far
    acked = np.zeros(requests, dtype=np.int64)
    sent = np.zeros(requests, dtype=np.int64)
    failed = np.full(requests, n, dtype=np.int64)  # paths that failed last round
    pending = np.arange(requests)
    rounds = 0
    for resend in range(resends + 1):
        size = np.minimum(failed[pending], max_cloves - sent[pending])
        if minimal and resend:
            size = np.minimum(size, k - acked[pending])
        pending, size = pending[size > 0], size[size > 0]
        if pending.size == 0:
            break
        rounds += pending.size
        for width in np.unique(size).tolist():
            rows = pending[size == width]
            relays = draw_distinct(rng, n_relays, rows.size, width * hops, used[rows])
            got = _works(rng, alive, p, relays, hops).sum(axis=1)
            used[rows[:, None], sent[rows, None] * hops + np.arange(width * hops)] = relays
            acked[rows] += got
            sent[rows] += width
            failed[rows] = width - got
        pending = pending[acked[pending] < k]
    return int((acked >= k).sum()), rounds, int(sent.sum())


def _run_attempts(rng: np.random.Generator, alive: np.ndarray | None, p: float, n_relays: int,
                  n: int, k: int, hops: int, requests: int, resends: int,
                  reply_paths: str) -> tuple[int, int, int]:
    """The whole-attempt rule: (delivered, attempts, cloves sent)."""
    groups = 2 * n if reply_paths == "separate" else n  # paths per attempt
    width = groups * hops
    avoid = np.full((requests, resends * width), -1, dtype=np.int64)
    pending = np.arange(requests)
    delivered = attempts = 0
    for attempt in range(resends + 1):
        m = pending.size
        if m == 0:
            break
        attempts += m
        relays = draw_distinct(rng, n_relays, m, width, avoid[pending])
        path_ok = _works(rng, alive, p, relays, hops)
        got_request = path_ok[:, :n].sum(axis=1) >= k
        failed = ~path_ok  # the paths the client learns have failed
        success = got_request
        if reply_paths == "separate":
            success = got_request & (path_ok[:, n:].sum(axis=1) >= k)
            failed[:, n:] &= got_request[:, None]  # unused reply paths are not suspects
        delivered += int(success.sum())
        if attempt < resends:
            suspects = np.where(np.repeat(failed, hops, axis=1), relays, -1)
            avoid[pending, attempt * width:(attempt + 1) * width] = suspects
        pending = pending[~success]
    return delivered, attempts, attempts * n


def simulate_delivery(
    n_relays: int = 10_000,
    failure_rates: Sequence[float] = DEFAULT_FAILURE_RATES,
    schemes: Sequence[tuple[int, int]] = DEFAULT_SCHEMES,
    hops: int = 3,
    requests: int = 20_000,
    resends: int | Sequence[int] = (0, DEFAULT_RESENDS),
    seed: int = 0,
    *,
    rules: Sequence[str] = ("targeted",),
    reply_paths: str = "reverse",
    failure_model: str = "dead",
    max_cloves: int = DEFAULT_MAX_CLOVES,
) -> list[dict]:
    """Delivery rate, mean rounds and cloves per (failure rate, scheme, rule, resend budget);
    see the module docstring. ``resends`` lists the budgets R to run (an int R means
    ``(0, R)``: without and with resends). The dead set of a failure rate is shared by every
    scheme, rule and budget; each row has its own random stream."""
    if isinstance(resends, int):
        resends = sorted({0, resends})
    if reply_paths not in REPLY_MODES or failure_model not in FAILURE_MODELS:
        raise BenchError(f"reply_paths must be one of {REPLY_MODES}, "
                         f"failure_model one of {FAILURE_MODELS}")
    if not rules or any(rule not in RULES for rule in rules):
        raise BenchError(f"rules must be some of {RULES}")
    targeted = any(rule.startswith("targeted") for rule in rules)
    if targeted and reply_paths != "reverse":
        raise BenchError("the targeted rule acks over each clove's own path: reply_paths='reverse'")
    if hops < 1 or requests < 1 or any(r < 0 for r in resends):
        raise BenchError("hops and requests must be >= 1, resends >= 0")
    for n, k in schemes:
        if not 1 <= k <= n or (targeted and n > max_cloves):
            raise BenchError(f"scheme ({n}, {k}): need 1 <= k <= n <= max_cloves ({max_cloves})")
    rows: list[dict] = []
    for p in failure_rates:
        if not 0.0 <= p < 1.0:
            raise BenchError(f"failure rate {p} not in [0, 1)")
        ppm = round(p * 1e6)  # streams keyed by values, so a row never depends on the others
        alive = None
        if failure_model == "dead":
            alive = np.ones(n_relays, dtype=bool)
            dead_rng = np.random.default_rng([seed, ppm])
            alive[dead_rng.choice(n_relays, round(p * n_relays), replace=False)] = False
        for (n, k), rule, budget in ((s, r, b) for s in schemes for r in rules for b in resends):
            rng = np.random.default_rng([seed, ppm, n, k, hops, budget, 1 + RULES.index(rule)])
            if rule != "attempt":
                got, tries, cloves = _run_targeted(rng, alive, p, n_relays, n, k, hops, requests,
                                                   budget, max_cloves, rule == "targeted-min")
            else:
                got, tries, cloves = _run_attempts(rng, alive, p, n_relays, n, k, hops,
                                                   requests, budget, reply_paths)
            odds = analytic_delivery(n, k, hops, p, budget, rule=rule, reply_paths=reply_paths,
                                     max_cloves=max_cloves)
            rows.append({
                "scheme": scheme_name(n, k), "rule": rule, "n": n, "k": k, "hops": hops,
                "max_cloves": n if rule == "attempt" else max_cloves,
                "failure_rate": float(p), "resends": int(budget), "reply_paths": reply_paths,
                "failure_model": failure_model, "requests": requests,
                "delivery_rate": got / requests, "mean_attempts": tries / requests,
                "mean_cloves": cloves / requests, "analytic_rate": odds.rate,
                "analytic_mean_attempts": odds.mean_attempts,
                "analytic_mean_cloves": odds.mean_cloves,
            })
    log.debug("delivery: %d rows", len(rows))
    return rows

"""Delivery under relay failure: how often a request and its answer get through.

:func:`simulate_delivery` is a seeded Monte Carlo of the overlay's data path
(``docs/paths.md``), vectorised with numpy; :func:`analytic_delivery` is the binomial formula
it is checked against. The model:

- ``n_relays`` relays. With ``failure_model="dead"`` (the default) a fraction p of them,
  chosen at random, is dead for the whole run and drops everything it gets: a mesh of relay
  processes where some have crashed or left, and clients pick paths without knowing which.
  With ``"transient"`` every relay on every attempt fails on its own with probability p
  (packet loss, overload); then avoiding a failed path's relays gains nothing.
- A scheme ``(n, k)`` splits a request into n cloves, any k rebuild it; ``(1, 1)`` is plain
  single-path onion routing. Each clove goes over its own path of ``hops`` relays; a path
  works if all its relays do. Paths are drawn uniformly, no relay twice per attempt.
- The request is delivered when >= k forward paths work. Then the answer goes back as n
  cloves, and the client needs >= k of them (``reply_paths``):

  * ``"separate"`` (default): over n further paths the client chose (disjoint from the
    forward ones), so both directions need >= k working paths of n;
  * ``"reverse"``: back along the forward paths that delivered (a dead relay fails both
    directions at once, so in the dead model delivery of the request is enough);
  * ``"none"``: one-way messages, only the request counts.

- Resend rule: the proxy of a path returns a receipt, so after the per-path timeout the
  client knows which forward paths failed (and, if the answer came partly, which reply
  paths). It cannot tell which relay of a failed path died, so a resend goes over a whole
  fresh set of paths avoiding every relay of every path that failed for this request, up to
  ``resends`` extra attempts. Each attempt is a fresh split: cloves of different attempts
  never combine. Entry workers never fail here (their failures are the routing bench's).

Results are plain dicts (JSON-able), one per (failure rate, scheme, resends), with the
simulated rate, the mean number of attempts and the formula's values for comparison.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np

from permamesh.bench.traces import BenchError

log = logging.getLogger(__name__)

REPLY_MODES = ("separate", "reverse", "none")
FAILURE_MODELS = ("dead", "transient")
DEFAULT_FAILURE_RATES = (0.0, 0.01, 0.03, 0.05, 0.1, 0.15, 0.2)
DEFAULT_SCHEMES = ((1, 1), (4, 3), (5, 3), (6, 3))
_MAX_REDRAWS = 1000  # redraws of one column before a relay set counts as too small


def scheme_name(n: int, k: int) -> str:
    return "onion" if (n, k) == (1, 1) else f"sida({n},{k})"


def binomial_tail(n: int, k: int, q: float) -> float:
    """P[Binomial(n, q) >= k]."""
    return sum(math.comb(n, j) * q**j * (1 - q) ** (n - j) for j in range(k, n + 1))


def analytic_delivery(
    n: int, k: int, hops: int, p: float, resends: int = 0,
    reply_paths: str = "separate", failure_model: str = "dead",
) -> tuple[float, float]:
    """(delivery rate, mean attempts) when attempts are independent (exact for transient
    failures; for dead relays avoidance makes resends slightly better than this)."""
    q = (1.0 - p) ** hops  # a path works
    forward = binomial_tail(n, k, q)
    if reply_paths == "none" or (reply_paths == "reverse" and failure_model == "dead"):
        once = forward
    elif reply_paths == "separate":
        once = forward * forward
    else:  # reverse, transient: the answer rides back over the j paths that delivered
        once = sum(math.comb(n, j) * q**j * (1 - q) ** (n - j) * binomial_tail(j, k, q)
                   for j in range(k, n + 1))
    miss = 1.0 - once
    return 1.0 - miss ** (resends + 1), sum(miss**a for a in range(resends + 1))


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


def _run_one(
    rng: np.random.Generator, alive: np.ndarray, p: float, n: int, k: int, hops: int,
    requests: int, resends: int, reply_paths: str, failure_model: str,
) -> tuple[int, int]:
    """Simulate ``requests`` requests of one scheme; return (delivered, total attempts)."""
    n_relays = alive.size
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
        if failure_model == "dead":
            hop_ok = alive[relays]
        else:
            hop_ok = rng.random((m, width)) >= p
        path_ok = hop_ok.reshape(m, groups, hops).all(axis=2)
        forward = path_ok[:, :n]
        got_request = forward.sum(axis=1) >= k
        failed = ~path_ok  # the paths the client learns have failed
        if reply_paths == "separate":
            success = got_request & (path_ok[:, n:].sum(axis=1) >= k)
            failed[:, n:] &= got_request[:, None]  # unused reply paths are not suspects
        elif reply_paths == "reverse" and failure_model == "transient":
            back = (rng.random((m, n * hops)) >= p).reshape(m, n, hops).all(axis=2)
            success = got_request & ((forward & back).sum(axis=1) >= k)
            failed |= forward & ~back & got_request[:, None]
        else:
            success = got_request
        delivered += int(success.sum())
        if attempt < resends:
            suspects = np.where(np.repeat(failed, hops, axis=1), relays, -1)
            avoid[pending, attempt * width:(attempt + 1) * width] = suspects
        pending = pending[~success]
    return delivered, attempts


def simulate_delivery(
    n_relays: int = 10_000,
    failure_rates: Sequence[float] = DEFAULT_FAILURE_RATES,
    schemes: Sequence[tuple[int, int]] = DEFAULT_SCHEMES,
    hops: int = 3,
    requests: int = 20_000,
    resends: int | Sequence[int] = (0, 2),
    seed: int = 0,
    *,
    reply_paths: str = "separate",
    failure_model: str = "dead",
) -> list[dict]:
    """Delivery rate and mean attempts per (failure rate, scheme, resend budget); see the
    module docstring. ``resends`` lists the budgets R to run (an int R means ``(0, R)``:
    without and with the resend rule). The dead set of a failure rate is shared by every
    scheme and budget."""
    if isinstance(resends, int):
        resends = sorted({0, resends})
    if reply_paths not in REPLY_MODES or failure_model not in FAILURE_MODELS:
        raise BenchError(f"reply_paths must be one of {REPLY_MODES}, "
                         f"failure_model one of {FAILURE_MODELS}")
    if hops < 1 or requests < 1 or any(r < 0 for r in resends):
        raise BenchError("hops and requests must be >= 1, resends >= 0")
    for n, k in schemes:
        if not 1 <= k <= n:
            raise BenchError(f"scheme ({n}, {k}): need 1 <= k <= n")
    rows: list[dict] = []
    for p in failure_rates:
        if not 0.0 <= p < 1.0:
            raise BenchError(f"failure rate {p} not in [0, 1)")
        ppm = round(p * 1e6)  # streams keyed by values, so a row never depends on the others
        alive = np.ones(n_relays, dtype=bool)
        dead_rng = np.random.default_rng([seed, ppm])
        alive[dead_rng.choice(n_relays, round(p * n_relays), replace=False)] = False
        for n, k in schemes:
            for budget in resends:
                rng = np.random.default_rng([seed, ppm, n, k, hops, budget, 1])
                got, tries = _run_one(rng, alive, p, n, k, hops, requests, budget,
                                      reply_paths, failure_model)
                rate, mean_attempts = analytic_delivery(n, k, hops, p, budget, reply_paths,
                                                        failure_model)
                rows.append({
                    "scheme": scheme_name(n, k), "n": n, "k": k, "hops": hops,
                    "failure_rate": float(p), "resends": int(budget),
                    "reply_paths": reply_paths, "failure_model": failure_model,
                    "requests": requests, "delivery_rate": got / requests,
                    "mean_attempts": tries / requests, "analytic_rate": rate,
                    "analytic_mean_attempts": mean_attempts,
                })
    log.debug("delivery: %d rows", len(rows))
    return rows

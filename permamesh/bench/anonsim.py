"""Anonymity and confidentiality against malicious relays: who can tell who asked what.

:func:`simulate_anonymity` is a seeded Monte Carlo in the spirit of PlanetServe's
malicious-fraction study (N = 10,000 nodes, a malicious fraction f from 0.001 to 0.5),
vectorised with numpy; :func:`analytic_anonymity` gives the closed forms it is checked
against (uniform adversary, full collusion).

Threat model. The adversary runs a fraction f of the N relays, chosen uniformly at random
(``adversary="uniform"``) or as whole ISPs taken in random order until it holds f*N relays
(``"isp"``: a hosting provider, or one operator's many Sybils; the last ISP partly). Its
relays follow the protocol and record everything; they look like any other relay, so
clients pick them as often as any other. Who pools what they saw is ``collusion``:
``"global"`` (all malicious relays share), ``"isp"`` (relays of one ISP share) or ``"node"``
(every relay alone). It sees no link it is not an end of (no global passive observer),
the client and the entry worker are honest (a malicious entry worker reads every prompt it
serves by design and then links whenever ``sender`` holds), and a colluding group can match
cloves of one request by timing. One request is one fresh path set, request direction only:
the answer crosses its own paths and faces the same odds.

What a relay sees, per scheme:

- ``onion``: one clove = the whole message over one onion path of ``hops`` distinct relays.
  Every hop sees its neighbours; only the last hop (the proxy) sees the clove unwrapped.
- ``garlic``: Garlic-Cast-style; n cloves (any k rebuild) over n random walks of ``hops``
  steps with no onion layers: every hop sees its clove and where it is going; walks may
  cross and revisit relays.
- ``permamesh``: n cloves over n onion paths chosen by the rules of ``docs/paths.md``: no
  relay twice in a request, no ISP twice within a path, proxies in distinct ISPs. Only a
  path's proxy sees its clove.

Per request the adversary (one colluding group suffices):

- ``sender``: learns who sent it: it holds the first hop of some path (it receives from the
  client directly);
- ``trace``: learns who talks to which entry worker: a group holds a first hop and also sees
  some clove (so the entry worker it goes to);
- ``read``: learns the content: a group sees >= k cloves (k = 1 for onion);
- ``link``: learns who asked what: a group that reads also holds a first hop;
- ``read_any_hop``: ``read`` if every hop could see its clove (a broken onion layer);
  PlanetServe's confidentiality figure counts a clove captured this way (its
  confidentiality is 1 - this).

Relay selection is uniform here (equal weights); permamesh paths are drawn one after
another, each uniform over the choices the rules leave it, by rejection (as
``PathSelector`` in :mod:`permamesh.overlay.paths` does). Nodes are spread over
``isps`` ISPs with Zipf(1) sizes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from permamesh.bench.overlaysim import binomial_tail, draw_distinct
from permamesh.bench.traces import BenchError

log = logging.getLogger(__name__)

KINDS = ("onion", "garlic", "permamesh")
ADVERSARIES = ("uniform", "isp")
COLLUSION = ("global", "isp", "node")
METRICS = ("sender", "trace", "read", "link", "read_any_hop")
DEFAULT_FRACTIONS = (0.001, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)
_CHUNK = 20_000  # requests simulated at once (bounds memory)
_MAX_ROUNDS = 500  # rejection rounds for the ISP rules


@dataclass(frozen=True)
class AnonScheme:
    """One way of sending a request (see the module docstring)."""

    name: str
    kind: str  # one of KINDS
    n: int = 1  # cloves (paths or walks)
    k: int = 1  # cloves that rebuild the message
    hops: int = 3  # relays per path or walk

    def __post_init__(self) -> None:
        if self.kind not in KINDS or not 1 <= self.k <= self.n or self.hops < 1:
            raise BenchError(f"bad scheme {self}")


DEFAULT_SCHEMES = (
    AnonScheme("onion", "onion", 1, 1, 3),
    AnonScheme("garlic-cast", "garlic", 4, 3, 3),
    AnonScheme("permamesh", "permamesh", 4, 3, 3),
)


def analytic_anonymity(scheme: AnonScheme, f: float) -> dict[str, float]:
    """Closed forms for a uniform adversary with global collusion, relays drawn
    independently (exact as N grows; sampling without replacement differs by O(1/N))."""
    n, k, hops = scheme.n, scheme.k, scheme.hops
    sender = 1 - (1 - f) ** n
    any_hop = binomial_tail(n, k, 1 - (1 - f) ** hops)
    if scheme.kind == "garlic":
        # per walk: first hop bad (f), first good but a later one bad (b), clean (c)
        b, c = (1 - f) * (1 - (1 - f) ** (hops - 1)), (1 - f) ** hops
        read = any_hop
        no_first = sum(math.comb(n, j) * b**j * c ** (n - j) for j in range(k, n + 1))
        return {"sender": sender, "trace": sender, "read": read, "link": read - no_first,
                "read_any_hop": any_hop}
    read = binomial_tail(n, k, f)  # proxies are distinct from first hops: independent
    trace = sender * (1 - (1 - f) ** n) if hops > 1 else sender
    return {"sender": sender, "trace": trace, "read": read,
            "link": read * sender if hops > 1 else read, "read_any_hop": any_hop}


def _population(rng: np.random.Generator, n_nodes: int, isps: int, f: float,
                adversary: str) -> tuple[np.ndarray, np.ndarray]:
    """(ISP of each node, malicious mask)."""
    shares = 1.0 / np.arange(1, isps + 1)
    isp_of = rng.choice(isps, n_nodes, p=shares / shares.sum())
    bad = np.zeros(n_nodes, dtype=bool)
    want = round(f * n_nodes)
    if adversary == "uniform":
        bad[rng.choice(n_nodes, want, replace=False)] = True
        return isp_of, bad
    for isp in rng.permutation(isps):
        members = rng.permutation(np.flatnonzero(isp_of == isp))
        take = members[: want - int(bad.sum())]
        bad[take] = True
        if bad.sum() >= want:
            break
    return isp_of, bad


def _paths(rng: np.random.Generator, scheme: AnonScheme, isp_of: np.ndarray,
           m: int) -> np.ndarray:
    """(m, n, hops) node indices of m requests' paths or walks."""
    n, hops, n_nodes = scheme.n, scheme.hops, isp_of.size
    if scheme.kind == "garlic":
        return rng.integers(0, n_nodes, (m, n, hops))
    if scheme.kind == "onion":
        return draw_distinct(rng, n_nodes, m, n * hops).reshape(m, n, hops)
    out = np.empty((m, n, hops), dtype=np.int64)
    for i in range(n):  # path by path, as the selector does; rejection within a path
        earlier = out[:, :i, :].reshape(m, -1)
        proxy_isps = isp_of[out[:, :i, -1]]  # (m, i)
        todo = np.arange(m)
        for _ in range(_MAX_ROUNDS):
            out[todo, i] = draw_distinct(rng, n_nodes, todo.size, hops, earlier[todo])
            isp = isp_of[out[todo, i]]
            ordered = np.sort(isp, axis=1)
            bad = ((ordered[:, 1:] == ordered[:, :-1]).any(axis=1)
                   | (isp[:, -1:] == proxy_isps[todo]).any(axis=1))
            todo = todo[bad]
            if todo.size == 0:
                break
        else:
            raise BenchError(f"{scheme.name}: ISP rules unsatisfiable with these ISPs")
    return out


def _metrics(units: np.ndarray, k: int, visible: slice) -> dict[str, np.ndarray]:
    """Per-request booleans from (m, n, hops) colluding-group ids (-1: honest relay)."""
    first = units[:, :, 0]  # (m, n)
    seen = units[:, :, visible]  # (m, n, P): who sees each clove
    sender = (first >= 0).any(axis=1)
    trace = ((first[:, :, None, None] >= 0)
             & (first[:, :, None, None] == seen[:, None, :, :])).any(axis=(1, 2, 3))
    # for the group at (clove i, position p): how many distinct cloves it sees
    same = seen[:, :, :, None, None] == seen[:, None, None, :, :]  # (m, n, P, n, P)
    reader = (seen >= 0) & (same.any(axis=4).sum(axis=3) >= k)
    also_first = (seen[:, :, :, None] == first[:, None, None, :]).any(axis=3)
    return {"sender": sender, "trace": trace, "read": reader.any(axis=(1, 2)),
            "link": (reader & also_first).any(axis=(1, 2))}


def simulate_anonymity(
    n_nodes: int = 10_000,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    schemes: Sequence[AnonScheme] = DEFAULT_SCHEMES,
    requests: int = 20_000,
    seed: int = 0,
    *,
    adversary: str = "uniform",
    collusion: str = "global",
    isps: int = 100,
) -> list[dict]:
    """Share of requests the adversary can ``sender``/``trace``/``read``/``link`` (and
    ``read_any_hop``) per (malicious fraction, scheme); see the module docstring."""
    if adversary not in ADVERSARIES or collusion not in COLLUSION:
        raise BenchError(f"adversary must be one of {ADVERSARIES}, collusion one of {COLLUSION}")
    if requests < 1 or isps < 1 or n_nodes < 1:
        raise BenchError("n_nodes, requests and isps must be >= 1")
    rows: list[dict] = []
    for f in fractions:
        if not 0.0 <= f <= 1.0:
            raise BenchError(f"malicious fraction {f} not in [0, 1]")
        ppm = round(f * 1e6)  # streams keyed by values, so a row never depends on the others
        isp_of, bad = _population(np.random.default_rng([seed, ppm]), n_nodes, isps, f, adversary)
        group = {"global": np.zeros(n_nodes, dtype=np.int64), "isp": isp_of,
                 "node": np.arange(n_nodes)}[collusion]
        unit_of = np.where(bad, group, -1)
        for scheme in schemes:
            rng = np.random.default_rng([seed, ppm, KINDS.index(scheme.kind), scheme.n,
                                         scheme.k, scheme.hops, 2])
            counts = dict.fromkeys(METRICS, 0)
            for start in range(0, requests, _CHUNK):
                units = unit_of[_paths(rng, scheme, isp_of, min(_CHUNK, requests - start))]
                hits = _metrics(units, scheme.k, slice(None))  # every hop sees its clove
                hits["read_any_hop"] = hits["read"]
                if scheme.kind != "garlic":  # onion layers: only the proxy does
                    hits.update(_metrics(units, scheme.k, slice(-1, None)))
                for name, hit in hits.items():
                    counts[name] += int(hit.sum())
            exact = adversary == "uniform" and collusion == "global"
            rows.append({
                "scheme": scheme.name, "kind": scheme.kind, "n": scheme.n, "k": scheme.k,
                "hops": scheme.hops, "fraction": float(f), "n_nodes": n_nodes,
                "adversary": adversary, "collusion": collusion, "requests": requests,
                **{name: counts[name] / requests for name in METRICS},
                "analytic": analytic_anonymity(scheme, f) if exact else None,
            })
    log.debug("anonymity: %d rows", len(rows))
    return rows

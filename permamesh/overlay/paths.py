"""Path selection: which relays carry a request's cloves, and for how long.

Each of a request's n cloves travels over its own onion path of ``hops`` relays; the last
relay (the proxy) hands it to the entry worker. :class:`PathSelector` draws the n paths of
one request from the relay directory: disjoint paths, no ISP, power grid or location twice
within a path, proxies in distinct ISPs, relays under the reputation floor never, the rest
weighted by reputation x capped bandwidth. :class:`~permamesh.overlay.sessions.SessionPaths`
(in :mod:`~permamesh.overlay.sessions`) keeps a path set per session, rotates it, and
rebuilds around failures. The rules and their reasons are
``docs/paths.md``.

Everything here is pure and deterministic given the ``random.Random`` passed in; production
callers pass none and get ``random.SystemRandom`` (nobody may predict paths). A request the
relays cannot satisfy raises :class:`~permamesh.overlay.errors.OverlayError` naming
the rule that failed.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import random
import statistics
from collections import Counter
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from functools import partial

from permamesh.overlay.errors import OverlayError

log = logging.getLogger(__name__)

NODE_ID_BYTES = 16
KEX_PUBLIC_BYTES = 32  # X25519 public key
_REJECTION_DRAWS = 48  # weighted draws tried before filtering the candidates explicitly


@dataclass(frozen=True)
class RelayDescriptor:
    """One relay as the directory lists it."""

    node_id: bytes  # 16 bytes
    kex_public: bytes  # 32-byte X25519 key the client wraps this hop's onion layer for
    address: str  # transport address, e.g. "tcp://198.51.100.7:7400"
    isp: str  # network operator (autonomous system or provider name)
    grid: str  # power grid the machine draws from
    location: str  # site: city or building
    reputation: float  # committee reputation, [0, 1]
    bandwidth: float  # measured forwarding rate, bytes/s, > 0

    def __post_init__(self) -> None:
        for name, size in (("node_id", NODE_ID_BYTES), ("kex_public", KEX_PUBLIC_BYTES)):
            if not isinstance(getattr(self, name), bytes) or len(getattr(self, name)) != size:
                raise OverlayError(f"relay {name} must be {size} bytes")
        for name in ("address", "isp", "grid", "location"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise OverlayError(f"relay {self.node_id.hex()}: {name} must be a non-empty str")
        if not 0.0 <= self.reputation <= 1.0:
            raise OverlayError(f"relay {self.node_id.hex()}: reputation not in [0, 1]")
        if not self.bandwidth > 0.0 or self.bandwidth == float("inf"):
            raise OverlayError(f"relay {self.node_id.hex()}: bandwidth must be finite and > 0")


Path = tuple[RelayDescriptor, ...]  # entry side first; the last relay is the proxy


@dataclass(frozen=True)
class PathPolicy:
    """How paths are built and how long a session keeps them."""

    hops: int = 3  # relays per path, proxy included
    n_paths: int = 4  # paths per request (the S-IDA n)
    min_reputation: float = 0.3  # relays below this are never chosen
    bandwidth_cap: float = 4.0  # bandwidth counts at most this many times the usable median
    distinct_proxy_isps: bool = True  # the proxies of one request never share an ISP
    max_uses: int = 64  # requests a session's path set carries before it is rebuilt
    max_age_s: float = 600.0  # seconds a session's path set lives before it is rebuilt
    max_tries: int = 32  # whole-selection restarts before a request is declared unsatisfiable

    def __post_init__(self) -> None:
        if not 2 <= self.hops <= 8:
            raise OverlayError("path policy: hops must be 2..8 (one hop would see both ends)")
        if (min(self.n_paths, self.max_uses, self.max_tries) < 1
                or not 0.0 <= self.min_reputation <= 1.0
                or not self.bandwidth_cap >= 1.0 or not self.max_age_s > 0.0):
            raise OverlayError(f"path policy out of range: {self}")


_DIVERSITY = (("isp", "ISP"), ("grid", "power grid"), ("location", "location"))


def _fits(relay: RelayDescriptor, used: set[bytes], chosen: list[RelayDescriptor]) -> bool:
    """May ``relay`` join a path holding ``chosen``? Unused, and no ISP, grid or location twice."""
    return relay.node_id not in used and all(
        relay.isp != c.isp and relay.grid != c.grid and relay.location != c.location
        for c in chosen
    )


class PathSelector:
    """Draws disjoint, diverse, weighted paths from a fixed relay set (see module docstring)."""

    def __init__(
        self,
        relays: Iterable[RelayDescriptor],
        policy: PathPolicy | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.policy = policy or PathPolicy()
        self._rng = rng if rng is not None else random.SystemRandom()
        by_id: dict[bytes, RelayDescriptor] = {}
        for relay in relays:
            if relay.node_id in by_id:
                raise OverlayError(f"relay {relay.node_id.hex()} listed twice")
            by_id[relay.node_id] = relay
        ordered = [by_id[key] for key in sorted(by_id)]
        self._below_floor = sum(r.reputation < self.policy.min_reputation for r in ordered)
        self._usable = [r for r in ordered if r.reputation >= self.policy.min_reputation]
        cap = self.policy.bandwidth_cap * statistics.median(
            [r.bandwidth for r in self._usable] or [1.0]
        )
        self._weights = [r.reputation * min(r.bandwidth, cap) for r in self._usable]
        self._cumulative = list(itertools.accumulate(self._weights))
        self._weight_by_id = {r.node_id: w for r, w in zip(self._usable, self._weights)}

    def weight(self, node_id: bytes) -> float:
        """The selection weight of a usable relay (0 for one below the floor or unknown)."""
        return self._weight_by_id.get(node_id, 0.0)

    def select(
        self,
        n_paths: int | None = None,
        exclude: Collection[bytes] = frozenset(),
        avoid_proxies: Collection[bytes] = frozenset(),
        avoid_proxy_isps: Collection[str] = frozenset(),
    ) -> list[Path]:
        """Return ``n_paths`` (default: the policy's) paths obeying every rule.

        ``exclude``: relays never used (failed, suspected, or on the caller's other paths).
        ``avoid_proxies``: relays that may carry a clove but not be its proxy.
        ``avoid_proxy_isps``: ISPs no proxy may be in (the proxies of paths kept elsewhere).
        """
        n = self.policy.n_paths if n_paths is None else n_paths
        if n < 1:
            raise OverlayError("select: n_paths must be >= 1")
        exclude = frozenset(exclude)
        avoid_proxies = frozenset(avoid_proxies)
        avoid_isps = frozenset(avoid_proxy_isps)
        for attempt in range(self.policy.max_tries):
            paths = self._attempt(n, exclude, avoid_proxies, avoid_isps)
            if paths is not None:
                return paths
            if attempt == 0:  # diagnose only when it is needed: the check costs O(relays)
                self._check_feasible(n, exclude, avoid_proxies, avoid_isps)
        raise OverlayError(
            f"paths: {n} disjoint paths of {self.policy.hops} hops with distinct "
            "ISP/grid/location per path and the proxy rules could not be found in "
            f"{self.policy.max_tries} tries; the usable relays are too few or too clustered"
        )

    # -- internals ------------------------------------------------------------------------

    def _check_feasible(
        self, n: int, exclude: frozenset[bytes], avoid_proxies: frozenset[bytes],
        avoid_isps: frozenset[str],
    ) -> None:
        """Raise naming the first necessary condition the usable relays cannot meet."""
        hops = self.policy.hops
        pool = [r for r in self._usable if r.node_id not in exclude]
        if len(pool) < n * hops:
            raise OverlayError(
                f"relay count: {n} disjoint paths of {hops} hops need {n * hops} relays; "
                f"{len(pool)} usable ({self._below_floor} below min_reputation "
                f"{self.policy.min_reputation}, {len(self._usable) - len(pool)} excluded)"
            )
        for attr, label in _DIVERSITY:
            counts = Counter(getattr(r, attr) for r in pool)
            slots = sum(min(c, n) for c in counts.values())  # a value fills <= 1 hop per path
            if slots < n * hops:
                raise OverlayError(
                    f"{label} diversity: {n} paths of {hops} hops with no {label} twice per "
                    f"path need {n * hops} relays; the usable relays span {len(counts)} "
                    f"{label}s and can fill {slots}"
                )
        proxies = [r for r in pool if r.node_id not in avoid_proxies and r.isp not in avoid_isps]
        if len(proxies) < n:
            raise OverlayError(
                f"proxy: {n} paths need {n} distinct proxies; {len(proxies)} usable relays "
                "may act as proxy (the rest are in avoid_proxies or avoided ISPs)"
            )
        if self.policy.distinct_proxy_isps and len({r.isp for r in proxies}) < n:
            raise OverlayError(
                f"proxy ISP diversity: {n} proxies in distinct ISPs needed; the relays that "
                f"may act as proxy span {len({r.isp for r in proxies})} ISPs"
            )

    def _attempt(
        self, n: int, exclude: frozenset[bytes], avoid_proxies: frozenset[bytes],
        avoid_isps: frozenset[str],
    ) -> list[Path] | None:
        used = set(exclude)
        proxy_isps = set(avoid_isps)  # ISPs a further proxy may not be in
        paths: list[Path] = []
        for _ in range(n):
            # the proxy first: its rules are the strictest
            proxy = self._draw(lambda r: r.node_id not in used and r.node_id not in avoid_proxies
                               and r.isp not in proxy_isps)
            if proxy is None:
                return None
            chosen = [proxy]
            used.add(proxy.node_id)
            while len(chosen) < self.policy.hops:
                relay = self._draw(partial(_fits, used=used, chosen=chosen))
                if relay is None:
                    return None
                chosen.append(relay)
                used.add(relay.node_id)
            if self.policy.distinct_proxy_isps:
                proxy_isps.add(proxy.isp)
            paths.append(tuple(reversed(chosen)))
        return paths

    def _draw(self, ok: Callable[[RelayDescriptor], bool]) -> RelayDescriptor | None:
        """One weighted draw among the usable relays that satisfy ``ok``, or None."""
        if not self._cumulative:
            return None
        total = self._cumulative[-1]
        for _ in range(_REJECTION_DRAWS):  # cheap when most relays qualify
            i = bisect.bisect_right(self._cumulative, self._rng.random() * total)
            relay = self._usable[min(i, len(self._usable) - 1)]
            if ok(relay):
                return relay
        candidates = [(r, w) for r, w in zip(self._usable, self._weights) if ok(r)]
        if not candidates:
            return None
        return self._rng.choices([r for r, _ in candidates], [w for _, w in candidates])[0]

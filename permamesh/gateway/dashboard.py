"""What the dashboard shows, as one JSON snapshot (``GET /api/mesh``).

:meth:`MeshView.snapshot` joins what this machine knows with what the committee knows:

- **nodes**: the committee's registry (signed profiles: location, ISP, grid, role, the
  verification reputation, excluded or not, the ``physics`` verdict on the claimed location)
  joined with its directory (each node's advertised endpoint, model and container side, and
  whether the members' probes find it running), the metrics endpoints of processes on this
  machine, and the health monitor's verdict (which checks every node of the directory: a
  node that does not answer is ``down``, whatever the committee last said), its measured
  uptime (its answered share of the checks), and a worker's queue and decode rate; a node
  with no health verdict shows the committee's: ``running`` or ``down``;
- **reputation over epochs**: each node's reputation at every closed epoch (the ledger's
  per-epoch payout rows carry it);
- **replication across failure domains**: for each model, its replicas' shares per grid, ISP,
  location, software version and continent (the scheduler's ``domain_shares``, with the most
  any one domain holds); for each image layer held by container workers, its holders;
- **payouts**: each partner's monthly payment with every "why" (the scheduler's
  ``monthly_payments`` over the committee's registry, with each node's **measured** uptime
  from the health checks, 0 for a node never seen answering; a node whose claimed location
  is impossible earns nothing, and says why).

Without a committee there are no positions, reputations or payouts; the page says so.

Who calls it: the gateway's ``/api/mesh`` handler (from a worker thread).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import defaultdict
from fractions import Fraction
from pathlib import Path

from permamesh.ops.metrics import discover_metrics

log = logging.getLogger(__name__)

PPM = 1_000_000
KINDS = ("grid", "isp", "location", "software", "continent")


def _cents(value) -> float:
    return float(Fraction(value)) / 100


class MeshView:
    def __init__(self, data_dir: Path, committee=None, health=None, directory=None, availability=None) -> None:
        """``committee``: a CommitteeClient or None; ``health``: () -> the monitor's last result;
        ``directory``: the gateway's CommitteeDirectory (endpoints and the running set);
        ``availability``: () -> node id -> measured uptime in [0, 1] (the health monitor's)."""
        self.data_dir, self.committee, self.health, self.directory = Path(data_dir), committee, health, directory
        self.availability = availability

    def snapshot(self) -> dict:
        from permamesh.committee.trust import node_id_of

        entries = []
        if self.directory is not None:
            try:
                entries = list(self.directory.snapshot().entries)
            except Exception as exc:  # noqa: BLE001 - the page still shows the registry
                log.warning("directory unreadable for the dashboard: %s", exc)
        workers = [e.worker_record() for e in entries if e.role == "worker" and e.running]
        metrics = discover_metrics(self.data_dir)
        registry, payouts_rows, why = [], [], ""
        if self.committee is None:
            why = "no committee configured (start the gateway with --committee)"
        else:
            try:
                registry = self.committee.query("/registry")
                payouts_rows = self.committee.query("/payouts")
            except Exception as exc:  # noqa: BLE001 - the page still shows the local nodes
                why = f"the committee did not answer: {exc}"
        health = {}
        if self.health is not None:
            health = {n["node"]: n for n in self.health().get("nodes", [])}
        nodes: dict[str, dict] = {}
        for row in registry:
            p = row.get("profile") or {}
            nid = node_id_of(row["node"])
            rep = row.get("reputation_ppm")
            nodes[nid] = {"id": nid, "role": row.get("role", "?"), "lat": p.get("lat_e6", 0) / 1e6,
                          "lon": p.get("lon_e6", 0) / 1e6, "isp": p.get("isp", ""), "grid": p.get("grid", ""),
                          "partner": row.get("partner", "")[:16], "reputation": None if rep is None else rep / PPM,
                          "excluded": bool(row.get("excluded")), "models": list(p.get("models", [])),
                          "physics": row.get("physics"), "registered": True, "local": False}
        for e in entries:
            node = nodes.setdefault(e.node_id, {"id": e.node_id, "role": e.role, "registered": True,
                                                "isp": e.isp, "grid": e.grid})
            node.update(running=e.running, endpoint=e.endpoint, location=e.location, rtt_us=e.rtt_us)
            if e.role == "worker":
                node.update(model=e.model, containers=bool(e.layers))
        for m in metrics:
            node = nodes.setdefault(m.node_id, {"id": m.node_id, "role": m.role, "registered": False})
            node.update(local=True, metrics=m.url)
        for nid, node in nodes.items():
            h = health.get(nid)
            if h:
                node["health"] = h["status"]
            elif "running" in node:
                node["health"] = "running" if node["running"] else "down"
            else:
                node["health"] = "unknown"
            node["alerts"] = h.get("alerts", []) if h else []
            if h:
                node.update({k: h[k] for k in ("availability", "queue", "decode_tok_s", "latency_ms") if k in h})
        counts: dict[str, int] = defaultdict(int)
        for node in nodes.values():
            counts[node["role"]] += 1
        return {"generated_at": time.time(), "committee": why or "ok", "nodes": sorted(nodes.values(),
                                                                                     key=lambda n: (n["role"], n["id"])),
                "counts": dict(sorted(counts.items())), "reputation_history": self._history(payouts_rows),
                "replication": {"models": self._models(registry), "layers": self._layers(workers)},
                "payouts": self._payouts(registry)}

    @staticmethod
    def _history(rows: list) -> dict[str, list]:
        from permamesh.committee.trust import node_id_of

        out: dict[str, list] = defaultdict(list)
        for row in sorted(rows, key=lambda r: (r["epoch"], r["node"])):
            out[node_id_of(row["node"])].append([row["epoch"], row.get("reputation_ppm", 0) / PPM])
        return dict(sorted(out.items()))

    @staticmethod
    def _models(registry: list) -> list[dict]:
        from permamesh.committee.trust import node_id_of
        from permamesh.scheduler.domains import domain_shares
        from permamesh.scheduler.profile import from_registry, group_locations

        try:
            profiles = from_registry([r for r in registry if r.get("role") == "worker"])
        except Exception as exc:  # noqa: BLE001 - a malformed row must not blank the page
            log.warning("registry rows unusable for replication: %s", exc)
            return []
        locations = group_locations(profiles)
        by_model: dict[str, list[str]] = defaultdict(list)
        for p in profiles:
            for model in p.models:
                by_model[model].append(p.node_id)
        out = []
        for model, ids in sorted(by_model.items()):
            shares = {kind: domain_shares(ids, profiles, kind, locations) for kind in KINDS}
            out.append({"model": model, "replicas": len(ids), "holders": sorted(node_id_of(i) for i in ids),
                        "shares": shares, "max_share": max(max(s.values()) for s in shares.values())})
        return out

    def _layers(self, workers) -> list[dict]:
        """Each layer digest held by this machine's container workers, and who holds it."""
        holders: dict[str, list[str]] = defaultdict(list)
        for w in workers:
            if not w.layers:
                continue
            root = self.data_dir / "containers" / w.node_id / "layers" / "blobs" / "sha256"
            for blob in sorted(root.iterdir()) if root.is_dir() else []:
                holders["sha256:" + blob.name].append(w.node_id)
        return [{"digest": d, "holders": sorted(h), "replicas": len(h)} for d, h in sorted(holders.items())]

    def _payouts(self, registry: list) -> list[dict]:
        if not registry:
            return []
        from permamesh.committee.trust import node_id_of
        from permamesh.scheduler.payouts import rows_payments
        from permamesh.scheduler.weights import load_weights

        try:
            weights = load_weights()
            payments = rows_payments(registry, weights)
            if self.availability is not None:
                payments = self._measured(registry, payments, weights, self.availability())
        except Exception as exc:  # noqa: BLE001
            log.warning("payouts not computed: %s", exc)
            return []
        return [{"partner": partner[:16], "total": _cents(pay.total), "why": list(pay.why),
                 "paid_nodes": sum(1 for n in pay.nodes if n.paid),
                 "nodes": [{"node": node_id_of(n.node_id), "location": n.location, "amount": _cents(n.amount),
                            "paid": n.paid, "why": list(n.why)} for n in pay.nodes]}
                for partner, pay in sorted(payments.items())]

    @staticmethod
    def _measured(registry: list, payments: dict, weights, measured: dict[str, float]) -> dict:
        """``payments`` recomputed with each node's measured uptime (0 for a node never seen
        answering); nodes the registry rows refused (impossible locations) are kept as they are."""
        from permamesh.committee.trust import node_id_of
        from permamesh.scheduler.payments import monthly_payments
        from permamesh.scheduler.profile import from_registry

        profiles = [dataclasses.replace(p, uptime=min(1.0, max(0.0, measured.get(node_id_of(p.node_id), 0.0))))
                    for p in from_registry([r for r in registry if r.get("role") != "validator"])]
        fresh = monthly_payments(profiles, weights)
        out = {}
        for partner, pay in payments.items():
            new = fresh.get(partner)
            if new is None:
                out[partner] = pay
                continue
            known = {n.node_id for n in new.nodes}
            extra = tuple(n for n in pay.nodes if n.node_id not in known)
            out[partner] = dataclasses.replace(new, nodes=tuple(sorted(new.nodes + extra, key=lambda n: n.node_id)))
        return out

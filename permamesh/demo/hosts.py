"""The mesh over simulated hosts: ``permamesh demo --hosts N`` and ``permamesh bench hosts``.

:func:`run_hosts` builds N network namespaces (:mod:`permamesh.ops.netns`: each its own
address, joined by a bridge; root needed) and runs :func:`inside` in the last one, the
client's host. From there it starts, each on its own host with its own data directory:
a CometBFT committee (one validator per host, listening on that host's address), every
member's liveness prober beside its validator, workers and relays started with nothing but
``--join https://VALIDATOR:PORT?key=HEX`` (the partner registers their public keys first, as
``permamesh register`` does). No node reads another's files or PIDs: peers, relays, entry
workers and the group salt come from the committee's directory, every link between nodes is
CurveZMQ to the key the directory names, and every link to a validator is TLS 1.3 pinned to
the member's node key (the validators' RPC answers nothing else).

Every node but the last worker starts at once (the cold start of a whole mesh: 13 nodes and 4
probers sharing the cores). Once they all run, the last worker joins that running mesh, as a
partner's new node would: its join time is from its process start to the first job a client
that found it in the directory gets from it, its model load excluded, and
:func:`~permamesh.demo.jointime.join_timeline` splits it into phases (imports and keys,
directory read, announce, group salt, the members' probe, the committee counting it running,
the client's directory copy, the first job). The cold start's figure is reported beside it.

The client host then measures overlay jobs delivered, a direct job whose prompt carries a
marker (a caller capturing the bridge checks it never crosses in clear), a worker host killed
(how soon its node leaves the running set; every job still answered), and a relay host killed
(overlay jobs still delivered). The report is one JSON object.

Who calls it: the CLI (``permamesh demo --hosts N``, ``permamesh bench hosts``) and
``tests/demo/test_hosts.py``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

from permamesh.errors import PermameshError

log = logging.getLogger(__name__)

RELAY_KILL_JOBS = 10  # overlay jobs sent right after a relay host is killed
MARKER = "purple-elephant-7f3c"  # in the direct job's prompt: must never cross the bridge in clear


@dataclasses.dataclass(frozen=True)
class HostsPlan:
    hosts: int = 7  # namespaces; the last is the client's
    validators: int = 4  # one per host, on hosts 0..validators-1
    workers: int = 2  # on the hosts after the validators' (wrapping around)
    relays: int = 12  # spread over every host but the client's
    jobs: int = 20  # overlay jobs from the client host
    model: str = "tiny-random"
    delays_ms: tuple[float, ...] = ()  # one-way delay per host (netem, else a delay line)
    start_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.hosts < 3 or self.validators < 1 or self.workers < 2 or self.relays < 12 or self.jobs < 1:
            raise PermameshError("--hosts needs at least 3 hosts, 1 validator, 2 workers, 12 relays and 1 job")

    def worker_host(self, j: int) -> int:
        return (self.validators + j) % (self.hosts - 1)

    def relay_host(self, j: int) -> int:
        return j % (self.hosts - 1)


def run_hosts(plan: HostsPlan, base: Path, say=print, prefix: str | None = None, on_hosts=None) -> dict:
    """Build the hosts, run :func:`inside` on the client's, tear everything down; the report.
    ``on_hosts(hosts)`` may return a context manager held while the mesh runs (a capture)."""
    import contextlib

    from permamesh.ops.netns import Hosts, HostsConfig, cleanup_on_signals

    prefix = prefix or f"pmh{os.getpid() % 100000}"
    base = Path(base)
    base.mkdir(parents=True, exist_ok=True)
    with cleanup_on_signals(), Hosts(HostsConfig(plan.hosts, prefix, delays_ms=plan.delays_ms)) as hosts:
        addrs = [hosts.addr(i) for i in range(plan.hosts)]
        say(f"hosts: {plan.hosts} network namespaces {', '.join(addrs)} (delays via {hosts.delay_via or 'none'})")
        held = on_hosts(hosts) if on_hosts is not None else contextlib.nullcontext()
        with held:
            args = [sys.executable, "-m", "permamesh.demo.hosts", json.dumps(dataclasses.asdict(plan)),
                    json.dumps([hosts.namespace(i) for i in range(plan.hosts)]), json.dumps(addrs), str(base)]
            done = hosts.run(plan.hosts - 1, args, timeout_s=plan.start_timeout_s + 300)
        for line in done.stderr.splitlines():
            if line.startswith("| "):
                say(line[2:])
        if done.returncode != 0 or not done.stdout.strip():
            raise PermameshError(f"the client host's run failed ({done.returncode}):\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])


def inside(plan: HostsPlan, namespaces: list[str], addrs: list[str], base: Path, say) -> dict:
    """Run on the client's host: start every node on its host, measure, stop everything."""
    from permamesh.committee.client import CommitteeClient
    from permamesh.committee.cometbft.network import CometNet, CometNetConfig
    from permamesh.committee.genesis import LedgerRules
    from permamesh.directory.announce import publish_validators
    from permamesh.ops.procs import stop_all

    wrap = [("ip", "netns", "exec", ns) for ns in namespaces]
    t0 = time.monotonic()
    net = CometNet(CometNetConfig(base / "committee", plan.validators, LedgerRules(probe_blocks=10),
                                  hosts=tuple(addrs[:plan.validators]), wrap=tuple(wrap[:plan.validators]),
                                  data_dir=base / "committee-run", start_timeout_s=plan.start_timeout_s))
    children = []
    report: dict = {"plan": dataclasses.asdict(plan), "addresses": addrs}
    try:
        net.start()
        join = net.endpoints[0]
        say(f"committee: {plan.validators} CometBFT validators on {', '.join(addrs[:plan.validators])} "
            f"ready in {time.monotonic() - t0:.1f} s; nodes join with --join {join}")
        with CommitteeClient(net.endpoints) as committee:
            publish_validators(committee, net.chain_id, net.partner, [net.identity(i) for i in range(plan.validators)],
                               net.endpoints)
            nodes = _register(plan, committee, net, base)
            joiner = [n for n in nodes if n["role"] == "worker"][-1]  # joins the running mesh later
            children += _start(plan, net, wrap, addrs, base, join, [n for n in nodes if n is not joiner])
            committee_pids = [c.proc.pid for c in (*net.apps, *net.nodes) if c is not None]
            report |= _measure(plan, committee, join, children, nodes, joiner, wrap, addrs, base, say, committee_pids)
    finally:
        stop_all(children)
        net.stop()
    report["total_s"] = time.monotonic() - t0
    return report


def _register(plan: HostsPlan, committee, net, base: Path) -> list[dict]:
    """Each node's keys made on its own host's data directory; the partner registers them."""
    from permamesh.committee import txs
    from permamesh.identity import NodeIdentity

    nodes = [{"role": "worker", "name": f"worker-{j}", "host": plan.worker_host(j)} for j in range(plan.workers)]
    nodes += [{"role": "relay", "name": f"relay-{j}", "host": plan.relay_host(j)} for j in range(plan.relays)]
    nonce = committee.next_nonce(net.partner.public.sign_key)
    raw = []
    for k, node in enumerate(nodes):
        node["data_dir"] = str(base / f"h{node['host']}")
        ident = NodeIdentity.load_or_create(Path(node["data_dir"]) / "keys", node["name"])
        node["node_id"] = ident.node_id
        profile = txs.NodeProfile((40 + k) * 10**6, (k * 7 % 60) * 10**6, f"grid-{k % 4}", f"isp-{k % 8}", 64500 + k,
                                  datacenter=f"site-{k}", models=(plan.model,) if node["role"] == "worker" else ())
        raw.append(txs.sign_tx(txs.RegisterNode(chain_id=net.chain_id, nonce=nonce + k, node_key=ident.public.sign_key,
                                                kex_key=ident.public.kex_key, role=node["role"], endpoint="",
                                                profile=profile), net.partner))
    failed = [o.log for o in committee.submit_many(raw, 60.0) if not o.ok]
    if failed:
        raise PermameshError(f"registering the nodes failed: {failed[0]}")
    return nodes


def _start(plan: HostsPlan, net, wrap, addrs, base: Path, join: str, nodes: list[dict]) -> list:
    """Start every member's prober and ``nodes`` at once; return once all printed READY."""
    from permamesh.ops.procs import spawn, wait_ready

    logs = base / "logs"
    probers = [spawn(f"prober-{i}", [*wrap[i], sys.executable, "-m", "permamesh.committee.liveness",
                                     "--keys", str(net.vdir(i) / "keys"), "--endpoint", net.endpoints[i],
                                     "--timeout", "0.5"], logs) for i in range(plan.validators)]
    for node in nodes:
        _spawn_node(plan, node, wrap, addrs, join, logs)
    children = probers + [node["child"] for node in nodes]
    wait_ready(children, plan.start_timeout_s)
    for node in nodes:
        node["ready_at"] = time.monotonic()
    return children


def _spawn_node(plan: HostsPlan, node: dict, wrap, addrs, join: str, logs: Path) -> None:
    from permamesh.ops.procs import spawn

    h = node["host"]
    common = ["--data-dir", node["data_dir"], "--name", node["name"], "--host", addrs[h], "--join", join,
              "--metrics-port", "-1"]
    if node["role"] == "worker":
        argv = [sys.executable, "-m", "permamesh", "worker", *common, "--model", plan.model, "--device", "cpu",
                "--threads", "1", "--prefix-cache-mb", "64"]
    else:  # its ISP, grid and location are the ones its registration claims (_register)
        argv = [sys.executable, "-m", "permamesh", "relay", *common]
    node["spawned_at"], node["spawned_wall"] = time.monotonic(), time.time()
    node["child"] = spawn(node["name"], [*wrap[h], *argv], logs)


def _model_load_s(child) -> float:
    """The seconds a worker's log says its model took to load (0 if it does not say)."""
    import re

    found = re.findall(r"model \S+ ready on \S+ in ([0-9.]+) s", child.log_tail(400))
    return float(found[-1]) if found else 0.0


def _running(committee) -> dict[str, bool]:
    return {n["node_id"]: n["running"] for n in committee.query("/directory")["nodes"]}


def _wait(cond, timeout_s: float, what: str) -> float:
    started = time.monotonic()
    while not cond():
        if time.monotonic() - started > timeout_s:
            raise PermameshError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.05)  # polling the committee; bounded by timeout_s
    return time.monotonic() - started


def _measure(plan: HostsPlan, committee, join: str, children, nodes, joiner, wrap, addrs, base: Path, say,
             committee_pids: list[int]) -> dict:
    from permamesh.client.blocking import Client, ClientError
    from permamesh.demo.jointime import cpu_use, first_job, framework_imports_s, import_calibration, join_timeline, joined
    from permamesh.directory.committee import CommitteeDirectory

    out: dict = {}
    workers = [n for n in nodes if n["role"] == "worker"]
    ids = {n["node_id"] for n in nodes}
    directory = CommitteeDirectory([join], base / "client" / "directory.json", timeout_s=5.0)
    cold = []
    for w in workers:  # the cold start: each worker started with the whole mesh, model load excluded
        if w is joiner:
            continue
        seen = first_job(lambda: _running(committee), directory, w, base / "client")
        cold.append(seen["served"] - w["spawned_at"] - _model_load_s(w["child"]))
    _wait(lambda: all(_running(committee).get(n["node_id"]) for n in nodes if n is not joiner), 60.0,
          "every node in the running set")
    say(f"cold start: {len(nodes) - 1} nodes started at once are running; a worker among them served its first "
        f"job {max(cold):.1f} s after its process started, model load excluded")
    out["idle_mesh_cpu"] = cpu_use(committee_pids + [c.proc.pid for c in children])  # what the joiner shares
    out["import_calibration_s"] = import_calibration(wrap[joiner["host"]])
    _spawn_node(plan, joiner, wrap, addrs, join, base / "logs")  # a new partner's worker joins the running mesh
    children.append(joiner["child"])
    seen = joined(joiner, lambda: _running(committee), directory, base / "client", plan.start_timeout_s)
    model_s = _model_load_s(joiner["child"])
    timeline = join_timeline(joiner, seen, base / "logs")
    out |= {"join_s": [seen["served"] - joiner["spawned_at"] - model_s], "model_load_s": [model_s],
            "ready_to_first_job_s": [seen["served"] - joiner["ready_at"]], "join_timeline": timeline,
            "framework_imports_s": framework_imports_s(joiner["child"].log_tail(400)),
            "cold_start_join_s": cold}
    _wait(lambda: all(_running(committee).get(i) for i in ids), 60.0, "every node in the running set")
    calib = out["import_calibration_s"]
    say(f"joined: a new worker served its first job {out['join_s'][0]:.1f} s after its process started, model "
        f"load ({model_s:.1f} s) excluded; READY to first job {out['ready_to_first_job_s'][0]:+.1f} s; phases (s): "
        + ", ".join(f"{k} {v:.2f}" for k, v in timeline["phases_s"].items())
        + f"; just before, on its host: `permamesh worker --help` took {calib['cli_worker_help_s']:.2f} s, "
        f"importing torch and transformers {calib['torch_transformers_s']:.2f} s; the idle mesh used "
        f"{out['idle_mesh_cpu']['mesh_cores']:.2f} cores, the machine {out['idle_mesh_cpu']['machine_busy_cores']:.2f} "
        f"of {out['idle_mesh_cpu']['cpus']}")
    with Client(data_dir=base / "client", join=join, timeout_s=60.0) as client:
        direct = client.generate(f"Remember the word {MARKER}.", max_tokens=4)
    out["direct_worker"] = direct.worker_id
    delivered, latencies = 0, []
    with Client(data_dir=base / "client", join=join, anonymous=True, timeout_s=60.0) as client:
        for k in range(plan.jobs):
            t = time.monotonic()
            try:
                client.generate(f"count to {k % 7 + 2}", max_tokens=3)
                delivered += 1
                latencies.append(time.monotonic() - t)
            except ClientError as exc:
                log.warning("overlay job %d: %s", k, exc)
    out |= {"overlay_jobs": plan.jobs, "overlay_delivered": delivered,
            "overlay_p50_s": sorted(latencies)[len(latencies) // 2] if latencies else None}
    say(f"overlay: {delivered}/{plan.jobs} jobs delivered across hosts, p50 {out['overlay_p50_s'] or 0:.3f} s")
    out |= _kill_worker_host(committee, join, workers, base, say)
    out |= _kill_relay_host(plan, join, nodes, base, say)
    return out


def _kill_worker_host(committee, join: str, workers, base: Path, say) -> dict:
    """SIGKILL one worker host's worker; keep submitting for 8 s; when did the committee drop it?"""
    import threading

    from permamesh.client.blocking import Client

    victim, survivor = workers[-1], workers[0]
    victim["child"].kill()
    killed = time.monotonic()
    detected: list[float] = []

    def watch() -> None:  # polls the committee from the client host (its own client: one per thread)
        from permamesh.committee.client import CommitteeClient

        with CommitteeClient(committee.endpoints) as mine:
            try:
                _wait(lambda: not _running(mine).get(victim["node_id"]), 30.0, "the killed worker to leave")
                detected.append(time.monotonic() - killed)
            except PermameshError as exc:
                log.warning("%s", exc)

    watcher = threading.Thread(target=watch, name="watch", daemon=True)
    watcher.start()
    answered, late_to_victim = 0, 0
    with Client(data_dir=base / "client", join=join, timeout_s=30.0) as client:
        while time.monotonic() - killed < 8.0:
            result = client.generate("after the kill", max_tokens=2)
            answered += 1
            late_to_victim += time.monotonic() - killed > 5.0 and result.worker_id == victim["node_id"]
    watcher.join(35.0)
    detect_s = detected[0] if detected else None
    say(f"worker host killed: {answered} jobs answered meanwhile (none lost), none sent there after 5 s: "
        f"{late_to_victim == 0}; out of the running set after {detect_s if detect_s is None else round(detect_s, 1)} s")
    return {"kill_jobs_answered": answered, "kill_jobs_to_dead_after_5s": late_to_victim,
            "kill_detect_s": detect_s, "survivor": survivor["node_id"]}


def _kill_relay_host(plan: HostsPlan, join: str, nodes, base: Path, say) -> dict:
    from permamesh.client.blocking import Client, ClientError

    host = plan.relay_host(0)
    victims = [n for n in nodes if n["role"] == "relay" and n["host"] == host]
    for n in victims:
        n["child"].kill()
    delivered = 0
    with Client(data_dir=base / "client", join=join, anonymous=True, timeout_s=60.0) as client:
        for k in range(RELAY_KILL_JOBS):
            try:
                client.generate(f"still there {k}", max_tokens=2)
                delivered += 1
            except ClientError as exc:
                log.warning("overlay job after the relay kill: %s", exc)
    say(f"relay host {host} killed ({len(victims)} relays): {delivered}/{RELAY_KILL_JOBS} overlay jobs delivered")
    return {"relay_kill_relays": len(victims), "relay_kill_delivered": delivered}


def main(argv: list[str] | None = None) -> int:
    """The client host's side (run by :func:`run_hosts` inside its namespace): progress lines
    on stderr prefixed ``| ``, the JSON report as the last line of stdout."""
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    fields = json.loads(argv[0])
    plan = HostsPlan(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    report = inside(plan, json.loads(argv[1]), json.loads(argv[2]), Path(argv[3]),
                    lambda text: print(f"| {text}", file=sys.stderr, flush=True))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``permamesh demo``: the whole mesh on one machine, with real answers and real figures.

Starts the committee (4 CometBFT validators, or the devnet with --committee devnet), then an
:class:`~permamesh.demo.mesh.EmbeddedMesh` (16 relays and two workers by default, SmolLM2 on
CPU) whose nodes join through the committee's directory exactly as nodes on other hosts do
(registered by the seed partner, signed descriptors announced, counted running by the
members' probes; no shared files, no PIDs), and sends every prompt through the anonymous overlay (S-IDA cloves over onion paths,
answers back over reply blocks): a few one by one (the first shows its paths), one after
killing relays the client still trusts (a drill: it resends over fresh paths), then a
concurrent burst; then container jobs through the overlay when a runtime is installed
(:mod:`permamesh.demo.containers`: cold, then warm on the worker holding the layers); then the committee (whose reputations the workers' routing reads) runs one verification epoch and a validator kill drill
(:mod:`permamesh.demo.committee`); then the OpenAI-compatible gateway with the dashboard (:mod:`permamesh.demo.gateway`), asked plainly and
streamed; prints latency figures and each worker's status, and stops every process,
also on Ctrl-C. ``--serve`` keeps the mesh up afterwards and writes ``DATA_DIR/join`` (the committee's
addresses) so ``permamesh submit`` on this machine finds it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TextIO

from permamesh.demo import committee as demo_committee, containers as demo_containers, gateway as demo_gateway
from permamesh.client.blocking import Client
from permamesh.demo.mesh import EmbeddedMesh, MeshConfig
from permamesh.directory.join import forget_join, remember_join
from permamesh.overlay.errors import OverlayError
from permamesh.overlay.sender import OverlayClient, OverlayConfig
from permamesh.workers import models

log = logging.getLogger(__name__)

PROMPTS = (
    "What is the capital of France?",
    "Name three primary colors.",
    "Write one sentence about why old computers are worth keeping.",
)
BURST = (
    "What is 2 + 2?",
    "What color is the sky on a clear day?",
    "Say hello in Spanish.",
    "What is the largest planet in our solar system?",
)


@dataclasses.dataclass(frozen=True)
class DemoOptions:
    data_dir: Path
    workers: int = 2
    model: str = models.DEFAULT_MODEL
    model_path: str | None = None
    device: str = "auto"
    max_tokens: int = 48  # per answer
    serve: bool = False  # keep running until Ctrl-C
    relays: int = 16  # relay processes; the overlay needs at least n * hops (12) of them
    gateway_port: int = 8000  # the OpenAI-compatible gateway (any free port if taken; 0 = any)
    committee: str = "cometbft"  # the committee's engine: cometbft, or devnet (the local stand-in)


@contextlib.contextmanager
def _stopped_by_signals():
    """Ctrl-C (SIGINT) and SIGTERM stop the demo cleanly, even where it was started with SIGINT
    ignored (a background job of a non-interactive shell, and every child of one, ignores it
    from birth: the demo would never stop on Ctrl-C and would leave its mesh running).
    Only in the main thread, where Python delivers signals; the old handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    before = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def run_demo(opts: DemoOptions, out: TextIO = sys.stdout) -> int:
    with _stopped_by_signals():
        return _run_demo(opts, out)


def _run_demo(opts: DemoOptions, out: TextIO) -> int:
    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    say(f"permamesh demo: {opts.workers} workers serving {opts.model_path or opts.model}, {opts.relays} relays")
    if opts.model_path or opts.model != models.TINY_RANDOM:
        started = time.monotonic()
        say("preparing the model (the first run converts the GGUF, ~20 s; later runs reuse the cache)...")
        models.resolve(opts.model, opts.model_path, opts.data_dir)
        say(f"model ready in {time.monotonic() - started:.1f} s")
    net, committee = demo_committee.start_committee(opts.data_dir, say, opts.committee)
    no_containers = demo_containers.available()
    mesh = EmbeddedMesh(MeshConfig(opts.data_dir, opts.workers, opts.model, opts.model_path, opts.device,
                                   relays=opts.relays, committee=net,
                                   worker_args=() if no_containers else ("--containers",)))
    started = time.monotonic()
    gateway = None
    try:
        say(f"starting relays and workers; each joins with --join {net.endpoints[0]} (and the other validators)...")
        endpoints = mesh.start()
        say(f"{len(mesh.relay_children)} relays and {len(endpoints)} workers joined in {time.monotonic() - started:.1f} s: "
            "registered by the seed partner, each published its signed descriptor, and the members' probes "
            "count every one running")
        relays, workers = mesh.relays(), mesh.workers()
        say(f"the client reads the committee's directory (checked against a second validator's app hash): "
            f"{len(relays)} relays at reputation {min(r.reputation for r in relays):.2f}.."
            f"{max(r.reputation for r in relays):.2f} (floor 0.3), {len(workers)} workers")
        names = {r.node_id: f"{r.node_id[:6]}({r.isp})" for r in relays}
        config = OverlayConfig()
        say(f"\nevery prompt below travels as S-IDA cloves: split into {config.max_cloves}, any {config.k} rebuild; "
            f"{config.n} leave at once, each over its own onion path of {config.hops} relays; the answer comes back as "
            "cloves over the reversed paths. No relay sees the prompt; the worker never learns who asked.")
        with OverlayClient(relays, workers, config) as client:
            say("\n== one at a time, through the overlay ==")
            for i, prompt in enumerate(PROMPTS):
                _ask(client, prompt, opts.max_tokens, say, names if i == 0 else None)
            _drill(mesh, client, opts.max_tokens, say)
        relays = mesh.relays()  # the killed relays are out of the running set by now
        _burst(relays, workers, opts.max_tokens, say)
        if no_containers:
            say(f"\n(no container jobs: {no_containers})")
        else:
            demo_containers.container_jobs(opts.data_dir, relays, workers, say)
        _committee(opts, net, committee, relays, workers, say)
        gateway, url, key = demo_gateway.start_gateway(opts.data_dir, net, committee, opts.gateway_port, say)
        demo_gateway.gateway_round(url, key, workers[0].model, opts.max_tokens, say)
        with Client(endpoints) as direct:
            say("\n== worker status ==")
            engines = {w.node_id: w.engine for w in workers}  # from their signed descriptors
            for st in direct.status():
                say(f"  {st.worker_id} {st.model} on {st.device} ({engines.get(st.worker_id, '?')}): "
                    f"served {st.served}, queue {st.queue_length}, "
                    f"prefill {st.prefill_tok_per_s:.0f} tok/s, decode {st.decode_tok_per_s:.1f} tok/s, "
                    f"group {st.group or '-'} ({st.members} peers, forwarded {st.forwarded}), "
                    f"prefix cache {st.cached_tokens_total}/{st.prompt_tokens_total} prompt tokens")
        if opts.serve:
            remember_join(opts.data_dir, net.endpoints)
            say(f"\nmesh is up. In another shell: permamesh submit --prompt 'Hello', or any OpenAI client at "
                f"{url}/v1; the dashboard is {url}/dashboard   (Ctrl-C here to stop)")
            threading.Event().wait()
    except KeyboardInterrupt:
        say("\ninterrupted; stopping the mesh")
    finally:
        steps = [("the gateway", lambda: gateway is not None and demo_gateway.stop_gateway(gateway, opts.data_dir)),
                 ("the join file", lambda: forget_join(opts.data_dir, net.endpoints)), ("the mesh", mesh.stop),
                 ("the committee client", committee.close), ("the committee", net.stop)]
        for what, stop in steps:  # each one whatever the others did: no process may be left running
            try:
                stop()
            except Exception:  # noqa: BLE001 - said, and the next part is stopped all the same
                log.exception("stopping %s failed", what)
        say("mesh stopped; no worker, relay or validator process left running")
    return 0


def _committee(opts: DemoOptions, devnet, committee, relays, workers, say) -> None:
    from permamesh.verify.challenges import ChallengePool
    from permamesh.verify.profile import TrafficProfile
    from permamesh.verify.traffic import user_requests

    reference = models.load(opts.model, opts.model_path, opts.data_dir, "cpu")
    pool = ChallengePool(TrafficProfile.observe(r for _, r in user_requests(300, 3, 1.0)))
    with OverlayClient(relays, workers, OverlayConfig()) as client:
        demo_committee.credit_round(committee, client, opts.data_dir, opts.max_tokens, say)
        demo_committee.verification_epoch(committee, devnet, client, reference, pool, reference.name, say)
    demo_committee.payouts(committee, say)
    demo_committee.validator_drill(devnet, committee, say)
    say("\n== the last blocks ==")
    demo_committee.recent_blocks(devnet, committee, say)


def _ask(client: OverlayClient, prompt: str, max_tokens: int, say, names: dict | None) -> None:
    say(f"\n> {prompt}")
    r = client.generate(messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens)
    d = client.last
    say("  " + r.text.strip().replace("\n", "\n  "))
    say(f"  [{r.worker_id}] {d.cloves_sent} cloves sent, {d.paths_failed} paths failed; end-to-end {d.elapsed_s:.2f} s, "
        f"of which the worker {r.total_s:.2f} s (queue {r.queue_wait_s:.2f} s, ttft {r.ttft_s * 1000:.0f} ms)")
    if names:
        for i, path in enumerate(d.paths):
            say(f"    path {i + 1}: you -> " + " -> ".join(names.get(n, n) for n in path) + f" -> entry {d.entry[:6]}")


def _drill(mesh: EmbeddedMesh, client: OverlayClient, max_tokens: int, say) -> None:
    """Failures drilled on purpose: kill the middle relay of three of the paths the client's
    session keeps using (it still believes in them), then ask again."""
    index = {child.node_id: i for i, child in enumerate(mesh.relay_children)}
    paths = client.last.paths if client.last is not None else ()
    victims = [index[path[len(path) // 2]] for path in paths[:3] if path[len(path) // 2] in index]
    killed_at = time.monotonic()
    for i in victims:
        mesh.kill_relay(i)
    say(f"\n== drill: {len(victims)} relays killed (SIGKILL), one on each of 3 of the session's paths; "
        "the client does not know which ==")
    try:
        _ask(client, "Say something kind about resilience.", max_tokens, say, None)
    except OverlayError as exc:
        say(f"  not delivered: {exc}")
    gone = tuple(mesh.relay_children[i].node_id for i in victims)
    mesh.wait_running(60.0, gone=gone)
    say(f"  the committee's probes took the {len(gone)} killed relays out of the running set within "
        f"{time.monotonic() - killed_at:.1f} s of the kill; no new path uses them")


def _rate(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0


def _burst(relays, workers, max_tokens: int, say) -> None:
    say(f"\n== a burst of {len(BURST)} concurrent requests, each through the overlay ==")

    def one(prompt: str):
        with OverlayClient(relays, workers) as c:
            sent = time.monotonic()
            r = c.generate(messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens)
            return prompt, r, time.monotonic() - sent

    with ThreadPoolExecutor(len(BURST)) as pool:
        results = list(pool.map(one, BURST))
    for prompt, r, e2e in results:
        say(f"> {prompt}\n  {r.text.strip()}\n  [{r.worker_id}] queued {r.queue_wait_s:.2f} s, end-to-end {e2e:.2f} s")
    lat = sorted(e2e for _, _, e2e in results)
    say(f"end-to-end latency: p50 {statistics.median(lat):.2f} s, max {lat[-1]:.2f} s over {len(lat)} requests")


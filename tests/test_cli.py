"""The command line as people use it: help texts, a worker process, submit, status, demo,
and Ctrl-C. Real processes on loopback; tiny-random keeps them fast."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import psutil
import pytest

from permamesh.demo import containers as demo_containers

from . import browser


CMD = [sys.executable, "-m", "permamesh"]


def run(*args, timeout=120, **kw):
    return subprocess.run([*CMD, *args], capture_output=True, text=True, timeout=timeout, **kw)


def test_help_lists_the_roles():
    out = run("--help").stdout
    for role in ("worker", "submit", "status", "demo", "partner", "researcher", "validator", "payouts",
                 "chaos", "committee member", "gateway", "health", "operator"):
        assert role in out


@pytest.mark.parametrize("role,units", [
    ("worker", ["count", "(default: 0)", "TCP port"]),
    ("submit", ["count", "seconds", "nats"]),
    ("demo", ["count"]),
    ("validator", ["tcp://127.0.0.1:26658", "cometbft", "devnet"]),
    ("chaos", ["count", "seconds"]),
    ("payouts", ["weights"]),
    ("gateway", ["seconds", "--new-key", "--committee", "HTTP port"]),
    ("health", ["SECONDS", "--json"]),
    ("worker", ["--containers", "MiB", "--metrics-port"]),
])
def test_each_role_documents_its_options_with_units(role, units):
    out = run(role, "--help").stdout
    for word in units:
        assert word in out, f"{role} --help lacks {word!r}"


def test_a_worker_without_a_committee_serves_direct_clients_and_stops_cleanly_on_sigterm(home):
    """A lone worker (no --join) serves whoever is given its address; it writes no registry
    file anywhere (finding workers is the committee's directory's job, tests/directory/)."""
    proc = subprocess.Popen([*CMD, "worker", "--model", "tiny-random", "--name", "w1", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = proc.stdout.readline().split()
        assert ready[0] == "READY", proc.stderr.read()
        submitted = run("submit", "--worker", ready[1], "--prompt", "hi there", "--max-tokens", "6", "--json")
        assert submitted.returncode == 0, submitted.stderr
        result = json.loads(submitted.stdout)
        assert result["completion_tokens"] >= 1 and result["worker_id"] == ready[2]
        status = run("status", "--worker", ready[1])
        assert status.returncode == 0 and ready[2] in status.stdout and "served     1" in status.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        proc.stdout.close()
        proc.stderr.close()
    assert not (home / "run" / "workers").exists()


def test_submit_without_a_mesh_says_what_to_do(home, monkeypatch):
    monkeypatch.delenv("PERMAMESH_JOIN", raising=False)
    out = run("submit", "--prompt", "anyone?")
    assert out.returncode == 2
    assert "needs the committee's directory: pass --join" in out.stderr and "permamesh demo --serve" in out.stderr
    out = run("submit", "--prompt", "anyone?", "--join", "tcp://127.0.0.1:9")
    assert out.returncode == 2 and "cannot read the directory from tcp://127.0.0.1:9" in out.stderr


def test_bad_model_name_is_a_clear_error(home):
    out = run("worker", "--model", "gpt-17")
    assert out.returncode == 2 and "unknown model 'gpt-17'" in out.stderr


def test_a_backend_that_cannot_serve_the_model_is_a_clear_error(home):
    out = run("worker", "--model", "tiny-random", "--backend", "llamacpp")
    assert out.returncode == 2 and "--backend llamacpp is unavailable" in out.stderr
    out = run("worker", "--backend", "vllm")
    assert out.returncode == 2 and "invalid choice: 'vllm'" in out.stderr


def check_demo_output(stdout: str) -> None:
    """What `permamesh demo` must have printed (its whole run, up to "mesh is up")."""
    assert stdout.count("ttft") == 4 and "end-to-end latency" in stdout  # 3 prompts and the drill
    assert stdout.count("cloves sent") == 4 and "path 1: you ->" in stdout
    assert "drill: 3 relays killed" in stdout and "not delivered" not in stdout
    # the committee: reports from all 4 members aggregated, reputation raised, drill survived
    assert "committee: 4 validators" in stdout and "16 relays and 2 workers joined" in stdout
    assert "16 relays at reputation 0.50..0.50 (floor 0.3), 2 workers" in stdout
    assert "killed relays out of the running set" in stdout
    epoch = stdout[stdout.find("== the committee: one verification epoch =="):][:3000]
    assert "4 reports, 2 workers scored" in stdout or "4 reports, 1 workers scored" in stdout, epoch
    assert "(code 0); balance now -" in stdout  # a job paid by its receipt
    assert "refused before it runs: out of credit" in stdout
    # honest credit 1.0, the liar ignored; a worker whose group peer served every challenge sent
    # through it (routing by cached prefix) is left unscored, never excluded
    assert stdout.count("reputation 0.5 -> 0.80") + stdout.count("credit -, reputation 0.5 -> 0.50") == 2, epoch
    assert "reputation 0.5 -> 0.80" in stdout and "EXCLUDED" not in epoch
    assert "agree on the app hash at height" in stdout and stdout.rstrip().count(": True") >= 1
    assert "CometBFT v0.38 nodes" in stdout and "committed by CometBFT" in stdout
    assert "DISAGREE" not in stdout
    if demo_containers.available() == "":  # a busybox job through the overlay: cold, then warm elsewhere
        assert stdout.count("hello from a container on permamesh: uid 0, args: run-") == 2
        assert "cold start" in stdout and "warm start" in stdout and "holds 2 of 2 layers" in stdout
    assert "POST /v1/chat/completions" in stdout and "streamed (server-sent events)" in stdout
    assert "the same answer" in stdout  # greedy: the stream joins back to the plain answer


def _serving_demo(lines: list | None = None):
    """Start `permamesh demo --serve` and return it with its processes (16 relays, 2 workers,
    4 validators of 2 processes each: a CometBFT node and its ledger app, and each member's
    liveness prober; the drill killed 3 relays), once up; ``lines`` gets what it printed."""
    proc = subprocess.Popen([*CMD, "demo", "--model", "tiny-random", "--max-tokens", "4", "--serve",
                             "--gateway-port", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if lines is not None:
            lines.append(line)
        if "mesh is up" in line:
            break
    workers = psutil.Process(proc.pid).children(recursive=True)
    assert len(workers) == 13 + 2 + 4 * 2 + 4, [w.name() for w in workers]
    return proc, workers


def test_the_demo_runs_then_serves_the_openai_client_and_the_dashboard(home, tmp_path):
    """`permamesh demo --serve` end to end: everything the demo prints (overlay, drill, committee,
    containers, gateway); then openai.OpenAI(base_url=...) against its gateway, plain and
    streamed, answered by the demo's workers through the overlay; its dashboard in headless
    Chromium showing its nodes, the reputations its verification epoch raised and the
    partner's payout; then Ctrl-C stops every process it started."""
    import re

    import openai

    lines: list[str] = []
    proc, workers = _serving_demo(lines)
    try:
        text = "".join(lines)
        check_demo_output(text)
        url = re.search(r'OpenAI\(base_url="([^"]+)", api_key="([^"]+)"\)', text)
        assert url, text[-2000:]
        with openai.OpenAI(base_url=url.group(1), api_key=url.group(2), max_retries=0, timeout=120) as client:
            chat = [{"role": "user", "content": "Name a colour."}]
            plain = client.chat.completions.create(model="tiny-random", messages=chat, max_tokens=4, temperature=0)
            stream = client.chat.completions.create(model="tiny-random", messages=chat, max_tokens=4, temperature=0,
                                                    stream=True)
            streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert plain.choices[0].message.content and streamed == plain.choices[0].message.content
        assert plain.usage.completion_tokens >= 1
        if browser.CHROMIUM:
            base = url.group(1).removesuffix("/v1")
            dom = browser.render(tmp_path, base + "/dashboard")
            # 2 workers + 16 relays registered, 4 validators and the gateway seen locally
            assert dom.by_id("node-count")["text"] == "23"
            assert {e["attrs"]["data-role"]: e["text"] for e in dom.find("span", "count")} == \
                {"gateway": "1", "relay": "16", "validator": "4", "worker": "2"}
            rows = [r["text"] for r in dom.find("tr", "node-row") if r["attrs"]["data-role"] == "worker"]
            assert len(rows) == 2 and all("up" in w for w in rows)  # the epoch's result: scored or left as it was
            assert any("0.80" in w for w in rows) and all("0.80" in w or "0.50" in w for w in rows)
            assert re.search(r"a month for \d+ of 19 nodes", dom.by_id("payouts")["text"])  # workers, relays, the gateway
        proc.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C sends the demo: it stops everything
        rest = proc.stdout.read()
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    assert "mesh stopped" in rest
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive
    assert not (home / "join").exists()  # the committee's address is gone with it
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(home) in " ".join(p.info["cmdline"] or [])]


PARENT = """
import sys, threading
from pathlib import Path
from permamesh.demo.mesh import EmbeddedMesh, MeshConfig
EmbeddedMesh(MeshConfig(Path(sys.argv[1]), workers=1, model="tiny-random", device="cpu", relays=2)).start()
print("up", flush=True)
threading.Event().wait()
"""


def test_workers_die_with_a_killed_parent(home):
    """kill -9 of the parent (the demo, or any owner of an embedded mesh): the kernel's
    parent-death signal stops its worker and relay processes."""
    proc = subprocess.Popen([sys.executable, "-c", PARENT, str(home)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout.readline().strip() == "up"
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) == 5  # 2 relays, 1 worker, the mesh's own validator and its prober
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.stdout.close()
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive


def test_the_gateway_process_serves_keys_metrics_and_stops_on_sigterm(home):
    import json
    import urllib.request

    from permamesh.committee.devnet.cluster import Devnet, DevnetConfig

    key = run("gateway", "--new-key", "bob").stdout.strip()
    assert key.startswith("pm-") and key not in (home / "gateway" / "keys.json").read_text()  # only its digest
    alone = run("gateway", "--port", "0")
    assert alone.returncode == 2 and "the gateway needs the committee's directory: pass --join" in alone.stderr
    devnet = Devnet(DevnetConfig(home / "committee", validators=1))
    devnet.start()
    unregistered = run("gateway", "--port", "0", "--join", devnet.endpoints[0])
    assert unregistered.returncode == 2 and "permamesh register --role gateway" in unregistered.stderr
    assert "--unlisted" in unregistered.stderr
    proc = subprocess.Popen([*CMD, "gateway", "--port", "0", "--join", devnet.endpoints[0], "--unlisted"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        ready = proc.stdout.readline().split()
        assert ready[0] == "READY" and ready[1].startswith("http://127.0.0.1:")
        url = ready[1]
        assert json.loads(urllib.request.urlopen(url + "/healthz", timeout=30).read())["status"] == "no_workers"
        models = urllib.request.Request(url + "/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert json.loads(urllib.request.urlopen(models, timeout=30).read()) == {"object": "list", "data": []}
        assert "process_cpu_seconds_total" in urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
        assert f"gateway-{proc.pid}.json" in [p.name for p in (home / "run" / "metrics").iterdir()]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        devnet.stop()
    assert not [p for p in (home / "run" / "metrics").iterdir() if p.name.startswith("gateway")]

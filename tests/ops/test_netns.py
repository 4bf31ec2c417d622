"""Simulated hosts in network namespaces: three hosts talk over their bridge while the root
namespace stays exactly as it was and has no way to reach them; a capture on the bridge sees
a marker sent in clear; a configured delay (netem, or the delay line that stands in where the
kernel has no netem) shows in a measured round trip; close() leaves no
namespace and no process behind (not even one that ignores SIGTERM), twice over; SIGTERM to
an entry point cleans up; a crashed run's leftovers are removed by cleanup_stale, and a
neighbouring prefix's are not.

Needs root and ``ip``: every test skips, saying why, where namespaces cannot be made. No
traffic leaves the namespaces these tests create.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import psutil
import pytest

from permamesh.ops import netns, procs
from permamesh.ops.capture import Capture, CaptureConfig
from permamesh.ops.netns import Hosts, HostsConfig, NetnsError, namespaces, unavailable

ECHO_SERVER = textwrap.dedent("""
    import socket, sys, threading
    srv = socket.create_server((sys.argv[1], 0))
    print("READY %s:%d echo" % srv.getsockname(), flush=True)
    def serve(conn, peer):
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data if data != b"who?" else peer[0].encode())
    while True:
        conn, peer = srv.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=serve, args=(conn, peer), daemon=True).start()
""")

ECHO_CLIENT = textwrap.dedent("""
    import json, socket, sys, time
    host, port, message, rounds = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode(), int(sys.argv[4])
    t0 = time.perf_counter()
    s = socket.create_connection((host, port), timeout=5)
    connect_ms = (time.perf_counter() - t0) * 1e3
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rtts, replies = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        s.sendall(message)
        replies.append(s.recv(65536).decode())
        rtts.append((time.perf_counter() - t0) * 1e3)
    print(json.dumps({"connect_ms": connect_ms, "rtt_ms": rtts, "replies": replies}))
""")


@pytest.fixture(scope="module", autouse=True)
def namespaces_work():
    reason = unavailable()
    if reason:
        pytest.skip(f"network namespaces unavailable here: {reason}")


@pytest.fixture
def prefix():
    """A prefix no other run (or concurrent test session) uses."""
    return f"pmt{os.getpid()}{uuid.uuid4().hex[:4]}"


def echo_server(hosts: Hosts, i: int, log_dir) -> tuple[procs.Child, int]:
    child = hosts.spawn(i, f"echo-h{i}", [sys.executable, "-c", ECHO_SERVER, hosts.addr(i)], log_dir)
    procs.wait_ready([child], 10, error=NetnsError)
    return child, int(child.endpoint.rsplit(":", 1)[1])


def echo(hosts: Hosts, frm: int, to: int, port: int, message: str, rounds: int = 1) -> dict:
    done = hosts.run(frm, [sys.executable, "-c", ECHO_CLIENT, hosts.addr(to), str(port), message,
                           str(rounds)], timeout_s=20)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def alive(pid: int) -> bool:
    """Still running (a killed orphan may stay a zombie where PID 1 does not reap)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def root_view() -> dict:
    """The root namespace's links, addresses and routes, read (never changed, nothing sent)."""
    def ip(*args):
        return json.loads(subprocess.run(["ip", "-j", *args], capture_output=True, text=True,
                                         check=True).stdout)
    return {"links": sorted((l["ifindex"], l["ifname"]) for l in ip("link", "show")),
            "addrs": sorted(a["local"] for l in ip("addr", "show") for a in l.get("addr_info", [])),
            "routes": ip("route", "show", "table", "all")}


def test_hosts_talk_over_the_bridge_and_the_root_namespace_never_changes(prefix, tmp_path):
    before = root_view()
    with Hosts(HostsConfig(3, prefix=prefix)) as hosts:
        assert namespaces(prefix) == sorted([f"{prefix}-br"] + [f"{prefix}-h{i}" for i in range(3)])
        assert [hosts.addr(i) for i in range(3)] == ["10.231.0.1", "10.231.0.2", "10.231.0.3"]
        _, port = echo_server(hosts, 0, tmp_path)
        # host 2 reaches host 0 at its own address, and host 0 sees host 2's address
        assert echo(hosts, 2, 0, port, "hello from h2")["replies"] == ["hello from h2"]
        assert echo(hosts, 2, 0, port, "who?")["replies"] == [hosts.addr(2)]
        # every host has lo up and its default route inside itself
        routes = hosts.run(1, ["ip", "route", "show", "default"]).stdout
        assert f"default dev {netns.HOST_DEV}" in routes
        # the root namespace is exactly as before: no link, address or route was added, none of
        # its addresses is in our subnet, and its route to host 0 is one it already had
        during = root_view()
        assert during == before
        assert not [a for a in during["addrs"] if a.startswith("10.231.0.")]
        via = json.loads(subprocess.run(["ip", "-j", "route", "get", hosts.addr(0)], capture_output=True,
                                        text=True, check=True).stdout)[0]["dev"]
        assert via in {name for _, name in before["links"]}
    assert root_view() == before


def test_a_capture_on_the_bridge_sees_a_marker_sent_in_clear(prefix, tmp_path):
    marker = f"pm-marker-{uuid.uuid4().hex}"
    never_sent = f"pm-marker-{uuid.uuid4().hex}".encode()
    # host 2 sits behind a delay line: its frames cross two more interfaces, kept once all the same
    config = HostsConfig(3, prefix=prefix, delays_ms=(0, 0, 2), delay_via="delayline")
    with Hosts(config) as hosts:
        _, port = echo_server(hosts, 0, tmp_path)
        with Capture(hosts, tmp_path) as cap:
            echo(hosts, 2, 0, port, marker)
        assert cap.complete and cap.stats.kept == cap.stats.frames > 0
        assert cap.contains(marker.encode())
        assert not cap.contains(never_sent)
        # the file is bounded: past max_bytes frames are counted, not kept, and the capture
        # says it is incomplete (so an absence check on it would prove nothing)
        with Capture(hosts, tmp_path, name="small", config=CaptureConfig(max_bytes=2048)) as small:
            echo(hosts, 2, 0, port, "z" * 1500)
        assert len(small.data()) <= 2048 and small.stats.over_size > 0 and not small.complete
    # each frame is kept once: the marker went h2 -> h0 and came back h0 -> h2
    assert sum(marker.encode() in f for f in cap.frames()) == 2


@pytest.mark.parametrize("via", ["netem", "delayline"])
def test_a_configured_delay_shows_in_the_measured_round_trip(prefix, tmp_path, via):
    """Both ways of delaying a host. Where the kernel lacks netem (this machine kind does),
    asking for netem by name must fail with a clear error, and "auto" must pick the delay line."""
    if via == "netem" and unavailable(netem=True):
        with pytest.raises(NetnsError, match="netem"):
            Hosts(HostsConfig(1, prefix=prefix, delays_ms=(1.0,), delay_via="netem")).start()
        assert namespaces(prefix) == []  # the partial build was undone
        with Hosts(HostsConfig(1, prefix=prefix, delays_ms=(1.0,))) as hosts:
            assert hosts.delay_via == "delayline"
        return
    delays = (20.0, 0.0, 30.0)
    with Hosts(HostsConfig(3, prefix=prefix, delays_ms=delays, delay_via=via)) as hosts:
        assert hosts.delay_via == via
        _, port = echo_server(hosts, 0, tmp_path)
        far = echo(hosts, 2, 0, port, "x", rounds=3)  # 30 ms out of h2, 20 ms out of h0
        near = echo(hosts, 1, 0, port, "x", rounds=3)  # 0 ms out of h1, 20 ms out of h0
    assert min(far["rtt_ms"]) >= 50 and far["connect_ms"] >= 50, far
    assert 20 <= min(near["rtt_ms"]) < min(far["rtt_ms"]), near


def test_close_leaves_no_namespace_and_no_process_and_can_run_twice(prefix, tmp_path):
    hosts = Hosts(HostsConfig(3, prefix=prefix, stop_grace_s=1.0)).start()
    server, _ = echo_server(hosts, 0, tmp_path)
    # a stray no close() was told about: detached, in its own session, ignoring SIGTERM
    done = hosts.run(1, ["sh", "-c", "trap '' TERM; setsid sleep 600 </dev/null >/dev/null 2>&1 &"])
    assert done.returncode == 0, done.stderr
    started = [p for pids in hosts.pids().values() for p in pids]
    assert server.proc.pid in started and len(started) == 2
    hosts.close()
    assert namespaces(prefix) == []
    assert not [p for p in started if alive(p)]
    hosts.close()  # harmless
    with pytest.raises(NetnsError, match="closed"):
        hosts.command(0, ["true"])


CRASHING_RUN = textwrap.dedent("""
    import sys, time
    from permamesh.ops.netns import Hosts, HostsConfig
    hosts = Hosts(HostsConfig(2, prefix=sys.argv[1])).start()
    hosts.run(0, ["sh", "-c", "setsid sleep 600 </dev/null >/dev/null 2>&1 &"])
    print("READY", flush=True)
    time.sleep(600)
""")


def test_cleanup_stale_removes_what_a_crashed_run_left_and_nothing_else(prefix, tmp_path):
    run = subprocess.Popen([sys.executable, "-c", CRASHING_RUN, prefix], stdout=subprocess.PIPE)
    neighbour = f"{prefix}x-h0"  # another prefix that merely starts with ours
    subprocess.run(["ip", "netns", "add", neighbour], check=True)
    try:
        assert run.stdout.readline().strip() == b"READY"
        run.kill()  # no cleanup runs
        run.wait()
        run.stdout.close()
        left = namespaces(prefix)
        assert left == [f"{prefix}-br", f"{prefix}-h0", f"{prefix}-h1"]
        stray = subprocess.run(["ip", "netns", "pids", f"{prefix}-h0"], capture_output=True,
                               text=True).stdout.split()
        assert len(stray) == 1
        with pytest.raises(NetnsError, match="cleanup_stale"):
            Hosts(HostsConfig(2, prefix=prefix)).start()
        assert Hosts.cleanup_stale(prefix) == left
        assert namespaces(prefix) == [] and not alive(int(stray[0]))
        assert neighbour in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert Hosts.cleanup_stale(prefix) == []
    finally:
        subprocess.run(["ip", "netns", "del", neighbour], capture_output=True)
        Hosts.cleanup_stale(prefix)


SIGNALLED_RUN = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from permamesh.ops import procs
    from permamesh.ops.netns import Hosts, HostsConfig, cleanup_on_signals
    with cleanup_on_signals(), Hosts(HostsConfig(2, prefix=sys.argv[1])) as hosts:
        child = hosts.spawn(1, "sleeper", [sys.executable, "-c",
                            "import time; print('READY - sleeper', flush=True); time.sleep(600)"],
                            Path(sys.argv[2]))
        procs.wait_ready([child], 10)
        print("READY", child.proc.pid, flush=True)
        time.sleep(600)
""")


def test_sigterm_to_an_entry_point_still_cleans_up(prefix, tmp_path):
    run = subprocess.Popen([sys.executable, "-c", SIGNALLED_RUN, prefix, str(tmp_path)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = run.stdout.readline().split()
        assert line[:1] == [b"READY"], run.stderr.read()
        run.send_signal(signal.SIGTERM)
        assert run.wait(20) == 128 + signal.SIGTERM
        assert namespaces(prefix) == [] and not alive(int(line[1]))
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        run.stdout.close()
        run.stderr.close()
        Hosts.cleanup_stale(prefix)


def test_failures_say_which_step_failed_and_undo_the_partial_build(prefix, monkeypatch):
    # the kernel refuses a step: the error names it and carries ip's stderr; nothing is left
    monkeypatch.setattr(netns, "HOST_DEV", "an-interface-name-too-long")
    with pytest.raises(NetnsError, match=r"veth pair for h0: .* exited \d+: .+"):
        Hosts(HostsConfig(2, prefix=prefix)).start()
    assert namespaces(prefix) == []
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(NetnsError, match="need root"):
        Hosts(HostsConfig(2, prefix=prefix)).start()
    monkeypatch.undo()
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(NetnsError, match="`ip` not found"):
        Hosts(HostsConfig(2, prefix=prefix)).start()
    with pytest.raises(ValueError, match="private"):
        HostsConfig(2, subnet="8.8.8.0/24")
    with pytest.raises(ValueError, match="one entry per host"):
        HostsConfig(2, delays_ms=(5.0,))

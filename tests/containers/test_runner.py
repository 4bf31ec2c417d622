"""The runner, for real: a busybox rootfs run under each installed runtime (runc, bwrap).

The story: a job echoes and exits with its own code; it cannot reach a server on the host's
loopback that the host itself reaches; it cannot write its rootfs, and what it writes to /tmp
never reaches the host; a job that runs too long is killed without leaving a process or a
container behind; too much output is cut and flagged; limits the host cannot enforce are
said to be not enforced.
"""

from __future__ import annotations

import http.server
import time
import subprocess
import uuid
import threading
import urllib.request

import psutil
import pytest

from permamesh.containers.limits import Limits, probe_host
from permamesh.containers.runner import RunError, run

FAST = Limits(timeout_s=10.0)


def test_echo_says_hello(busybox_rootfs, runtime):
    result = run(busybox_rootfs, ["echo", "hello"], limits=FAST, runtime=runtime)
    assert (result.exit_code, result.stdout, result.stderr) == (0, b"hello\n", b"")
    assert result.runtime == runtime and not result.timed_out and not result.truncated


def test_exit_code_env_and_workdir_reach_the_job(busybox_rootfs, runtime):
    result = run(busybox_rootfs, ["sh", "-c", 'echo "$GREETING $(pwd)"; exit 3'],
                 env=["GREETING=hi"], workdir="/tmp", limits=FAST, runtime=runtime)
    assert result.exit_code == 3
    assert result.stdout == b"hi /tmp\n"


@pytest.fixture
def http_server():
    """A real HTTP server on the host's loopback; yields its port."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_job_cannot_reach_the_hosts_loopback(busybox_rootfs, runtime, http_server):
    url = f"http://127.0.0.1:{http_server}/"
    with urllib.request.urlopen(url, timeout=5) as response:  # the host can
        assert response.status == 200
    result = run(busybox_rootfs, ["wget", "-T", "2", "-O", "-", url], limits=FAST,
                 runtime=runtime)
    assert result.exit_code != 0, result.stdout
    links = run(busybox_rootfs, ["sh", "-c", "ip -o link; cat /proc/net/dev"], limits=FAST,
                runtime=runtime)
    lines = links.stdout.decode().splitlines()
    interfaces = {line.split(":")[1].strip() for line in lines if line[:1].isdigit()}
    assert interfaces == {"lo"}
    devices = {line.split(":")[0].strip() for line in lines[2:] if ":" in line
               and not line[:1].isdigit()}
    assert devices == {"lo"}


def test_rootfs_is_read_only_and_tmp_stays_inside(busybox_rootfs, runtime):
    before = sorted(p.relative_to(busybox_rootfs) for p in busybox_rootfs.rglob("*"))
    etc = run(busybox_rootfs, ["touch", "/etc/x"], limits=FAST, runtime=runtime)
    assert etc.exit_code != 0 and b"Read-only" in etc.stderr
    tmp = run(busybox_rootfs, ["sh", "-c", "touch /tmp/x && ls /tmp"], limits=FAST,
              runtime=runtime)
    assert (tmp.exit_code, tmp.stdout) == (0, b"x\n")
    assert sorted(p.relative_to(busybox_rootfs) for p in busybox_rootfs.rglob("*")) == before


def test_a_job_that_runs_too_long_is_killed_and_leaves_nothing(busybox_rootfs, runtime):
    token = f"permamesh-test-{uuid.uuid4().hex}"  # names this job's processes only (other runs may sleep too)
    result = run(busybox_rootfs, ["sh", "-c", f"sleep 30; echo {token}"], limits=Limits(timeout_s=1.0),
                 runtime=runtime)
    assert result.timed_out and result.exit_code != 0
    assert result.duration_s < 10
    jobs = [p for p in psutil.process_iter(["cmdline"]) if token in " ".join(p.info["cmdline"] or [])]
    assert jobs == []
    if runtime == "runc":
        listed = subprocess.run(["runc", "list", "-q"], capture_output=True, text=True)
        assert "permamesh-" not in listed.stdout


def test_too_much_output_is_cut_and_flagged(busybox_rootfs, runtime):
    limits = Limits(timeout_s=10.0, max_output_bytes=1000)
    result = run(busybox_rootfs, ["head", "-c", "200000", "/dev/zero"], limits=limits,
                 runtime=runtime)
    assert result.exit_code == 0 and result.truncated
    assert result.stdout == b"\0" * 1000


def test_limits_the_host_cannot_enforce_are_said_to_be_not_enforced(busybox_rootfs, runtime):
    result = run(busybox_rootfs, ["true"], limits=FAST, runtime=runtime)
    if result.limits_enforced:
        assert runtime == "runc" and probe_host().limits_enforced
    else:
        assert any("not enforced" in note for note in result.notes), result.notes


def test_memory_limit_kills_a_greedy_job_when_enforced(busybox_rootfs):
    """Runs only where the probe saw runc apply cgroup limits (skipped elsewhere)."""
    if not probe_host().limits_enforced:
        pytest.skip(f"cgroup limits not enforced here: {probe_host().why}")
    greedy = 'x=$(head -c 40000000 /dev/zero | tr "\\0" a); echo ${#x}'
    result = run(busybox_rootfs, ["sh", "-c", greedy], runtime="runc",
                 limits=Limits(memory_mb=16, timeout_s=10.0))
    assert result.exit_code != 0 and result.stdout == b""


def test_probe_reports_what_is_installed():
    host = probe_host()
    assert host.cgroup in ("v2", "v1", "hybrid", "none") and host.why
    assert host.limits_enforced is False or host.runc is not None


@pytest.mark.parametrize("argv, env, workdir, match", [
    ([], (), "/", "non-empty"),
    ("echo hi", (), "/", "non-empty list"),
    (["echo", "a\0b"], (), "/", "NUL"),
    (["echo"], ["NOEQUALS"], "/", "KEY=VALUE"),
    (["echo"], ["=v"], "/", "KEY=VALUE"),
    (["echo"], "A=b", "/", "KEY=VALUE"),
    (["echo"], (), "tmp", "absolute"),
    (["echo"], (), "/nowhere", "lacks directories"),
])
def test_bad_input_is_refused_clearly(busybox_rootfs, argv, env, workdir, match):
    with pytest.raises(RunError, match=match):
        run(busybox_rootfs, argv, env=env, workdir=workdir)


def test_a_missing_executable_is_the_jobs_failure(busybox_rootfs, runtime):
    result = run(busybox_rootfs, ["no-such-program"], limits=FAST, runtime=runtime)
    assert result.exit_code != 0 and b"no-such-program" in result.stderr


def test_missing_rootfs_is_refused(tmp_path):
    with pytest.raises(RunError, match="not a directory"):
        run(tmp_path / "nope", ["echo"])


def test_a_job_can_run_as_an_unprivileged_user(busybox_rootfs, runtime):
    nobody = Limits(timeout_s=10.0, uid=65534, gid=65534)
    result = run(busybox_rootfs, ["sh", "-c", "id -u; id -g; touch /tmp/mine && echo wrote"], limits=nobody,
                 runtime=runtime)
    assert (result.exit_code, result.stdout) == (0, b"65534\n65534\nwrote\n"), result.stderr
    root = run(busybox_rootfs, ["id", "-u"], limits=Limits(timeout_s=10.0), runtime=runtime)
    assert root.stdout == b"0\n"
    with pytest.raises(ValueError, match="uid and gid"):
        Limits(uid=-1)


def test_output_reaches_on_output_as_it_is_written_and_joins_to_the_result(busybox_rootfs, runtime):
    """The job writes, sleeps, writes again: the first line arrives while it still runs (the
    second comes a sleep later, not with it), and the pieces, in order, are exactly the result's
    stdout and stderr."""
    pieces: list[tuple[float, bytes, bytes]] = []
    result = run(busybox_rootfs, ["sh", "-c", "echo one; echo oops >&2; sleep 1; echo two"], limits=FAST,
                 runtime=runtime, on_output=lambda out, err: pieces.append((time.monotonic(), out, err)))
    assert result.exit_code == 0 and result.stdout == b"one\ntwo\n" and result.stderr == b"oops\n"
    assert b"".join(p[1] for p in pieces) == result.stdout and b"".join(p[2] for p in pieces) == result.stderr
    first = next(p for p in pieces if p[1])
    last = next(p for p in reversed(pieces) if p[1])
    assert first[1] == b"one\n" and last[1] == b"two\n"
    assert last[0] - first[0] > 0.5  # "one" came as it was written, a second before "two"


def test_streamed_output_is_cut_at_the_same_cap_as_the_result(busybox_rootfs, runtime):
    pieces: list[bytes] = []
    limits = Limits(timeout_s=10.0, max_output_bytes=1000)
    result = run(busybox_rootfs, ["sh", "-c", "head -c 5000 /dev/zero"], limits=limits, runtime=runtime,
                 on_output=lambda out, err: pieces.append(out))
    assert result.truncated and b"".join(pieces) == result.stdout and len(result.stdout) == 1000

"""One mesh across simulated hosts: 7 network namespaces, each its own address and data
directory (root needed; skipped, saying why, where namespaces cannot be made).

A 4-validator CometBFT committee on hosts 0-3, 2 workers and 12 relays spread over hosts 0-5,
started with nothing but ``--join https://VALIDATOR:PORT?key=HEX`` (the second worker once the
rest of the mesh runs), and a client on host 6 that knows only that address. A capture of the
bridge runs the whole time.
"""

from __future__ import annotations

import pytest

from permamesh.demo.hosts import MARKER, RELAY_KILL_JOBS, HostsPlan, run_hosts
from permamesh.ops.capture import Capture, CaptureConfig
from permamesh.ops.netns import unavailable

JOBS = 10


@pytest.fixture(scope="module")
def across(tmp_path_factory):
    reason = unavailable()
    if reason:
        pytest.skip(f"network namespaces unavailable: {reason}")
    base = tmp_path_factory.mktemp("hosts")
    captures = []

    def capture(hosts):
        captures.append(Capture(hosts, base / "capture", config=CaptureConfig(max_bytes=256 << 20, max_s=600.0)))
        return captures[-1]

    report = run_hosts(HostsPlan(hosts=7, jobs=JOBS), base / "mesh", say=lambda *_: None, on_hosts=capture)
    return report, captures[0]


def test_nodes_on_separate_hosts_join_and_serve_through_the_directory(across):
    report, _ = across
    assert len(set(report["addresses"])) == 7
    assert len(report["cold_start_join_s"]) == 1 and len(report["join_s"]) == 1  # `permamesh bench hosts`
    assert max(report["join_s"]) < 30  # reports the figures; a worker started into the running mesh joined
    events = report["join_timeline"]["events_s"]  # and its phases come in the order a join takes them
    assert events["directory"] < events["model"] < events["announced"] < events["counted_running"] \
        <= events["client_copy"] <= events["first_job"]
    assert report["overlay_delivered"] == JOBS  # client host -> relays on other hosts -> a worker host


def test_a_killed_worker_host_loses_no_job_and_leaves_the_running_set(across):
    report, _ = across
    assert report["kill_jobs_answered"] >= 1  # every job answered (a lost one would have raised)
    assert report["kill_jobs_to_dead_after_5s"] == 0
    assert report["kill_detect_s"] is not None and report["kill_detect_s"] <= 15.0


def test_overlay_jobs_arrive_with_a_relay_host_killed(across):
    report, _ = across
    assert report["relay_kill_relays"] >= 1 and report["relay_kill_delivered"] == RELAY_KILL_JOBS


def test_no_prompt_and_no_committee_call_crosses_the_bridge_in_clear(across):
    _, capture = across
    assert capture.complete, "the capture missed frames: an absence would prove nothing"
    assert capture.contains(b"CURVE")  # control: the links' ZMTP greetings name their mechanism in clear
    assert not capture.contains(MARKER.encode())  # the direct job's prompt went over CurveZMQ only
    assert not capture.contains(b"/directory")  # the committee's JSON-RPC went over TLS only

"""A joining worker's timeline, read back from the log lines its processes write.

The story: a worker starts at 12:00:00.000 (wall clock; 100.0 on the measuring client's
monotonic clock), reads the directory, loads its model, serves, announces; a group member
seals the salt to it; three members probe it at once as a newcomer (one prober's log names
another node); the client then sees it counted, in its copy, and gets its first job. The phases
come out in order and add up to the span from the start to the first job.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

import pytest

from permamesh.demo.jointime import PHASES, join_timeline, log_times

START = datetime.datetime(2026, 12, 6, 12, 0, 0)
NID = "af74131cbbbb357f"


def line(at_s: float, text: str) -> str:
    stamp = (START + datetime.timedelta(seconds=at_s)).strftime("%Y-%m-%d %H:%M:%S,%f")[:23]
    return f"{stamp} INFO permamesh.x: {text}\n"


@dataclass
class Child:
    log_path: Path


@pytest.fixture
def logs(tmp_path):
    (tmp_path / "worker-1.log").write_text(
        line(2.0, "directory read at height 111 from https://10.0.0.1:1 (checked by https://10.0.0.2:1): 18 nodes, "
                  "17 running, in 0.25 s")
        + line(9.0, "model tiny-random ready on cpu in 5.5 s")
        + line(9.1, f"worker {NID} serving tiny-random on tcp://10.0.0.5:7001?key=00")
        + line(9.4, f"announced {NID} at tcp://10.0.0.5:7001 (height 138)"))
    (tmp_path / "worker-0.log").write_text(
        line(1.0, "sealed the salt of group 'tiny-random' to someone-else (height 90)")
        + line(10.1, f"sealed the salt of group 'tiny-random' to {NID} (height 141)"))
    for i, at_s in enumerate((10.6, 10.5, 10.7)):
        (tmp_path / f"prober-{i}.log").write_text(
            line(3.0, "period 9: probed at once for 1 newcomer(s) (c6c409104dd908ae): 13 of 13 nodes up")
            + line(at_s, f"period 14: probed at once for 1 newcomer(s) ({NID}): 14 of 14 nodes up"))
    (tmp_path / "prober-3.log").write_text("not a log line\n")
    return tmp_path


def test_the_phases_of_a_join_come_in_order_and_add_up_to_its_span(logs):
    node = {"node_id": NID, "child": Child(logs / "worker-1.log"), "spawned_wall": START.timestamp(),
            "spawned_at": 100.0, "ready_at": 110.2}
    timeline = join_timeline(node, {"counted": 110.8, "copy": 110.9, "served": 111.0}, logs)
    events = timeline["events_s"]
    assert events == {"directory_start": 1.75, "directory": 2.0, "model_start": 3.5, "model": 9.0, "serving": 9.1,
                      "announced": 9.4, "salt_sealed": 10.1, "ready": 10.2, "probe_first": 10.5,
                      "probe_last": 10.7, "counted_running": 10.8, "client_copy": 10.9, "first_job": 11.0}
    assert list(events.values()) == sorted(events.values())
    phases = timeline["phases_s"]
    assert list(phases) == [name for name, _, _ in PHASES]
    assert phases["model_load_excluded"] == 5.5 and phases["directory_read"] == 0.25
    assert sum(phases.values()) == pytest.approx(events["first_job"])


def test_a_log_that_is_missing_or_says_nothing_gives_no_events(tmp_path):
    assert log_times(tmp_path / "absent.log", {"x": "anything"}) == {}
    (tmp_path / "garbled.log").write_text("announced somewhere without a timestamp\n")
    assert log_times(tmp_path / "garbled.log", {"announced": "announced"}) == {}

"""Shared fixtures: every test runs under a leak check (zmq sockets and child processes),
with its own data directory, and tiny-random models are built once per session."""

from __future__ import annotations

import os

import psutil
import pytest

from permamesh.transport import open_sockets


@pytest.fixture(autouse=True)
def no_leaks():
    """Fail a test that leaves a zmq socket open or a child process running (then clean up)."""
    me = psutil.Process()
    children_before = {p.pid for p in me.children(recursive=True)}
    sockets_before = {id(s) for s in open_sockets()}
    yield
    leaked_sockets = [s for s in open_sockets() if id(s) not in sockets_before]
    for sock in leaked_sockets:
        sock.close(0)
    new_children = [p for p in me.children(recursive=True) if p.pid not in children_before]
    _, alive = psutil.wait_procs(new_children, timeout=10)
    for proc in alive:
        proc.kill()
    assert not leaked_sockets, f"test left {len(leaked_sockets)} zmq socket(s) open"
    assert not alive, f"test left child processes running: {[p.pid for p in alive]}"


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh data directory, also exported as PERMAMESH_HOME for child processes."""
    monkeypatch.setenv("PERMAMESH_HOME", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="session")
def model_cache_dir():
    """Where converted real models are cached across tests (and across runs)."""
    from permamesh.directory.workers import default_data_dir

    return default_data_dir()


@pytest.fixture(scope="session")
def tiny_loaded():
    from permamesh.workers import models

    return models.load(models.TINY_RANDOM, device="cpu", seed=0)


@pytest.fixture(scope="session")
def smollm2_loaded(model_cache_dir):
    from permamesh.workers import models

    try:
        models.smollm2_gguf()
    except Exception as exc:  # the Makefile installs it; say clearly when it is missing
        pytest.fail(f"SmolLM2 weights unavailable: {exc}")
    return models.load(models.DEFAULT_MODEL, data_dir=model_cache_dir, device="cpu")


def pytest_configure(config):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def wait_for(cond, timeout_s: float = 15.0, what: str = "condition") -> None:
    """Poll a condition until it holds (state changes arrive over sockets), or fail."""
    import time

    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)

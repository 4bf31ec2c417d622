"""The dashboard rendered by a real browser: Debian's Chromium, headless, loads the gateway's
/dashboard, runs its script against /api/mesh and the test reads the rendered DOM (node count,
roles, reputations, payouts, reputation over epochs) and the screenshot (the map's dots are
drawn in the role colours). Skips when Chromium is not installed (apt-get install chromium)."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest

from ..browser import CHROMIUM, RELAY_RGB, WORKER_RGB, chromium, colour_pixels, render

def get(url):
    return json.loads(urllib.request.urlopen(url, timeout=60).read())


pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")


def test_the_dashboard_shows_the_mesh(stack, tmp_path):
    # a job paid to a worker, then one closed epoch: the worker has a reputation point to plot
    import openai

    with openai.OpenAI(base_url=stack.url + "/v1", api_key=stack.key, max_retries=0) as client:
        client.chat.completions.create(model="tiny-random", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    deadline = time.monotonic() + 90
    while not stack.committee.query("/payouts") and time.monotonic() < deadline:
        stack.committee.query("/status")  # each query is a round trip to the ledger; epochs close by height
    mesh = get(stack.url + "/api/mesh")
    assert mesh["counts"] == {"relay": 12, "validator": 1, "worker": 2} and mesh["committee"] == "ok"
    assert mesh["reputation_history"], "an epoch closed with a paid worker"

    dom = render(tmp_path, stack.url + "/dashboard")
    assert dom.by_id("node-count")["text"] == str(len(mesh["nodes"])) == "15"
    assert {e["attrs"]["data-role"]: e["text"] for e in dom.find("span", "count")} == \
        {"relay": "12", "validator": "1", "worker": "2"}
    rows = dom.find("tr", "node-row")
    assert len(rows) == 15 and len(dom.find("circle", "node")) == 15  # registered nodes have positions
    registered = [n for n in mesh["nodes"] if n["registered"] and n["reputation"] is not None]
    shown = {r["attrs"]["data-node"]: r["text"] for r in rows}
    for node in registered:
        assert f"{node['reputation']:.2f}" in shown[node["id"]]
    assert all(("up" in shown[n["id"]] or "degraded" in shown[n["id"]]) for n in mesh["nodes"] if n["role"] == "worker")
    history = dom.find("tr", None)
    assert any(e["attrs"].get("data-node") in mesh["reputation_history"] for e in history)
    partners = dom.find("div", "partner")
    assert len(partners) == len(mesh["payouts"]) >= 1
    for p, want in zip(partners, mesh["payouts"]):
        assert f"{want['total']:.2f}" in p["text"] and want["why"][0] in p["text"]
    assert "alice" in dom.by_id("usage")["text"]
    left = mesh["usage"]["alice"]["available"]  # the key's credit left on the ledger, shown with its usage
    assert isinstance(left, int) and str(left) in dom.by_id("usage")["text"]
    assert mesh["traffic"]["requests"] >= 1 and "requests/s" in dom.by_id("traffic")["text"]
    workers = [n for n in mesh["nodes"] if n["role"] == "worker"]
    assert all(n["availability"] == 1.0 and n["queue"] is not None for n in workers)  # measured, per worker
    assert all("100.0%" in shown[n["id"]] for n in workers)
    labels = " ".join(e["text"] for e in dom.find("text"))
    assert "epoch" in labels and "reputation" in labels  # the chart's axis labels

    png = tmp_path / "dashboard.png"
    shot = chromium(tmp_path, "--virtual-time-budget=20000", "--window-size=1280,1600", f"--screenshot={png}",
                    stack.url + "/dashboard")
    assert shot.returncode == 0 and png.stat().st_size > 10_000
    count = colour_pixels(png, (1600, 1280))
    assert count(WORKER_RGB) > 50 and count(RELAY_RGB) > 200  # the map's dots (and legend) are drawn

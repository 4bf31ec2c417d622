"""Streaming through the overlay on a real mesh: time to first token and to the whole answer,
through the overlay (chunks over reply blocks, ``docs/paths.md`` section 9) against the same
request sent directly to the entry worker, one client at a time and ``concurrency`` at once.

Each client thread alternates a direct request and an overlay request (the overlay client
keeps its session's paths and prepares them between requests, as the default client does;
it waits for that preparation before each pair so none overlaps a timing). Time to first
token is from the call to the first ``on_text``; both sides stream (the direct client token
by token). Rows give p50 and p99 of each, and the overlay's excess over direct.

:func:`stream_delivery` counts streams that complete with their pieces in order (joined, they
equal the checked answer's text) while some relays are dead, for the delivery rows.

Who calls it: :func:`permamesh.bench.overlayreal.run_real` (``permamesh bench overlay``).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import statistics
import threading
import time
from typing import Callable

from permamesh.client.blocking import Client
from permamesh.overlay.sender import OverlayClient, OverlayConfig

log = logging.getLogger(__name__)

__all__ = ["StreamBenchConfig", "measure_streaming", "stream_delivery"]


@dataclasses.dataclass(frozen=True)
class StreamBenchConfig:
    requests: int = 40  # timed pairs per client thread
    warmup: int = 3  # untimed pairs first (connections, caches)
    concurrency: tuple[int, ...] = (1, 8)  # client threads at once
    max_tokens: int = 32  # per answer
    prompt: str = "Once upon a time, in a lighthouse by the sea, there lived"  # a model continues it at length
    seed: int = 0
    stream_blocks: int = OverlayConfig().stream_blocks  # 0: answers come whole (the old way, for comparison)


def _timed(call: Callable[[Callable[[str], None]], object]) -> tuple[float, float]:
    """(seconds to the first piece of text, seconds to the end) of ``call(on_text)``."""
    t0 = time.monotonic()
    first: list[float] = []
    call(lambda text: first.append(time.monotonic()) if not first else None)
    end = time.monotonic()
    return (first[0] if first else end) - t0, end - t0


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000


def _client_thread(relays, worker_record, endpoint: str, cfg: StreamBenchConfig, seed: int,
                   out: dict[str, list[float]], lock: threading.Lock) -> None:
    config = OverlayConfig(ack_timeout_s=1.0, stream_blocks=cfg.stream_blocks)
    mine: dict[str, list[float]] = {key: [] for key in out}
    try:
        with OverlayClient(relays, [worker_record], config, random.Random(seed)) as overlay, \
                Client([endpoint]) as direct:
            for i in range(cfg.warmup + cfg.requests):
                overlay.wait_prepared()
                d_first, d_total = _timed(lambda f: direct.generate(cfg.prompt, max_tokens=cfg.max_tokens, on_text=f))
                o_first, o_total = _timed(lambda f: overlay.generate(cfg.prompt, max_tokens=cfg.max_tokens, on_text=f))
                if i >= cfg.warmup:
                    for key, value in (("direct_ttft", d_first), ("direct_total", d_total),
                                       ("overlay_ttft", o_first), ("overlay_total", o_total)):
                        mine[key].append(value)
    except Exception as exc:  # noqa: BLE001 - OverlayError or ClientError: a counted outcome
        log.warning("a streaming client stopped: %s", exc)
        mine["failed"] = [1.0]
    with lock:
        for key, values in mine.items():
            out.setdefault(key, []).extend(values)


def measure_streaming(relays, worker_record, endpoint: str, cfg: StreamBenchConfig = StreamBenchConfig(),
                      say: Callable[[str], None] = print) -> list[dict]:
    """One row per concurrency: p50/p99 time to first token and to the whole answer, direct
    and through the overlay, in milliseconds."""
    rows = []
    for concurrency in cfg.concurrency:
        out: dict[str, list[float]] = {"direct_ttft": [], "direct_total": [], "overlay_ttft": [], "overlay_total": []}
        lock = threading.Lock()
        threads = [threading.Thread(target=_client_thread, args=(relays, worker_record, endpoint, cfg,
                                                                 cfg.seed * 1000 + i, out, lock), daemon=True)
                   for i in range(concurrency)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        row: dict = {"concurrency": concurrency, "requests": len(out["overlay_ttft"]),
                     "failed_clients": len(out.get("failed", [])), "max_tokens": cfg.max_tokens,
                     "wall_s": round(time.monotonic() - started, 2)}
        for key in ("direct_ttft", "overlay_ttft", "direct_total", "overlay_total"):
            if out[key]:
                row[f"{key}_ms_p50"] = round(_pct(out[key], 0.5), 1)
                row[f"{key}_ms_p99"] = round(_pct(out[key], 0.99), 1)
        if out["overlay_ttft"]:
            row["ttft_excess_ms_p50"] = round(row["overlay_ttft_ms_p50"] - row["direct_ttft_ms_p50"], 1)
            row["total_ratio_p50"] = round(statistics.median(out["overlay_total"]) / statistics.median(out["direct_total"]), 3)
            say(f"  streaming x{concurrency}: first token p50 {row['overlay_ttft_ms_p50']:.0f} ms through the overlay "
                f"vs {row['direct_ttft_ms_p50']:.0f} ms direct (p99 {row['overlay_ttft_ms_p99']:.0f} / "
                f"{row['direct_ttft_ms_p99']:.0f}); whole answer x{row['total_ratio_p50']:.2f} of direct")
        rows.append(row)
    return rows


def stream_delivery(relays, worker_record, requests: int, ack_timeout_s: float, seed: int = 0,
                    max_tokens: int = 32, stream_blocks: int = OverlayConfig().stream_blocks) -> dict:
    """``requests`` streamed jobs from one client (a session keeps its paths and learns its dead
    relays, as a real client does): how many completed in order, how many pieces each came in,
    how many repair cloves were sent (cloves beyond n)."""
    config = OverlayConfig(ack_timeout_s=ack_timeout_s, answer_grace_s=1.0, answer_timeout_s=60.0,
                           stream_blocks=stream_blocks)
    done = in_order = extra = 0
    pieces_per: list[int] = []
    attempts: list[float] = []  # cloves sent / n, per completed stream
    started = time.monotonic()
    with OverlayClient(relays, [worker_record], config, random.Random(seed)) as client:
        for i in range(requests):
            pieces: list[str] = []
            try:
                result = client.generate(f"stream {i}: tell me about rivers", max_tokens=max_tokens, on_text=pieces.append)
            except Exception as exc:  # noqa: BLE001 - OverlayError: counted, not fatal
                log.info("stream %d failed: %s", i, exc)
                continue
            done += 1
            in_order += "".join(pieces) == result.text
            pieces_per.append(len(pieces))
            if client.last is not None:
                extra += max(0, client.last.cloves_sent - config.n)
                attempts.append(client.last.cloves_sent / config.n)
    return {"streams": requests, "completed": done, "in_order": in_order,
            "pieces_p50": statistics.median(pieces_per) if pieces_per else None, "extra_cloves": extra,
            "mean_attempts": statistics.fmean(attempts) if attempts else None,
            "wall_s": round(time.monotonic() - started, 2)}

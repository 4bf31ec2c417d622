"""The client side of ``permamesh bench engine``: the requests of one concurrency level, sent
at once, and the committee's scoring of their answers.

Who calls it: :mod:`permamesh.bench.engine` (the benchmark's driver).
"""

from __future__ import annotations

import random
import threading
import time

from permamesh.workers import models

WORDS = ("river stone garden lantern market winter orchard signal harbor meadow copper violin "
         "engine forest candle mirror bridge thunder pepper silver canyon ribbon ladder island "
         "falcon pocket marble shadow velvet compass").split()
STORIES = ("a robot who learns to paint", "a lighthouse keeper and a storm", "a city under the sea",
           "a dragon who is afraid of heights", "the last train of the night", "a garden on the moon",
           "a detective who solves crimes by smell", "a clockmaker's strange apprentice")


def prose(rng: random.Random, tokens: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(int(tokens * 0.95)))  # ~1.05 tokens per word


def ask_all(endpoint: str, jobs: list[dict]) -> tuple[list, float]:
    """Send every job at once (a thread and a client each); (results, wall seconds)."""
    from permamesh.client.blocking import Client

    results: list = [None] * len(jobs)
    ends: list[float] = [0.0] * len(jobs)
    go = threading.Barrier(len(jobs) + 1)

    def ask(i: int) -> None:
        with Client([endpoint], timeout_s=600.0) as client:
            go.wait()
            results[i] = client.generate(**jobs[i])
            ends[i] = time.monotonic()

    threads = [threading.Thread(target=ask, args=(i,), daemon=True) for i in range(len(jobs))]
    for t in threads:
        t.start()
    go.wait()
    t0 = time.monotonic()
    for t in threads:
        t.join()
    if any(r is None for r in results):
        raise RuntimeError("a benchmark request got no answer")
    return [(r, end - t0) for r, end in zip(results, ends)], max(ends) - t0


def run_level(endpoint: str, c: int, bench, rng: random.Random, scored: list) -> dict:
    """The three phases at concurrency ``c``; the decode answers go to ``scored``."""
    prefill_jobs = [dict(prompt=prose(rng, bench.prompt_tokens), max_tokens=1) for _ in range(c)]
    answers, wall = ask_all(endpoint, prefill_jobs)
    uncached = sum(r.prompt_tokens - r.cached_tokens for r, _ in answers)
    row = {"concurrency": c, "prefill_tok_per_s": round(uncached / wall, 1), "prefill_wall_s": round(wall, 3),
           "prompt_tokens_mean": round(uncached / c, 1)}

    topics = rng.sample(STORIES * 2, c)
    sampling = dict(temperature=bench.temperature, top_p=bench.top_p) if bench.temperature > 0 else {}
    decode_jobs = [dict(messages=[{"role": "user", "content": f"Write a long story about {t}. Number {rng.random():.6f}."}],
                        max_tokens=bench.max_tokens, logprobs=True, **sampling,
                        **({"seed": rng.getrandbits(32)} if sampling else {})) for t in topics]
    answers, wall = ask_all(endpoint, decode_jobs)
    scored.extend((c, job, result) for job, (result, _) in zip(decode_jobs, answers))
    tokens = sum(r.completion_tokens for r, _ in answers)
    firsts = [end - (r.total_s - r.ttft_s) for r, end in answers]
    span = max(end for _, end in answers) - min(firsts)
    row.update(total_tok_per_s=round(tokens / wall, 1), answer_tokens=tokens, decode_wall_s=round(wall, 3),
               decode_tok_per_s=round(sum(r.completion_tokens - 1 for r, _ in answers) / span, 1) if span > 0 else None,
               per_request_tok_per_s=round(sum((r.completion_tokens - 1) / max(r.total_s - r.ttft_s, 1e-9)
                                               for r, _ in answers) / c, 1),
               ttft_mean_s=round(sum(r.ttft_s for r, _ in answers) / c, 3))

    system = prose(rng, bench.prompt_tokens)
    chat = lambda q: dict(messages=[{"role": "system", "content": system}, {"role": "user", "content": q}],  # noqa: E731
                          max_tokens=4)
    (cold, _), = ask_all(endpoint, [chat("Summarise that in one line.")])[0]
    answers, _ = ask_all(endpoint, [chat(f"Question {i}: which word comes first?") for i in range(c)])
    row["prefix_cache"] = {
        "cold_ttft_s": round(cold.ttft_s, 3),
        "warm_ttft_mean_s": round(sum(r.ttft_s for r, _ in answers) / c, 3),
        "prompt_tokens": sum(r.prompt_tokens for r, _ in answers),
        "cached_tokens": sum(r.cached_tokens for r, _ in answers),
    }
    return row


def score_answers(scored: list, bench, engine: str = "torch") -> dict:
    """Each decode answer scored as the committee would (fp32 torch reference, the credit config
    of the worker's ``engine``): per concurrency, the credits and the mean |reported - reference| log-prob gaps.
    An honest worker's credits must stay far above the abnormal threshold (0.4)."""
    from permamesh.verify.verifier import Verifier
    from permamesh.wire import ChatMessage, GenerateRequest

    verifier = Verifier(models.load(bench.model, bench.model_path, bench.data_dir, "cpu"))
    by_c: dict[int, list] = {}
    for c, job, result in scored:
        request = GenerateRequest(request_id=result.request_id, messages=[ChatMessage(**m) for m in job["messages"]],
                                  max_tokens=job["max_tokens"], logprobs=True, temperature=job.get("temperature", 0.0),
                                  top_p=job.get("top_p", 1.0), seed=job.get("seed"))
        by_c.setdefault(c, []).append(verifier.score(request, result, engine=engine))
    return {c: {"answers": len(credits), "credit_min": round(min(x.credit for x in credits), 3),
                "credit_mean": round(sum(x.credit for x in credits) / len(credits), 3),
                "logprob_gap_mean_nats": round(sum(x.mean_abs_diff for x in credits) / len(credits), 4),
                "logprob_gap_max_nats": round(max(x.mean_abs_diff for x in credits), 4),
                "reasons": sorted({x.reason for x in credits if x.reason})}
            for c, credits in by_c.items()}

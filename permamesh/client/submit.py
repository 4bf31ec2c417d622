"""``permamesh submit``: one prompt to a running mesh, the answer on stdout.

Through the anonymous overlay when the committee's directory (``--join``, ``$PERMAMESH_JOIN``
or ``DATA_DIR/join``) lists enough running relays (the answer streams back in chunks over the reply paths), else (or with
``--direct`` / ``--worker``) straight to a worker with :class:`permamesh.Client`, streamed as
it is produced.

Who calls it: :mod:`permamesh.cli`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path


def run_submit(args: argparse.Namespace, data_dir: Path) -> int:
    from permamesh.client.blocking import Client

    messages = [] if args.raw else ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": args.prompt}]
    params = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                  stop=tuple(args.stop or ()), logprobs=args.logprobs)
    if not args.direct and not args.worker:
        overlay = _submit_overlay(args, data_dir, messages, params)
        if overlay is not None:
            return overlay
    with Client(args.worker, data_dir=data_dir, timeout_s=args.timeout, join=getattr(args, "join", None)) as client:
        if args.json:
            result = client.generate(args.prompt if args.raw else None, messages=messages, **params)
            print(json.dumps(result.to_fields(), indent=2))
            return 0
        result = client.generate(args.prompt if args.raw else None, messages=messages,
                                 on_text=lambda t: (sys.stdout.write(t), sys.stdout.flush()), **params)
        print()
        if args.logprobs:
            print("logprobs:", " ".join(f"{lp:.3f}" for lp in result.logprobs))
        print(f"[worker {result.worker_id}] {result.completion_tokens} tokens, ttft {result.ttft_s * 1000:.0f} ms, "
              f"total {result.total_s:.2f} s, queued {result.queue_wait_s:.2f} s", file=sys.stderr)
    return 0


def _submit_overlay(args: argparse.Namespace, data_dir: Path, messages: list, params: dict) -> int | None:
    """Send through the overlay; None when the directory has too few relays for it."""
    from permamesh.directory.committee import CommitteeDirectory
    from permamesh.directory.join import resolve_join
    from permamesh.overlay.sender import OverlayClient, OverlayConfig

    join = resolve_join(getattr(args, "join", None), data_dir, required="permamesh submit")
    directory = CommitteeDirectory(join, data_dir / "directory" / "client.json")
    relays, workers = directory.relays(), directory.workers()
    config = OverlayConfig()
    if len(relays) < config.n * config.hops:
        print(f"only {len(relays)} relays running in the committee's directory (the overlay needs "
              f"{config.n * config.hops}); sending directly", file=sys.stderr)
        return None
    stream = None if args.json else (lambda t: (sys.stdout.write(t), sys.stdout.flush()))
    with OverlayClient(relays, workers, dataclasses.replace(config, answer_timeout_s=args.timeout)) as client:
        result = client.generate(args.prompt if args.raw else None, messages=messages, on_text=stream, **params)
        d = client.last
    if args.json:
        print(json.dumps(result.to_fields(), indent=2))
        return 0
    print()  # the text was streamed as the chunks arrived
    if args.logprobs:
        print("logprobs:", " ".join(f"{lp:.3f}" for lp in result.logprobs))
    print(f"[worker {result.worker_id}] via the overlay: {d.cloves_sent} cloves, {d.paths_failed} paths failed, "
          f"end-to-end {d.elapsed_s:.2f} s (worker {result.total_s:.2f} s)", file=sys.stderr)
    return 0

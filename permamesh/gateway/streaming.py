"""Streamed answers: every choice's job at once, its text as server-sent events as it comes.

:func:`stream` runs the ``n`` jobs of a streamed request on the gateway's pool and writes
their texts as they come, each delta with its choice's ``index``, then each choice's end
(``finish_reason``), the usage when asked, and ``[DONE]``. A choice that asks for
log-probabilities gets them chunk by chunk, with the text of the tokens they belong to
(:mod:`~permamesh.gateway.deltas`); one that may call tools is sent when its job is done
(each call as one whole ``tool_calls`` delta, or its text). An error after the headers goes in the
stream, as OpenAI does. A client that goes away mid-answer is logged at INFO; its jobs still
end in their threads and are settled (counted and paid), since the workers did the work.
:func:`chat_chunks` and :func:`completion_chunks` shape the events of each endpoint.

Who calls it: :class:`permamesh.gateway.server.Gateway` (``gw``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from aiohttp import web

from permamesh.gateway import openai_api as oa
from permamesh.gateway import responses as rs
from permamesh.gateway.deltas import ChoiceDeltas, Delta
from permamesh.gateway.errors import ApiError

log = logging.getLogger(__name__)


async def stream(gw, request, caller, reserved, parsed, rid, created, chunks) -> web.StreamResponse:
    """Every choice's job at once; each chunk as it comes, its text and (asked for) its tokens'
    log-probabilities (:class:`~permamesh.gateway.deltas.ChoiceDeltas`); each choice's rest
    and end when its job ends. A choice that may call tools is sent when its job is done."""
    loop, started = asyncio.get_running_loop(), time.monotonic()
    events: asyncio.Queue = asyncio.Queue()
    top = parsed.fields.get("top_logprobs", 0)
    choices = [ChoiceDeltas(parsed.fields.get("logprobs", False), top) for _ in range(parsed.n)]
    jobs = []
    for i in range(parsed.n):
        on_chunk = None if parsed.functions else (
            lambda c, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, c)))
        job = loop.run_in_executor(gw.pool, gw.backend.generate, parsed.model, oa.choice_fields(parsed, i),
                                   on_chunk)
        job.add_done_callback(lambda _, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, None)))
        jobs.append(job)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})

    async def send(obj) -> None:
        await response.write(f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode())

    async def send_delta(i: int, delta: Delta) -> None:
        if delta.entries is None:  # no log-probabilities: word-sized deltas
            for piece in rs.pieces(delta.text):
                await send(last(i, piece, None, None))
        else:
            await send(last(i, delta.text, None, None, delta.entries))

    first, last = chunks(rid, created, parsed.model, len(parsed.echo), top > 0)
    settled, results, failed, open_jobs = set(), {}, False, parsed.n
    try:
        await response.prepare(request)
        for i in range(parsed.n):
            if first is not None:
                await send(first(i))
            if parsed.echo:
                await send(last(i, parsed.echo, None, None))
        while open_jobs:
            i, chunk = await events.get()
            if chunk is not None:
                delta = choices[i].chunk(chunk)
                if delta is not None:
                    if started:
                        gw.ttft.observe(time.monotonic() - started)
                        started = 0.0
                    await send_delta(i, delta)
                continue
            open_jobs -= 1
            try:
                result = jobs[i].result()
            except ApiError as exc:  # after the headers: the error goes in the stream, as OpenAI does
                failed = True
                await send(exc.body())
                continue
            except Exception as exc:  # noqa: BLE001
                log.exception("a streamed job failed")
                failed = True
                await send(ApiError(500, f"internal error: {type(exc).__name__}").body())
                continue
            settled.add(i)
            results[i] = result
            await gw._run(gw._settle, caller, reserved[i], result)
            finish = result.finish_reason
            message, finish = rs.chat_message(result, parsed.functions) if parsed.functions else ({}, finish)
            if message.get("tool_calls"):
                calls = [{"index": k, **call} for k, call in enumerate(message["tool_calls"])]
                for call in calls:  # each call whole, once its JSON is complete
                    await send(last(i, "", None, None, None, {"tool_calls": [call]}))
            else:
                for delta in choices[i].rest(result):
                    await send_delta(i, delta)
            await send(last(i, "", finish, None))
        if parsed.include_usage and results and not failed:
            await send(last(0, "", None, rs.usage([results[i] for i in sorted(results)])))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except (ConnectionError, asyncio.CancelledError) as exc:  # the client went away
        log.info("client of %s disconnected mid-stream", rid)
        for i, job in enumerate(jobs):
            if i not in settled:
                job.add_done_callback(lambda done, i=i: _settle_abandoned(gw, done, caller, reserved[i], rid))
        if isinstance(exc, asyncio.CancelledError):
            raise
    return response


def _settle_abandoned(gw, job: asyncio.Future, caller, reserved: int, rid: str) -> None:
    """A streamed job whose client left: once it ends, settle it like any other (the worker
    did the work); a job that failed has nothing to settle. Event-loop thread."""
    if job.cancelled() or job.exception() is not None:
        log.info("abandoned job %s ended without a result: %r", rid, None if job.cancelled() else job.exception())
        return
    result = job.result()
    try:
        gw.pool.submit(gw._settle, caller, reserved, result)
    except RuntimeError:  # the pool is shut down: the gateway is stopping
        log.info("abandoned job %s not settled: the gateway is stopping", rid)


def chat_chunks(rid, created, model, echo_chars: int = 0, top: bool = False):
    def chunk(index, text, finish, use, entries=None, delta=None):
        logprobs = rs.chat_entries(entries) if entries is not None else None
        delta = delta or ({"content": text} if text else {})
        return rs.chat_chunk(rid, created, model, delta, finish, use, index, logprobs)

    return (lambda index: rs.chat_chunk(rid, created, model, {"role": "assistant", "content": ""}, index=index),
            chunk)


def completion_chunks(rid, created, model, echo_chars: int = 0, top: bool = False):
    def chunk(index, text, finish, use, entries=None, delta=None):
        logprobs = rs.completion_entries(entries, top, echo_chars) if entries is not None else None
        return rs.completion_chunk(rid, created, model, text, finish, use, index, logprobs)

    return None, chunk

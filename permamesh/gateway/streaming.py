"""Streamed answers: every choice's job at once, its text as server-sent events as it comes.

:func:`stream` runs the ``n`` jobs of a streamed request on the gateway's pool and writes
their texts in word-sized deltas, each with its choice's ``index``, then each choice's end
(``finish_reason``), the usage when asked, and ``[DONE]``. A choice that asks for
log-probabilities or may call tools is sent when its job is done (its tokens with their
log-probabilities, or one ``tool_calls`` delta). An error after the headers goes in the
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
from permamesh.gateway.errors import ApiError

log = logging.getLogger(__name__)


async def stream(gw, request, caller, reserved, parsed, rid, created, chunks) -> web.StreamResponse:
    """Every choice's job at once; texts as they come (``(index, text)``), each choice's
    end when its job ends. With log-probabilities, a choice's text is sent with them once
    its job is done (:func:`~permamesh.gateway.responses.token_spans`)."""
    loop, started = asyncio.get_running_loop(), time.monotonic()
    events: asyncio.Queue = asyncio.Queue()
    with_logprobs = parsed.fields.get("logprobs", False)
    whole = with_logprobs or bool(parsed.functions)  # sent once the answer is done
    jobs = []
    for i in range(parsed.n):
        on_text = None if whole else (
            lambda t, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, t)))
        job = loop.run_in_executor(gw.pool, gw.backend.generate, parsed.model, oa.choice_fields(parsed, i),
                                   on_text)
        job.add_done_callback(lambda _, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, None)))
        jobs.append(job)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})

    async def send(obj) -> None:
        await response.write(f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode())

    first, last = chunks(rid, created, parsed.model)
    settled, results, failed, open_jobs = set(), {}, False, parsed.n
    try:
        await response.prepare(request)
        for i in range(parsed.n):
            if first is not None:
                await send(first(i))
            if parsed.echo:
                await send(last(i, parsed.echo, None, None))
        while open_jobs:
            i, text = await events.get()
            if text is not None:
                if not results and started:
                    gw.ttft.observe(time.monotonic() - started)
                    started = 0.0
                for piece in rs.pieces(text):
                    await send(last(i, piece, None, None))
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
                await send(last(i, "", None, None, None, {"tool_calls": calls}))
            elif with_logprobs:
                for start, stop, text in rs.token_spans(result):
                    await send(last(i, text, None, None, (result, start, stop, len(parsed.echo))))
            elif whole:
                await send(last(i, result.text, None, None))
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


def chat_chunks(rid, created, model):
    def chunk(index, text, finish, use, lp=None, delta=None):
        logprobs = rs.chat_logprobs(lp[0], lp[1], lp[2]) if lp else None
        delta = delta or ({"content": text} if text else {})
        return rs.chat_chunk(rid, created, model, delta, finish, use, index, logprobs)

    return (lambda index: rs.chat_chunk(rid, created, model, {"role": "assistant", "content": ""}, index=index),
            chunk)


def completion_chunks(rid, created, model):
    def chunk(index, text, finish, use, lp=None, delta=None):
        logprobs = None
        if lp:
            result, start, stop, offset = lp
            offset += len("".join(result.tokens[:start]))
            logprobs = rs.completion_logprobs(result, start, stop, offset)
        return rs.completion_chunk(rid, created, model, text, finish, use, index, logprobs)

    return None, chunk

"""The OpenAI HTTP API's answers: completions, stream chunks, log-probabilities and usage.

Pure. Each ``*_response`` shapes the :class:`GenerateResult` of every choice of a request the
way OpenAI clients parse it (ids, ``created``, ``choices`` with their ``index``,
``finish_reason`` and ``logprobs``, summed ``usage`` with the cached prompt tokens); each
``*_chunk`` is one server-sent event of a stream.

Log-probabilities are the model's own (before penalties, temperature and top-p), as the
worker reports them: chat's ``{"content": [{token, logprob, bytes, top_logprobs}]}`` and the
completions API's ``{tokens, token_logprobs, top_logprobs, text_offset}``. In a stream each
chunk carries its own tokens' entries as it comes (:mod:`~permamesh.gateway.deltas`,
:func:`chat_entries`, :func:`completion_entries`). A
stream with tools is sent when its answer is done: each call goes as one ``tool_calls``
delta.

Who calls it: :mod:`permamesh.gateway.server`.
"""

from __future__ import annotations

import re
import uuid
from typing import Any, Sequence

from permamesh.gateway.deltas import Entry
from permamesh.wire import GenerateResult


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _many(results: GenerateResult | Sequence[GenerateResult]) -> list[GenerateResult]:
    return [results] if isinstance(results, GenerateResult) else list(results)


def usage(results: GenerateResult | Sequence[GenerateResult]) -> dict[str, Any]:
    """Token counts of every choice together (the prompt counted per choice: each was a job)."""
    results = _many(results)
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(r.cached_tokens for r in results)}}


def _entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def chat_logprobs(result: GenerateResult, start: int = 0, stop: int | None = None) -> dict[str, Any] | None:
    """Chat's ``logprobs`` of tokens ``start:stop`` (None when none were asked for)."""
    if not result.tokens:
        return None
    stop = len(result.tokens) if stop is None else stop
    content = []
    for i in range(start, stop):
        entry = _entry(result.tokens[i], result.logprobs[i])
        top = result.top_logprobs[i] if i < len(result.top_logprobs) else None
        entry["top_logprobs"] = [_entry(t, lp) for t, lp in zip(top.tokens, top.logprobs)] if top else []
        content.append(entry)
    return {"content": content, "refusal": None}


def completion_logprobs(result: GenerateResult, start: int = 0, stop: int | None = None,
                        offset: int = 0) -> dict[str, Any] | None:
    """The completions API's ``logprobs`` of tokens ``start:stop``; ``offset``: where the
    first token's text starts in the choice's text."""
    if not result.tokens:
        return None
    stop = len(result.tokens) if stop is None else stop
    tokens = list(result.tokens[start:stop])
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    tops = None
    if result.top_logprobs:
        tops = [dict(zip(top.tokens, top.logprobs)) for top in result.top_logprobs[start:stop]]
    return {"tokens": tokens, "token_logprobs": list(result.logprobs[start:stop]), "top_logprobs": tops,
            "text_offset": offsets}


def chat_entries(entries: Sequence[Entry]) -> dict[str, Any]:
    """Chat's ``logprobs`` of one stream delta's tokens (:class:`~permamesh.gateway.deltas.Entry`)."""
    return {"content": [{**_entry(e.token, e.logprob), "top_logprobs": [_entry(t, lp) for t, lp in e.top]}
                        for e in entries], "refusal": None}


def completion_entries(entries: Sequence[Entry], top: bool, offset: int = 0) -> dict[str, Any]:
    """The completions API's ``logprobs`` of one stream delta's tokens; ``offset``: characters
    before the choice's first token (an echoed prompt)."""
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [dict(e.top) for e in entries] if top else None,
            "text_offset": [offset + e.offset for e in entries]}


def chat_message(result: GenerateResult, functions: Sequence[str] = ()) -> tuple[dict[str, Any], str]:
    """The assistant message of one choice and its finish reason: a complete call of one of
    ``functions`` becomes ``tool_calls`` (:func:`permamesh.gateway.tools.tool_calls`)."""
    from permamesh.gateway.tools import tool_calls

    calls = tool_calls(result.text, functions) if functions else None
    if calls:
        return {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
    return {"role": "assistant", "content": result.text}, result.finish_reason


def chat_response(results, model: str, rid: str, created: int, functions: Sequence[str] = ()) -> dict[str, Any]:
    results = _many(results)
    choices = []
    for i, r in enumerate(results):
        message, finish = chat_message(r, functions)
        choices.append({"index": i, "message": message, "logprobs": chat_logprobs(r), "finish_reason": finish})
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "system_fingerprint": f"permamesh-{results[0].worker_id[:8]}", "choices": choices,
            "usage": usage(results)}


def completion_response(results, model: str, rid: str, created: int, echo: str = "") -> dict[str, Any]:
    results = _many(results)
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "system_fingerprint": f"permamesh-{results[0].worker_id[:8]}",
            "choices": [{"index": i, "text": echo + r.text, "logprobs": completion_logprobs(r, offset=len(echo)),
                         "finish_reason": r.finish_reason} for i, r in enumerate(results)],
            "usage": usage(results)}


def chat_chunk(rid: str, created: int, model: str, delta: dict, finish: str | None = None,
               use: dict | None = None, index: int = 0, logprobs: dict | None = None) -> dict[str, Any]:
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
    if use is not None:
        chunk["choices"], chunk["usage"] = [], use
    return chunk


def completion_chunk(rid: str, created: int, model: str, text: str, finish: str | None = None,
                     use: dict | None = None, index: int = 0, logprobs: dict | None = None) -> dict[str, Any]:
    chunk = {"id": rid, "object": "text_completion", "created": created, "model": model,
             "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]}
    if use is not None:
        chunk["choices"], chunk["usage"] = [], use
    return chunk


_PIECE = re.compile(r"\s*\S+\s*|\s+")


def pieces(text: str) -> list[str]:
    """``text`` in word-sized deltas that join back to it exactly (answers that came whole)."""
    return _PIECE.findall(text)

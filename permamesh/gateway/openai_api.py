"""The OpenAI HTTP API's shapes: request bodies in, completions, chunks and errors out.

Pure (but for :func:`post_chat`, the client side used by the demo and the benchmark): :func:`parse_chat` and :func:`parse_completion` check a request body field
by field (the types, ranges and names the OpenAI API documents) and return the
:class:`GenerateRequest` fields, or raise :class:`ApiError` naming the bad parameter; the
``*_response`` and ``*_chunk`` functions shape a :class:`GenerateResult` the way OpenAI
clients parse it (ids, ``created``, ``choices``, ``finish_reason``, ``usage``).

Parameters we cannot honour are refused rather than ignored (``n`` > 1, ``tools``,
``response_format`` other than text), so a client never gets a silently different answer;
others that do not change the answer's form (``user``, ``metadata``, penalties) are accepted.

Who calls it: :mod:`permamesh.gateway.server`.
"""

from __future__ import annotations

import math
import re
import uuid
from dataclasses import dataclass
from typing import Any

from permamesh.gateway.errors import ApiError
from permamesh.wire import ChatMessage, GenerateRequest, GenerateResult, WireError
from permamesh.wire.messages import MAX_NEW_TOKENS, MAX_STOP_STRINGS, MIN_TEMPERATURE, ROLES

DEFAULT_MAX_TOKENS = 128
UNSUPPORTED = ("tools", "functions", "tool_choice", "function_call", "response_format", "logit_bias", "audio",
               "prediction")


@dataclass(frozen=True)
class Parsed:
    model: str
    fields: dict[str, Any]  # GenerateRequest keyword arguments (no request_id)
    stream: bool
    include_usage: bool  # stream_options.include_usage


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(400, f"'{name}' must be a number", param=name)
    if not low <= value <= high:
        raise ApiError(400, f"'{name}' must be between {low:g} and {high:g}, got {value}", param=name)
    return float(value)


def _temperature(body: dict) -> float:
    """0 (greedy) or in [MIN_TEMPERATURE, 2]: a positive value below float32's range is a 400."""
    value = _number(body, "temperature", 1.0, 0.0, 2.0)
    if 0.0 < value < MIN_TEMPERATURE:
        raise ApiError(400, f"'temperature' {value:g} is below float32's range: use 0 (greedy) or at least "
                            f"{MIN_TEMPERATURE:.3g}", param="temperature")
    return value


def _int(body: dict, name: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"'{name}' must be an integer", param=name)
    if not low <= value <= high:
        raise ApiError(400, f"'{name}' must be between {low} and {high}, got {value}", param=name)
    return value


def check_unicode(body: Any) -> None:
    """400 naming the first string (key or value) that is not valid Unicode: JSON lets a body
    spell a lone surrogate (``"\\ud800"``), which no UTF-8 encoder downstream accepts."""
    stack: list[tuple[str, Any]] = [("", body)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str):
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    raise ApiError(400, f"'{where or 'body'}' is not valid Unicode (a lone surrogate)",
                                   param=where or None) from None
        elif isinstance(value, dict):
            for key, item in value.items():
                key_text = str(key).encode("utf-8", "backslashreplace").decode("utf-8")
                name = f"{where}.{key_text}" if where else key_text
                stack.append((name, key))
                stack.append((name, item))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", item) for i, item in enumerate(value))


def _common(body: Any) -> tuple[str, dict[str, Any], bool, bool]:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    check_unicode(body)
    for name in UNSUPPORTED:
        value = body.get(name)
        if value in (None, [], {}) or (name == "response_format" and value == {"type": "text"}) or \
                (name == "tool_choice" and value == "none"):
            continue
        raise ApiError(400, f"'{name}' is not supported by this gateway", param=name, code="unsupported_parameter")
    model = body.get("model")
    if not isinstance(model, str) or not model or len(model) > 128:
        raise ApiError(400, "'model' is required: a model name from /v1/models", param="model")
    if _int(body, "n", 1, 1, 128) != 1:
        raise ApiError(400, "only n=1 is supported", param="n", code="unsupported_parameter")
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _int({"max_tokens": limit}, "max_tokens", DEFAULT_MAX_TOKENS, 1, MAX_NEW_TOKENS)
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise ApiError(400, "'stop' must be a string or a list of strings", param="stop")
    if len(stops) > MAX_STOP_STRINGS or not all(0 < len(s) <= 256 for s in stops):
        raise ApiError(400, f"'stop': at most {MAX_STOP_STRINGS} strings of 1-256 characters", param="stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options")
    logprobs = body.get("logprobs", False)
    fields = {
        "max_tokens": max_tokens,
        "temperature": _temperature(body),
        "top_p": max(_number(body, "top_p", 1.0, 0.0, 1.0), 1e-6),  # 0 keeps only the likeliest token
        "seed": _int(body, "seed", None, 0, 2**63 - 1),
        "stop": stops,
        "logprobs": bool(logprobs) if isinstance(logprobs, (bool, int)) else False,
    }
    return model, fields, stream, bool(options.get("include_usage"))


def parse_chat(body: Any) -> Parsed:
    model, fields, stream, usage = _common(body)
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object", param=f"messages[{i}]")
        role = "system" if m.get("role") == "developer" else m.get("role")
        if role not in ROLES:
            raise ApiError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}", param=f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported",
                               param=f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", param=f"messages[{i}].content")
        messages.append(ChatMessage(role, content))
    return _checked(Parsed(model, {**fields, "messages": tuple(messages)}, stream, usage))


def parse_completion(body: Any) -> Parsed:
    model, fields, stream, usage = _common(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' must be a string (one prompt per request)", param="prompt")
    return _checked(Parsed(model, {**fields, "prompt": prompt}, stream, usage))


def _checked(parsed: Parsed) -> Parsed:
    """The job's own limits (prompt size and the like) as a 400, before it goes anywhere."""
    try:
        GenerateRequest("check", model=parsed.model, **parsed.fields)
    except WireError as exc:
        raise ApiError(400, str(exc)) from None
    return parsed


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(result: GenerateResult) -> dict[str, Any]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": result.cached_tokens}}


def chat_response(result: GenerateResult, model: str, rid: str, created: int) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "system_fingerprint": f"permamesh-{result.worker_id[:8]}",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "logprobs": None, "finish_reason": result.finish_reason}],
            "usage": usage(result)}


def completion_response(result: GenerateResult, model: str, rid: str, created: int) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "system_fingerprint": f"permamesh-{result.worker_id[:8]}",
            "choices": [{"index": 0, "text": result.text, "logprobs": None,
                         "finish_reason": result.finish_reason}],
            "usage": usage(result)}


def chat_chunk(rid: str, created: int, model: str, delta: dict, finish: str | None = None,
               use: dict | None = None) -> dict[str, Any]:
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    if use is not None:
        chunk["choices"], chunk["usage"] = [], use
    return chunk


def completion_chunk(rid: str, created: int, model: str, text: str, finish: str | None = None,
                     use: dict | None = None) -> dict[str, Any]:
    chunk = {"id": rid, "object": "text_completion", "created": created, "model": model,
             "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
    if use is not None:
        chunk["choices"], chunk["usage"] = [], use
    return chunk


_PIECE = re.compile(r"\s*\S+\s*|\s+")


def pieces(text: str) -> list[str]:
    """``text`` in word-sized deltas that join back to it exactly (answers that came whole)."""
    return _PIECE.findall(text)


def post_chat(base_url: str, key: str, body: dict, timeout_s: float = 300.0):
    """``POST {base_url}/v1/chat/completions`` as an OpenAI client sends it; the open response
    (the demo and the benchmark read it plainly or as server-sent events)."""
    import json
    import urllib.request

    request = urllib.request.Request(base_url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     method="POST", headers={"Authorization": f"Bearer {key}",
                                                             "Content-Type": "application/json"})
    return urllib.request.urlopen(request, timeout=timeout_s)

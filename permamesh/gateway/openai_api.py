"""The OpenAI HTTP API's request bodies: checked field by field, turned into generation jobs.

Pure (but for :func:`post_chat`, the client side used by the demo and the benchmark):
:func:`parse_chat` and :func:`parse_completion` check a request body field by field (the types,
ranges and names the OpenAI API documents) and return the :class:`GenerateRequest` fields, or
raise :class:`ApiError` naming the bad parameter. :mod:`permamesh.gateway.responses` shapes
the answers.

Every parameter we accept has its effect; every other one is refused (HTTP 400,
``code: unsupported_parameter``, ``param`` naming it), so a client never gets a silently
different answer. Accepted: sampling (``temperature``, ``top_p``, ``seed``, ``stop``,
``presence_penalty`` and ``frequency_penalty``, applied in the worker's sampler), ``n`` (that
many jobs; with a seed, choice ``i`` samples with ``seed + i``), ``logprobs`` /
``top_logprobs`` (chat) and ``logprobs`` (completions, 0-5 alternatives), ``echo``
(completions: the prompt is put before the answer; with ``logprobs`` it is refused, since
prompt log-probabilities are not computed), ``best_of`` only equal to ``n``, ``stream`` and
``stream_options.include_usage``, ``user`` (an end-user id OpenAI uses for abuse reports; it
does not change the answer and is not stored), and ``response_format``, ``tools``,
``tool_choice`` and ``parallel_tool_calls`` (:mod:`permamesh.gateway.tools`: decoded under
a grammar in the worker; several calls per answer unless ``parallel_tool_calls`` is false).

Who calls it: :mod:`permamesh.gateway.server`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from permamesh.gateway import tools
from permamesh.gateway.errors import ApiError
from permamesh.wire import ChatMessage, GenerateRequest, WireError
from permamesh.wire.messages import (MAX_NEW_TOKENS, MAX_PENALTY, MAX_STOP_STRINGS, MAX_TOP_ENTRIES, MIN_TEMPERATURE,
                                     ROLES)

DEFAULT_MAX_TOKENS = 128
MAX_N = 8  # choices per request (each one a job in the mesh)
MAX_COMPLETION_LOGPROBS = 5  # the completions API's own bound
COMMON = frozenset({"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options",
                    "logprobs", "presence_penalty", "frequency_penalty", "n", "user"})
CHAT_PARAMS = COMMON | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools", "tool_choice",
                        "parallel_tool_calls"}
COMPLETION_PARAMS = COMMON | {"prompt", "echo", "best_of", "suffix"}
MESSAGE_KEYS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id", "refusal"})


@dataclass(frozen=True)
class Parsed:
    model: str
    fields: dict[str, Any]  # GenerateRequest keyword arguments (no request_id)
    stream: bool
    include_usage: bool  # stream_options.include_usage
    n: int = 1  # choices: jobs run for this request
    echo: str = ""  # completions: text put before each choice's answer (echo=true)
    functions: tuple[str, ...] = ()  # chat with tools: the functions an answer may call


def _unsupported(name: str, why: str = "is not supported by this gateway") -> ApiError:
    return ApiError(400, f"'{name}' {why}", param=name, code="unsupported_parameter")


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


def _refuse_unknown(body: dict, allowed: frozenset) -> None:
    for name in sorted(str(k) for k in body):
        if name not in allowed:
            raise _unsupported(name)
    if body.get("parallel_tool_calls") not in (None, True, False):
        raise ApiError(400, "'parallel_tool_calls' must be a boolean", param="parallel_tool_calls")


def _common(body: Any, allowed: frozenset) -> tuple[str, dict[str, Any], bool, bool, int]:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    check_unicode(body)
    _refuse_unknown(body, allowed)
    model = body.get("model")
    if not isinstance(model, str) or not model or len(model) > 128:
        raise ApiError(400, "'model' is required: a model name from /v1/models", param="model")
    n = _int(body, "n", 1, 1, MAX_N)
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
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not set(options) <= {"include_usage", "include_obfuscation"} or \
            options.get("include_obfuscation") not in (None, False):
        raise ApiError(400, "'stream_options' must be an object with at most 'include_usage' (and "
                            "'include_obfuscation': false: chunks are not padded here)", param="stream_options")
    user = body.get("user")
    if user is not None and (not isinstance(user, str) or len(user) > 256):
        raise ApiError(400, "'user' must be a string of at most 256 characters", param="user")
    fields = {
        "max_tokens": max_tokens,
        "temperature": _temperature(body),
        "top_p": max(_number(body, "top_p", 1.0, 0.0, 1.0), 1e-6),  # 0 keeps only the likeliest token
        "seed": _int(body, "seed", None, 0, 2**63 - 1 - MAX_N),
        "stop": stops,
        "presence_penalty": _number(body, "presence_penalty", 0.0, -MAX_PENALTY, MAX_PENALTY),
        "frequency_penalty": _number(body, "frequency_penalty", 0.0, -MAX_PENALTY, MAX_PENALTY),
    }
    return model, fields, stream, bool(options.get("include_usage")), n


def _top_budget(fields: dict, name: str) -> None:
    if fields["top_logprobs"] * fields["max_tokens"] > MAX_TOP_ENTRIES:
        raise ApiError(400, f"'{name}' x max_tokens must be at most {MAX_TOP_ENTRIES}", param=name)


def parse_chat(body: Any) -> Parsed:
    model, fields, stream, usage, n = _common(body, CHAT_PARAMS)
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise ApiError(400, "'logprobs' must be a boolean", param="logprobs")
    top = _int(body, "top_logprobs", 0, 0, 20)
    if top and not logprobs:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    fields.update(logprobs=bool(logprobs), top_logprobs=top)
    _top_budget(fields, "top_logprobs")
    kind, grammar, functions, prompt = tools.constraint_of(body)
    fields.update(grammar_kind=kind, grammar=grammar)
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object", param=f"messages[{i}]")
        for key in sorted(str(k) for k in m):
            if key not in MESSAGE_KEYS or (key == "refusal" and m[key] is not None) or \
                    (key == "tool_calls" and m.get("role") != "assistant" and m[key] not in (None, [])) or \
                    (key == "tool_call_id" and m.get("role") != "tool" and m[key] is not None):
                raise _unsupported(f"messages[{i}].{key}")
        name = m.get("name")
        if name is not None and (not isinstance(name, str) or not 0 < len(name) <= 64):
            raise ApiError(400, f"messages[{i}].name must be a string of 1-64 characters", param=f"messages[{i}].name")
        turn = tools.history(i, m, tools.parallel_of(body))
        if turn is not None:
            messages.append(ChatMessage(*turn))
            continue
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
        messages.append(ChatMessage(role, f"{name}: {content}" if name else content))  # who speaks, in the turn
    if prompt:  # the functions described to the model, in the system turn
        if messages[0].role == "system":
            messages[0] = ChatMessage("system", f"{messages[0].content}\n\n{prompt}")
        else:
            messages.insert(0, ChatMessage("system", prompt))
    return _checked(Parsed(model, {**fields, "messages": tuple(messages)}, stream, usage, n,
                           functions=tuple(sorted(functions))))


def parse_completion(body: Any) -> Parsed:
    model, fields, stream, usage, n = _common(body, COMPLETION_PARAMS)
    logprobs = body.get("logprobs")
    if logprobs is not None:
        logprobs = _int(body, "logprobs", 0, 0, MAX_COMPLETION_LOGPROBS)
    fields.update(logprobs=logprobs is not None, top_logprobs=logprobs or 0)
    _top_budget(fields, "logprobs")
    best_of = _int(body, "best_of", None, 1, MAX_N)
    if best_of is not None and best_of != n:
        raise _unsupported("best_of", f"is only supported equal to n ({n}): choices are not ranked here")
    if body.get("suffix") not in (None, ""):
        raise _unsupported("suffix", "is not supported: the models served here do not fill in the middle")
    echo = body.get("echo", False)
    if echo is None:
        echo = False
    if not isinstance(echo, bool):
        raise ApiError(400, "'echo' must be a boolean", param="echo")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' must be a string (one prompt per request)", param="prompt")
    if echo and fields["logprobs"]:
        raise _unsupported("echo", "with 'logprobs' is not supported: prompt log-probabilities are not computed")
    return _checked(Parsed(model, {**fields, "prompt": prompt}, stream, usage, n, prompt if echo else ""))


def _checked(parsed: Parsed) -> Parsed:
    """The job's own limits (prompt size and the like) as a 400, before it goes anywhere."""
    try:
        GenerateRequest("check", model=parsed.model, **parsed.fields)
    except WireError as exc:
        raise ApiError(400, str(exc)) from None
    return parsed


def choice_fields(parsed: Parsed, index: int) -> dict[str, Any]:
    """The job of choice ``index``: with a seed, each choice samples with its own."""
    seed = parsed.fields.get("seed")
    return parsed.fields if seed is None or index == 0 else {**parsed.fields, "seed": seed + index}


def post_chat(base_url: str, key: str, body: dict, timeout_s: float = 300.0):
    """``POST {base_url}/v1/chat/completions`` as an OpenAI client sends it; the open response
    (the demo and the benchmark read it plainly or as server-sent events)."""
    import json
    import urllib.request

    request = urllib.request.Request(base_url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     method="POST", headers={"Authorization": f"Bearer {key}",
                                                             "Content-Type": "application/json"})
    return urllib.request.urlopen(request, timeout=timeout_s)

"""Structured outputs and tool calls: OpenAI's ``response_format`` and ``tools`` as grammars.

Pure. :func:`constraint_of` turns a chat body's ``response_format`` (``json_object``,
``json_schema``) or ``tools`` / ``tool_choice`` into the job's constraint
(``GenerateRequest.grammar_kind`` and ``grammar``), which the worker enforces while it
decodes (:mod:`permamesh.workers.constraints`): the answer cannot leave the schema.

Tools, the way the models served here can call them:

- the functions are described to the model in a system message (:func:`tool_prompt`), and a
  call is written as one JSON object ``{"name": ..., "arguments": {...}}`` whose arguments
  follow that function's ``parameters`` schema; with ``parallel_tool_calls`` true or absent
  (OpenAI's default) the answer is a JSON list of 1 to :data:`MAX_PARALLEL_CALLS` such calls,
  with ``false`` exactly one call (the object alone);
- ``tool_choice`` ``"required"`` (or a named function) constrains the answer to calls (of
  that function); ``"auto"`` (the default) to either calls or plain text that does not start
  with ``{`` or ``[`` (a Lark grammar with the calls' JSON schema inline); ``"none"`` leaves
  the answer free and calls nothing;
- the answer is read back by :func:`tool_calls`: complete calls become the message's
  ``tool_calls``, each with its own id (``finish_reason: tool_calls``); a stream sends each
  call whole, as one delta with its ``index``, once the answer's JSON is complete (the
  grammar's JSON is only known to be a call when it closes).

Earlier turns of a tool conversation are kept in the roles the workers take: an assistant
turn's calls as their JSON (a list, when calls may be parallel), a ``tool`` message as a user
turn naming the call it answers.

Who calls it: :mod:`permamesh.gateway.openai_api` (parsing) and
:mod:`permamesh.gateway.server` (shaping answers).
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from permamesh.gateway.errors import ApiError

MAX_TOOLS = 64
MAX_PARALLEL_CALLS = 8  # calls in one answer at most (the grammar's maxItems)
MAX_SCHEMA_CHARS = 32 * 1024  # one schema's JSON text (the wire takes 64 KiB of grammar)
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _bad(message: str, param: str) -> ApiError:
    return ApiError(400, message, param=param)


def _schema_text(schema: Any, param: str) -> str:
    if not isinstance(schema, dict):
        raise _bad(f"'{param}' must be a JSON schema object", param)
    text = json.dumps(schema, separators=(",", ":"), sort_keys=True)
    if len(text) > MAX_SCHEMA_CHARS:
        raise _bad(f"'{param}' exceeds {MAX_SCHEMA_CHARS} characters of JSON", param)
    return text


def response_format(value: Any) -> tuple[str, str]:
    """``(grammar_kind, grammar)`` of a ``response_format`` (``("", "")`` for text)."""
    if value is None or value == {"type": "text"}:
        return "", ""
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "json_object":
        return "json_object", ""
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not _NAME.match(spec["name"]):
            raise _bad("'response_format.json_schema' needs a 'name' (1-64 letters, digits, '_' or '-') and a "
                       "'schema'", "response_format.json_schema")
        return "json_schema", _schema_text(spec.get("schema", {}), "response_format.json_schema.schema")
    raise _bad("'response_format.type' must be text, json_object or json_schema", "response_format")


def _functions(tools: Any) -> dict[str, dict]:
    if not isinstance(tools, list) or not 0 < len(tools) <= MAX_TOOLS:
        raise _bad(f"'tools' must be a list of 1-{MAX_TOOLS} tools", "tools")
    out: dict[str, dict] = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not _NAME.match(fn["name"]):
            raise _bad(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}} "
                       "with a name of 1-64 letters, digits, '_' or '-'", f"tools[{i}]")
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        _schema_text(params, f"tools[{i}].function.parameters")
        description = fn.get("description") or ""
        if not isinstance(description, str):
            raise _bad(f"tools[{i}].function.description must be a string", f"tools[{i}].function.description")
        out[fn["name"]] = {"name": fn["name"], "description": description[:2000], "parameters": params}
    return out


def _call_schema(functions: dict[str, dict]) -> dict:
    calls = [{"type": "object", "properties": {"name": {"const": name}, "arguments": fn["parameters"]},
              "required": ["name", "arguments"], "additionalProperties": False} for name, fn in functions.items()]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def parallel_of(body: dict) -> bool:
    """Whether an answer may hold several calls (``parallel_tool_calls``: true or absent)."""
    return body.get("parallel_tool_calls") is not False


def constraint_of(body: dict) -> tuple[str, str, dict[str, dict], str]:
    """``(grammar_kind, grammar, functions callable, tool prompt)`` of a chat body."""
    kind, grammar = response_format(body.get("response_format"))
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools in (None, []):
        if choice not in (None, "none"):
            raise _bad("'tool_choice' needs 'tools'", "tool_choice")
        return kind, grammar, {}, ""
    functions = _functions(tools)
    if choice == "none":
        return kind, grammar, {}, ""
    if kind:
        raise ApiError(400, "'response_format' with 'tools' is not supported together: use one", param="response_format",
                       code="unsupported_parameter")
    if choice in (None, "auto", "required"):
        chosen = functions
    elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict) \
            and isinstance(choice["function"].get("name"), str) and choice["function"]["name"] in functions:
        chosen = {choice["function"]["name"]: functions[choice["function"]["name"]]}
    else:
        raise _bad("'tool_choice' must be none, auto, required or {'type': 'function', 'function': {'name': one of "
                   "the tools}}", "tool_choice")
    parallel = parallel_of(body)
    call = _call_schema(chosen)
    if parallel:
        call = {"type": "array", "items": call, "minItems": 1, "maxItems": MAX_PARALLEL_CALLS}
    schema = json.dumps(call, separators=(",", ":"), sort_keys=True)
    if choice in (None, "auto"):
        lark = f"start: call | text\ncall: %json {schema}\ntext: TEXT\nTEXT: /[^{{\\[\\s][^\\x00]*/\n"
        return "lark", lark, functions, tool_prompt(functions, required=False, parallel=parallel)
    return "json_schema", schema, chosen, tool_prompt(chosen, required=True, parallel=parallel)


def tool_prompt(functions: dict[str, dict], required: bool, parallel: bool = False) -> str:
    listed = json.dumps(list(functions.values()), separators=(",", ":"))
    call = '{"name": <function name>, "arguments": <its arguments>}'
    if parallel:
        how = "Answer with" if required else "To call functions, answer with only"
        return (f"You can call these functions: {listed}\n{how}: a JSON list of calls [{call}, ...], one for each "
                f"call to make (at most {MAX_PARALLEL_CALLS}).")
    how = "Answer with a call" if required else "To call one, answer with only"
    return f"You can call these functions: {listed}\n{how}: a JSON object {call}."


def history(i: int, message: dict, parallel: bool = False) -> tuple[str, str] | None:
    """An earlier turn of a tool conversation as ``(role, content)`` the workers take, or None
    for an ordinary message; ``parallel``: calls are written as the list the model writes."""
    if message.get("role") == "tool":
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise _bad(f"messages[{i}].content must be a string", f"messages[{i}].content")
        call = message.get("tool_call_id")
        return "user", f"Result of function call {call if isinstance(call, str) else ''}: {content}"
    calls = message.get("tool_calls") if message.get("role") == "assistant" else None
    if not calls:
        return None
    if not isinstance(calls, list):
        raise _bad(f"messages[{i}].tool_calls must be a list", f"messages[{i}].tool_calls")
    written = []
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _bad(f"messages[{i}].tool_calls: each needs a function name", f"messages[{i}].tool_calls")
        try:
            arguments = json.loads(fn.get("arguments") or "{}")
        except (TypeError, ValueError):
            arguments = fn.get("arguments")
        written.append({"name": fn["name"], "arguments": arguments})
    if parallel:
        return "assistant", json.dumps(written, separators=(",", ":"))
    return "assistant", "\n".join(json.dumps(call, separators=(",", ":")) for call in written)


def tool_calls(text: str, functions: dict[str, dict]) -> list[dict] | None:
    """The answer as OpenAI ``tool_calls`` when it is complete calls of ``functions``: one
    call (a JSON object) or a list of 1 to :data:`MAX_PARALLEL_CALLS` of them, each with its
    own id (None when any of it is not a call)."""
    if not functions or not text.lstrip().startswith(("{", "[")):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    calls = value if isinstance(value, list) else [value]
    if not 0 < len(calls) <= MAX_PARALLEL_CALLS:
        return None
    for call in calls:
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or call["name"] not in functions \
                or not isinstance(call.get("arguments"), dict):
            return None
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])}} for call in calls]

"""The messages workers and clients exchange (the request path of the foundation).

Every class here is a frozen dataclass registered with :func:`message`; ``__post_init__``
checks values (ranges, lengths) so a bad request is refused at decode time with a clear
reason, before any worker state changes.

Who sends what:

- client -> worker: :class:`GenerateRequest`, :class:`StatusRequest`
- worker -> client: :class:`Accepted` (queued, with position), zero or more
  :class:`TokenChunk` when streaming, then exactly one :class:`GenerateResult` or
  :class:`ErrorReply`; :class:`StatusReply` for a status request.
- anyone -> anyone: :class:`ErrorReply` with ``request_id=""`` for a frame that could not
  be decoded at all (code ``bad_frame``).

Every string a peer could make long is bounded (``limits=``, checked at encode and decode):
request ids (:data:`~permamesh.wire.codec.MAX_REQUEST_ID_CHARS`), error codes
(:data:`MAX_CODE_CHARS`), node ids and names in results, chunks, progress and status (:data:`MAX_NAME_CHARS`); an error's text is cut to
:data:`MAX_ERROR_CHARS` when built and refused above it when decoded. Replies echo request ids,
so an unbounded one would make the reply itself unsendable.

Sampling parameters: ``temperature`` is 0 (greedy) or in [:data:`MIN_TEMPERATURE`, 10]; a
positive value below float32's normal range (1e-300, 5e-324, 1e-45) is refused here, at build
and at decode, with the bound in the message, rather than reaching a sampler. The engine
samples in a way that is exact for any allowed value, so a temperature far below ~1e-3
behaves as greedy (ties shared) rather than overflowing. ``top_p`` is in (0, 1]; the likeliest
token is always kept. ``presence_penalty`` and ``frequency_penalty`` are in [-2, 2] (OpenAI's
range), subtracted from the logits of tokens the answer already holds (once, and once per
occurrence), as vLLM and llama.cpp do. ``grammar_kind`` and ``grammar`` constrain the answer
(a JSON object, a JSON schema, a Lark grammar: :mod:`permamesh.workers.constraints`); a
grammar is bounded to :data:`MAX_GRAMMAR_CHARS` and compiled only by the worker that runs it. ``top_logprobs`` (0-20) asks for that many likeliest
alternatives at each generated position, with ``logprobs``; the result then carries each
token's text (``tokens``) and the alternatives (``top_logprobs``), bounded per token.
"""

from __future__ import annotations

import math

from permamesh.wire.codec import MAX_REQUEST_ID_CHARS, Message, WireError, message, struct

MAX_PROMPT_CHARS = 256 * 1024
MAX_NEW_TOKENS = 8192
MAX_STOP_STRINGS = 8
ROLES = ("system", "user", "assistant")
MAX_TEMPERATURE = 10.0
MIN_TEMPERATURE = 2.0**-126  # float32's smallest normal (~1.18e-38): the least positive temperature
MAX_CODE_CHARS = 32  # ErrorReply.code: a short machine-readable word
MAX_NAME_CHARS = 128  # worker ids, model names, devices, group names
MAX_ERROR_CHARS = 4096  # ErrorReply.message: human-readable, cut to this when built
_NAMES = {"worker_id": MAX_NAME_CHARS, "model": MAX_NAME_CHARS}
MAX_PENALTY = 2.0  # presence and frequency penalties are in [-MAX_PENALTY, MAX_PENALTY]
MAX_TOP_LOGPROBS = 20  # alternatives per generated token, at most
MAX_TOKEN_TEXT = 64  # characters of one token's text in a result (a token is a few bytes)
MAX_GRAMMAR_CHARS = 64 * 1024  # a request's grammar (a JSON schema or a Lark grammar)
GRAMMAR_KINDS = ("", "json_object", "json_schema", "lark")  # "" = unconstrained
MAX_TOP_ENTRIES = 40960  # top_logprobs x max_tokens at most: a result stays well under its 2 MiB


def _require(cond: bool, what: str) -> None:
    if not cond:
        raise WireError(what)


@struct
class ChatMessage:
    role: str  # one of ROLES
    content: str

    def __post_init__(self) -> None:
        _require(self.role in ROLES, f"chat role must be one of {ROLES}, got {self.role[:32]!r}")


@message("generate", max_bytes=1024 * 1024)
class GenerateRequest(Message):
    """A generation job. Exactly one of ``prompt`` (raw text) or ``messages`` (chat)."""

    request_id: str
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] = ()
    max_tokens: int = 128  # new tokens to generate at most
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass kept, (0, 1]
    seed: int | None = None  # sampling seed; None = fresh randomness
    stop: tuple[str, ...] = ()  # stop strings, not included in the answer
    stream: bool = False  # send TokenChunk messages as tokens are produced
    logprobs: bool = False  # report log-probabilities of the generated tokens
    model: str = ""  # the model the client wants; "" = whatever the worker serves
    session: str = ""  # opaque conversation id for session affinity ("" = none)
    presence_penalty: float = 0.0  # subtracted once from the logit of every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence of a token already generated
    top_logprobs: int = 0  # likeliest alternatives reported per generated token (needs logprobs)
    grammar_kind: str = ""  # constrained decoding: one of GRAMMAR_KINDS ("" = none)
    grammar: str = ""  # the JSON schema (json_schema) or Lark grammar (lark); "" for json_object

    def __post_init__(self) -> None:
        _require(0 < len(self.request_id) <= 64, "request_id must be 1-64 characters")
        _require((self.prompt is None) != (not self.messages), "give exactly one of prompt or messages")
        size = len(self.prompt or "") + sum(len(m.content) for m in self.messages)
        _require(size <= MAX_PROMPT_CHARS, f"prompt of {size} chars exceeds {MAX_PROMPT_CHARS}")
        _require(1 <= self.max_tokens <= MAX_NEW_TOKENS, f"max_tokens must be in 1..{MAX_NEW_TOKENS}")
        _require(math.isfinite(self.temperature) and 0.0 <= self.temperature <= MAX_TEMPERATURE,
                 f"temperature must be in [0, {MAX_TEMPERATURE:g}] (0 = greedy)")
        _require(self.temperature == 0.0 or self.temperature >= MIN_TEMPERATURE,
                 f"temperature {self.temperature:g} is below float32's range: use 0 (greedy) or at least "
                 f"{MIN_TEMPERATURE:.3g}")
        _require(math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]")
        _require(self.seed is None or 0 <= self.seed < 2**63, "seed must be in [0, 2**63)")
        _require(len(self.stop) <= MAX_STOP_STRINGS, f"at most {MAX_STOP_STRINGS} stop strings")
        _require(all(0 < len(s) <= 256 for s in self.stop), "stop strings must be 1-256 characters")
        _require(len(self.model) <= 128, "model name too long")
        _require(len(self.session) <= 64, "session id too long")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _require(math.isfinite(value) and -MAX_PENALTY <= value <= MAX_PENALTY,
                     f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}]")
        _require(0 <= self.top_logprobs <= MAX_TOP_LOGPROBS, f"top_logprobs must be in 0..{MAX_TOP_LOGPROBS}")
        _require(self.top_logprobs == 0 or self.logprobs, "top_logprobs needs logprobs")
        _require(self.grammar_kind in GRAMMAR_KINDS, f"grammar_kind must be one of {GRAMMAR_KINDS}")
        _require(len(self.grammar) <= MAX_GRAMMAR_CHARS, f"a grammar exceeds {MAX_GRAMMAR_CHARS} chars")
        _require(bool(self.grammar) == (self.grammar_kind in ("json_schema", "lark")),
                 "json_schema and lark need a grammar; json_object and none take none")
        _require(self.top_logprobs * self.max_tokens <= MAX_TOP_ENTRIES,
                 f"top_logprobs x max_tokens must be at most {MAX_TOP_ENTRIES}")


@message("accepted")
class Accepted(Message):
    request_id: str
    queue_position: int  # requests ahead of this one, 0 = running next
    worker_id: str


@struct
class TopLogprobs:
    """The likeliest tokens at one generated position, most likely first (parallel arrays)."""

    tokens: tuple[str, ...]  # each candidate's text
    logprobs: tuple[float, ...]  # its log-probability under the raw model

    def __post_init__(self) -> None:
        _require(len(self.tokens) == len(self.logprobs) <= MAX_TOP_LOGPROBS,
                 f"top_logprobs: at most {MAX_TOP_LOGPROBS} candidates, one log-probability each")
        _require(all(len(t) <= MAX_TOKEN_TEXT for t in self.tokens), f"a token's text exceeds {MAX_TOKEN_TEXT} chars")
        _require(all(lp <= 0.0 for lp in self.logprobs), "log-probabilities must be <= 0")


@message("token", max_bytes=2 * 1024 * 1024, limits=_NAMES)
class TokenChunk(Message):
    """Tokens of a streamed answer as they are produced. With log-probabilities, each of its
    tokens' log-probability, text and (with top_logprobs) alternatives ride with it, so a
    stream can show them chunk by chunk; a field a worker leaves empty is simply not there
    (older workers send no texts), and the final result still holds them all."""

    request_id: str
    index: int  # position of the first token of this chunk in the answer
    text: str  # new text (held back while it could still be the start of a stop string)
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...] = ()  # one per token when requested
    tokens: tuple[str, ...] = ()  # each token's text, with logprobs ("" = not sent)
    top_logprobs: tuple[TopLogprobs, ...] = ()  # each token's alternatives, when top_logprobs > 0

    def __post_init__(self) -> None:
        n = len(self.token_ids)
        _require(self.index >= 0, "a chunk's index must be >= 0")
        _require(len(self.logprobs) in (0, n) and len(self.tokens) in (0, n) and len(self.top_logprobs) in (0, n),
                 "a chunk's logprobs, tokens and top_logprobs each come one per token or not at all")
        _require(all(lp == lp and lp < math.inf for lp in self.logprobs), "a log-probability is NaN or +inf")
        _require(all(len(t) <= MAX_TOKEN_TEXT for t in self.tokens), f"a token's text exceeds {MAX_TOKEN_TEXT} chars")



@message("result", max_bytes=2 * 1024 * 1024, limits={**_NAMES, "finish_reason": 16})
class GenerateResult(Message):
    request_id: str
    text: str
    finish_reason: str  # "stop" (eos or stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[float, ...] = ()  # log-probability of each generated token, when requested
    worker_id: str = ""
    model: str = ""
    queue_wait_s: float = 0.0  # seconds spent queued at the worker
    ttft_s: float = 0.0  # seconds from start of work to first token
    total_s: float = 0.0  # seconds from start of work to the last token
    cached_tokens: int = 0  # prompt tokens whose prefill the worker's prefix cache saved
    tokens: tuple[str, ...] = ()  # each generated token's text, when logprobs were requested
    top_logprobs: tuple[TopLogprobs, ...] = ()  # per generated token, when top_logprobs > 0

    def __post_init__(self) -> None:
        _require(all(len(t) <= MAX_TOKEN_TEXT for t in self.tokens), f"a token's text exceeds {MAX_TOKEN_TEXT} chars")
        _require(len(self.tokens) <= len(self.token_ids) and len(self.top_logprobs) <= len(self.token_ids),
                 "more token texts or alternatives than generated tokens")


@message("error", limits={"code": MAX_CODE_CHARS, "message": MAX_ERROR_CHARS})
class ErrorReply(Message):
    request_id: str  # "" when the frame could not be decoded
    code: str  # bad_frame, bad_request, queue_full, model_mismatch, internal, shutting_down
    message: str  # cut to MAX_ERROR_CHARS when built here; refused above it from a peer

    def __post_init__(self) -> None:
        if isinstance(self.message, str) and len(self.message) > MAX_ERROR_CHARS:
            object.__setattr__(self, "message", self.message[: MAX_ERROR_CHARS - 3] + "...")


@message("status?")
class StatusRequest(Message):
    request_id: str


@message("status", limits={**_NAMES, "device": MAX_NAME_CHARS, "group": MAX_NAME_CHARS})
class StatusReply(Message):
    request_id: str
    worker_id: str
    model: str
    device: str
    queue_length: int  # requests waiting, not counting the one running
    busy: bool
    served: int  # requests completed since start
    rejected_frames: int  # malformed or forged frames refused since start
    prefill_tok_per_s: float  # measured, 0 before the first request
    decode_tok_per_s: float
    uptime_s: float
    group: str = ""  # worker group it routes within
    members: int = 0  # other group members it hears from
    forwarded: int = 0  # jobs it handed to another member
    sync_delta_bytes: int = 0  # tree-sync bytes it published as deltas
    sync_full_tree_bytes: int = 0  # what broadcasting its full tree at each change would have cost
    sync_snapshot_bytes: int = 0  # resync snapshots it sent
    prompt_tokens_total: int = 0  # prompt tokens it served
    cached_tokens_total: int = 0  # of which its prefix cache supplied
    dropped_replies: int = 0  # replies it could not encode or send since start


@message("progress", limits=_NAMES)
class Progress(Message):
    """Keep-alive for a job that is queued, running or forwarded: sent about once a second so
    the submitter can tell a slow job from a dead worker."""

    request_id: str
    queue_position: int  # jobs ahead of this one at the worker holding it, 0 = running
    worker_id: str


@message("forward", max_bytes=1024 * 1024 + 4096)
class ForwardedRequest(Message):
    """An entry worker hands a client's job to the group member that should run it. The member
    runs it locally (never forwards again) and answers the entry worker, which relays to the
    client: the member never learns who asked."""

    request: GenerateRequest
    entry: str  # node id of the entry worker
    group: str

"""Grammar-constrained decoding: a request's answer kept inside a JSON schema or a grammar.

A request may carry a constraint (``GenerateRequest.grammar_kind`` and ``grammar``, which
travel with the job through the overlay like its other fields):

- ``json_object``: any JSON object;
- ``json_schema``: a JSON Schema (the text of the schema);
- ``lark``: a grammar in llguidance's Lark dialect (the gateway writes these for tool calls).

:class:`Constraint` compiles one with llguidance (docs/dependencies.md says why it, not
xgrammar or outlines-core) against the engine's tokenizer, and at each step masks the
logits to the tokens the grammar allows (:meth:`Constraint.mask`, end-of-sequence only where
the text so far is complete), then advances by the token sampled (:meth:`Constraint.advance`).
The log-probabilities reported stay the raw model's: verification compares those. Both
engines sample through :class:`~permamesh.workers.decoding.Decoding`, so both honour it.

A grammar that does not compile, or one over :data:`MAX_GRAMMAR_CHARS`, is the requester's
error (:class:`~permamesh.workers.errors.RequestError`), refused before any step runs.

Who calls it: :class:`~permamesh.workers.decoding.Decoding` (created by an engine's
``start``, on the engine thread).
"""

from __future__ import annotations

import json
import logging
import threading

from permamesh.workers.errors import RequestError

log = logging.getLogger(__name__)

KINDS = ("json_object", "json_schema", "lark")
MAX_GRAMMAR_CHARS = 64 * 1024  # the wire's bound on a request's grammar text
JSON_OPTIONS = {"whitespace_flexible": False}  # compact JSON: no runs of whitespace for a model to wander in

_lock = threading.Lock()
_tokenizers: dict[tuple[int, int], object] = {}  # (id of our tokenizer, vocab size) -> LLTokenizer


def grammar_text(kind: str, text: str) -> str:
    """The llguidance grammar of a constraint (a RequestError names what is wrong)."""
    from llguidance import LLMatcher

    if kind not in KINDS:
        raise RequestError(f"unknown grammar kind {kind[:32]!r}: one of {', '.join(KINDS)}")
    if len(text) > MAX_GRAMMAR_CHARS:
        raise RequestError(f"a grammar of {len(text)} chars exceeds {MAX_GRAMMAR_CHARS}")
    if kind == "lark":
        return LLMatcher.grammar_from_lark(text)
    if kind == "json_object":
        return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    try:
        schema = json.loads(text)
    except ValueError as exc:
        raise RequestError(f"the JSON schema is not JSON: {exc}") from None
    if not isinstance(schema, (dict, bool)):
        raise RequestError("a JSON schema is an object (or true/false)")
    try:
        return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except ValueError as exc:
        raise RequestError(f"the JSON schema is not usable: {str(exc)[:300]}") from None


def ll_tokenizer(tokenizer, n_vocab: int):
    """llguidance's view of ``tokenizer`` (a transformers tokenizer, or our byte tokenizer),
    built once per tokenizer and vocabulary size (it indexes every token's bytes)."""
    key = (id(tokenizer), n_vocab)
    with _lock:
        found = _tokenizers.get(key)
    if found is not None:
        return found
    import llguidance
    import llguidance.hf

    hf = getattr(tokenizer, "_tok", None)
    eos = sorted(tokenizer.eos_ids)
    if hf is not None:
        made = llguidance.hf.from_tokenizer(hf, n_vocab=n_vocab, eos_token=eos)
    else:
        made = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_ByteVocab(tokenizer, n_vocab)), n_vocab=n_vocab,
                                      eos_token=eos)
    with _lock:
        _tokenizers[key] = made
    return made


class _ByteVocab:
    """What llguidance's TokenizerWrapper reads of a byte-level tokenizer: each token's bytes
    (ids 0-255 are the bytes; the rest are special tokens, which a grammar never emits)."""

    def __init__(self, tokenizer, n_vocab: int) -> None:
        self._tok = tokenizer
        self.eos_token_id = min(tokenizer.eos_ids)
        self.bos_token_id = getattr(tokenizer, "BOS", None)
        self.tokens = [bytes([i]) if i < 256 else f"<|special_{i}|>".encode() for i in range(n_vocab)]
        self.special_token_ids = list(range(256, n_vocab))

    def __call__(self, text):
        return list(text if isinstance(text, bytes) else text.encode("utf-8"))


class Constraint:
    """One request's grammar state: masks each step's logits, advances by each token."""

    def __init__(self, tokenizer, n_vocab: int, kind: str, text: str) -> None:
        import llguidance
        import llguidance.torch as lt

        grammar = grammar_text(kind, text)
        self._lt = lt
        self.matcher = llguidance.LLMatcher(ll_tokenizer(tokenizer, n_vocab), grammar, log_level=0)
        if self.matcher.is_error():
            raise RequestError(f"the {kind} grammar does not compile: {self.matcher.get_error()[:500]}")
        self.n_vocab = n_vocab
        self._bitmask = lt.allocate_token_bitmask(1, n_vocab)

    @property
    def stopped(self) -> bool:
        """The grammar admits no further token: the answer is complete."""
        return self.matcher.is_stopped()

    def mask(self, logits):
        """A copy of ``logits`` (1-D) with every token the grammar forbids at -inf. The bitmask
        is unpacked with numpy (llguidance's own torch helper is ``torch.compile``d: on CPU it
        costs ~200 ms a token here, this ~0.1 ms)."""
        import numpy as np
        import torch

        self._lt.fill_next_token_bitmask(self.matcher, self._bitmask, 0)
        out = logits.detach().cpu().float().clone()
        if out.numel() < self.n_vocab:
            raise RequestError(f"logits of {out.numel()} tokens, grammar built for {self.n_vocab}")
        bits = np.unpackbits(self._bitmask[0].numpy().view(np.uint8), bitorder="little")[: self.n_vocab]
        allowed = torch.from_numpy(bits.astype(bool))
        out[: self.n_vocab][~allowed] = -torch.inf
        out[self.n_vocab:] = -torch.inf
        return out

    def advance(self, token: int) -> None:
        """The token sampled (from masked logits, so allowed); a refusal is a bug, said clearly."""
        if not self.matcher.consume_token(token):
            raise RequestError(f"the grammar refused token {token}: {self.matcher.get_error()[:300]}")

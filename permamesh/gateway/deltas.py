"""One streamed choice cut into deltas: its text, and its tokens' log-probabilities with the text.

Pure. A streamed job's chunks (:class:`~permamesh.wire.TokenChunk`, from a worker directly or
rebuilt by the overlay) come to :meth:`ChoiceDeltas.chunk` as they arrive; each becomes one
:class:`Delta`: the chunk's new text and, when the choice asks for log-probabilities, the
entries of the tokens the chunk carries (OpenAI sends them with the chunk that holds the
tokens, not at the end). When the job ends, :meth:`ChoiceDeltas.rest` gives whatever the
chunks did not carry, from the result (the overlay's last piece, or everything after a chunk
that came without what the choice asks for: an older worker sends no token texts or
alternatives), so the deltas always join to the answer's text and its log-probabilities, in
order.

A chunk's text and its tokens need not line up exactly: text is held back while it could be
the start of a stop string, and a character split over two tokens comes with the second. So a
delta may carry a token's entry before (or after) its text; the deltas together carry all.

Who calls it: :mod:`permamesh.gateway.streaming` (one per choice).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from permamesh.wire import GenerateResult, TokenChunk

log = logging.getLogger(__name__)

__all__ = ["ChoiceDeltas", "Delta", "Entry"]


@dataclass(frozen=True)
class Entry:
    """One generated token: its text, its log-probability, its likeliest alternatives."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()  # most likely first; () when none were asked
    offset: int = 0  # characters of the choice's token texts before this one (completions' text_offset)


@dataclass(frozen=True)
class Delta:
    text: str
    entries: tuple[Entry, ...] | None = None  # None: the choice asks for no log-probabilities


class ChoiceDeltas:
    """One choice's stream: ``logprobs`` (it asks for them) and ``top`` (alternatives per token)."""

    def __init__(self, logprobs: bool, top: int = 0) -> None:
        self.logprobs, self.top = logprobs, top
        self.sent: list[str] = []  # texts sent
        self.tokens = 0  # tokens whose entries were sent
        self.chars = 0  # characters of those tokens' texts
        self.held = False  # a chunk lacked what the choice asks for: the rest comes from the result

    def chunk(self, chunk: TokenChunk) -> Delta | None:
        """The delta of ``chunk`` (None: nothing to send now)."""
        if self.held:
            return None
        if not self.logprobs:
            return self._text(chunk.text, None) if chunk.text else None
        n = len(chunk.token_ids)
        if n and not (len(chunk.logprobs) == len(chunk.tokens) == n and (not self.top or len(chunk.top_logprobs) == n)):
            self.held = True
            return None
        entries = tuple(self._entry(chunk.tokens[i], chunk.logprobs[i],
                                    chunk.top_logprobs[i] if self.top else None) for i in range(n))
        return self._text(chunk.text, entries) if chunk.text or entries else None

    def rest(self, result: GenerateResult) -> list[Delta]:
        """What the chunks did not carry, from the job's result: per token when the remaining
        tokens' texts join to the remaining text, else in one delta."""
        done = "".join(self.sent)
        if not result.text.startswith(done):  # the overlay refuses such an answer; a direct worker is trusted less
            log.warning("an answer contradicts its streamed chunks after %d characters", len(done))
            text = ""
        else:
            text = result.text[len(done):]
        if not self.logprobs or not result.tokens:
            return [self._text(text, None if not self.logprobs else ())] if text else []
        start, stop = self.tokens, len(result.tokens)
        entries = [self._entry(result.tokens[i], result.logprobs[i],
                               result.top_logprobs[i] if i < len(result.top_logprobs) else None)
                   for i in range(start, stop)]
        if entries and "".join(e.token for e in entries) == text:
            return [self._text(e.token, (e,)) for e in entries]
        return [self._text(text, tuple(entries))] if text or entries else []

    def _entry(self, token: str, logprob: float, top) -> Entry:
        alternatives = tuple(zip(top.tokens, top.logprobs)) if top is not None else ()
        entry = Entry(token, logprob, alternatives, self.chars)
        self.tokens += 1
        self.chars += len(token)
        return entry

    def _text(self, text: str, entries: tuple[Entry, ...] | None) -> Delta:
        self.sent.append(text)
        return Delta(text, entries)

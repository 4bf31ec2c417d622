"""Stop strings over a growing decoded text, safe for streaming.

The engine decodes the whole answer after every token and asks :class:`StopScanner` what may
be shown. Text that could still turn into a stop string (a suffix that is a prefix of one),
and a trailing U+FFFD from a UTF-8 sequence cut in the middle, are held back until the next
token settles them, so a streaming client never sees text that the final answer drops.
"""

from __future__ import annotations

from typing import Sequence

_REPLACEMENT = "\ufffd"


class StopScanner:
    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._emitted = 0  # characters of the text already released
        self.stopped = False
        self.final_text: str | None = None

    def feed(self, text: str) -> str:
        """Take the full text decoded so far; return the newly releasable part."""
        if self.stopped:
            return ""
        cut = min((p for p in (text.find(s) for s in self._stops) if p >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self.final_text = text[:cut]
            return self._release(self.final_text, len(self.final_text))
        return self._release(text, len(text) - self._held_back(text))

    def finish(self, text: str) -> str:
        """Generation ended without a stop string: release everything that is left."""
        if self.stopped:
            return ""
        text = text.rstrip(_REPLACEMENT)  # an answer cut inside a UTF-8 sequence
        self.final_text = text
        return self._release(text, len(text))

    def _release(self, text: str, end: int) -> str:
        if end <= self._emitted:
            return ""
        new, self._emitted = text[self._emitted:end], end
        return new

    def _held_back(self, text: str) -> int:
        """Characters at the end that may still change: an unfinished UTF-8 sequence (shown as
        U+FFFD), plus whatever before it could be the start of a stop string."""
        settled = text.rstrip(_REPLACEMENT)
        hold = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(settled)), hold, -1):
                if settled.endswith(stop[:k]):
                    hold = k
                    break
        return len(text) - len(settled) + hold

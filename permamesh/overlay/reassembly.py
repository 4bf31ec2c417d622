"""The client's side of a streamed answer: chunk cloves in, pieces out in order.

:class:`ChunkReassembly` rebuilds each chunk of a streamed answer from any k of its cloves
(:mod:`~permamesh.overlay.stream` is the entry worker's side), checks that it is a message of
the stream's kind signed by the entry worker (its key is pinned from the directory), releases
chunks strictly in order, and at the end releases whatever the final answer holds beyond what
was released (a chunk that never rebuilt, or pieces past the last chunk block), refusing an
answer that contradicts its chunks.

Two kinds of stream (``docs/paths.md`` section 9):

- a model's answer: :class:`~permamesh.wire.TokenChunk` chunks, text to ``on_text`` and
  each whole chunk (its tokens' log-probabilities with it) to ``on_chunk``; the
  final :class:`~permamesh.wire.GenerateResult`'s text must begin with the released text
  (:meth:`ChunkReassembly.finish`);
- a container job's output: :class:`~permamesh.containers.messages.RunOutput` chunks, bytes
  to ``on_output(stdout, stderr)``; the final
  :class:`~permamesh.containers.messages.RunResult`'s stdout and stderr must each begin with
  the bytes released (:meth:`ChunkReassembly.finish_output`).

Who calls it: :class:`~permamesh.overlay.inflight.InFlight` (one per request).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from permamesh.containers.messages import RunOutput
from permamesh.overlay.envelope import ChunkClove, chunk_message_id
from permamesh.overlay.errors import OverlayError
from permamesh.overlay.sida import Rebuilder
from permamesh.overlay.stream import Piece
from permamesh.wire import TokenChunk, WireError, decode

log = logging.getLogger(__name__)

__all__ = ["ChunkReassembly"]

OnOutput = Callable[[bytes, bytes], None]  # (stdout piece, stderr piece), one of them maybe empty


class ChunkReassembly:
    """The client's side of one streamed answer to request ``message_id`` from the entry
    worker whose signing key is ``signer``; ``kind`` is TokenChunk (a model's answer, text to
    ``on_text``, each chunk to ``on_chunk``) or RunOutput (a container's output, bytes to
    ``on_output``). ``on_chunk`` gets the chunks only: what the final answer holds beyond
    them goes to ``on_text`` alone (its caller has the answer itself)."""

    def __init__(self, message_id: bytes, signer: bytes, on_text: Callable[[str], None] | None = None,
                 on_output: OnOutput | None = None, kind: type = TokenChunk,
                 on_chunk: Callable[[TokenChunk], None] | None = None) -> None:
        if kind not in (TokenChunk, RunOutput):
            raise OverlayError(f"no stream of {kind.__name__}")
        self.mid, self.signer, self.kind = message_id, signer, kind
        self.on_text, self.on_output, self.on_chunk = on_text, on_output, on_chunk
        self._rebuilder = Rebuilder()
        self._ready: dict[int, Piece] = {}  # chunks rebuilt, not yet released
        self.next_seq = 0  # the next chunk to release
        self.released: list[str] = []  # text released (a model's answer)
        self.stdout, self.stderr = bytearray(), bytearray()  # output released (a container's)
        self._first_clove: dict[int, float] = {}  # chunk not yet rebuilt -> when its first clove came
        self._rebuilt: set[int] = set()
        self.rebuilt = 0  # chunks rebuilt (released or waiting)
        self.highest = -1  # the highest chunk number rebuilt
        self.dropped = 0  # chunk cloves refused

    @property
    def text(self) -> str:
        return "".join(self.released)

    def amount(self) -> str:
        """What was released, in words (for errors)."""
        if self.kind is TokenChunk:
            return f"{len(self.text)} characters"
        return f"{len(self.stdout)} bytes of stdout, {len(self.stderr)} of stderr"

    def add(self, item: ChunkClove) -> bool:
        """Take one chunk clove; True when it completed a chunk (released now or later)."""
        if item.clove.message_id != chunk_message_id(self.mid, item.seq) or item.seq < self.next_seq:
            self.dropped += 1
            return False
        if item.seq in self._rebuilt:
            return False
        self._first_clove.setdefault(item.seq, time.monotonic())
        frame = self._rebuilder.add(item.clove)
        if frame is None:
            return False
        try:
            received = decode(frame)
        except WireError as exc:
            self.dropped += 1
            log.info("chunk %d is not a valid frame: %s", item.seq, exc)
            return False
        if received.sender != self.signer or not isinstance(received.msg, self.kind):
            self.dropped += 1
            log.info("chunk %d is not a %s signed by the entry worker", item.seq, self.kind.TAG)
            return False
        self.rebuilt += 1
        self._rebuilt.add(item.seq)
        self._first_clove.pop(item.seq, None)
        self.highest = max(self.highest, item.seq)
        self._ready[item.seq] = received.msg
        while self.next_seq in self._ready:
            self._release(self._ready.pop(self.next_seq))
            self.next_seq += 1
        return True

    def stalled_since(self) -> float | None:
        """When the first clove of the oldest chunk still short of k cloves came (None if
        none is): the cloves of one chunk travel together, so a chunk short for long lost
        some on a dead path."""
        return min(self._first_clove.values(), default=None)

    def finish(self, text: str) -> None:
        """The final answer's ``text`` came: release what the chunks did not carry. Raises
        :class:`OverlayError` if it does not begin with the text already released."""
        done = self.text
        if not text.startswith(done):
            raise OverlayError(f"the answer contradicts its streamed chunks after {len(done)} characters")
        self._end()
        self._release_text(text[len(done):])

    def finish_output(self, stdout: bytes, stderr: bytes) -> None:
        """A container job's final output came: release what the chunks did not carry. Raises
        :class:`OverlayError` if either stream does not begin with the bytes already released."""
        for name, final, done in (("stdout", stdout, self.stdout), ("stderr", stderr, self.stderr)):
            if not final.startswith(done):
                raise OverlayError(f"the result's {name} contradicts its streamed chunks after {len(done)} bytes")
        self._end()
        self._release_output(stdout[len(self.stdout):], stderr[len(self.stderr):])

    def _end(self) -> None:
        self._ready.clear()
        self._first_clove.clear()

    def _release(self, piece: Piece) -> None:
        if isinstance(piece, TokenChunk):
            self._release_text(piece.text)
            if self.on_chunk is not None:
                self.on_chunk(piece)
        else:
            self._release_output(piece.stdout, piece.stderr)

    def _release_text(self, text: str) -> None:
        if text:
            self.released.append(text)
            if self.on_text is not None:
                self.on_text(text)

    def _release_output(self, stdout: bytes, stderr: bytes) -> None:
        if stdout or stderr:
            self.stdout += stdout
            self.stderr += stderr
            if self.on_output is not None:
                self.on_output(stdout, stderr)

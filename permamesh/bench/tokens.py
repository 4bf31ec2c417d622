"""The simulator's stand-in tokenizer: fast, deterministic token ids for trace requests.

:func:`chat_text` renders a :class:`~permamesh.bench.traces.TraceRequest` as the model sees it
(ChatML messages and the assistant's turn opening, a raw prompt as is), so a conversation's
earlier turns are a prefix of its later ones. :func:`tokenize_text` hashes words, punctuation,
newlines and ChatML markers to ids (about 1.3 tokens per English word), and
:func:`word_tokenizer` gives the ids of a request's :func:`chat_text`, cached per message and
per paragraph. Not any model's vocabulary: :func:`permamesh.bench.sim.simulate` takes a real
tokenizer instead when given one.
"""

from __future__ import annotations

import functools
import itertools
import re
from hashlib import blake2b

from permamesh.bench.traces import TraceRequest

_PIECE = re.compile(r"<\|im_(?:start|end)\|>|\w+|[^\w\s]|\n")


class _Vocabulary(dict[str, tuple[int, ...]]):
    """Piece -> token ids, filled on first sight: BLAKE2b of the piece, two tokens (its halves)
    for a piece of more than 6 characters."""

    def __missing__(self, piece: str) -> tuple[int, ...]:
        half = len(piece) // 2
        parts = [piece] if len(piece) <= 6 else [piece[:half], piece[half:]]
        digests = (blake2b(p.encode(), digest_size=4, person=b"pm/words").digest() for p in parts)
        ids = tuple(int.from_bytes(d, "little") for d in digests)
        self[piece] = ids
        return ids


_VOCABULARY = _Vocabulary()


@functools.lru_cache(maxsize=1 << 16)
def _paragraph_ids(paragraph: str) -> tuple[int, ...]:
    pieces = _PIECE.findall(paragraph)
    return tuple(itertools.chain.from_iterable(map(_VOCABULARY.__getitem__, pieces)))


def tokenize_text(text: str) -> list[int]:
    """Token ids of ``text``: words, punctuation, newlines and ChatML markers hashed to ids,
    words of more than 6 characters as two tokens (about 1.3 tokens per English word)."""
    ids: list[int] = []
    newline = _paragraph_ids("\n")
    for index, paragraph in enumerate(text.split("\n\n")):  # shared paragraphs hit the cache
        if index:
            ids += newline + newline
        ids += _paragraph_ids(paragraph)
    return ids


def chat_text(request: TraceRequest) -> str:
    """The request as the model sees it: ChatML messages and the assistant's turn opening
    (a raw prompt as is), so a conversation's earlier turns are a prefix of its later ones."""
    if request.prompt is not None:
        return request.prompt
    turns = (f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in request.messages)
    return "".join(turns) + "<|im_start|>assistant\n"


@functools.lru_cache(maxsize=1 << 16)
def _message_ids(role: str, content: str) -> tuple[int, ...]:
    return tuple(tokenize_text(f"<|im_start|>{role}\n{content}<|im_end|>\n"))


def word_tokenizer(request: TraceRequest) -> list[int]:
    """A fast, deterministic stand-in for a real tokenizer: the ids of :func:`chat_text`,
    computed per message (and per paragraph) with caching. Not any model's vocabulary."""
    if request.prompt is not None:
        return tokenize_text(request.prompt)
    ids: list[int] = []
    for role, content in request.messages:
        ids += _message_ids(role, content)
    return ids + tokenize_text("<|im_start|>assistant\n")

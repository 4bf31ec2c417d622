"""Tokenizers behind one small interface the engine uses.

- :class:`HFTokenizer` wraps a transformers tokenizer (SmolLM2, any local model) and uses the
  model's own chat template.
- :class:`ByteTokenizer` is a self-contained byte-level tokenizer for ``tiny-random``: it needs
  no files, so tests and CI never touch a hub.

Who calls it: :class:`permamesh.workers.engine.Engine` turns requests into token ids and
generated ids back into text.
"""

from __future__ import annotations

from typing import Protocol, Sequence

from permamesh.wire.messages import ChatMessage


class Tokenizer(Protocol):
    eos_ids: frozenset[int]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def chat_ids(self, messages: Sequence[ChatMessage]) -> list[int]: ...


class HFTokenizer:
    def __init__(self, tok, extra_eos: Sequence[int] = ()) -> None:
        self._tok = tok
        eos = {i for i in extra_eos if i is not None}
        if tok.eos_token_id is not None:
            eos.add(int(tok.eos_token_id))
        self.eos_ids = frozenset(eos)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def chat_ids(self, messages: Sequence[ChatMessage]) -> list[int]:
        plain = [{"role": m.role, "content": m.content} for m in messages]
        if getattr(self._tok, "chat_template", None):
            text = self._tok.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
            return self.encode(text)
        # A model without a template: plain "role: content" lines, then the assistant turn.
        text = "".join(f"{m['role']}: {m['content']}\n" for m in plain) + "assistant:"
        return self.encode(text)


class ByteTokenizer:
    """Bytes 0-255 are tokens 0-255; specials follow. Chat turns use ChatML-style markers."""

    BOS, EOS, IM_START, IM_END = 256, 257, 258, 259
    VOCAB_SIZE = 260

    def __init__(self) -> None:
        self.eos_ids = frozenset({self.EOS, self.IM_END})

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def chat_ids(self, messages: Sequence[ChatMessage]) -> list[int]:
        ids: list[int] = [self.BOS]
        for m in messages:
            ids += [self.IM_START, *self.encode(f"{m.role}\n{m.content}"), self.IM_END, *self.encode("\n")]
        return ids + [self.IM_START, *self.encode("assistant\n")]

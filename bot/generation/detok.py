"""Incremental detokenization: the text of a reply so far, one token at a time, in O(1) per token.

Decoding the whole reply after every token costs O(n) per token. A fast tokenizer's `DecodeStream`
turns each new id into the text it adds (holding back bytes of a split UTF-8 character); slow
tokenizers use the prefix-window method of text-generation-inference: decode a few ids before the new
one and emit only the growth, never a dangling replacement character.
"""

from __future__ import annotations

from typing import Any


class IncrementalDecoder:
    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self.text = ""
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._stream = None
        if backend is not None:
            try:
                from tokenizers.decoders import DecodeStream

                self._stream = DecodeStream(skip_special_tokens=True)
                self._backend = backend
            except ImportError:  # an old tokenizers release
                self._stream = None
        self._prefix = 0
        self._read = 0

    def add(self, token_id: int) -> str:
        """Feed one generated id; returns the reply's whole text so far."""
        if self._stream is not None:
            chunk = self._stream.step(self._backend, int(token_id))
            if chunk:
                self.text += chunk
            return self.text
        self._ids.append(int(token_id))
        before = self._tokenizer.decode(self._ids[self._prefix : self._read], skip_special_tokens=True)
        after = self._tokenizer.decode(self._ids[self._prefix :], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self._ids)
        return self.text

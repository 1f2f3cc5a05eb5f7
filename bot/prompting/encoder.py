"""Text to token ids with special tokens kept out: the one place user and persona text is tokenized.

`PlainEncoder` tokenizes text as plain text only: a copy of the tokenizer's `tokenizers` pipeline without
its added-token table, so `<|im_end|>`, `</s>` or `[INST]` typed by a user are spelled out in ordinary
tokens and can never become a structural token's id. It also adds no BOS/EOS and no SentencePiece dummy
prefix ("▁"): the renderer concatenates segments, and a prefix space at every segment boundary would put
spaces into the text that the template never wrote.

Structural text (what a template writes around the contents) is tokenized by `StaticEncoder`, which
cuts out the tokenizer's special tokens and takes them by id.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

# SentencePiece byte-fallback pieces (<0x0A>) are registered as added tokens in some tokenizers, but
# they are how plain text spells bytes, not structure.
_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def structural_tokens(tokenizer: Any, extra: Mapping[str, int] | None = None) -> dict[str, int]:
    """Every added or special token of the tokenizer (byte pieces excepted), content -> id."""
    found: dict[str, int] = {}
    for index, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        content = getattr(token, "content", str(token))
        if content and not _BYTE_PIECE.match(content):
            found[content] = int(index)
    for content in getattr(tokenizer, "all_special_tokens", None) or []:
        index = token_id(tokenizer, content)
        if index is not None and not _BYTE_PIECE.match(content):
            found.setdefault(content, index)
    found.update(extra or {})
    return found


def _drop_prepend(normalizer: dict[str, Any] | None) -> dict[str, Any] | None:
    """Llama's legacy normalizer prepends "▁" to every text section; a segment needs none."""
    if normalizer is None:
        return None
    if normalizer.get("type") == "Prepend":
        return None
    if normalizer.get("type") == "Sequence":
        kept = [n for n in (_drop_prepend(n) for n in normalizer.get("normalizers", [])) if n is not None]
        return {**normalizer, "normalizers": kept} if kept else None
    return normalizer


def _no_prefix_space(pre_tokenizer: dict[str, Any] | None) -> None:
    if pre_tokenizer is None:
        return
    kind = pre_tokenizer.get("type")
    if kind == "Metaspace":
        pre_tokenizer["prepend_scheme"] = "never"
        if "add_prefix_space" in pre_tokenizer:
            pre_tokenizer["add_prefix_space"] = False
    elif kind == "ByteLevel":
        pre_tokenizer["add_prefix_space"] = False
    elif kind == "Sequence":
        for inner in pre_tokenizer.get("pretokenizers", []):
            _no_prefix_space(inner)


def token_id(tokenizer: Any, token: str) -> int | None:
    """The id of `token` as one token of the vocabulary, or None (never an <unk> stand-in)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        found = backend.token_to_id(token)
        return None if found is None else int(found)
    vocab = tokenizer.get_vocab()
    return int(vocab[token]) if token in vocab else None


def _components(normalizer: Any, pre_tokenizer: Any) -> tuple[Any, Any]:
    """Rebuilt copies of a normalizer and pre-tokenizer: no prepended "▁", no prefix space.

    Only these small parts go through JSON; the model (vocabulary, merges) is shared, not copied.
    """
    from tokenizers import Tokenizer

    def state(component: Any) -> Any:
        return None if component is None else json.loads(component.__getstate__())

    pre = state(pre_tokenizer)
    _no_prefix_space(pre)
    shell = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": _drop_prepend(state(normalizer)),
        "pre_tokenizer": pre,
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": {"<unk>": 0}, "unk_token": "<unk>"},
    }
    built = Tokenizer.from_str(json.dumps(shell))
    return built.normalizer, built.pre_tokenizer


class PlainEncoder:
    """Tokenizes text as plain text: never a special or added token, never a BOS, EOS or dummy prefix."""

    def __init__(self, tokenizer: Any, structural: Mapping[str, int]) -> None:
        unk = getattr(tokenizer, "unk_token_id", None)
        # Ids plain text must never produce (unknown characters may still map to <unk>).
        self.forbidden = frozenset(i for i in structural.values() if i != unk)
        self._tokenizer = tokenizer
        self._backend = None
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            from tokenizers import Tokenizer

            # A pipeline with the same model but no added-token table: nothing is matched as special.
            plain = Tokenizer(backend.model)
            normalizer, pre_tokenizer = _components(backend.normalizer, backend.pre_tokenizer)
            if normalizer is not None:
                plain.normalizer = normalizer
            if pre_tokenizer is not None:
                plain.pre_tokenizer = pre_tokenizer
            self._backend = plain

    def _raw(self, text: str) -> list[int]:
        if self._backend is not None:
            return list(self._backend.encode(text, add_special_tokens=False).ids)
        # A tokenizer without a `tokenizers` pipeline: let it skip special-token matching.
        return list(self._tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        ids = self._raw(text)
        if self.forbidden.isdisjoint(ids):
            return ids
        # The model's own vocabulary spells a special token from ordinary pieces (rare): tokenize the
        # halves apart until no piece does.
        if len(text) == 1:
            return [i for i in ids if i not in self.forbidden]
        middle = len(text) // 2
        return self.encode(text[:middle]) + self.encode(text[middle:])


class StaticEncoder:
    """Tokenizes template text: its special tokens by id, the text between them as plain text."""

    def __init__(self, plain: PlainEncoder, structural: Mapping[str, int]) -> None:
        self.plain = plain
        self.structural = dict(structural)
        names = sorted(self.structural, key=len, reverse=True)
        self._pattern = re.compile("|".join(re.escape(n) for n in names)) if names else None
        self._memo: dict[str, tuple[int, ...]] = {}

    def encode(self, text: str) -> tuple[int, ...]:
        cached = self._memo.get(text)
        if cached is not None:
            return cached
        ids: list[int] = []
        position = 0
        if self._pattern is not None:
            for match in self._pattern.finditer(text):
                ids += self.plain.encode(text[position : match.start()])
                ids.append(self.structural[match.group()])
                position = match.end()
        ids += self.plain.encode(text[position:])
        result = tuple(ids)
        if len(self._memo) < 4096:  # template text is a handful of distinct strings
            self._memo[text] = result
        return result

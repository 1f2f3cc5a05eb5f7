"""A model folder's tokenizer without torch: what a worker on a remote backend needs to render prompts.

`transformers.AutoTokenizer` imports torch and the model registry to pick a class. The class named in
`tokenizer_config.json` (`tokenizer_class`) is looked up on the `transformers` package instead, which
loads only that tokenizer's module; a name transformers does not have (or none) falls back to
`TokenizersBackend`, the plain `tokenizer.json` tokenizer AutoTokenizer also falls back to.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bot.errors import ModelError


def load_tokenizer_only(folder: Path) -> Any:
    """The tokenizer of a Hugging Face model folder, loaded without torch or any model code."""
    import transformers
    from transformers import PreTrainedTokenizerBase, TokenizersBackend

    config_path = folder / "tokenizer_config.json"
    if not (folder / "tokenizer.json").is_file():
        raise ModelError(
            f"{folder}: no tokenizer.json; a worker on a remote generation backend needs the model's "
            "fast tokenizer files (tokenizer.json, tokenizer_config.json)"
        )
    name = ""
    if config_path.is_file():
        try:
            name = str(json.loads(config_path.read_text(encoding="utf-8")).get("tokenizer_class") or "")
        except (OSError, ValueError) as exc:
            raise ModelError(f"{config_path}: cannot read: {exc}") from None
    cls = getattr(transformers, name, None) if name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedTokenizerBase)):
        cls = TokenizersBackend
    return cls.from_pretrained(folder, local_files_only=True)

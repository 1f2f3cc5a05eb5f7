"""The chat templates personabot knows: the model's own, `llama2` (the tutorial's) and `chatml`.

Built-in templates are Jinja like a model's own, so all three go through one analysis
(`bot.prompting.layout`) and one renderer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from bot.prompting.errors import PromptError

# The tutorial's format, exactly: `<s>[INST] {user} [/INST] {assistant}</s>` per exchange, the system
# prompt inside the first instruction the way Llama-2-chat expects it. Contents are not stripped.
LLAMA2 = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set rest = messages[1:] -%}"
    "{%- else -%}{%- set system = none -%}{%- set rest = messages -%}{%- endif -%}"
    "{%- for message in rest -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if loop.first and system is not none -%}"
    "{{ '<s>[INST] <<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else -%}{{ '<s>[INST] ' + message['content'] + ' [/INST]' }}{%- endif -%}"
    "{%- elif message['role'] == 'assistant' -%}{{ ' ' + message['content'] + '</s>' }}"
    "{%- else -%}{{ raise_exception('llama2 takes a system prompt only at the start') }}{%- endif -%}"
    "{%- endfor -%}"
)

CHATML = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


@dataclass(frozen=True)
class TemplateSource:
    name: str
    jinja: str
    required_tokens: tuple[str, ...]  # structural tokens that must be single tokens of the vocabulary


BUILTIN: dict[str, TemplateSource] = {
    "llama2": TemplateSource("llama2", LLAMA2, ("<s>", "</s>")),
    "chatml": TemplateSource("chatml", CHATML, ("<|im_start|>", "<|im_end|>")),
}
TEMPLATE_NAMES: tuple[str, ...] = ("model", *BUILTIN)

# Strings that look like special tokens: `<|im_start|>`, `<s>`, `</s>`, `<eos>`, `<start_of_turn>`.
_TOKEN_LIKE = re.compile(r"<\|[^<>|\s]{1,64}\|>|</?s>|</?(?:bos|eos)>|<(?:start|end)_of_turn>")


def model_template(tokenizer: Any) -> str:
    """The tokenizer's own Jinja chat template (the default one where it has several)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        raise PromptError(
            "template 'model': the model's tokenizer has no chat template; "
            'set template = "chatml" or "llama2" in persona.toml'
        )
    return str(template)


def resolve(name: str, tokenizer: Any) -> TemplateSource:
    """The template named `name`; `PromptError` naming the choices for an unknown one."""
    if name == "model":
        return TemplateSource("model", model_template(tokenizer), ())
    if name not in BUILTIN:
        raise PromptError(f"unknown chat template {name!r}; choose one of: {', '.join(TEMPLATE_NAMES)}")
    return BUILTIN[name]


def check_required(source: TemplateSource, tokenizer: Any, what: str) -> dict[str, int]:
    """Ids of the template's required structural tokens; `PromptError` for one the vocabulary lacks."""
    from bot.prompting.encoder import token_id

    ids: dict[str, int] = {}
    for token in source.required_tokens:
        index = token_id(tokenizer, token)
        if index is None:
            raise PromptError(
                f"template {source.name!r} needs the token {token!r}, which the tokenizer of {what} "
                "does not have; choose a template this model was trained with (e.g. 'model')"
            )
        ids[token] = index
    return ids


def check_static_text(source: TemplateSource, static_texts: list[str], structural: dict[str, int]) -> None:
    """A template writing a token-like string the vocabulary lacks would have it spelled out silently."""
    for text in static_texts:
        for match in _TOKEN_LIKE.finditer(text):
            if match.group() not in structural:
                raise PromptError(
                    f"template {source.name!r} writes {match.group()!r}, which is not a token of this "
                    "tokenizer; it would be split into characters. Choose another template"
                )

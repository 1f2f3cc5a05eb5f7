"""Tiny models and tokenizers built inside the tests: no downloads, a few milliseconds to make.

- `byte_level_tokenizer()`: a byte-level BPE (GPT-2 / SmolLM style) with ChatML special tokens and
  SmolLM2's chat template.
- `sentencepiece_tokenizer()`: a Metaspace BPE (Llama-2 / SentencePiece style) with `<s>`, `</s>`,
  `<unk>` and Llama-2's chat template.
- `tiny_llama(tokenizer)`: a randomly initialised 2-layer Llama sized to the tokenizer.
- `save_tiny_model(folder)`: both, saved as a model folder `model.path` can point at.
- `with_special_tokens(tokenizer, *tokens)`: a tokenizer with extra special tokens added.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

CORPUS = [
    "What's the capital of Germany? The capital of Germany is Berlin.",
    "What about France? The capital of France is Paris.",
    "What's the best way to get from San Jose to San Francisco? Caltrain is a great option.",
    "I want to optimize for speed. In that case, driving outside of peak traffic hours is fastest.",
    "Arr matey, ye be sailing the seven seas! Aye, the captain says ahoy.",
    "Soft rain on the roof / the kettle begins to sing / morning finds its voice",
    "hello world, the quick brown fox jumps over the lazy dog 0123456789",
    "Python functions, loops, lists and dictionaries make programs readable.",
    "[INST] <<SYS>> system prompt <</SYS>> [/INST] user assistant: you are helpful",
    "émoji 😀 unicode — ñ ü ß 中文 日本語 العربية",
] * 4

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)


@cache
def _byte_level_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok.to_str()


@cache
def _sentencepiece_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="first")]
    )
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", *byte_tokens],
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok.to_str()


def byte_level_tokenizer(vocab_size: int = 600) -> Any:
    """A SmolLM-like tokenizer: byte-level BPE, ChatML special tokens and chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_byte_level_json(vocab_size)),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
        chat_template=CHATML_TEMPLATE,
    )


def sentencepiece_tokenizer(vocab_size: int = 700) -> Any:
    """A Llama-2-like tokenizer: metaspace BPE with byte fallback, `<s>`/`</s>`, Llama-2 chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_sentencepiece_json(vocab_size)),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
        chat_template=LLAMA2_TEMPLATE,
    )


def tiny_llama(
    tokenizer: Any, *, seed: int = 0, hidden: int = 64, layers: int = 2, context: int = 1024
) -> Any:
    """A random 2-layer Llama whose vocabulary matches `tokenizer`, in float32 on the CPU."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval()


def save_tiny_model(folder: Path, *, tokenizer: Any | None = None, seed: int = 0) -> Path:
    """A loadable model folder (config, safetensors weights, tokenizer) for CLI and backend tests."""
    tokenizer = tokenizer or byte_level_tokenizer()
    model = tiny_llama(tokenizer, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def with_special_tokens(tokenizer: Any, *tokens: str) -> Any:
    """`tokenizer` with `tokens` added as special tokens (e.g. `<s>` on the byte-level one, for llama2)."""
    from tokenizers import AddedToken

    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
    return tokenizer

"""oneDNN-packed linear layers: the same outputs as `F.linear`, the same greedy replies, no extra memory."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from bot.generation.base import GenerationRequest
from bot.generation.engine import BatchEngine
from bot.generation.lora import MultiLora
from bot.generation.packed import PackedLinear, can_pack, pack_linears
from personas.spec import Sampling
from tests.test_generation_lora import make_lora_folder
from tests.tiny import byte_level_tokenizer, tiny_llama

pytestmark = [
    pytest.mark.skipif(
        not can_pack(torch.nn.Linear(2, 2)), reason="this PyTorch has no oneDNN linear (not x86)"
    ),
    pytest.mark.usefixtures("one_torch_thread"),
]


def test_packed_linear_matches_f_linear() -> None:
    torch.manual_seed(0)
    for bias in (True, False):
        linear = torch.nn.Linear(48, 80, bias=bias)
        packed = PackedLinear(linear, batch_hint=16, keep_weight=False)
        assert packed.weight is None and packed.in_features == 48 and packed.out_features == 80
        for shape in [(1, 48), (16, 48), (5, 7, 48), (16, 1, 48)]:
            x = torch.randn(*shape)
            with torch.inference_mode():
                torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)


def test_packing_a_model_keeps_its_replies_and_its_memory(tmp_path: Path) -> None:
    tok = byte_level_tokenizer()
    base = tiny_llama(tok)
    folder = make_lora_folder(base, tmp_path / "a", seed=3)
    dense_bytes = sum(p.nbytes for p in base.parameters())
    engines = []
    for pack in (False, True):
        model = copy.deepcopy(base)
        if pack:
            assert pack_linears(model) == 2 * 7 + 1  # 7 projections per layer and the output layer
            # The packed copies replace the dense weights; the tied output layer keeps the embedding's.
            assert model.lm_head.weight is model.model.embed_tokens.weight
            assert model.model.layers[0].mlp.up_proj.weight is None
            packed_bytes = sum(p.nbytes for p in model.parameters())
            assert packed_bytes < dense_bytes
        lora = MultiLora(model)
        lora.load("a", folder)
        engines.append(BatchEngine(model, tok, lora=lora))
    greedy = Sampling(temperature=0.0, repetition_penalty=1.0, max_new_tokens=12)
    prompts = [tok(t)["input_ids"] for t in ("hello world", "Arr matey, ye be", "What's the capital")]
    reqs = [
        GenerationRequest(p, greedy, (), adapter=a) for p, a in zip(prompts, ["a", None, "a"], strict=True)
    ]
    plain, packed = ([r.token_ids for r in e.generate(reqs)] for e in engines)
    assert plain == packed


def test_only_float32_cpu_models_are_packed() -> None:
    model: Any = tiny_llama(byte_level_tokenizer()).to(torch.bfloat16)
    assert not can_pack(model)
    assert pack_linears(model) == 0

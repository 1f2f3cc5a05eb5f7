"""int8 / float16 base weights for CPU serving: close to float32, LoRAs on top, clear config errors."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from bot.basemodel import ModelLocation
from bot.config import load_settings
from bot.errors import ConfigError
from bot.generation.base import GenerationCallbacks, GenerationRequest
from bot.generation.lora import MultiLora
from bot.generation.quantized import QuantizedLinear, check_weight_format, quantize_linears
from personas.spec import Sampling
from tests.test_generation_lora import make_lora_folder
from tests.tiny import byte_level_tokenizer, save_tiny_model, tiny_llama

pytestmark = [
    pytest.mark.skipif(
        "fbgemm" not in torch.backends.quantized.supported_engines, reason="no fbgemm (not x86)"
    ),
    pytest.mark.usefixtures("one_torch_thread"),
]
# Output error relative to the output's scale: int8 weights and 7-bit activations, float16 weights.
TOLERANCE = {"int8": 0.05, "float16": 2e-3}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("fmt", ["int8", "float16"])
def test_quantized_linear_matches_float(fmt: Any) -> None:
    torch.manual_seed(0)
    for bias in (True, False):
        linear = torch.nn.Linear(96, 80, bias=bias)
        layer = QuantizedLinear(linear, fmt, keep_weight=False)
        assert layer.weight is None and layer.in_features == 96 and layer.out_features == 80
        for shape in [(1, 96), (16, 96), (5, 7, 96)]:
            x = torch.randn(*shape)
            with torch.inference_mode():
                got, want = layer(x), linear(x)
            assert got.shape == want.shape and got.dtype == torch.float32
            assert relative_error(got, want) < TOLERANCE[fmt]
            assert got.sub(want).abs().max() > 0  # the weights really are smaller


def logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits[0]


@pytest.mark.parametrize("fmt", ["int8", "float16"])
def test_lora_on_quantized_weights_changes_outputs_as_on_float(fmt: Any, tmp_path: Path) -> None:
    tok = byte_level_tokenizer()
    base = tiny_llama(tok)
    folder = make_lora_folder(base, tmp_path / "a", seed=3)
    ids = torch.tensor([tok.encode("hello world, the quick brown fox")])
    deltas, outputs = {}, {}
    for label in ("float", fmt):
        model = copy.deepcopy(base)
        if label != "float":
            # 7 projections per layer and the output layer; the tied embedding keeps its table.
            assert quantize_linears(model, fmt) == 2 * 7 + 1
            assert model.lm_head.weight is model.model.embed_tokens.weight
            assert model.model.layers[0].mlp.up_proj.weight is None
        lora = MultiLora(model)
        lora.load("a", folder)
        plain = logits(model, ids)
        lora.activate(["a"])
        adapted = logits(model, ids)
        lora.deactivate()
        deltas[label], outputs[label] = adapted - plain, adapted
    assert deltas["float"].abs().max() > 0.1  # the adapter matters
    assert relative_error(deltas[fmt], deltas["float"]) < 4 * TOLERANCE[fmt]
    assert relative_error(outputs[fmt], outputs["float"]) < 2 * TOLERANCE[fmt]


def test_bad_weights_value_names_the_field(tmp_path: Path) -> None:
    config = tmp_path / "personabot.toml"
    config.write_text('[model]\nweights = "int3"\n')
    with pytest.raises(ConfigError, match=r"personabot\.toml: model\.weights: "):
        load_settings(config)


def test_quantized_weights_need_a_float32_model_on_the_cpu() -> None:
    check_weight_format("auto", torch.device("cuda"), torch.bfloat16)  # unchanged behaviour
    check_weight_format("int8", torch.device("cpu"), torch.float32)
    with pytest.raises(ConfigError, match=r"model\.weights = 'int8' is for CPU serving.*cuda"):
        check_weight_format("int8", torch.device("cuda"), torch.float32)
    with pytest.raises(ConfigError, match=r"model\.weights = 'float16'.*bfloat16"):
        check_weight_format("float16", torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ConfigError, match=r"model\.weights: 'int4' is not one of"):
        check_weight_format("int4", torch.device("cpu"), torch.float32)


def test_local_backend_serves_int8_weights_with_a_lora(tmp_path: Path) -> None:
    from bot.generation.local import LocalBackend

    save_tiny_model(tmp_path / "model")
    backend = LocalBackend(ModelLocation(tmp_path / "model"), "cpu", weights="int8")
    assert backend.packed_layers == 2 * 7 + 1
    assert isinstance(backend.model.model.layers[0].self_attn.q_proj, QuantizedLinear)
    folder = make_lora_folder(tiny_llama(byte_level_tokenizer()), tmp_path / "lora", seed=1)
    backend.load_adapter("p", folder)
    wrapped = backend.model.model.layers[0].self_attn.q_proj
    assert isinstance(wrapped.base, QuantizedLinear)
    greedy = Sampling(temperature=0.0, repetition_penalty=1.0, max_new_tokens=6)
    prompt = byte_level_tokenizer().encode("hello world")
    results = backend.generate_batch(
        [GenerationRequest(prompt, greedy, (), adapter=a) for a in (None, "p")], GenerationCallbacks()
    )
    assert all(len(r.token_ids) == 6 for r in results)


MODEL = os.environ.get("PERSONABOT_TEST_MODEL_PATH")


@pytest.mark.skipif(not MODEL, reason="set PERSONABOT_TEST_MODEL_PATH to a SmolLM2-135M-Instruct folder")
def test_real_model_int8_greedy_reply_is_sane() -> None:
    from bot.generation.local import LocalBackend
    from bot.prompting import ChatRenderer, Turn

    assert MODEL is not None
    torch.set_num_threads(2)
    location = ModelLocation(Path(MODEL))
    greedy = Sampling(temperature=0.0, repetition_penalty=1.0, max_new_tokens=12)
    replies = {}
    fmt = "int8"
    for weights in ("auto", fmt):
        backend = LocalBackend(location, "cpu", weights=weights)
        renderer = ChatRenderer(backend.tokenizer, "model")
        prompt = renderer.render_prompt(
            [Turn("user", "What is the capital of France?")], system=None, max_prompt_tokens=256
        ).input_ids
        request = GenerationRequest(prompt, greedy, tuple(renderer.end_of_turn_ids))
        replies[weights] = backend.generate_batch([request], GenerationCallbacks())[0]
    assert "Paris" in replies[fmt].text
    # The first tokens agree with float32's (greedy, no sampling noise).
    assert replies[fmt].token_ids[:4] == replies["auto"].token_ids[:4]

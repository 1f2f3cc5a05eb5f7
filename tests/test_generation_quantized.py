"""int8 / int4 / float16 base weights for CPU serving: close to float32, LoRAs on top, clear config errors."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from bot.basemodel import ModelLocation
from bot.config import load_settings
from bot.errors import ConfigError
from bot.generation import quantized
from bot.generation.base import GenerationCallbacks, GenerationRequest
from bot.generation.kvcache import BatchKV
from bot.generation.leanforward import LeanLlamaForward
from bot.generation.lora import MultiLora
from bot.generation.quantized import (
    QuantizedLinear,
    QuantizedSlice,
    check_weight_format,
    quantize_linears,
    weight_only_kernels,
)
from personas.spec import Sampling
from tests.real_model import smollm2
from tests.test_generation_lora import make_lora_folder
from tests.tiny import byte_level_tokenizer, save_tiny_model, tiny_llama

pytestmark = [
    pytest.mark.skipif(
        "fbgemm" not in torch.backends.quantized.supported_engines, reason="no fbgemm (not x86)"
    ),
    pytest.mark.usefixtures("one_torch_thread"),
]
# Output error relative to the output's scale: int8 weights (with 7-bit or bfloat16 activations),
# int4 weights in groups of 32, float16 weights.
TOLERANCE = {"int8": 0.05, "int4": 0.12, "float16": 2e-3}
needs_avx512 = pytest.mark.skipif(
    not weight_only_kernels(), reason="torch's weight-only kernels need AVX-512"
)
FORMATS = ["int8", pytest.param("int4", marks=needs_avx512), "float16"]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("fmt", FORMATS)
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


@pytest.mark.parametrize("fmt", FORMATS)
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
            # On the weight-only kernels the output layer is float16, its best candidates rescored.
            rescored = fmt == "int4" or (fmt == "int8" and weight_only_kernels())
            assert model.lm_head.fmt == ("float16" if rescored else fmt)
            assert (model.lm_head.table is not None) == rescored
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


@pytest.mark.parametrize("fmt", FORMATS)
def test_siblings_quantized_together_give_the_same_logits_as_apart(fmt: Any, tmp_path: Path) -> None:
    """q/k/v and gate/up quantized as one matrix each (the lean forward then calls 4 products a layer,
    not 7) give the logits of each quantized apart: a 2-row prefill with two adapters, then one-row
    decode steps with an adapter on some projections only."""
    tok = byte_level_tokenizer()
    base = tiny_llama(tok, layers=2)
    folders = {
        "pirate": make_lora_folder(base, tmp_path / "pirate", seed=3),
        "poet": make_lora_folder(base, tmp_path / "poet", seed=4, targets=["q_proj", "v_proj", "up_proj"]),
    }
    prompts = [tok(text)["input_ids"] for text in ("hello world, hello", "soft rain on the roof")]
    ids = torch.tensor([p[: min(map(len, prompts))] for p in prompts])
    runs = []
    for fuse in (True, False):
        model = copy.deepcopy(base)
        quantize_linears(model, fmt, fuse_siblings=fuse)
        lora = MultiLora(model)
        for name, folder in folders.items():
            lora.load(name, folder)
        forward = LeanLlamaForward(model)
        assert (forward.fused is not None) == fuse
        cache = BatchKV(2, ids.shape[1] + 3, device=torch.device("cpu"), dtype=torch.float32)
        with torch.inference_mode():
            lora.activate(["pirate", "poet"])
            logits = [forward(cache, ids, torch.arange(ids.shape[1]).expand(2, -1), None)]
            cache.keep_rows(torch.tensor([1]))
            lora.keep_rows(torch.tensor([1]))
            cache.start = ids.shape[1]
            for token in (5, 17, 99):
                logits.append(forward(cache, torch.tensor([[token]]), torch.tensor([[cache.start]]), None))
                cache.start += 1
        runs.append(torch.cat(logits))
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=1e-5)


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
    with pytest.raises(ConfigError, match=r"model\.weights: 'int3' is not one of auto, float16, int8, int4"):
        check_weight_format("int3", torch.device("cpu"), torch.float32)


def test_int4_needs_avx512_and_int8_falls_back_to_fbgemm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without AVX-512 int4 is refused at start, and int8 uses fbgemm's dynamic kernel instead."""
    monkeypatch.setattr(quantized, "weight_only_kernels", lambda: False)
    with pytest.raises(ConfigError, match=r"model\.weights = 'int4' needs a CPU with AVX-512"):
        check_weight_format("int4", torch.device("cpu"), torch.float32)
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    layer = QuantizedLinear(linear, "int8", keep_weight=False)
    assert layer.kernel == "fbgemm-dynamic"
    x = torch.randn(3, 64)
    with torch.inference_mode():
        assert relative_error(layer(x), linear(x)) < TOLERANCE["int8"]


@needs_avx512
def test_weight_only_kernels_hold_a_q4_1_grid_exactly_and_rows_do_not_interact() -> None:
    """Weights on GGUF Q4_1's grid (a scale and a minimum per 32 inputs) come back exactly from int4;
    int8 and int4 rows are computed alone (no activation scale shared across the batch)."""
    torch.manual_seed(0)
    out_features, in_features = 48, 96
    q = torch.randint(0, 16, (out_features, in_features // 32, 32)).float()
    q[..., 0], q[..., 1] = 0, 15  # every group spans the whole grid, so its step is re-derived exactly
    step = 2.0 ** torch.randint(-9, -5, (out_features, in_features // 32, 1)).float()
    low = -step * torch.randint(0, 16, (out_features, in_features // 32, 1)).float()
    weight = (q * step + low).reshape(out_features, in_features)
    linear = torch.nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    layer = QuantizedLinear(linear, "int4", keep_weight=False)
    assert layer.kernel == "weight-only"
    with torch.inference_mode():
        assert torch.equal(layer(torch.eye(in_features)), weight.t())  # every weight, read back exactly
    for fmt in ("int8", "int4"):
        layer = QuantizedLinear(torch.nn.Linear(in_features, out_features), fmt, keep_weight=False)
        rows = torch.randn(6, in_features)
        rows[5] *= 1000  # a batch mate with large activations changes nothing for the others
        with torch.inference_mode():
            together = layer(rows)
            alone = torch.cat([layer(row[None]) for row in rows])
        assert torch.equal(together, alone), fmt


@pytest.mark.parametrize("fmt", [pytest.param("int8", marks=needs_avx512), "float16"])
@pytest.mark.parametrize("bias", [False, True])
def test_output_layer_rescoring_gives_the_best_candidates_float32_logits(fmt: Any, bias: bool) -> None:
    """A rounded output table cannot tell close logits apart; the head recomputes each row's best
    candidates from the float32 table, so the top logits (and the argmax) are float32's."""
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 500, bias=bias)
    with torch.no_grad():
        head.weight.mul_(40)  # logits in the tens, where bfloat16's step is 0.125
    rows = torch.randn(8, 64)
    want = head(rows).detach()
    plain = QuantizedLinear(head, fmt, keep_weight=True)
    rescored = QuantizedLinear(head, fmt, keep_weight=True, rescore=True)
    with torch.inference_mode():
        got, rough = rescored(rows), plain(rows)
    assert rescored.table is not None and plain.table is None
    top = want.topk(quantized.RESCORE_TOP // 2, dim=-1)
    torch.testing.assert_close(got.gather(-1, top.indices), top.values, rtol=1e-5, atol=1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert (rough.gather(-1, top.indices) - top.values).abs().max() > 1e-4  # without it, rounding shows


def test_local_backend_serves_int8_weights_with_a_lora(tmp_path: Path) -> None:
    from bot.generation.local import LocalBackend

    save_tiny_model(tmp_path / "model")
    backend = LocalBackend(ModelLocation(tmp_path / "model"), "cpu", weights="int8")
    assert backend.packed_layers == 2 * 7 + 1
    q_proj = backend.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, QuantizedSlice) and isinstance(q_proj.shared, QuantizedLinear)
    lean = backend.engine._lean
    assert lean is not None and lean.fused is not None and lean.fused_any_rows
    folder = make_lora_folder(tiny_llama(byte_level_tokenizer()), tmp_path / "lora", seed=1)
    backend.load_adapter("p", folder)
    wrapped = backend.model.model.layers[0].self_attn.q_proj
    assert wrapped.base is q_proj
    greedy = Sampling(temperature=0.0, repetition_penalty=1.0, max_new_tokens=6)
    prompt = byte_level_tokenizer().encode("hello world")
    results = backend.generate_batch(
        [GenerationRequest(prompt, greedy, (), adapter=a) for a in (None, "p")], GenerationCallbacks()
    )
    assert all(len(r.token_ids) == 6 for r in results)


@pytest.fixture(scope="module")
def real_model() -> Path:
    return smollm2()


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["int8", pytest.param("int4", marks=needs_avx512)])
def test_real_model_quantized_greedy_reply_is_sane(fmt: str, real_model: Path) -> None:
    from bot.generation.local import LocalBackend
    from bot.prompting import ChatRenderer, Turn

    torch.set_num_threads(2)
    location = ModelLocation(real_model)
    greedy = Sampling(temperature=0.0, repetition_penalty=1.0, max_new_tokens=12)
    replies = {}
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

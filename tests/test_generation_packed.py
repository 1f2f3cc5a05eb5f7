"""oneDNN-packed linear layers: the same outputs as `F.linear`, the same greedy replies, no extra memory
(or, for the one-row path, exactly the dense weights' bytes)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from bot.generation.base import GenerationRequest
from bot.generation.engine import BatchEngine
from bot.generation.lora import MultiLora
from bot.generation.packed import (
    ONE_ROW_KERNELS,
    OneRow,
    PackedLinear,
    can_pack,
    one_row_blocks,
    one_row_copy_bytes,
    one_row_rates,
    pack_linears,
)
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


@pytest.mark.parametrize(("kernel", "shape"), [("dense", (96, 48)), ("blocks", (3, 32, 48))])
def test_one_row_products_run_on_the_dense_weight_and_match_f_linear(
    kernel: OneRow, shape: tuple[int, ...]
) -> None:
    torch.manual_seed(0)
    for bias in (True, False):
        linear = torch.nn.Linear(48, 96, bias=bias)
        with patched_threads(3):
            packed = PackedLinear(linear, batch_hint=16, keep_weight=False, one_row=kernel)
        assert packed.one_row == kernel
        # one row in any shape takes the dense weight (a view, no copy); more rows the packed copy
        assert packed.row_weight is not None and packed.row_weight.shape == shape
        assert packed.row_weight.data_ptr() == linear.weight.data_ptr()
        for rows in [(48,), (1, 48), (1, 1, 48), (2, 48), (16, 1, 48)]:
            x = torch.randn(*rows)
            with torch.inference_mode():
                got = packed(x)
            assert got.shape == (*rows[:-1], 96)
            torch.testing.assert_close(got, linear(x), rtol=1e-5, atol=1e-5)
        # a row inside a larger tensor (a storage offset), and one that is not contiguous
        big = torch.randn(3, 5, 48)
        for x in (big[1, 2:3], big.transpose(1, 2)[2, :, 1]):
            with torch.inference_mode():
                torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)


def patched_threads(count: int) -> Any:
    """`os.cpu_count()` as seen by `one_row_blocks`, so the block count does not depend on the machine."""
    from unittest import mock

    return mock.patch("bot.generation.packed.os.cpu_count", return_value=count)


def test_one_row_rates_time_every_kernel_on_the_weights_given() -> None:
    linears = [torch.nn.Linear(64, 96), torch.nn.Linear(96, 64)]
    pairs = [
        (m.weight.detach(), torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), 16)) for m in linears
    ]
    rates = one_row_rates(pairs, passes=2)
    assert set(rates) == set(ONE_ROW_KERNELS)
    assert all(0 < rate < float("inf") for rate in rates.values())


def test_one_row_blocks_give_every_thread_a_block_of_at_least_16_rows() -> None:
    assert one_row_blocks(576, threads=2) == 2
    assert one_row_blocks(576, threads=1) == 2  # one block is the slow matrix-vector path
    assert one_row_blocks(576, threads=5) == 6
    assert one_row_blocks(192, threads=16) == 12  # 16 blocks of 12 rows are too small: the most that fit
    assert one_row_blocks(31, threads=2) == 0  # a prime: no split (that layer takes the dense product)
    assert one_row_blocks(16, threads=2) == 0


def kept_copies(model: Any) -> int:
    """Bytes of dense weights kept for one-row products, apart from the tied embedding's."""
    embedding = model.model.embed_tokens.weight.data_ptr()
    kept = {
        m.row_weight.data_ptr(): m.row_weight.nbytes
        for m in model.modules()
        if isinstance(m, PackedLinear) and m.row_weight is not None
    }
    kept.pop(embedding, None)
    return sum(kept.values())


@pytest.mark.parametrize("one_row", [None, *ONE_ROW_KERNELS])
def test_packing_a_model_keeps_its_replies_and_its_memory(tmp_path: Path, one_row: OneRow | None) -> None:
    tok = byte_level_tokenizer()
    base = tiny_llama(tok)
    folder = make_lora_folder(base, tmp_path / "a", seed=3)
    dense_bytes = sum(p.nbytes for p in base.parameters())
    copies = one_row_copy_bytes(base)
    engines = []
    for pack in (False, True):
        model = copy.deepcopy(base)
        if pack:
            assert pack_linears(model, one_row=one_row) == 2 * 7 + 1  # 7 per layer, the output layer
            # The packed copies replace the dense weights; the tied output layer keeps the embedding's.
            assert model.lm_head.weight is model.model.embed_tokens.weight
            assert model.model.layers[0].mlp.up_proj.weight is None
            packed_bytes = sum(p.nbytes for p in model.parameters())
            assert packed_bytes < dense_bytes
            # The one-row copies are the dense weights kept (as buffers), nothing more; the tied output
            # layer's are the embedding itself.
            layers = model.model.layers[0].mlp.up_proj.one_row
            assert one_row is None or layers == model.lm_head.one_row == one_row
            assert kept_copies(model) == (0 if layers == "packed" else copies)
            if model.lm_head.row_weight is not None:
                assert model.lm_head.row_weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        lora = MultiLora(model)
        lora.load("a", folder)
        engines.append(BatchEngine(model, tok, lora=lora))
    greedy = Sampling(temperature=0.0, repetition_penalty=1.0, max_new_tokens=12)
    prompts = [tok(t)["input_ids"] for t in ("hello world", "Arr matey, ye be", "What's the capital")]
    # Three rows (packed products), and each prompt alone (one-row decode steps)
    batch = [
        GenerationRequest(p, greedy, (), adapter=a) for p, a in zip(prompts, ["a", None, "a"], strict=True)
    ]
    for reqs in (batch, *([r] for r in batch)):
        plain, packed = ([r.token_ids for r in e.generate(reqs)] for e in engines)
        assert plain == packed


def rates_favouring(fastest: OneRow) -> Any:
    """A stand-in for `one_row_rates` that measures `fastest` as the fastest kernel."""
    return lambda _weights: {k: (30.0 if k == fastest else 10.0) for k in ONE_ROW_KERNELS}


@pytest.mark.parametrize("fastest", ONE_ROW_KERNELS)
def test_the_fastest_kernel_measured_is_used(monkeypatch: pytest.MonkeyPatch, fastest: OneRow) -> None:
    monkeypatch.setattr("bot.generation.packed.one_row_rates", rates_favouring(fastest))
    model = tiny_llama(byte_level_tokenizer())
    pack_linears(model)
    assert model.model.layers[0].self_attn.q_proj.one_row == fastest
    assert model.lm_head.one_row == fastest


def test_one_row_copies_are_kept_only_where_they_fit_in_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    base = tiny_llama(byte_level_tokenizer())
    copies = one_row_copy_bytes(base)
    assert copies == sum(m.weight.nbytes for m in base.model.layers.modules() if type(m) is torch.nn.Linear)

    class Memory:
        total = 0

    monkeypatch.setattr("bot.generation.packed.psutil.virtual_memory", lambda: Memory)
    monkeypatch.setattr("bot.generation.packed.one_row_rates", rates_favouring("dense"))
    for total, kept in ((8 * copies, True), (8 * copies - 1, False)):
        Memory.total = total
        model = copy.deepcopy(base)
        pack_linears(model)
        assert model.model.layers[0].mlp.up_proj.one_row == ("dense" if kept else "packed")
        assert kept_copies(model) == (copies if kept else 0)
        assert model.lm_head.one_row == "dense"  # the tied embedding is kept anyway: it costs nothing


def test_only_float32_cpu_models_are_packed() -> None:
    model: Any = tiny_llama(byte_level_tokenizer()).to(torch.bfloat16)
    assert not can_pack(model)
    assert pack_linears(model) == 0


@pytest.mark.slow
@pytest.mark.parametrize("fastest", ONE_ROW_KERNELS)
def test_real_model_one_row_greedy_reply_equals_transformers(
    monkeypatch: pytest.MonkeyPatch, fastest: OneRow
) -> None:
    """SmolLM2 on the worker's CPU path (packed, one-row products on each kernel): the greedy tokens of
    a reply decoded alone are transformers' own, token for token."""
    from transformers import AutoModelForCausalLM

    from bot.basemodel import ModelLocation
    from bot.generation.base import GenerationCallbacks
    from bot.generation.local import LocalBackend
    from bot.prompting import ChatRenderer, Turn
    from tests.real_model import smollm2, transformers_greedy

    folder = smollm2()
    monkeypatch.setattr("bot.generation.packed.one_row_rates", rates_favouring(fastest))
    backend = LocalBackend(ModelLocation(folder), "cpu")
    projection = backend.model.model.layers[0].self_attn.q_proj
    assert isinstance(projection, PackedLinear) and projection.one_row == fastest
    renderer = ChatRenderer(backend.tokenizer, "model")
    prompt = renderer.render_prompt(
        [Turn("user", "Tell me about the Moon.")], system=None, max_prompt_tokens=256
    ).input_ids
    greedy = Sampling(temperature=0.0, repetition_penalty=1.0, max_new_tokens=32)
    got = backend.generate_batch([GenerationRequest(prompt, greedy, ())], GenerationCallbacks())[0]
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    want = transformers_greedy(reference, prompt, 32)
    assert len(got.token_ids) == 32
    assert got.token_ids == want

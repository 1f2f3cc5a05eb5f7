"""The engine's lean Llama forward against transformers' forward: same greedy tokens on every path."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from bot.generation.base import GenerationRequest
from bot.generation.engine import BatchEngine
from bot.generation.kvcache import BatchKV, KVCacheLRU
from bot.generation.leanforward import LeanLlamaForward, unsupported_reason
from bot.generation.lora import MultiLora
from bot.generation.packed import OneRow, pack_linears
from personas.spec import Sampling
from tests.test_generation_lora import make_lora_folder
from tests.tiny import byte_level_tokenizer, tiny_llama

GREEDY = Sampling(temperature=0.0, repetition_penalty=1.0, max_new_tokens=12)
TEXTS = [
    "hello world",
    "What's the capital of Germany? The capital of Germany is Berlin. What about France?",
    "Arr matey, ye be",
    "Soft rain on the roof / the kettle begins to sing",
]


@pytest.fixture(scope="module")
def tok() -> Any:
    return byte_level_tokenizer()


@pytest.fixture(scope="module")
def base(tok: Any) -> Any:
    return tiny_llama(tok, layers=3)


@pytest.fixture(scope="module")
def folders(base: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    return {
        "pirate": make_lora_folder(base, root / "pirate", seed=21),
        "poet": make_lora_folder(base, root / "poet", seed=22, r=8, targets=["q_proj", "v_proj", "up_proj"]),
    }


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def engines(
    base: Any, tok: Any, folders: dict[str, Path], *, pack: bool, one_row: OneRow | None = None, **kw: Any
) -> tuple[BatchEngine, BatchEngine]:
    """A lean engine and a transformers-forward engine on two copies of one model."""
    out = []
    for lean in (True, False):
        model = copy.deepcopy(base)
        if pack:
            pack_linears(model, one_row=one_row)
        lora = MultiLora(model)
        for name, folder in folders.items():
            lora.load(name, folder)
        out.append(BatchEngine(model, tok, lora=lora, lean=lean, **kw))
    assert out[0]._lean is not None and out[1]._lean is None
    return out[0], out[1]


def greedy(engine: BatchEngine, requests: list[GenerationRequest]) -> list[list[int]]:
    return [r.token_ids for r in engine.generate(requests)]


def req(tok: Any, text: str, adapter: str | None = None, **kw: Any) -> GenerationRequest:
    return GenerationRequest(tok(text)["input_ids"], GREEDY, (), adapter=adapter, loop_guard=False, **kw)


@pytest.mark.parametrize("one_row", [None, "packed", "dense", "blocks"], ids=lambda k: k or "plain")
def test_lean_forward_gives_the_same_greedy_tokens(
    base: Any, tok: Any, folders: dict[str, Path], one_row: OneRow | None
) -> None:
    lean, hf = engines(base, tok, folders, pack=one_row is not None, one_row=one_row)
    # One-row decode fuses q/k/v and gate/up where the one-row weights are dense (LoRA deltas added to
    # their columns of the fused output): pirate adapts every projection, poet some, None none.
    assert lean._lean is not None and (lean._lean.fused is not None) == (one_row in ("dense", "blocks"))
    singles = [[req(tok, TEXTS[1], adapter)] for adapter in ("pirate", "poet", None)]
    # A padded mixed-adapter batch, and rows on the base model.
    mixed = [req(tok, t, a) for t, a in zip(TEXTS, ["pirate", "poet", None, "pirate"], strict=True)]
    for batch in [*singles, mixed]:
        expected = greedy(hf, batch)
        assert greedy(lean, batch) == expected
        assert all(len(tokens) == GREEDY.max_new_tokens for tokens in expected)


def test_lean_forward_with_chunked_prefill_and_kv_reuse(
    base: Any, tok: Any, folders: dict[str, Path]
) -> None:
    # Chunks of 5 tokens: the second chunk on sees earlier columns (a mask), the first does not.
    lean, hf = engines(base, tok, folders, pack=True, prefill_chunk=5, kv=KVCacheLRU(2**24))
    hf.kv = KVCacheLRU(2**24)
    turn1 = [req(tok, TEXTS[1], "poet", cache_key="c1"), req(tok, TEXTS[3], None, cache_key="c2")]
    assert greedy(lean, turn1) == greedy(hf, turn1)
    turn2 = [
        req(tok, TEXTS[1] + " Paris, and the rest", "poet", cache_key="c1"),
        req(tok, TEXTS[0], "pirate"),
    ]
    results = lean.generate(turn2)
    assert results[0].cached_tokens > 0  # the cached prefix was reused on the lean path
    assert [r.token_ids for r in results] == greedy(hf, turn2)


def test_the_lean_engine_never_calls_transformers_forward(base: Any, tok: Any) -> None:
    model = copy.deepcopy(base)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("transformers' forward was called")

    engine = BatchEngine(model, tok)
    model.forward = refuse
    assert len(engine.generate([req(tok, TEXTS[2])])[0].token_ids) == GREEDY.max_new_tokens


def test_other_models_keep_transformers_forward_with_one_log_line(
    base: Any, tok: Any, caplog: pytest.LogCaptureFixture
) -> None:
    model = copy.deepcopy(base)
    model.config._attn_implementation = "eager"
    assert unsupported_reason(model) == "attention implementation 'eager'"
    with pytest.raises(ValueError, match="does not cover this model: attention implementation"):
        LeanLlamaForward(model)
    with caplog.at_level(logging.INFO, logger="bot.generation.engine"):
        engine = BatchEngine(model, tok)
    lines = [r.getMessage() for r in caplog.records if r.name == "bot.generation.engine"]
    assert lines == [
        "transformers' forward for this model (the lean forward: attention implementation 'eager')"
    ]
    assert engine._lean is None
    reference = BatchEngine(copy.deepcopy(base), tok, lean=False)
    batch = [req(tok, t) for t in TEXTS[:2]]
    assert greedy(engine, batch) == greedy(reference, batch)
    assert unsupported_reason(torch.nn.Linear(2, 2)) == "Linear is not a Llama model"


@pytest.mark.parametrize("one_row", ["dense", "blocks"])
@pytest.mark.parametrize("adapter", ["pirate", "poet", None])
def test_fused_one_row_decode_gives_the_unfused_logits(
    base: Any, tok: Any, folders: dict[str, Path], one_row: OneRow, adapter: str | None
) -> None:
    """Decode steps on the fused q/k/v and gate/up products (LoRA deltas added to their columns) give
    the logits of the unfused lean forward to float rounding, step after step."""
    model = copy.deepcopy(base)
    pack_linears(model, one_row=one_row)
    lora = MultiLora(model)
    for name, folder in folders.items():
        lora.load(name, folder)
    fused = LeanLlamaForward(model)
    unfused = LeanLlamaForward(model)
    unfused.fused = None
    assert fused.fused is not None
    lora.activate([adapter])
    ids = torch.tensor([tok(TEXTS[1])["input_ids"]])
    logits = []
    with torch.inference_mode():
        for forward in (fused, unfused):
            cache = BatchKV(1, ids.shape[1] + 4, device=torch.device("cpu"), dtype=torch.float32)
            forward(cache, ids, torch.arange(ids.shape[1])[None], None)
            cache.start = ids.shape[1]
            steps = []
            for token in (5, 17, 99, 3):
                steps.append(forward(cache, torch.tensor([[token]]), torch.tensor([[cache.start]]), None))
                cache.start += 1
            logits.append(torch.cat(steps))
    lora.deactivate()
    # Equal bit for bit here; 1e-6 leaves room for a BLAS that blocks the stacked product otherwise
    # (logits are ~1; a 0.1% error in the rotary embedding moves them by 2e-6 to 6e-5).
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=1e-6)


def test_a_mixed_batch_decodes_each_adapters_rows_side_by_side(
    base: Any, tok: Any, folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interleaved adapters are reordered so each adapter's rows sit side by side (the deltas then skip
    the gather): in the prefill when the rows share one prefill group, and in every decode step; every
    reply is still its own: the tokens of its request alone, returned in the order asked."""
    lean, _ = engines(base, tok, folders, pack=True)
    assert lean.lora is not None
    q = lean.lora.wrapped["model.layers.0.self_attn.q_proj"]  # adapted by both
    seen: list[tuple[int, bool]] = []  # (tokens per row, whether the plan was grouped), per forward
    add_delta = q.add_delta

    def spy(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen.append((x.shape[-2], q.plan is not None and q.plan.grouped))
        return add_delta(x, y)

    monkeypatch.setattr(q, "add_delta", spy)

    def generate(texts: list[str]) -> tuple[list[bool], list[bool]]:
        """Each prefill forward's and each decode step's grouping, for a batch of `texts` alternating
        the two adapters; checks every reply against its request alone."""
        batch = [req(tok, t, a) for t, a in zip(texts, ["pirate", "poet", "pirate", "poet"], strict=True)]
        seen.clear()
        together = [r.token_ids for r in lean.generate(batch)]
        prefill = [grouped for tokens, grouped in seen if tokens > 1]
        decode = [grouped for tokens, grouped in seen if tokens == 1]
        assert together == [greedy(lean, [r])[0] for r in batch]
        return prefill, decode

    # prompts of nearly one length: one prefill group, side by side
    prefill, decode = generate([f"Tell me about the {w}, please." for w in ("sea", "moon", "rain", "wind")])
    assert prefill == [True] and len(decode) == GREEDY.max_new_tokens - 1 and all(decode)
    # prompts of different lengths: several prefill groups (gathered); decode is still side by side
    prefill, decode = generate(TEXTS)
    assert len(prefill) > 1 and len(decode) == GREEDY.max_new_tokens - 1 and all(decode)


@pytest.mark.parametrize("one_row", [None, "dense", "blocks"], ids=lambda k: k or "plain")
def test_lean_logits_equal_transformers_forward(
    base: Any, tok: Any, folders: dict[str, Path], one_row: OneRow | None
) -> None:
    """The lean forward's logits (prefill, then one-row decode steps, fused where the weights allow)
    are transformers' own on the same sequence to float rounding: an error in the maths both lean
    paths share (the rotary embedding, the norms) cannot hide behind equal greedy tokens."""
    model = copy.deepcopy(base)
    if one_row is not None:
        pack_linears(model, one_row=one_row)
    lora = MultiLora(model)
    lora.load("pirate", folders["pirate"])
    lean = LeanLlamaForward(model)
    lora.activate(["pirate"])
    ids = tok(TEXTS[1])["input_ids"]
    extra = [5, 17, 99, 3]
    got, want = [], []
    with torch.inference_mode():
        cache = BatchKV(1, len(ids) + len(extra), device=torch.device("cpu"), dtype=torch.float32)
        got.append(lean(cache, torch.tensor([ids]), torch.arange(len(ids))[None], None))
        cache.start = len(ids)
        for token in extra:
            got.append(lean(cache, torch.tensor([[token]]), torch.tensor([[cache.start]]), None))
            cache.start += 1
        sequence = ids + extra
        for end in range(len(ids), len(sequence) + 1):
            want.append(model(torch.tensor([sequence[:end]])).logits[:, -1])
    lora.deactivate()
    torch.testing.assert_close(torch.cat(got), torch.cat(want), rtol=0, atol=1e-5)

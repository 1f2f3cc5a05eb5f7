"""`model.compile`: batch-1 decode as one compiled step gives the eager step's tokens, with and without a
persona's LoRA adapter, and falls back to the eager step wherever it does not apply."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from bot.errors import ConfigError
from bot.generation import compiled as compiled_module
from bot.generation.base import GenerationCallbacks, GenerationRequest
from bot.generation.compiled import CompiledDecode, unsupported_reason
from bot.generation.engine import BatchEngine
from bot.generation.local import check_compile
from bot.generation.lora import MultiLora
from bot.generation.packed import pack_linears
from bot.generation.quantized import RESCORE_TOP, weight_only_kernels
from personas.spec import Sampling
from tests.test_generation_lora import make_lora_folder
from tests.tiny import byte_level_tokenizer, tiny_llama

GREEDY = Sampling(temperature=0.0, repetition_penalty=1.0, max_new_tokens=12)
TEXTS = ["What's the capital of Germany? The capital of Germany is Berlin.", "Arr matey, ye be"]


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
        "pirate": make_lora_folder(base, root / "pirate", seed=21),  # every projection, rank 4
        # some projections, rank 8: the others get zeros of rank 8 in the compiled step
        "poet": make_lora_folder(base, root / "poet", seed=22, r=8, targets=["q_proj", "v_proj", "up_proj"]),
    }


def engine(base: Any, tok: Any, folders: dict[str, Path], *, pack: bool = True) -> BatchEngine:
    model = copy.deepcopy(base)
    if pack:
        pack_linears(model, one_row="blocks")
    lora = MultiLora(model)
    for name, folder in folders.items():
        lora.load(name, folder)
    return BatchEngine(model, tok, lora=lora)


@pytest.fixture(scope="module")
def compiled_engine(base: Any, tok: Any, folders: dict[str, Path]) -> BatchEngine:
    built = engine(base, tok, folders)
    assert built.compile_decode()
    return built


def req(tok: Any, text: str, adapter: str | None = None) -> GenerationRequest:
    return GenerationRequest(tok(text)["input_ids"], GREEDY, (), adapter=adapter, loop_guard=False)


def greedy(engine: BatchEngine, batch: list[GenerationRequest]) -> list[list[int]]:
    return [r.token_ids for r in engine.generate(batch)]


def test_compiled_decode_gives_the_eager_tokens_and_logits(
    base: Any,
    tok: Any,
    folders: dict[str, Path],
    compiled_engine: BatchEngine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    eager = engine(base, tok, folders)
    lean = compiled_engine._lean
    assert lean is not None and lean.compiled is not None
    steps: list[bool] = []  # per compiled step: whether a LoRA adapter rode along
    run = CompiledDecode.__call__

    def counted(self: CompiledDecode, *args: Any) -> torch.Tensor:
        steps.append(args[-1] is not None)
        return run(self, *args)

    monkeypatch.setattr(CompiledDecode, "__call__", counted)
    for adapter in ("pirate", "poet", None):
        steps.clear()
        batch = [req(tok, TEXTS[0], adapter)]
        got = greedy(compiled_engine, batch)
        assert got == greedy(eager, batch) and len(got[0]) == GREEDY.max_new_tokens
        # every decode step after the prefill's token ran compiled, on the row's adapter
        assert steps == [adapter is not None] * (GREEDY.max_new_tokens - 1)
    # the logits themselves, one decode step at a time
    ids = torch.tensor([tok(TEXTS[1])["input_ids"]])
    for adapter in ("pirate", "poet", None):
        logits = [_decode_logits(e, ids, adapter) for e in (compiled_engine, eager)]
        torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)


def _decode_logits(
    engine: BatchEngine, ids: torch.Tensor, adapter: str | None, prefill: BatchEngine | None = None
) -> torch.Tensor:
    """Logits of three teacher-forced one-row decode steps after a prefill of `ids` (by `prefill`'s
    forward, default `engine`'s)."""
    from bot.generation.kvcache import BatchKV

    prefill = prefill or engine
    engines = {id(e): e for e in (engine, prefill)}.values()
    for e in engines:
        assert e.lora is not None and e._lean is not None
        e.lora.activate([adapter])
    cache = BatchKV(1, ids.shape[1] + 4, device=torch.device("cpu"), dtype=torch.float32)
    out = []
    with torch.inference_mode():
        cache.start = 0
        assert prefill._lean is not None and engine._lean is not None
        prefill._lean(cache, ids, torch.arange(ids.shape[1])[None], None)
        for step, token in enumerate((5, 17, 42)):
            cache.start = ids.shape[1] + step
            positions = torch.tensor([[cache.start]])
            out.append(engine._lean(cache, torch.tensor([[token]]), positions, None))
    for e in engines:
        assert e.lora is not None
        e.lora.deactivate()
    return torch.cat(out)


def test_batches_and_mixed_adapters_keep_the_eager_step(
    base: Any,
    tok: Any,
    folders: dict[str, Path],
    compiled_engine: BatchEngine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(*args: Any) -> torch.Tensor:
        raise AssertionError("the compiled step ran on a batch of several rows")

    monkeypatch.setattr(CompiledDecode, "__call__", refuse)
    eager = engine(base, tok, folders)
    batch = [req(tok, TEXTS[0], "pirate"), req(tok, TEXTS[1], "poet"), req(tok, TEXTS[1])]
    assert greedy(compiled_engine, batch) == greedy(eager, batch)


def test_where_it_cannot_compile_the_eager_step_stays_with_a_log_line(
    base: Any,
    tok: Any,
    folders: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # No dense one-row weights: an unpacked model.
    unpacked = engine(base, tok, folders, pack=False)
    with caplog.at_level(logging.WARNING, logger="bot.generation.compiled"):
        assert not unpacked.compile_decode()
    assert "stays eager: the layers keep no dense one-row weights" in caplog.text

    # Compiling fails (no C++ compiler, say): logged, and the replies are the eager step's.
    def broken_compile(fn: Any, **kw: Any) -> Any:
        def run(*args: Any) -> torch.Tensor:
            raise RuntimeError("InductorError: no working C++ compiler found")

        return run

    monkeypatch.setattr(compiled_module.torch, "compile", broken_compile)
    failing = engine(base, tok, folders)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bot.generation.compiled"):
        assert not failing.compile_decode()
    assert "compiling failed (RuntimeError: InductorError: no working C++ compiler found)" in caplog.text
    assert failing._lean is not None and failing._lean.compiled is None
    batch = [req(tok, TEXTS[0], "pirate")]
    assert greedy(failing, batch) == greedy(engine(base, tok, folders), batch)


def test_model_compile_is_refused_where_it_cannot_run() -> None:
    cpu = torch.device("cpu")
    check_compile(True, cpu, torch.float32, "auto")
    check_compile(False, torch.device("cuda"), torch.bfloat16, "int8")
    check_compile(True, cpu, torch.float32, "int8")
    for device, dtype, weights in (
        (cpu, torch.float32, "int4"),
        (cpu, torch.float32, "float16"),
        (cpu, torch.bfloat16, "auto"),
    ):
        with pytest.raises(ConfigError, match=r"model\.compile is for CPU serving of a float32 model"):
            check_compile(True, device, dtype, weights)
    with pytest.raises(ConfigError, match=r"here: cuda, bfloat16, model\.weights = 'auto'"):
        check_compile(True, torch.device("cuda"), torch.bfloat16, "auto")


def test_unsupported_reason_names_the_weights_it_cannot_read(base: Any) -> None:
    from bot.generation.leanforward import LeanLlamaForward
    from bot.generation.quantized import quantize_linears

    model = copy.deepcopy(base)
    quantize_linears(model, "float16", fuse_siblings=True)
    assert unsupported_reason(LeanLlamaForward(model)) == (
        "the layers' weights are in a form it cannot read (float16, int4, or fbgemm's int8)"
    )


@pytest.mark.skipif(
    not weight_only_kernels(), reason="int8 weights on torch's weight-only layout need AVX-512"
)
def test_int8_weights_compile_to_the_step_of_their_dequantized_model(
    base: Any, tok: Any, folders: dict[str, Path]
) -> None:
    """`model.weights = "int8"` with `model.compile`: the compiled step reads the int8 weights and their
    scales with float32 activations, so it computes the float32 model whose layer weights are the
    dequantized ones. The output layer is read as int8 too, with each step's best candidates rescored
    from the float32 table: those logits are exact, and the rest within int8's rounding."""
    from bot.generation.quantized import int8_weight_only, quantize_linears

    quantized = copy.deepcopy(base)
    quantize_linears(quantized, "int8", fuse_siblings=True)
    lora = MultiLora(quantized)
    for name, folder in folders.items():
        lora.load(name, folder)
    int8 = BatchEngine(quantized, tok, lora=lora)
    assert int8.compile_decode()
    dequantized = copy.deepcopy(base)
    with torch.no_grad():
        for layer in dequantized.model.layers:
            for linear in (*_attention(layer), *_mlp(layer)):
                q, scale = int8_weight_only(linear.weight)
                linear.weight.copy_(q.float() * scale.float()[:, None])
    reference = engine(dequantized, tok, folders)
    ids = torch.tensor([tok(TEXTS[1])["input_ids"]])
    # The prefill runs eagerly, on the weight-only kernel (bfloat16 activations): both steps continue
    # from the reference's prefill.
    for adapter in ("pirate", "poet", None):
        got = _decode_logits(int8, ids, adapter, prefill=reference)
        want = _decode_logits(reference, ids, adapter)
        top = got.topk(RESCORE_TOP, -1).indices
        torch.testing.assert_close(got.gather(-1, top), want.gather(-1, top), rtol=1e-4, atol=1e-4)
        assert torch.equal(got.argmax(-1), want.argmax(-1))
        # an int8 row's rounding, relative to the logits' range: far below it, and never zero
        rounding = (got - want).abs().max() / want.abs().max()
        assert 0 < rounding < 0.02, rounding


def _attention(layer: Any) -> tuple[Any, ...]:
    a = layer.self_attn
    return a.q_proj, a.k_proj, a.v_proj, a.o_proj


def _mlp(layer: Any) -> tuple[Any, ...]:
    m = layer.mlp
    return m.gate_proj, m.up_proj, m.down_proj


def test_the_worker_backend_compiles_smollm2_and_answers_as_transformers_does() -> None:
    """SmolLM2 through `model.compile = true` (the backend the worker builds from it): the greedy reply
    is transformers' own, token for token, with the compiled step running."""
    from transformers import AutoModelForCausalLM

    from bot.basemodel import ModelLocation
    from bot.config import Settings
    from bot.generation.local import LocalBackend
    from bot.prompting import ChatRenderer, Turn
    from bot.runtime import load_backend
    from tests.real_model import smollm2, transformers_greedy

    folder = smollm2()
    settings = Settings.model_validate({"model": {"path": str(folder), "compile": True}})
    backend = load_backend(settings)
    assert isinstance(backend, LocalBackend) and backend.compiled
    assert backend.location == ModelLocation(folder) and settings.model.compile
    renderer = ChatRenderer(backend.tokenizer, "model")
    prompt = renderer.render_prompt(
        [Turn("user", "Tell me about the Moon.")], system=None, max_prompt_tokens=256
    ).input_ids
    sampling = Sampling(temperature=0.0, repetition_penalty=1.0, max_new_tokens=32)
    got = backend.generate_batch([GenerationRequest(prompt, sampling, ())], GenerationCallbacks())[0]
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert got.token_ids == transformers_greedy(reference, prompt, 32)

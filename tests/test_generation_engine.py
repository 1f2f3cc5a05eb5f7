"""The batched engine on a tiny random Llama: mixed adapters, per-row stop and sampling, KV reuse."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import pytest
import torch

from bot.generation.base import (
    GenerationCallbacks,
    GenerationCancelled,
    GenerationRequest,
    GenerationResult,
    is_out_of_memory,
)
from bot.generation.engine import BatchEngine, plan_prefill_groups
from bot.generation.kvcache import BatchKV, ChannelKV, KVCacheLRU
from bot.generation.lora import MultiLora
from personas.spec import Sampling
from tests.test_generation_lora import make_lora_folder
from tests.tiny import byte_level_tokenizer, tiny_llama

GREEDY = Sampling(temperature=0.0, repetition_penalty=1.0, max_new_tokens=16)
TEXTS = [
    "hello world",
    "What's the capital of Germany? The capital",
    "Arr matey, ye be",
    "Soft rain on the roof / the kettle begins",
]


@pytest.fixture(scope="module")
def tok() -> Any:
    return byte_level_tokenizer()


@pytest.fixture(scope="module")
def base(tok: Any) -> Any:
    return tiny_llama(tok)


@pytest.fixture(scope="module")
def folders(base: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    return {
        "pirate": make_lora_folder(base, root / "pirate", seed=11),
        "poet": make_lora_folder(base, root / "poet", seed=12, r=8, targets=["q_proj", "v_proj", "up_proj"]),
        "bard": make_lora_folder(base, root / "bard", seed=13, r=2, alpha=4, rslora=True),
    }


@pytest.fixture(scope="module")
def prompts(tok: Any) -> list[list[int]]:
    return [tok(t)["input_ids"] for t in TEXTS]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Any:
    # Tiny matrices: one thread is faster, and steady on a shared machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_PEFT: dict[Path, Any] = {}


def peft_greedy(base: Any, folder: Path | None, ids: list[int], n: int) -> list[int]:
    """The reference: transformers' own generate, through peft for an adapter."""
    model = base
    if folder is not None:
        from peft import PeftModel

        if folder not in _PEFT:
            _PEFT[folder] = PeftModel.from_pretrained(copy.deepcopy(base), folder)
        model = _PEFT[folder]
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(ids) :].tolist()


def make_engine(base: Any, tok: Any, folders: dict[str, Path], kv_bytes: int = 0) -> BatchEngine:
    model = copy.deepcopy(base)
    lora = MultiLora(model)
    for name, folder in folders.items():
        lora.load(name, folder)
    return BatchEngine(model, tok, lora=lora, kv=KVCacheLRU(kv_bytes))


def request(
    ids: list[int], adapter: str | None = None, sampling: Sampling = GREEDY, **kw: Any
) -> GenerationRequest:
    # Without the loop guard: these tests compare token for token with peft's fixed-length greedy.
    return GenerationRequest(list(ids), sampling, (), adapter=adapter, **{"loop_guard": False, **kw})


def test_mixed_batch_equals_each_alone_and_peft(
    base: Any, tok: Any, folders: dict[str, Path], prompts: list[list[int]]
) -> None:
    engine = make_engine(base, tok, folders)
    adapters: list[str | None] = [None, "pirate", "poet", "bard"]
    jobs = [(ids, adapter) for adapter in adapters for ids in prompts]
    expected = [peft_greedy(base, folders.get(a) if a else None, ids, 16) for ids, a in jobs]
    alone = [engine.generate([request(ids, a)])[0].token_ids for ids, a in jobs]
    batched = [r.token_ids for r in engine.generate([request(ids, a) for ids, a in jobs])]
    assert alone == expected
    assert batched == expected
    # The adapters are not no-ops: each changes at least one reply.
    for k, adapter in enumerate(adapters[1:], start=1):
        assert expected[k * 4 : k * 4 + 4] != expected[:4], adapter


def test_each_row_stops_at_its_own_end_of_turn(
    base: Any, tok: Any, folders: dict[str, Path], prompts: list[list[int]]
) -> None:
    engine = make_engine(base, tok, folders)
    free = [r.token_ids for r in engine.generate([request(ids, "pirate") for ids in prompts])]
    # Row 1 stops where its 5th token would be; the others have stop ids they never produce.
    stop = free[1][4]
    first = free[1].index(stop)
    reqs = [
        GenerationRequest(
            prompts[i], GREEDY, (stop,) if i == 1 else (len(tok) + 5,), adapter="pirate", loop_guard=False
        )
        for i in range(4)
    ]
    finished: list[int] = []
    results = engine.generate(reqs, GenerationCallbacks(on_finish=lambda i, r: finished.append(i)))
    assert results[1].token_ids == free[1][:first]
    assert results[1].finish_reason == "stop"
    for i in (0, 2, 3):
        assert results[i].token_ids == free[i] and results[i].finish_reason == "length"
    assert finished[0] == 1  # its reply was handed over while the others still generated
    assert sorted(finished) == [0, 1, 2, 3]


def test_per_row_max_new_tokens(
    base: Any, tok: Any, folders: dict[str, Path], prompts: list[list[int]]
) -> None:
    engine = make_engine(base, tok, folders)
    lengths = [3, 16, 7, 1]
    reqs = [
        request(ids, "poet", GREEDY.model_copy(update={"max_new_tokens": n}))
        for ids, n in zip(prompts, lengths, strict=True)
    ]
    results = engine.generate(reqs)
    full = [engine.generate([request(ids, "poet")])[0].token_ids for ids in prompts]
    for result, n, want in zip(results, lengths, full, strict=True):
        assert result.token_ids == want[:n]


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(
    base: Any, tok: Any, folders: dict[str, Path], prompts: list[list[int]]
) -> None:
    engine = make_engine(base, tok, folders)
    hot = Sampling(temperature=1.3, top_p=0.95, top_k=40, repetition_penalty=1.2, max_new_tokens=12)
    reqs = [
        request(prompts[0], "pirate", hot, seed=7),
        request(prompts[1], None, GREEDY),
        request(prompts[2], "bard", hot.model_copy(update={"top_k": 0, "top_p": 0.7}), seed=8),
    ]
    batched = [r.token_ids for r in engine.generate(reqs)]
    alone = [engine.generate([r])[0].token_ids for r in reqs]
    assert batched == alone
    other_seed = engine.generate([request(prompts[0], "pirate", hot, seed=9)])[0].token_ids
    assert other_seed != batched[0]  # the seed, not luck, makes them equal


def test_repetition_penalty_matches_transformers(base: Any, tok: Any, prompts: list[list[int]]) -> None:
    engine = BatchEngine(copy.deepcopy(base), tok)
    penalised = GREEDY.model_copy(update={"repetition_penalty": 1.5, "max_new_tokens": 20})
    for ids in prompts:
        with torch.no_grad():
            out = base.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=20,
                do_sample=False,
                repetition_penalty=1.5,
                eos_token_id=None,
                pad_token_id=0,
            )
        assert engine.generate([request(ids, None, penalised)])[0].token_ids == out[0, len(ids) :].tolist()


def test_samples_stay_inside_transformers_top_k_top_p(tok: Any) -> None:
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    from bot.generation.sampling import BatchSampler

    torch.manual_seed(0)
    vocab = 300
    logits = torch.randn(1, vocab) * 3
    for top_k, top_p in [(0, 0.6), (10, 0.9), (0, 0.999), (200, 0.5)]:
        sampling = Sampling(temperature=0.8, top_p=top_p, top_k=top_k, repetition_penalty=1.0)
        sampler = BatchSampler([sampling], [1], [[]], vocab, torch.device("cpu"))
        warped = logits / 0.8
        if top_k:
            warped = TopKLogitsWarper(top_k)(None, warped)
        warped = TopPLogitsWarper(top_p)(None, warped)
        allowed = set(torch.nonzero(warped[0] > -float("inf")).flatten().tolist())
        drawn = {int(sampler(logits)[0]) for _ in range(300)}
        assert drawn <= allowed, (top_k, top_p)
        assert len(drawn) > 1 or len(allowed) == 1


def test_kv_reuse_gives_identical_greedy_output(
    base: Any, tok: Any, folders: dict[str, Path], prompts: list[list[int]]
) -> None:
    cached = make_engine(base, tok, folders, kv_bytes=10**9)
    fresh = make_engine(base, tok, folders, kv_bytes=0)
    adapters = ["pirate", None, "poet", "bard"]
    first = cached.generate(
        [
            request(ids, a, cache_key=f"chan{i}")
            for i, (ids, a) in enumerate(zip(prompts, adapters, strict=True))
        ]
    )
    assert len(cached.kv) == 4
    # The next turn: the previous prompt and reply, then a new message of varied length. Channel 3
    # changes its history (an edit): only the shared prefix is reused.
    second = []
    for i, (ids, result) in enumerate(zip(prompts, first, strict=True)):
        history = ids + result.token_ids
        if i == 3:
            history = history[:3] + tok(" edited")["input_ids"] + history[3:]
        second.append(history + tok(" and then" * (i + 1))["input_ids"])
    # A cold channel joins the same batch (a long prefill next to short suffixes).
    cold = tok(" ".join(TEXTS))["input_ids"]
    reqs = [
        request(ids, a, cache_key=f"chan{i}") for i, (ids, a) in enumerate(zip(second, adapters, strict=True))
    ]
    reqs.append(request(cold, "pirate", cache_key="cold"))
    reused = cached.generate(reqs)
    plain = fresh.generate(reqs)
    assert [r.token_ids for r in reused] == [r.token_ids for r in plain]
    # Rows 0-2 reused their whole previous prompt and reply (minus the last, unfed token).
    for i in range(3):
        assert reused[i].cached_tokens == len(prompts[i]) + len(first[i].token_ids) - 1
    assert reused[3].cached_tokens == 3  # up to the edit
    assert reused[4].cached_tokens == 0 and all(r.cached_tokens == 0 for r in plain)


def test_chunked_prefill_gives_the_same_replies(
    base: Any, tok: Any, folders: dict[str, Path], prompts: list[list[int]]
) -> None:
    whole = make_engine(base, tok, folders, kv_bytes=10**9)
    chunked = make_engine(base, tok, folders, kv_bytes=10**9)
    chunked.prefill_chunk = 3
    adapters = ["pirate", None, "poet", "bard"]
    for engine in (whole, chunked):  # a first turn fills each engine's channel cache
        engine.generate(
            [
                request(ids, a, cache_key=f"c{i}")
                for i, (ids, a) in enumerate(zip(prompts, adapters, strict=True))
            ]
        )
    longer = [ids + tok(" and the rest of it" * (i + 1))["input_ids"] for i, ids in enumerate(prompts)]
    reqs = [
        request(ids, a, cache_key=f"c{i}") for i, (ids, a) in enumerate(zip(longer, adapters, strict=True))
    ]
    assert [r.token_ids for r in chunked.generate(reqs)] == [r.token_ids for r in whole.generate(reqs)]


def test_another_adapter_never_reuses_the_cache(
    base: Any, tok: Any, folders: dict[str, Path], prompts: list[list[int]]
) -> None:
    engine = make_engine(base, tok, folders, kv_bytes=10**9)
    first = engine.generate([request(prompts[0], "pirate", cache_key="c")])[0]
    again = prompts[0] + first.token_ids + tok(" more")["input_ids"]
    other = engine.generate([request(again, "poet", cache_key="c")])[0]
    assert other.cached_tokens == 0
    assert other.token_ids == peft_greedy(base, folders["poet"], again, 16)
    same = engine.generate([request(again, "pirate", cache_key="c")])[0]
    assert same.cached_tokens > 0


def test_lru_holds_entries_within_its_byte_budget() -> None:
    def entry(key: str, tokens: int) -> ChannelKV:
        return ChannelKV(key, list(range(tokens)), [torch.zeros(2, tokens, 4)], [torch.zeros(2, tokens, 4)])

    size = entry("x", 10).nbytes
    lru = KVCacheLRU(3 * size)
    for key in "abc":
        lru.put(entry(key, 10))
    assert lru.take("a") is not None  # taking it marks a use; put it back as the newest
    lru.put(entry("a", 10))
    lru.put(entry("d", 10))
    assert lru.take("b") is None  # the least recently used went first
    assert lru.nbytes <= 3 * size and len(lru) == 3  # exactly one entry was evicted
    lru.put(entry("huge", 100))  # larger than the budget: never stored
    assert lru.take("huge") is None
    off = KVCacheLRU(0)
    off.put(entry("a", 1))
    assert len(off) == 0


def test_streamed_text_grows_to_the_final_reply(
    base: Any, tok: Any, folders: dict[str, Path], prompts: list[list[int]]
) -> None:
    engine = make_engine(base, tok, folders)
    seen: dict[int, list[str]] = {0: [], 1: []}
    results = engine.generate(
        [request(prompts[0], "pirate"), request(prompts[2], None)],
        GenerationCallbacks(on_text=lambda i, text: seen[i].append(text)),
    )
    for i, result in enumerate(results):
        texts = seen[i]
        assert len(texts) == len(result.token_ids)
        assert all(b.startswith(a) for a, b in itertools.pairwise(texts))
        assert texts[-1].strip() == result.text


def test_cancel_between_steps(base: Any, tok: Any, prompts: list[list[int]]) -> None:
    engine = BatchEngine(copy.deepcopy(base), tok)
    steps = []

    def should_stop() -> bool:
        steps.append(1)
        return len(steps) >= 3

    with pytest.raises(GenerationCancelled, match="2 of 2 replies unfinished"):
        engine.generate([request(ids) for ids in prompts[:2]], GenerationCallbacks(should_stop=should_stop))


def test_prompt_that_fills_the_context_is_refused(tok: Any) -> None:
    engine = BatchEngine(tiny_llama(tok, context=32), tok)
    with pytest.raises(ValueError, match="fills the 32-token context"):
        engine.generate([request(list(range(40, 72)))])
    # A prompt that leaves some room gets as many tokens as fit.
    result: GenerationResult = engine.generate([request(list(range(40, 70)))])[0]
    assert len(result.token_ids) == 2


def test_prefill_groups_trade_padding_for_passes() -> None:
    assert plan_prefill_groups([900, 20, 18, 15], overhead_tokens=16) == [(0, 1), (1, 4)]
    assert plan_prefill_groups([20, 19, 18], overhead_tokens=16) == [(0, 3)]
    assert plan_prefill_groups([5], overhead_tokens=16) == [(0, 1)]


def test_out_of_memory_is_recognised() -> None:
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert is_out_of_memory(
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
    )
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


def test_the_batch_cache_is_a_transformers_cache() -> None:
    from transformers.cache_utils import Cache

    cache = BatchKV(2, 16, device=torch.device("cpu"), dtype=torch.float32)
    assert isinstance(cache, Cache)  # so transformers treats it as a cache, and API drift surfaces here
    keys = torch.ones(2, 3, 5, 4)
    k, v = cache.update(keys, keys * 2, 0)
    assert k.shape == (2, 3, 5, 4) and torch.equal(v, keys * 2)
    cache.start = 5
    assert cache.get_seq_length() == 5 and cache.get_mask_sizes(1, 0) == (6, 0)

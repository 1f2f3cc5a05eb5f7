"""Generation benchmark on SmolLM2-135M-Instruct on the CPU: batching, KV reuse, batch-1 decode, memory.

Every comparison is measured side by side in one run, on the same machine state:

(a) 16 jobs from 16 channels across 4 personas, each persona with its own (random) LoRA adapter, 64 new
    tokens each (greedy, no early stop). Rates are from each method's best round (noise on a shared
    machine only adds time); every round's seconds are in the JSON. The worker's engine (one batch, gathered multi-LoRA) against
    peft `set_adapter` + `generate` per job (sequential) and stock peft `generate(adapter_names=...)`
    over the same 16 jobs (mixed batch). Aggregate tokens/s and ratios. Also: how many of the 16
    greedy replies are token-for-token equal to peft's sequential ones.
(b) Second-turn time to first token in a channel with a ~1,000-token history: the engine with the
    channel KV cache (prefills only the new turn) against a full prefill; and the reply is the same.
(c) Batch-1 decode tokens/s against the memory-bandwidth floor (weight bytes / copy bandwidth measured
    in this run), with a profile of where a decode step's time goes.
The engine runs as the worker runs it on the CPU: weights packed once for oneDNN, one-row products on
row blocks of the dense weights (`bot.generation.packed`);
(a) and (c) also show it on plain weights.
(d) Resident memory with 1, 4 and 8 personas' adapters loaded on one base model.
(f) One stream at one thread count: batch-1 decode and the prefill of a ~1,000-token prompt, personabot's
    base weights as float32 (packed; row blocks for one row), bfloat16, float16 and int8
    (`model.weights`) against llama.cpp (`tests/bench/llamacpp.py`, where `llama-cpp-python` is
    installed; `--llamacpp off` skips it) on an f32 GGUF of the same weights and on the Q4_1 GGUF they
    come from. Ratios to personabot float32 and to llama.cpp f32, and each decode rate as a percentage
    of the float32 floor measured in the run.
(g) The prefill of one ~1,000-token prompt (batch 1), lean forward on and off.
(e) Serving engines: the same 16 jobs over 4 personas with adapters through the worker's local engine,
    vLLM (its CPU build here, from `tests/vllm/setup_venv.sh`, when it can be had; `--vllm off` skips
    it) and sequential peft: aggregate generated tokens/s and median time to first token (from the
    start of the round) of each. vLLM gets token ids and streams token ids back, as the worker uses it.

    .venv/bin/python tests/bench/bench_generation.py [--threads N] [--rounds N] [--json PATH]
    .venv/bin/python tests/bench/bench_generation.py --only engines [--threads 2]   # only (f)
    .venv/bin/python tests/bench/bench_generation.py --only lean     # (a), (c), (g): lean forward on/off
    .venv/bin/python tests/bench/bench_generation.py --only serving [--device cuda --dtype bfloat16
        --jobs 64 --personas 8 --vllm-venv DIR]      # what tests/gpu/run.sh runs

Prints a table and writes JSON (default tests/bench/results/bench_generation.json).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import torch  # noqa: E402

from bot.generation.base import GenerationCallbacks, GenerationRequest  # noqa: E402
from bot.generation.engine import BatchEngine  # noqa: E402
from bot.generation.kvcache import KVCacheLRU  # noqa: E402
from bot.generation.lora import MultiLora  # noqa: E402
from bot.generation.packed import pack_linears  # noqa: E402
from bot.prompting import ChatRenderer, Turn  # noqa: E402
from personas.spec import Sampling  # noqa: E402
from tests.real_model import transformers_greedy  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOPICS = [
    "the tides", "sourdough bread", "black holes", "chess openings", "the Roman roads", "bees",
    "volcanoes", "jazz", "the printing press", "glaciers", "origami", "coral reefs", "trains",
    "the Moon", "tea", "lighthouses",
]  # fmt: skip


def find_model(explicit: Path | None) -> Path:
    """`--model`, else the model the CLI would use: `model.path` from the config or the environment,
    else the pulled default model in the data directory. `ModelError` says what to run when missing."""
    if explicit is not None:
        return explicit
    from bot.basemodel import resolve_model
    from bot.config import load_settings

    return resolve_model(load_settings()).folder


def rss() -> int:
    return psutil.Process().memory_info().rss


def load_model(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def make_adapters(base: Any, root: Path, count: int, r: int) -> list[Path]:
    """Random LoRA adapters (A and B non-zero, small), saved as peft folders like trained ones."""
    from peft import LoraConfig, get_peft_model

    folders = []
    for i in range(count):
        torch.manual_seed(1000 + i)
        model = get_peft_model(
            copy.deepcopy(base),
            LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights=False),
        )
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.mul_(0.05)  # a visible but sane change of the base model's output
        folder = root / f"persona{i}"
        model.save_pretrained(folder)
        folders.append(folder)
        del model
    gc.collect()
    return folders


def timed(fn: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


# -- (d) memory -----------------------------------------------------------------------------------


def bench_memory(model_path: Path, folders: list[Path]) -> dict[str, Any]:
    gc.collect()
    before = rss()
    model = load_model(model_path)
    pack_linears(model)  # as the worker does on the CPU
    gc.collect()
    with_model = rss()
    lora = MultiLora(model)
    result: dict[str, Any] = {"base_model_rss_bytes": with_model - before, "personas": {}}
    loaded = 0
    adapter_bytes = 0
    for n in (1, 4, 8):
        while loaded < n:
            adapter_bytes += lora.load(f"persona{loaded}", folders[loaded]).nbytes
            loaded += 1
        gc.collect()
        result["personas"][n] = {
            "rss_bytes": rss(),
            "rss_over_base_model_bytes": rss() - with_model,
            "adapter_bytes": adapter_bytes,
        }
    del lora, model
    gc.collect()
    return result


# -- (a) batching ---------------------------------------------------------------------------------


def prompts_for(tokenizer: Any, jobs: int) -> list[list[int]]:
    renderer = ChatRenderer(tokenizer, "model")
    out = []
    for j in range(jobs):
        topic = TOPICS[j % len(TOPICS)]
        turns = [Turn("user", f"Tell me three things about {topic}, in a few sentences.")]
        out.append(renderer.render_prompt(turns, system=None, max_prompt_tokens=1024).input_ids)
    return out


def bench_batching(
    model_path: Path,
    tokenizer: Any,
    folders: list[Path],
    jobs: int,
    personas: int,
    new_tokens: int,
    rounds: int,
) -> dict[str, Any]:
    from peft import PeftModel

    prompts = prompts_for(tokenizer, jobs)
    names = [f"persona{j % personas}" for j in range(jobs)]
    greedy = Sampling(temperature=0.0, repetition_penalty=1.0, max_new_tokens=new_tokens)

    ours_model = load_model(model_path)
    pack_linears(ours_model)  # the worker's CPU path (LocalBackend packs its weights for oneDNN)
    lora = MultiLora(ours_model)
    for i in range(personas):
        lora.load(f"persona{i}", folders[i])
    engine = BatchEngine(ours_model, tokenizer, lora=lora)
    unpacked_model = load_model(model_path)  # the same engine on plain weights, for reference
    unpacked_lora = MultiLora(unpacked_model)
    for i in range(personas):
        unpacked_lora.load(f"persona{i}", folders[i])
    unpacked = BatchEngine(unpacked_model, tokenizer, lora=unpacked_lora)
    hf_forward = BatchEngine(ours_model, tokenizer, lora=lora, lean=False)  # before the lean forward
    requests = [
        GenerationRequest(p, greedy, (), adapter=n, loop_guard=False)
        for p, n in zip(prompts, names, strict=True)
    ]
    single = [GenerationRequest(p, greedy, (), adapter="persona0", loop_guard=False) for p in prompts]

    peft_model = PeftModel.from_pretrained(load_model(model_path), folders[0], adapter_name="persona0")
    for i in range(1, personas):
        peft_model.load_adapter(folders[i], adapter_name=f"persona{i}")
    peft_model.eval()
    kwargs = {
        "do_sample": False,
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "eos_token_id": None,
    }
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def sequential() -> list[list[int]]:
        out = []
        with torch.inference_mode():
            for ids, name in zip(prompts, names, strict=True):
                peft_model.set_adapter(name)
                x = torch.tensor([ids])
                y = peft_model.generate(
                    input_ids=x, attention_mask=torch.ones_like(x), pad_token_id=pad, **kwargs
                )
                out.append(y[0, len(ids) :].tolist())
        return out

    def peft_mixed() -> list[list[int]]:
        width = max(len(p) for p in prompts)
        x = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.inference_mode():
            y = peft_model.generate(
                input_ids=x, attention_mask=mask, adapter_names=names, pad_token_id=pad, **kwargs
            )
        return [row[width:].tolist() for row in y]

    # Warm-up: first calls allocate and pick kernels.
    engine.generate(requests[:2])
    unpacked.generate(requests[:2])
    with torch.inference_mode():
        peft_model.set_adapter("persona0")
        x = torch.tensor([prompts[0]])
        peft_model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            pad_token_id=pad,
            do_sample=False,
            max_new_tokens=4,
        )

    runs: dict[str, list[float]] = {
        "ours": [],
        "ours_single_adapter": [],
        "ours_unpacked_weights": [],
        "ours_transformers_forward": [],
        "ours_single_adapter_transformers_forward": [],
        "peft_sequential": [],
        "peft_mixed": [],
    }
    replies: dict[str, list[list[int]]] = {}
    for _ in range(rounds):
        seconds, results = timed(lambda: engine.generate(requests))
        runs["ours"].append(seconds)
        replies["ours"] = [r.token_ids for r in results]
        seconds, _ = timed(lambda: engine.generate(single))
        runs["ours_single_adapter"].append(seconds)
        seconds, _ = timed(lambda: unpacked.generate(requests))
        runs["ours_unpacked_weights"].append(seconds)
        seconds, _ = timed(lambda: hf_forward.generate(requests))
        runs["ours_transformers_forward"].append(seconds)
        seconds, _ = timed(lambda: hf_forward.generate(single))
        runs["ours_single_adapter_transformers_forward"].append(seconds)
        seconds, replies["peft_sequential"] = timed(sequential)
        runs["peft_sequential"].append(seconds)
        seconds, replies["peft_mixed"] = timed(peft_mixed)
        runs["peft_mixed"].append(seconds)
    tokens = jobs * new_tokens
    assert all(len(r) == new_tokens for r in replies["ours"])
    # On a shared machine other work only ever adds time: the best round of each method is its rate.
    rate = {k: tokens / min(v) for k, v in runs.items()}
    median_rate = {k: tokens / statistics.median(v) for k, v in runs.items()}
    same_as_peft = sum(a == b for a, b in zip(replies["ours"], replies["peft_sequential"], strict=True))
    mixed_same = sum(a == b for a, b in zip(replies["peft_mixed"], replies["peft_sequential"], strict=True))
    return {
        "jobs": jobs,
        "personas": personas,
        "new_tokens": new_tokens,
        "prompt_tokens": [len(p) for p in prompts],
        "seconds": runs,
        "tokens_per_second": rate,
        "tokens_per_second_median_round": median_rate,
        "ours_vs_sequential": rate["ours"] / rate["peft_sequential"],
        "ours_vs_peft_mixed": rate["ours"] / rate["peft_mixed"],
        "peft_mixed_vs_sequential": rate["peft_mixed"] / rate["peft_sequential"],
        "ours_single_adapter_vs_sequential": rate["ours_single_adapter"] / rate["peft_sequential"],
        "ours_unpacked_weights_vs_sequential": rate["ours_unpacked_weights"] / rate["peft_sequential"],
        "mixed_vs_single_adapter": rate["ours"] / rate["ours_single_adapter"],
        "mixed_vs_single_adapter_transformers_forward": rate["ours_transformers_forward"]
        / rate["ours_single_adapter_transformers_forward"],
        "ours_replies_equal_to_peft_sequential": f"{same_as_peft}/{jobs}",
        "peft_mixed_replies_equal_to_peft_sequential": f"{mixed_same}/{jobs}",
    }


# -- (b) KV reuse ---------------------------------------------------------------------------------


def long_history(tokenizer: Any, target_tokens: int) -> list[Turn]:
    renderer = ChatRenderer(tokenizer, "model")
    turns: list[Turn] = []
    n = 0
    while True:
        topic = TOPICS[n % len(TOPICS)]
        turns.append(Turn("user", f"What do you know about {topic}? Please keep it to a short paragraph."))
        turns.append(
            Turn(
                "assistant",
                f"{topic.capitalize()} are a fascinating subject with a long history. People have studied "
                f"{topic} for centuries, and there is always something new to learn about them.",
            )
        )
        n += 1
        ids = renderer.render_prompt(
            [*turns, Turn("user", "ok")], system=None, max_prompt_tokens=8192
        ).input_ids
        if len(ids) >= target_tokens:
            return turns


def bench_kv_reuse(model_path: Path, tokenizer: Any, history_tokens: int, rounds: int) -> dict[str, Any]:
    renderer = ChatRenderer(tokenizer, "model")
    history = long_history(tokenizer, history_tokens)
    model = load_model(model_path)
    pack_linears(model)
    reply_sampling = Sampling(temperature=0.0, repetition_penalty=1.0, max_new_tokens=24)
    stop = tuple(renderer.end_of_turn_ids)
    turn1_turns = [*history, Turn("user", "Which of these would you visit first, and why?")]
    turn1 = renderer.render_prompt(turn1_turns, system=None, max_prompt_tokens=4096).input_ids

    def turn2_ids(reply_text: str) -> list[int]:
        turns = [*turn1_turns, Turn("assistant", reply_text), Turn("user", "Thanks! And which one last?")]
        return renderer.render_prompt(turns, system=None, max_prompt_tokens=4096).input_ids

    cached = BatchEngine(model, tokenizer, kv=KVCacheLRU(2**30))
    fresh = BatchEngine(model, tokenizer, kv=KVCacheLRU(0))
    first = cached.generate([GenerationRequest(turn1, reply_sampling, stop, cache_key="chan")])[0]
    ids2 = turn2_ids(first.text)
    ttft: dict[str, list[float]] = {"reuse": [], "full_prefill": []}
    reused_tokens = 0
    one = Sampling(temperature=0.0, repetition_penalty=1.0, max_new_tokens=1)
    fresh.generate([GenerationRequest(ids2[:64], one, stop)])  # warm-up
    for _ in range(rounds):
        # Put the turn-1 cache back (a timed turn 2 replaces it with a longer one).
        cached.kv.clear()
        cached.generate([GenerationRequest(turn1, reply_sampling, stop, cache_key="chan")])
        result = cached.generate([GenerationRequest(ids2, one, stop, cache_key="chan")])[0]
        ttft["reuse"].append(result.timings["first_token"])
        reused_tokens = result.cached_tokens
        result = fresh.generate([GenerationRequest(ids2, one, stop, cache_key="chan")])[0]
        ttft["full_prefill"].append(result.timings["first_token"])
    cached.kv.clear()
    cached.generate([GenerationRequest(turn1, reply_sampling, stop, cache_key="chan")])
    with_reuse = cached.generate([GenerationRequest(ids2, reply_sampling, stop, cache_key="chan")])[0]
    without = fresh.generate([GenerationRequest(ids2, reply_sampling, stop)])[0]
    median = {k: statistics.median(v) for k, v in ttft.items()}
    return {
        "turn1_prompt_tokens": len(turn1),
        "turn2_prompt_tokens": len(ids2),
        "reused_tokens": reused_tokens,
        "new_tokens_prefilled": len(ids2) - reused_tokens,
        "ttft_seconds": ttft,
        "ttft_median_seconds": median,
        "speedup": median["full_prefill"] / median["reuse"],
        "same_reply_with_and_without_reuse": with_reuse.token_ids == without.token_ids,
        "prefix_of_turn1_in_turn2": ids2[: len(turn1)] == turn1,
    }


# -- (c) batch-1 decode vs the bandwidth floor ------------------------------------------------------


def copy_bandwidth(megabytes: int = 256, repeats: int = 7) -> float:
    """Bytes moved per second by a large tensor copy (read + write, as STREAM counts it); best of N."""
    src = torch.empty(megabytes * 2**20 // 4).normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(timed(lambda: dst.copy_(src))[0] for _ in range(repeats))
    return 2 * src.nbytes / best  # the memory system moved read + write bytes


def read_bandwidth(megabytes: int = 1024, repeats: int = 5) -> float:
    """Bytes read per second by a plain sum over a large tensor (what a decode step mostly does); best of N."""
    src = torch.empty(megabytes * 2**20 // 4).normal_()
    src.sum()
    best = min(timed(lambda: src.sum())[0] for _ in range(repeats))
    return src.nbytes / best


def weight_bytes(model: Any) -> int:
    seen, total = set(), 0
    for param in model.parameters():
        if param.data_ptr() not in seen:  # tied embedding / lm_head counted once
            seen.add(param.data_ptr())
            total += param.nbytes
    return total


def decode_rate(engine: BatchEngine, prompt: list[int], adapter: str | None, tokens: int) -> float:
    sampling = Sampling(temperature=0.0, repetition_penalty=1.0, max_new_tokens=tokens)
    result = engine.generate([GenerationRequest(prompt, sampling, (), adapter=adapter)])[0]
    return (len(result.token_ids) - 1) / (result.timings["total"] - result.timings["first_token"])


def profile_steps(engine: BatchEngine, prompt: list[int], adapter: str | None) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    sampling = Sampling(temperature=0.0, repetition_penalty=1.0, max_new_tokens=17)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        engine.generate([GenerationRequest(prompt, sampling, (), adapter=adapter)])
        wall = time.perf_counter() - started
    groups = {"matmul": 0.0, "attention": 0.0, "other_ops": 0.0}
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6
        if (
            event.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
            or "linear_pointwise" in event.key
        ):
            groups["matmul"] += seconds
        elif "attention" in event.key:
            groups["attention"] += seconds
        elif event.key.startswith("aten::"):
            groups["other_ops"] += seconds
    ops = sum(groups.values())
    shares = {k: v / wall for k, v in groups.items()}
    shares["outside_ops_python_and_dispatch"] = max(0.0, 1 - ops / wall)
    return shares


def bench_decode(
    model_path: Path, tokenizer: Any, folders: list[Path], tokens: int, rounds: int
) -> dict[str, Any]:
    plain = load_model(model_path)
    weights = weight_bytes(plain)
    packed = load_model(model_path)
    pack_linears(packed)  # the worker's CPU path
    engines = {}
    for label, model in (("packed", packed), ("plain", plain)):
        lora = MultiLora(model)
        lora.load("persona0", folders[0])
        engines[label] = BatchEngine(model, tokenizer, lora=lora)
    engines["transformers_forward"] = BatchEngine(packed, tokenizer, lora=engines["packed"].lora, lean=False)
    engine = engines["packed"]
    prompt = prompts_for(tokenizer, 1)[0]
    for e in engines.values():
        decode_rate(e, prompt, None, 8)  # warm-up
    bandwidth = [copy_bandwidth() for _ in range(rounds)]
    base = [decode_rate(engine, prompt, None, tokens) for _ in range(rounds)]
    adapted = [decode_rate(engine, prompt, "persona0", tokens) for _ in range(rounds)]
    plain_base = [decode_rate(engines["plain"], prompt, None, tokens) for _ in range(rounds)]
    hf_forward = [decode_rate(engines["transformers_forward"], prompt, None, tokens) for _ in range(rounds)]
    hf_rates = []
    for _ in range(rounds):
        seconds, _ = timed(lambda: transformers_greedy(plain, prompt, tokens))
        hf_rates.append(tokens / seconds)
    bw = max(bandwidth)
    # Tokens/s if a step did nothing but stream the weights once at the copy's bandwidth. A copy's
    # traffic is read + write (STREAM's count, the stricter floor); the looser floor uses the bytes
    # copied per second (half of it).
    floor = bw / weights
    floor_copied = bw / 2 / weights
    best_base = max(base)
    return {
        "weight_bytes": weights,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "floor_tokens_per_second": floor,
        "floor_tokens_per_second_bytes_copied": floor_copied,
        "decode_tokens_per_second_base": base,
        "decode_tokens_per_second_adapter": adapted,
        "decode_tokens_per_second_base_plain_weights": plain_base,
        "decode_tokens_per_second_base_transformers_forward": hf_forward,
        "lean_vs_transformers_forward": best_base / max(hf_forward),
        "percent_of_floor_transformers_forward": 100 * max(hf_forward) / floor,
        "hf_generate_tokens_per_second_incl_prefill": hf_rates,
        "percent_of_floor_base": 100 * best_base / floor,
        "percent_of_floor_adapter": 100 * max(adapted) / floor,
        "percent_of_floor_plain_weights": 100 * max(plain_base) / floor,
        "percent_of_floor_bytes_copied_base": 100 * best_base / floor_copied,
        "step_time_shares_base": profile_steps(engine, prompt, None),
        "step_time_shares_adapter": profile_steps(engine, prompt, "persona0"),
    }


# -- (g) prefill ------------------------------------------------------------------------------------


def bench_prefill(model_path: Path, tokenizer: Any, prompt_tokens: int, rounds: int) -> dict[str, Any]:
    """Prompt tokens/s of one `prompt_tokens`-long prompt (batch 1, no cache), lean forward on and off."""
    model = load_model(model_path)
    pack_linears(model)  # the worker's CPU path
    renderer = ChatRenderer(tokenizer, "model")
    turns = [*long_history(tokenizer, prompt_tokens), Turn("user", "Which one first?")]
    prompt = renderer.render_prompt(turns, system=None, max_prompt_tokens=8192).input_ids[-prompt_tokens:]
    one = Sampling(temperature=0.0, repetition_penalty=1.0, max_new_tokens=1)
    engines = {
        "lean": BatchEngine(model, tokenizer),
        "transformers_forward": BatchEngine(model, tokenizer, lean=False),
    }
    seconds: dict[str, list[float]] = {k: [] for k in engines}
    firsts = {}
    for e in engines.values():
        e.generate([GenerationRequest(prompt[:64], one, ())])  # warm-up
    for _ in range(rounds):
        for label, e in engines.items():
            result = e.generate([GenerationRequest(prompt, one, ())])[0]
            seconds[label].append(result.timings["first_token"])
            firsts[label] = result.token_ids
    rate = {k: len(prompt) / min(v) for k, v in seconds.items()}
    return {
        "prompt_tokens": len(prompt),
        "seconds": seconds,
        "prompt_tokens_per_second": rate,
        "lean_vs_transformers_forward": rate["lean"] / rate["transformers_forward"],
        "same_first_token": firsts["lean"] == firsts["transformers_forward"],
    }


# -- (e) serving engines: local engine, vLLM, sequential peft ----------------------------------------


class _FirstToken:
    """A transformers streamer that notes when the first generated token arrives."""

    def __init__(self) -> None:
        self.calls = 0
        self.at: float | None = None

    def put(self, value: Any) -> None:
        self.calls += 1  # the first call carries the prompt
        if self.calls == 2 and self.at is None:
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


def bench_serving(
    model_path: Path,
    tokenizer: Any,
    folders: list[Path],
    args: argparse.Namespace,
    log_dir: Path,
) -> dict[str, Any]:
    from peft import PeftModel

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    jobs, personas, new_tokens = args.jobs, args.personas, args.new_tokens
    prompts = prompts_for(tokenizer, jobs)
    names = [f"persona{j % personas}" for j in range(jobs)]
    # No stop ids: every reply is `new_tokens` long, on every engine.
    greedy = Sampling(temperature=0.0, repetition_penalty=1.0, max_new_tokens=new_tokens)
    requests = [GenerationRequest(p, greedy, (), adapter=n) for p, n in zip(prompts, names, strict=True)]
    tokens = jobs * new_tokens
    out: dict[str, Any] = {
        "jobs": jobs,
        "personas": personas,
        "new_tokens": new_tokens,
        "device": str(device),
    }
    out["dtype"] = args.dtype
    rows: dict[str, dict[str, Any]] = {}

    def record(label: str, seconds: list[float], ttft: list[float], replies: list[list[int]]) -> None:
        best = min(range(len(seconds)), key=seconds.__getitem__)
        rows[label] = {
            "seconds": seconds,
            "tokens_per_second": tokens / seconds[best],
            "ttft_median_seconds": ttft[best],
            "replies": replies,
        }

    def run_local() -> None:
        """The worker's local engine (its objects freed on return)."""
        model = load_model(model_path).to(device=device, dtype=dtype)
        if device.type == "cpu":
            pack_linears(model)
        lora = MultiLora(model)
        for i in range(personas):
            lora.load(f"persona{i}", folders[i])
        engine = BatchEngine(model, tokenizer, lora=lora)
        engine.generate(requests[:2])  # warm-up
        seconds, ttft = [], []
        for _ in range(args.rounds):
            took, results = timed(lambda: engine.generate(requests))
            seconds.append(took)
            ttft.append(statistics.median(r.timings["first_token"] for r in results))
        record("local_engine", seconds, ttft, [r.token_ids for r in results])

    run_local()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # vLLM, where it can be had.
    if args.vllm != "off":
        rows_vllm = bench_vllm(model_path, tokenizer, folders, requests, args, log_dir)
        if "error" in rows_vllm:
            out["vllm_skipped"] = rows_vllm["error"]
            print(f"vLLM skipped: {rows_vllm['error']}", file=sys.stderr)
        else:
            record("vllm", rows_vllm["seconds"], rows_vllm["ttft"], rows_vllm["replies"])

    def run_peft() -> None:
        """Sequential peft: set_adapter + generate, one job after another."""
        peft_model = PeftModel.from_pretrained(
            load_model(model_path).to(device=device, dtype=dtype), folders[0], adapter_name="persona0"
        )
        for i in range(1, personas):
            peft_model.load_adapter(folders[i], adapter_name=f"persona{i}")
        peft_model.eval()
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        kwargs = {
            "do_sample": False,
            "max_new_tokens": new_tokens,
            "min_new_tokens": new_tokens,
            "eos_token_id": None,
        }

        def sequential() -> tuple[list[list[int]], list[float]]:
            started = time.perf_counter()
            replies, firsts = [], []
            with torch.inference_mode():
                for ids, name in zip(prompts, names, strict=True):
                    peft_model.set_adapter(name)
                    x = torch.tensor([ids], device=device)
                    streamer = _FirstToken()
                    y = peft_model.generate(
                        input_ids=x,
                        attention_mask=torch.ones_like(x),
                        pad_token_id=pad,
                        streamer=streamer,
                        **kwargs,
                    )
                    replies.append(y[0, len(ids) :].tolist())
                    firsts.append((streamer.at or time.perf_counter()) - started)
            return replies, firsts

        with torch.inference_mode():  # warm-up
            x = torch.tensor([prompts[0]], device=device)
            peft_model.generate(
                input_ids=x, attention_mask=torch.ones_like(x), pad_token_id=pad, max_new_tokens=4
            )
        seconds, ttft = [], []
        for _ in range(args.rounds):
            took, (replies, firsts) = timed(sequential)
            seconds.append(took)
            ttft.append(statistics.median(firsts))
        record("peft_sequential", seconds, ttft, replies)

    run_peft()
    gc.collect()

    reference = rows["peft_sequential"]["replies"]
    for row in rows.values():
        row["replies_equal_to_peft_sequential"] = (
            f"{sum(a == b for a, b in zip(row.pop('replies'), reference, strict=True))}/{jobs}"
        )
        row["vs_peft_sequential"] = row["tokens_per_second"] / rows["peft_sequential"]["tokens_per_second"]
    out["engines"] = rows
    return out


def bench_vllm(
    model_path: Path,
    tokenizer: Any,
    folders: list[Path],
    requests: list[GenerationRequest],
    args: argparse.Namespace,
    log_dir: Path,
) -> dict[str, Any]:
    """The same requests through `bot.generation.vllm.VllmBackend` on a vLLM server started here."""
    from bot.config import VllmSettings
    from bot.generation.vllm import VllmBackend
    from tests.vllm.server import VllmServer, vllm_venv

    try:
        venv = Path(args.vllm_venv) if args.vllm_venv else vllm_venv()
    except RuntimeError as exc:
        return {"error": str(exc)}
    vllm_dtype = "float32" if args.dtype == "float32" else args.dtype
    extra = ("--max-loras", str(args.personas), "--max-num-seqs", str(max(args.jobs, 16)))
    server = VllmServer(venv, model_path, log_dir / "bench_vllm.log", dtype=vllm_dtype, extra=extra)
    server.start()
    backend = None
    try:
        try:
            startup = server.wait_ready()
        except RuntimeError as exc:
            return {"error": str(exc).splitlines()[0]}
        backend = VllmBackend(VllmSettings(urls=[server.url]), tokenizer, context_window=8192)
        for i in range(args.personas):
            backend.load_adapter(f"persona{i}", folders[i])
        backend.generate_batch(requests[:2], GenerationCallbacks())  # warm-up
        seconds, ttft, replies = [], [], []
        for _ in range(args.rounds):
            took, results = timed(lambda: backend.generate_batch(requests, GenerationCallbacks()))
            seconds.append(took)
            ttft.append(statistics.median(r.timings["first_token"] for r in results))
            replies = [r.token_ids for r in results]
        return {"seconds": seconds, "ttft": ttft, "replies": replies, "startup_seconds": startup}
    finally:
        if backend is not None:
            backend.close()
        server.kill(15)


def print_serving(e: dict[str, Any]) -> None:
    print(
        f"\n(e) serving engines: {e['jobs']} jobs, {e['personas']} personas with adapters, {e['new_tokens']} new tokens each, {e['device']} {e['dtype']}"
    )
    print(f"    {'engine':<34}{'tokens/s':>10}{'vs sequential':>16}{'median TTFT':>14}{'same as peft':>14}")
    labels = {
        "local_engine": "worker engine (local backend)",
        "vllm": "vLLM (vllm backend)",
        "peft_sequential": "peft set_adapter + generate, 1 by 1",
    }
    for key, row in e["engines"].items():
        print(
            f"    {labels[key]:<34}{row['tokens_per_second']:>10.1f}{row['vs_peft_sequential']:>15.2f}x"
            f"{row['ttft_median_seconds']:>13.2f}s{row['replies_equal_to_peft_sequential']:>14}"
        )
    if "vllm_skipped" in e:
        print(f"    vLLM: skipped ({e['vllm_skipped']})")


# -- (f) per-stream engines: llama.cpp and personabot's weight formats, batch-1 decode and prefill -----


def engine_model(model_path: Path, fmt: str) -> Any:
    """The worker's CPU model in one weight format: float32 packed for oneDNN, bfloat16, float16, int8, int4."""
    from bot.generation.leanforward import unsupported_reason
    from bot.generation.quantized import quantize_linears

    model = load_model(model_path)
    if fmt == "float32":
        pack_linears(model)
    elif fmt == "bfloat16":
        model = model.to(torch.bfloat16)  # the `model.dtype = "bfloat16"` path (not packed)
    else:
        # as the worker does: siblings quantized together where the lean forward runs
        quantize_linears(model, fmt, fuse_siblings=unsupported_reason(model) is None)  # type: ignore[arg-type]
    return model


def _lora_engine(model_path: Path, tokenizer: Any, folder: Path) -> BatchEngine:
    """The float32 engine with one LoRA adapter loaded as "persona"."""
    model = engine_model(model_path, "float32")
    lora = MultiLora(model)
    lora.load("persona", folder)
    return BatchEngine(model, tokenizer, lora=lora)


def greedy_ids(engine: BatchEngine, prompt: list[int], adapter: str | None, tokens: int) -> list[int]:
    sampling = Sampling(temperature=0.0, repetition_penalty=1.0, max_new_tokens=tokens)
    return engine.generate([GenerationRequest(prompt, sampling, (), adapter=adapter)])[0].token_ids


def _same_prefix(a: list[int], b: list[int]) -> str:
    same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return f"{same}/{len(b)}"


def prefill_rate(engine: BatchEngine, prompt: list[int]) -> float:
    """Prompt tokens/s: time to the first token of a cold prompt (its prefill and one sampled token)."""
    one = Sampling(temperature=0.0, repetition_penalty=1.0, max_new_tokens=1)
    result = engine.generate([GenerationRequest(prompt, one, ())])[0]
    return len(prompt) / result.timings["first_token"]


def bench_engines(model_path: Path, tokenizer: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Batch-1 decode and a ~1,000-token prefill on every engine at one thread count, interleaved."""
    from tests.bench import llamacpp

    threads = torch.get_num_threads()
    prompt = prompts_for(tokenizer, 1)[0]
    renderer = ChatRenderer(tokenizer, "model")
    turns = [*long_history(tokenizer, args.history_tokens), Turn("user", "Which one first?")]
    long_prompt = renderer.render_prompt(turns, system=None, max_prompt_tokens=4096).input_ids
    out: dict[str, Any] = {
        "threads": threads,
        "prompt_tokens": len(prompt),
        "prefill_tokens": len(long_prompt),
    }
    decode: dict[str, Any] = {}
    prefill: dict[str, Any] = {}
    for fmt in ("float32", "bfloat16", "float16", "int8", "int4"):
        engine = BatchEngine(engine_model(model_path, fmt), tokenizer)
        decode[f"personabot {fmt}"] = lambda e=engine: decode_rate(e, prompt, None, args.decode_tokens)
        if fmt != "bfloat16" or torch.cpu._is_avx512_bf16_supported():
            # Without native bf16 (AVX512-BF16/AMX) a bf16 prefill runs minutes on reference kernels.
            prefill[f"personabot {fmt}"] = lambda e=engine: prefill_rate(e, long_prompt)
    # `model.compile`: batch-1 decode as one compiled step, beside the eager float32 engine, each also
    # with a persona's LoRA adapter on the row (rank 16, every projection).
    folder = make_adapters(load_model(model_path), Path(tempfile.mkdtemp()), 1, 16)[0]
    eager, compiled = _lora_engine(model_path, tokenizer, folder), _lora_engine(model_path, tokenizer, folder)
    decode["personabot float32 + LoRA"] = lambda: decode_rate(eager, prompt, "persona", args.decode_tokens)
    started = time.perf_counter()
    if compiled.compile_decode():
        out["compile_seconds"] = time.perf_counter() - started
        for label, adapter in (
            ("personabot float32 compiled", None),
            ("personabot compiled + LoRA", "persona"),
        ):
            decode[label] = lambda a=adapter: decode_rate(compiled, prompt, a, args.decode_tokens)
        int8 = BatchEngine(engine_model(model_path, "int8"), tokenizer)
        if int8.compile_decode():  # int8 weights read in the compiled step (float32 activations)
            decode["personabot int8 compiled"] = lambda: decode_rate(int8, prompt, None, args.decode_tokens)
            out["int8_compiled_greedy_prefix_equal_to_float32"] = _same_prefix(
                greedy_ids(int8, prompt, None, 64), greedy_ids(eager, prompt, None, 64)
            )
        out["compiled_greedy_equal_to_eager"] = {
            str(adapter): greedy_ids(compiled, prompt, adapter, 64) == greedy_ids(eager, prompt, adapter, 64)
            for adapter in (None, "persona")
        }
    weights = weight_bytes(load_model(model_path))
    runners = []
    why_not = llamacpp.available() if args.llamacpp != "off" else "--llamacpp off"
    if why_not is None:
        q4 = llamacpp.q4_gguf()
        f32 = llamacpp.f32_gguf(q4)
        for label, path in (("llama.cpp f32 GGUF", f32), ("llama.cpp Q4_1 GGUF", q4)):
            runner = llamacpp.LlamaCpp(path, threads)
            runners.append(runner)
            decode[label] = lambda r=runner: r.decode_rate(prompt, args.decode_tokens)
            prefill[label] = lambda r=runner: r.prefill_rate(long_prompt)
        # The conversion check: llama.cpp's greedy reply on the f32 file against transformers'.
        want = transformers_greedy(load_model(model_path), prompt, 32)
        for runner, key in zip(runners, ("f32", "q4_1"), strict=True):
            got = runner.greedy(prompt, 32)
            same = next((i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b), 32)
            out[f"llamacpp_{key}_greedy_prefix_equal_to_transformers"] = f"{same}/32"
    else:
        out["llamacpp_skipped"] = why_not
        print(f"llama.cpp skipped: {why_not}", file=sys.stderr)
    for fn in [*decode.values(), *prefill.values()]:
        fn()  # warm-up
    rates: dict[str, dict[str, list[float]]] = {"decode": {k: [] for k in decode}, "prefill": {}}
    rates["prefill"] = {k: [] for k in prefill}
    bandwidth, reads = [], []
    for _ in range(args.rounds):  # interleaved, so load changes hit every engine alike
        bandwidth.append(copy_bandwidth())
        reads.append(read_bandwidth())
        for key, fn in decode.items():
            rates["decode"][key].append(fn())
        for key, fn in prefill.items():
            rates["prefill"][key].append(fn())
    for runner in runners:
        runner.close()
    floor = max(bandwidth) / weights
    best = {kind: {k: max(v) for k, v in rows.items()} for kind, rows in rates.items()}
    out.update(
        {
            "rates": rates,
            "best": best,
            "copy_bandwidth_bytes_per_s": bandwidth,
            "float32_weight_bytes": weights,
            "float32_floor_tokens_per_second": floor,
            "read_bandwidth_bytes_per_s": reads,
            "float32_read_floor_tokens_per_second": max(reads) / weights,
        }
    )
    return out


def print_engines(f: dict[str, Any]) -> None:
    floor = f["float32_floor_tokens_per_second"]
    best = f["best"]
    base_d, base_p = best["decode"]["personabot float32"], best["prefill"]["personabot float32"]
    ref = "llama.cpp f32 GGUF"
    print(
        f"\n(f) one stream, {f['threads']} thread(s): batch-1 decode ({f['prompt_tokens']}-token prompt) and "
        f"prefill of a {f['prefill_tokens']}-token prompt; float32 floor {floor:.1f} tokens/s"
    )
    print(
        f"    {'engine':<26}{'decode tok/s':>13}{'vs pb f32':>10}{'vs llama f32':>13}{'% f32 floor':>12}"
        f"{'prefill tok/s':>15}{'vs pb f32':>10}{'vs llama f32':>13}"
    )
    for key, d in best["decode"].items():
        p = best["prefill"].get(key)
        vs_d = f"{d / best['decode'][ref]:.2f}x" if ref in best["decode"] else "-"
        vs_p = f"{p / best['prefill'][ref]:.2f}x" if p and ref in best["prefill"] else "-"
        prefill = f"{p:>15.0f}{p / base_p:>9.2f}x" if p else f"{'-':>15}{'-':>10}"
        print(
            f"    {key:<26}{d:>13.1f}{d / base_d:>9.2f}x{vs_d:>13}{100 * d / floor:>11.0f}%{prefill}{vs_p:>13}"
        )
    read_floor = f["float32_read_floor_tokens_per_second"]
    f32_engines = [k for k in ("personabot float32", ref) if k in best["decode"]]
    shares = ", ".join(f"{k} {100 * best['decode'][k] / read_floor:.0f}%" for k in f32_engines)
    print(
        f"    a plain read (sum over 1 GiB) of float32's weight bytes: {read_floor:.1f} tokens/s; "
        f"float32 decode reaches {shares} of it"
    )
    if "compile_seconds" in f:
        print(
            f"    model.compile: compiled in {f['compile_seconds']:.0f} s; greedy tokens equal to the eager "
            f"step's (base model, LoRA): {f['compiled_greedy_equal_to_eager']}"
        )
    if "int8_compiled_greedy_prefix_equal_to_float32" in f:
        same = f["int8_compiled_greedy_prefix_equal_to_float32"]
        print(f"    int8 compiled: greedy tokens equal to float32's for the first {same}")
    for key in ("f32", "q4_1"):
        if f"llamacpp_{key}_greedy_prefix_equal_to_transformers" in f:
            same = f[f"llamacpp_{key}_greedy_prefix_equal_to_transformers"]
            print(f"    llama.cpp {key} greedy tokens equal to transformers' float32: {same}")
    if "llamacpp_skipped" in f:
        print(f"    llama.cpp: skipped ({f['llamacpp_skipped']})")


# -- report ---------------------------------------------------------------------------------------


def print_report(results: dict[str, Any]) -> None:
    a, c = results["batching"], results["decode"]
    rate = a["tokens_per_second"]
    print(
        f"\n(a) batching: {a['jobs']} jobs, {a['personas']} personas (LoRA r={results['config']['lora_r']}), {a['new_tokens']} new tokens each"
    )
    print(f"    {'method':<40}{'tokens/s':>10}{'vs sequential':>16}")
    for key, label in (
        ("peft_sequential", "peft set_adapter + generate, 1 by 1"),
        ("peft_mixed", "peft generate(adapter_names=...)"),
        ("ours", "worker engine, mixed adapters"),
        ("ours_single_adapter", "worker engine, one adapter"),
        ("ours_unpacked_weights", "worker engine, mixed, plain weights"),
        ("ours_transformers_forward", "worker engine, mixed, lean=False"),
        ("ours_single_adapter_transformers_forward", "worker engine, one adapter, lean=False"),
    ):
        print(f"    {label:<40}{rate[key]:>10.1f}{rate[key] / rate['peft_sequential']:>15.2f}x")
    print(
        f"    engine vs stock peft mixed batch: {a['ours_vs_peft_mixed']:.2f}x;  greedy replies equal to peft's: {a['ours_replies_equal_to_peft_sequential']}"
    )
    print(
        f"    mixed adapters vs one adapter: {a['mixed_vs_single_adapter']:.0%} (lean=False: {a['mixed_vs_single_adapter_transformers_forward']:.0%})"
    )
    b = results.get("kv_reuse")
    if b is not None:
        print_kv_reuse(b)
    print_decode(c)
    print_prefill(results["prefill"])
    if "memory" in results:
        print_memory(results["memory"])


def print_kv_reuse(b: dict[str, Any]) -> None:
    med = b["ttft_median_seconds"]
    print(
        f"\n(b) KV reuse: turn-2 prompt {b['turn2_prompt_tokens']} tokens, {b['reused_tokens']} reused, {b['new_tokens_prefilled']} prefilled"
    )
    print(
        f"    time to first token: full prefill {med['full_prefill']:.3f}s, reuse {med['reuse']:.3f}s -> {b['speedup']:.1f}x;  same reply: {b['same_reply_with_and_without_reuse']}"
    )


def print_decode(c: dict[str, Any]) -> None:
    print(
        f"\n(c) batch-1 decode: weights {c['weight_bytes'] / 2**20:.0f} MiB, copy bandwidth {max(c['copy_bandwidth_bytes_per_s']) / 1e9:.1f} GB/s -> floor {c['floor_tokens_per_second']:.1f} tokens/s"
    )
    print(
        f"    engine base model {max(c['decode_tokens_per_second_base']):.1f} tokens/s = {c['percent_of_floor_base']:.0f}% of floor; with a LoRA {max(c['decode_tokens_per_second_adapter']):.1f} = {c['percent_of_floor_adapter']:.0f}%"
    )
    print(
        f"    (floor from bytes copied per second instead of read+write traffic: {c['floor_tokens_per_second_bytes_copied']:.1f} tokens/s; base model at {c['percent_of_floor_bytes_copied_base']:.0f}%)"
    )
    print(
        f"    same engine on plain (unpacked) weights: {max(c['decode_tokens_per_second_base_plain_weights']):.1f} tokens/s = {c['percent_of_floor_plain_weights']:.0f}% of floor"
    )
    print(
        f"    same engine with transformers' forward (lean=False): {max(c['decode_tokens_per_second_base_transformers_forward']):.1f} tokens/s = {c['percent_of_floor_transformers_forward']:.0f}% of floor; lean forward {c['lean_vs_transformers_forward']:.2f}x"
    )
    print(
        f"    HF generate (incl. prefill) {max(c['hf_generate_tokens_per_second_incl_prefill']):.1f} tokens/s"
    )
    shares = ", ".join(f"{k} {100 * v:.0f}%" for k, v in c["step_time_shares_base"].items())
    print(f"    where a base-model decode step goes: {shares}")
    shares = ", ".join(f"{k} {100 * v:.0f}%" for k, v in c["step_time_shares_adapter"].items())
    print(f"    with a LoRA: {shares}")


def print_prefill(f: dict[str, Any]) -> None:
    r = f["prompt_tokens_per_second"]
    print(
        f"\n(g) prefill: one {f['prompt_tokens']}-token prompt, batch 1: {r['lean']:.0f} prompt tokens/s; lean=False {r['transformers_forward']:.0f} -> {f['lean_vs_transformers_forward']:.2f}x;  same first token: {f['same_first_token']}"
    )


def print_memory(d: dict[str, Any]) -> None:
    print("\n(d) resident memory")
    print(f"    base model: +{d['base_model_rss_bytes'] / 2**20:.0f} MiB")
    for n, row in d["personas"].items():
        print(
            f"    {n} persona(s): RSS {row['rss_bytes'] / 2**20:.0f} MiB, +{row['rss_over_base_model_bytes'] / 2**20:.1f} MiB over the base model (adapter weights {row['adapter_bytes'] / 2**20:.1f} MiB)"
        )


def engine_only(
    args: argparse.Namespace, tokenizer: Any, folders: list[Path], results: dict[str, Any]
) -> int:
    """(a), (g) and (c) only: the local engine's speed, lean forward on and off, side by side."""
    print("measuring batching ...", file=sys.stderr)
    results["batching"] = bench_batching(
        args.model, tokenizer, folders, args.jobs, args.personas, args.new_tokens, args.rounds
    )
    print("measuring prefill ...", file=sys.stderr)
    results["prefill"] = bench_prefill(args.model, tokenizer, args.history_tokens, max(3, args.rounds))
    print("measuring batch-1 decode ...", file=sys.stderr)
    results["decode"] = bench_decode(args.model, tokenizer, folders, args.decode_tokens, max(3, args.rounds))
    results["environment"]["load_average_end"] = os.getloadavg()
    print_report(results)
    args.json.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwrote {args.json}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        type=Path,
        help="a model folder (default: the one `personabot run` uses, as configured or pulled)",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="repetitions of each measurement (best is reported)"
    )
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--personas", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--history-tokens", type=int, default=1000)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument(
        "--json", type=Path, default=ROOT / "tests" / "bench" / "results" / "bench_generation.json"
    )
    parser.add_argument(
        "--only",
        choices=["all", "serving", "engines", "lean"],
        default="all",
        help="serving: only (e); engines: only (f); lean: only (a), (c) and (g), lean forward on and off",
    )
    parser.add_argument("--device", default="cpu", help="(e) only: cpu or cuda")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="(e) only"
    )
    parser.add_argument(
        "--vllm", choices=["auto", "off"], default="auto", help="(e): vLLM where it can be had"
    )
    parser.add_argument(
        "--llamacpp", choices=["auto", "off"], default="auto", help="(f): llama.cpp where installed"
    )
    parser.add_argument(
        "--vllm-venv", help="(e): a Python environment with vllm (default: tests/vllm/setup_venv.sh)"
    )
    args = parser.parse_args()
    from bot.errors import PersonabotError

    try:
        args.model = find_model(args.model)
    except PersonabotError as exc:
        print(f"{exc}; or pass --model", file=sys.stderr)
        return 2
    if not (args.model / "config.json").is_file():
        print(f"no model at {args.model}; pass --model", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    results: dict[str, Any] = {
        "config": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}},
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "machine": platform.processor() or platform.machine(),
            "load_average_start": os.getloadavg(),
        },
    }
    if args.only == "engines":
        print("measuring one-stream engines ...", file=sys.stderr)
        results["engines"] = bench_engines(args.model, tokenizer, args)
        print_engines(results["engines"])
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str))
        print(f"\nwrote {args.json}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        base = load_model(args.model)
        folders = make_adapters(base, Path(tmp), max(8, args.personas), args.lora_r)
        del base
        gc.collect()
        args.json.parent.mkdir(parents=True, exist_ok=True)
        if args.only == "serving":
            print("measuring serving engines ...", file=sys.stderr)
            results["serving"] = bench_serving(args.model, tokenizer, folders, args, args.json.parent)
            print_serving(results["serving"])
            args.json.write_text(json.dumps(results, indent=2, default=str))
            print(f"\nwrote {args.json}")
            return 0
        if args.only == "lean":
            return engine_only(args, tokenizer, folders, results)
        print("measuring serving engines ...", file=sys.stderr)
        results["serving"] = bench_serving(args.model, tokenizer, folders, args, args.json.parent)
        print("measuring memory ...", file=sys.stderr)
        results["memory"] = bench_memory(args.model, folders)
        print("measuring batching ...", file=sys.stderr)
        results["batching"] = bench_batching(
            args.model, tokenizer, folders, args.jobs, args.personas, args.new_tokens, args.rounds
        )
        print("measuring KV reuse ...", file=sys.stderr)
        results["kv_reuse"] = bench_kv_reuse(args.model, tokenizer, args.history_tokens, max(3, args.rounds))
        print("measuring prefill ...", file=sys.stderr)
        results["prefill"] = bench_prefill(args.model, tokenizer, args.history_tokens, max(3, args.rounds))
        print("measuring batch-1 decode ...", file=sys.stderr)
        results["decode"] = bench_decode(
            args.model, tokenizer, folders, args.decode_tokens, max(3, args.rounds)
        )
        print("measuring one-stream engines ...", file=sys.stderr)
        results["engines"] = bench_engines(args.model, tokenizer, args)
    results["environment"]["load_average_end"] = os.getloadavg()
    print_report(results)
    print_serving(results["serving"])
    print_engines(results["engines"])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

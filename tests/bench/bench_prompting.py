"""Benchmark: full versus incremental prompt rendering at 1k, 4k and 16k tokens of history.

    .venv/bin/python tests/bench/bench_prompting.py [--model FOLDER] [--repeats N]

Uses the real SmolLM2 tokenizer when its folder exists (default /tmp/pbdata/models/SmolLM2-135M-Instruct),
else the tiny byte-level tokenizer from tests/tiny.py. For each size it times, side by side in one run:

- full: `render_prompt` without a cache (every turn tokenized, as on a channel's first message);
- incremental: `render_prompt` with the channel's `PromptCache`, after the previous turn was rendered,
  so only the new assistant reply and user message are tokenized (the worker's steady state);
- skeleton: the walking skeleton's way, `apply_chat_template` to a string, then tokenize it whole.

Each timed call gets fresh string objects, as turns read from the database would be. Goal: incremental
≤ 5 ms median at 4k tokens and ≥ 10× faster than full.

Lorebook: the incremental render of a 16k-token history with a 200-entry lorebook (World Info matching
over the last messages, activated entries put around the system prompt) against the same render without
one, side by side, and a full render with it. Lore changes the system prompt from turn to turn, so the
renderer caches the system part of the first turn apart from each turn's own part.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bot.prompting import ChatRenderer, PromptCache, Turn
from bot.prompting.lorebook import Lorebook, LoreEntry

DEFAULT_MODEL = Path("/tmp/pbdata/models/SmolLM2-135M-Instruct")
SYSTEM = "You are a helpful, friendly assistant. Answer clearly and briefly."
WORDS = (
    "the a to and of in is it you that for on with as be this are was have not what can your but "
    "train station bridge city bay road traffic morning evening weather coffee music book idea plan "
    "maybe really quite fast slow early late because although however therefore 2024 42 ok thanks"
).split()


def load_tokenizer(folder: Path) -> tuple[Any, str]:
    if folder.is_dir():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder, local_files_only=True), str(folder)
    from tests.tiny import byte_level_tokenizer

    return byte_level_tokenizer(), "tiny byte-level tokenizer (tests/tiny.py)"


def sentence(rng: random.Random, n: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n)]
    return " ".join(words).capitalize() + rng.choice([".", "?", "!", " 😀", "…"])


def history(renderer: ChatRenderer, target_tokens: int, seed: int = 0) -> list[Turn]:
    """Alternating turns of 10-60 words until the rendered prompt holds about `target_tokens`."""
    rng = random.Random(seed)
    turns: list[Turn] = []
    while True:
        turns.append(Turn("user", sentence(rng, rng.randint(10, 40))))
        size = len(renderer.render_prompt(turns, system=SYSTEM, max_prompt_tokens=10**9).input_ids)
        if size >= target_tokens:
            return turns
        turns.append(Turn("assistant", sentence(rng, rng.randint(20, 60))))


def fresh(turns: list[Turn]) -> list[Turn]:
    """The same turns as new string objects (no cached hashes), like rows read from the database."""
    return [Turn(t.role, (t.content + "#")[:-1]) for t in turns]


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def bench(renderer: ChatRenderer, turns: list[Turn], repeats: int, budget: int) -> dict[str, float]:
    tokenizer = renderer.tokenizer
    previous = turns[:-2]  # the channel's state before the newest reply and question
    full, incremental, skeleton = [], [], []
    for _ in range(repeats):
        now = fresh(turns)
        started = time.perf_counter()
        expected = renderer.render_prompt(now, system=SYSTEM, max_prompt_tokens=budget)
        full.append(time.perf_counter() - started)

        cache = PromptCache()
        renderer.render_prompt(fresh(previous), system=SYSTEM, max_prompt_tokens=budget, cache=cache)
        now = fresh(turns)
        started = time.perf_counter()
        got = renderer.render_prompt(now, system=SYSTEM, max_prompt_tokens=budget, cache=cache)
        incremental.append(time.perf_counter() - started)
        assert got == expected, "incremental rendering must give the full render's ids"

        messages = [{"role": "system", "content": SYSTEM}] + [
            {"role": t.role, "content": t.content} for t in now
        ]
        started = time.perf_counter()
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        tokenizer(text, add_special_tokens=False)
        skeleton.append(time.perf_counter() - started)
    return {
        "full_ms": median_ms(full),
        "incremental_ms": median_ms(incremental),
        "skeleton_ms": median_ms(skeleton),
        "tokens": len(expected.input_ids),
        "dropped": expected.dropped_turns,
    }


def lorebook(seed: int = 1, size: int = 200) -> Lorebook:
    """`size` entries of one sentence: as in real World Info most are keyed on names the chat seldom
    says (here: never), one in ten on the bench's common words (those fire on most turns); one in four
    has a regex key, some are selective, a few constant."""
    rng = random.Random(seed)
    entries = []
    for i in range(size):
        words = WORDS[20:] if i % 10 == 0 else [f"Name{n}" for n in range(400)]
        entries.append(
            LoreEntry(
                sentence(rng, 12),
                keys=(
                    rng.choice(words),
                    rng.choice(words),
                    f"/\\b{rng.choice(words)}s?\\b/i" if i % 4 == 0 else rng.choice(words),
                ),
                secondary_keys=(rng.choice(WORDS),) if i % 3 == 0 else (),
                selective=i % 3 == 0,
                constant=i % 50 == 0,
                insertion_order=rng.randint(0, 200),
                position="before_char" if i % 2 else "after_char",
                scan_depth=2 if i % 4 else 4,
            )
        )
    return Lorebook(tuple(entries), token_budget=400)


def bench_lore(renderer: ChatRenderer, turns: list[Turn], repeats: int, budget: int) -> dict[str, float]:
    """Incremental renders with and without the lorebook, interleaved; and a full render with it."""
    book = lorebook()
    previous = turns[:-2]
    plain, lore, full = [], [], []
    fired = 0
    for _ in range(repeats):
        for book_or_none, samples in ((None, plain), (book, lore)):
            cache = PromptCache()
            renderer.render_prompt(
                fresh(previous), system=SYSTEM, max_prompt_tokens=budget, cache=cache, lore=book_or_none
            )
            now = fresh(turns)
            started = time.perf_counter()
            got = renderer.render_prompt(
                now, system=SYSTEM, max_prompt_tokens=budget, cache=cache, lore=book_or_none
            )
            samples.append(time.perf_counter() - started)
        started = time.perf_counter()
        expected = renderer.render_prompt(fresh(turns), system=SYSTEM, max_prompt_tokens=budget, lore=book)
        full.append(time.perf_counter() - started)
        assert got == expected, "incremental rendering with lore must give the full render's ids"
        fired = sum(f.admitted for f in got.lore.fired) if got.lore else 0
    return {
        "plain_ms": median_ms(plain),
        "lore_ms": median_ms(lore),
        "full_ms": median_ms(full),
        "fired": fired,
        "tokens": len(expected.input_ids),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="a model folder with a tokenizer")
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--template", default="model")
    args = parser.parse_args()
    tokenizer, source = load_tokenizer(args.model)
    renderer = ChatRenderer(tokenizer, args.template)
    print(
        f"tokenizer: {source}; template {args.template} ({renderer.mode}, prefix_stable={renderer.prefix_stable})"
    )
    print(f"median of {args.repeats} runs; incremental = the channel's previous turn cached, 2 new turns\n")
    header = f"{'history':>8} {'turns':>6} {'tokens':>7} {'full ms':>9} {'incr ms':>9} {'full/incr':>10} {'skeleton ms':>12}"
    print(header)
    print("-" * len(header))
    results = {}
    for target in (1000, 4000, 16000):
        turns = history(renderer, target)
        r = bench(renderer, turns, args.repeats, budget=10**9)
        results[target] = r
        ratio = r["full_ms"] / r["incremental_ms"]
        print(
            f"{target // 1000:>7}k {len(turns):>6} {r['tokens']:>7} {r['full_ms']:>9.2f} "
            f"{r['incremental_ms']:>9.3f} {ratio:>9.1f}x {r['skeleton_ms']:>12.2f}"
        )
    # The worker's real case: a long channel fitted to a window (SmolLM2: 8192 - 256 for the reply).
    turns = history(renderer, 16000)
    fitted = bench(renderer, turns, args.repeats, budget=8192 - 256)
    print(
        f"\n16k history fitted to 7936 tokens: {fitted['tokens']} tokens kept, {fitted['dropped']} turns dropped; "
        f"full {fitted['full_ms']:.2f} ms, incremental {fitted['incremental_ms']:.3f} ms "
        f"({fitted['full_ms'] / fitted['incremental_ms']:.1f}x)"
    )
    lore = bench_lore(renderer, turns, args.repeats, budget=8192 - 256)
    print(
        f"16k history fitted, 200-entry lorebook ({lore['fired']} entries in, {lore['tokens']} tokens): "
        f"incremental {lore['lore_ms']:.3f} ms vs {lore['plain_ms']:.3f} ms without lore "
        f"({lore['lore_ms'] / lore['plain_ms']:.2f}x); full with lore {lore['full_ms']:.2f} ms "
        f"({lore['full_ms'] / lore['lore_ms']:.1f}x the incremental)"
    )
    # The renderer's text is the model template's own, and its ids decode back to it.
    turns = history(renderer, 4000)
    prompt = renderer.render_prompt(turns, system=SYSTEM, max_prompt_tokens=10**9)
    messages = [{"role": "system", "content": SYSTEM}] + [
        {"role": t.role, "content": t.content} for t in turns
    ]
    if args.template == "model":
        same = prompt.text == tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        print(f"4k prompt text equals apply_chat_template's: {same}")
    print(f"4k prompt ids decode to its text: {tokenizer.decode(prompt.input_ids) == prompt.text}")
    four = results[4000]
    ok = four["incremental_ms"] <= 5 and four["full_ms"] / four["incremental_ms"] >= 10
    print(
        f"goal at 4k: incremental {four['incremental_ms']:.3f} ms (≤ 5 ms) and "
        f"{four['full_ms'] / four['incremental_ms']:.1f}x faster than full (≥ 10x): {'met' if ok else 'NOT met'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Reply quality side by side, in one run, on the shipped question set (`bot/quality/questions.jsonl`):

- **baseline**: plain transformers, greedy, the model's own chat template (which brings its default
  system prompt), each conversation continued with its own earlier replies; no personabot code except
  the scores;
- **assistant** (the default persona), **pirate** and **poet**, each through `personabot eval`'s real
  path (worker, renderer, the persona's adapter, its sampling, the loop guard, fixed seed 0), in direct
  chats; and again in the simulated 3-speaker group chat for the name-prefix leak rate.

    PERSONABOT_MODEL__PATH=... .venv/bin/python tests/bench/bench_quality.py [--no-group] [--limit N] [--json PATH]
        [--personas assistant,pirate,poet] [--weights auto,int8,float16] [--no-baseline]

The personas answer with the adapters a fresh install uses (the shipped ones for pirate and poet).
Prints a markdown table and writes JSON (default tests/bench/results/bench_quality.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bot.config import Settings, load_settings  # noqa: E402
from bot.quality import scores  # noqa: E402
from bot.quality.questions import Conversation, read_questions  # noqa: E402
from bot.quality.report import side_by_side  # noqa: E402


def baseline(settings: Settings, questions: list[Conversation], max_new_tokens: int = 200) -> dict[str, Any]:
    """Plain transformers greedy with the model's own template; conversations batched turn by turn."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bot.basemodel import resolve_model

    location = resolve_model(settings)
    tokenizer = AutoTokenizer.from_pretrained(location.folder, gguf_file=location.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(location.folder, gguf_file=location.gguf_file).eval()
    tokenizer.padding_side = "left"
    histories: dict[str, list[dict[str, str]]] = {c.id: [] for c in questions}
    rows: list[dict[str, Any]] = []
    for turn in range(max(len(c.turns) for c in questions)):
        batch = [c for c in questions if turn < len(c.turns)]
        for start in range(0, len(batch), 16):
            part = batch[start : start + 16]
            texts = []
            for c in part:
                histories[c.id].append({"role": "user", "content": c.turns[turn].ask})
                texts.append(
                    tokenizer.apply_chat_template(histories[c.id], tokenize=False, add_generation_prompt=True)
                )
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.inference_mode():
                out = model.generate(
                    **enc,
                    do_sample=False,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                )
            for c, ids in zip(part, out[:, enc["input_ids"].shape[1] :], strict=True):
                reply = tokenizer.decode(ids, skip_special_tokens=True).strip()
                histories[c.id].append({"role": "assistant", "content": reply})
                rows.append({"id": c.id, "turn": turn, "reply": reply, "expect": c.turns[turn].expect})
    replies = [r["reply"] for r in rows]
    share = lambda flags: sum(flags) / len(flags)  # noqa: E731
    return {
        "accuracy": share([scores.is_correct(r["reply"], r["expect"]) for r in rows]),
        "style": None,
        "loop_rate": share([scores.loops(t) for t in replies]),
        "drift_rate": share([not scores.is_english(t) for t in replies]),
        "leak_rate": None,
        "mean_words": sum(scores.word_count(t) for t in replies) / len(replies),
        "distinct_2": scores.distinct_2(replies),
        "replies": rows,
    }


def persona_scores(settings: Settings, slugs: list[str], questions: list[Conversation], group: bool) -> dict:
    from bot.quality.run import evaluate
    from bot.quality.target import resolve_target
    from bot.runtime import load_backend, load_registry

    backend = load_backend(settings)
    registry = load_registry(settings)
    found: dict[str, dict[str, Any]] = {}
    for slug in slugs:
        target = resolve_target(settings, slug, None)
        started = time.perf_counter()
        direct = asyncio.run(evaluate(settings, registry, backend, target, questions))
        values = dict(direct.scores)
        if group:
            grouped = asyncio.run(evaluate(settings, registry, backend, target, questions, group=True))
            values["leak_rate"] = grouped.scores["leak_rate"]
            values["group_accuracy"] = grouped.scores["accuracy"]
        values["version"] = target.version
        values["seconds"] = time.perf_counter() - started
        found[slug] = values
        print(f"{slug}: done in {values['seconds']:.0f}s", file=sys.stderr, flush=True)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--no-group", action="store_true", help="skip the group-chat runs (no leak rate)")
    parser.add_argument("--limit", type=int, help="only the first N conversations (a quick look)")
    parser.add_argument("--personas", default="assistant,pirate,poet", help="comma-separated slugs")
    parser.add_argument(
        "--weights",
        default="auto",
        help="comma-separated model.weights values (auto, float16, int8): each runs the personas once",
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip plain transformers")
    parser.add_argument("--json", type=Path, default=ROOT / "tests/bench/results/bench_quality.json")
    args = parser.parse_args()
    questions = read_questions()[: args.limit]
    slugs = args.personas.split(",")
    rows: list[tuple[str, dict[str, Any]]] = []
    personas: dict[str, dict[str, Any]] = {}
    base: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory() as data:
        # A fresh install: its own data folder, so the shipped adapters are what the personas use.
        settings = load_settings(data_dir=data)
        if not args.no_baseline:
            started = time.perf_counter()
            base = baseline(settings, questions)
            print(f"baseline: done in {time.perf_counter() - started:.0f}s", file=sys.stderr, flush=True)
            rows.append(("plain transformers, greedy, model template", base))
        for weights in args.weights.split(","):
            settings.model.weights = weights  # type: ignore[assignment]  # checked by the backend
            found = persona_scores(settings, slugs, questions, not args.no_group)
            suffix = "" if weights == "auto" else f", {weights} weights"
            for slug, v in found.items():
                personas[slug + suffix.replace(", ", " ")] = v
                rows.append((f"{slug} ({v['version'] or 'base model'}{suffix})", v))
    count = sum(len(c.turns) for c in questions)
    print(f"{count} questions ({len(questions)} conversations), seed 0\n")
    print(side_by_side(rows))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"questions": count, "baseline": base, "personas": personas}, indent=2))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

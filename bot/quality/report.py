"""The report of `personabot eval`: scores, every reply, JSON and a short markdown table."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bot.files import atomic_write_text
from bot.quality import scores
from personas.registry import Persona
from personas.style import style_check

# The scores shown in tables, in order, with their labels.
HEADLINE = (
    ("accuracy", "accuracy"),
    ("style", "style"),
    ("loop_rate", "loop"),
    ("guard_cut_rate", "guard cut"),
    ("drift_rate", "drift"),
    ("leak_rate", "leak"),
    ("mean_words", "words"),
    ("distinct_2", "distinct-2"),
)


@dataclass
class ReplyScore:
    conversation: str
    turn: int
    question: str
    expect: str
    generated: str  # what the model wrote (after the loop guard, before the reply cleanup)
    reply: str  # what was stored
    finish_reason: str
    correct: bool = False
    styled: bool | None = None
    looped: bool = False
    english: bool = True
    leaked: bool = False


@dataclass
class EvalReport:
    persona: str
    version: str | None
    adapter: str | None
    group: bool
    seed: int
    questions: int
    scores: dict[str, float | None]
    replies: list[ReplyScore] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def markdown(self) -> str:
        mode = "group chat (3 speakers)" if self.group else "direct chat"
        lines = [
            f"# eval: {self.persona} ({self.version or 'base model'}), {mode}",
            "",
            f"{self.questions} questions, seed {self.seed}.",
            "",
            "| " + " | ".join(label for _, label in HEADLINE) + " |",
            "|" + " --- |" * len(HEADLINE),
            "| " + " | ".join(format_score(key, self.scores.get(key)) for key, _ in HEADLINE) + " |",
            "",
            "loop: delivered replies that repeat a sentence or word run 3+ times; guard cut: replies the "
            f"loop guard ended early. Failed: {int(self.scores.get('failed') or 0)}.",
        ]
        wrong = [r for r in self.replies if not r.correct][:5]
        if wrong:
            lines += ["", "Some wrong answers:", ""]
            lines += [f"- {r.question} → {r.reply[:120]!r}" for r in wrong]
        return "\n".join(lines) + "\n"

    def write(self, folder: Path) -> tuple[Path, Path]:
        """`eval.json` and `eval.md` (`eval-group.*` for group mode) in `folder`."""
        stem = "eval-group" if self.group else "eval"
        folder.mkdir(parents=True, exist_ok=True)
        data = atomic_write_text(folder / f"{stem}.json", json.dumps(self.to_json(), indent=2) + "\n")
        table = atomic_write_text(folder / f"{stem}.md", self.markdown())
        return data, table


def format_score(key: str, value: float | None) -> str:
    if value is None:
        return "-"
    if key in ("mean_words",):
        return f"{value:.1f}"
    if key == "distinct_2":
        return f"{value:.2f}"
    return f"{value:.0%}" if value in (0.0, 1.0) else f"{value:.1%}"


def _share(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else 0.0


def score_replies(
    persona: Persona,
    replies: list[ReplyScore],
    *,
    group: bool,
    seed: int,
    version: str | None,
    adapter: str | None,
) -> EvalReport:
    check = style_check(persona.spec.style_check)
    for r in replies:
        r.correct = scores.is_correct(r.reply, r.expect)
        r.styled = check(r.reply) if check is not None else None
        r.looped = scores.loops(r.reply)
        r.english = scores.is_english(r.reply)
        r.leaked = scores.leaks_name(r.generated) or scores.leaks_name(r.reply)
    texts = [r.reply for r in replies]
    values: dict[str, float | None] = {
        "accuracy": _share([r.correct for r in replies]),
        "style": _share([bool(r.styled) for r in replies]) if check is not None else None,
        # Delivered replies that loop; the replies the guard had to cut are counted apart.
        "loop_rate": _share([r.looped for r in replies]),
        "guard_cut_rate": _share([r.finish_reason == "loop" for r in replies]),
        "drift_rate": _share([not r.english for r in replies]),
        "leak_rate": _share([r.leaked for r in replies]) if group else None,
        "mean_words": sum(scores.word_count(t) for t in texts) / len(texts) if texts else 0.0,
        "distinct_2": scores.distinct_2(texts),
        "failed": float(sum(1 for r in replies if r.finish_reason not in ("stop", "length", "loop"))),
    }
    return EvalReport(
        persona=persona.slug,
        version=version,
        adapter=adapter,
        group=group,
        seed=seed,
        questions=len(replies),
        scores=values,
        replies=replies,
    )


def side_by_side(rows: list[tuple[str, dict[str, float | None]]]) -> str:
    """A markdown table of several reports' scores, one row each."""
    head = "| run | " + " | ".join(label for _, label in HEADLINE) + " |"
    lines = [head, "| --- |" + " --- |" * len(HEADLINE)]
    for name, values in rows:
        lines.append(f"| {name} | " + " | ".join(format_score(k, values.get(k)) for k, _ in HEADLINE) + " |")
    return "\n".join(lines)

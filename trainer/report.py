"""What a finished run leaves next to its adapter: `loss_curve.png`, `report.md` and `training.json`.

`training.json` holds what the picture and the report show, as data (the loss history, the held-out
losses, the before/after replies), so the web console can draw the curve itself.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bot.files import atomic_write_text
from personas.manifest import HISTORY, LOSS_CURVE, REPORT
from trainer.samples import Sample

__all__ = ["HISTORY", "LOSS_CURVE", "REPORT", "plot_loss_curve", "write_history", "write_report"]


def plot_loss_curve(
    path: Path,
    losses: Sequence[tuple[int, float]],
    *,
    heldout_before: float | None,
    heldout_after: float | None,
    final_step: int,
    title: str,
) -> Path:
    """Training loss per step, with the held-out loss before (step 0) and after (last step) as points."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, safe in a headless run
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        if losses:
            steps, values = zip(*losses, strict=True)
            ax.plot(steps, values, label="training loss (assistant tokens)", color="tab:blue")
        points = [(0, heldout_before), (final_step, heldout_after)]
        shown = [(s, v) for s, v in points if v is not None]
        if shown:
            xs, ys = zip(*shown, strict=True)
            ax.plot(xs, ys, "o--", color="tab:orange", label="held-out loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("cross-entropy (nats / token)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def _quote(text: str) -> str:
    lines = text.splitlines() or [""]
    return "\n".join(f"> {line}" if line else ">" for line in lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_report(
    path: Path,
    *,
    title: str,
    summary: dict[str, Any],
    metrics: dict[str, Any],
    hyperparameters: dict[str, Any],
    before: Sequence[Sample],
    after: Sequence[Sample],
    shown: int = 5,
) -> Path:
    """`report.md`: the run in a table, the metrics, and before/after replies to held-out prompts."""
    out = [f"# {title}", ""]
    out += ["| | |", "| --- | --- |"]
    out += [f"| {k} | {_fmt(v)} |" for k, v in summary.items()]
    out += ["", "## Metrics", "", "| metric | value |", "| --- | --- |"]
    out += [f"| {k} | {_fmt(v)} |" for k, v in metrics.items()]
    out += ["", "## Hyperparameters", "", "| name | value |", "| --- | --- |"]
    out += [f"| {k} | {_fmt(v)} |" for k, v in hyperparameters.items()]
    out += ["", f"## Replies to held-out prompts (first {min(shown, len(after))} of {len(after)})", ""]
    for number, (old, new) in enumerate(zip(before[:shown], after[:shown], strict=False), 1):
        out += [f"### {number}. `{new.where}`", "", "**User:**", "", _quote(new.prompt), ""]
        out += ["**Before training:**", "", _quote(old.reply or "(empty)"), ""]
        out += ["**After training:**", "", _quote(new.reply or "(empty)"), ""]
        out += ["**From the dialogues:**", "", _quote(new.reference), ""]
    path.write_text("\n".join(out).rstrip() + "\n", encoding="utf-8")
    return path


def write_history(
    path: Path,
    losses: Sequence[tuple[int, float]],
    *,
    heldout_before: float | None,
    heldout_after: float | None,
    final_step: int,
    before: Sequence[Sample],
    after: Sequence[Sample],
) -> Path:
    """`training.json`: loss per step, held-out losses and every before/after reply, as data."""
    data = {
        "format": 1,
        "losses": [[int(step), float(value)] for step, value in losses],
        "heldout_loss_before": heldout_before,
        "heldout_loss_after": heldout_after,
        "final_step": final_step,
        "samples": [
            {
                "where": new.where,
                "prompt": new.prompt,
                "reference": new.reference,
                "before": old.reply,
                "after": new.reply,
            }
            for old, new in zip(before, after, strict=False)
        ],
    }
    return atomic_write_text(path, json.dumps(data, ensure_ascii=False, indent=1) + "\n")

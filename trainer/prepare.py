"""From dialogue files to audited, packed rows: everything before the first training step."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bot.errors import PersonabotError
from bot.prompting import ChatRenderer
from bot.prompting.lorebook import Lorebook
from trainer.audit import MaskAuditError, audit_row, audit_rows
from trainer.data import Conversation, DataProblem, read_conversations, shown_path
from trainer.examples import DatasetStats, Row, render_rows
from trainer.packing import PackedRow, pack_sharing_prefix, unpacked
from trainer.split import split_heldout


class DatasetError(PersonabotError):
    """Training data that cannot be used; the message names the first bad file and line."""


@dataclass(frozen=True)
class PreparedData:
    train: list[Row]
    heldout: list[Row]
    heldout_conversations: list[Conversation]  # every held-out conversation, dropped ones included
    train_stats: DatasetStats
    heldout_stats: DatasetStats
    train_packed: list[PackedRow]
    heldout_packed: list[PackedRow]


def _pairs(rows: Sequence[Row]) -> list[tuple[list[int], list[int]]]:
    return [(r.input_ids, r.labels) for r in rows]


def in_file_order(problems: Sequence[DataProblem], files: Sequence[str]) -> list[DataProblem]:
    """Problems sorted by file (in the order the files were given) and line."""
    rank = {f: i for i, f in enumerate(dict.fromkeys([*files, *(p.file for p in problems)]))}
    return sorted(problems, key=lambda p: (rank[p.file], p.line))


def raise_problems(problems: Sequence[DataProblem], hint: str = "") -> None:
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise DatasetError(f"{problems[0]}{more}{hint}")


def prepare(
    conversations: Sequence[Conversation],
    renderer: ChatRenderer,
    *,
    system: str | None,
    max_seq_len: int,
    heldout_fraction: float,
    seed: int,
    packing: bool = True,
    lore: Lorebook | None = None,
) -> PreparedData:
    """Split (seeded), render through `bot.prompting`, audit every row's mask, and pack."""
    if len(conversations) < 2:
        raise DatasetError(
            f"{len(conversations)} conversation(s): training needs at least 2 (one is held out)"
        )
    train_convs, heldout_convs = split_heldout(conversations, heldout_fraction, seed)
    train, train_stats = render_rows(renderer, train_convs, system=system, max_tokens=max_seq_len, lore=lore)
    heldout, heldout_stats = render_rows(
        renderer, heldout_convs, system=system, max_tokens=max_seq_len, lore=lore
    )
    files = [c.file for c in conversations]
    raise_problems(in_file_order(train_stats.errors + heldout_stats.errors, files))
    if not train:
        raise DatasetError(f"no training conversation fits max_seq_len {max_seq_len} with a trained token")
    if not heldout:
        raise DatasetError("every held-out conversation was dropped by max_seq_len; nothing to evaluate on")
    audit_rows(train + heldout, renderer)  # before any step: a wrong mask aborts the run
    # The system prompt every conversation starts with is computed once per row (exact; see packing).
    arrange = (lambda pairs: pack_sharing_prefix(pairs, max_seq_len)) if packing else unpacked
    return PreparedData(
        train=train,
        heldout=heldout,
        heldout_conversations=list(heldout_convs),
        train_stats=train_stats,
        heldout_stats=heldout_stats,
        train_packed=arrange(_pairs(train)),
        heldout_packed=arrange(_pairs(heldout)),
    )


def check_dataset(
    paths: Sequence[Path],
    renderer: ChatRenderer,
    *,
    system: str | None,
    max_seq_len: int,
    lore: Lorebook | None = None,
) -> DatasetStats:
    """`personabot dataset check`: counts, and every problem with its file and line (mask audit included)."""
    conversations, problems = read_conversations(paths)
    rows, stats = render_rows(renderer, conversations, system=system, max_tokens=max_seq_len, lore=lore)
    for row in rows:
        why = audit_row(row, renderer)
        if why is not None:
            problems.append(DataProblem(row.conversation.file, row.conversation.line, f"mask audit: {why}"))
    stats.errors = in_file_order(problems + stats.errors, [shown_path(p) for p in paths])
    return stats


__all__ = ["DatasetError", "MaskAuditError", "PreparedData", "check_dataset", "prepare"]

"""Packing: several conversations share one row, each attending only to itself.

Rows are filled best-fit-decreasing, so they come out nearly full and little compute goes to padding.
Inside a row every conversation's position ids restart at 0. The collator passes `position_ids` and no
2D attention mask: transformers then reads the restarts as sequence boundaries and confines attention to
each conversation (a block-diagonal causal mask for eager/SDPA attention, varlen kernels for flash
attention). The first label of each conversation is forced to -100, so its first token is never
trained as the continuation of the conversation before it.

A shared prefix (`shared_prefix`: every conversation of a persona starts with the same system prompt,
a third of the pirate's tokens) is computed once per row: the row's first conversation keeps it, the
others start right after it (their position ids continue from the prefix's length) and attend to the
first one's copy. A causal model's states over a token prefix do not depend on what follows, so the
logits, the loss and the gradients are those of the conversations trained apart; only the prefix's
forward and backward pass is not repeated. The rows hold the same conversations as without sharing, so
a run takes the same optimizer steps. The collator then passes an explicit 4D attention mask.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from bot.prompting import IGNORE_INDEX


@dataclass(frozen=True)
class PackedRow:
    """Conversations laid end to end: ids, labels, restarting position ids, and their lengths."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    lengths: tuple[int, ...]  # the ids each member occupies in the row
    members: tuple[int, ...]  # indexes of the packed examples, in row order
    prefix: int = 0  # ids at the row's start that every member attends to (its shared prefix)

    def __len__(self) -> int:
        return len(self.input_ids)


def concat(
    examples: Sequence[tuple[Sequence[int], Sequence[int]]], members: Sequence[int], prefix: int = 0
) -> PackedRow:
    """One row from (ids, labels) pairs, in the given order; after the first, each drops the `prefix` ids
    they all start with (see the module docstring)."""
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    lengths: list[int] = []
    for n, (input_ids, row_labels) in enumerate(examples):
        start = prefix if n else 0
        ids.extend(input_ids[start:])
        # Position 0 is never a prediction target: nothing before it in this conversation predicts it.
        # (After a shared prefix, `shared_prefix` guarantees the first label is -100 already.)
        labels.append(IGNORE_INDEX)
        labels.extend(row_labels[start + 1 :])
        positions.extend(range(start, len(input_ids)))
        lengths.append(len(input_ids) - start)
    return PackedRow(
        ids, labels, positions, tuple(lengths), tuple(members), prefix if len(examples) > 1 else 0
    )


def shared_prefix(examples: Sequence[tuple[Sequence[int], Sequence[int]]]) -> int:
    """How many leading ids every example shares and can take from another's copy in its row.

    The longest common prefix of the ids, cut so that no label in it or right after it is trained: the
    prediction of the first id after the prefix is made at the prefix's last state, which only one
    member can own.
    """
    if len(examples) < 2:
        return 0
    first = examples[0][0]
    common = min(len(ids) for ids, _ in examples)
    for ids, _ in examples[1:]:
        common = next((i for i in range(common) if ids[i] != first[i]), common)
    trained = min(
        (next((i for i, v in enumerate(labels) if v != IGNORE_INDEX), len(labels)) for _, labels in examples)
    )
    return max(0, min(common, trained - 1))


def pack(
    examples: Sequence[tuple[Sequence[int], Sequence[int]]], max_len: int, prefix: int = 0
) -> list[PackedRow]:
    """Pack (ids, labels) pairs, each at most `max_len` long, into rows of at most `max_len` ids.

    Best-fit decreasing: the longest example goes first into the fullest row it still fits. Deterministic
    for a given input order; O(n log n) with a sorted list of free capacities. A shared `prefix` (from
    `shared_prefix`) is then kept once per row: the rows, and so the optimizer steps, hold the same
    conversations as without it, in fewer ids.
    """
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i][0]), i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (capacity left, bin index), sorted
    for index in order:
        size = len(examples[index][0])
        if size > max_len:
            raise ValueError(f"example {index} has {size} ids, more than the row length {max_len}")
        if size == 0:
            continue
        slot = bisect.bisect_left(free, (size, -1))
        if slot < len(free):
            left, bin_index = free.pop(slot)
        else:
            bins.append([])
            left, bin_index = max_len, len(bins) - 1
        bins[bin_index].append(index)
        bisect.insort(free, (left - size, bin_index))
    return [concat([examples[i] for i in members], members, prefix) for members in bins]


def pack_sharing_prefix(
    examples: Sequence[tuple[Sequence[int], Sequence[int]]], max_len: int
) -> list[PackedRow]:
    """`pack` with the prefix every example shares kept once per row: what `personabot train` runs."""
    return pack(examples, max_len, shared_prefix(examples))


def unpacked(examples: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[PackedRow]:
    """One example per row (for `packing = false` and for comparisons)."""
    return [concat([e], [i]) for i, e in enumerate(examples)]


def padding_fraction(rows: Sequence[PackedRow], batch_size: int, multiple: int = 1) -> float:
    """Share of padding ids when `rows` are batched in order and each batch is padded to its longest row.

    With shuffled batches the share varies a little from epoch to epoch; this is the figure for the
    packed order (rows sorted longest first), which is what a run reports before it starts.
    """
    real = sum(len(r) for r in rows)
    total = 0
    ordered = sorted(rows, key=len, reverse=True)
    for start in range(0, len(ordered), batch_size):
        batch = ordered[start : start + batch_size]
        longest = -(-max(len(r) for r in batch) // multiple) * multiple
        total += longest * len(batch)
    return 1.0 - real / total if total else 0.0


class PackedCollator:
    """Batches `PackedRow`s (or their dicts) into tensors: input_ids, labels, position_ids.

    Rows are right-padded to the longest in the batch (rounded up to `pad_to_multiple_of`). Padding is a
    run of its own (positions restart at 0), with -100 labels, so it is attended to by nothing real.
    When a row shares a prefix, the batch also gets `attention_mask` (`attention_mask_4d`).
    Counts the real and padding ids it has produced in `real_tokens` / `pad_tokens`.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 1) -> None:
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = max(1, int(pad_to_multiple_of))
        self.real_tokens = 0
        self.pad_tokens = 0

    def __call__(self, rows: Sequence[PackedRow | dict[str, Any]]) -> dict[str, Any]:
        import torch

        items = [r if isinstance(r, dict) else _as_dict(r) for r in rows]
        longest = max(len(item["input_ids"]) for item in items)
        width = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids, labels, positions = [], [], []
        for item in items:
            pad = width - len(item["input_ids"])
            ids.append(list(item["input_ids"]) + [self.pad_token_id] * pad)
            labels.append(list(item["labels"]) + [IGNORE_INDEX] * pad)
            positions.append(list(item["position_ids"]) + list(range(pad)))
            self.real_tokens += len(item["input_ids"])
            self.pad_tokens += pad
        batch = {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "position_ids": torch.tensor(positions, dtype=torch.long),
        }
        if any(item.get("prefix") for item in items):
            batch["attention_mask"] = attention_mask_4d(batch["position_ids"])
        return batch

    @property
    def padding_fraction(self) -> float:
        total = self.real_tokens + self.pad_tokens
        return self.pad_tokens / total if total else 0.0


def attention_mask_4d(position_ids: Any) -> Any:
    """The (batch, 1, ids, ids) boolean mask of packed rows: True where a query may attend to a key.

    A run of ids starts wherever the position does not follow the one before; each id attends causally
    to its own run, and a run that starts at position P > 0 (a conversation after a shared prefix) also
    to the row's first P ids, the prefix's one copy.
    """
    import torch

    index = torch.arange(position_ids.shape[1])
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    run_start = torch.cummax(torch.where(starts, index, 0), dim=1).values  # row index of each id's run start
    prefix_len = position_ids.gather(1, run_start)  # the prefix each id's run continues (0: none)
    causal = index[None, :] <= index[:, None]
    same_run = run_start[:, :, None] == run_start[:, None, :]
    in_prefix = index[None, None, :] < prefix_len[:, :, None]
    return (causal[None] & (same_run | in_prefix))[:, None]


def _as_dict(row: PackedRow) -> dict[str, Any]:
    return {
        "input_ids": row.input_ids,
        "labels": row.labels,
        "position_ids": row.position_ids,
        "prefix": row.prefix,
    }


class PackedDataset:
    """A map-style dataset of packed rows, as dicts the collator and the `Trainer` accept."""

    def __init__(self, rows: Sequence[PackedRow]) -> None:
        self.rows = list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return _as_dict(self.rows[index])

    @property
    def lengths(self) -> list[int]:
        return [len(row) for row in self.rows]


class LengthBucketSampler:
    """Row indexes in batches of rows of similar length, the batches in a seeded random order.

    Rows are sorted by length (ties in a random order) and cut into batches of `batch_size`, so each
    batch pads only to its own longest row; the order of the batches, and which equal-length rows share
    one, changes every epoch (`set_epoch`, which the `Trainer` calls). Transformers' `LengthGroupedSampler`
    sorts only inside random "megabatches", which on a few hundred packed rows still mixes the short tail
    rows into batches of full ones (about 10% padding against under 3% in the training bench).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0) -> None:
        self.lengths = list(lengths)
        self.batch_size = max(1, int(batch_size))
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def batches(self) -> list[list[int]]:
        import torch

        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        ties = torch.randperm(len(self.lengths), generator=generator).tolist()
        order = sorted(range(len(self.lengths)), key=lambda i: (-self.lengths[i], ties[i]))
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        # The DataLoader cuts our index stream into batches again, so a short batch must come last.
        short = [batches.pop()] if batches and len(batches[-1]) < self.batch_size else []
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()] + short

    def __iter__(self) -> Iterator[int]:
        for batch in self.batches():
            yield from batch

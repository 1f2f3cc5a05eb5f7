"""The held-out split: the same conversations every run, from a seed."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def heldout_count(total: int, fraction: float) -> int:
    """How many of `total` items are held out: `round(total * fraction)`, at least 1, never all."""
    if total < 2:
        return 0
    return min(total - 1, max(1, round(total * fraction)))


def split_heldout(items: Sequence[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """(train, held-out): a seeded shuffle of the indexes picks the held-out items.

    Both keep the input order, so the split depends only on the seed, the fraction and the number of
    items, not on the Python version's hash seed or on anything else in the run.
    """
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    held = set(order[: heldout_count(len(items), fraction)])
    train = [item for i, item in enumerate(items) if i not in held]
    heldout = [item for i, item in enumerate(items) if i in held]
    return train, heldout

"""Capped exponential backoff with jitter: the one retry delay every retry loop uses."""

from __future__ import annotations

import random


def backoff(attempt: int, *, base: float, cap: float = 3600.0, jitter: bool = True) -> float:
    """The delay before retry number `attempt` (1 for the first retry): `base`, doubling, at most `cap`.

    With `jitter` the delay is drawn from its upper half, so many clients that failed together do not
    all come back at the same instant.
    """
    delay = min(cap, base * 2 ** max(attempt - 1, 0))
    return delay * random.uniform(0.5, 1.0) if jitter else delay

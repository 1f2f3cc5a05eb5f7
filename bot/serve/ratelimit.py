"""Per-key request limits of the API: at most `rate_per_minute` requests in any 60 seconds.

A sliding window of the key's recent request times, in this process (several `serve` processes each
allow the rate). A refused request learns when the oldest request in the window leaves it.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

WINDOW_SECONDS = 60.0


class RateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._seen: dict[int, deque[float]] = {}

    def check(self, key_id: int, per_minute: int) -> int | None:
        """Count one request; None when allowed, else the seconds to wait (`Retry-After`)."""
        if per_minute <= 0:
            return None
        now = self.clock()
        seen = self._seen.setdefault(key_id, deque())
        while seen and now - seen[0] >= WINDOW_SECONDS:
            seen.popleft()
        if len(seen) >= per_minute:
            return max(1, math.ceil(seen[0] + WINDOW_SECONDS - now))
        seen.append(now)
        return None

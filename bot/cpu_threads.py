"""CPU threads on a machine shared with other work.

PyTorch uses one OpenMP thread per core. When other processes keep some cores busy, every parallel
region ends in a barrier that waits for a thread the OS has descheduled: on a 2-core machine with one
other busy process, a LoRA step of SmolLM2-135M measured 6x slower with 2 threads than with 1. So on
the CPU the worker (before each batch) and the trainer (after each step) use as many threads as there
are cores the other processes leave idle (at least one), measured from the system's and this process's
CPU time since the last check. `--threads N` (or `OMP_NUM_THREADS`) fixes the number instead.
"""

from __future__ import annotations

import os
import time
from typing import Any


def _busy(times: Any) -> float:
    return float(
        times.user + times.nice + times.system + getattr(times, "irq", 0.0) + getattr(times, "softirq", 0.0)
    )


class IdleCoreThreads:
    """Keeps `torch.get_num_threads()` at the number of cores other processes leave idle."""

    def __init__(
        self, fixed: int | None = None, *, cores: int | None = None, min_interval: float = 2.0
    ) -> None:
        import psutil

        self.fixed = fixed
        self.cores = cores or psutil.cpu_count(logical=True) or 1
        self.min_interval = min_interval
        self.process = psutil.Process()
        self.history: list[int] = []
        self._mark = self._sample()

    def _sample(self) -> tuple[float, float, float]:
        import psutil

        mine = self.process.cpu_times()
        return time.monotonic(), _busy(psutil.cpu_times()), float(mine.user + mine.system)

    def others(self) -> float | None:
        """Cores kept busy by other processes since the last call (None: too soon to tell)."""
        now = self._sample()
        wall = now[0] - self._mark[0]
        if wall < self.min_interval:
            return None
        busy, mine = now[1] - self._mark[1], now[2] - self._mark[2]
        self._mark = now
        return max(0.0, (busy - mine) / wall)

    def adjust(self) -> int:
        """Set and return the thread count (the fixed one, or the idle cores' count)."""
        import torch

        if self.fixed is not None:
            wanted = self.fixed
        else:
            others = self.others()
            if others is None:
                return torch.get_num_threads()
            wanted = max(1, min(self.cores, round(self.cores - others)))
        if wanted != torch.get_num_threads():
            torch.set_num_threads(wanted)
        self.history.append(wanted)
        return wanted

    def settle(self) -> int:
        """Adjust now, waiting out the rest of the measuring interval first (before a timed phase)."""
        left = self.min_interval - (time.monotonic() - self._mark[0])
        if left > 0 and self.fixed is None:
            time.sleep(left)
        return self.adjust()


def fixed_threads(requested: int | None) -> int | None:
    """`--threads`, else `OMP_NUM_THREADS`, else None (adapt)."""
    if requested is not None:
        return max(1, requested)
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else None

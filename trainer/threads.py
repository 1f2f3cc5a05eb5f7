"""The trainer's CPU threads: `bot.cpu_threads.IdleCoreThreads`, re-measured after every step."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from bot.cpu_threads import IdleCoreThreads


class CpuThreads(IdleCoreThreads, TrainerCallback):
    """Keeps the torch thread count at the idle cores' count, adjusted after every optimizer step."""

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.adjust()

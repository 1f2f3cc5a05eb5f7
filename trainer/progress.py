"""Training progress and Ctrl-C.

`ProgressBar` replaces the `Trainer`'s own bar: steps, loss, trained (assistant) tokens per second and
the ETA. `StopOnInterrupt` turns the first Ctrl-C into "save a checkpoint and stop after this step", so
`personabot train PERSONA --resume` continues from it; a second Ctrl-C stops at once.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from tqdm import tqdm
from transformers import TrainerCallback


class ProgressBar(TrainerCallback):
    """A tqdm bar over optimizer steps showing loss, trained tokens/s and the ETA (main process only)."""

    def __init__(self, trained_tokens: Callable[[], int], *, file: Any = None) -> None:
        self.trained_tokens = trained_tokens
        self.file = file if file is not None else sys.stderr
        self.bar: tqdm | None = None
        self.started = 0.0
        self.tokens_at_start = 0
        self.last_loss: float | None = None
        self.losses: list[tuple[int, float]] = []  # (step, training loss) for the loss curve

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.bar = tqdm(
                total=state.max_steps,
                initial=state.global_step,
                desc="train",
                unit="step",
                file=self.file,
                dynamic_ncols=True,
            )
        self.started = time.perf_counter()
        self.tokens_at_start = self.trained_tokens()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is None:
            return
        self.bar.update(state.global_step - self.bar.n)
        elapsed = time.perf_counter() - self.started
        tokens = self.trained_tokens() - self.tokens_at_start
        postfix = {"tok/s": f"{tokens / elapsed:.0f}" if elapsed > 0 else "-"}
        if self.last_loss is not None:
            postfix["loss"] = f"{self.last_loss:.3f}"
        self.bar.set_postfix(postfix, refresh=True)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if logs and "loss" in logs:
            self.last_loss = float(logs["loss"])
            self.losses.append((state.global_step, self.last_loss))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def tokens_per_second(self) -> float:
        elapsed = time.perf_counter() - self.started
        return (self.trained_tokens() - self.tokens_at_start) / elapsed if elapsed > 0 else 0.0


class StopOnInterrupt(TrainerCallback):
    """After `request()` (Ctrl-C), saves a checkpoint at the end of the current step and stops."""

    def __init__(self) -> None:
        self.requested = False
        self.stopped_at: int | None = None

    def request(self) -> None:
        self.requested = True

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if _any_process(self.requested, getattr(args, "device", "cpu")):
            self.requested = True
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control


def _any_process(flag: bool, device: Any) -> bool:
    """True on every process when it is true on one: all stop after the same step (DDP would hang)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    box = torch.tensor([int(flag)], device=device)
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return bool(box.item())


@contextmanager
def interrupt_requests(stopper: StopOnInterrupt) -> Iterator[None]:
    """Route the first SIGINT to `stopper.request()`; a second one raises `KeyboardInterrupt`."""

    def handler(signum: int, frame: Any) -> None:
        if stopper.requested:
            raise KeyboardInterrupt
        stopper.request()
        print(
            "\npersonabot: stopping after this step and saving a checkpoint (Ctrl-C again to quit now)",
            file=sys.stderr,
        )

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: leave Ctrl-C alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)

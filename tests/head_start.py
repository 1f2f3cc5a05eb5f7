"""Slow preparations that do not depend on the other tests (a cold mypy run, a vLLM server start-up),
started in a background thread when the session starts, so they use the CPU the tests before them
leave idle, and are done, or nearly, when their tests come (`tests/test_typecheck.py` and
`tests/test_vllm_integration.py` run near the end).

A test names the function it would otherwise call first with `@pytest.mark.head_start(prepare=...)`;
conftest begins it for the selected tests, and the test gets what it returned from `outcome(prepare)`,
which calls it then if it was not begun (a plain call, `--collect-only`, ...). The processes a head
start runs are niced (`NICE`), so the tests that run meanwhile keep their timing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")

NICE = ("nice", "-n", "10")  # prefix for the commands a head start runs
_started: dict[Callable[[], Any], Future[Any]] = {}
_cleanups: list[Callable[[], None]] = []


def begin(prepare: Callable[[], Any]) -> None:
    """Start `prepare` in a background thread, once."""
    if prepare in _started:
        return
    future: Future[Any] = Future()
    _started[prepare] = future

    def run() -> None:
        try:
            future.set_result(prepare())
        except BaseException as exc:  # handed to the test that asks for it
            future.set_exception(exc)

    # A daemon: a session cut short exits without waiting for it (`finish` stops what it started).
    threading.Thread(target=run, name=f"head-start {prepare.__qualname__}", daemon=True).start()


def outcome(prepare: Callable[[], T]) -> T:
    """What `prepare` returned (or raised), waiting for it when it was started early, else running it now."""
    future = _started.pop(prepare, None)
    return future.result() if future is not None else prepare()


def on_exit(cleanup: Callable[[], None]) -> None:
    """Run `cleanup` when the session ends: a process started for tests that never ran must still stop."""
    _cleanups.append(cleanup)


def finish() -> None:
    """Stop what the head starts started (conftest calls it when the session ends)."""
    while _cleanups:
        _cleanups.pop()()

"""tests/head_start.py: a begun preparation runs in the background and hands its result (or its error)
to the test that asks; one never begun runs when asked; cleanups run when the session ends."""

from __future__ import annotations

import threading

import pytest

from tests import head_start


def test_a_begun_preparation_runs_in_the_background_and_hands_over_its_result() -> None:
    release, threads = threading.Event(), []

    def prepare() -> int:
        threads.append(threading.current_thread())
        release.wait(10)
        return 42

    head_start.begin(prepare)
    head_start.begin(prepare)  # once only
    release.set()
    assert head_start.outcome(prepare) == 42
    assert len(threads) == 1 and threads[0] is not threading.current_thread()


def test_an_error_reaches_the_test_and_an_unbegun_preparation_runs_when_asked() -> None:
    def broken() -> None:
        raise RuntimeError("no vLLM here")

    head_start.begin(broken)
    with pytest.raises(RuntimeError, match="no vLLM here"):
        head_start.outcome(broken)
    assert head_start.outcome(lambda: threading.current_thread()) is threading.current_thread()


def test_cleanups_run_at_finish_last_registered_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(head_start, "_cleanups", [])  # not the session's own: its servers keep running
    done: list[str] = []
    head_start.on_exit(lambda: done.append("log folder"))
    head_start.on_exit(lambda: done.append("server"))
    head_start.finish()
    assert done == ["server", "log folder"]

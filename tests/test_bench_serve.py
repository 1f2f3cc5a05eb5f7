"""`tests/bench/bench_serve.py`, run short: concurrent `openai` clients against a real `personabot serve`
(in a child process) get every reply right, streaming and not, with zero errors."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(300)
def test_bench_serve_short_run_has_no_errors() -> None:
    pytest.importorskip("openai")
    run = subprocess.run(
        [sys.executable, str(ROOT / "tests/bench/bench_serve.py"), "--clients", "8", "--seconds", "4"],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    found = re.search(r"(\d+) requests, .* errors (\d+)", run.stdout)
    assert found is not None, run.stdout
    assert int(found.group(1)) > 0 and int(found.group(2)) == 0

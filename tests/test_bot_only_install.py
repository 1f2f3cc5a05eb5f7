"""A bot-only install (`pip install personabot`, without the `local` and `train` extras): `personabot run`
serves with the worker disabled or on the vLLM backend and never imports torch; what needs an extra
says which one, in one line.

Each test runs personabot in a virtual environment where torch, peft, gguf, accelerate and matplotlib
are not installed at all (`tests.botonly`), so an import of them fails there as it would in production.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import select

from bot.store import Store
from bot.store.models import ReplyJob
from tests.botonly import bot_only_python
from tests.fakes.vllm_server import FakeVllm
from tests.processes import persona_env, started
from tests.tiny import byte_level_tokenizer, save_tiny_model

HEAVY = ("torch", "peft", "gguf", "accelerate", "matplotlib")

# `personabot ARGS...`, then the heavy modules (and transformers model code) it imported, on exit.
WATCHED = textwrap.dedent(
    """
    import atexit, json, sys
    def report():
        names = [m for m in sys.modules if m.split(".")[0] in {heavy!r} or ".modeling_" in m]
        print("MODULES " + json.dumps(sorted(names)), file=sys.stderr, flush=True)
    atexit.register(report)
    from bot.cli import main
    sys.exit(main(sys.argv[1:]))
    """
).format(heavy=HEAVY)

PERSONA = """
name = "Echo"
template = "chatml"
system_prompt = "You are echo."
dialogues = []

[sampling]
temperature = 0.0
repetition_penalty = 1.0
max_new_tokens = 20
"""


@pytest.fixture(scope="module")
def python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return bot_only_python(tmp_path_factory.mktemp("botonly") / "venv")


def test_the_bot_only_install_has_no_torch(python: Path) -> None:
    probe = f"import importlib.util as u; print([m for m in {HEAVY!r} if u.find_spec(m)])"
    out = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def bot_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return persona_env(tmp_path, "echo", PERSONA, **extra)


async def run_console(python: Path, env: dict[str, str], cwd: Path, *, reply: bool) -> tuple[str, str]:
    """`personabot run --console`: say one line, (wait for the reply,) SIGTERM; (stdout, stderr)."""
    async with started(python, "-c", WATCHED, "run", "--console", cwd=cwd, env=env) as bot:
        await bot.wait_for("scheduler: started", timeout=300)  # slow on a loaded machine
        await bot.say("hello from a bot-only install")
        if reply:
            await bot.wait_for("answers", timeout=120, stdout=True)
        else:
            await asyncio.sleep(1.0)  # the message is stored and its reply job queued for a worker
        code = await bot.stop()
    log = await bot.log.done()
    assert code == 0, log
    assert "Traceback" not in log, log
    modules = next(line for line in log.splitlines() if line.startswith("MODULES "))
    assert json.loads(modules[len("MODULES ") :]) == [], log
    return await bot.out.done(), log


async def jobs_of(tmp_path: Path) -> list[str]:
    store = Store(f"sqlite:///{tmp_path / 'data' / 'personabot.db'}")
    try:
        async with store.transaction() as session:
            return list((await session.execute(select(ReplyJob.status))).scalars())
    finally:
        await store.close()


async def test_run_without_a_worker_never_imports_torch(python: Path, tmp_path: Path) -> None:
    env = bot_env(tmp_path, PERSONABOT_WORKER__ENABLED="false")
    _, log = await run_console(python, env, tmp_path, reply=False)
    assert "worker: skipped: worker.enabled is false" in log
    assert await jobs_of(tmp_path) == ["pending"]  # queued for a worker elsewhere


@pytest.fixture
async def fake() -> AsyncIterator[FakeVllm]:
    server = FakeVllm(byte_level_tokenizer())
    await server.start()
    yield server
    await server.stop()


async def test_run_on_the_vllm_backend_never_imports_torch(
    python: Path, fake: FakeVllm, tmp_path: Path
) -> None:
    env = bot_env(
        tmp_path,
        PERSONABOT_MODEL__PATH=str(save_tiny_model(tmp_path / "model")),  # its tokenizer, read without torch
        PERSONABOT_GENERATION__BACKEND="vllm",
        PERSONABOT_GENERATION__VLLM__URLS=json.dumps([fake.url]),
    )
    out, log = await run_console(python, env, tmp_path, reply=True)
    assert "answers 20 tokens" in out, log
    assert await jobs_of(tmp_path) == ["done"]


@pytest.mark.parametrize(
    ("args", "extra"),
    [(["chat"], "local"), (["worker"], "local"), (["train", "pirate"], "train")],
)
def test_a_command_that_needs_an_extra_names_it_in_one_line(
    python: Path, tmp_path: Path, args: list[str], extra: str
) -> None:
    env = bot_env(tmp_path)
    done = subprocess.run(
        [python, "-m", "bot.cli", *args], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert (
        f"needs the [{extra}] extra (torch is not installed): pip install 'personabot[{extra}]'"
        in done.stderr
    )

"""A `personabot` process started by a test: its environment, its output read line by line, a wait for a
line it prints, a stop by signal, and a kill when the test leaves early (tests/test_run.py,
tests/test_run_startup.py, tests/test_bot_only_install.py)."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def persona_env(tmp_path: Path, slug: str, persona_toml: str, **extra: str) -> dict[str, str]:
    """This environment without the developer's personabot settings or bot tokens, plus a data folder
    and a personas folder under `tmp_path` whose one persona, `slug`, is the default; quick worker polls."""
    folder = tmp_path / "personas" / slug
    folder.mkdir(parents=True)
    (folder / "persona.toml").write_text(persona_toml)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PERSONABOT_") and k not in ("TELEGRAM_TOKEN", "DISCORD_TOKEN")
    }
    return env | {
        "PERSONABOT_DATA_DIR": str(tmp_path / "data"),
        "PERSONABOT_PERSONAS_DIR": str(tmp_path / "personas"),
        "PERSONABOT_DEFAULT_PERSONA": slug,
        "PERSONABOT_WORKER__POLL_SECONDS": "0.05",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        **extra,
    }


class Lines:
    """Reads a stream line by line in the background, so a full pipe never blocks the process."""

    def __init__(self, stream: asyncio.StreamReader) -> None:
        self.lines: list[str] = []
        self._task = asyncio.create_task(self._read(stream))

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self.lines.append(line.decode().rstrip("\n"))

    async def wait_for(self, text: str, timeout: float = 120.0) -> str:
        async with asyncio.timeout(timeout):
            while True:
                found = next((line for line in self.lines if text in line), None)
                if found is not None:
                    return found
                if self._task.done():
                    raise AssertionError(f"stream ended without {text!r}:\n" + "\n".join(self.lines))
                await asyncio.sleep(0.05)

    async def done(self) -> str:
        await self._task
        return "\n".join(self.lines)


class Child:
    """A started process: `out` reads its stdout, `err` its stderr (None when merged into stdout)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        self.proc = proc
        self.out = Lines(proc.stdout)
        self.err = Lines(proc.stderr) if proc.stderr is not None else None

    @property
    def log(self) -> Lines:
        """Where the process logs: stderr, or stdout when stderr is merged into it."""
        return self.err or self.out

    async def wait_for(self, text: str, *, timeout: float = 120.0, stdout: bool = False) -> str:
        """The first line of the log (or of stdout) holding `text`; if none comes within `timeout`
        seconds, an AssertionError showing everything the process printed."""
        try:
            return await (self.out if stdout else self.log).wait_for(text, timeout)
        except TimeoutError:
            printed = self.out.lines + (self.err.lines if self.err else [])
            raise AssertionError(f"no {text!r} within {timeout:.0f}s:\n" + "\n".join(printed)) from None

    async def say(self, line: str) -> None:
        """Type one line on the process's stdin."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Send `sig`; the exit code, which must come within `timeout` seconds."""
        self.proc.send_signal(sig)
        async with asyncio.timeout(timeout):
            return await self.proc.wait()


@asynccontextmanager
async def started(
    *command: str | Path, cwd: Path, env: dict[str, str], merge_stderr: bool = False
) -> AsyncIterator[Child]:
    """`command` running with pipes on stdin, stdout and stderr; killed on the way out if still running."""
    proc = await asyncio.create_subprocess_exec(
        *command,
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT if merge_stderr else asyncio.subprocess.PIPE,
    )
    try:
        yield Child(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

"""The terminal adapter: one console channel, stdin in, stdout out.

With a terminal it shows a prompt and prints replies as they stream; with piped stdin it prints only
the replies, one block per input line, so it can be scripted. `ConsoleAdapter.read` is the one input
loop: `personabot chat` and `personabot run --console` both use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TextIO

from bot.events import (
    AuthorRef,
    ChannelKind,
    ChannelRef,
    DispatchResult,
    EventHandler,
    Incoming,
    Outgoing,
    PlatformConventions,
)

PLATFORM = "console"


class ConsoleAdapter:
    platform = PLATFORM
    conventions = PlatformConventions()

    def __init__(
        self,
        channel_id: str = "local",
        *,
        user: str | None = None,
        stdout: TextIO | None = None,
        interactive: bool | None = None,
    ) -> None:
        self.stdout = stdout or sys.stdout
        self.interactive = sys.stdin.isatty() if interactive is None else interactive
        self.channel = ChannelRef(PLATFORM, channel_id, ChannelKind.DIRECT, title="terminal")
        name = user or getpass.getuser()
        self.author = AuthorRef(PLATFORM, name, name)
        self._on_event: EventHandler | None = None
        self._session = uuid.uuid4().hex[:12]
        self._count = 0
        self._blocks = 0
        self._streamed = ""

    async def start(self, on_event: EventHandler) -> None:
        self._on_event = on_event

    async def send(self, text: str) -> DispatchResult:
        """Hand one line the user typed to the runtime."""
        assert self._on_event is not None, "start() first"
        self._count += 1
        return await self._on_event(
            Incoming(
                platform=PLATFORM,
                channel=self.channel,
                author=self.author,
                text=text,
                platform_message_id=f"{self._session}-{self._count}",
            )
        )

    async def read(
        self, stdin: TextIO, after_line: Callable[[DispatchResult], Awaitable[None]] | None = None
    ) -> None:
        """Send each non-blank line of `stdin` until it ends; `after_line` runs after each one is handled.

        The prompt is shown when the previous line is done, so replies never interleave with it.
        """
        lines = _lines(stdin)
        while True:
            self.prompt()
            line = await anext(lines, None)
            if line is None:
                return
            text = line.rstrip("\n")
            if not text.strip():
                continue
            result = await self.send(text)
            if result.notice:
                self.show(result.notice)
            if after_line is not None:
                await after_line(result)

    def prompt(self) -> None:
        """The input prompt, when a person is typing."""
        if self.interactive:
            self.stdout.write("you> ")
            self.stdout.flush()

    def show(self, text: str) -> None:
        """Print one block: a reply or a command's answer."""
        if not self.interactive and self._blocks:
            self.stdout.write("\n")
        self._blocks += 1
        self.stdout.write(text.rstrip("\n") + "\n")
        self.stdout.flush()

    def on_partial(self, _index: int, text: str) -> None:
        """Streamed text so far; printed as it grows when a person is watching."""
        if not self.interactive:
            return
        if text.startswith(self._streamed):
            self.stdout.write(text[len(self._streamed) :])
            self.stdout.flush()
            self._streamed = text

    async def deliver(self, reply: Outgoing) -> list[str]:
        if reply.delivered_ids:
            return list(reply.delivered_ids)
        if self.interactive and self._streamed:
            # Already on screen token by token; finish the line.
            rest = reply.text[len(self._streamed) :] if reply.text.startswith(self._streamed) else ""
            self.stdout.write(rest + "\n")
            self.stdout.flush()
        else:
            self.show(reply.text)
        self._streamed = ""
        return [f"console-{reply.outbox_id}"]

    async def edit(self, channel: ChannelRef, platform_message_id: str, text: str) -> None:
        return None  # the terminal shows streamed text as it arrives instead

    async def typing(self, channel: ChannelRef) -> None:
        return None

    async def stop_receiving(self) -> None:
        self._on_event = None

    async def stop(self) -> None:
        self._on_event = None


async def _lines(stdin: TextIO) -> AsyncIterator[str]:
    """Lines of `stdin`, read by a daemon thread so that shutdown never waits on a blocked read."""
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str | None] = asyncio.Queue()

    def put(line: str | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody reads any more
            loop.call_soon_threadsafe(lines.put_nowait, line)

    def read() -> None:
        try:
            for line in stdin:
                put(line)
        finally:
            put(None)

    threading.Thread(target=read, name="console-stdin", daemon=True).start()
    while (line := await lines.get()) is not None:
        yield line

"""The one console input loop (`ConsoleAdapter.read`), used by `personabot chat` and `run --console`."""

from __future__ import annotations

import io

from adapters.console import ConsoleAdapter
from bot.events import DispatchResult, Incoming


async def test_each_line_is_sent_after_the_prompt_and_blank_lines_are_skipped() -> None:
    out = io.StringIO()
    adapter = ConsoleAdapter("t", user="ada", stdout=out, interactive=True)
    sent: list[str] = []
    handled: list[list[int]] = []

    async def on_event(event: Incoming) -> DispatchResult:
        sent.append(event.text)
        # What the screen shows when a line is handled: the prompt came before it was read.
        assert out.getvalue().endswith("you> ")
        return DispatchResult(job_ids=[len(sent)], notice="ok" if event.text == "/help" else None)

    async def after_line(result: DispatchResult) -> None:
        handled.append(list(result.job_ids))

    await adapter.start(on_event)  # type: ignore[arg-type]
    await adapter.read(io.StringIO("hello\n\n   \n/help\nlast line without newline"), after_line)
    assert sent == ["hello", "/help", "last line without newline"]
    assert handled == [[1], [2], [3]]  # after_line ran once per sent line, in order
    assert out.getvalue().count("you> ") == 6  # once per line read, and once more before the end
    assert "ok\n" in out.getvalue()  # a command's notice is shown


async def test_piped_input_shows_no_prompt() -> None:
    out = io.StringIO()
    adapter = ConsoleAdapter("t", user="ada", stdout=out, interactive=False)

    async def on_event(event: Incoming) -> DispatchResult:
        return DispatchResult()

    await adapter.start(on_event)  # type: ignore[arg-type]
    await adapter.read(io.StringIO("a\nb\n"))
    assert out.getvalue() == ""

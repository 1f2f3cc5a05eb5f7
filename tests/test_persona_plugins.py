"""plugin.py hooks: context before the prompt, rewrite or veto after generation, never a crash."""

from __future__ import annotations

import logging
import os
import textwrap
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest

from bot.errors import PersonaError
from personas.plugins import PromptContext, load_plugin, run_after_generation, run_before_prompt
from personas.registry import Persona, PersonaRegistry, load_folder
from tests.test_persona_spec import persona_folder

CTX = PromptContext(
    persona="tester",
    channel="discord:42",
    platform="discord",
    is_direct=False,
    now=datetime(2025, 3, 14, 9, 30, tzinfo=UTC),
    last_user_text="tell me about the kraken",
    channel_title="harbour",
)

PLUGIN = """
from pathlib import Path

from personas.plugins import PromptContext

with Path(__file__).with_name("loads.txt").open("a") as fh:  # counts executions of this file
    fh.write("x")

def before_prompt(ctx: PromptContext) -> str | None:
    if ctx.is_direct:
        return None
    return f"Today is {ctx.now:%A %d %B %Y}. You are in #{ctx.channel_title} on {ctx.platform}."

def after_generation(ctx: PromptContext, reply: str) -> str | None:
    if "forbidden" in reply:
        return None                      # veto: nothing is posted
    return reply.replace("treasure", "booty")
"""


def with_plugin(tmp_path: Path, code: str, slug: str = "tester") -> Persona:
    folder = persona_folder(tmp_path, slug)
    (folder / "plugin.py").write_text(textwrap.dedent(code))
    return load_folder(folder, "user:test")


def test_hooks_add_context_rewrite_and_veto(tmp_path: Path) -> None:
    persona = with_plugin(tmp_path, PLUGIN)
    assert run_before_prompt(persona, CTX) == "Today is Friday 14 March 2025. You are in #harbour on discord."
    assert run_before_prompt(persona, PromptContext(**{**CTX.__dict__, "is_direct": True})) is None
    assert run_after_generation(persona, CTX, "find the treasure") == "find the booty"
    assert run_after_generation(persona, CTX, "this is forbidden") is None


def test_a_persona_without_plugin_keeps_the_default_behaviour(tmp_path: Path) -> None:
    persona = load_folder(persona_folder(tmp_path), "user:test")
    assert load_plugin(persona) is None
    assert run_before_prompt(persona, CTX) is None
    assert run_after_generation(persona, CTX, "unchanged") == "unchanged"


def test_plugin_module_is_loaded_once_and_again_after_an_edit(tmp_path: Path) -> None:
    persona = with_plugin(tmp_path, PLUGIN)
    first = load_plugin(persona)
    for _ in range(3):
        run_before_prompt(persona, CTX)
    loads = persona.folder / "loads.txt"
    assert load_plugin(persona) is first and loads.read_text() == "x"
    path = persona.folder / "plugin.py"
    path.write_text(PLUGIN.replace("Today is", "Now it is"))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert run_before_prompt(persona, CTX).startswith("Now it is")
    run_after_generation(persona, CTX, "reply")
    assert loads.read_text() == "xx"


def test_two_personas_plugins_do_not_clash(tmp_path: Path) -> None:
    a = with_plugin(tmp_path / "a", "def before_prompt(ctx):\n    return 'A'\n", "alpha")
    b = with_plugin(tmp_path / "b", "def before_prompt(ctx):\n    return 'B'\n", "beta")
    assert (run_before_prompt(a, CTX), run_before_prompt(b, CTX)) == ("A", "B")


def test_a_raising_hook_is_logged_and_the_default_is_used(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    persona = with_plugin(
        tmp_path,
        """
        def before_prompt(ctx):
            raise RuntimeError("weather service down")

        def after_generation(ctx, reply):
            return reply[1000]  # IndexError
        """,
    )
    with caplog.at_level(logging.ERROR, logger="personas.plugins"):
        assert run_before_prompt(persona, CTX) is None
        assert run_after_generation(persona, CTX, "short reply") == "short reply"
    messages = [r.getMessage() for r in caplog.records]
    assert "persona tester: before_prompt hook raised; using the default behaviour" in messages
    assert "persona tester: after_generation hook raised; using the default behaviour" in messages
    assert any(r.exc_info and "weather service down" in str(r.exc_info[1]) for r in caplog.records)


def test_wrong_return_types_are_logged_and_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    persona = with_plugin(
        tmp_path,
        """
        def before_prompt(ctx):
            return 42

        def after_generation(ctx, reply):
            return ["not", "a", "string"]
        """,
    )
    with caplog.at_level(logging.ERROR):
        assert run_before_prompt(persona, CTX) is None
        assert run_after_generation(persona, CTX, "kept") == "kept"
    assert "before_prompt returned int, not str; ignored" in caplog.text


def test_blank_rewrite_is_a_veto(tmp_path: Path) -> None:
    persona = with_plugin(tmp_path, "def after_generation(ctx, reply):\n    return '   '\n")
    assert run_after_generation(persona, CTX, "anything") is None


@pytest.mark.parametrize(
    ("code", "problem"),
    [
        ("def before_prompt(ctx):\n    return (\n", "cannot load: SyntaxError"),
        ("import nonexistent_module_xyz\n", "cannot load: ModuleNotFoundError"),
        ("raise SystemExit(3)\n", "cannot load: SystemExit"),
        ("before_prompt = 'not callable'\n", "before_prompt is not a function"),
        (
            "async def after_generation(ctx, reply):\n    return reply\n",
            "must be a plain function, not async def",
        ),
    ],
)
def test_a_broken_plugin_never_crashes_the_reply(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, code: str, problem: str
) -> None:
    persona = with_plugin(tmp_path, code)
    with pytest.raises(PersonaError, match=problem):
        load_plugin(persona)
    with caplog.at_level(logging.ERROR):
        assert run_before_prompt(persona, CTX) is None
        assert run_after_generation(persona, CTX, "still posted") == "still posted"
    assert f"persona tester: plugin disabled: {persona.folder / 'plugin.py'}" in caplog.text
    assert problem in caplog.text


def test_personas_defined_in_code_carry_hooks_objects(tmp_path: Path) -> None:
    base = load_folder(persona_folder(tmp_path), "entry-point:x")
    hooks = SimpleNamespace(
        before_prompt=lambda ctx: f"channel {ctx.channel}",
        after_generation=lambda ctx, reply: reply.upper(),
    )
    persona = Persona(base.spec, base.folder, base.source, hooks)
    assert run_before_prompt(persona, CTX) == "channel discord:42"
    assert run_after_generation(persona, CTX, "arr") == "ARR"


def test_builtin_personas_load_their_plugins_cleanly() -> None:
    for persona in PersonaRegistry.discover(entry_points=False).all():
        load_plugin(persona)  # none today; a broken one added later fails here

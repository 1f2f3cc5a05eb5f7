"""Stored history to prompt turns: whose words are whose, from one persona's point of view."""

from __future__ import annotations

from collections.abc import Sequence

from bot.prompting import Turn
from bot.prompting.types import Role
from bot.store.conversations import HistoryMessage


def group_line(name: str, text: str) -> str:
    """An earlier group chat message as the model sees it: the speaker's name in brackets, then the text.

    Not `name: text`: a log of such lines invites the model to go on with a `Name:` line of its own.
    """
    return f"[{name}] {text}"


def history_to_turns(
    history: Sequence[HistoryMessage],
    *,
    persona: str,
    group: bool,
    up_to_message_id: int | None = None,
    separate_newest: bool = False,
) -> list[Turn]:
    """The turns `persona` sees: its own replies are assistant turns, everyone else speaks as the user.

    In group channels each earlier user line carries its author's name (`group_line`); the newest
    message, the one being answered, is given bare, as in a direct chat, so the model answers it
    instead of continuing a chat log. Consecutive turns of one role are merged, so templates that
    require alternating roles accept the result, except that with `separate_newest` (for templates that
    accept two user turns in a row) the newest message stays a turn of its own. Leading assistant turns
    are dropped, since a conversation starts with the user.
    """
    shown = [m for m in history if up_to_message_id is None or m.id <= up_to_message_id]
    newest = max((i for i, m in enumerate(shown) if m.role in ("user", "assistant")), default=-1)
    turns: list[Turn] = []
    for index, message in enumerate(shown):
        role: Role
        if message.role == "assistant" and message.persona == persona:
            role, content, name = "assistant", message.text, None
        elif message.role == "assistant":
            role, content, name = "user", message.text, message.persona or "bot"
        elif message.role == "user":
            role, content, name = "user", message.text, message.author or None
        else:
            continue
        is_newest = index == newest and role == "user"
        if group and role == "user" and name and not is_newest:
            content = group_line(name, content)
        if turns and turns[-1].role == role and not (is_newest and separate_newest and group):
            turns[-1] = Turn(role, f"{turns[-1].content}\n{content}", turns[-1].name)
        else:
            turns.append(Turn(role, content, name))
    while turns and turns[0].role != "user":
        turns.pop(0)
    return turns

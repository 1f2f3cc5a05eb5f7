"""Stored history to prompt turns: whose words are whose, from one persona's point of view."""

from __future__ import annotations

from collections.abc import Sequence

from bot.prompting import Turn
from bot.store.conversations import HistoryMessage


def group_line(name: str, text: str) -> str:
    """A group chat message as the model sees it: who said it, then what."""
    return f"{name}: {text}"


def history_to_turns(
    history: Sequence[HistoryMessage], *, persona: str, group: bool, up_to_message_id: int | None = None
) -> list[Turn]:
    """The turns `persona` sees: its own replies are assistant turns, everyone else speaks as the user.

    In group channels each user line carries its author's name. Consecutive turns of one role are
    merged, so templates that require alternating roles accept the result; leading assistant turns
    are dropped, since a conversation starts with the user.
    """
    turns: list[Turn] = []
    for message in history:
        if up_to_message_id is not None and message.id > up_to_message_id:
            break
        if message.role == "assistant" and message.persona == persona:
            role, content, name = "assistant", message.text, None
        elif message.role == "assistant":
            role, content, name = "user", message.text, message.persona or "bot"
        elif message.role == "user":
            role, content, name = "user", message.text, message.author or None
        else:
            continue
        if group and role == "user" and name:
            content = group_line(name, content)
        if turns and turns[-1].role == role:
            turns[-1] = Turn(role, f"{turns[-1].content}\n{content}", turns[-1].name)
        else:
            turns.append(Turn(role, content, name))  # type: ignore[arg-type]
    while turns and turns[0].role != "user":
        turns.pop(0)
    return turns

"""`personabot prompt`: show the exact prompt a persona would answer from, for debugging templates."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bot.cli.common import run_async, settings_from
from bot.config import Settings
from bot.prompting import PromptError, Turn, read_history_file


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prompt",
        help="print the rendered prompt for a channel's history or a JSONL file",
        description="Render a conversation exactly as the worker would: template, special tokens, "
        "context-window fitting. Reads the model's tokenizer only, never its weights.",
    )
    p.add_argument("--persona", required=True, help="persona slug (its template, system prompt, window)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--channel",
        metavar="PLATFORM:ID",
        help="a stored channel, e.g. console:local or discord:123[/THREAD]",
    )
    source.add_argument(
        "--history", metavar="FILE.jsonl", type=Path, help='one {"role": ..., "content": ...} object per line'
    )
    p.add_argument("--template", help="override the persona's template: model, llama2 or chatml")
    p.add_argument(
        "--max-new-tokens", type=int, help="tokens kept free for the reply (default: the persona's)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=_prompt)


async def _channel_turns(settings: Settings, key: str, persona: str) -> list[Turn]:
    from bot.conversation import history_to_turns
    from bot.events import ChannelKind, ChannelRef
    from bot.runtime import open_store
    from bot.store import conversations

    platform, sep, rest = key.partition(":")
    if not sep or not platform or not rest:
        raise PromptError(f"--channel {key!r}: expected PLATFORM:ID, e.g. console:local or discord:1234")
    external_id, _, thread = rest.partition("/")
    store = await open_store(settings)
    try:
        async with store.transaction() as session:
            channel_id = await conversations.find_channel(
                session, ChannelRef(platform, external_id, thread_id=thread)
            )
            if channel_id is None:
                raise PromptError(f"--channel {key!r}: no such channel in the store")
            channel = await conversations.channel_by_id(session, channel_id)
            history = await conversations.history(session, channel_id)
    finally:
        await store.close()
    assert channel is not None
    return history_to_turns(history, persona=persona, group=channel.kind != ChannelKind.DIRECT)


# The keys `--json` has always printed (the console's view carries a few more).
_JSON_KEYS = (
    "text",
    "input_ids",
    "special_token_positions",
    "dropped_turns",
    "truncated",
    "tokens",
    "max_prompt_tokens",
    "template",
    "prefix_stable",
    "lore",
)


def _prompt(args: argparse.Namespace) -> int:
    from bot.prompt_view import render_text, render_view
    from bot.runtime import load_registry

    settings = settings_from(args)
    persona = load_registry(settings).get(args.persona)
    if args.history is not None:
        turns = read_history_file(args.history)
    else:
        turns = run_async(_channel_turns(settings, args.channel, persona.slug))
    # A stored channel usually ends with the reply: the view shows the prompt that reply was answering.
    view = render_view(settings, persona, turns, template=args.template, max_new_tokens=args.max_new_tokens)
    if args.json:
        print(json.dumps({key: view[key] for key in _JSON_KEYS}, ensure_ascii=False))
        return 0
    print(render_text(view))
    return 0

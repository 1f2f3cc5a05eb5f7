"""`personabot prompt`: show the exact prompt a persona would answer from, for debugging templates."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bot.cli.common import run_async, settings_from
from bot.config import Settings
from bot.prompting import ChatRenderer, PromptError, Turn, read_history_file


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


def _context_window(settings: Settings, location: Any) -> int:
    """The model's context window from its config (no weights are loaded); 2048 when it says none."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            location.folder, gguf_file=location.gguf_file, local_files_only=True
        )
    except (OSError, ValueError):
        return 2048
    return int(getattr(config, "max_position_embeddings", None) or 2048)


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


def _lore_report(rendered: Any) -> list[dict[str, Any]]:
    """The lorebook entries that fired, why, and whether the budget let them in."""
    if rendered.lore is None:
        return []
    return [
        {
            "entry": f.entry.label,
            "source": f.entry.source,
            "reason": f.reason,
            "tokens": f.tokens,
            "admitted": f.admitted,
            "position": f.entry.position,
        }
        for f in rendered.lore.fired
    ]


def _prompt(args: argparse.Namespace) -> int:
    from bot.basemodel import resolve_model
    from bot.generation.local import load_tokenizer
    from bot.runtime import load_registry

    settings = settings_from(args)
    persona = load_registry(settings).get(args.persona)
    spec = persona.spec
    if args.history is not None:
        turns = read_history_file(args.history)
    else:
        turns = run_async(_channel_turns(settings, args.channel, persona.slug))
    # A stored channel usually ends with the reply: show the prompt that reply was answering.
    answered = 0
    while turns and turns[-1].role != "user":
        turns.pop()
        answered += 1
    if not turns:
        raise PromptError("the conversation has no user turn: there is nothing to render")
    location = resolve_model(settings)
    renderer = ChatRenderer(load_tokenizer(location), args.template or spec.template)
    window = spec.context_window or _context_window(settings, location)
    max_new = args.max_new_tokens if args.max_new_tokens is not None else spec.sampling.max_new_tokens
    if max_new < 0 or max_new >= window:
        raise PromptError(f"--max-new-tokens {max_new} must be between 0 and the context window ({window})")
    from bot.events import utcnow

    rendered = renderer.render_prompt(
        turns,
        system=persona.system_prompt(utcnow()),
        max_prompt_tokens=window - max_new,
        lore=persona.lorebook,
    )
    lore = _lore_report(rendered)
    names = renderer.tokenizer.convert_ids_to_tokens(
        [i for _, i in renderer.special_positions(rendered.input_ids)]
    )
    positions = [
        {"position": pos, "id": tid, "token": name}
        for (pos, tid), name in zip(renderer.special_positions(rendered.input_ids), names, strict=True)
    ]
    if args.json:
        print(
            json.dumps(
                {
                    "text": rendered.text,
                    "input_ids": rendered.input_ids,
                    "special_token_positions": positions,
                    "dropped_turns": rendered.dropped_turns,
                    "truncated": rendered.truncated,
                    "tokens": len(rendered.input_ids),
                    "max_prompt_tokens": window - max_new,
                    "template": renderer.template,
                    "prefix_stable": renderer.prefix_stable,
                    "lore": lore,
                },
                ensure_ascii=False,
            )
        )
        return 0
    print(rendered.text)
    print("-" * 40)
    print(
        f"{len(rendered.input_ids)} tokens (limit {window - max_new} = context window {window} "
        f"- max_new_tokens {max_new}), template {renderer.template}"
    )
    print(f"dropped turns: {rendered.dropped_turns}" + ("; newest message cut" if rendered.truncated else ""))
    if answered:
        print(f"(the {answered} turn(s) after the last user message are left out)")
    if rendered.lore is not None:
        admitted = [e for e in lore if e["admitted"]]
        print(f"lore: {len(admitted)} entries in ({rendered.lore.tokens} tokens), {len(lore)} fired")
        for e in lore:
            status = e["position"] if e["admitted"] else "over the token budget, left out"
            print(f"  {e['entry']} ({e['source']}): {e['reason']}; {e['tokens']} tokens, {status}")
    for note in renderer.notes:
        print(f"note: {note}")
    return 0

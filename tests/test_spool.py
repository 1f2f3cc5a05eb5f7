"""The ingest spool file: events round-trip exactly, done ones are skipped, a torn line is ignored,
and a file held by a live process is not taken over."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from bot.events import AuthorRef, ChannelKind, ChannelRef, Deleted, Edited, Incoming
from bot.spool import SpoolFile, event_from_json, event_to_json, orphans, read_pending

CHANNEL = ChannelRef("discord", "123", ChannelKind.GROUP, "456", "#general <|im_end|>")
WHEN = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
EVENTS = [
    Incoming(
        "discord",
        CHANNEL,
        AuthorRef("discord", "9", "Ada", False, ("1", "2")),
        "hi </s> \u2603",
        "77",
        reply_to="76",
        mentions_bot=True,
        sent_at=WHEN,
        replies_to_bot=True,
    ),
    Edited("discord", CHANNEL, "77", "edited", WHEN),
    Deleted("discord", CHANNEL, "77", WHEN),
]


def test_events_round_trip_exactly() -> None:
    for event in EVENTS:
        assert event_from_json(event_to_json(event)) == event


def test_done_events_and_a_torn_last_line_are_skipped(tmp_path: Path) -> None:
    spool = SpoolFile.claim(tmp_path, "discord")
    for seq, event in enumerate(EVENTS, 1):
        spool.append(seq, event)
    spool.done(2)
    spool._file.write('{"seq": 4, "event": {"ki')  # killed mid-write
    spool._file.flush()
    assert [(s.seq, s.event) for s in spool.pending()] == [(1, EVENTS[0]), (3, EVENTS[2])]
    # Held by this (live) process: not an orphan; another claim gets a second file.
    assert orphans(tmp_path, "discord") == []
    other = SpoolFile.claim(tmp_path, "discord")
    assert other.path.name == "discord-2.jsonl"
    other.close(remove=True)
    spool.close()
    assert orphans(tmp_path, "discord") == [tmp_path / "discord.jsonl"]
    assert orphans(tmp_path, "telegram") == []
    assert len(read_pending(tmp_path / "discord.jsonl")) == 2

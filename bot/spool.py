"""The ingest spool: platform events that could not be stored yet, in a local file.

While the database is unreachable, `bot.ingest.Ingest` appends each event it cannot store to a spool
file under `<data_dir>/spool/` (one JSON line, flushed and fsynced before the platform is told the
event arrived) and marks it done once stored. A process killed meanwhile leaves the file behind;
the next process for the same platforms replays it at start-up. Storing is idempotent (messages are
deduplicated by their platform message id), so an event replayed twice is stored once.

Each process holds an exclusive lock (`flock`) on its file, so two processes on one data directory
never write the same file, and a file nobody holds belongs to a process that is gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from bot.events import AuthorRef, ChannelKind, ChannelRef, Deleted, Edited, Incoming, PlatformEvent

_KINDS: dict[str, type] = {"incoming": Incoming, "edited": Edited, "deleted": Deleted}


def event_to_json(event: PlatformEvent) -> dict[str, Any]:
    kind = next(k for k, cls in _KINDS.items() if isinstance(event, cls))
    data: dict[str, Any] = {"kind": kind}
    for name, value in vars(event).items():
        if isinstance(value, ChannelRef | AuthorRef):
            value = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(value).items()}
        elif isinstance(value, datetime):
            value = value.isoformat()
        data[name] = value
    return data


def event_from_json(data: dict[str, Any]) -> PlatformEvent:
    data = dict(data)
    cls = _KINDS[data.pop("kind")]
    channel = dict(data.pop("channel"))
    channel["kind"] = ChannelKind(channel["kind"])
    data["channel"] = ChannelRef(**channel)
    if "author" in data:
        author = dict(data.pop("author"))
        author["roles"] = tuple(author.get("roles", ()))
        data["author"] = AuthorRef(**author)
    for name in ("sent_at", "edited_at", "deleted_at"):
        if name in data:
            data[name] = datetime.fromisoformat(data[name])
    event: PlatformEvent = cls(**data)
    return event


@dataclass(frozen=True)
class Spooled:
    seq: int
    event: PlatformEvent


class SpoolFile:
    """One process's spool: `{"seq": n, "event": {...}}` lines, then `{"done": n}` lines."""

    def __init__(self, path: Path, handle: IO[str]) -> None:
        self.path = path
        self._file = handle

    @classmethod
    def claim(cls, folder: Path, stem: str) -> SpoolFile:
        """The first `<stem>[-N].jsonl` in `folder` no live process holds; locked until `close()`."""
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(1, 1000):
            path = folder / (f"{stem}.jsonl" if n == 1 else f"{stem}-{n}.jsonl")
            handle = path.open("a+", encoding="utf-8")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            return cls(path, handle)
        raise RuntimeError(f"no free spool file for {stem} in {folder}")

    def pending(self) -> list[Spooled]:
        """Events written and not marked done, oldest first (a torn last line is ignored)."""
        self._file.seek(0)
        return _pending(self._file)

    def append(self, seq: int, event: PlatformEvent) -> None:
        self._write({"seq": seq, "event": event_to_json(event)})

    def done(self, seq: int) -> None:
        self._write({"done": seq})

    def clear(self) -> None:
        """Everything stored: start the file afresh (keeps it from growing across outages)."""
        self._file.truncate(0)
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self, *, remove: bool = False) -> None:
        if remove:
            with contextlib.suppress(OSError):
                self.path.unlink()
        self._file.close()  # releases the lock

    def _write(self, record: dict[str, Any]) -> None:
        self._file.seek(0, os.SEEK_END)
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())  # on disk before the platform is told the event arrived


def _pending(lines: Iterator[str] | IO[str]) -> list[Spooled]:
    events: dict[int, PlatformEvent] = {}
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the last line of a process killed mid-write
        if "done" in record:
            events.pop(int(record["done"]), None)
        else:
            events[int(record["seq"])] = event_from_json(record["event"])
    return [Spooled(seq, event) for seq, event in sorted(events.items())]


def orphans(folder: Path, stem: str) -> list[Path]:
    """Spool files of `stem` left by processes that are gone (nobody holds their lock)."""
    found = []
    for path in sorted(folder.glob(f"{stem}*.jsonl")):
        if path.stem != stem and not path.stem.removeprefix(stem + "-").isdigit():
            continue  # another platform set's file (`telegram` vs `telegram+discord`)
        with path.open("a+", encoding="utf-8") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            fcntl.flock(handle, fcntl.LOCK_UN)
        found.append(path)
    return found


def read_pending(path: Path) -> list[Spooled]:
    """The events waiting in a spool file (for `personabot status` and adoption)."""
    try:
        with path.open(encoding="utf-8") as handle:
            return _pending(handle)
    except FileNotFoundError:
        return []


def spool_report(folder: Path) -> list[dict[str, Any]]:
    """Every spool file with events waiting: path, count, oldest event's time, held by a live process."""
    report = []
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        waiting = read_pending(path)
        if not waiting:
            continue
        first = waiting[0].event
        when = getattr(first, "sent_at", None) or getattr(first, "edited_at", None)
        when = when or getattr(first, "deleted_at", None)
        with path.open("a+", encoding="utf-8") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = False
                fcntl.flock(handle, fcntl.LOCK_UN)
            except BlockingIOError:
                held = True
        report.append(
            {
                "path": str(path),
                "events": len(waiting),
                "oldest": when.isoformat() if when else None,
                "held": held,
            }
        )
    return report

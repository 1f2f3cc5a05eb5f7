"""Training exports: a persona's conversations with opted-in users, in the trainer's JSONL format.

One conversation per line, `{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}`,
the format of the bundled `dialogues.jsonl`. A turn pair is exported only when

- the reply job of `persona` that answered the user's message finished, and neither message is deleted;
- the user is opted in now (`/optin`), sent the message after opting in, and is not a bot;
- no `/forget` erasure of that user in that chat was requested after the message was written.

A channel's pairs split into separate conversations at a `/reset` or after `conversation_gap` of
silence. Automatic exports (under `<data_dir>/exports/`) carry a `.sources.json` sidecar naming the
users and chat of each line, so `scrub_exports` can later remove the lines of users who opted out or
used `/forget`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import and_, exists, or_, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from bot.events import utcnow
from bot.files import atomic_write_text
from bot.store import Store
from bot.store.models import Channel, Erasure, JobStatus, Message, ReplyJob, User

SOURCES_SUFFIX = ".sources.json"


@dataclass
class Conversation:
    """One exported conversation and whose words it holds."""

    channel: str  # `platform:id` or `platform:id/thread`
    messages: list[dict[str, str]] = field(default_factory=list)
    users: set[str] = field(default_factory=set)  # `platform:external_id`
    started_at: datetime | None = None
    ended_at: datetime | None = None

    def as_json(self) -> str:
        return json.dumps({"messages": self.messages}, ensure_ascii=False)


@dataclass(frozen=True)
class ExportResult:
    path: Path | None
    conversations: int
    turns: int
    users: int


def _channel_key(platform: str, external_id: str, thread_id: str) -> str:
    base = f"{platform}:{external_id}"
    return f"{base}/{thread_id}" if thread_id else base


async def collect_conversations(
    session: AsyncSession,
    persona: str,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    conversation_gap: timedelta = timedelta(minutes=30),
) -> list[Conversation]:
    """The persona's exportable conversations, oldest first (see the module docstring for the rules)."""
    asked = aliased(Message)
    answer = aliased(Message)
    erased = exists().where(
        Erasure.platform == User.platform,
        Erasure.user_external_id == User.external_id,
        or_(Erasure.channel_id.is_(None), Erasure.channel_id == asked.channel_id),
        Erasure.requested_at >= asked.created_at,
    )
    query = (
        select(
            asked.id,
            asked.text,
            asked.created_at,
            answer.text,
            answer.created_at,
            User.platform,
            User.external_id,
            Channel.platform,
            Channel.external_id,
            Channel.thread_id,
            Channel.context_floor_id,
        )
        .select_from(ReplyJob)
        .join(asked, asked.id == ReplyJob.trigger_message_id)
        .join(answer, answer.id == ReplyJob.reply_message_id)
        .join(User, User.id == asked.user_id)
        .join(Channel, Channel.id == asked.channel_id)
        .where(
            ReplyJob.persona == persona,
            ReplyJob.status == JobStatus.DONE,
            asked.role == "user",
            asked.deleted_at.is_(None),
            answer.deleted_at.is_(None),
            User.is_bot.is_(False),
            User.training_opt_in.is_(True),
            User.opt_in_changed_at.is_not(None),
            User.opt_in_changed_at <= asked.created_at,
            ~erased,
        )
        .order_by(asked.channel_id, asked.id)
    )
    if since is not None:
        query = query.where(asked.created_at >= since)
    if until is not None:
        query = query.where(asked.created_at < until)

    conversations: list[Conversation] = []
    current: Conversation | None = None
    previous_id = -1
    previous_asked: datetime | None = None
    for row in await session.execute(query):
        (msg_id, text, asked_at, reply, replied_at, u_platform, u_id, c_platform, c_id, thread, floor) = row
        if not text.strip() or not reply.strip():
            continue
        key = _channel_key(c_platform, c_id, thread)
        reset_between = floor is not None and previous_id <= floor < msg_id
        # Silence is measured between the user's messages: a reply written late (a long queue) does
        # not make the next message look like a new conversation.
        if (
            current is None
            or current.channel != key
            or reset_between
            or previous_asked is None
            or asked_at - previous_asked > conversation_gap
        ):
            current = Conversation(channel=key, started_at=asked_at)
            conversations.append(current)
        current.messages.append({"role": "user", "content": text})
        current.messages.append({"role": "assistant", "content": reply})
        current.users.add(f"{u_platform}:{u_id}")
        current.ended_at = max(replied_at, current.ended_at or replied_at)
        previous_id = msg_id
        previous_asked = asked_at
    conversations.sort(key=lambda c: (c.started_at, c.channel))
    return conversations


def write_jsonl(conversations: Iterable[Conversation], path: Path, *, sources: bool) -> ExportResult:
    """Write the conversations to `path` (atomically); with `sources`, the sidecar for later scrubbing."""
    items = list(conversations)
    atomic_write_text(path, "".join(c.as_json() + "\n" for c in items))
    if sources:
        sidecar = {
            "written_at": utcnow().isoformat(),
            "lines": [{"channel": c.channel, "users": sorted(c.users)} for c in items],
        }
        atomic_write_text(_sources_path(path), json.dumps(sidecar, indent=1) + "\n")
    users = {u for c in items for u in c.users}
    return ExportResult(path, len(items), sum(len(c.messages) for c in items), len(users))


def _sources_path(path: Path) -> Path:
    return path.with_name(path.name + SOURCES_SUFFIX)


async def export_persona(
    store: Store,
    persona: str,
    out: Path,
    *,
    since: datetime | None = None,
    conversation_gap: timedelta = timedelta(minutes=30),
    sources: bool = False,
) -> ExportResult:
    """Export the persona's conversations to `out`; see `collect_conversations`."""
    async with store.transaction() as session:
        found = await collect_conversations(session, persona, since=since, conversation_gap=conversation_gap)
    return write_jsonl(found, out, sources=sources)


def exports_dir(data_dir: Path) -> Path:
    return data_dir / "exports"


async def _excluded_users(session: AsyncSession) -> tuple[set[str], set[tuple[str, str]]]:
    """Users opted out now, and (user, chat) pairs erased with `/forget`."""
    opted_out = {
        f"{p}:{e}"
        for p, e in await session.execute(
            select(User.platform, User.external_id).where(User.training_opt_in.is_(False))
        )
    }
    erased: set[tuple[str, str]] = set()
    rows = await session.execute(
        select(Erasure.platform, Erasure.user_external_id, Channel.platform, Channel.external_id).outerjoin(
            Channel, and_(Channel.id == Erasure.channel_id)
        )
    )
    for platform, user, c_platform, c_id in rows:
        chat = f"{c_platform}:{c_id}" if c_platform is not None else "*"
        erased.add((f"{platform}:{user}", chat))
    return opted_out, erased


async def scrub_exports(store: Store, root: Path) -> int:
    """Remove, from every export under `root` with a sidecar, the lines of users who opted out or used
    `/forget` in that chat since it was written. Returns how many lines were removed."""
    if not root.is_dir():
        return 0
    async with store.transaction() as session:
        opted_out, erased = await _excluded_users(session)
    removed = 0
    for path in sorted(root.rglob("*.jsonl")):
        sidecar_path = _sources_path(path)
        if not sidecar_path.is_file():
            continue
        sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
        lines = path.read_text(encoding="utf-8").splitlines()
        sources = sidecar.get("lines", [])
        if len(sources) != len(lines):  # edited by hand: leave it alone rather than guess
            continue
        keep_lines, keep_sources = [], []
        for line, source in zip(lines, sources, strict=True):
            chat = source["channel"].split("/", 1)[0]
            users = source.get("users", [])
            if any(u in opted_out or (u, chat) in erased or (u, "*") in erased for u in users):
                removed += 1
                continue
            keep_lines.append(line)
            keep_sources.append(source)
        if len(keep_lines) != len(lines):
            atomic_write_text(path, "".join(line + "\n" for line in keep_lines))
            sidecar["lines"] = keep_sources
            sidecar["scrubbed_at"] = utcnow().isoformat()
            atomic_write_text(sidecar_path, json.dumps(sidecar, indent=1) + "\n")
    return removed

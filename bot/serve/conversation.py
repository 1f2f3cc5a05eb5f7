"""An API request's `messages` as a stored conversation, and its reply job, in one transaction.

OpenAI clients send the whole conversation with every request, and may edit or regenerate any part of
it. The store keeps one channel per API key and conversation (platform `api`; the conversation is the
`X-Conversation-Id` header, else the `user` field, else `default`), so the model must see exactly the
client's messages there:

- when the channel's visible history (since its last reset) equals the request's messages before the
  last one, only the last one is added: the usual case of a conversation going on;
- otherwise (a new conversation, an edit, a regenerated reply, another persona's replies) the channel's
  context is reset, as `/reset` does (earlier messages are kept, prompts no longer see them), and the
  request's earlier messages are stored after it, the assistant's as this persona's own replies.

The last message must be the user's; it triggers the reply job. The client's `system` messages become
the job's instruction, appended to the user's turn, so they never replace the persona's system prompt
or its special-token structure. The text is stored without ever passing the dispatcher: nothing a
client sends is read as a command. `store: false` uses a channel of its own, deleted once its reply is
delivered.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from adapters.api import PLATFORM
from bot.events import AuthorRef, ChannelKind, ChannelRef, Incoming, utcnow
from bot.store import Store, conversations, jobs
from bot.store.models import Channel, JobStatus, Message, ReplyJob


@dataclass(frozen=True)
class ChatMessage:
    role: str  # user | assistant
    text: str


@dataclass(frozen=True)
class Conversation:
    """What a request asks the queue for: who, where, which persona, what was said, how to sample."""

    key_id: int
    key_name: str
    conversation: str  # the client's conversation id; "" for a `store: false` request
    persona: str
    messages: list[ChatMessage]  # user and assistant turns, the user's last
    instruction: str | None  # the client's system messages
    options: dict[str, Any]

    def channel(self) -> ChannelRef:
        conversation = self.conversation or f"tmp-{uuid.uuid4().hex}"
        return ChannelRef(PLATFORM, f"{self.key_id}:{conversation}", ChannelKind.DIRECT, title=self.key_name)

    def author(self) -> AuthorRef:
        return AuthorRef(PLATFORM, f"key-{self.key_id}", self.key_name)


@dataclass(frozen=True)
class Queued:
    job_id: int
    channel_id: int
    channel: ChannelRef


def _same(stored: list[conversations.HistoryMessage], asked: list[ChatMessage], persona: str) -> bool:
    if len(stored) != len(asked):
        return False
    for have, want in zip(stored, asked, strict=True):
        if have.role != want.role or have.text != conversations.storable_text(want.text):
            return False
        if have.role == "assistant" and have.persona != persona:
            return False
    return True


async def _add(
    session: AsyncSession, channel_id: int, message: ChatMessage, user_id: int, persona: str
) -> None:
    mine = message.role == "assistant"
    session.add(
        Message(
            channel_id=channel_id,
            user_id=None if mine else user_id,
            role=message.role,
            persona=persona if mine else None,
            text=conversations.storable_text(message.text),
            created_at=utcnow(),
        )
    )
    await session.flush()


async def enqueue(store: Store, request: Conversation) -> Queued:
    """Store the request's conversation and queue its reply job (one transaction)."""
    channel = request.channel()
    author = request.author()
    *earlier, last = request.messages
    async with store.transaction() as session:
        found = await conversations.find_channel(session, channel)
        stored = await conversations.history(session, found) if found is not None else []
        if not _same(stored, earlier, request.persona):
            if stored:
                assert found is not None
                await conversations.reset_context(session, found)
            if earlier:
                channel_id = found or await conversations.upsert_channel(session, channel)
                user_id = await conversations.upsert_user(session, author)
                for message in earlier:
                    await _add(session, channel_id, message, user_id, request.persona)
        # Stores the channel and the user too, when they are new.
        ingested = await conversations.ingest(
            session,
            Incoming(
                platform=PLATFORM,
                channel=channel,
                author=author,
                text=last.text,
                platform_message_id=f"req-{uuid.uuid4().hex}",
            ),
        )
        job_id = await jobs.enqueue(
            session,
            channel_id=ingested.channel_id,
            persona=request.persona,
            dedupe_key=f"api:{ingested.message_id}:{request.persona}",
            trigger_message_id=ingested.message_id,
            prompt=request.instruction,
            options=request.options or None,
        )
        assert job_id is not None  # the message was just stored, so its key is new
    return Queued(job_id, ingested.channel_id, channel)


@dataclass(frozen=True)
class Outcome:
    """A job's end as the store has it: None while it is still queued or running."""

    status: JobStatus
    text: str | None  # the reply (None: failed, or closed without a reply)
    error: str | None


async def outcome(store: Store, job_id: int) -> Outcome | None:
    async with store.transaction() as session:
        row = (
            await session.execute(
                select(ReplyJob.status, ReplyJob.error, Message.text)
                .select_from(ReplyJob)
                .outerjoin(Message, Message.id == ReplyJob.reply_message_id)
                .where(ReplyJob.id == job_id)
            )
        ).first()
    if row is None:
        return Outcome(JobStatus.FAILED, None, "the job is gone (its conversation was deleted)")
    status = JobStatus(row.status)
    if status in (JobStatus.PENDING, JobStatus.RUNNING):
        return None
    return Outcome(status, row.text, row.error)


async def forget_when_delivered(store: Store, channel_id: int, *, timeout: float = 60.0) -> None:
    """`store: false`: delete the request's channel (messages, job, outbox row) once its reply is out."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        async with store.transaction() as session:
            if not await jobs.unanswered(session, channel_id):
                break
        await asyncio.sleep(0.05)
    async with store.transaction() as session:
        await session.execute(delete(Channel).where(Channel.id == channel_id))

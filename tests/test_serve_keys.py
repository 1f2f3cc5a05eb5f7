"""`personabot apikey` and the key check of `personabot serve`: hashed keys, 401s, loopback-only when
no key exists, `GET /v1/models` through a real server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from sqlalchemy import select

from bot.cli import main
from bot.config import Settings, load_settings
from bot.generation.base import GenerationBackend
from bot.serve import keys
from bot.serve.auth import is_loopback
from bot.serve.server import serve
from bot.store import Store
from bot.store.models import ApiKeyRecord


def test_apikey_cli_create_list_revoke_stores_only_the_hash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["apikey", "create", "tavern", "--rate", "5"]) == 0
    secret, summary = capsys.readouterr().out.splitlines()
    assert secret.startswith("pb-") and len(secret) > 40
    assert "tavern" in summary and "5/min" in summary

    async def rows() -> list[ApiKeyRecord]:
        store = Store(f"sqlite:///{tmp_path / 'data' / 'personabot.db'}")
        try:
            async with store.transaction() as session:
                return list(await session.scalars(select(ApiKeyRecord)))
        finally:
            await store.close()

    (row,) = asyncio.run(rows())
    assert row.secret_sha256 == hashlib.sha256(secret.encode()).hexdigest()
    assert secret not in repr(vars(row)) and row.prefix == secret[: keys.VISIBLE_CHARS]

    assert main(["apikey", "create", "ops", "--admin"]) == 0
    capsys.readouterr()
    assert main(["apikey", "create", "ops"]) == 2
    assert "taken" in capsys.readouterr().err
    assert main(["apikey", "list"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in listing] == ["tavern", "ops"]
    assert "admin" in listing[1] and "active" in listing[0]
    assert main(["apikey", "revoke", "tavern"]) == 0
    assert main(["apikey", "revoke", "999"]) == 2
    capsys.readouterr()
    assert main(["apikey", "list"]) == 0
    assert "revoked" in capsys.readouterr().out.splitlines()[0]


async def test_authenticate_refuses_unknown_and_revoked_keys(store: Store) -> None:
    key, secret = await keys.create(store, "client", rate_per_minute=7)
    assert await keys.authenticate(store, secret) == key
    assert key.rate_per_minute == 7 and not key.admin
    assert await keys.authenticate(store, secret + "x") is None
    assert await keys.authenticate(store, "sk-whatever") is None
    await keys.revoke(store, str(key.id))
    assert await keys.authenticate(store, secret) is None
    assert not await keys.any_active(store)


def test_loopback_addresses() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("example.org")


def test_serve_refuses_a_public_address_without_keys(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--host", "0.0.0.0", "--port", "0", "--no-worker"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refusing to serve on 0.0.0.0" in err[0] and "apikey create" in err[0]


async def running(settings: Settings, backend: GenerationBackend | None = None) -> AsyncIterator[str]:
    """A `personabot serve` in this event loop (answering with `backend`); yields its base URL."""
    stop = asyncio.Event()
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        serve(settings, stop=stop, say=lambda _: None, on_ready=ready.set_result, backend=backend)
    )
    done, _ = await asyncio.wait([task, ready], return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
    try:
        yield f"http://127.0.0.1:{ready.result()}"
    finally:
        stop.set()
        await task


@pytest.fixture
async def no_worker_server() -> AsyncIterator[str]:
    settings = load_settings(serve={"port": 0, "worker": False})
    async for url in running(settings):
        yield url


async def test_models_need_a_valid_key_once_one_exists(no_worker_server: str) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{no_worker_server}/v1/models") as resp:  # no key exists yet: local use
            assert resp.status == 200
            body = await resp.json()
        slugs = [m["id"] for m in body["data"]]
        assert {"assistant", "pirate", "poet"} <= set(slugs)
        assert all(m["object"] == "model" and "active_version" in m for m in body["data"])

        store = Store(load_settings().resolved_database_url)
        try:
            _, secret = await keys.create(store, "client")
        finally:
            await store.close()
        await asyncio.sleep(2.1)  # the server re-reads "are there keys?" at most this often
        async with http.get(f"{no_worker_server}/v1/models") as resp:
            assert resp.status == 401
            error = (await resp.json())["error"]
            assert error["code"] == "invalid_api_key" and set(error) == {"message", "type", "param", "code"}
        bad = {"Authorization": "Bearer pb-not-a-key"}
        async with http.get(f"{no_worker_server}/v1/models", headers=bad) as resp:
            assert resp.status == 401
        good = {"Authorization": f"Bearer {secret}"}
        async with http.get(f"{no_worker_server}/v1/models", headers=good) as resp:
            assert resp.status == 200
        async with http.get(f"{no_worker_server}/v1/models/pirate", headers=good) as resp:
            assert (await resp.json())["id"] == "pirate"
        async with http.get(f"{no_worker_server}/v1/models/nobody", headers=good) as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["code"] == "model_not_found"


async def test_beyond_loopback_a_key_is_needed_even_after_all_are_revoked(store: Store) -> None:
    from aiohttp.test_utils import make_mocked_request

    from bot.serve.auth import LOCAL_KEY, KeyCheck
    from bot.serve.errors import ApiError

    anonymous = make_mocked_request("GET", "/v1/models")
    assert await KeyCheck(store, host="127.0.0.1").key_of(anonymous) == LOCAL_KEY
    key, _ = await keys.create(store, "gone")
    await keys.revoke(store, key.name)
    with pytest.raises(ApiError) as refused:
        await KeyCheck(store, host="0.0.0.0").key_of(anonymous)
    assert refused.value.status == 401


def test_personabot_serve_process_serves_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    """The real command: `personabot serve` in its own process, a request, then SIGTERM -> exit 0."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import urllib.request

    env = {**os.environ, "PERSONABOT_DATA_DIR": str(tmp_path / "data")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "bot.cli", "serve", "--port", "0", "--no-worker"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            found = re.search(r"serving (http://127\.0\.0\.1:\d+/v1)", line)
            if found:
                break
        assert found, "".join(lines)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"{found.group(1)}/models", timeout=30) as resp:
            assert resp.status == 200 and json.loads(resp.read())["object"] == "list"
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, "".join(lines) + rest
        assert "stopped" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

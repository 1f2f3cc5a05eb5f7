"""The web console in a real headless Chromium (Debian's `chromium` and `chromium-driver`, via selenium).

The console runs in a real aiohttp server on 127.0.0.1 in a thread of its own (selenium's calls block),
with a real SQLite store; screenshots of every page land in the test's tmp_path.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web
from sqlalchemy import select

from bot.config import Settings, load_settings
from bot.store import Store
from bot.store.models import Channel, OutboxDelivery
from personas.versions import list_versions
from tests.test_console import (  # noqa: F401  (_tiny_base is an autouse fixture)
    Secrets,
    _tiny_base,
    make_keys,
    refused_delivery,
    serve_app,
    trained_versions,
)
from tests.test_serve_api import Server, start_server
from tests.tiny import save_tiny_model

CHROMEDRIVER = "/usr/bin/chromedriver"
T = TypeVar("T")

webdriver = pytest.importorskip(
    "selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')"
)
if shutil.which("chromium") is None or not Path(CHROMEDRIVER).is_file():
    pytest.skip(
        "headless Chromium is not installed: apt-get install -y chromium chromium-driver",
        allow_module_level=True,
    )

from selenium.webdriver.common.by import By  # noqa: E402  (after the skip: selenium may be missing)
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


class ServerThread:
    """An aiohttp app and its store on an event loop in a thread; `call` runs a coroutine there."""

    def __init__(self, build: Callable[[Store], Awaitable[web.Application]], db_url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.store = Store(db_url)
        self.call(self.store.upgrade())
        self.runner = web.AppRunner(self.call(build(self.store)))
        self.call(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.call(site.start())
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    def call(self, coro: Coroutine[Any, Any, T] | Awaitable[T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=120)  # type: ignore[arg-type]

    def close(self) -> None:
        self.call(self.runner.cleanup())
        self.call(self.store.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture
def settings() -> Settings:
    return load_settings()


@pytest.fixture
def server(tmp_path: Path, settings: Settings) -> Iterator[ServerThread]:
    async def build(store: Store) -> web.Application:
        return serve_app(store, settings)

    thread = ServerThread(build, f"sqlite:///{tmp_path / 'store.db'}")
    try:
        yield thread
    finally:
        thread.close()


@pytest.fixture
def browser() -> Iterator[Any]:
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def log_in(browser: Any, server: ServerThread, secret: str) -> None:
    browser.get(f"{server.url}/console/personas")
    assert "Log in" in browser.title  # the 401 page is the log-in form
    browser.find_element(By.ID, "key").send_keys(secret)
    browser.find_element(By.ID, "login").click()
    WebDriverWait(browser, 30).until(expected_conditions.title_contains("Personas"))


async def api_channels(store: Store) -> list[str]:
    async with store.transaction() as session:
        return list(
            (await session.scalars(select(Channel.external_id).where(Channel.platform == "api"))).all()
        )


def no_horizontal_scroll(browser: Any) -> bool:
    return bool(browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth"))


@pytest.fixture
def secrets(server: ServerThread) -> Secrets:
    return server.call(make_keys(server.store))


def test_personas_version_curve_and_activation(
    server: ServerThread, browser: Any, settings: Settings, secrets: Secrets, tmp_path: Path
) -> None:
    server.call(trained_versions(server.store, settings))
    log_in(browser, server, secrets.admin)
    browser.save_screenshot(str(tmp_path / "personas.png"))

    browser.find_element(By.LINK_TEXT, "v1").click()
    WebDriverWait(browser, 30).until(expected_conditions.title_contains("pirate v1"))
    curve = browser.find_element(By.CSS_SELECTOR, "svg.loss-curve path.train-loss")
    points = curve.get_attribute("d").split()
    assert len(points) == 4 and points[0].startswith("M")
    assert curve.size["width"] > 100  # laid out and visible, not only present in the markup
    assert len(browser.find_elements(By.CSS_SELECTOR, "svg.loss-curve circle.heldout-loss")) == 2
    assert browser.find_element(By.ID, "heldout-after").text == "1.8000"
    browser.save_screenshot(str(tmp_path / "version-v1.png"))

    browser.find_element(By.CSS_SELECTOR, "button.activate").click()
    WebDriverWait(browser, 30).until(expected_conditions.presence_of_element_located((By.ID, "notice")))
    assert "version v1 is active" in browser.find_element(By.ID, "notice").text

    async def active() -> dict[str, bool]:
        async with server.store.transaction() as session:
            return {v.version: v.is_active for v in await list_versions(session, "pirate")}

    assert server.call(active()) == {"v1": True, "v2": False}
    row = browser.find_element(By.CSS_SELECTOR, '#persona-pirate tr[data-version="v1"]')
    assert "active" in row.text
    browser.save_screenshot(str(tmp_path / "activated.png"))


def test_operations_retry_a_failed_delivery(
    server: ServerThread, browser: Any, secrets: Secrets, tmp_path: Path
) -> None:
    delivery = server.call(refused_delivery(server.store))
    log_in(browser, server, secrets.admin)
    browser.find_element(By.LINK_TEXT, "Operations").click()
    row = browser.find_element(By.ID, f"delivery-{delivery}")
    assert "failed" in row.text and "Cannot send messages to this user" in row.text
    browser.save_screenshot(str(tmp_path / "operations.png"))
    row.find_element(By.CSS_SELECTOR, "button.retry").click()
    WebDriverWait(browser, 30).until(expected_conditions.presence_of_element_located((By.ID, "notice")))
    assert f"delivery {delivery} requeued" in browser.find_element(By.ID, "notice").text

    async def status() -> str:
        async with server.store.transaction() as session:
            row = await session.get(OutboxDelivery, delivery)
            assert row is not None
            return row.status

    assert server.call(status()) == "pending"


def test_every_page_fits_a_phone_screen(
    server: ServerThread, browser: Any, settings: Settings, secrets: Secrets, tmp_path: Path
) -> None:
    server.call(trained_versions(server.store, settings))
    server.call(refused_delivery(server.store, text="a long reply " * 40))
    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True},
    )
    browser.get(f"{server.url}/console/login")
    assert no_horizontal_scroll(browser)
    log_in(browser, server, secrets.admin)
    for name in ("personas", "personas/pirate/versions/v1", "playground", "operations"):
        browser.get(f"{server.url}/console/{name}")
        assert browser.execute_script("return window.innerWidth") == 390
        assert no_horizontal_scroll(browser), f"{name} scrolls sideways at 390 px"
        browser.save_screenshot(str(tmp_path / f"phone-{name.replace('/', '-')}.png"))


async def test_playground_sends_a_message_and_shows_the_reply_and_prompt(
    browser: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole path: browser -> console -> this process's /v1/chat/completions -> queue -> worker
    (scripted backend) -> outbox -> the waiting request -> the page."""
    monkeypatch.setenv("PERSONABOT_MODEL__PATH", str(save_tiny_model(tmp_path / "tiny")))
    async for server in start_server():
        conversation_before = await api_channels(server.store)

        def drive(server: Server) -> tuple[str, str]:
            browser.get(f"{server.url}/console/login")
            browser.find_element(By.ID, "key").send_keys(server.secret)
            browser.find_element(By.ID, "login").click()
            WebDriverWait(browser, 30).until(expected_conditions.title_contains("Personas"))
            browser.get(f"{server.url}/console/playground")
            Select(browser.find_element(By.ID, "model")).select_by_value("pirate")
            browser.find_element(By.ID, "message").send_keys("ahoy there, matey")
            browser.find_element(By.ID, "send").click()
            wait = WebDriverWait(browser, 60)
            wait.until(
                lambda b: (
                    b.find_elements(By.CSS_SELECTOR, ".bubble.assistant")
                    and "…" not in b.find_element(By.CSS_SELECTOR, ".bubble.assistant").text
                )
            )
            wait.until(lambda b: b.find_element(By.ID, "prompt").text)
            browser.save_screenshot(str(tmp_path / "playground.png"))
            return (
                browser.find_element(By.CSS_SELECTOR, ".bubble.assistant").text,
                browser.find_element(By.ID, "prompt").text,
            )

        reply, prompt = await asyncio.to_thread(drive, server)
        assert reply == "echo -> ahoy there, matey"
        # The prompt shown is, character for character, the one the worker rendered for this reply.
        assert "<|im_start|>user\nahoy there, matey<|im_end|>" in prompt
        assert prompt == server.backend.prompts[-1].strip()
        # The reply went through the store, in a conversation of its own (the playground's `user` id).
        assert len(await api_channels(server.store)) == len(conversation_before) + 1

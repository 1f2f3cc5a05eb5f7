"""A fake Telegram Bot API on 127.0.0.1, for driving the real python-telegram-bot client in tests.

It speaks the wire format the client uses: `POST /bot<token>/<method>`, form-encoded parameters (non-string
values as JSON strings), answers `{"ok": true, "result": ...}` or `{"ok": false, "error_code": ...}`. It
keeps an update queue served by a cancellable long poll (`getUpdates`), records every call, remembers the
messages the bot posted (so tests can reply to them), and enforces the checks the real API makes that
matter to an adapter: the token, the 4,096-character limit, empty texts, "message is not modified".
Failures (429 with `retry_after`, 5xx) are injected per method with `fail()`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

# A token in the shape BotFather issues (the adapter checks the shape before it calls the API).
TOKEN = "123456789:AAHfakeTokenForTestsOnly_abcdefghijkl"
BOT_ID = 123456789
BOT_USERNAME = "persona_test_bot"
MESSAGE_LIMIT = 4096


def utf16_len(text: str) -> int:
    """Telegram measures texts in UTF-16 code units."""
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


@dataclass(frozen=True)
class FakeUser:
    id: int
    first_name: str
    username: str | None = None
    is_bot: bool = False

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"id": self.id, "is_bot": self.is_bot, "first_name": self.first_name}
        if self.username:
            data["username"] = self.username
        return data


@dataclass(frozen=True)
class FakeChat:
    id: int
    type: str = "private"  # private | group | supergroup
    title: str | None = None
    is_forum: bool = False
    first_name: str | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"id": self.id, "type": self.type}
        if self.title:
            data["title"] = self.title
        if self.first_name:
            data["first_name"] = self.first_name
        if self.is_forum:
            data["is_forum"] = True
        return data

    @staticmethod
    def private(user: FakeUser) -> FakeChat:
        return FakeChat(user.id, "private", first_name=user.first_name)


BOT_USER = FakeUser(BOT_ID, "Persona Test Bot", BOT_USERNAME, is_bot=True)


@dataclass
class Call:
    method: str
    params: dict[str, str]
    at: float = field(default_factory=time.monotonic)

    def int(self, key: str) -> int | None:
        value = self.params.get(key)
        return None if value in (None, "") else int(value)

    def json(self, key: str) -> Any:
        value = self.params.get(key)
        return None if value is None else json.loads(value)


@dataclass
class _Failure:
    status: int
    description: str
    parameters: dict[str, Any] | None
    times: int
    after: int  # calls of the method let through before failing


class FakeBotAPI:
    """The Bot API of one bot, served on a random free port of 127.0.0.1."""

    def __init__(self, token: str = TOKEN, *, bot: FakeUser = BOT_USER) -> None:
        self.token = token
        self.bot = bot
        self.calls: list[Call] = []
        self.updates: list[dict[str, Any]] = []
        self.messages: dict[tuple[int, int], dict[str, Any]] = {}  # (chat id, message id) -> message
        self.webhook: dict[str, Any] = {"url": "", "secret_token": None}
        self.commands: list[dict[str, str]] = []  # the "/" menu (setMyCommands)
        self._polls = 0  # getUpdates calls so far: only the newest one may wait
        self._failures: dict[str, list[_Failure]] = {}
        self._slow: dict[str, list[float]] = {}  # method -> answer delays of its next calls
        self._update_ids = itertools.count(1000)
        self._message_ids: dict[int, itertools.count[int]] = {}
        self._new_update = asyncio.Condition()
        self._clock = itertools.count(1_700_000_000)
        self._runner: web.AppRunner | None = None
        self.port = 0

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/bot{token}/{method}", self._handle)
        app.router.add_get("/bot{token}/{method}", self._handle)
        # The long poll must end when the client cancels it, or shutdown waits for its timeout.
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/bot"

    @property
    def base_file_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/file/bot"

    # -- what tests do -----------------------------------------------------------------------------

    def fail(
        self,
        method: str,
        status: int,
        *,
        retry_after: int | None = None,
        times: int = 1,
        after: int = 0,
        description: str | None = None,
        parameters: dict[str, Any] | None = None,
    ) -> None:
        """After `after` more calls of `method` succeed, the next `times` answer `status`.

        A 429 carries `retry_after` in its `parameters`, as Telegram's flood control does; a group
        upgraded to a supergroup answers 400 with `parameters={"migrate_to_chat_id": ...}`.
        """
        text = description or {429: f"Too Many Requests: retry after {retry_after}"}.get(
            status, f"Internal Server Error ({status})"
        )
        if retry_after is not None:
            parameters = {**(parameters or {}), "retry_after": retry_after}
        self._failures.setdefault(method, []).append(_Failure(status, text, parameters, times, after))

    def slow(self, method: str, seconds: float, *, times: int = 1) -> None:
        """The next `times` calls of `method` are carried out at once but answered `seconds` later
        (a send whose answer is lost or late: the message is already posted)."""
        self._slow.setdefault(method, []).extend([seconds] * times)

    def clear_failures(self) -> None:
        self._failures.clear()

    def next_message_id(self, chat_id: int) -> int:
        return next(self._message_ids.setdefault(chat_id, itertools.count(1)))

    def message(
        self,
        chat: FakeChat,
        user: FakeUser | None,
        text: str | None = None,
        *,
        entities: list[dict[str, Any]] | None = None,
        reply_to: dict[str, Any] | None = None,
        thread_id: int | None = None,
        message_id: int | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """A message object as Telegram sends it in an update (not queued: see `push`)."""
        msg: dict[str, Any] = {
            "message_id": message_id if message_id is not None else self.next_message_id(chat.id),
            "date": next(self._clock),
            "chat": chat.to_json(),
        }
        if user is not None:
            msg["from"] = user.to_json()
        if text is not None:
            msg["text"] = text
        if entities:
            msg["entities"] = entities
        if reply_to is not None:
            msg["reply_to_message"] = reply_to
        if thread_id is not None:
            msg["message_thread_id"] = thread_id
            msg["is_topic_message"] = True
        msg.update(extra)
        self.messages[(chat.id, msg["message_id"])] = msg
        return msg

    def push(self, update: dict[str, Any]) -> int:
        """Queue an update for `getUpdates`; an `update_id` is assigned when it has none."""
        update = dict(update)
        update.setdefault("update_id", next(self._update_ids))
        self.updates.append(update)
        asyncio.get_running_loop().create_task(self._notify())
        return int(update["update_id"])

    def send(
        self, chat: FakeChat, user: FakeUser | None, text: str | None = None, **kw: Any
    ) -> dict[str, Any]:
        """A user posts a message: builds it and queues its update; returns the message."""
        msg = self.message(chat, user, text, **kw)
        self.push({"message": msg})
        return msg

    def edit(self, message: dict[str, Any], text: str) -> dict[str, Any]:
        """A user edits one of their messages: queues an `edited_message` update."""
        edited = dict(message, text=text, edit_date=next(self._clock))
        self.messages[(edited["chat"]["id"], edited["message_id"])] = edited
        self.push({"edited_message": edited})
        return edited

    def calls_of(self, method: str) -> list[Call]:
        return [c for c in self.calls if c.method == method]

    def bot_messages(self, chat_id: int | None = None) -> list[dict[str, Any]]:
        """What the bot posted (with edits applied), in order."""
        return [
            m
            for (cid, _), m in sorted(self.messages.items(), key=lambda kv: (kv[1]["date"], kv[0][1]))
            if m.get("from", {}).get("id") == self.bot.id and (chat_id is None or cid == chat_id)
        ]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.02)

    # -- the API -----------------------------------------------------------------------------------

    async def _notify(self) -> None:
        async with self._new_update:
            self._new_update.notify_all()

    async def _handle(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            return _error(401, "Unauthorized")
        method = request.match_info["method"]
        form = await request.post() if request.can_read_body else {}
        params = {k: v for k, v in form.items() if isinstance(v, str)}
        call = Call(method, params)
        self.calls.append(call)
        failures = self._failures.get(method)
        if failures and failures[0].after > 0:
            failures[0].after -= 1
        elif failures:
            failure = failures[0]
            failure.times -= 1
            if failure.times <= 0:
                failures.pop(0)
            return _error(failure.status, failure.description, failure.parameters)
        handler = getattr(self, f"_api_{method}", None)
        if handler is None:
            return _error(404, "Not Found: method not found")
        try:
            response = await handler(call)
        except _ApiError as exc:
            return _error(exc.status, exc.description)
        if self._slow.get(method):
            await asyncio.sleep(self._slow[method].pop(0))
        return response

    async def _api_getMe(self, call: Call) -> web.Response:
        return _ok(dict(self.bot.to_json(), can_join_groups=True, can_read_all_group_messages=False))

    async def _api_getMyCommands(self, call: Call) -> web.Response:
        return _ok(self.commands)

    async def _api_setMyCommands(self, call: Call) -> web.Response:
        self.commands = [
            {"command": c["command"], "description": c["description"]} for c in call.json("commands")
        ]
        return _ok(True)

    async def _api_deleteWebhook(self, call: Call) -> web.Response:
        self.webhook = {"url": "", "secret_token": None}
        return _ok(True)

    async def _api_setWebhook(self, call: Call) -> web.Response:
        self.webhook = {
            "url": call.params.get("url", ""),
            "secret_token": call.params.get("secret_token"),
            "allowed_updates": call.json("allowed_updates"),
        }
        return _ok(True)

    async def _api_getUpdates(self, call: Call) -> web.Response:
        if self.webhook.get("url"):
            raise _ApiError(409, "Conflict: can't use getUpdates method while webhook is active")
        offset = call.int("offset") or 0
        timeout = call.int("timeout") or 0
        limit = call.int("limit") or 100
        if offset:  # confirming: updates below the offset are gone for good
            self.updates = [u for u in self.updates if u["update_id"] >= offset]
        # A newer getUpdates ends the one still waiting, as Telegram does with two pollers.
        self._polls += 1
        mine = self._polls
        await self._notify()
        deadline = time.monotonic() + timeout
        async with self._new_update:
            while not self.updates and time.monotonic() < deadline and self._polls == mine:
                try:
                    await asyncio.wait_for(self._new_update.wait(), deadline - time.monotonic())
                except TimeoutError:
                    break
        if self._polls != mine:
            raise _ApiError(
                409,
                "Conflict: terminated by other getUpdates request; make sure that only one bot instance "
                "is running",
            )
        return _ok(self.updates[:limit])

    async def _api_sendMessage(self, call: Call) -> web.Response:
        chat_id = _required_int(call, "chat_id")
        text = call.params.get("text", "")
        _check_text(text)
        msg: dict[str, Any] = {
            "message_id": self.next_message_id(chat_id),
            "date": next(self._clock),
            "chat": {"id": chat_id, "type": "private" if chat_id > 0 else "supergroup"},
            "from": self.bot.to_json(),
            "text": text,
        }
        thread = call.int("message_thread_id")
        if thread is not None:
            msg["message_thread_id"] = thread
            msg["is_topic_message"] = True
        reply = call.json("reply_parameters")
        if reply and (chat_id, reply["message_id"]) in self.messages:
            msg["reply_to_message"] = self.messages[(chat_id, reply["message_id"])]
        self.messages[(chat_id, msg["message_id"])] = msg
        return _ok(msg)

    async def _api_editMessageText(self, call: Call) -> web.Response:
        chat_id = _required_int(call, "chat_id")
        message_id = _required_int(call, "message_id")
        text = call.params.get("text", "")
        _check_text(text)
        msg = self.messages.get((chat_id, message_id))
        if msg is None:
            raise _ApiError(400, "Bad Request: message to edit not found")
        if msg.get("from", {}).get("id") != self.bot.id:
            raise _ApiError(400, "Bad Request: message can't be edited")
        if msg.get("text") == text:
            raise _ApiError(
                400,
                "Bad Request: message is not modified: specified new message content and reply "
                "markup are exactly the same as a current content and reply markup of the message",
            )
        msg = dict(msg, text=text, edit_date=next(self._clock))
        self.messages[(chat_id, message_id)] = msg
        return _ok(msg)

    async def _api_deleteMessage(self, call: Call) -> web.Response:
        key = (_required_int(call, "chat_id"), _required_int(call, "message_id"))
        if self.messages.pop(key, None) is None:
            raise _ApiError(400, "Bad Request: message to delete not found")
        return _ok(True)

    async def _api_sendChatAction(self, call: Call) -> web.Response:
        _required_int(call, "chat_id")
        return _ok(True)


class _ApiError(Exception):
    def __init__(self, status: int, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.description = description


def _required_int(call: Call, key: str) -> int:
    value = call.int(key)
    if value is None:
        raise _ApiError(400, f"Bad Request: {key} is empty")
    return value


def _check_text(text: str) -> None:
    if not text.strip():
        raise _ApiError(400, "Bad Request: message text is empty")
    if utf16_len(text) > MESSAGE_LIMIT:
        raise _ApiError(400, "Bad Request: message is too long")


def _ok(result: Any) -> web.Response:
    return web.json_response({"ok": True, "result": result})


def _error(status: int, description: str, parameters: dict[str, Any] | None = None) -> web.Response:
    body: dict[str, Any] = {"ok": False, "error_code": status, "description": description}
    if parameters:
        body["parameters"] = parameters
    return web.json_response(body, status=status)

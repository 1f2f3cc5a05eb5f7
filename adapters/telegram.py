"""The Telegram adapter, on python-telegram-bot's `Application`.

It translates Bot API updates (long polling by default, or a webhook) into `bot.events` and delivers
outbox rows with `sendMessage` / `editMessageText`; triggers, access rules, cooldowns and commands are
the dispatcher's.

Receiving is ours, not PTB's `Updater`: an update is confirmed to Telegram (the next `getUpdates`
offset, or the webhook's 200) only after the runtime stored it or kept it in its spool, so a crash
or a database outage never loses one; the Updater confirms what it has merely fetched.

Flood control (429 with `retry_after`) is honoured by PTB's `AIORateLimiter`; connection errors and
5xx answers are retried here with exponential backoff.

Telegram's quirks handled here, in one place:
- texts are measured in UTF-16 code units (4,096 per message) and so are entity offsets;
- a forum topic is its own conversation (`message_thread_id`), but a plain reply thread is not;
- a message in a topic "replies" to the topic's creation message unless it replies to something else;
- a group command may name another bot (`/start@OtherBot`): that one is not for us.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, TypeVar
from urllib.parse import urlsplit

import httpx
from aiohttp import web
from pydantic import SecretStr
from telegram import Bot, BotCommand, Message, MessageEntity, ReplyParameters, Update
from telegram.constants import ChatAction, ChatType
from telegram.error import (
    BadRequest,
    ChatMigrated,
    Conflict,
    Forbidden,
    InvalidToken,
    NetworkError,
    RetryAfter,
    TelegramError,
)
from telegram.ext import AIORateLimiter, Application, ApplicationBuilder
from telegram.request import HTTPXRequest

from adapters.base import ChannelQueues, DeliveryRefused, DeliveryUnknown, PartialDelivery
from adapters.splitting import split_text, utf16_len
from bot.backoff import backoff
from bot.commands import COMMAND_MENU
from bot.config import webhook_url_problem
from bot.errors import ConfigError, PersonabotError
from bot.events import (
    AuthorRef,
    ChannelKind,
    ChannelRef,
    DispatchResult,
    Edited,
    EventHandler,
    Incoming,
    NotAccepted,
    Outgoing,
    PlatformConventions,
    PlatformEvent,
)
from bot.logs import RedactingFilter, redact, register_secret

if TYPE_CHECKING:
    from bot.config import Settings

log = logging.getLogger(__name__)

PLATFORM = "telegram"
MESSAGE_LIMIT = 4096  # UTF-16 code units, after entity parsing; we send plain text
DEFAULT_BASE_URL = "https://api.telegram.org/bot"
TOKEN_ENV = "TELEGRAM_TOKEN"
# BotFather tokens: the bot's numeric id, a colon, then a 35-character secret.
_TOKEN_SHAPE = re.compile(r"^\d{3,}:[A-Za-z0-9_-]{30,}$")
_SECRET_SHAPE = re.compile(r"^[A-Za-z0-9_-]{1,256}$")  # what setWebhook accepts as secret_token
ALLOWED_UPDATES = ["message", "edited_message"]

T = TypeVar("T")


class TelegramFatal(PersonabotError):
    """Polling cannot go on and reconnecting would not help (a revoked token, another poller)."""

    fatal = True  # read by bot.watchdog: stop the process instead of reconnecting


class TelegramAdapter:
    """Telegram through the Bot API; one instance per bot token."""

    platform = PLATFORM
    # Telegram sends "/start" by itself when a user opens a chat with the bot.
    conventions = PlatformConventions(opening_command="start")

    def __init__(
        self,
        token: str | SecretStr | None,
        *,
        mode: Literal["polling", "webhook"] = "polling",
        webhook_url: str | None = None,
        webhook_listen: str = "0.0.0.0",
        webhook_port: int = 8443,
        webhook_secret: str | SecretStr | None = None,
        streaming: bool = False,
        base_url: str | None = None,
        base_file_url: str | None = None,
        poll_timeout: float = 10.0,
        flood_retries: int = 3,
        network_retries: int = 3,
        retry_backoff: float = 1.0,
        request_timeout: float = 10.0,
        send_timeout: float = 60.0,
        stream_min_interval: float = 1.0,
        stream_min_growth: int = 40,
        conflict_seconds: float = 30.0,
    ) -> None:
        self._token = token.get_secret_value() if isinstance(token, SecretStr) else (token or "")
        self._token = self._token.strip()
        register_secret(self._token)  # before anything can log a request URL
        secret = (
            webhook_secret.get_secret_value() if isinstance(webhook_secret, SecretStr) else webhook_secret
        )
        self._webhook_secret = secret or None
        register_secret(self._webhook_secret)
        _guard_loggers()
        self.mode = mode
        self.webhook_url = webhook_url
        self.webhook_listen = webhook_listen
        self.webhook_port = webhook_port
        self.base_url = (base_url or DEFAULT_BASE_URL).rstrip("/")
        self.base_file_url = base_file_url or _file_url_for(self.base_url)
        self.poll_timeout = poll_timeout
        self.flood_retries = flood_retries
        self.network_retries = network_retries
        self.retry_backoff = retry_backoff
        self.request_timeout = request_timeout
        # sendMessage has no idempotency key: a send whose answer is late is waited for this long
        # rather than given up on (and then of unknown outcome; see `deliver`).
        self.send_timeout = send_timeout
        # Read by BotApp's StreamingRelay: Telegram allows about one edit a second per chat, and a
        # group's messages (edits included) are limited to 20 a minute, so edits wait for real growth.
        self.streaming = streaming
        self.stream_min_interval = stream_min_interval
        self.stream_min_growth = stream_min_growth
        self.conflict_seconds = conflict_seconds
        self._app: Application[Any, Any, Any, Any, Any, Any] | None = None
        self._poller: asyncio.Task[None] | None = None
        self._long_poll: asyncio.Future[Any] | None = None
        self._webhook: web.AppRunner | None = None
        self._chats = ChannelQueues()  # webhook requests of one chat are handled one at a time
        self._on_event: EventHandler | None = None
        self._bot_id: int | None = None
        self._bot_username = ""
        self._receiving = False
        # Update ids seen lately: a redelivered update (webhook retry) is dropped before it reaches the
        # store, which would also dedupe it by message id; this also covers commands, never stored.
        self._recent: deque[int] = deque(maxlen=2048)
        self._recent_set: set[int] = set()
        # The text last shown in messages we edit, so a streamed reply that has outgrown one message
        # does not send an edit per token that Telegram would refuse as "not modified".
        self._shown: OrderedDict[tuple[str, str], str] = OrderedDict()

    @classmethod
    def from_settings(cls, settings: Settings) -> TelegramAdapter:
        """The adapter `personabot run` starts: token from TELEGRAM_TOKEN, `telegram.token` or its file."""
        t = settings.telegram
        return cls(
            t.resolve_token(TOKEN_ENV),
            mode=t.mode,
            webhook_url=t.webhook_url,
            webhook_listen=t.webhook_listen,
            webhook_port=t.webhook_port,
            webhook_secret=t.webhook_secret,
            streaming=t.streaming,
            base_url=t.base_url,
        )

    # -- lifecycle ---------------------------------------------------------------------------------

    def _check_config(self) -> None:
        if not self._token:
            raise ConfigError(
                f"telegram: no bot token; set {TOKEN_ENV}, telegram.token or telegram.token_file"
            )
        if not _TOKEN_SHAPE.match(self._token):
            raise ConfigError(
                "telegram: the bot token is malformed; BotFather's tokens look like 123456789:AAE... "
                f"(check {TOKEN_ENV}, telegram.token or telegram.token_file)"
            )
        if self.mode == "webhook":
            if not self.webhook_url:
                raise ConfigError(
                    "telegram.webhook_url: a public https:// URL is required when telegram.mode is 'webhook'"
                )
            if (problem := webhook_url_problem(self.webhook_url)) is not None:
                raise ConfigError(f"telegram.webhook_url: {problem}")
            if not self._webhook_secret or not _SECRET_SHAPE.match(self._webhook_secret):
                raise ConfigError(
                    "telegram.webhook_secret: required in webhook mode, 1-256 characters of A-Z, a-z, "
                    "0-9, _ and -"
                )

    async def start(self, on_event: EventHandler) -> None:
        """Connect (getMe), then receive updates by long polling or on the webhook."""
        self._check_config()
        self._on_event = on_event
        requests = (
            HTTPXRequest(
                connection_pool_size=16,
                connect_timeout=self.request_timeout,
                read_timeout=self.request_timeout,
                write_timeout=self.request_timeout,
                pool_timeout=self.request_timeout,
            ),
            # getUpdates holds its connection for the long poll; PTB adds poll_timeout to read_timeout.
            HTTPXRequest(connection_pool_size=1, read_timeout=self.request_timeout),
        )
        app = (
            ApplicationBuilder()
            .token(self._token)
            .base_url(self.base_url)
            .base_file_url(self.base_file_url)
            .request(requests[0])
            .get_updates_request(requests[1])
            .rate_limiter(_RateLimiter(max_retries=self.flood_retries))
            .job_queue(None)
            .updater(None)  # receiving is ours (see the module docstring)
            .build()
        )
        await self._get_me(app.initialize, requests)
        self._app = app
        self._bot_id = app.bot.id
        self._bot_username = app.bot.username or ""
        self._receiving = True  # from here on, stop() has something to stop
        await self._publish_commands()
        try:
            if self.mode == "webhook":
                await self._start_webhook()
            else:
                await self._start_polling()
        except (TelegramError, OSError) as exc:
            await self.stop()
            where = (
                f"the webhook on {self.webhook_listen}:{self.webhook_port}"
                if self.mode == "webhook"
                else "long polling"
            )
            raise PersonabotError(f"telegram: cannot start {where}: {self._safe(exc)}") from None
        log.info("telegram: connected as @%s (%s)", self._bot_username, self.mode)

    async def check_token(self) -> None:
        """The token's shape, then getMe: `personabot run` reports a bad token before loading the model."""
        self._check_config()
        request = HTTPXRequest(connect_timeout=self.request_timeout, read_timeout=self.request_timeout)
        bot = Bot(self._token, base_url=self.base_url, base_file_url=self.base_file_url, request=request)
        await self._get_me(bot.initialize, (request,))
        await bot.shutdown()

    async def _get_me(
        self, initialize: Callable[[], Awaitable[Any]], requests: tuple[HTTPXRequest, ...]
    ) -> None:
        """getMe (through `initialize`); a rejected token or an unreachable API is one clear line."""
        try:
            await self._retrying("getMe", initialize, idempotent=True)
        except InvalidToken:
            await _close(requests)
            raise PersonabotError(
                f"telegram: the Bot API rejected the bot token (check {TOKEN_ENV}, telegram.token or "
                "telegram.token_file)"
            ) from None
        except TelegramError as exc:
            await _close(requests)
            raise PersonabotError(
                f"telegram: cannot reach the Bot API at {_origin(self.base_url)}: {self._safe(exc)}"
            ) from None

    async def _publish_commands(self) -> None:
        """Fill Telegram's "/" menu (`setMyCommands`), only when it differs from what Telegram has."""
        bot = self._bot()
        wanted = [BotCommand(name, description) for name, description in COMMAND_MENU.items()]
        try:
            current = await self._retrying("getMyCommands", bot.get_my_commands, idempotent=True)
            if [(c.command, c.description) for c in current] != [(c.command, c.description) for c in wanted]:
                await self._retrying("setMyCommands", lambda: bot.set_my_commands(wanted), idempotent=True)
                log.info("telegram: command menu set: %s", ", ".join(f"/{c.command}" for c in wanted))
        except TelegramError as exc:  # the commands still work when typed; only the menu is missing
            log.warning("telegram: could not set the command menu: %s", self._safe(exc))

    async def stop_receiving(self) -> None:
        """Stop polling / the webhook; an update being handled is finished (and confirmed) first."""
        if not self._receiving:
            return
        self._receiving = False
        if self._long_poll is not None:
            self._long_poll.cancel()  # a fetch not handled is not confirmed: Telegram sends it again
        if self._poller is not None:
            await asyncio.wait([self._poller])
            self._poller = None
        if self._webhook is not None:
            await self._webhook.cleanup()  # waits for requests in flight
            self._webhook = None

    async def stop(self) -> None:
        await self.stop_receiving()
        app, self._app = self._app, None
        if app is not None:
            await app.shutdown()
        self._on_event = None

    # -- receiving ---------------------------------------------------------------------------------

    def connection(self) -> asyncio.Task[None] | None:
        """The polling task, for the watchdog (`bot.watchdog`); it ends only when polling cannot go on.

        Network errors and 5xx are retried inside it; a revoked token, a parse error on what
        Telegram sent, or another process polling with this token for `conflict_seconds` end it.
        A webhook has no such task: its server only stops when told to.
        """
        return self._poller

    async def reconnect(self) -> None:
        """Poll again (the offset is Telegram's: nothing confirmed is lost, nothing unconfirmed skipped)."""
        if self._poller is not None and not self._poller.done():
            return
        await self._start_polling()

    async def _start_polling(self) -> None:
        bot = self._bot()
        # A webhook left set (by an earlier webhook-mode run) makes getUpdates fail with a conflict.
        await self._retrying("deleteWebhook", lambda: bot.delete_webhook(), idempotent=True)
        self._receiving = True
        self._poller = asyncio.create_task(self._poll(), name="telegram-polling")

    async def _poll(self) -> None:
        bot = self._bot()
        offset: int | None = None
        failing_since: float | None = None
        conflict_since: float | None = None
        failures = 0  # in a row, for the backoff (bot.backoff: doubling from `retry_backoff`, 30 s cap)
        while self._receiving:
            try:
                self._long_poll = asyncio.ensure_future(
                    bot.get_updates(
                        offset=offset, timeout=int(self.poll_timeout), allowed_updates=ALLOWED_UPDATES
                    )
                )
                updates = await self._long_poll
            except asyncio.CancelledError:
                if not self._receiving:
                    return  # stop_receiving cancelled the long poll
                raise
            except InvalidToken:
                raise TelegramFatal(
                    f"telegram: the Bot API rejects the bot token now (revoked?); check {TOKEN_ENV}"
                ) from None
            except Conflict as exc:
                now = time.monotonic()
                if conflict_since is None:
                    conflict_since = now
                    log.warning(
                        "telegram: another process is polling with this bot token (%s); if it goes on "
                        "for %g s, this one stops",
                        self._safe(exc),
                        self.conflict_seconds,
                    )
                elif now - conflict_since >= self.conflict_seconds:
                    raise TelegramFatal(
                        f"telegram: another process kept polling with this bot token for "
                        f"{now - conflict_since:.0f} s (409 Conflict); only one may poll: stop the other "
                        "one, or run several processes in webhook mode"
                    ) from None
                failures += 1
                await asyncio.sleep(self._poll_backoff(failures))
                continue
            except TelegramError as exc:  # network errors, timeouts, 5xx: Telegram comes back
                if failing_since is None:
                    failing_since = time.monotonic()
                    log.warning("telegram: polling failed (%s); retrying until it works", self._safe(exc))
                failures += 1
                await asyncio.sleep(self._poll_backoff(failures))
                continue
            finally:
                self._long_poll = None
            if failing_since is not None:
                log.warning("telegram: polling works again after %.1f s", time.monotonic() - failing_since)
            failing_since = conflict_since = None
            failures = 0
            for update in updates:
                if not await self._receive(update):
                    # Not kept: ask for it (and what follows) again.
                    await asyncio.sleep(self._poll_backoff(1))
                    break
                offset = update.update_id + 1  # confirmed by the next getUpdates

    def _poll_backoff(self, failures: int) -> float:
        """The wait after `failures` failed polls in a row: `retry_backoff`, doubling, at most 30 s
        (unjittered: one poller per token, nobody to spread out from)."""
        return backoff(failures, base=self.retry_backoff, cap=30.0, jitter=False)

    async def _start_webhook(self) -> None:
        assert self.webhook_url is not None
        bot = self._bot()
        server = web.Application()
        server.router.add_post("/" + urlsplit(self.webhook_url).path.strip("/"), self._on_webhook)
        runner = web.AppRunner(server, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.webhook_listen, self.webhook_port).start()
        except OSError:
            await runner.cleanup()
            raise
        self._webhook = runner
        await self._retrying(
            "setWebhook",
            lambda: bot.set_webhook(
                url=self.webhook_url, secret_token=self._webhook_secret, allowed_updates=ALLOWED_UPDATES
            ),
            idempotent=True,
        )

    async def _on_webhook(self, request: web.Request) -> web.Response:
        """Telegram's POST: 200 only once the update is stored or spooled; otherwise it is sent again."""
        secret = request.headers.get("X-Telegram-Bot-Api-Secret-Token", "")
        if not self._webhook_secret or not hmac.compare_digest(secret, self._webhook_secret):
            return web.Response(status=403)
        if not self._receiving:
            return web.Response(status=503)  # stopping: Telegram retries, another process takes it
        try:
            update = Update.de_json(await request.json(), self._bot())
        except Exception:  # not an update: nothing Telegram would do better by sending it again
            log.warning("telegram: the webhook got a body that is not an update; refused")
            return web.Response(status=400)
        chat = update.effective_chat
        async with self._chats.hold(chat.id if chat is not None else 0):
            kept = await self._receive(update)
        return web.Response(status=200 if kept else 503)

    async def _receive(self, update: Update) -> bool:
        """Hand one update to the runtime; False when it was neither stored nor kept (do not confirm)."""
        if update.update_id in self._recent_set:
            log.debug("telegram: update %s delivered again; dropped", update.update_id)
            return True
        try:
            event = self.translate(update)
        except Exception:  # a malformed update must not stop the bot
            log.exception("telegram: could not read update %s; skipped", update.update_id)
            self._remember(update.update_id)
            return True
        if event is None or self._on_event is None:
            self._remember(update.update_id)
            return True
        try:
            result = await self._on_event(event)
        except NotAccepted as exc:
            log.warning(
                "telegram: update %s left unconfirmed (%s); Telegram sends it again", update.update_id, exc
            )
            return False
        except Exception:  # one bad event must not stop the bot; the update id says which one
            log.exception("telegram: handling update %s failed; skipped", update.update_id)
            self._remember(update.update_id)
            return True
        self._remember(update.update_id)
        if result.notice and isinstance(event, Incoming):
            await self._answer(event, result)
        return True

    def _remember(self, update_id: int) -> None:
        if len(self._recent) == self._recent.maxlen:
            self._recent_set.discard(self._recent[0])
        self._recent.append(update_id)
        self._recent_set.add(update_id)

    async def answer_later(self, event: Incoming, notice: str) -> None:
        """A command's answer for a message stored late (it waited in the ingest spool)."""
        await self._answer(event, DispatchResult(notice=notice))

    async def _answer(self, event: Incoming, result: DispatchResult) -> None:
        """A command's answer or a cooldown notice: posted at once, not through the outbox."""
        reply_to = None if event.is_direct else event.platform_message_id
        try:
            for index, chunk in enumerate(split_text(result.notice or "", MESSAGE_LIMIT, measure=utf16_len)):
                await self._send(event.channel, chunk, reply_to if index == 0 else None)
        except TelegramError as exc:
            log.warning("telegram: could not answer in %s: %s", event.channel.key, self._safe(exc))

    def translate(self, update: Update) -> PlatformEvent | None:
        """The normalized event for an update, or None when it is nothing the bot handles."""
        if update.edited_message is not None:
            edited = update.edited_message
            text = self._text_of(edited)
            if not text.strip():
                return None
            return Edited(
                platform=PLATFORM,
                channel=self._channel(edited),
                platform_message_id=str(edited.message_id),
                text=text,
                edited_at=_aware(edited.edit_date),
            )
        msg = update.message
        if msg is None:
            return None
        author = self._author(msg)
        if author is None or self._for_another_bot(msg):
            return None
        reply = msg.reply_to_message
        if reply is not None and reply.forum_topic_created is not None:
            reply = None  # in a forum topic every message "replies" to the topic's first message
        return Incoming(
            platform=PLATFORM,
            channel=self._channel(msg),
            author=author,
            text=self._text_of(msg),
            platform_message_id=str(msg.message_id),
            reply_to=str(reply.message_id) if reply is not None else None,
            mentions_bot=self._mentions_bot(msg),
            sent_at=_aware(msg.date),
            replies_to_bot=bool(
                reply is not None and reply.from_user is not None and reply.from_user.id == self._bot_id
            ),
        )

    def _channel(self, msg: Message) -> ChannelRef:
        chat = msg.chat
        direct = chat.type == ChatType.PRIVATE
        # Only forum topics are separate conversations; replies in plain supergroups carry a
        # message_thread_id too, which must not split the chat.
        thread = str(msg.message_thread_id) if msg.is_topic_message and msg.message_thread_id else ""
        return ChannelRef(
            platform=PLATFORM,
            external_id=str(chat.id),
            kind=ChannelKind.DIRECT if direct else ChannelKind.GROUP,
            thread_id=thread,
            title=_clean(chat.title or chat.full_name or chat.username or "")[:256],
        )

    def _author(self, msg: Message) -> AuthorRef | None:
        # Anonymous admins, channels and linked-channel posts speak as a chat, not as a user.
        if msg.sender_chat is not None:
            sender = msg.sender_chat
            name = sender.title or sender.full_name or sender.username or str(sender.id)
            return AuthorRef(PLATFORM, str(sender.id), _clean(name)[:256])
        user = msg.from_user
        if user is None:
            return None
        name = user.full_name or user.username or str(user.id)
        return AuthorRef(PLATFORM, str(user.id), _clean(name)[:256], is_bot=user.is_bot)

    def _entities(self, msg: Message) -> tuple[str, tuple[MessageEntity, ...]]:
        if msg.text is not None:
            return msg.text, msg.entities
        return msg.caption or "", msg.caption_entities

    def _text_of(self, msg: Message) -> str:
        """The message's text, or its caption; our own @mention at either end is dropped."""
        text, _ = self._entities(msg)
        text = _clean(text)
        if self._bot_username:
            name = re.escape(self._bot_username)
            text = re.sub(rf"^\s*@{name}\b[\s,:]*", "", text, flags=re.IGNORECASE)
            text = re.sub(rf"[\s,]*@{name}\s*$", "", text, flags=re.IGNORECASE)
        return text.replace("\x00", "")  # PostgreSQL text cannot hold NUL

    def _entity_texts(self, msg: Message, kinds: set[str]) -> list[tuple[MessageEntity, str]]:
        """(entity, its text) for entities of `kinds`; offsets past the end are clamped, not trusted."""
        text, entities = self._entities(msg)
        units = _clean(text).encode("utf-16-le")
        found = []
        for entity in entities:
            if entity.type not in kinds:
                continue
            start = max(0, entity.offset) * 2
            end = max(start, (entity.offset + entity.length) * 2)
            found.append((entity, units[start:end].decode("utf-16-le", "replace")))
        return found

    def _mentions_bot(self, msg: Message) -> bool:
        own = "@" + self._bot_username.lower()
        for entity, text in self._entity_texts(msg, {MessageEntity.MENTION, MessageEntity.TEXT_MENTION}):
            if entity.type == MessageEntity.TEXT_MENTION:
                if entity.user is not None and entity.user.id == self._bot_id:
                    return True
            elif self._bot_username and text.lower() == own:
                return True
        return False

    def _for_another_bot(self, msg: Message) -> bool:
        """`/cmd@OtherBot` at the start of the message: a command meant for another bot."""
        for entity, text in self._entity_texts(msg, {MessageEntity.BOT_COMMAND}):
            if entity.offset == 0 and "@" in text:
                return text.split("@", 1)[1].lower() != self._bot_username.lower()
        return False

    # -- sending -----------------------------------------------------------------------------------

    async def deliver(self, reply: Outgoing) -> list[str]:
        chunks = split_text(reply.text, MESSAGE_LIMIT, measure=utf16_len)
        ids = list(reply.delivered_ids)
        if not chunks and reply.streamed_id is not None:
            await self._delete(reply.channel, reply.streamed_id)  # an empty reply leaves no preview behind
        reply_to = None if reply.channel.is_direct else reply.reply_to
        journal = reply.journal
        for index in range(len(ids), len(chunks)):
            try:
                if index == 0 and reply.streamed_id is not None:
                    if await self._replace(reply.channel, reply.streamed_id, chunks[0]):
                        ids.append(reply.streamed_id)
                        continue
                # The rate limiter marks the chunk on the row as each request leaves (`_InFlight`).
                mark = _in_flight.set(_InFlight(journal, index, list(ids)) if journal is not None else None)
                try:
                    ids.append(
                        await self._send(reply.channel, chunks[index], reply_to if index == 0 else None)
                    )
                finally:
                    _in_flight.reset(mark)
                if journal is not None:
                    await journal.sent(ids)
            except Exception as exc:
                failure: Exception = refusal(exc) or exc
                if len(ids) > len(reply.delivered_ids):
                    raise PartialDelivery(ids, failure) from exc
                if failure is exc:
                    raise
                raise failure from exc
        return ids

    async def preview(self, channel: ChannelRef, text: str, job_id: int) -> str:
        """A streaming preview is one message, edited as the reply grows."""
        chunks = split_text(text, MESSAGE_LIMIT, measure=utf16_len)
        return await self._send(channel, chunks[0] if chunks else "…", None)

    async def edit(self, channel: ChannelRef, platform_message_id: str, text: str) -> None:
        chunks = split_text(text, MESSAGE_LIMIT, measure=utf16_len)
        if chunks:  # a streamed reply past the limit shows its first message; the rest is posted at the end
            await self._replace(channel, platform_message_id, chunks[0], missing_ok=False)

    async def typing(self, channel: ChannelRef) -> None:
        bot = self._bot()
        await self._retrying(
            "sendChatAction",
            lambda: bot.send_chat_action(
                chat_id=int(channel.external_id),
                action=ChatAction.TYPING,
                message_thread_id=_thread(channel),
            ),
            idempotent=True,
        )

    async def _send(self, channel: ChannelRef, text: str, reply_to: str | None) -> str:
        bot = self._bot()
        chat_id = int(channel.external_id)
        reply_parameters = (
            ReplyParameters(message_id=int(reply_to), allow_sending_without_reply=True)
            if reply_to and reply_to.isdigit()
            else None
        )

        def call() -> Awaitable[Message]:
            return bot.send_message(
                chat_id=chat_id,
                text=text,
                message_thread_id=_thread(channel),
                reply_parameters=reply_parameters,
                read_timeout=self.send_timeout,
                write_timeout=self.send_timeout,
            )

        try:
            # Only a send that never left is retried: a lost answer may mean Telegram posted it.
            msg = await self._retrying("sendMessage", call, idempotent=False)
        except ChatMigrated as exc:  # the group became a supergroup with a new id
            chat_id = int(exc.new_chat_id)
            msg = await self._retrying("sendMessage", call, idempotent=False)
        return str(msg.message_id)

    async def _replace(
        self, channel: ChannelRef, platform_message_id: str, text: str, *, missing_ok: bool = True
    ) -> bool:
        """Edit a message of ours to `text`; False when it is gone (deleted) and `missing_ok`."""
        bot = self._bot()
        key = (channel.external_id, platform_message_id)
        if self._shown.get(key) == text:
            return True
        try:
            await self._retrying(
                "editMessageText",
                lambda: bot.edit_message_text(
                    text=text, chat_id=int(channel.external_id), message_id=int(platform_message_id)
                ),
                idempotent=True,
            )
        except BadRequest as exc:
            reason = str(exc).lower()
            if "not modified" in reason:
                return True  # it already shows this text
            if missing_ok and ("not found" in reason or "can't be edited" in reason):
                return False
            raise
        self._shown[key] = text
        while len(self._shown) > 256:
            self._shown.popitem(last=False)
        return True

    async def _delete(self, channel: ChannelRef, platform_message_id: str) -> None:
        bot = self._bot()
        try:
            await self._retrying(
                "deleteMessage",
                lambda: bot.delete_message(
                    chat_id=int(channel.external_id), message_id=int(platform_message_id)
                ),
                idempotent=True,
            )
        except BadRequest:
            pass  # already gone

    def _bot(self) -> Any:
        if self._app is None:
            raise RuntimeError("the Telegram adapter is not started")
        return self._app.bot

    async def _retrying(self, what: str, call: Callable[[], Awaitable[T]], *, idempotent: bool) -> T:
        """Retry connection errors and 5xx answers with exponential backoff.

        429s are the rate limiter's (it waits `retry_after`); 4xx answers are final.
        """
        for attempt in range(self.network_retries + 1):
            try:
                return await call()
            except ANSWERED_NOT_POSTED:
                raise
            except NetworkError as exc:  # TimedOut included
                if not idempotent and _may_have_arrived(exc):
                    raise DeliveryUnknown(
                        f"{what}: no answer from Telegram ({self._safe(exc)}); the message may have "
                        "been posted"
                    ) from exc
                if attempt == self.network_retries:
                    raise
                exc_name = self._safe(exc)
            delay = backoff(attempt + 1, base=self.retry_backoff, cap=30.0)
            log.warning("telegram: %s failed (%s); retrying in %.1fs", what, exc_name, delay)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    def _safe(self, exc: BaseException | None) -> str:
        """An exception as one line, without the token (httpx errors may carry the request URL)."""
        text = f"{type(exc).__name__}: {exc}" if exc is not None else "unknown error"
        return redact(" ".join(text.split()), [s for s in (self._token, self._webhook_secret) if s])


class _RateLimiter(AIORateLimiter):
    """PTB's flood control, except that typing indicators do not use up a group's 20 messages a minute."""

    async def process_request(
        self,
        callback: Callable[..., Any],
        args: Any,
        kwargs: dict[str, Any],
        endpoint: str,
        data: dict[str, Any],
        rate_limit_args: int | None,
    ) -> Any:
        if endpoint == "sendChatAction":
            return await callback(*args, **kwargs)
        mark = _in_flight.get() if endpoint == "sendMessage" else None
        if mark is not None:
            callback = mark.around(callback)
        return await super().process_request(callback, args, kwargs, endpoint, data, rate_limit_args)


@dataclass
class _InFlight:
    """The outbox row's record of the chunk being sent, kept only while a request may be at Telegram.

    It is written just before each `sendMessage` request leaves (after the rate limiter's waits) and
    cleared when Telegram answers without posting (429, 5xx, a refusal) or the request never left, so
    a process killed while it waits out flood control or backs off between retries leaves no chunk
    marked, and the next process sends it; only a kill while a request is out makes the row `unknown`.
    """

    journal: Any  # the row's `RowJournal`
    index: int
    delivered: list[str]

    def around(self, request: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def marked(*args: Any, **kwargs: Any) -> Any:
            await self.journal.sending(self.index, self.delivered)
            try:
                return await request(*args, **kwargs)
            except ANSWERED_NOT_POSTED:
                await self.journal.sent(self.delivered)
                raise
            except NetworkError as exc:
                if not _may_have_arrived(exc):
                    await self.journal.sent(self.delivered)
                raise

        return marked


# The chunk `TelegramAdapter.deliver` is sending, for the rate limiter around each request.
_in_flight: ContextVar[_InFlight | None] = ContextVar("telegram_in_flight", default=None)


# Telegram's answers that say the request was refused, not carried out: final for `_retrying` (429s
# are the rate limiter's), and proof for `_InFlight` that nothing was posted. BadRequest is a
# NetworkError, so these are caught before it.
ANSWERED_NOT_POSTED = (BadRequest, Forbidden, InvalidToken, RetryAfter, ChatMigrated)


def _may_have_arrived(exc: NetworkError) -> bool:
    """The request may have reached Telegram: it failed after the connection was made (a read or
    write timeout, a connection dropped mid-request). A refused or timed-out connect, a full pool and
    an HTTP error answer (5xx: Telegram answered, and did not post) are safe to send again."""
    cause = exc.__cause__
    safe = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
    return isinstance(cause, httpx.TransportError) and not isinstance(cause, safe)


def refusal(exc: BaseException) -> DeliveryRefused | None:
    """A Bot API answer that no retry can change, as a `DeliveryRefused`; None for transient ones.

    403 (the bot was blocked by the user, kicked from the group) and 400 (chat not found, message
    too long, thread not found) are final; timeouts, connection errors, 5xx and 429 are not.
    """
    if isinstance(exc, Forbidden):
        return DeliveryRefused("403", exc.message)
    if isinstance(exc, BadRequest) and not isinstance(exc, ChatMigrated):
        return DeliveryRefused("400", exc.message)
    return None


def _guard_loggers() -> None:
    """Redact secrets at the loggers that see request URLs (httpx) or may echo the token (PTB).

    `setup_logging` redacts at its handler; this also covers handlers added by someone else (a test's
    caplog, an operator's own logging config).
    """
    names = ["httpx", "httpcore"] + [n for n in logging.root.manager.loggerDict if n.startswith("telegram")]
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactingFilter) for f in logger.filters):
            logger.addFilter(RedactingFilter())


def _clean(text: str) -> str:
    """Lone UTF-16 surrogates (invalid JSON escapes Telegram can pass on) become U+FFFD.

    One code unit each way, so entity offsets still line up.
    """
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _thread(channel: ChannelRef) -> int | None:
    return int(channel.thread_id) if channel.thread_id.isdigit() else None


def _aware(value: datetime | None) -> datetime:
    if value is None:
        return datetime.now(UTC)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _file_url_for(base_url: str) -> str:
    """`https://host/bot` -> `https://host/file/bot`, the Bot API's file endpoint beside it."""
    head, sep, tail = base_url.rpartition("/bot")
    return f"{head}/file/bot{tail}" if sep else base_url + "/file"


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.netloc else url


async def _close(requests: tuple[HTTPXRequest, ...]) -> None:
    for request in requests:
        try:
            await request.shutdown()
        except Exception:  # closing a client that never connected; nothing to lose
            log.debug("closing a Telegram HTTP client failed", exc_info=True)

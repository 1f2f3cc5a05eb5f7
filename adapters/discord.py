"""The Discord adapter, on discord.py: gateway events in, outbox replies out.

It only translates. Messages, edits and deletes become `Incoming`, `Edited` and `Deleted`; slash
commands (`/persona`, `/personas`, `/reset`, `/help`, `/forget`, `/optin`, `/optout`) become
`Incoming` commands whose answer is the interaction response; replies are split under 2,000
characters and posted through the REST API. Triggers, access rules, cooldowns and commands are
decided in `bot/`.

Channels: a guild text channel or a DM is `ChannelRef(external_id=<channel id>)`. A thread or a forum
post is its own conversation, `ChannelRef(external_id=<parent channel id>, thread_id=<thread id>)`,
so access rules written for a channel (`discord:<channel id>`) cover its threads too.

Reliability comes from discord.py plus two choices made here: each chunk of an outbox reply is posted
with a nonce derived from the outbox row (`enforce_nonce`), so a delivery retried after a crash or a
lost answer returns the message Discord already created instead of posting it twice; and events of
one channel are handled one at a time, in gateway order, so an edit or delete never overtakes the
message it changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import unicodedata
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import discord
import yarl
from discord import app_commands
from pydantic import SecretStr

from adapters.base import ChannelQueues, DeliveryRefused, PartialDelivery
from adapters.splitting import split_text
from bot.commands import COMMAND_MENU
from bot.config import DiscordSettings, Settings
from bot.errors import PersonabotError
from bot.events import (
    AuthorRef,
    ChannelKind,
    ChannelRef,
    Deleted,
    DispatchResult,
    Edited,
    EventHandler,
    Incoming,
    NotAccepted,
    Outgoing,
    PlatformConventions,
)
from bot.logs import register_secret

log = logging.getLogger(__name__)

PLATFORM = "discord"
MESSAGE_LIMIT = 2000
TOKEN_ENV = "DISCORD_TOKEN"
# Messages people write; joins, pins, thread-created notices and the like are not conversation.
CONVERSATION_TYPES = (discord.MessageType.default, discord.MessageType.reply)
# Slash commands: name -> (description, option name and description, or None). The dispatcher owns
# what they do; these only give Discord their names.
_SLASH_OPTIONS = {
    "persona": ("name", "The persona to switch to"),
    "forget": ("confirm", "Type confirm to go ahead"),
}
SLASH_COMMANDS: dict[str, tuple[str, tuple[str, str] | None]] = {
    name: (description, _SLASH_OPTIONS.get(name)) for name, description in COMMAND_MENU.items()
}

_MENTION = re.compile(r"<(?P<kind>@!?|@&|#)(?P<id>\d+)>|<a?:(?P<emoji>\w+):\d+>|</(?P<command>[\w -]+):\d+>")
_NO_PINGS = discord.AllowedMentions(everyone=False, users=False, roles=False, replied_user=False)


class DiscordError(PersonabotError):
    """Discord cannot be used as configured."""


class DiscordTokenError(DiscordError):
    """The bot token is missing or Discord rejects it."""


def clean_text(text: str) -> str:
    """Text safe to store and send: lone surrogates become U+FFFD, NUL characters go."""
    if any("\ud800" <= c <= "\udfff" for c in text):
        # Through UTF-16 first, so a surrogate pair split into two escapes is joined again.
        text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return text.replace("\x00", "")


def _blank(text: str) -> bool:
    """Nothing a person can read: whitespace and invisible format characters only."""
    return all(c.isspace() or unicodedata.category(c) == "Cf" for c in text)


class DiscordAdapter:
    """A persona bot on Discord. Build it with `from_settings`; `start()` connects and returns when ready."""

    platform = PLATFORM
    # Streaming edits at most once a second: Discord allows about five edits per 5 s per channel.
    stream_min_interval = 1.0
    stream_min_growth = 1
    # A slash command's answer is due within 3 s; after this long the bot defers and answers in a
    # follow-up message instead.
    interaction_defer_after = 2.0

    def __init__(
        self,
        token: SecretStr | str | None,
        *,
        sharded: bool = False,
        shard_count: int | None = None,
        streaming: bool = False,
        api_base: str | None = None,
        gateway_url: str | None = None,
        guild_ready_timeout: float = 2.0,
        ready_timeout: float = 60.0,
        sync_commands: bool = True,
        identify_delay: float | None = None,
        command_prefix: str = "!",
    ) -> None:
        """`api_base` / `gateway_url` point discord.py elsewhere (a fake Discord in tests); note that
        discord.py keeps them process-wide, so one process talks to one Discord. `identify_delay`
        overrides discord.py's 5 s pause between shard IDENTIFYs (only for a server that allows it).
        `command_prefix` starts text commands besides "/" (slash commands arrive as interactions).
        """
        raw = token.get_secret_value() if isinstance(token, SecretStr) else token
        self._token = (raw or "").strip()
        if self._token.lower().startswith("bot "):
            self._token = self._token[4:].strip()  # a pasted "Bot <token>" header value
        register_secret(self._token)
        self.sharded = sharded
        self.shard_count = shard_count
        self.streaming = streaming
        self.conventions = PlatformConventions(command_prefixes="/" + command_prefix)
        self.api_base = api_base
        self.gateway_url = gateway_url
        self.guild_ready_timeout = guild_ready_timeout
        self.ready_timeout = ready_timeout
        self.sync_commands = sync_commands
        self.identify_delay = identify_delay
        self.client: discord.Client | None = None
        self._on_event: EventHandler | None = None
        self._receiving = False
        self._ready = asyncio.Event()
        self._progress = asyncio.Event()  # a shard connected (see _wait_ready)
        self._connect_task: asyncio.Task[None] | None = None
        self._queues = ChannelQueues()
        self._fetched: OrderedDict[int, ChannelRef] = OrderedDict()  # uncached channels, asked about once
        self._saved_endpoints: tuple[str, yarl.URL] | None = None

    @classmethod
    def from_settings(cls, settings: Settings | DiscordSettings, **overrides: Any) -> DiscordAdapter:
        """The adapter `personabot run` starts: token from `DISCORD_TOKEN`, `discord.token` or
        `discord.token_file`; sharding and streaming from `[discord]`."""
        discord_settings = settings.discord if isinstance(settings, Settings) else settings
        options: dict[str, Any] = {
            "sharded": discord_settings.sharded,
            "shard_count": discord_settings.shard_count,
            "streaming": discord_settings.streaming,
            "command_prefix": discord_settings.command_prefix,
            "ready_timeout": discord_settings.ready_timeout_seconds,
            "api_base": discord_settings.api_base,
            "gateway_url": discord_settings.gateway_url,
        }
        options.update(overrides)
        return cls(discord_settings.resolve_token(TOKEN_ENV), **options)

    # -- connecting -----------------------------------------------------------------------------

    def _check_token(self) -> str:
        if not self._token:
            raise DiscordTokenError(
                f"discord: no bot token; set {TOKEN_ENV}, discord.token or discord.token_file in the config"
            )
        if any(c.isspace() or not c.isprintable() for c in self._token):
            raise DiscordTokenError(
                "discord: the bot token contains spaces or control characters; copy it again from the "
                "Developer Portal (Bot > Reset Token)"
            )
        return self._token

    def _point_at_endpoints(self) -> None:
        if self.api_base is None and self.gateway_url is None:
            return
        self._saved_endpoints = (discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY)
        if self.api_base is not None:
            discord.http.Route.BASE = self.api_base.rstrip("/")
        if self.gateway_url is not None:
            discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(self.gateway_url)

    def _restore_endpoints(self) -> None:
        if self._saved_endpoints is not None:
            discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = self._saved_endpoints
            self._saved_endpoints = None

    def _make_client(self) -> discord.Client:
        intents = discord.Intents.default()
        intents.message_content = True  # privileged: enable it for the bot in the Developer Portal
        options: dict[str, Any] = {
            "intents": intents,
            "guild_ready_timeout": self.guild_ready_timeout,
            "chunk_guilds_at_startup": False,  # mentions carry their members; no need to download all
            "allowed_mentions": _NO_PINGS,
            "max_messages": 1000,
        }
        discord.VoiceClient.warn_nacl = discord.VoiceClient.warn_dave = False  # no voice: no warning
        client: discord.Client
        if self.sharded:
            client = discord.AutoShardedClient(shard_count=self.shard_count, **options)
        else:
            client = discord.Client(**options)
        tree = app_commands.CommandTree(client)
        for name, (description, option) in SLASH_COMMANDS.items():
            tree.add_command(self._slash_command(name, description, option))
        # discord.py looks event handlers up as `on_<event>` attributes of the client, which is what its
        # `@client.event` decorator sets; hooks (`setup_hook`) are overridable methods. Set by name,
        # as the decorator does: the stubs declare neither as assignable.
        handlers: dict[str, Callable[..., Awaitable[None]]] = {
            "setup_hook": self._setup_hook,
            "on_ready": self._on_ready,
            "on_message": self._on_message,
            "on_raw_message_edit": self._on_raw_message_edit,
            "on_raw_message_delete": self._on_raw_message_delete,
            "on_raw_bulk_message_delete": self._on_raw_bulk_message_delete,
            "on_resumed": self._on_resumed,
            "on_shard_connect": self._on_shard_connect,
        }
        for name, handler in handlers.items():
            setattr(client, name, handler)
        if self.identify_delay is not None:
            delay = self.identify_delay

            async def before_identify_hook(shard_id: int | None, *, initial: bool = False) -> None:
                if not initial:
                    await asyncio.sleep(delay)

            setattr(client, "before_identify_hook", before_identify_hook)  # noqa: B010 (see handlers)
        self._tree = tree
        return client

    async def start(self, on_event: EventHandler) -> None:
        """Log in, connect the gateway and return once Discord reports the bot ready.

        A missing or rejected token, or a missing Message Content intent, is one `DiscordError` line.
        """
        token = self._check_token()
        self._on_event = on_event
        self._point_at_endpoints()
        self.client = client = self._make_client()
        try:
            await self._login(client, token)
        except DiscordError:
            await self._abort()
            raise
        self._receiving = True
        self._connect_task = asyncio.create_task(client.connect(reconnect=True), name="discord-gateway")
        done = await self._wait_ready()
        if self._ready.is_set():
            return
        task = self._connect_task
        failure = task.exception() if task in done and not task.cancelled() else None
        await self._abort()
        if isinstance(failure, discord.PrivilegedIntentsRequired):
            raise DiscordError(
                "discord: the bot needs the Message Content intent; enable it in the Developer Portal "
                "(Bot > Privileged Gateway Intents > Message Content Intent)"
            )
        if isinstance(failure, discord.ConnectionClosed) and failure.code == 4004:
            raise DiscordTokenError(
                f"discord: the gateway rejected the bot token; check {TOKEN_ENV}, discord.token or "
                "discord.token_file"
            )
        if failure is not None:
            raise DiscordError(f"discord: the gateway connection failed: {_describe(failure)}")
        raise DiscordError(
            f"discord: logged in, but the gateway was not ready within {self.ready_timeout:g} s"
        )

    async def check_token(self) -> None:
        """Log in once (REST only): `personabot run` reports a bad token before loading the model."""
        token = self._check_token()
        self._point_at_endpoints()
        client = discord.Client(intents=discord.Intents.none())
        try:
            await self._login(client, token)
        finally:
            with contextlib.suppress(Exception):
                await client.close()
            self._restore_endpoints()

    @staticmethod
    async def _login(client: discord.Client, token: str) -> None:
        try:
            await client.login(token)
        except discord.LoginFailure:
            raise DiscordTokenError(
                f"discord: the bot token was rejected (401 Unauthorized); check {TOKEN_ENV}, "
                "discord.token or discord.token_file"
            ) from None
        except (discord.HTTPException, aiohttp.ClientError, OSError) as exc:
            where = yarl.URL(discord.http.Route.BASE).host
            raise DiscordError(f"discord: cannot log in at {where}: {_describe(exc)}") from None

    def connection(self) -> asyncio.Task[None] | None:
        """The gateway task: it ends only when discord.py gives up (see `bot.watchdog`).

        discord.py retries network errors itself; anything else it raises (a parser error on an event
        it does not know, say) ends this task and the bot would go deaf without a watchdog.
        """
        return self._connect_task

    async def reconnect(self) -> None:
        """A fresh client and session (a RESUME would replay the event that broke the last one)."""
        on_event = self._on_event
        assert on_event is not None, "start() first"
        await self._abort()
        self._ready.clear()
        await self.start(on_event)

    async def _wait_ready(self) -> set[asyncio.Task[Any]]:
        """Wait until ready, or the gateway task ends, or `ready_timeout` passes with no progress.

        Sharded, discord.py logs shards in one after another, 5 s apart (Discord's IDENTIFY limit),
        so a fixed timeout caps the shard count; each shard that connects restarts the clock.
        """
        assert self._connect_task is not None
        ready = asyncio.create_task(self._ready.wait())
        try:
            while True:
                self._progress.clear()
                progress = asyncio.create_task(self._progress.wait())
                done, _ = await asyncio.wait(
                    {self._connect_task, ready, progress},
                    timeout=self.ready_timeout,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                progress.cancel()
                if progress not in done or ready in done or self._connect_task in done:
                    return done
        finally:
            ready.cancel()

    async def _on_shard_connect(self, shard_id: int) -> None:
        log.info("Discord shard %d connected", shard_id)
        self._progress.set()

    async def _abort(self) -> None:
        self._receiving = False
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.close()
        if self._connect_task is not None:
            self._connect_task.cancel()
            # The connection's end: the cancellation just asked for, or an error `_connect` reported.
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self._connect_task
            self._connect_task = None
        self._restore_endpoints()

    async def _setup_hook(self) -> None:
        """Register the slash commands, only when Discord's list differs (registration is rate limited)."""
        if not self.sync_commands:
            return
        try:
            remote = await self._tree.fetch_commands()
            # Ours are all plain slash commands (no groups, no context menus).
            local = [
                c
                for c in self._tree.get_commands(type=discord.AppCommandType.chat_input)
                if isinstance(c, app_commands.Command)
            ]

            # Options by the name Discord shows (`display_name`, after `rename`), not the Python
            # parameter's name: comparing those made every start look like a change.
            local_shape = {
                (
                    c.name,
                    c.description,
                    tuple((p.display_name, p.description, p.required) for p in c.parameters),
                )
                for c in local
            }
            remote_shape = {
                (
                    c.name,
                    c.description,
                    tuple(
                        (o.name, o.description, o.required if isinstance(o, app_commands.Argument) else None)
                        for o in c.options
                    ),
                )
                for c in remote
            }
            if remote_shape != local_shape:
                await self._tree.sync()
                log.info("registered Discord slash commands: %s", ", ".join(sorted(SLASH_COMMANDS)))
        except discord.HTTPException as exc:
            # Prefix commands still work; slash commands need the applications.commands scope.
            log.warning("could not register Discord slash commands: %s", _describe(exc))

    async def _on_ready(self) -> None:
        assert self.client is not None and self.client.user is not None
        log.info("connected to Discord as %s (%s guilds)", self.client.user, len(self.client.guilds))
        self._ready.set()

    async def _on_resumed(self) -> None:
        log.info("Discord gateway session resumed")

    async def stop_receiving(self) -> None:
        self._receiving = False

    async def stop(self) -> None:
        await self._abort()
        self._ready.clear()

    # -- translating events ---------------------------------------------------------------------

    def _me(self) -> int:
        assert self.client is not None and self.client.user is not None
        return self.client.user.id

    async def _channel_ref(self, channel: Any, channel_id: int, guild_id: int | None) -> ChannelRef:
        """The conversation a Discord channel (thread, forum post, DM, or uncached channel) is."""
        if guild_id is not None and (channel is None or isinstance(channel, discord.PartialMessageable)):
            # Not in discord.py's cache (an old thread, an unknown channel type): ask once, remember.
            if channel_id in self._fetched:
                return self._fetched[channel_id]
            assert self.client is not None
            fetched: Any = None
            with contextlib.suppress(discord.HTTPException, discord.InvalidData):
                fetched = await self.client.fetch_channel(channel_id)
            ref = self._ref_of(fetched, channel_id, guild_id)
            self._fetched[channel_id] = ref
            while len(self._fetched) > 10_000:
                self._fetched.popitem(last=False)
            return ref
        return self._ref_of(channel, channel_id, guild_id)

    @staticmethod
    def _ref_of(channel: Any, channel_id: int, guild_id: int | None) -> ChannelRef:
        if isinstance(channel, discord.Thread):
            return ChannelRef(
                PLATFORM, str(channel.parent_id), ChannelKind.GROUP, str(channel.id), clean_text(channel.name)
            )
        if guild_id is None:
            recipient = getattr(channel, "recipient", None)
            title = f"DM with {recipient.display_name}" if recipient is not None else "direct message"
            kind = ChannelKind.GROUP if isinstance(channel, discord.GroupChannel) else ChannelKind.DIRECT
            return ChannelRef(PLATFORM, str(channel_id), kind, title=clean_text(title))
        name = getattr(channel, "name", None)
        return ChannelRef(
            PLATFORM, str(channel_id), ChannelKind.GROUP, title=clean_text(f"#{name}" if name else "")
        )

    @staticmethod
    def _author(user: discord.User | discord.Member) -> AuthorRef:
        roles: tuple[str, ...] = ()
        if isinstance(user, discord.Member):
            roles = tuple(str(r.id) for r in user.roles if not r.is_default())
        return AuthorRef(PLATFORM, str(user.id), clean_text(user.display_name), bool(user.bot), roles)

    def _render(self, message: discord.Message) -> tuple[str, bool]:
        """The text a prompt sees: mentions as names, the bot's own mention removed; and whether the
        bot was mentioned (directly or through its role)."""
        me = self._me()
        guild = message.guild
        self_role = guild.self_role if guild is not None else None
        mentioned = False

        def replace(match: re.Match[str]) -> str:
            nonlocal mentioned
            if match["emoji"]:
                return f":{match['emoji']}:"
            if match["command"]:
                return f"/{match['command']}"
            kind, ident = match["kind"], int(match["id"])
            if kind in ("@", "@!"):
                if ident == me:
                    mentioned = True
                    return "\x00"  # removed below, with the space around it
                user = next((u for u in message.mentions if u.id == ident), None)
                if user is None and guild is not None:
                    user = guild.get_member(ident)
                return f"@{user.display_name}" if user is not None else "@unknown-user"
            if kind == "@&":
                if self_role is not None and ident == self_role.id:
                    mentioned = True
                    return "\x00"
                role = guild.get_role(ident) if guild is not None else None
                return f"@{role.name}" if role is not None else "@unknown-role"
            channel = self.client.get_channel(ident) if self.client is not None else None
            return f"#{getattr(channel, 'name', None) or 'unknown-channel'}"

        text = _MENTION.sub(replace, clean_text(message.content))
        # "Hi <@bot>, you" -> "Hi, you"; "<@bot> hello" -> "hello".
        text = re.sub(r"[ \t]*\x00[ \t]*(?=[,.!?;:])", "", text)
        text = re.sub(r"[ \t]*\x00[ \t]*", " ", text)
        extras = [f"[attachment: {clean_text(a.filename)}]" for a in message.attachments]
        extras += [f"[sticker: {clean_text(s.name)}]" for s in message.stickers]
        text = clean_text("\n".join(part for part in [text.strip(), " ".join(extras)] if part))
        return ("" if _blank(text) else text), mentioned

    async def _incoming(self, message: discord.Message) -> Incoming | None:
        if message.type not in CONVERSATION_TYPES:
            return None
        text, mentioned = self._render(message)
        reply_to = None
        replies_to_bot = False
        ref = message.reference
        if ref is not None and ref.type is discord.MessageReferenceType.reply and ref.message_id:
            reply_to = str(ref.message_id)
            target = ref.resolved if isinstance(ref.resolved, discord.Message) else ref.cached_message
            replies_to_bot = target is not None and target.author.id == self._me()
        channel = await self._channel_ref(
            message.channel, message.channel.id, message.guild.id if message.guild else None
        )
        return Incoming(
            platform=PLATFORM,
            channel=channel,
            author=self._author(message.author),
            text=text,
            platform_message_id=str(message.id),
            reply_to=reply_to,
            mentions_bot=mentioned,
            sent_at=message.created_at,
            replies_to_bot=replies_to_bot,
        )

    async def _handle(self, event: Incoming | Edited | Deleted) -> DispatchResult | None:
        assert self._on_event is not None
        try:
            return await self._on_event(event)
        except NotAccepted as exc:
            # Discord never sends an event again: this one is gone. Say so, loudly and precisely.
            log.error(
                "Discord %s %s in channel %s is lost: %s",
                type(event).__name__,
                event.platform_message_id,
                event.channel.key,
                exc,
            )
            return None
        except Exception:
            # One bad event must not stop the bot; the message id says which one.
            log.exception("handling Discord %s %s failed", type(event).__name__, event.platform_message_id)
            return None

    async def _on_message(self, message: discord.Message) -> None:
        if not self._receiving or message.author.id == self._me():
            return
        async with self._queues.hold(message.channel.id):
            try:
                event = await self._incoming(message)
            except Exception:
                log.exception("could not read Discord message %s", message.id)
                return
            if event is None:
                return
            result = await self._handle(event)
            if result is not None and result.notice:  # inside the lock: answers keep command order
                await self._post_notice(message, result.notice)

    async def _post_notice(self, message: discord.Message, notice: str) -> None:
        """A command's answer or a cooldown notice: not part of the conversation, so not in the outbox."""
        reference = message.to_reference(fail_if_not_exists=False) if message.guild is not None else None
        try:
            for index, chunk in enumerate(split_text(clean_text(notice), MESSAGE_LIMIT)):
                # discord.py's overloads leave out None, which `send` takes as "no reference".
                await message.channel.send(chunk, reference=reference if index == 0 else None)  # type: ignore[arg-type]
        except discord.HTTPException as exc:
            log.warning(
                "could not post a notice in Discord channel %s: %s", message.channel.id, _describe(exc)
            )

    async def answer_later(self, event: Incoming, notice: str) -> None:
        """A command's answer for a message stored late (it waited in the ingest spool)."""
        channel = self._messageable(event.channel)
        reference = None
        if event.platform_message_id.isdigit() and not event.channel.is_direct:
            reference = discord.MessageReference(
                message_id=int(event.platform_message_id), channel_id=channel.id, fail_if_not_exists=False
            )
        for index, chunk in enumerate(split_text(clean_text(notice), MESSAGE_LIMIT)):
            # discord.py's overloads leave out None, which `send` takes as "no reference".
            await channel.send(chunk, reference=reference if index == 0 else None, allowed_mentions=_NO_PINGS)  # type: ignore[arg-type]

    async def _on_raw_message_edit(self, payload: discord.RawMessageUpdateEvent) -> None:
        message = payload.message
        # Embed unfurls also arrive as updates; only a real edit has an edit time.
        if (
            not self._receiving
            or message.author.id == self._me()
            or payload.data.get("edited_timestamp") is None
        ):
            return
        if "content" not in payload.data or message.type not in CONVERSATION_TYPES:
            return
        async with self._queues.hold(payload.channel_id):
            try:
                text, _ = self._render(message)
                channel = await self._channel_ref(message.channel, payload.channel_id, payload.guild_id)
            except Exception:
                log.exception("could not read the edit of Discord message %s", payload.message_id)
                return
            edited_at = message.edited_at or discord.utils.utcnow()
            await self._handle(Edited(PLATFORM, channel, str(payload.message_id), text, edited_at))

    async def _on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        await self._deleted(payload.channel_id, payload.guild_id, [payload.message_id])

    async def _on_raw_bulk_message_delete(self, payload: discord.RawBulkMessageDeleteEvent) -> None:
        await self._deleted(payload.channel_id, payload.guild_id, sorted(payload.message_ids))

    async def _deleted(self, channel_id: int, guild_id: int | None, message_ids: list[int]) -> None:
        if not self._receiving:
            return
        assert self.client is not None
        async with self._queues.hold(channel_id):
            try:
                channel = await self._channel_ref(self.client.get_channel(channel_id), channel_id, guild_id)
            except Exception:
                log.exception("could not resolve Discord channel %s for a delete", channel_id)
                return
            for message_id in message_ids:
                await self._handle(Deleted(PLATFORM, channel, str(message_id)))

    # -- slash commands -------------------------------------------------------------------------

    def _slash_command(
        self, name: str, description: str, option: tuple[str, str] | None
    ) -> app_commands.Command[Any, ..., None]:
        if option is None:

            async def without_argument(interaction: discord.Interaction) -> None:
                await self._run_slash(interaction, f"/{name}")

            callback: Any = without_argument
        else:

            async def with_argument(interaction: discord.Interaction, argument: str | None = None) -> None:
                await self._run_slash(interaction, f"/{name} {argument or ''}".rstrip())

            callback = app_commands.rename(argument=option[0])(
                app_commands.describe(argument=option[1])(with_argument)
            )
        return app_commands.Command(name=name, description=description, callback=callback)

    async def _run_slash(self, interaction: discord.Interaction, text: str) -> None:
        """The command goes through the dispatcher like a typed one; its answer is the response."""
        if not self._receiving:
            await interaction.response.send_message(
                "The bot is restarting; try again in a moment.", ephemeral=True
            )
            return
        channel_id = interaction.channel_id or 0
        channel = await self._channel_ref(interaction.channel, channel_id, interaction.guild_id)
        event = Incoming(
            platform=PLATFORM,
            channel=channel,
            author=self._author(interaction.user),
            text=text,
            platform_message_id=f"interaction:{interaction.id}",
            sent_at=interaction.created_at,
        )
        task = asyncio.ensure_future(self._handle(event))
        done, _ = await asyncio.wait({task}, timeout=self.interaction_defer_after)
        deferred = not done
        if deferred:
            await interaction.response.defer(thinking=True)
        result = await task
        if result is None:
            answer, ephemeral = "Sorry, that failed; the bot's log says why.", True
        elif result.notice:
            answer, ephemeral = result.notice, False
        elif result.spooled:  # the database is away: the answer comes later, as a message here
            answer, ephemeral = "The bot is catching up; the answer follows here in a moment.", True
        else:
            answer, ephemeral = "You can't use this bot here.", True
        chunk = (split_text(clean_text(answer), MESSAGE_LIMIT) or ["…"])[0]
        if deferred:
            await interaction.followup.send(chunk, ephemeral=ephemeral, allowed_mentions=_NO_PINGS)
        else:
            await interaction.response.send_message(chunk, ephemeral=ephemeral, allowed_mentions=_NO_PINGS)

    # -- delivering -----------------------------------------------------------------------------

    def _messageable(self, channel: ChannelRef) -> discord.PartialMessageable:
        assert self.client is not None, "start() first"
        target = int(channel.thread_id or channel.external_id)
        return self.client.get_partial_messageable(target)

    async def deliver(self, reply: Outgoing) -> list[str]:
        """Post the reply in chunks under 2,000 characters; returns the ids of every chunk.

        A streamed message (`streamed_id`) is edited into the first chunk. Each chunk carries a nonce
        from the outbox row, so a retried delivery gets back the message Discord already created.
        """
        target = self._messageable(reply.channel)
        chunks = split_text(clean_text(reply.text), MESSAGE_LIMIT)
        ids = list(reply.delivered_ids)
        try:
            if reply.streamed_id is not None and not ids:
                streamed = target.get_partial_message(int(reply.streamed_id))
                if not chunks:  # nothing to say after all: take the "typing…" placeholder away
                    with contextlib.suppress(discord.NotFound):
                        await streamed.delete()
                    return []
                try:
                    await streamed.edit(content=chunks[0], allowed_mentions=_NO_PINGS)
                    ids.append(reply.streamed_id)
                except discord.NotFound:  # someone deleted the preview: post the reply afresh
                    pass
            reference = None
            if reply.reply_to and reply.reply_to.isdigit() and not reply.channel.is_direct:
                reference = discord.MessageReference(
                    message_id=int(reply.reply_to), channel_id=target.id, fail_if_not_exists=False
                )
            for index in range(len(ids), len(chunks)):
                sent = await target.send(
                    chunks[index],
                    nonce=f"pb{reply.outbox_id}.{index}",
                    # discord.py's overloads leave out None, which `send` takes as "no reference".
                    reference=reference if index == 0 else None,  # type: ignore[arg-type]
                    allowed_mentions=_NO_PINGS,
                )
                ids.append(str(sent.id))
        except Exception as exc:
            failure: Exception = refusal(exc) or exc
            if len(ids) > len(reply.delivered_ids):  # the retry must not post these chunks again
                raise PartialDelivery(ids, failure) from exc
            if failure is exc:
                raise
            raise failure from exc
        return ids

    async def preview(self, channel: ChannelRef, text: str, job_id: int) -> str:
        """Post the first part of a reply still being generated; its nonce comes from the job."""
        sent = await self._messageable(channel).send(
            _streamed(text) or "…",
            nonce=f"pbs{job_id}",
            allowed_mentions=_NO_PINGS,
        )
        return str(sent.id)

    async def edit(self, channel: ChannelRef, platform_message_id: str, text: str) -> None:
        """Show streamed text; longer than one message, the first part is shown until the end."""
        shown = _streamed(text)
        if not shown:
            return
        message = self._messageable(channel).get_partial_message(int(platform_message_id))
        await message.edit(content=shown, allowed_mentions=_NO_PINGS)

    async def typing(self, channel: ChannelRef) -> None:
        assert self.client is not None, "start() first"
        await self.client.http.send_typing(int(channel.thread_id or channel.external_id))


def _streamed(text: str) -> str:
    """Streamed text as one message: longer than that, its first part and a marker."""
    chunks = split_text(clean_text(text), MESSAGE_LIMIT - 2)
    if not chunks:
        return ""
    return chunks[0] if len(chunks) == 1 else chunks[0] + " …"


def refusal(exc: BaseException) -> DeliveryRefused | None:
    """A Discord answer that no retry can change, as a `DeliveryRefused`; None for transient ones.

    4xx answers are final (403/50007 the user's DMs are closed, 403/50013 missing permissions,
    404/10003 unknown channel, 400 a malformed message), except 408 and 429 (rate limits, which
    discord.py already waits out) and 401 (the token, not the reply, is at fault; the connection
    watchdog deals with it).
    """
    if not isinstance(exc, discord.HTTPException) or isinstance(exc, discord.DiscordServerError):
        return None
    if exc.status < 400 or exc.status >= 500 or exc.status in (401, 408, 429):
        return None
    code = f"{exc.status}/{exc.code}" if exc.code else str(exc.status)
    return DeliveryRefused(code, exc.text or exc.response.reason or "")


def _describe(exc: BaseException) -> str:
    """A short, token-free description of a failure, for one-line errors and warnings."""
    if isinstance(exc, discord.HTTPException):
        return f"{exc.status} {exc.text or exc.response.reason}".strip()
    if isinstance(exc, discord.ConnectionClosed):
        return f"gateway closed with code {exc.code}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

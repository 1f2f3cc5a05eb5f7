"""A small fake Discord on 127.0.0.1: the REST API and the gateway websocket a bot uses.

It is generic: tests create users, guilds, channels, threads and DMs, then make users speak
(`say`), edit, delete, or run slash commands; the real discord.py client connects to it and the
test reads what the bot posted (`posted`), edited, and the REST calls it made (`requests`).

What it models, because the adapter depends on it:
- authentication (`Authorization: Bot <token>` on REST, the token in IDENTIFY; 401 / close 4004);
- the gateway handshake (HELLO, heartbeat ACKs, IDENTIFY -> READY + GUILD_CREATE), sequence numbers,
  RECONNECT (op 7), RESUME with replay of the events missed while disconnected, and sharding
  (guild -> shard by `(guild_id >> 22) % shard_count`);
- the MESSAGE_CONTENT intent (without it, content is blanked as Discord does);
- message limits (2,000 characters, no empty messages), `enforce_nonce` deduplication, replies,
  edits of the bot's own messages only, and a MESSAGE_CREATE echo of everything the bot posts;
- rate limits and outages on demand (`fail_next`: 429 with `Via` and `retry_after`, or any 5xx),
  and requests held without an answer (`hold_next`) to simulate a crash mid-request.

JSON answers carry exactly `Content-Type: application/json`: discord.py parses nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import WSMsgType, web

DISCORD_EPOCH_MS = 1420070400000
MESSAGE_CONTENT_INTENT = 1 << 15
Json = dict[str, Any]


def _iso(ts: float | None = None) -> str:
    return datetime.fromtimestamp(ts or time.time(), UTC).isoformat()


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(data).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
    )


def _error(status: int, code: int, message: str) -> web.Response:
    return _json({"message": message, "code": code}, status)


@dataclass
class Failure:
    method: str
    path: re.Pattern[str]
    status: int
    retry_after: float = 0.0
    skip: int = 0  # matching requests to let through first
    code: int = 0  # Discord's JSON error code (50007: cannot send messages to this user)
    message: str = ""


@dataclass
class Session:
    """A gateway session: its shard, the events dispatched in it, and its live socket (if any)."""

    id: str
    shard: tuple[int, int]
    intents: int
    events: list[Json] = field(default_factory=list)
    ws: web.WebSocketResponse | None = None
    resumed: int = 0

    @property
    def seq(self) -> int:
        return len(self.events)


class FakeDiscord:
    def __init__(
        self,
        token: str = "fake.discord.token-0123456789",
        *,
        heartbeat_ms: int = 400,
        message_content_allowed: bool = True,
    ) -> None:
        self.token = token
        # False: the bot's owner has not enabled the Message Content intent (IDENTIFY asking for it
        # is closed with 4014, as Discord does).
        self.message_content_allowed = message_content_allowed
        self.heartbeat_ms = heartbeat_ms
        self._ids = itertools.count(1)
        self.users: dict[str, Json] = {}
        self.guilds: dict[str, Json] = {}
        self.channels: dict[str, Json] = {}
        self.messages: dict[str, Json] = {}  # id -> message payload, for every channel
        self.commands: list[Json] = []  # registered application commands
        self.interaction_responses: dict[str, Json] = {}
        self.interaction_channels: dict[str, str] = {}
        self.requests: list[tuple[str, str, Any]] = []  # (method, path, json body)
        self.typing: list[str] = []  # channel ids
        self.sessions: dict[str, Session] = {}
        self.identify_count = 0
        self.gateway_paths: list[str] = []  # every gateway connection attempt, by URL path
        self.gateway_down = False  # True: refuse new gateway connections (an outage)
        self.resume_count = 0
        self.shard_count = 1  # answered by GET /gateway/bot
        self._failures: list[Failure] = []
        self._holds: list[tuple[str, re.Pattern[str], asyncio.Event]] = []
        self._held: list[asyncio.Event] = []  # every hold ever made, released on close
        self._nonces: dict[tuple[str, str], str] = {}
        self._interaction_waiters: dict[str, asyncio.Future[Json]] = {}
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.bot = self.add_user("personabot", bot=True)
        self.application_id = self.snowflake()

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> FakeDiscord:
        app = web.Application()
        app.router.add_get("/gateway", self._gateway)
        app.router.add_get("/resume-gateway", self._gateway)
        app.router.add_route("*", "/api/v10/{path:.*}", self._rest)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def close(self) -> None:
        for event in self._held:
            event.set()
        for session in self.sessions.values():
            if session.ws is not None:
                await session.ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v10"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway"

    # -- building the world ---------------------------------------------------------------------

    def snowflake(self) -> str:
        return str(((int(time.time() * 1000) - DISCORD_EPOCH_MS) << 22) | (next(self._ids) & 0x3FFFFF))

    def add_user(self, name: str, *, bot: bool = False, global_name: str | None = None) -> Json:
        user = {
            "id": self.snowflake(),
            "username": name,
            "discriminator": "0",
            "global_name": global_name,
            "avatar": None,
            "bot": bot,
            "flags": 0,
            "public_flags": 0,
        }
        self.users[user["id"]] = user
        return user

    def add_guild(self, name: str, *, guild_id: str | None = None) -> Json:
        gid = guild_id or self.snowflake()
        everyone = {"id": gid, "name": "@everyone", "permissions": "1024", "position": 0}
        guild: Json = {
            "id": gid,
            "name": name,
            "icon": None,
            "owner_id": self.bot["id"],
            "roles": [self._role(everyone)],
            "emojis": [],
            "stickers": [],
            "features": [],
            "members": [],
            "channels": [],
            "threads": [],
            "presences": [],
            "voice_states": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
            "member_count": 0,
            "large": False,
            "unavailable": False,
            "joined_at": _iso(),
            "afk_timeout": 300,
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "mfa_level": 0,
            "premium_tier": 0,
            "system_channel_flags": 0,
            "preferred_locale": "en-US",
            "nsfw_level": 0,
            "premium_progress_bar_enabled": False,
        }
        self.guilds[gid] = guild
        self.add_member(guild, self.bot)
        return guild

    @staticmethod
    def _role(data: Json) -> Json:
        return {
            "color": 0,
            "hoist": False,
            "managed": False,
            "mentionable": True,
            "flags": 0,
            "permissions": "0",
            **data,
        }

    def add_role(self, guild: Json, name: str) -> Json:
        role = self._role({"id": self.snowflake(), "name": name, "position": len(guild["roles"])})
        guild["roles"].append(role)
        return role

    def add_member(self, guild: Json, user: Json, *, roles: list[Json] = (), nick: str | None = None) -> Json:  # type: ignore[assignment]
        member = {
            "user": user,
            "nick": nick,
            "roles": [r["id"] for r in roles],
            "joined_at": _iso(),
            "deaf": False,
            "mute": False,
            "flags": 0,
        }
        guild["members"].append(member)
        guild["member_count"] = len(guild["members"])
        return member

    def add_channel(self, guild: Json, name: str, *, type: int = 0, parent: Json | None = None) -> Json:
        """A guild channel: 0 text, 15 forum, or any other type number (unknown ones included)."""
        channel = {
            "id": self.snowflake(),
            "type": type,
            "guild_id": guild["id"],
            "name": name,
            "position": len(guild["channels"]),
            "permission_overwrites": [],
            "nsfw": False,
            "parent_id": parent["id"] if parent else None,
            "topic": None,
            "last_message_id": None,
            "rate_limit_per_user": 0,
            "flags": 0,
        }
        if type == 15:
            channel |= {"available_tags": [], "default_reaction_emoji": None, "default_sort_order": None}
        guild["channels"].append(channel)
        self.channels[channel["id"]] = channel
        return channel

    def add_thread(
        self, parent: Json, name: str, *, owner: Json | None = None, announced: bool = True
    ) -> Json:
        """A public thread in a text channel, or a post in a forum channel. `announced=False`: an old
        thread the gateway never mentioned, so the client must ask REST about it."""
        guild = self.guilds[parent["guild_id"]]
        thread = {
            "id": self.snowflake(),
            "type": 11,
            "guild_id": guild["id"],
            "parent_id": parent["id"],
            "owner_id": (owner or self.bot)["id"],
            "name": name,
            "last_message_id": None,
            "message_count": 0,
            "member_count": 1,
            "rate_limit_per_user": 0,
            "flags": 0,
            "thread_metadata": {
                "archived": False,
                "auto_archive_duration": 1440,
                "archive_timestamp": _iso(),
                "locked": False,
            },
        }
        if announced:
            guild["threads"].append(thread)
        self.channels[thread["id"]] = thread
        return thread

    def open_dm(self, user: Json) -> Json:
        channel = {"id": self.snowflake(), "type": 1, "recipients": [user], "last_message_id": None}
        self.channels[channel["id"]] = channel
        return channel

    # -- what the bot did -----------------------------------------------------------------------

    def posted(self, channel: Json | None = None) -> list[Json]:
        """Messages the bot posted (oldest first), in one channel or everywhere."""
        return [
            m
            for m in self.messages.values()
            if m["author"]["id"] == self.bot["id"] and (channel is None or m["channel_id"] == channel["id"])
        ]

    def calls(self, method: str, pattern: str) -> list[tuple[str, str, Any]]:
        return [r for r in self.requests if r[0] == method and re.fullmatch(pattern, r[1])]

    async def wait_until(self, predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Wait until `predicate()` is truthy (re-checked whenever the fake sees a request)."""
        async with asyncio.timeout(timeout):
            while not (result := predicate()):
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), 0.05)
            return result

    def fail_next(
        self,
        method: str,
        path: str,
        status: int,
        *,
        retry_after: float = 0.0,
        times: int = 1,
        skip: int = 0,
        code: int = 0,
        message: str = "",
    ) -> None:
        """After `skip` matching requests, the next `times` get `status` (a 429 carries `retry_after`
        and the `Via` header, as Discord's do; a refusal carries Discord's `code` and `message`)."""
        for n in range(times):
            self._failures.append(
                Failure(method, re.compile(path), status, retry_after, skip if n == 0 else 0, code, message)
            )

    def hold_next(self, method: str, path: str) -> asyncio.Event:
        """The next matching request is carried out but not answered until the event is set."""
        event = asyncio.Event()
        self._holds.append((method, re.compile(path), event))
        self._held.append(event)
        return event

    # -- users acting ---------------------------------------------------------------------------

    def _message(self, channel: Json, author: Json, content: str, **extra: Any) -> Json:
        message: Json = {
            "id": self.snowflake(),
            "channel_id": channel["id"],
            "author": author,
            "content": content,
            "timestamp": _iso(),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": "@everyone" in content,
            "mentions": [],
            "mention_roles": [],
            "attachments": [],
            "embeds": [],
            "pinned": False,
            "type": 0,
            "flags": 0,
            "components": [],
        }
        if "guild_id" in channel:
            message["guild_id"] = channel["guild_id"]
            member = self._member(channel["guild_id"], author["id"])
            if member is not None:
                message["member"] = {k: v for k, v in member.items() if k != "user"}
        message.update(extra)
        return message

    def _member(self, guild_id: str, user_id: str) -> Json | None:
        return next((m for m in self.guilds[guild_id]["members"] if m["user"]["id"] == user_id), None)

    async def say(
        self,
        channel: Json,
        author: Json,
        content: str,
        *,
        mentions: list[Json] = (),  # type: ignore[assignment]
        mention_roles: list[Json] = (),  # type: ignore[assignment]
        reply_to: Json | None = None,
        **extra: Any,
    ) -> Json:
        """`author` posts `content` in `channel`; the bot gets MESSAGE_CREATE."""
        message = self._message(channel, author, content, **extra)
        mentioned = []
        for user in mentions:
            entry = dict(user)
            if "guild_id" in channel and (member := self._member(channel["guild_id"], user["id"])):
                entry["member"] = {k: v for k, v in member.items() if k != "user"}
            mentioned.append(entry)
        message["mentions"] = mentioned
        message["mention_roles"] = [r["id"] for r in mention_roles]
        if reply_to is not None:
            message["type"] = 19
            message["message_reference"] = {
                "type": 0,
                "message_id": reply_to["id"],
                "channel_id": reply_to["channel_id"],
                **({"guild_id": channel["guild_id"]} if "guild_id" in channel else {}),
            }
            message["referenced_message"] = reply_to
        self.messages[message["id"]] = message
        await self.dispatch("MESSAGE_CREATE", message)
        return message

    async def edit(self, message: Json, content: str) -> Json:
        message |= {"content": content, "edited_timestamp": _iso()}
        await self.dispatch("MESSAGE_UPDATE", message)
        return message

    async def delete(self, message: Json) -> None:
        self.messages.pop(message["id"], None)
        data = {"id": message["id"], "channel_id": message["channel_id"]}
        if "guild_id" in message:
            data["guild_id"] = message["guild_id"]
        await self.dispatch("MESSAGE_DELETE", data)

    async def delete_bulk(self, messages: list[Json]) -> None:
        """A moderator purges several messages of one channel at once."""
        for message in messages:
            self.messages.pop(message["id"], None)
        first = messages[0]
        data = {"ids": [m["id"] for m in messages], "channel_id": first["channel_id"]}
        if "guild_id" in first:
            data["guild_id"] = first["guild_id"]
        await self.dispatch("MESSAGE_DELETE_BULK", data)

    async def slash(self, channel: Json, user: Json, command: str, **options: str) -> Json:
        """Run the slash command `/command`; returns the bot's interaction response."""
        data = self.interaction(channel, user, command, **options)
        interaction_id = data["id"]
        waiter: asyncio.Future[Json] = asyncio.get_running_loop().create_future()
        self._interaction_waiters[interaction_id] = waiter
        self.interaction_channels[interaction_id] = channel["id"]
        await self.dispatch("INTERACTION_CREATE", data, guild_id=channel.get("guild_id"))
        async with asyncio.timeout(10):
            return await waiter

    def interaction(self, channel: Json, user: Json, command: str, **options: str) -> Json:
        """The INTERACTION_CREATE payload of `/command` (not dispatched: see `slash`)."""
        interaction_id = self.snowflake()
        token = f"interaction-token-{interaction_id}"
        registered = next((c for c in self.commands if c["name"] == command), None)
        data: Json = {
            "id": interaction_id,
            "application_id": self.application_id,
            "type": 2,
            "token": token,
            "version": 1,
            "data": {
                "id": registered["id"] if registered else self.snowflake(),
                "name": command,
                "type": 1,
                "options": [{"name": k, "type": 3, "value": v} for k, v in options.items()],
            },
            "channel_id": channel["id"],
            "channel": {k: v for k, v in channel.items() if k != "recipients"},
            "app_permissions": "0",
            "locale": "en-US",
            "attachment_size_limit": 8388608,
            "authorizing_integration_owners": {},
            "context": 0 if "guild_id" in channel else 1,
            "entitlements": [],
        }
        if "guild_id" in channel:
            data["guild_id"] = channel["guild_id"]
            member = self._member(channel["guild_id"], user["id"])
            data["member"] = {
                **(member or {"roles": [], "joined_at": _iso()}),
                "user": user,
                "permissions": "0",
            }
        else:
            data["user"] = user
        return data

    # -- gateway --------------------------------------------------------------------------------

    def _shard_of(self, guild_id: str | None, count: int) -> int:
        return 0 if guild_id is None else (int(guild_id) >> 22) % count

    async def dispatch(self, event: str, data: Json, *, guild_id: str | None = None) -> None:
        """Send a gateway event to the session of the right shard (kept for RESUME when offline)."""
        guild_id = guild_id or data.get("guild_id")
        for session in self.sessions.values():
            if self._shard_of(guild_id, session.shard[1]) != session.shard[0]:
                continue
            payload = data
            if event in ("MESSAGE_CREATE", "MESSAGE_UPDATE") and not session.intents & MESSAGE_CONTENT_INTENT:
                # Without the privileged intent, Discord leaves content out (except DMs and mentions).
                if "guild_id" in data and all(u["id"] != self.bot["id"] for u in data.get("mentions", [])):
                    payload = {**data, "content": ""}
            frame = {"op": 0, "t": event, "s": session.seq + 1, "d": payload}
            session.events.append(frame)
            if session.ws is not None and not session.ws.closed:
                await session.ws.send_str(json.dumps(frame))

    async def reconnect(self) -> None:
        """Ask every connected client to reconnect (op 7); they should RESUME."""
        for session in self.sessions.values():
            if session.ws is not None and not session.ws.closed:
                await session.ws.send_str(json.dumps({"op": 7, "d": None}))

    async def drop_connections(self, code: int = 4000) -> None:
        """Close every gateway socket as an outage would; sessions stay resumable."""
        for session in self.sessions.values():
            if session.ws is not None:
                ws, session.ws = session.ws, None
                await ws.close(code=code)

    def _session_of(self, ws: web.WebSocketResponse) -> Session | None:
        return next((s for s in self.sessions.values() if s.ws is ws), None)

    async def _gateway(self, request: web.Request) -> web.StreamResponse:
        self.gateway_paths.append(request.path)
        self._changed.set()
        if self.gateway_down:
            return web.Response(status=503, text="gateway unavailable")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str(json.dumps({"op": 10, "d": {"heartbeat_interval": self.heartbeat_ms}}))
        async for frame in ws:
            if frame.type is not WSMsgType.TEXT:
                continue
            msg = json.loads(frame.data)
            op, d = msg.get("op"), msg.get("d")
            if op == 1:
                await ws.send_str(json.dumps({"op": 11}))
            elif op == 2:
                await self._identify(ws, d)
            elif op == 6:
                await self._resume(ws, d)
            self._changed.set()
        session = self._session_of(ws)
        if session is not None:
            session.ws = None
        return ws

    async def _identify(self, ws: web.WebSocketResponse, d: Json) -> None:
        if d.get("token") != self.token:
            await ws.close(code=4004, message=b"Authentication failed.")
            return
        if d.get("intents", 0) & MESSAGE_CONTENT_INTENT and not self.message_content_allowed:
            await ws.close(code=4014, message=b"Disallowed intent(s).")
            return
        self.identify_count += 1
        shard = tuple(d.get("shard") or (0, 1))
        session = Session(id=f"session-{next(self._ids)}", shard=shard, intents=d.get("intents", 0))  # type: ignore[arg-type]
        session.ws = ws
        self.sessions[session.id] = session
        guilds = [g for g in self.guilds.values() if self._shard_of(g["id"], shard[1]) == shard[0]]
        ready = {
            "v": 10,
            "user": self.bot,
            "guilds": [{"id": g["id"], "unavailable": True} for g in guilds],
            "session_id": session.id,
            "resume_gateway_url": f"ws://127.0.0.1:{self.port}/resume-gateway",
            "application": {"id": self.application_id, "flags": 0},
            "shard": list(shard),
            "private_channels": [],
            "relationships": [],
        }
        await self.dispatch_to(session, "READY", ready)
        for guild in guilds:
            await self.dispatch_to(session, "GUILD_CREATE", guild)

    async def dispatch_to(self, session: Session, event: str, data: Json) -> None:
        frame = {"op": 0, "t": event, "s": session.seq + 1, "d": data}
        session.events.append(frame)
        if session.ws is not None:
            await session.ws.send_str(json.dumps(frame))

    async def _resume(self, ws: web.WebSocketResponse, d: Json) -> None:
        session = self.sessions.get(d.get("session_id", ""))
        if d.get("token") != self.token:
            await ws.close(code=4004, message=b"Authentication failed.")
            return
        if session is None:
            await ws.send_str(json.dumps({"op": 9, "d": False}))
            return
        self.resume_count += 1
        session.resumed += 1
        session.ws = ws
        for frame in session.events[int(d.get("seq") or 0) :]:
            await ws.send_str(json.dumps(frame))
        await self.dispatch_to(session, "RESUMED", {})

    # -- REST -----------------------------------------------------------------------------------

    async def _rest(self, request: web.Request) -> web.StreamResponse:
        path = "/" + request.match_info["path"]
        body = None
        if request.can_read_body and request.content_type == "application/json":
            body = await request.json()
        self.requests.append((request.method, path, body))
        self._changed.set()
        if (
            not path.startswith(("/interactions/", "/webhooks/"))
            and request.headers.get("Authorization") != f"Bot {self.token}"
        ):
            return _error(401, 0, "401: Unauthorized")
        for failure in self._failures:
            if failure.method == request.method and failure.path.fullmatch(path):
                if failure.skip:
                    failure.skip -= 1
                    break
                self._failures.remove(failure)
                if failure.status == 429:
                    return _json(
                        {
                            "message": "You are being rate limited.",
                            "retry_after": failure.retry_after,
                            "global": False,
                        },
                        429,
                        {"Via": "1.1 google", "Retry-After": str(max(1, round(failure.retry_after)))},
                    )
                return _error(
                    failure.status, failure.code, failure.message or f"{failure.status}: fake outage"
                )
        response = await self._route(request.method, path, body, request)
        for hold in self._holds:
            if hold[0] == request.method and hold[1].fullmatch(path):
                self._holds.remove(hold)
                await hold[2].wait()
                break
        return response

    async def _route(self, method: str, path: str, body: Any, request: web.Request) -> web.StreamResponse:
        if (method, path) == ("GET", "/users/@me"):
            return _json(self.bot)
        if (method, path) == ("GET", "/oauth2/applications/@me"):
            return _json(self._application())
        if (method, path) == ("GET", "/gateway/bot"):
            limit = {"total": 1000, "remaining": 999, "reset_after": 0, "max_concurrency": 1}
            return _json({"url": self.gateway_url, "shards": self.shard_count, "session_start_limit": limit})
        if m := re.fullmatch(r"/applications/(\d+)/commands", path):
            if method == "GET":
                return _json(self.commands)
            if method == "PUT":
                self.commands = [
                    {**c, "id": self.snowflake(), "application_id": m[1], "version": "1"} for c in body
                ]
                return _json(self.commands)
        if m := re.fullmatch(r"/channels/(\d+)", path):
            channel = self.channels.get(m[1])
            return _json(channel) if channel else _error(404, 10003, "Unknown Channel")
        if m := re.fullmatch(r"/channels/(\d+)/typing", path):
            if m[1] not in self.channels:
                return _error(404, 10003, "Unknown Channel")
            self.typing.append(m[1])
            return web.Response(status=204)
        if m := re.fullmatch(r"/channels/(\d+)/messages", path):
            if method == "POST":
                return await self._create_message(m[1], body or {})
        if m := re.fullmatch(r"/channels/(\d+)/messages/(\d+)", path):
            return await self._existing_message(method, m[1], m[2], body or {})
        if m := re.fullmatch(r"/interactions/(\d+)/([^/]+)/callback", path):
            return self._interaction_callback(m[1], body or {})
        if (m := re.fullmatch(r"/webhooks/(\d+)/interaction-token-(\d+)", path)) and method == "POST":
            return self._followup(m[2], body or {})
        return _error(404, 0, f"404: Not Found ({method} {path})")

    def _application(self) -> Json:
        return {
            "id": self.application_id,
            "name": "personabot",
            "icon": None,
            "description": "",
            "bot_public": True,
            "bot_require_code_grant": False,
            "owner": self.users[self.bot["id"]],
            "verify_key": "0" * 64,
            "flags": 0,
            "team": None,
        }

    def _check_content(self, body: Json) -> web.Response | None:
        content = body.get("content") or ""
        if len(content) > 2000:
            return _json(
                {
                    "message": "Invalid Form Body",
                    "code": 50035,
                    "errors": {"content": {"_errors": [{"code": "BASE_TYPE_MAX_LENGTH"}]}},
                },
                400,
            )
        if not content.strip() and not body.get("embeds"):
            return _error(400, 50006, "Cannot send an empty message")
        return None

    async def _create_message(self, channel_id: str, body: Json) -> web.Response:
        channel = self.channels.get(channel_id)
        if channel is None:
            return _error(404, 10003, "Unknown Channel")
        if (problem := self._check_content(body)) is not None:
            return problem
        nonce = body.get("nonce")
        if nonce is not None and body.get("enforce_nonce") and (channel_id, str(nonce)) in self._nonces:
            return _json(self.messages[self._nonces[(channel_id, str(nonce))]])
        extra: Json = {}
        if nonce is not None:
            extra["nonce"] = str(nonce)
        reference = body.get("message_reference")
        if reference:
            target = self.messages.get(str(reference.get("message_id")))
            if target is None and reference.get("fail_if_not_exists", True):
                return _error(400, 50035, "Invalid Form Body (message_reference: Unknown message)")
            if target is not None:
                extra |= {
                    "type": 19,
                    "message_reference": {"message_id": target["id"], "channel_id": channel_id},
                    "referenced_message": target,
                }
        message = self._message(channel, self.bot, body.get("content") or "", **extra)
        message["embeds"] = body.get("embeds") or []
        self.messages[message["id"]] = message
        if nonce is not None and body.get("enforce_nonce"):
            self._nonces[(channel_id, str(nonce))] = message["id"]
        await self.dispatch("MESSAGE_CREATE", message)  # Discord echoes the bot's own messages
        return _json(message)

    async def _existing_message(
        self, method: str, channel_id: str, message_id: str, body: Json
    ) -> web.Response:
        message = self.messages.get(message_id)
        if message is None or message["channel_id"] != channel_id:
            return _error(404, 10008, "Unknown Message")
        if method == "GET":
            return _json(message)
        if message["author"]["id"] != self.bot["id"]:
            return _error(403, 50005, "Cannot edit a message authored by another user")
        if method == "PATCH":
            if "content" in body and (problem := self._check_content(body)) is not None:
                return problem
            message |= {k: v for k, v in body.items() if k in ("content", "embeds")}
            message["edited_timestamp"] = _iso()
            await self.dispatch("MESSAGE_UPDATE", message)
            return _json(message)
        if method == "DELETE":
            await self.delete(message)
            return web.Response(status=204)
        return _error(405, 0, "405: Method Not Allowed")

    def _followup(self, interaction_id: str, body: Json) -> web.Response:
        waiter = self._interaction_waiters.pop(interaction_id, None)
        if waiter is None:
            return _error(404, 10015, "Unknown Webhook")
        waiter.set_result({"type": 4, "data": body, "followup": True})
        channel = self.channels.get(self.interaction_channels.get(interaction_id, ""), {"id": "0"})
        message = self._message(channel, self.bot, body.get("content") or "")
        message["webhook_id"] = self.application_id
        return _json(message)

    def _interaction_callback(self, interaction_id: str, body: Json) -> web.Response:
        waiter = self._interaction_waiters.get(interaction_id)
        if waiter is None or interaction_id in self.interaction_responses:
            return _error(404 if waiter is None else 400, 10062, "Unknown interaction")
        self.interaction_responses[interaction_id] = body
        if body.get("type") != 5:  # 5 = deferred: the answer comes as a follow-up
            self._interaction_waiters.pop(interaction_id)
            waiter.set_result(body)
        return _json(
            {
                "interaction": {"id": interaction_id, "type": 2, "response_message_loading": False},
                "resource": {"type": body.get("type", 4)},
            }
        )

"""Access rules and cooldowns, the same on every platform.

Identities in config are `platform:id` for users, `platform:role:id` for roles and `platform:id` for
channels (see `AccessSettings`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bot.config import AccessSettings
from bot.events import AuthorRef, ChannelRef


def _role_keys(author: AuthorRef) -> set[str]:
    return {f"{author.platform}:role:{role}" for role in author.roles}


class AccessPolicy:
    """Decides who may talk to the bot and who is an admin."""

    def __init__(self, settings: AccessSettings) -> None:
        self.settings = settings

    def is_admin(self, author: AuthorRef) -> bool:
        return author.key in self.settings.admins or bool(_role_keys(author) & set(self.settings.admins))

    def refusal(self, author: AuthorRef, channel: ChannelRef) -> str | None:
        """Why this author may not use the bot here, or None when they may."""
        s = self.settings
        if author.is_bot and s.ignore_bots:
            return "message from a bot"
        if self.is_admin(author):
            return None
        roles = _role_keys(author)
        # A rule for a channel covers its threads / topics; `platform:id/thread` names one of them.
        channel_keys = {f"{channel.platform}:{channel.external_id}", channel.key}
        if author.key in s.blocked_users:
            return "blocked user"
        if roles & set(s.blocked_roles):
            return "blocked role"
        if channel_keys & set(s.blocked_channels):
            return "blocked channel"
        if s.allowed_users or s.allowed_roles:
            if author.key not in s.allowed_users and not roles & set(s.allowed_roles):
                return "user not allowed"
        if s.allowed_channels and not channel.is_direct and not channel_keys & set(s.allowed_channels):
            return "channel not allowed"
        return None


@dataclass
class _Bucket:
    tokens: float
    updated: float
    last_notice: float = field(default=-1e18)


class Cooldowns:
    """Token buckets per user and per channel; a limited caller gets one notice per window.

    A rate of N per minute allows bursts of up to N messages, refilled continuously.
    """

    def __init__(
        self, user_per_minute: float, channel_per_minute: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.user_rate = user_per_minute
        self.channel_rate = channel_per_minute
        self.clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def _take(self, key: str, per_minute: float) -> _Bucket | None:
        """Take one token; returns the bucket when it was empty (limited), None otherwise."""
        if per_minute <= 0:
            return None
        now = self.clock()
        capacity = max(per_minute, 1.0)
        bucket = self._buckets.setdefault(key, _Bucket(tokens=capacity, updated=now))
        bucket.tokens = min(capacity, bucket.tokens + (now - bucket.updated) * per_minute / 60.0)
        bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return None
        return bucket

    def check(self, author: AuthorRef, channel: ChannelRef) -> tuple[bool, bool]:
        """(allowed, send_notice): send_notice is True at most once per cooldown window."""
        for key, rate in (
            (f"user:{author.key}", self.user_rate),
            (f"channel:{channel.key}", self.channel_rate),
        ):
            bucket = self._take(key, rate)
            if bucket is not None:
                now = self.clock()
                window = 60.0 / rate
                notice = now - bucket.last_notice >= window
                if notice:
                    bucket.last_notice = now
                return False, notice
        return True, False

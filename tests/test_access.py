"""Access rules and cooldowns, platform-independent: the same decisions for every adapter."""

from __future__ import annotations

from bot.access import AccessPolicy, Cooldowns
from bot.config import AccessSettings
from bot.events import AuthorRef, ChannelKind, ChannelRef

GROUP = ChannelRef("discord", "100")
THREAD = ChannelRef("discord", "100", thread_id="555")
OTHER = ChannelRef("discord", "200")
DM = ChannelRef("discord", "300", ChannelKind.DIRECT)


def user(uid: str, *roles: str, bot: bool = False, platform: str = "discord") -> AuthorRef:
    return AuthorRef(platform, uid, f"user {uid}", is_bot=bot, roles=roles)


def test_admins_by_user_or_role_and_admins_pass_every_block() -> None:
    policy = AccessPolicy(
        AccessSettings(admins=["discord:1", "discord:role:mods"], blocked_users=["discord:1"])
    )
    assert policy.is_admin(user("1")) and policy.is_admin(user("2", "mods"))
    assert not policy.is_admin(user("3", "members")) and not policy.is_admin(user("1", platform="telegram"))
    assert policy.refusal(user("1"), GROUP) is None


def test_blocked_users_roles_and_channels() -> None:
    policy = AccessPolicy(
        AccessSettings(
            blocked_users=["discord:2"],
            blocked_roles=["discord:role:muted"],
            blocked_channels=["discord:200"],
        )
    )
    assert policy.refusal(user("2"), GROUP) == "blocked user"
    assert policy.refusal(user("3", "muted"), GROUP) == "blocked role"
    assert policy.refusal(user("3"), OTHER) == "blocked channel"
    assert policy.refusal(user("3"), GROUP) is None


def test_allow_lists_and_threads_follow_their_channel() -> None:
    policy = AccessPolicy(
        AccessSettings(allowed_roles=["discord:role:members"], allowed_channels=["discord:100"])
    )
    member = user("4", "members")
    assert policy.refusal(user("5"), GROUP) == "user not allowed"
    assert policy.refusal(member, GROUP) is None
    assert policy.refusal(member, THREAD) is None  # a thread of an allowed channel
    assert policy.refusal(member, OTHER) == "channel not allowed"
    assert policy.refusal(member, DM) is None  # channel lists do not apply to DMs
    one_thread = AccessPolicy(AccessSettings(blocked_channels=["discord:100/555"]))
    assert one_thread.refusal(user("6"), THREAD) == "blocked channel"
    assert one_thread.refusal(user("6"), GROUP) is None


def test_bots_are_ignored_unless_configured() -> None:
    assert AccessPolicy(AccessSettings()).refusal(user("7", bot=True), GROUP) == "message from a bot"
    assert AccessPolicy(AccessSettings(ignore_bots=False)).refusal(user("7", bot=True), GROUP) is None


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_cooldown_allows_a_burst_then_one_notice_per_window() -> None:
    clock = Clock()
    cooldowns = Cooldowns(user_per_minute=2, channel_per_minute=0, clock=clock)
    alice = user("1")
    assert cooldowns.check(alice, GROUP) == (True, False)
    assert cooldowns.check(alice, GROUP) == (True, False)
    assert cooldowns.check(alice, GROUP) == (False, True)  # limited: tell them once
    assert cooldowns.check(alice, GROUP) == (False, False)  # and stay quiet in the same window
    assert cooldowns.check(user("2"), GROUP) == (True, False)  # per user
    clock.now += 30  # one token back (2 per minute)
    assert cooldowns.check(alice, GROUP) == (True, False)
    assert cooldowns.check(alice, GROUP) == (False, True)  # a new window: one new notice


def test_channel_cooldown_limits_everyone_in_the_channel() -> None:
    clock = Clock()
    cooldowns = Cooldowns(user_per_minute=0, channel_per_minute=1, clock=clock)
    assert cooldowns.check(user("1"), GROUP) == (True, False)
    assert cooldowns.check(user("2"), GROUP) == (False, True)
    assert cooldowns.check(user("3"), GROUP) == (False, False)
    assert cooldowns.check(user("3"), OTHER) == (True, False)
    assert cooldowns.check(user("3"), THREAD) == (True, False)  # a thread is its own conversation

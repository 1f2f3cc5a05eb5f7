"""The runtime's side of every adapter: access rules, commands, storing, triggers, reply jobs."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from sqlalchemy.ext.asyncio import AsyncSession

from bot.access import AccessPolicy, Cooldowns
from bot.commands import CommandContext, CommandHandler, parse_command
from bot.config import Settings
from bot.events import Deleted, DispatchResult, Edited, Incoming, PlatformConventions, PlatformEvent, utcnow
from bot.store import Store, consent, conversations, jobs, privacy
from bot.triggers import responders
from personas.registry import PersonaRegistry

log = logging.getLogger(__name__)


class Dispatcher:
    """Turns normalized platform events into stored messages, command answers and reply jobs."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        registry: PersonaRegistry,
        conventions: Mapping[str, PlatformConventions] | None = None,
    ) -> None:
        """`conventions`: each platform's, as its adapter declares them; a platform not in it gets the
        defaults ("/" commands)."""
        self.settings = settings
        self.conventions = dict(conventions or {})
        self.store = store
        self.registry = registry
        self.access = AccessPolicy(settings.access)
        self.cooldowns = Cooldowns(
            settings.access.user_cooldown_per_minute, settings.access.channel_cooldown_per_minute
        )
        self.commands: dict[str, CommandHandler] = {
            "persona": self._cmd_persona,
            "personas": self._cmd_personas,
            "reset": self._cmd_reset,
            "help": self._cmd_help,
            "start": self._cmd_start,
            "forget": self._cmd_forget,
            "optin": self._cmd_optin,
            "optout": self._cmd_optout,
        }

    def _command(self, event: Incoming) -> tuple[CommandHandler, str] | None:
        """The handler and arguments of a command this message is, in its platform's conventions."""
        conventions = self.conventions.get(event.platform, PlatformConventions())
        command = parse_command(event.text, conventions.command_prefixes)
        if command is None:
            return None
        if command.name == conventions.opening_command:
            return self._cmd_start, command.args
        handler = self.commands.get(command.name)
        return None if handler is None else (handler, command.args)

    async def handle(self, event: PlatformEvent) -> DispatchResult:
        if isinstance(event, Edited):
            async with self.store.transaction() as session:
                stored = await conversations.apply_edit(session, event)
            return DispatchResult(stored=stored)
        if isinstance(event, Deleted):
            async with self.store.transaction() as session:
                stored = await conversations.apply_delete(session, event)
            return DispatchResult(stored=stored)
        return await self._handle_message(event)

    async def _handle_message(self, event: Incoming) -> DispatchResult:
        refusal = self.access.refusal(event.author, event.channel)
        if refusal is not None:
            log.info("ignored %s message: %s", event.platform, refusal)
            return DispatchResult(ignored=refusal)
        command = self._command(event)
        if command is not None:
            handler, args = command
            async with self.store.transaction() as session:
                channel_id = await conversations.upsert_channel(session, event.channel)
                await conversations.upsert_user(session, event.author)
                ctx = CommandContext(event, args, session, channel_id, self.access.is_admin(event.author))
                notice = await handler(ctx)
            return DispatchResult(notice=notice)
        if not event.text.strip():
            return DispatchResult(ignored="empty message")

        async def store_and_queue(session: AsyncSession) -> DispatchResult:
            stored = await conversations.ingest(session, event)
            if not stored.created:
                return DispatchResult(ignored="duplicate event")
            answering = responders(
                event, bound=list(stored.bound), default=self.settings.default_persona, registry=self.registry
            )
            if not answering:
                return DispatchResult(stored=True)
            # (A transaction that fails after this is tried again: the cooldown counts the message
            # twice, as it always did when storing failed and the event was spooled and replayed.)
            allowed, notify = self.cooldowns.check(event.author, event.channel)
            if not allowed:
                slow_down = "Slow down a little, please; I'll answer again in a moment." if notify else None
                return DispatchResult(stored=True, notice=slow_down, ignored="cooldown")
            job_ids = []
            for persona in answering:
                job_id = await jobs.enqueue(
                    session,
                    channel_id=stored.channel_id,
                    persona=persona.slug,
                    dedupe_key=f"msg:{stored.message_id}:{persona.slug}",
                    trigger_message_id=stored.message_id,
                )
                if job_id is not None:
                    job_ids.append(job_id)
            return DispatchResult(stored=True, job_ids=job_ids)

        # Messages arriving together (other channels, other users) share a commit.
        return await self.store.group.run(store_and_queue)

    # -- commands -------------------------------------------------------------------------------

    async def _bound_here(self, ctx: CommandContext) -> list[str]:
        """The personas answering in this channel, first one first: the bound ones, or the default."""
        bound = await conversations.bound_personas(ctx.session, ctx.channel_id)
        return [s for s in bound if s in self.registry] or [self.settings.default_persona]

    async def _cmd_persona(self, ctx: CommandContext) -> str:
        """`/persona` says who answers here; `/persona SLUG [SLUG ...]` binds (replacing the others);
        `/persona add SLUG` and `/persona remove SLUG` share a channel; `/persona default` unbinds all.

        Anyone may change it in a DM, only admins in a group channel.
        """
        words = ctx.args.lower().replace(",", " ").split()
        if not words:
            here = await self._bound_here(ctx)
            others = f"; name the others to talk to them ({', '.join(here[1:])})" if len(here) > 1 else ""
            return (
                f"This channel talks to {here[0]}{others}. Use /persona SLUG to change it; "
                "/personas lists them."
            )
        action = "set"
        if words[0] in ("add", "remove") and len(words) > 1:
            action, words = words[0], words[1:]
        elif words == ["default"] and "default" not in self.registry:
            action, words = "clear", []
        unknown = next((w.lstrip("@") for w in words if w.lstrip("@") not in self.registry), None)
        if unknown is not None:
            return (
                f"Unknown persona {unknown!r}. Available: {', '.join(p.slug for p in self.registry.all())}."
            )
        slugs = list(dict.fromkeys(w.lstrip("@") for w in words))
        if not ctx.event.is_direct and not ctx.is_admin:
            return "Only admins can change the persona in a group channel."
        who = ctx.event.author.key
        if action == "clear":
            await conversations.unbind_persona(ctx.session, ctx.channel_id)
            return f"Back to the default persona, {self.settings.default_persona}."
        if action == "remove":
            for slug in slugs:
                await conversations.unbind_persona(ctx.session, ctx.channel_id, slug)
            here = await self._bound_here(ctx)
            return (
                f"{', '.join(slugs)} no longer answer{'s' if len(slugs) == 1 else ''} here; {here[0]} does."
            )
        if action == "add":
            if not await conversations.bound_personas(ctx.session, ctx.channel_id):
                # Sharing a channel that used the default: the default keeps answering as before.
                await conversations.bind_persona(
                    ctx.session, ctx.channel_id, self.settings.default_persona, bound_by=who, exclusive=False
                )
            for slug in slugs:
                await conversations.bind_persona(
                    ctx.session, ctx.channel_id, slug, bound_by=who, exclusive=False
                )
            return (
                f"{', '.join(slugs)} joined this channel; talk to {'it' if len(slugs) == 1 else 'them'} "
                f"by name ({slugs[0]}, ... or @{slugs[0]})."
            )
        for index, slug in enumerate(slugs):
            await conversations.bind_persona(
                ctx.session, ctx.channel_id, slug, bound_by=who, exclusive=index == 0
            )
        first = self.registry.get(slugs[0]).spec
        if len(slugs) == 1:
            return f"{first.name} ({slugs[0]}) now answers in this channel."
        return (
            f"{first.name} ({slugs[0]}) now answers in this channel; {', '.join(slugs[1:])} answer "
            "when named."
        )

    async def _cmd_personas(self, ctx: CommandContext) -> str:
        here = await self._bound_here(ctx)
        lines = [
            f"{p.slug}: {p.spec.name}"
            + (f" — {p.spec.description}" if p.spec.description else "")
            + (" (answers here)" if p.slug in here else "")
            for p in self.registry.all()
        ]
        return "Available personas:\n" + "\n".join(lines)

    async def _cmd_reset(self, ctx: CommandContext) -> str:
        await conversations.reset_context(ctx.session, ctx.channel_id)
        return "Context cleared: I'll start fresh from here (history is kept)."

    async def _cmd_help(self, ctx: CommandContext) -> str:
        return "Commands: " + ", ".join(f"/{name}" for name in sorted(self.commands))

    async def _cmd_start(self, ctx: CommandContext) -> str:
        """The greeting of the persona that answers here; also the answer to a platform's opening
        command (`PlatformConventions.opening_command`)."""
        bound = await conversations.bound_personas(ctx.session, ctx.channel_id)
        slug = next((s for s in bound if s in self.registry), self.settings.default_persona)
        persona = self.registry.get(slug)
        name = persona.spec.name
        return persona.greeting(now=utcnow()) or f"Hi, I'm {name}. Send /help to see what I can do."

    async def _cmd_forget(self, ctx: CommandContext) -> str:
        """Erase the caller's messages here and the replies to them; asks for `/forget confirm` first."""
        if ctx.args.strip().lower() != "confirm":
            return (
                "This erases everything I store of you in this chat: your messages and my replies to "
                "them, also from future training data. It cannot be undone. To go ahead, send: "
                "/forget confirm"
            )
        done = await privacy.forget_user(ctx.session, ctx.event.author, ctx.event.channel)
        log.info(
            "erased %d messages, %d replies and %d jobs of a user in %s",
            done.messages,
            done.replies,
            done.jobs,
            ctx.event.channel.platform,
        )
        return f"Done: I erased {done.messages} of your messages and {done.replies} of my replies here."

    async def _cmd_optin(self, ctx: CommandContext) -> str:
        """Let this user's conversations from now on be used to retrain the personas."""
        changed = await consent.set_training_opt_in(ctx.session, ctx.event.author, True, at=ctx.event.sent_at)
        if not changed:
            return "You are already opted in. /optout stops it at any time."
        return (
            "Thank you! From now on, your conversations with the personas may be used to train them. "
            "Only messages you send while opted in are used. /optout stops it at any time; "
            "/forget confirm erases what I store of you in this chat."
        )

    async def _cmd_optout(self, ctx: CommandContext) -> str:
        """Keep this user's conversations out of every later training export."""
        changed = await consent.set_training_opt_in(
            ctx.session, ctx.event.author, False, at=ctx.event.sent_at
        )
        if not changed:
            return "You are not opted in: your conversations are not used for training."
        return (
            "Done: your conversations will not be used for training any more, including the ones "
            "from before. /optin turns it back on."
        )

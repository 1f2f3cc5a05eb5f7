"""A claimed job into a `GenerationRequest`: its channel's history, the persona's plugin, the renderer.

Problems that no retry can fix raise `JobRejected` (an unknown persona, an adapter that does not load,
a conversation the template cannot render); the worker fails those jobs at once with the message.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from bot.conversation import history_to_turns
from bot.errors import PersonaError
from bot.events import ChannelRef, utcnow
from bot.generation.base import GenerationRequest, GenerationResult
from bot.generation.options import apply_options
from bot.prompting import ChatRenderer, PromptError, Turn
from bot.replies import speaker_stops
from bot.store import conversations
from bot.store.conversations import HistoryMessage
from bot.store.jobs import ClaimedJob
from bot.streaming import ActiveReply
from bot.worker.adapters import AdapterSync, AdapterUnavailable
from personas.registry import Persona, PersonaRegistry

log = logging.getLogger(__name__)


def _idle(history: list[HistoryMessage], up_to: int | None) -> timedelta | None:
    """How long the user was quiet before the message being answered (`{{idle_duration}}`)."""
    times = [m.created_at for m in history if m.role == "user" and (up_to is None or m.id <= up_to)]
    return times[-1] - times[-2] if len(times) >= 2 else None


class JobRejected(Exception):
    """A job that cannot be answered however often it is tried; `reason` labels the failure metric."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class Prepared:
    job: ClaimedJob
    persona: Persona
    channel: ChannelRef
    request: GenerationRequest
    reply: ActiveReply
    context: Any  # personas.plugins.PromptContext, handed to after_generation
    stream_text: bool  # False when an after_generation hook may veto or rewrite the text
    question: str = ""  # the message answered (or the scheduled prompt), for the reply's language check
    language_attempt: int = 0  # language retries made so far (`bot.replies.retry_sampling`)
    first_result: GenerationResult | None = None  # the first attempt's reply, kept if no retry is English


@dataclass
class JobInputs:
    channel: ChannelRef
    history: list[HistoryMessage]


async def load_inputs(session: AsyncSession, claimed: list[ClaimedJob]) -> list[JobInputs | None]:
    """Each job's channel and visible history (None when the channel is gone), in `claimed`'s order."""
    channels = await conversations.channels_by_id(session, {job.channel_id for job in claimed})
    histories = await conversations.histories(session, channels.keys())  # one statement for the batch
    return [
        JobInputs(channel, histories.get(job.channel_id, [])) if channel is not None else None
        for job, channel in ((job, channels.get(job.channel_id)) for job in claimed)
    ]


def _plugins() -> Any:
    try:
        from personas import plugins
    except ImportError:  # an install without persona plugins
        return None
    return plugins


def _after_hook(plugins: Any, persona: Persona) -> bool:
    if plugins is None:
        return False
    try:
        return "after_generation" in plugins.has_hooks(persona)
    except PersonaError:
        return False  # a plugin that does not load is logged by the hook runner and ignored


def _last_user_text(history: list[HistoryMessage], up_to: int | None) -> str:
    text = ""
    for message in history:
        if up_to is not None and message.id > up_to:
            break
        if message.role == "user":
            text = message.text
    return text


class Preparer:
    """Renders jobs for one backend; keeps a renderer per template and a prompt cache per channel."""

    def __init__(
        self, registry: PersonaRegistry, tokenizer: Any, context_window: int, *, seed: int | None = None
    ) -> None:
        self.registry = registry
        self.seed = seed  # set: job N samples with seed + N (`personabot eval`'s fixed seeds)
        self.tokenizer = tokenizer
        self.context_window = context_window
        self._renderers: dict[str, ChatRenderer] = {}
        self.plugins = _plugins()

    def renderer(self, template: str) -> ChatRenderer:
        renderer = self._renderers.get(template)
        if renderer is None:
            renderer = self._renderers[template] = ChatRenderer(self.tokenizer, template)
        return renderer

    def persona(self, slug: str) -> Persona:
        try:
            return self.registry.get(slug)
        except PersonaError as exc:
            raise JobRejected("persona", str(exc)) from None

    def prepare(self, job: ClaimedJob, inputs: JobInputs | None, adapters: AdapterSync) -> Prepared:
        persona = self.persona(job.persona)
        if inputs is None:
            raise JobRejected("prompt", f"channel {job.channel_id} no longer exists")
        try:
            adapter = adapters.adapter_for(persona.slug, (job.options or {}).get("version"))
        except AdapterUnavailable as exc:
            raise JobRejected("adapter", str(exc)) from None
        spec = persona.spec
        try:
            renderer = self.renderer(spec.template)
        except PromptError as exc:
            raise JobRejected("prompt", f"persona {persona.slug!r}: {exc}") from None
        turns = history_to_turns(
            inputs.history,
            persona=persona.slug,
            group=not inputs.channel.is_direct,
            up_to_message_id=job.trigger_message_id,
            separate_newest=renderer.allows_repeated("user"),
        )
        if job.prompt:
            # A scheduled post's instruction speaks as the user (merged when the user spoke last).
            if turns and turns[-1].role == "user":
                turns[-1] = Turn("user", f"{turns[-1].content}\n{job.prompt}", turns[-1].name)
            else:
                turns.append(Turn("user", job.prompt))
        context = self._context(job, persona, inputs)
        system = persona.system_prompt(utcnow(), _idle(inputs.history, job.trigger_message_id))
        if self.plugins is not None and context is not None:
            extra = self.plugins.run_before_prompt(persona, context)
            if extra:
                system = f"{system}\n\n{extra}" if system else extra
        window = spec.context_window or self.context_window
        asked = apply_options(spec.sampling, job.options)  # an API request's sampling, within limits
        try:
            rendered = renderer.render_prompt(
                turns,
                system=system,
                max_prompt_tokens=window - asked.sampling.max_new_tokens,
                cache=renderer.channel_cache((job.channel_id, persona.slug)),
                lore=persona.lorebook,
            )
        except PromptError as exc:
            raise JobRejected("prompt", f"persona {persona.slug!r}: {exc}") from None
        if rendered.dropped_turns:
            log.info("job %s: dropped %d old turns to fit the context window", job.id, rendered.dropped_turns)
        stops: tuple[str, ...] = asked.stop_texts
        if not inputs.channel.is_direct:
            # A reply ends where the model starts writing someone's next line ("\nalice:").
            names = {m.author for m in inputs.history if m.role == "user"}
            names |= {m.persona for m in inputs.history if m.persona}
            stops += speaker_stops({*names, persona.slug, spec.name})
        request = GenerationRequest(
            prompt_ids=rendered.input_ids,
            sampling=asked.sampling,
            stop_ids=tuple(renderer.end_of_turn_ids),
            adapter=adapter,
            cache_key=f"{job.channel_id}:{persona.slug}",
            seed=asked.seed if self.seed is None else self.seed + job.id,
            stop_texts=stops,
        )
        return Prepared(
            job=job,
            persona=persona,
            channel=inputs.channel,
            request=request,
            reply=ActiveReply(job.id, inputs.channel, persona.slug),
            context=context,
            stream_text=not _after_hook(self.plugins, persona),
            # A scheduled post answers its prompt; an API job's prompt is the client's instruction.
            question=(job.prompt or "")
            if job.kind == "scheduled"
            else _last_user_text(inputs.history, job.trigger_message_id),
        )

    def _context(self, job: ClaimedJob, persona: Persona, inputs: JobInputs) -> Any:
        if self.plugins is None:
            return None
        last = None
        for message in inputs.history:
            if job.trigger_message_id is not None and message.id > job.trigger_message_id:
                break
            if message.role == "user":
                last = message
        return self.plugins.PromptContext(
            persona=persona.slug,
            channel=inputs.channel.key,
            platform=inputs.channel.platform,
            is_direct=inputs.channel.is_direct,
            now=utcnow(),
            last_user_text=last.text if last is not None and job.kind != "scheduled" else "",
            channel_title=inputs.channel.title,
            author=last.author if last is not None and job.kind != "scheduled" else "",
            scheduled_prompt=job.prompt if job.kind == "scheduled" else None,
        )

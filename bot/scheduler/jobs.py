"""What the scheduler runs: one definition per job, planned from the config and the personas.

Job ids are stable, so every process, `scheduled_runs` and `personabot schedule run JOB_ID` agree:

- `retention`: prune old messages (when `scheduler.retention_days` or `retention_channels` is set);
- `post:<persona>:<n>`: the persona's n-th `[[schedule]]` entry in persona.toml;
- `post:<persona>:c<n>`: the n-th `[[scheduler.posts]]` entry of personabot.toml;
- `retrain:<persona>`: check whether the persona has enough new opted-in conversations to retrain.

A bad entry (invalid cron, unknown time zone, unknown persona, malformed channel) does not stop the
plan: it becomes a `JobProblem`, logged and recorded for `personabot status`, and the rest is planned.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from bot.config import Settings
from personas.registry import PersonaRegistry
from personas.spec import CHANNEL_KEY, display_path

# Interval jobs are aligned to this instant, so every process computes the same occurrences (and so
# the same run keys) whenever it started.
ANCHOR = datetime(2024, 1, 1, tzinfo=UTC)

JobKind = Literal["retention", "post", "retrain"]


@dataclass(frozen=True)
class PostEntry:
    """A scheduled post: who writes it, when, where, and the instruction it is written from."""

    persona: str
    index: str  # "0", "1", ... (persona.toml) or "c0", "c1", ... (personabot.toml)
    cron: str
    timezone: str
    prompt: str
    channels: tuple[str, ...]
    source: str  # where it is written, for messages: "personas/pirate/persona.toml: schedule.0"


@dataclass(frozen=True)
class JobDef:
    id: str
    kind: JobKind
    trigger: BaseTrigger
    description: str
    persona: str | None = None
    post: PostEntry | None = None


@dataclass(frozen=True)
class JobOutcome:
    """What one run did: `ok` or `skipped` (nothing to do, and why); failures raise instead."""

    status: Literal["ok", "skipped"]
    detail: dict[str, Any]
    summary: str


@dataclass(frozen=True)
class JobProblem:
    job_id: str
    message: str


_CRON_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


def _cron_day(token: str) -> int:
    low = token.lower()
    if low in _CRON_DAYS:
        return _CRON_DAYS.index(low)
    if token.isdigit() and 0 <= int(token) <= 7:
        return int(token) % 7
    raise ValueError(f"day of week {token!r} is not 0-7 or sun-sat")


def crontab_weekdays(field: str) -> str:
    """The crontab day-of-week field in APScheduler's terms.

    APScheduler 3.x reads numbers in that field with 0 as Monday; crontab (and every user) means 0 or 7
    as Sunday. The field is expanded to day names, which both read alike: `1-5` -> `mon,tue,wed,thu,fri`.
    """
    if field == "*":
        return field
    days: set[int] = set()
    for part in field.split(","):
        span, _, step_text = part.partition("/")
        step = int(step_text) if step_text.isdigit() and int(step_text) > 0 else None
        if step_text and step is None:
            raise ValueError(f"day of week step {step_text!r} is not a positive number")
        if span == "*":
            first, last = 0, 6
        elif "-" in span:
            a, b = span.split("-", 1)
            first, last = _cron_day(a), _cron_day(b)
            if b == "7" or b.lower() == "sun":
                last = 7 if first > 0 else 6
            if last < first:
                raise ValueError(f"day of week range {span!r} runs backwards")
        else:
            first = last = _cron_day(span)
            if step is not None:
                last = 6
        days.update(d % 7 for d in range(first, last + 1, step or 1))
    return ",".join(_CRON_DAYS[d] for d in sorted(days))


def cron_trigger(cron: str, timezone: str) -> CronTrigger:
    """A five-field crontab expression (0 or 7 is Sunday) in a time zone; ValueError saying what is wrong."""
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {timezone!r}") from None
    fields = cron.split()
    try:
        if len(fields) != 5:
            raise ValueError(f"expected 5 fields (minute hour day month weekday), got {len(fields)}")
        minute, hour, day, month, weekday = fields
        return CronTrigger(
            minute=minute,
            hour=hour,
            day=day,
            month=month,
            day_of_week=crontab_weekdays(weekday),
            timezone=zone,
        )
    except ValueError as exc:
        raise ValueError(f"invalid cron expression {cron!r}: {exc}") from None


def interval_trigger(seconds: float) -> IntervalTrigger:
    return IntervalTrigger(seconds=seconds, start_date=ANCHOR, timezone=UTC)


def latest_fire(trigger: BaseTrigger, since: datetime, until: datetime) -> datetime | None:
    """The trigger's last occurrence in `[since, until)`, or None: what a catch-up after downtime runs."""
    latest = None
    fire = trigger.get_next_fire_time(None, since)
    while fire is not None and fire < until:
        latest = fire
        # With a previous fire time both trigger kinds step to the occurrence right after it.
        fire = trigger.get_next_fire_time(fire, fire + timedelta(microseconds=1))
    return latest.astimezone(UTC) if latest is not None else None


def _post_job(entry: PostEntry) -> JobDef:
    trigger = cron_trigger(entry.cron, entry.timezone)
    where = ", ".join(entry.channels) if entry.channels else "its bound channels"
    return JobDef(
        id=f"post:{entry.persona}:{entry.index}",
        kind="post",
        trigger=trigger,
        description=f"{entry.persona} posts at '{entry.cron}' ({entry.timezone}) in {where}",
        persona=entry.persona,
        post=entry,
    )


def plan_jobs(settings: Settings, registry: PersonaRegistry) -> tuple[list[JobDef], list[JobProblem]]:
    """Every job the scheduler should run, and the entries that cannot be scheduled, with why."""
    s = settings.scheduler
    defs: list[JobDef] = []
    problems: list[JobProblem] = []
    config_name = str(settings.config_path) if settings.config_path else "personabot.toml"

    bad_keys = [k for k in s.retention_channels if not CHANNEL_KEY.match(k)]
    for key in bad_keys:
        problems.append(
            JobProblem(
                "retention",
                f"{config_name}: scheduler.retention_channels: {key!r} is not a `platform:id` channel",
            )
        )
    if s.retention_days is not None or len(s.retention_channels) > len(bad_keys):
        scope = f"older than {s.retention_days:g} days" if s.retention_days is not None else ""
        if s.retention_channels:
            scope += ("; " if scope else "") + f"{len(s.retention_channels)} channel override(s)"
        defs.append(
            JobDef(
                id="retention",
                kind="retention",
                trigger=interval_trigger(s.retention_check_minutes * 60),
                description=f"prune messages {scope}",
            )
        )

    for persona in registry.all():
        for index, scheduled in enumerate(persona.spec.schedule):
            entry = PostEntry(
                persona=persona.slug,
                index=str(index),
                cron=scheduled.cron,
                timezone=scheduled.timezone,
                prompt=scheduled.prompt,
                channels=tuple(scheduled.channels),
                source=f"{display_path(persona.folder / 'persona.toml')}: schedule.{index}",
            )
            try:
                defs.append(_post_job(entry))
            except ValueError as exc:  # persona.toml is validated on load; kept for plugin personas
                problems.append(JobProblem(f"post:{persona.slug}:{index}", f"{entry.source}: {exc}"))

    for index, post in enumerate(s.posts):
        job_id = f"post:{post.persona}:c{index}"
        source = f"{config_name}: scheduler.posts.{index}"
        if post.persona not in registry:
            known = ", ".join(p.slug for p in registry.all()) or "none"
            problems.append(
                JobProblem(job_id, f"{source}.persona: unknown persona {post.persona!r}; available: {known}")
            )
            continue
        bad = next((c for c in post.channels if not CHANNEL_KEY.match(c)), None)
        if bad is not None:
            problems.append(JobProblem(job_id, f"{source}.channels: {bad!r} is not a `platform:id` channel"))
            continue
        entry = PostEntry(
            persona=post.persona,
            index=f"c{index}",
            cron=post.cron,
            timezone=post.timezone,
            prompt=post.prompt,
            channels=tuple(post.channels),
            source=source,
        )
        try:
            defs.append(_post_job(entry))
        except ValueError as exc:
            field = "timezone" if "time zone" in str(exc) else "cron"
            problems.append(JobProblem(job_id, f"{source}.{field}: {exc}"))

    if s.retrain:
        for persona in registry.all():
            defs.append(
                JobDef(
                    id=f"retrain:{persona.slug}",
                    kind="retrain",
                    trigger=interval_trigger(s.retrain_check_hours * 3600),
                    description=(
                        f"retrain {persona.slug} once it has {s.retrain_min_conversations} new "
                        "opted-in conversations"
                    ),
                    persona=persona.slug,
                )
            )
    return defs, problems

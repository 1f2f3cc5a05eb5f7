"""`personabot status`: the health of a deployment, read from the store alone.

It works from any machine that reaches the database, while the bot runs or not: components seen
(heartbeats), the reply queue, the outbox, each persona's active adapter with its held-out loss, and
the last run of every scheduled job with its errors (and a retrain's two held-out losses and two eval
reports' scores).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from bot.events import utcnow
from bot.scheduler import runs
from bot.spool import spool_report
from bot.store import Store
from bot.store import outbox as deliveries
from bot.store.models import Heartbeat, OutboxDelivery, ReplyJob, SchedulerJob
from personas.versions import list_versions

STALE_BEATS = 3  # a component not seen for this many intervals is reported stale


def _age(then: datetime | None, now: datetime) -> float | None:
    return round((now - then).total_seconds(), 1) if then is not None else None


async def _components(session: Any, now: datetime) -> list[dict[str, Any]]:
    rows = (await session.execute(select(Heartbeat).order_by(Heartbeat.kind, Heartbeat.component))).scalars()
    found = []
    for row in rows:
        detail = dict(row.detail or {})
        interval = float(detail.get("interval") or 15.0)
        state = detail.get("state", "running")
        if state == "running" and row.seen_at < now - timedelta(seconds=STALE_BEATS * interval):
            state = "stale"
        found.append(
            {
                "component": row.component,
                "kind": row.kind,
                "state": state,
                "started_at": row.started_at.isoformat(),
                "seen_at": row.seen_at.isoformat(),
                "seen_seconds_ago": _age(row.seen_at, now),
                # A lost platform connection: what ended it, and how often (see bot.watchdog).
                "error": detail.get("error"),
                "last_failure": detail.get("last_failure"),
                "generation": detail.get("generation"),  # a remote backend's health, as the worker saw it
            }
        )
    return found


async def _queue(session: Any, now: datetime) -> dict[str, Any]:
    counts = dict(
        (await session.execute(select(ReplyJob.status, func.count()).group_by(ReplyJob.status))).all()
    )
    oldest = (
        await session.execute(
            select(ReplyJob)
            .where(ReplyJob.status == "pending")
            .order_by(ReplyJob.created_at, ReplyJob.id)
            .limit(1)
        )
    ).scalar_one_or_none()
    failures = (
        await session.execute(
            select(ReplyJob)
            .where(ReplyJob.status == "failed")
            .order_by(ReplyJob.finished_at.desc(), ReplyJob.id.desc())
            .limit(5)
        )
    ).scalars()
    outbox = dict(
        (
            await session.execute(
                select(OutboxDelivery.status, func.count())
                .where(OutboxDelivery.status != "delivered")
                .group_by(OutboxDelivery.status)
            )
        ).all()
    )
    return {
        "pending": counts.get("pending", 0),
        "running": counts.get("running", 0),
        "failed": counts.get("failed", 0),
        "done": counts.get("done", 0),
        "oldest_pending": (
            {
                "id": oldest.id,
                "persona": oldest.persona,
                "created_at": oldest.created_at.isoformat(),
                "age_seconds": _age(oldest.created_at, now),
            }
            if oldest is not None
            else None
        ),
        "recent_failures": [
            {
                "id": j.id,
                "persona": j.persona,
                "error": j.error,
                "finished_at": j.finished_at.isoformat() if j.finished_at else None,
            }
            for j in failures
        ],
        "outbox": {
            "pending": outbox.get("pending", 0),
            "sending": outbox.get("sending", 0),
            "failed": outbox.get("failed", 0),
            "unknown": outbox.get("unknown", 0),
            "recent_failures": [
                {
                    "id": row.id,
                    "channel": row.channel,
                    "status": row.status,
                    "code": row.error_code,
                    "error": row.error,
                }
                for row in await deliveries.listing(session, failed_only=True, limit=5)
            ],
        },
    }


async def _personas(session: Any, slugs: list[str]) -> list[dict[str, Any]]:
    versions = await list_versions(session)
    active = {v.persona: v for v in versions if v.is_active}
    every = sorted(set(slugs) | {v.persona for v in versions})
    result = []
    for slug in every:
        v = active.get(slug)
        result.append(
            {
                "persona": slug,
                "known": slug in slugs or not slugs,
                "active_version": v.version if v else None,
                "heldout_loss": v.heldout_loss if v else None,
                "activated_at": v.activated_at.isoformat() if v and v.activated_at else None,
                "versions": sum(1 for x in versions if x.persona == slug),
            }
        )
    return result


async def _schedule(session: Any) -> list[dict[str, Any]]:
    stored = {
        job_id: datetime.fromtimestamp(ts, UTC) if ts is not None else None
        for job_id, ts in await session.execute(select(SchedulerJob.id, SchedulerJob.next_run_time))
    }
    last = await runs.last_runs(session)
    jobs = []
    for job_id in sorted(set(stored) | set(last)):
        run = last.get(job_id)
        entry: dict[str, Any] = {
            "job_id": job_id,
            "scheduled": job_id in stored,
            "next_run": next_run.isoformat() if (next_run := stored.get(job_id)) else None,
            "last_run": run.as_dict() if run is not None else None,
        }
        jobs.append(entry)
    return jobs


async def collect_status(
    store: Store,
    *,
    personas: list[str] | None = None,
    now: datetime | None = None,
    spool_dir: Path | None = None,
) -> dict[str, Any]:
    """Everything `personabot status` shows, as plain data (its `--json`).

    `spool_dir`: this machine's ingest spool (`<data_dir>/spool`), events waiting for the database.
    """
    now = now or utcnow()
    async with store.transaction() as session:
        return {
            "checked_at": now.isoformat(),
            "components": await _components(session, now),
            "queue": await _queue(session, now),
            "personas": await _personas(session, personas or []),
            "schedule": await _schedule(session),
            "spool": spool_report(spool_dir) if spool_dir is not None else [],
        }


def render_spool(spool: list[dict[str, Any]]) -> list[str]:
    """Events waiting in this machine's ingest spool, one line per file."""
    lines = ["", "ingest spool (events waiting for the database):"]
    if not spool:
        lines.append("  empty")
    for entry in spool:
        owner = (
            "held by a running process"
            if entry["held"]
            else "no process holds it: replayed at the next start"
        )
        oldest = entry["oldest"][:19].replace("T", " ") if entry["oldest"] else "-"
        lines.append(f"  {entry['path']}: {entry['events']} event(s), oldest from {oldest}; {owner}")
    return lines


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h ago"
    return f"{seconds / 86400:.1f}d ago"


def run_line(run: dict[str, Any]) -> str:
    """One scheduled run as a line: status, time, summary or error, and a retrain's two losses."""
    detail = run.get("detail") or {}
    when = run["started_at"][:19].replace("T", " ")
    if run["status"] == "error":
        return f"error at {when}: {run['error']}"
    text = detail.get("summary") or run["status"]
    line = f"{run['status']} at {when}: {text}"
    if "new_loss" in detail and "active_loss" in detail:
        line += (
            f" [held-out loss: new {detail.get('version')} {detail['new_loss']:.4f}, "
            f"active {detail.get('active_version')} {detail['active_loss']:.4f}]"
        )
    if "new_eval" in detail and "active_eval" in detail:
        line += (
            f" [eval: new {detail.get('version')} {_eval_scores(detail['new_eval'])}, "
            f"active {detail.get('active_version')} {_eval_scores(detail['active_eval'])}]"
        )
    return line


def _eval_scores(scores: dict[str, Any]) -> str:
    shown = [f"accuracy {scores.get('accuracy', 0):.1%}"]
    if scores.get("style") is not None:
        shown.append(f"style {scores['style']:.1%}")
    looping = float(scores.get("loop_rate") or 0) + float(scores.get("guard_cut_rate") or 0)
    shown.append(f"loops {looping:.1%}")
    return " ".join(shown)


def generation_line(health: dict[str, Any]) -> str:
    """A worker's remote backend: healthy or not, and each server that is not, with its error."""
    state = "healthy" if health.get("healthy") else "UNHEALTHY (jobs wait in the queue)"
    line = f"generation backend {health.get('backend', '?')}: {state}"
    down = [s for s in health.get("servers", []) if s.get("state") != "healthy"]
    if down:
        line += "; " + "; ".join(f"{s['url']} {s['state']}: {s.get('error') or '-'}" for s in down)
    return line


def render_status(report: dict[str, Any]) -> str:
    """The report as text for a terminal."""
    lines = [f"personabot status at {report['checked_at'][:19].replace('T', ' ')} UTC", "", "components:"]
    if not report["components"]:
        lines.append("  none seen (is `personabot run` running against this database?)")
    for c in report["components"]:
        state = c["state"]
        if c.get("error"):
            state += f" ({c['error']})"
        elif c.get("last_failure"):
            state += f" (reconnected after: {c['last_failure']['error']})"
        lines.append(f"  {c['component']}: {state}, last seen {_ago(c['seen_seconds_ago'])}")
        if c.get("generation"):
            lines.append(f"    {generation_line(c['generation'])}")
    q = report["queue"]
    lines += ["", "reply queue:"]
    lines.append(f"  pending {q['pending']}, running {q['running']}, failed {q['failed']}, done {q['done']}")
    if q["oldest_pending"]:
        o = q["oldest_pending"]
        lines.append(f"  oldest pending: job {o['id']} ({o['persona']}), queued {_ago(o['age_seconds'])}")
    for f in q["recent_failures"]:
        lines.append(f"  failed job {f['id']} ({f['persona']}): {f['error']}")
    ob = q["outbox"]
    lines.append(
        f"  outbox: pending {ob['pending']}, sending {ob['sending']}, failed {ob['failed']}, "
        f"unknown outcome {ob['unknown']}"
    )
    for f in ob["recent_failures"]:
        code = f" {f['code']}" if f["code"] else ""
        lines.append(f"  {f['status']} delivery {f['id']} to {f['channel']}:{code} {f['error']}")
    lines += render_spool(report.get("spool", []))
    lines += ["", "personas:"]
    for p in report["personas"]:
        if p["active_version"]:
            loss = f"{p['heldout_loss']:.4f}" if p["heldout_loss"] is not None else "-"
            text = f"adapter {p['active_version']} (held-out loss {loss})"
        else:
            text = "base model (no adapter active)"
        unknown = "" if p["known"] else " [not in this config]"
        lines.append(f"  {p['persona']}: {text}{unknown}")
    lines += ["", "scheduled jobs:"]
    if not report["schedule"]:
        lines.append("  none (the scheduler has not started against this database)")
    for j in report["schedule"]:
        nxt = j["next_run"][:19].replace("T", " ") if j["next_run"] else "-"
        last = run_line(j["last_run"]) if j["last_run"] else "never run"
        state = f"next {nxt}" if j["scheduled"] else "not scheduled"
        lines.append(f"  {j['job_id']}: {state}; last: {last}")
    return "\n".join(lines)

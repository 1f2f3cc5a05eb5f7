"""What the console pages show, read from the store and the adapter folders (plain data, no HTML).

Each function reads; nothing here writes. The pages render these dicts with jinja2 templates, and the
tests check them directly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from bot.scheduler import JobDef, runs
from bot.status import collect_status
from bot.store import Store, jobs
from bot.store import outbox as deliveries
from bot.store.models import JobStatus
from personas.manifest import HELDOUT_LOSS_AFTER, HELDOUT_LOSS_BEFORE, HISTORY, REPORT
from personas.versions import VersionInfo, list_versions

EVAL_FILES = (("direct chat", "eval.json"), ("group chat", "eval-group.json"))


@dataclass(frozen=True)
class VersionRow:
    """One version in the personas list: its state and its held-out losses."""

    persona: str
    version: str
    state: str  # active | previous (a rollback returns to it) | earlier | rolled back | not activated
    created_at: datetime
    activated_at: datetime | None
    heldout_before: float | None
    heldout_after: float | None


@dataclass(frozen=True)
class PersonaRow:
    slug: str
    name: str
    known: bool  # in this config's registry (a version may outlive its persona folder)
    versions: list[VersionRow] = field(default_factory=list)

    @property
    def active(self) -> str | None:
        return next((v.version for v in self.versions if v.state == "active"), None)


def _loss(metrics: dict[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    return float(value) if isinstance(value, int | float) else None


def _states(versions: list[VersionInfo]) -> dict[str, str]:
    """Each version's state, as `personas.versions.rollback` sees the history."""
    current = next((v for v in versions if v.is_active), None)
    earlier = [
        v
        for v in versions
        if current is not None
        and v is not current
        and v.activated_at is not None
        and (current.activated_at is None or v.activated_at <= current.activated_at)
    ]
    previous = max(earlier, key=lambda v: v.activated_at or v.created_at, default=None)
    states = {}
    for v in versions:
        if v.is_active:
            states[v.version] = "active"
        elif previous is not None and v is previous:
            states[v.version] = "previous"
        elif v.activated_at is not None:
            states[v.version] = "earlier"
        elif v.rolled_back_at is not None:
            states[v.version] = "rolled back"
        else:
            states[v.version] = "not activated"
    return states


async def personas_overview(store: Store, personas: dict[str, str]) -> list[PersonaRow]:
    """Every persona (`{slug: display name}` from the registry, plus any with versions) and its versions,
    newest first."""
    async with store.transaction() as session:
        versions = await list_versions(session)
    by_persona: dict[str, list[VersionInfo]] = {}
    for v in versions:
        by_persona.setdefault(v.persona, []).append(v)
    rows = []
    for slug in sorted(set(personas) | set(by_persona)):
        mine = by_persona.get(slug, [])
        states = _states(mine)
        rows.append(
            PersonaRow(
                slug=slug,
                name=personas.get(slug, slug),
                known=slug in personas,
                versions=[
                    VersionRow(
                        persona=slug,
                        version=v.version,
                        state=states[v.version],
                        created_at=v.created_at,
                        activated_at=v.activated_at,
                        heldout_before=_loss(v.metrics, HELDOUT_LOSS_BEFORE),
                        heldout_after=_loss(v.metrics, HELDOUT_LOSS_AFTER),
                    )
                    for v in reversed(mine)
                ],
            )
        )
    return rows


def _read_json(path: Path) -> Any:
    """A JSON file the trainer or eval wrote; None when absent or unreadable (old versions lack some)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _loss_points(history: Any) -> list[tuple[float, float]]:
    if not isinstance(history, dict):
        return []
    points = []
    for item in history.get("losses") or []:
        if isinstance(item, list) and len(item) == 2 and all(isinstance(x, int | float) for x in item):
            points.append((float(item[0]), float(item[1])))
    return points


async def version_detail(store: Store, persona: str, version: str) -> dict[str, Any] | None:
    """One version's training report as data; None when no such version is registered.

    `losses` is empty for versions trained before `training.json` existed (the page says "no data").
    """
    async with store.transaction() as session:
        versions = await list_versions(session, persona)
    chosen = next((v for v in versions if v.version == version), None)
    if chosen is None:
        return None
    folder = Path(chosen.path)
    history = _read_json(folder / HISTORY)
    samples = history.get("samples") if isinstance(history, dict) else None
    evals = []
    for label, name in EVAL_FILES:
        report = _read_json(folder / name)
        if isinstance(report, dict) and isinstance(report.get("scores"), dict):
            evals.append({"mode": label, "questions": report.get("questions"), "scores": report["scores"]})
    report_md = folder / REPORT
    metrics = chosen.metrics
    return {
        "persona": persona,
        "version": version,
        "state": _states(versions)[version],
        "path": str(folder),
        "created_at": chosen.created_at,
        "activated_at": chosen.activated_at,
        "heldout_before": _loss(metrics, HELDOUT_LOSS_BEFORE),
        "heldout_after": _loss(metrics, HELDOUT_LOSS_AFTER),
        "style_before": _loss(metrics, "style_score_before"),
        "style_after": _loss(metrics, "style_score_after"),
        "final_step": history.get("final_step") if isinstance(history, dict) else metrics.get("steps"),
        "losses": _loss_points(history),
        "samples": samples if isinstance(samples, list) else [],
        "evals": evals,
        "metrics": metrics,
        "report_md": report_md.read_text(encoding="utf-8") if report_md.is_file() else None,
    }


def _job(job: Any) -> dict[str, Any]:
    return {
        "id": job.id,
        "persona": job.persona,
        "kind": job.kind,
        "attempts": job.attempts,
        "available_at": job.available_at,
        "lease_owner": job.lease_owner,
        "finished_at": job.finished_at,
        "error": job.error,
    }


async def operations(
    store: Store, *, personas: list[str], plan: list[JobDef], limit: int = 50
) -> dict[str, Any]:
    """The operations page: `personabot status`'s report (components, queue counts, schedule), plus the
    pending, running and failed jobs, every undelivered reply, and recent retraining decisions."""
    report = await collect_status(store, personas=personas, plan=plan)
    async with store.transaction() as session:
        queue = {
            status: [_job(j) for j in await jobs.listing(session, status, limit=limit)]
            for status in (JobStatus.PENDING, JobStatus.RUNNING, JobStatus.FAILED)
        }
        outbox = await deliveries.listing(session, limit=limit)
        retrains = await runs.recent_runs(session, job_prefix="retrain:", limit=20)
    report["jobs"] = {str(status): rows for status, rows in queue.items()}
    report["outbox"] = outbox
    report["retrains"] = [r.as_dict() for r in retrains]
    return report

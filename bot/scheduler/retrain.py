"""Retraining: a persona learns from its conversations with users who opted in.

When a persona has at least `scheduler.retrain_min_conversations` new conversations (ended since the
last retrain) from opted-in users, the `retrain:<persona>` job

1. scrubs earlier exports of users who opted out or used `/forget` since;
2. exports every exportable conversation of the persona to `<data_dir>/exports/<persona>/<version>.jsonl`;
3. trains a new adapter version on the bundled dialogues plus that export, as a background subprocess
   (`bot.scheduler.train_job`: `personabot train` with the export added; or `scheduler.retrain_command`),
   logging to `<data_dir>/logs/`;
4. measures the held-out loss of the new version and of the active one (the base model when none is
   active) on the same held-out set;
5. when the loss is not worse, runs `personabot eval` on both (each report is kept next to its adapter,
   `eval.json` / `eval.md`; the base model's in the logs folder);
6. activates the new version only when its held-out loss is not worse **and** its eval accuracy and
   style dropped by at most `scheduler.retrain_eval_tolerance` **and** it loops no more often (replies
   that loop or that the loop guard had to cut). The numbers are logged and recorded in the run, which
   `personabot status` shows.

Training, evaluation and activation are injectable, so tests swap in fast fakes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from bot.config import Settings
from bot.export import collect_conversations, exports_dir, scrub_exports, write_jsonl
from bot.scheduler import runs
from bot.scheduler.errors import ScheduleError
from bot.scheduler.jobs import JobOutcome
from bot.store import Store
from personas import versions
from personas.registry import PersonaRegistry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainRequest:
    persona: str
    data: Path  # the export; the trainer adds the persona's bundled dialogues itself
    version: str
    log_path: Path


@dataclass(frozen=True)
class EvalRequest:
    persona: str
    data: Path  # the export the new version was trained on (with the bundled dialogues)
    adapters: tuple[Path | None, ...]  # None: the base model alone
    log_path: Path


@dataclass(frozen=True)
class QualityRequest:
    persona: str
    version: str  # a registered version, or "base"
    log_path: Path
    out: Path  # the folder the eval report (eval.json, eval.md) is written to


TrainFn = Callable[[TrainRequest], Awaitable[None]]
EvalFn = Callable[[EvalRequest], Awaitable[list[float]]]
QualityFn = Callable[[QualityRequest], Awaitable[dict[str, Any]]]  # the eval report's scores
ActivateFn = Callable[[str, str], Awaitable[None]]


def _looping(scores: dict[str, Any]) -> float:
    return float(scores.get("loop_rate") or 0) + float(scores.get("guard_cut_rate") or 0)


def quality_gate(new: dict[str, Any], active: dict[str, Any], tolerance: float) -> str | None:
    """Why the new version's eval scores keep it from activation (None: they do not)."""
    problems = []
    for key in ("accuracy", "style"):
        before, after = active.get(key), new.get(key)
        if before is not None and after is not None and after < before - tolerance:
            problems.append(f"{key} {after:.1%} < {before:.1%} - {tolerance:.0%}")
    if _looping(new) > _looping(active):
        problems.append(f"loops {_looping(new):.1%} > {_looping(active):.1%}")
    return "; ".join(problems) or None


def _fill(template: Sequence[str], values: dict[str, str]) -> list[str]:
    filled = [part.format(**values) for part in template]
    return [part for part in filled if part != ""]


def train_command(settings: Settings, request: TrainRequest) -> list[str]:
    """The training command line: `scheduler.retrain_command`, or the trainer on bundled dialogues plus
    the export (`bot.scheduler.train_job`) in this Python."""
    config = str(settings.config_path) if settings.config_path else ""
    values = {
        "python": sys.executable,
        "persona": request.persona,
        "data": str(request.data),
        "version": request.version,
        "config": config,
    }
    if settings.scheduler.retrain_command:
        try:
            return _fill(settings.scheduler.retrain_command, values)
        except (KeyError, IndexError, ValueError) as exc:
            raise ScheduleError(f"scheduler.retrain_command: bad placeholder {exc}") from None
    base = [sys.executable, "-m", "bot.scheduler.train_job"] + (["--config", config] if config else [])
    return [*base, request.persona, "--data", str(request.data), "--version", request.version]


def eval_command(settings: Settings, request: EvalRequest) -> list[str]:
    config = ["--config", str(settings.config_path)] if settings.config_path else []
    adapters = [arg for a in request.adapters for arg in ("--adapter", str(a) if a is not None else "base")]
    return [
        sys.executable,
        "-m",
        "bot.scheduler.evaluate",
        *config,
        request.persona,
        str(request.data),
        *adapters,
    ]


def _last_line(path: Path) -> str:
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    except OSError:
        return ""
    return next((line for line in reversed(lines) if line), "")


def child_env(settings: Settings) -> dict[str, str]:
    """The environment of a training or evaluation subprocess: this process's database, data folder,
    model and personas, however they were configured (file, environment or code)."""
    env = dict(os.environ)
    env["PERSONABOT_DATABASE_URL"] = settings.resolved_database_url
    env["PERSONABOT_DATA_DIR"] = str(settings.data_dir.resolve())
    if settings.model.path is not None:
        env["PERSONABOT_MODEL__PATH"] = str(Path(settings.model.path).resolve())
    if settings.personas_dir is not None:
        env["PERSONABOT_PERSONAS_DIR"] = str(settings.personas_dir.resolve())
    return env


async def run_logged(
    command: list[str], log_path: Path, *, timeout: float, what: str, env: dict[str, str] | None = None
) -> None:
    """Run `command` in the background, its output appended to `log_path`; ScheduleError on failure.

    It runs in its own session, so a Ctrl-C at the terminal reaches personabot, which stops it.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as out:
        out.write(f"$ {' '.join(command)}\n".encode())
        out.flush()
        try:
            proc = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )
        except OSError as exc:
            raise ScheduleError(f"{what}: cannot start {command[0]!r}: {exc.strerror or exc}") from None
        try:
            code = await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            await _stop(proc)
            raise ScheduleError(f"{what}: stopped after {timeout / 3600:g} hours; log: {log_path}") from None
        except asyncio.CancelledError:
            await _stop(proc)
            raise
    if code != 0:
        reason = _last_line(log_path) or "no output"
        raise ScheduleError(f"{what} failed (exit {code}): {reason} (log: {log_path})")


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), 10)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


class Retrainer:
    """The body of the `retrain:<persona>` jobs; one training at a time per process."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        registry: PersonaRegistry,
        *,
        train: TrainFn | None = None,
        evaluate: EvalFn | None = None,
        quality: QualityFn | None = None,
        activate: ActivateFn | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.registry = registry
        self.train = train or self._train_subprocess
        self.evaluate = evaluate or self._evaluate_subprocess
        self.quality = quality or self._quality_subprocess
        self.activate = activate or self._activate
        self._lock = asyncio.Lock()

    @property
    def _timeout(self) -> float:
        return self.settings.scheduler.retrain_timeout_hours * 3600

    async def _train_subprocess(self, request: TrainRequest) -> None:
        command = train_command(self.settings, request)
        log.info("retrain %s: training %s in the background: %s", request.persona, request.version, command)
        await run_logged(
            command,
            request.log_path,
            timeout=self._timeout,
            what=f"training {request.persona}",
            env=child_env(self.settings),
        )

    async def _evaluate_subprocess(self, request: EvalRequest) -> list[float]:
        out = request.log_path.with_suffix(".eval.json")
        command = [*eval_command(self.settings, request), "--out", str(out)]
        await run_logged(
            command,
            request.log_path,
            timeout=self._timeout,
            what=f"evaluating {request.persona}",
            env=child_env(self.settings),
        )
        try:
            losses = json.loads(out.read_text(encoding="utf-8"))["losses"]
        except (OSError, ValueError, KeyError) as exc:
            raise ScheduleError(f"evaluating {request.persona}: no result in {out}: {exc}") from None
        return [float(x) for x in losses]

    async def _quality_subprocess(self, request: QualityRequest) -> dict[str, Any]:
        """`personabot eval PERSONA --version V --out DIR` in a subprocess; the report's scores."""
        config = ["--config", str(self.settings.config_path)] if self.settings.config_path else []
        command = [sys.executable, "-m", "bot.cli", *config, "eval", request.persona]
        await run_logged(
            [*command, "--version", request.version, "--out", str(request.out)],
            request.log_path,
            timeout=self._timeout,
            what=f"eval of {request.persona} {request.version}",
            env=child_env(self.settings),
        )
        try:
            return dict(json.loads((request.out / "eval.json").read_text(encoding="utf-8"))["scores"])
        except (OSError, ValueError, KeyError) as exc:
            raise ScheduleError(f"eval of {request.persona}: no report in {request.out}: {exc}") from None

    async def _activate(self, persona: str, version: str) -> None:
        facts = await asyncio.to_thread(versions.base_model_facts, self.settings)
        await versions.activate(
            self.store,
            persona,
            version,
            base_model_sha256=facts.sha256,
            tokenizer=facts.tokenizer,
            base_vocab_size=facts.vocab_size,
        )

    async def run(self, persona: str, now: datetime, *, force: bool = False) -> JobOutcome:
        s = self.settings.scheduler
        slug = self.registry.get(persona).slug  # PersonaError for a persona that is gone
        root = exports_dir(self.settings.data_dir)
        scrubbed = await scrub_exports(self.store, root)
        async with self.store.transaction() as session:
            found = await collect_conversations(
                session, slug, conversation_gap=timedelta(minutes=s.conversation_gap_minutes)
            )
            previous = await runs.last_run(session, f"retrain:{slug}", status="ok")
        mark = previous.detail.get("exported_until") if previous else None
        watermark = datetime.fromisoformat(mark) if isinstance(mark, str) else None
        new = [c for c in found if watermark is None or (c.ended_at and c.ended_at > watermark)]
        counts: dict[str, Any] = {
            "conversations": len(found),
            "new_conversations": len(new),
            "needed": s.retrain_min_conversations,
            "scrubbed_export_lines": scrubbed,
        }
        if not found:
            raise ScheduleError(
                f"retrain {slug}: no conversations from opted-in users to train on (users opt in with /optin)"
            )
        if len(new) < s.retrain_min_conversations and not force:
            return JobOutcome(
                "skipped",
                counts,
                f"too little data: {slug} has {len(new)} new conversation(s) from opted-in users; retraining "
                f"needs {s.retrain_min_conversations} (scheduler.retrain_min_conversations)",
            )

        version = f"auto-{now:%Y%m%d-%H%M%S}"
        export = write_jsonl(found, root / slug / f"{version}.jsonl", sources=True)
        assert export.path is not None
        log_path = self.settings.data_dir / "logs" / f"retrain-{slug}-{version}.log"
        async with self._lock:
            await self.train(TrainRequest(slug, export.path, version, log_path))
            async with self.store.transaction() as session:
                trained = await versions.get_version(session, slug, version)
                active = await versions.active_version(session, slug)
            if trained is None:
                raise ScheduleError(
                    f"retrain {slug}: the trainer finished but did not register version {version} (log: {log_path})"
                )
            baseline = Path(active.path) if active is not None else None
            new_loss, active_loss = await self.evaluate(
                EvalRequest(slug, export.path, (Path(trained.path), baseline), log_path)
            )
            active_name = active.version if active is not None else "base model"
            quality: dict[str, Any] = {}
            refused = None if new_loss <= active_loss else f"held-out loss {new_loss:.4f} > {active_loss:.4f}"
            if refused is None:
                reports = self.settings.data_dir / "logs"
                new_scores = await self.quality(
                    QualityRequest(slug, version, log_path, reports / f"eval-{slug}-{version}")
                )
                active_scores = await self.quality(
                    QualityRequest(
                        slug,
                        active.version if active is not None else "base",
                        log_path,
                        reports / f"eval-{slug}-{version}-active",
                    )
                )
                quality = {"new_eval": new_scores, "active_eval": active_scores}
                refused = quality_gate(new_scores, active_scores, s.retrain_eval_tolerance)
        activated = refused is None
        log.info(
            "retrain %s: held-out loss %.4f for the new version %s, %.4f for the active %s: %s",
            slug,
            new_loss,
            version,
            active_loss,
            active_name,
            "activating it" if activated else f"keeping the active one ({refused})",
        )
        if activated:
            await self.activate(slug, version)
        ended = [c.ended_at for c in found if c.ended_at is not None]
        detail = (
            counts
            | {
                "export": str(export.path),
                "exported_conversations": export.conversations,
                "exported_until": max(ended).isoformat() if ended else None,
                "version": version,
                "new_loss": new_loss,
                "active_version": active_name,
                "active_loss": active_loss,
                "activated": activated,
                "refused": refused,
                "log": str(log_path),
            }
            | quality
        )
        verdict = "activated" if activated else f"not activated ({refused}; kept {active_name})"
        return JobOutcome(
            "ok",
            detail,
            f"{version}: held-out loss {new_loss:.4f} vs {active_loss:.4f} ({active_name}); {verdict}",
        )

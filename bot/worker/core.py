"""The worker loop: claim a batch of reply jobs, generate them together, write each reply exactly once.

One batch:

1. **Claim** up to `worker.max_batch` jobs with a lease (`bot.store.jobs.claim`).
2. **Adapters.** Load newly activated LoRA versions, unload deactivated ones (`AdapterSync`).
3. **Prepare** each job: history → turns → the persona's `before_prompt` hook → rendered ids. A job that
   can never be answered (unknown persona, adapter that does not load, unrenderable conversation) is
   failed at once with the reason; the rest of the batch goes on.
4. **Generate** all prepared jobs in one batched call in a worker thread. Tokens stream to the reply
   observers; each job is completed as soon as its own row stops (`after_generation` hook, then the reply
   and its outbox row in one transaction that checks the lease), so short replies do not wait for long
   ones. Leases are renewed while the batch runs. Once a batch has nothing left to generate, the next
   batch is claimed and generated while its replies are still being written (at most one batch
   writing behind the one generating; a channel's next job waits for its previous reply anyway).
5. **Faults.** An out-of-memory error splits the unfinished jobs in halves and retries each half; any
   other generation error is bisected the same way, so one poisonous job fails alone and the others
   still get replies. A failed attempt goes back to the queue with exponential backoff until
   `worker.max_attempts`, then is `failed` with its error. A remote backend that cannot be reached
   (`BackendUnavailable`) fails the unfinished jobs alike, without splitting, and no batch is claimed
   while its `ready()` says it is down: the jobs wait in the queue.
6. **Continuous refill** (a backend with `submit`, i.e. vLLM, which batches on its side): the worker keeps
   up to `worker.max_batch` jobs in flight and claims new ones as soon as any ends, so a short reply's
   slot is refilled while a long one still streams. Each claim is answered as in steps 2-5 (its own
   leases, the same per-channel order and exactly-once writes); an adapter version that is no longer
   active is unloaded only once no request in flight uses it. The local engine batches in-process and
   keeps the claim-a-batch, answer-it loop.
7. **Shutdown.** When `stop` is set, the batch in flight gets 80% of `run.stop_timeout_seconds` to
   finish; then generation is cancelled between two decode steps and unfinished jobs are released to
   the queue (their attempt not counted). No new batch is claimed.

A veto (`after_generation` returned None) closes the job as `done` with no reply message and
`error = "vetoed by the persona's after_generation hook"`; nothing is posted.

Before a reply is stored, a leaked speaker prefix ("alice: ...") is stripped in group chats
(`bot.replies`), so no later prompt carries it. A reply the loop guard cut (at the last sentence before
the loop), or one not in English answering an English message, is stored and delivered but marked
`excluded_from_prompts`: later prompts leave it out, so one bad reply does not pull the next ones the
same way. The job's `error` column notes what was done. `/reset` works as before. Before that, a reply
that drifted out of English is generated again (sampled, a fixed seed per attempt) up to
`worker.language_retries` times, batched with the other retries of its batch; the first English attempt
is kept, else the first reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from bot.config import Settings
from bot.errors import ConfigError
from bot.events import utcnow
from bot.generation.base import (
    BackendUnavailable,
    GenerationBackend,
    GenerationCallbacks,
    GenerationCancelled,
    GenerationResult,
    LocalMemory,
    RemoteBackend,
    Submits,
    is_out_of_memory,
)
from bot.metrics import WorkerMetrics
from bot.outage import OutageLog
from bot.replies import clean_reply, drifted, keep_out_of_prompts, retry_sampling
from bot.store import Store, jobs
from bot.store.jobs import ClaimedJob
from bot.store.leases import keep_leases
from bot.store.models import JobStatus
from bot.streaming import ReplyObserver
from bot.worker.adapters import AdapterSync
from bot.worker.prepare import JobInputs, JobRejected, Prepared, Preparer, load_inputs
from bot.worker.stream import ObserverFanout
from personas.registry import PersonaRegistry
from personas.versions import active_versions, pinned_versions

log = logging.getLogger(__name__)

VETO_NOTE = "vetoed by the persona's after_generation hook"
LOOP_NOTE = "reply cut by the loop guard"


@dataclass(frozen=True)
class ReplyRecord:
    """What became of one generated reply (for `personabot eval`)."""

    job_id: int
    generated: str  # the model's text (after the loop guard / stop texts, before cleanup)
    text: str | None  # what was stored (None: vetoed or empty)
    finish_reason: str
    stripped_prefix: str | None


def _language_retry(item: Prepared, result: GenerationResult) -> Prepared:
    """`item` set up for its next language attempt, remembering its first reply."""
    attempt = item.language_attempt + 1
    sampling, seed = retry_sampling(item.request.sampling, item.request.seed, attempt)
    return dataclasses.replace(
        item,
        request=dataclasses.replace(item.request, sampling=sampling, seed=seed),
        language_attempt=attempt,
        first_result=item.first_result or result,
    )


async def _first_of(*waits: Coroutine[Any, Any, Any]) -> None:
    """Until the first of `waits` ends; the others are cancelled."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


async def _ended(task: asyncio.Task[None]) -> None:
    """Until `task` ends, whatever its outcome (which its own awaiter takes); cancelling this wait
    leaves the task running."""
    await asyncio.wait([task])


@dataclass
class _Claim:
    """Jobs leased in one transaction, with what preparing them needs, read in the same one."""

    jobs: list[ClaimedJob]
    inputs: list[JobInputs | None]
    active: dict[str, tuple[str, str]]  # persona -> (version, path) of the active adapter versions
    # adapter name -> path of versions that API requests pin (`slug@version`) and that are not active
    pinned: dict[str, str] = field(default_factory=dict)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class BatchReport:
    """What one batch did, for its log line and the metrics."""

    claimed: int = 0
    generated: int = 0
    replied: int = 0
    vetoed: int = 0
    retried: int = 0
    failed: int = 0
    released: int = 0
    lost: int = 0
    tokens: int = 0
    cached_tokens: int = 0
    prompt_tokens: int = 0
    kv_hits: int = 0
    splits: int = 0
    language_retries: int = 0
    first_tokens: list[float] = field(default_factory=list)
    adapters: set[str] = field(default_factory=set)
    personas: set[str] = field(default_factory=set)


class Worker:
    """Answers reply jobs from the store with one generation backend, a batch at a time."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        registry: PersonaRegistry,
        backend: GenerationBackend,
        *,
        owner: str | None = None,
        on_text: Callable[[int, str], None] | None = None,
        observers: Sequence[ReplyObserver] = (),
        metrics: WorkerMetrics | None = None,
        stop_timeout: float | None = None,
        seed: int | None = None,
        on_reply: Callable[[ReplyRecord], None] | None = None,
    ) -> None:
        self.settings = settings
        self.on_reply = on_reply
        self.store = store
        self.registry = registry
        self.backend = backend
        self.owner = owner or worker_id()
        self.on_text = on_text
        self.observers = list(observers)
        self.metrics = metrics or WorkerMetrics()
        if stop_timeout is None:
            # Most of `run.stop_timeout_seconds`: the rest is for cancelling between two decode steps
            # and releasing the unfinished jobs before `BotApp.stop` gives up on the worker.
            stop_timeout = 0.8 * settings.run.stop_timeout_seconds
        self.stop_timeout = stop_timeout
        self.adapters = AdapterSync(backend)
        self.preparer = Preparer(registry, backend.tokenizer, backend.context_window, seed=seed)
        if isinstance(backend, LocalMemory):
            backend.set_kv_budget(settings.worker.kv_cache_bytes)
        self._stop: asyncio.Event | None = None
        self._stopping_since: float | None = None
        self._next_housekeeping = 0.0
        # Continuous refill: a backend that takes requests without blocking (`submit`) gets a claim
        # whenever a job ends. Job ids in flight -> the adapter their request uses (None: base model).
        self.continuous = isinstance(backend, Submits)
        self._in_flight: dict[int, str | None] = {}
        self._slot_freed = asyncio.Event()

    # -- the loop -----------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Answer batches until `stop` is set; the batch in flight finishes or is released."""
        self._stop = stop
        self._stopping_since = None  # a worker run again after a stop starts with a clean slate
        watcher = asyncio.create_task(self._watch_stop(stop))
        server = None
        port = self.settings.worker.metrics_port
        if port is not None:
            try:
                server = self.metrics.serve(port)
            except OSError as exc:
                watcher.cancel()
                raise ConfigError(
                    f"worker.metrics_port: cannot listen on port {port}: {exc.strerror}"
                ) from None
            log.info("worker metrics on http://0.0.0.0:%d/metrics", port)
        try:
            if self.continuous:
                await self._run_continuous(stop)
            else:
                await self._run_batches(stop)
        finally:
            watcher.cancel()
            if server is not None:
                server.shutdown()
                server.server_close()

    async def _run_batches(self, stop: asyncio.Event) -> None:
        """One batch generated at a time: claim, generate, and claim the next batch while the
        replies of the previous one are still being written (pipelined: a write is a round trip
        or more that the next batch need not wait for). At most one batch writes behind the one
        generating. A channel's next job is not claimable until its previous reply is written
        (`jobs.claim`), and that write wakes the loop, so per-channel order holds."""
        outage = OutageLog("worker", log)
        wakeups = self.store.wakeups
        writing: asyncio.Task[None] | None = None  # the previous batch, writing its replies
        try:
            while not stop.is_set():
                wakeups.clear(jobs.JOBS)  # a job written from now on wakes the wait below
                try:  # a store hiccup must not end the worker; the next round retries
                    claim = await self._claim(self.settings.worker.max_batch)
                    if claim.jobs:
                        generated = asyncio.Event()
                        answering = asyncio.create_task(self._answer(claim, generated))
                        await _first_of(generated.wait(), _ended(answering))
                        previous, writing = writing, answering
                        if previous is not None:
                            await previous
                    elif writing is not None:
                        previous, writing = writing, None
                        await previous
                    outage.ok()
                except Exception as exc:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), outage.failed(exc))
                    continue
                if writing is None and len(claim.jobs) < self.settings.worker.max_batch:
                    # Everything due was claimed and written: wait to be woken by a new (or newly
                    # claimable) job, at once if one came meanwhile. The slow poll catches jobs
                    # that become due by time (a backoff, an expired lease) and wake-ups missed.
                    await wakeups.wait(jobs.JOBS, self.settings.worker.poll_seconds, stop)
        finally:
            if writing is not None:  # stopping: the replies being written still are
                with contextlib.suppress(Exception):
                    await writing

    async def _run_continuous(self, stop: asyncio.Event) -> None:
        """Up to `max_batch` jobs in flight; a claim for the free slots whenever a job ends or arrives."""
        w = self.settings.worker
        outage = OutageLog("worker", log)
        wakeups = self.store.wakeups
        running: set[asyncio.Task[None]] = set()
        try:
            while not stop.is_set():
                wakeups.clear(jobs.JOBS)  # wake-ups and freed slots from now on end the waits below
                self._slot_freed.clear()
                free = w.max_batch - len(self._in_flight)
                if free <= 0:
                    await _first_of(self._slot_freed.wait(), stop.wait())
                    continue
                try:
                    claim = await self._claim(free)
                    outage.ok()
                except Exception as exc:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), outage.failed(exc))
                    continue
                if claim.jobs:
                    self._in_flight.update((job.id, None) for job in claim.jobs)
                    task = asyncio.create_task(self._answer_in_flight(claim))
                    running.add(task)
                    task.add_done_callback(running.discard)
                if len(claim.jobs) < free:  # nothing more to claim now: wait for a job, a slot or the poll
                    await _first_of(self._slot_freed.wait(), wakeups.wait(jobs.JOBS, w.poll_seconds, stop))
        finally:
            # Stopping: the jobs in flight finish, or are released when `_should_cancel` says so.
            if running:
                await asyncio.gather(*running, return_exceptions=True)

    async def _answer_in_flight(self, claim: _Claim) -> None:
        try:
            await self._answer(claim)
        except Exception:  # a store hiccup: the leases expire and the jobs are claimed again
            log.exception("answering %d jobs failed", len(claim.jobs))
        finally:
            for job in claim.jobs:
                self._free(job.id)

    def _free(self, job_id: int) -> None:
        """The job is settled (answered, failed or released): its slot takes another job."""
        if self._in_flight.pop(job_id, False) is not False:
            self._slot_freed.set()

    def _busy_adapters(self) -> set[str]:
        return {name for name in self._in_flight.values() if name is not None}

    async def _watch_stop(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._stopping_since = time.monotonic()

    def _should_cancel(self) -> bool:
        """Called from the generating thread between decode steps."""
        since = self._stopping_since
        return since is not None and time.monotonic() - since >= self.stop_timeout

    async def run_once(self) -> int:
        """Claim one batch and answer it; returns how many jobs were claimed."""
        claim = await self._claim(self.settings.worker.max_batch)
        if claim.jobs:
            await self._answer(claim)
        return len(claim.jobs)

    async def _claim(self, limit: int) -> _Claim:
        """Lease up to `limit` jobs (none while the backend is down), with what preparing them needs."""
        w = self.settings.worker
        if not await self._backend_ready():
            return _Claim([], [], {})
        # Jobs found only by time (a dead worker's last attempt) and the queue-depth gauge: once per
        # poll, not on every claim.
        housekeeping = time.monotonic() >= self._next_housekeeping
        # One transaction claims the batch and reads what preparing it needs (the active adapter
        # versions, each job's channel and history); a failure leaves the jobs unclaimed.
        async with self.store.transaction() as session:
            claimed = await jobs.claim(
                session,
                owner=self.owner,
                limit=limit,
                lease_seconds=w.lease_seconds,
                max_attempts=w.max_attempts,
                fail_exhausted=housekeeping,
            )
            if housekeeping:
                self.metrics.queue_depth.set(await jobs.depth(session))
            claim = _Claim(claimed, [], {})
            if claimed:
                claim.active = await active_versions(session)
                asked = {(j.persona, str(v)) for j in claimed if (v := (j.options or {}).get("version"))}
                claim.pinned = await pinned_versions(session, asked, claim.active)
                claim.inputs = await load_inputs(session, claimed)
        if housekeeping:
            self._next_housekeeping = time.monotonic() + w.poll_seconds
        return claim

    async def _answer(self, claim: _Claim, generated: asyncio.Event | None = None) -> None:
        """Answer claimed jobs: prepare, generate, write each reply (steps 2-5 above). `generated`
        is set once nothing is left to generate (only replies left to write)."""
        w = self.settings.worker
        claimed = claim.jobs
        started = time.perf_counter()
        report = BatchReport(claimed=len(claimed))
        leases = [job.lease for job in claimed]
        async with keep_leases(self.store, jobs.QUEUE, lambda: leases, lease_seconds=w.lease_seconds):
            prepared = await self._prepare(claim, report)
            if prepared:
                await self._generate(prepared, report, generated)
            elif generated is not None:
                generated.set()
        self._log_batch(report, time.perf_counter() - started)

    async def _backend_ready(self) -> bool:
        """A remote backend that is down (`ready()` False): claim nothing, so the jobs wait in the queue
        without spending attempts until it is back."""
        if not isinstance(self.backend, RemoteBackend):
            return True
        return await asyncio.to_thread(self.backend.ready)

    # -- preparing ------------------------------------------------------------------------------------

    async def _prepare(self, claim: _Claim, report: BatchReport) -> list[Prepared]:
        claimed, inputs = claim.jobs, claim.inputs
        # A version still used by a request in flight is unloaded once that one ends.
        await self.adapters.sync(claim.active, busy=self._busy_adapters(), pinned=claim.pinned)
        self.metrics.adapters_loaded.set(len(self.adapters.loaded))
        prepared = []
        for job, job_inputs in zip(claimed, inputs, strict=True):
            try:
                item = self.preparer.prepare(job, job_inputs, self.adapters)
                prepared.append(item)
                if job.id in self._in_flight:
                    self._in_flight[job.id] = item.request.adapter
            except JobRejected as exc:
                log.warning("job %s: %s", job.id, exc)
                await self._fail(job, str(exc), exc.reason, report, retryable=False)
            except Exception as exc:  # a bug or a plugin's import side effect: retry later
                log.exception("job %s: preparing the prompt failed", job.id)
                await self._fail(job, f"{type(exc).__name__}: {exc}", "prompt", report)
        return prepared

    # -- generating -----------------------------------------------------------------------------------

    async def _generate(
        self, prepared: list[Prepared], report: BatchReport, generated: asyncio.Event | None = None
    ) -> None:
        loop = asyncio.get_running_loop()
        fanout = ObserverFanout(self.observers, loop, on_text=self.on_text)
        for item in prepared:
            await fanout.start(item.reply)
            report.personas.add(item.persona.slug)
            if item.request.adapter:
                report.adapters.add(item.request.adapter)
        finished: dict[int, asyncio.Task[None]] = {}  # job id -> its completion
        retries: list[Prepared] = []  # replies that drifted into another language, to generate again
        pending = list(prepared)
        batches = [pending]
        while batches:
            batch = batches.pop(0)
            retries.clear()
            outcome = await self._generate_once(batch, fanout, finished, report, loop, retries)
            if retries:
                report.language_retries += len(retries)
                batches.append(list(retries))
            if outcome is None:
                continue
            handed_on = {p.job.id for p in retries}
            unfinished = [p for p in batch if p.job.id not in finished and p.job.id not in handed_on]
            exc = outcome
            if isinstance(exc, GenerationCancelled):
                for item in unfinished:
                    await self._release(item, fanout, report)
                for rest in batches:
                    for item in rest:
                        await self._release(item, fanout, report)
                break
            if isinstance(exc, BackendUnavailable):  # the server's fault, not a job's: no split
                for item in unfinished:
                    await self._fail(item.job, f"generation backend unavailable: {exc}", "backend", report)
                    await fanout.end(item.reply, False)
                continue
            if len(unfinished) > 1:
                report.splits += 1
                half = len(unfinished) // 2
                why = "out of memory" if is_out_of_memory(exc) else f"{type(exc).__name__}: {exc}"
                log.warning(
                    "batch of %d failed (%s); retrying as %d + %d",
                    len(unfinished),
                    why,
                    half,
                    len(unfinished) - half,
                )
                batches[:0] = [unfinished[:half], unfinished[half:]]
                continue
            for item in unfinished:
                reason = "oom" if is_out_of_memory(exc) else "generation"
                await self._fail(item.job, f"generation failed: {type(exc).__name__}: {exc}", reason, report)
                await fanout.end(item.reply, False)
        if generated is not None:
            generated.set()
        if finished:
            await asyncio.gather(*finished.values())

    async def _generate_once(
        self,
        batch: list[Prepared],
        fanout: ObserverFanout,
        finished: dict[int, asyncio.Task[None]],
        report: BatchReport,
        loop: asyncio.AbstractEventLoop,
        retries: list[Prepared],
    ) -> BaseException | None:
        """Generate one (sub-)batch; returns the exception that stopped it, if any.

        A reply that drifted out of English (`bot.replies.drifted`) is not completed: it is put in
        `retries`, with sampling for its next attempt, while attempts are left.
        """
        max_retries = self.settings.worker.language_retries
        begun = time.perf_counter()

        def on_text(index: int, text: str) -> None:
            item = batch[index]
            if item.stream_text:
                fanout.text_from_thread(index, item.reply, text)

        def on_first_token(index: int) -> None:
            report.first_tokens.append(time.perf_counter() - begun)

        def on_finish(index: int, result: GenerationResult) -> None:
            item = batch[index]
            off_language = drifted(item.question, result.text)
            retry = off_language and item.language_attempt < max_retries

            def schedule() -> None:
                if retry:
                    retries.append(_language_retry(item, result))
                    return
                first = item.first_result
                # No attempt came out in English: the first reply (the persona's own sampling) stands.
                final = first if first is not None and off_language else result
                finished[item.job.id] = loop.create_task(self._complete(item, final, fanout, report))

            loop.call_soon_threadsafe(schedule)

        callbacks = GenerationCallbacks(
            on_text=on_text if fanout.wants_text else None,
            on_first_token=on_first_token,
            on_finish=on_finish,
            should_stop=self._should_cancel,
        )
        requests = [p.request for p in batch]
        report.generated += len(batch)
        self.metrics.batch_size.observe(len(batch))
        try:
            if isinstance(self.backend, Submits):  # its own loop runs it: no thread held while it streams
                await asyncio.wrap_future(self.backend.submit(requests, callbacks))
            else:
                await asyncio.to_thread(self.backend.generate_batch, requests, callbacks)
        except Exception as exc:
            if not isinstance(exc, (GenerationCancelled, BackendUnavailable)) and not is_out_of_memory(exc):
                log.warning("generating a batch of %d failed", len(batch), exc_info=exc)
            # The traceback's frames hold the failed batch's tensors: drop them before a retry.
            exc.__traceback__ = None
            if isinstance(self.backend, LocalMemory):
                await asyncio.to_thread(self.backend.release_memory)
            await asyncio.sleep(0)  # completions scheduled by the thread before it raised
            return exc
        await asyncio.sleep(0)
        return None

    # -- finishing a job ------------------------------------------------------------------------------

    async def _complete(
        self, item: Prepared, result: GenerationResult, fanout: ObserverFanout, report: BatchReport
    ) -> None:
        try:
            await self._write_reply(item, result, fanout, report)
        finally:
            self._free(item.job.id)

    async def _write_reply(
        self, item: Prepared, result: GenerationResult, fanout: ObserverFanout, report: BatchReport
    ) -> None:
        job, persona = item.job, item.persona
        report.tokens += len(result.token_ids)
        report.prompt_tokens += result.prompt_tokens
        report.cached_tokens += result.cached_tokens
        if item.request.cache_key is not None and isinstance(self.backend, LocalMemory):
            hit = result.cached_tokens > 0
            report.kv_hits += hit
            self.metrics.kv_lookup(hit, result.cached_tokens)
        self.metrics.tokens.labels(persona.slug).inc(len(result.token_ids))
        first = result.timings.get("first_token")
        if first is not None:
            self.metrics.first_token.observe(first)
            decode = result.timings.get("total", 0.0) - first
            if decode > 0 and len(result.token_ids) > 1:
                self.metrics.tokens_per_second.labels(persona.slug).set((len(result.token_ids) - 1) / decode)
        cleaned = clean_reply(result.text, group=not item.channel.is_direct)
        text = cleaned.text
        notes = [LOOP_NOTE] if result.finish_reason == "loop" else []
        exclude = keep_out_of_prompts(item.question, text, result.finish_reason)
        if exclude:
            notes.append("left out of later prompts")
        if cleaned.stripped_prefix is not None:
            notes.append(f"speaker prefix {cleaned.stripped_prefix!r} stripped")
        plugins = self.preparer.plugins
        if plugins is not None and item.context is not None:
            final = plugins.run_after_generation(persona, item.context, text)
        else:
            final = text
        if self.on_reply is not None:
            self.on_reply(
                ReplyRecord(
                    job.id,
                    result.text,
                    final.strip() if final else None,
                    result.finish_reason,
                    cleaned.stripped_prefix,
                )
            )
        try:
            if final is None:
                async with self.store.transaction() as session:
                    held = await jobs.complete_without_reply(session, job, note=VETO_NOTE)
                report.vetoed += held
                self.metrics.jobs.labels("vetoed" if held else "lost").inc()
                report.lost += not held
                await fanout.end(item.reply, False)
                return
            final = final.strip()
            if not final:
                await self._fail(job, "the model produced an empty reply", "empty", report)
                await fanout.end(item.reply, False)
                return
            written = await self.store.group.run(
                lambda session: jobs.complete(
                    session,
                    job,
                    text=final,
                    persona=persona.slug,
                    platform=item.channel.platform,
                    note="; ".join(notes) or None,
                    exclude_from_prompts=exclude,
                )
            )
        except Exception as exc:
            log.exception("job %s: writing the reply failed", job.id)
            await self._fail(job, f"writing the reply failed: {type(exc).__name__}: {exc}", "store", report)
            await fanout.end(item.reply, False)
            return
        if written is None:
            log.warning("job %s: lease lost; another worker answers it", job.id)
            report.lost += 1
            self.metrics.jobs.labels("lost").inc()
            await fanout.end(item.reply, False)
            return
        report.replied += 1
        self.metrics.jobs.labels("replied").inc()
        self.metrics.job_latency.observe((utcnow() - job.created_at).total_seconds())
        await fanout.end(item.reply, True)

    async def _fail(
        self, job: ClaimedJob, error: str, reason: str, report: BatchReport, *, retryable: bool = True
    ) -> None:
        w = self.settings.worker
        self.metrics.failures.labels(reason).inc()
        try:
            async with self.store.transaction() as session:
                status = await jobs.fail(
                    session,
                    job,
                    error=error,
                    max_attempts=w.max_attempts,
                    backoff_seconds=w.retry_backoff_seconds,
                    retryable=retryable,
                )
        except Exception:  # the lease expires and the job is claimed again
            log.exception("job %s: recording the failure failed", job.id)
            return
        finally:
            self._free(job.id)
        outcome = (
            "retried" if status == JobStatus.PENDING else "failed" if status == JobStatus.FAILED else "lost"
        )
        setattr(report, outcome, getattr(report, outcome) + 1)
        self.metrics.jobs.labels(outcome).inc()

    async def _release(self, item: Prepared, fanout: ObserverFanout, report: BatchReport) -> None:
        try:
            async with self.store.transaction() as session:
                held = await jobs.release(session, item.job)
        except Exception:
            log.exception("job %s: releasing it failed; its lease will expire", item.job.id)
            held = False
        finally:
            self._free(item.job.id)
        report.released += held
        self.metrics.jobs.labels("released" if held else "lost").inc()
        await fanout.end(item.reply, False)

    # -- leases and logs ------------------------------------------------------------------------------

    def _log_batch(self, report: BatchReport, seconds: float) -> None:
        if isinstance(self.backend, LocalMemory):
            self.metrics.kv_bytes.set(self.backend.kv.nbytes)
        ttft = sorted(report.first_tokens)
        median = ttft[len(ttft) // 2] if ttft else 0.0
        log.info(
            "batch: %d claimed, %d generated (%d personas, %d adapters%s): %d replied, %d vetoed, "
            "%d retried, %d failed, %d released, %d lost; %d tokens in %.2fs (%.1f tok/s), "
            "median first token %.2fs, KV reuse %d/%d jobs (%d of %d prompt tokens)",
            report.claimed,
            report.generated,
            len(report.personas),
            len(report.adapters),
            (f", {report.splits} splits" if report.splits else "")
            + (f", {report.language_retries} language retries" if report.language_retries else ""),
            report.replied,
            report.vetoed,
            report.retried,
            report.failed,
            report.released,
            report.lost,
            report.tokens,
            seconds,
            report.tokens / seconds if seconds > 0 else 0.0,
            median,
            report.kv_hits,
            report.replied + report.vetoed,
            report.cached_tokens,
            report.prompt_tokens,
        )

"""vLLM as the generation backend: the worker renders, vLLM batches, LoRA adapters are loaded at runtime.

The worker keeps the prompt its own: `bot.prompting` renders the conversation, and the **token ids** go to
`POST /v1/completions` (`prompt` is a list of ids; chat messages are never sent, so vLLM never applies a
template and user text never becomes structure). Each request stops on the template's end-of-turn ids
(`stop_token_ids`, with `ignore_eos` so nothing else ends it, as in the local engine) and carries the
persona's sampling settings. Replies stream back as server-sent events with their token ids
(`return_token_ids`); the text is decoded here by the local engine's `ReplyText` (same tokenizer, same
incremental decoder, same group-chat stop texts and loop guard), so a reply ends where the local engine
would end it, and feeds the same streaming callbacks. A reply ended here (stop text, loop) closes its
stream, which aborts the request in vLLM.

Adapters. The active version of a persona is served under the name `persona@version`, loaded with
`POST /v1/load_lora_adapter` (the server runs with `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`) from the
folder as the server sees it (`generation.vllm.adapter_paths` maps prefixes), and unloaded with
`/v1/unload_lora_adapter` when another version replaces it. A persona without an adapter uses the base
model's name. A 404 for an adapter's name means the server restarted and forgot it: it is loaded again
and the request retried.

Concurrency. The worker hands each claim to `submit`, which returns at once; it claims more jobs as
soon as any ends, so up to `worker.max_batch` requests are in flight and vLLM's continuous batching
keeps them together (its prefix caching replaces the local engine's KV reuse).

Servers and faults. Requests go to the healthy server (of `generation.vllm.urls`) with the fewest
requests in flight. A connection error, a timeout or a 5xx marks the server unhealthy and moves the
request to another healthy server; with none left the batch raises `BackendUnavailable`, its jobs go back
to the queue with backoff, and `ready()` keeps the worker from claiming more until a probe
(`GET /v1/models`, every `health_check_seconds`) finds a server again. A 4xx (other than a forgotten
adapter) is the request's own fault and raises `RequestRejected`.

HTTP runs on an asyncio loop in a thread of its own (one aiohttp session, kept-alive connections); the
worker calls the blocking methods from its generation thread, as it calls the local backend. Nothing here
imports torch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp

from bot.config import Settings, VllmSettings
from bot.generation.base import (
    BackendUnavailable,
    GenerationCallbacks,
    GenerationCancelled,
    GenerationRequest,
    GenerationResult,
)
from bot.generation.guard import ReplyText

if TYPE_CHECKING:
    from bot.basemodel import ModelLocation

log = logging.getLogger(__name__)

T = TypeVar("T")


class RequestRejected(Exception):
    """vLLM refused this request (a 4xx): retrying it elsewhere would not help."""


class AdapterRejected(Exception):
    """vLLM refused to load an adapter folder; the message is the server's."""


class _ServerDown(Exception):
    """The server did not answer properly: connection error, timeout, 5xx, or an unauthorized key."""


class _UnknownModel(Exception):
    """404 for the model name: a restarted server has forgotten the adapter."""


# -- pure helpers -------------------------------------------------------------------------------------


def map_adapter_path(path: str, mapping: dict[str, str]) -> str:
    """An adapter folder as the vLLM server sees it: the longest matching prefix of `mapping` replaced."""
    best = ""
    for local in mapping:
        root = local.rstrip("/")
        if (path == root or path.startswith(root + "/")) and len(root) > len(best.rstrip("/")):
            best = local
    if not best:
        return path
    return mapping[best].rstrip("/") + path[len(best.rstrip("/")) :]


def completion_body(model: str, request: GenerationRequest, max_tokens: int) -> dict[str, Any]:
    """The `/v1/completions` request for one reply: token ids in, token ids streamed back."""
    s = request.sampling
    body: dict[str, Any] = {
        "model": model,
        "prompt": list(request.prompt_ids),
        "max_tokens": max_tokens,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "top_k": s.top_k if s.top_k > 0 else -1,  # -1: off (older vLLM releases reject 0)
        "repetition_penalty": s.repetition_penalty,
        # The template's end-of-turn ids end a reply, nothing else (as in the local engine).
        "stop_token_ids": list(request.stop_ids),
        "ignore_eos": True,
        "return_token_ids": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if request.seed is not None:
        body["seed"] = request.seed
    return body


def error_message(text: str) -> str:
    """vLLM's `{"error": {"message": ...}}` (or any body) as one short line."""
    try:
        data = json.loads(text)
    except ValueError:
        return text.strip()[:300] or "(empty body)"
    error = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(error, dict):
        return str(error.get("message") or error)[:300]
    return str(error)[:300]


def classify(status: int, message: str) -> Exception:
    """An HTTP error status from `/v1/completions` as the exception the caller acts on."""
    if status == 404:
        return _UnknownModel(message)
    if status in (401, 403):
        return _ServerDown(f"HTTP {status}: {message} (check generation.vllm.api_key)")
    if status in (408, 429) or status >= 500:
        return _ServerDown(f"HTTP {status}: {message}")
    return RequestRejected(f"vLLM rejected the request: HTTP {status}: {message}")


async def sse_events(content: aiohttp.StreamReader) -> AsyncIterator[dict[str, Any]]:
    """The JSON payloads of a server-sent event stream, up to `data: [DONE]`.

    Lines are split here rather than by `StreamReader.readline`, whose 64 KiB line limit the first event
    (it echoes the prompt's ids) passes with long prompts."""
    buffer = b""
    async for chunk in content.iter_any():
        buffer += chunk
        while (end := buffer.find(b"\n")) >= 0:
            line, buffer = buffer[:end].decode("utf-8").strip(), buffer[end + 1 :]
            if not line.startswith("data:"):
                continue  # blank separators, comments, event names
            data = line[5:].strip()
            if data == "[DONE]":
                return
            yield json.loads(data)
    raise _ServerDown("the event stream ended without [DONE]")


# -- one reply as it streams in ---------------------------------------------------------------------------


class _Reply:
    """Token ids of one streamed reply into text and callbacks, as the local engine reports a row."""

    def __init__(
        self,
        index: int,
        request: GenerationRequest,
        max_tokens: int,
        tokenizer: Any,
        callbacks: GenerationCallbacks,
        started: float,
    ) -> None:
        self.index = index
        self.request = request
        self.max_tokens = max_tokens
        self.tokenizer = tokenizer
        self.callbacks = callbacks
        self.started = started
        self.text = ReplyText(tokenizer, request.stop_texts, loop_guard=request.loop_guard)
        self.out: list[int] = []
        self.finish: str | None = None
        self.first_token: float | None = None
        self.prompt_tokens = len(request.prompt_ids)
        self.cached_tokens = 0

    def feed(self, token_ids: list[int]) -> None:
        for token in token_ids:
            if self.finish is not None:
                return
            if self.first_token is None:
                self.first_token = time.perf_counter() - self.started
                if self.callbacks.on_first_token is not None:
                    self.callbacks.on_first_token(self.index)
            if token in self.request.stop_ids:
                self.finish = "stop"
                return
            self.out.append(int(token))
            text = self.text.add(int(token))
            if text is None:  # a stop text or the loop guard ended it
                self.finish = self.text.finish
                return
            if self.callbacks.on_text is not None:
                self.callbacks.on_text(self.index, text.lstrip())
            if len(self.out) >= self.max_tokens:
                self.finish = "length"

    def server_finished(self, reason: str) -> None:
        if self.finish is None:
            self.finish = "length" if reason == "length" else "stop"

    def usage(self, usage: dict[str, Any]) -> None:
        self.prompt_tokens = int(usage.get("prompt_tokens") or self.prompt_tokens)
        details = usage.get("prompt_tokens_details") or {}
        self.cached_tokens = int(details.get("cached_tokens") or 0)

    def result(self) -> GenerationResult:
        assert self.finish is not None
        if self.text.cut is not None:
            text = self.text.cut.strip()
        else:
            text = self.tokenizer.decode(self.out, skip_special_tokens=True).strip()
        return GenerationResult(
            token_ids=list(self.out),
            text=text,
            finish_reason=self.finish,
            prompt_tokens=self.prompt_tokens,
            cached_tokens=self.cached_tokens,
            timings={
                "first_token": self.first_token or 0.0,
                "total": time.perf_counter() - self.started,
            },
        )


# -- the servers ------------------------------------------------------------------------------------------


@dataclass
class _Server:
    url: str
    healthy: bool | None = None  # None: not asked yet
    error: str = ""
    checked_at: float = float("-inf")
    in_flight: int = 0
    model: str | None = None  # the served base model's name
    max_model_len: int | None = None
    loaded: set[str] = field(default_factory=set)  # adapter names this server holds

    def state(self) -> str:
        return {True: "healthy", False: "unhealthy", None: "unknown"}[self.healthy]


def _context_window(folder: Path) -> int:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 2048
    return int(config.get("max_position_embeddings") or 2048)


class VllmBackend:
    """Generation on vLLM servers through their OpenAI-compatible API."""

    def __init__(self, settings: VllmSettings, tokenizer: Any, *, context_window: int = 2048) -> None:
        if not settings.urls:
            raise ValueError("generation.vllm.urls is empty")
        self.settings = settings
        self.tokenizer = tokenizer
        self.location: ModelLocation | None = None  # the base model's files, when built from settings
        self._config_window = context_window
        self.servers = [_Server(url.rstrip("/")) for url in settings.urls]
        self.device = "vllm " + ", ".join(s.url for s in self.servers)  # for the worker's start-up line
        self.dtype = "served"
        self._adapters: dict[str, str] = {}  # adapter name -> folder as the server sees it
        self._load_locks: dict[tuple[str, str], asyncio.Lock] = {}
        key = settings.api_key.get_secret_value() if settings.api_key is not None else None
        key = key or os.environ.get("VLLM_API_KEY") or None
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-client", daemon=True)
        self._thread.start()
        self._session: aiohttp.ClientSession = self._call(self._open_session())

    @classmethod
    def from_settings(cls, settings: Settings) -> VllmBackend:
        """The backend for `generation.vllm`, with the configured model folder's tokenizer (no weights)."""
        from bot.basemodel import resolve_model
        from bot.generation.tokenizer import load_tokenizer_only

        location = resolve_model(settings)
        backend = cls(
            settings.generation.vllm,
            load_tokenizer_only(location.folder),
            context_window=_context_window(location.folder),
        )
        backend.location = location
        if not backend.ready():
            log.warning("no vLLM server answers yet (%s); jobs wait until one does", backend.down_message())
        return backend

    # -- plumbing ---------------------------------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the client loop and wait for it (from any thread but the loop's)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _open_session(self) -> aiohttp.ClientSession:
        s = self.settings
        timeout = aiohttp.ClientTimeout(
            total=s.request_timeout_seconds,
            connect=s.connect_timeout_seconds,
            sock_read=s.stall_timeout_seconds,
        )
        # No connection limit: the worker bounds the requests in flight (worker.max_batch).
        return aiohttp.ClientSession(
            timeout=timeout, headers=self._headers, connector=aiohttp.TCPConnector(limit=0)
        )

    def close(self) -> None:
        if not self._loop.is_running():
            return
        self._call(self._session.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    @property
    def context_window(self) -> int:
        lengths = [s.max_model_len for s in self.servers if s.max_model_len]
        return min([self._config_window, *lengths])

    # -- health ---------------------------------------------------------------------------------------------

    def down_message(self) -> str:
        return "; ".join(f"{s.url}: {s.error or s.state()}" for s in self.servers)

    def _mark_down(self, server: _Server, error: str) -> None:
        if server.healthy is not False:
            log.warning("vLLM server %s is unhealthy: %s", server.url, error)
        server.healthy, server.error, server.checked_at = False, error, time.monotonic()
        server.loaded.clear()  # a server that comes back may be a new process

    async def _probe(self, server: _Server) -> None:
        """`GET /v1/models`: up (and authorized), and which base model it serves."""
        wait = aiohttp.ClientTimeout(total=self.settings.connect_timeout_seconds * 2)
        try:
            async with self._session.get(f"{server.url}/v1/models", timeout=wait) as resp:
                text = await resp.text()
                if resp.status != 200:
                    raise classify(resp.status, error_message(text))
                models = json.loads(text).get("data") or []
        except (aiohttp.ClientError, TimeoutError, ValueError, _ServerDown, RequestRejected) as exc:
            self._mark_down(server, _describe(exc))
            return
        base = next((m for m in models if not m.get("parent")), models[0] if models else None)
        if base is None:
            self._mark_down(server, "it serves no model")
            return
        if server.healthy is False:
            log.info("vLLM server %s is back", server.url)
        server.model = self.settings.model or str(base["id"])
        server.max_model_len = base.get("max_model_len")
        server.healthy, server.error, server.checked_at = True, "", time.monotonic()

    async def _probe_due(self) -> bool:
        now = time.monotonic()
        due = [
            s
            for s in self.servers
            if s.healthy is not True and now - s.checked_at >= self.settings.health_check_seconds
        ]
        for server in due:
            server.checked_at = now  # one probe at a time per server
        if due:
            await asyncio.gather(*(self._probe(s) for s in due))
        return any(s.healthy for s in self.servers)

    def ready(self) -> bool:
        """Whether a server can take requests; probes the others at most every health_check_seconds
        (in the background while one is healthy, else waiting for the probes)."""
        if all(s.healthy for s in self.servers):
            return True
        probes = asyncio.run_coroutine_threadsafe(self._probe_due(), self._loop)
        if any(s.healthy for s in self.servers):
            return True
        return probes.result()

    def health(self) -> dict[str, Any]:
        """The backend's state as plain data (the worker's heartbeat carries it to `personabot status`)."""
        return {
            "backend": "vllm",
            "healthy": any(s.healthy for s in self.servers),
            "servers": [
                {
                    "url": s.url,
                    "state": s.state(),
                    "error": s.error or None,
                    "in_flight": s.in_flight,
                    "adapters": sorted(s.loaded),
                }
                for s in self.servers
            ],
        }

    def _pick(self, tried: set[str]) -> _Server | None:
        """The least-loaded server not known to be down (and not already tried for this request)."""
        candidates = [s for s in self.servers if s.healthy is not False and s.url not in tried]
        return min(candidates, key=lambda s: s.in_flight) if candidates else None

    # -- adapters -------------------------------------------------------------------------------------------

    def load_adapter(self, name: str, folder: Path) -> int:
        """Serve `folder` as `name` on every reachable server; `AdapterRejected` when vLLM refuses it.

        A server that cannot be reached now loads it before its first request that needs it."""
        self._adapters[name] = map_adapter_path(str(folder), self.settings.adapter_paths)
        try:
            self._call(self._load_everywhere(name))
        except AdapterRejected:
            self._adapters.pop(name, None)
            raise
        return sum(p.stat().st_size for p in folder.glob("adapter_model.*")) if folder.is_dir() else 0

    async def _load_everywhere(self, name: str) -> None:
        async def one(server: _Server) -> None:
            try:
                await self._ensure_loaded(server, name)
            except _ServerDown as exc:
                self._mark_down(server, str(exc))

        await asyncio.gather(*(one(s) for s in self.servers if s.healthy is not False))

    async def _ensure_loaded(self, server: _Server, name: str) -> None:
        lock = self._load_locks.setdefault((server.url, name), asyncio.Lock())
        async with lock:
            if name in server.loaded:
                return
            path = self._adapters.get(name)
            if path is None:
                raise RequestRejected(f"adapter {name!r} is not loaded (no active version has that name)")
            body = {"lora_name": name, "lora_path": path}
            status, text = await self._post(server, "/v1/load_lora_adapter", body)
            if status == 200 or (status == 400 and "already been loaded" in text):
                server.loaded.add(name)  # (loaded already: another worker on this server did it)
                log.info("vLLM %s: loaded adapter %s from %s", server.url, name, path)
                return
            if status in (401, 403, 408, 429, 502, 503, 504):
                raise classify(status, error_message(text))
            # 400/404: the folder is missing or wrong; 500: vLLM could not use it (rank, modules).
            raise AdapterRejected(
                f"vLLM at {server.url} refused adapter {name} ({path}): {error_message(text)}"
            )

    def unload_adapter(self, name: str) -> None:
        self._adapters.pop(name, None)
        self._call(self._unload_everywhere(name))

    async def _unload_everywhere(self, name: str) -> None:
        async def one(server: _Server) -> None:
            server.loaded.discard(name)
            try:
                status, text = await self._post(server, "/v1/unload_lora_adapter", {"lora_name": name})
            except _ServerDown:
                return  # a server that is down holds nothing after its restart
            if status not in (200, 404):
                log.warning(
                    "vLLM %s: unloading %s: HTTP %d %s", server.url, name, status, error_message(text)
                )

        await asyncio.gather(*(one(s) for s in self.servers if s.healthy is not False))

    async def _post(self, server: _Server, path: str, body: dict[str, Any]) -> tuple[int, str]:
        try:
            async with self._session.post(f"{server.url}{path}", json=body) as resp:
                return resp.status, await resp.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _ServerDown(_describe(exc)) from None

    # -- generation -----------------------------------------------------------------------------------------

    def generate_batch(
        self, requests: list[GenerationRequest], callbacks: GenerationCallbacks
    ) -> list[GenerationResult]:
        """Every request in flight at once (vLLM batches them); each row's result as soon as it ends."""
        if not requests:
            return []
        return self._call(self._generate_all(requests, callbacks))

    def submit(
        self, requests: list[GenerationRequest], callbacks: GenerationCallbacks
    ) -> concurrent.futures.Future[list[GenerationResult]]:
        """`generate_batch` without waiting for it: the worker submits each claim as it comes and keeps
        `worker.max_batch` requests in flight (continuous refill); vLLM batches whatever is in flight."""
        return asyncio.run_coroutine_threadsafe(self._generate_all(requests, callbacks), self._loop)

    async def _generate_all(
        self, requests: list[GenerationRequest], callbacks: GenerationCallbacks
    ) -> list[GenerationResult]:
        started = time.perf_counter()
        rows = [asyncio.create_task(self._row(i, r, callbacks, started)) for i, r in enumerate(requests)]
        everything = asyncio.gather(*rows, return_exceptions=True)
        waiting: set[asyncio.Future[Any]] = {everything}
        if callbacks.should_stop is not None:
            waiting.add(asyncio.ensure_future(self._until(callbacks.should_stop)))
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        for extra in waiting - {everything}:
            extra.cancel()
        if not everything.done():  # should_stop: abandon the rest (closing a stream aborts it in vLLM)
            unfinished = sum(not t.done() for t in rows)
            for task in rows:
                task.cancel()
            await asyncio.gather(*rows, return_exceptions=True)
            raise GenerationCancelled(f"stopped with {unfinished} of {len(rows)} replies unfinished")
        outcomes = everything.result()
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        if errors:
            # A request vLLM refused is raised as itself, so the worker isolates it; when every failure
            # is the servers', the batch waits for them.
            own = [e for e in errors if not isinstance(e, BackendUnavailable)]
            raise (own or errors)[0]
        return [o for o in outcomes if not isinstance(o, BaseException)]

    @staticmethod
    async def _until(should_stop: Any) -> None:
        while not should_stop():
            await asyncio.sleep(0.05)

    def _max_tokens(self, index: int, request: GenerationRequest) -> int:
        if not request.prompt_ids:
            raise RequestRejected(f"request {index}: empty prompt")
        room = self.context_window - len(request.prompt_ids)
        if room < 1:
            raise RequestRejected(
                f"request {index}: prompt of {len(request.prompt_ids)} tokens fills the "
                f"{self.context_window}-token context"
            )
        return min(request.sampling.max_new_tokens, room)

    async def _row(
        self, index: int, request: GenerationRequest, callbacks: GenerationCallbacks, started: float
    ) -> GenerationResult:
        max_tokens = self._max_tokens(index, request)
        tried: set[str] = set()
        reloads = 0
        while True:
            server = self._pick(tried)
            if server is None:
                raise BackendUnavailable(f"no vLLM server answers: {self.down_message()}")
            server.in_flight += 1
            try:
                if request.adapter is not None:
                    await self._ensure_loaded(server, request.adapter)
                model = request.adapter or await self._base_model(server)
                reply = _Reply(index, request, max_tokens, self.tokenizer, callbacks, started)
                await self._stream(server, completion_body(model, request, max_tokens), reply)
                server.healthy = True
                result = reply.result()
                if callbacks.on_finish is not None:
                    callbacks.on_finish(index, result)
                return result
            except _UnknownModel as exc:
                if request.adapter is None or reloads >= 2:
                    raise RequestRejected(f"vLLM at {server.url}: {exc}") from None
                reloads += 1
                server.loaded.discard(request.adapter)
                log.info(
                    "vLLM %s forgot adapter %s (restarted?); loading it again", server.url, request.adapter
                )
            except _ServerDown as exc:
                self._mark_down(server, str(exc))
                tried.add(server.url)
            except AdapterRejected as exc:
                raise RequestRejected(str(exc)) from None
            finally:
                server.in_flight -= 1

    async def _base_model(self, server: _Server) -> str:
        if self.settings.model:
            return self.settings.model
        if server.model is None:
            await self._probe(server)
            if server.model is None:
                raise _ServerDown(server.error or "no model listed")
        return server.model

    async def _stream(self, server: _Server, body: dict[str, Any], reply: _Reply) -> None:
        try:
            async with self._session.post(f"{server.url}/v1/completions", json=body) as resp:
                if resp.status != 200:
                    raise classify(resp.status, error_message(await resp.text()))
                async for event in sse_events(resp.content):
                    if "error" in event:  # an error after the stream began
                        error = event["error"] if isinstance(event["error"], dict) else {}
                        raise classify(int(error.get("code") or 500), error_message(json.dumps(event)))
                    for choice in event.get("choices") or []:
                        reply.feed(choice.get("token_ids") or [])
                        if choice.get("finish_reason"):
                            reply.server_finished(str(choice["finish_reason"]))
                    if event.get("usage"):
                        reply.usage(event["usage"])
                    if reply.text.finish is not None:
                        # Ended here (stop text, loop guard): closing the connection aborts it in vLLM.
                        resp.close()
                        return
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _ServerDown(_describe(exc)) from None
        if reply.finish is None:
            raise _ServerDown("the reply stream ended before the reply did")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

"""A loopback fake of vLLM's OpenAI-compatible API, for the fault cases real vLLM cannot be made to show.

It serves `GET /v1/models`, `POST /v1/completions` (token ids in, a streamed reply with `token_ids` out),
`POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter` with vLLM's status codes and error bodies.
A reply is the text `"<model> answers <n> tokens"` (or what `script(body)` returns) tokenized with the
test's tokenizer, then the first stop id. Faults are switches: `fail_next` (HTTP statuses for the next
completions), `stall` (seconds before the first event), `forget()` (a restart: adapters gone), `stop()` /
`start()` (the port closes). `hold(body)` = n: the stream pauses after its n-th token until `release`
is set or the client hangs up. `in_flight` / `most_in_flight` count completions being streamed; `log`
records ("start", max_tokens) and ("end", max_tokens) of each, in order, and `hung_up` how many streams
the client closed before their end.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

BASE = "fake-base"


def _error(status: int, message: str, kind: str) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return web.json_response(body, status=status)


@dataclass
class FakeVllm:
    tokenizer: Any
    port: int = 0
    adapters: dict[str, str] = field(default_factory=dict)  # name -> path
    loads: list[str] = field(default_factory=list)
    unloads: list[str] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)  # completion bodies
    fail_next: list[int] = field(default_factory=list)
    stall: float = 0.0
    refuse_paths: set[str] = field(default_factory=set)
    script: Callable[[dict[str, Any]], str] | None = None
    hold: Callable[[dict[str, Any]], int | None] | None = None
    release: asyncio.Event = field(default_factory=asyncio.Event)
    in_flight: int = 0
    most_in_flight: int = 0
    log: list[tuple[str, int]] = field(default_factory=list)
    hung_up: int = 0
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/load_lora_adapter", self._load)
        app.router.add_post("/v1/unload_lora_adapter", self._unload)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        self.release.set()  # no stream waits for a test that has ended
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def forget(self) -> None:
        """What a restart does to the server's state."""
        self.adapters.clear()

    def reply_ids(self, model: str, max_tokens: int) -> list[int]:
        text = f"{model} answers {max_tokens} tokens"
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    async def _models(self, request: web.Request) -> web.Response:
        data = [{"id": BASE, "object": "model", "parent": None, "max_model_len": 4096}]
        data += [{"id": name, "object": "model", "parent": BASE} for name in self.adapters]
        return web.json_response({"object": "list", "data": data})

    async def _load(self, request: web.Request) -> web.Response:
        body = await request.json()
        name, path = body["lora_name"], body["lora_path"]
        if name in self.adapters:
            return _error(400, f"The lora adapter '{name}' has already been loaded.", "InvalidUserInput")
        if path in self.refuse_paths:
            return _error(404, f"Loading lora {name} failed: No adapter found for {path}", "NotFoundError")
        self.adapters[name] = path
        self.loads.append(name)
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def _unload(self, request: web.Request) -> web.Response:
        name = (await request.json())["lora_name"]
        if name not in self.adapters:
            return _error(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
        del self.adapters[name]
        self.unloads.append(name)
        return web.Response(text="Success")

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        if self.fail_next:
            status = self.fail_next.pop(0)
            return _error(status, f"fake failure {status}", "InternalServerError")
        model = body["model"]
        if model != BASE and model not in self.adapters:
            return _error(404, f"The model `{model}` does not exist.", "NotFoundError")
        if not all(isinstance(t, int) for t in body["prompt"]):
            return _error(400, "prompt must be token ids", "BadRequestError")
        if self.stall:
            await asyncio.sleep(self.stall)
        if self.script is not None:
            ids = list(self.tokenizer(self.script(body), add_special_tokens=False)["input_ids"])
        else:
            ids = self.reply_ids(model, body["max_tokens"])
        ids = ids[: body["max_tokens"]]
        finish = "length"
        if len(ids) < body["max_tokens"] and body["stop_token_ids"]:
            ids.append(body["stop_token_ids"][0])  # vLLM includes the stop id in token_ids
            finish = "stop"
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        self.log.append(("start", body["max_tokens"]))
        try:
            for n, token in enumerate(ids):
                choice = {"index": 0, "text": "", "token_ids": [token], "finish_reason": None}
                if n == 0:
                    choice["prompt_token_ids"] = body["prompt"]
                if n == len(ids) - 1:
                    choice["finish_reason"] = finish
                await response.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
                await asyncio.sleep(0)
                if self.hold is not None and self.hold(body) == n + 1:
                    while not self.release.is_set():
                        if request.transport is None or request.transport.is_closing():
                            raise ConnectionResetError("the client hung up")
                        await asyncio.sleep(0.01)
            usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": len(ids)}
            await response.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionResetError:
            self.hung_up += 1  # the client ended the reply itself
        finally:
            self.in_flight -= 1
            self.log.append(("end", body["max_tokens"]))
        return response

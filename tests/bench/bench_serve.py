"""Benchmark: the OpenAI-compatible API under load, with an instant backend.

    .venv/bin/python tests/bench/bench_serve.py [--clients 50] [--seconds 30] [--db sqlite|postgresql]

A real `personabot serve` (store, queue, worker, outbox, `api` adapter) runs in a child process with the
scripted test backend, which answers at once: what is measured is what personabot adds to a request.
`--clients` official `openai` clients, each with its own connection, send requests back to back for
`--seconds`; every client keeps its own conversation (the `user` field), sending the whole history each
time as OpenAI clients do, and starts a new one every 8 turns; every other client streams.

Prints requests/s, the added latency p50 and p99 (request sent to reply complete), errors (any
exception or a reply other than the expected echo), and the server process's CPU time per request (the
number to compare on a busy machine, where latency mostly measures the other processes). Exits 1 when
there was an error.
PostgreSQL needs PERSONABOT_TEST_POSTGRES_URL (a fresh database per run).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

TURNS_PER_CONVERSATION = 8


async def _serve_child(port_file: Path) -> None:
    """The server side: `personabot serve` on a free port with the scripted backend."""
    import logging

    from bot.config import load_settings
    from bot.serve import keys
    from bot.serve.server import serve
    from bot.store import Store
    from tests.fakes.backend import ScriptedBackend

    logging.disable(logging.WARNING)  # the untrained-persona hints are not the bench's business
    settings = load_settings(serve={"port": 0})
    store = Store(settings.resolved_database_url)
    await store.upgrade()
    _, secret = await keys.create(store, "bench", rate_per_minute=0)
    await store.close()

    def ready(port: int) -> None:
        port_file.write_text(f"{port} {secret}")

    await serve(settings, say=lambda _line: None, on_ready=ready, backend=ScriptedBackend())


async def _client(
    url: str, secret: str, n: int, until: float, latencies: list[float], errors: list[str]
) -> None:
    import openai

    stream = n % 2 == 1
    async with openai.AsyncOpenAI(base_url=url, api_key=secret, max_retries=0, timeout=60) as client:
        conversation, turn, history = 0, 0, []
        while time.monotonic() < until:
            if turn == TURNS_PER_CONVERSATION:
                conversation, turn, history = conversation + 1, 0, []
            text = f"client {n} turn {turn}"
            messages = [*history, {"role": "user", "content": text}]
            started = time.perf_counter()
            try:
                if stream:
                    chunks = await client.chat.completions.create(
                        model="assistant", messages=messages, user=f"c{n}-{conversation}", stream=True
                    )
                    reply = "".join([c.choices[0].delta.content or "" async for c in chunks])
                else:
                    done = await client.chat.completions.create(
                        model="assistant", messages=messages, user=f"c{n}-{conversation}"
                    )
                    reply = done.choices[0].message.content or ""
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            latencies.append(time.perf_counter() - started)
            if reply != f"echo -> {text}":
                errors.append(f"client {n}: unexpected reply {reply!r}")
            history = [*messages, {"role": "assistant", "content": reply}]
            turn += 1


async def _drive(
    url: str, secret: str, clients: int, seconds: float
) -> tuple[int, list[float], list[str], float]:
    import openai  # noqa: F401  (imported before the clock starts: it takes seconds)

    latencies: list[float] = []
    errors: list[str] = []
    started = time.monotonic()
    until = started + seconds
    await asyncio.gather(*(_client(url, secret, n, until, latencies, errors) for n in range(clients)))
    return len(latencies), latencies, errors, time.monotonic() - started


def _database(kind: str, data_dir: Path) -> tuple[str, object]:
    if kind == "sqlite":
        return f"sqlite:///{data_dir / 'bench.db'}", None
    from tests.conftest import POSTGRES_URL_ENV, PostgresDatabases

    admin = os.environ.get(POSTGRES_URL_ENV)
    if not admin:
        raise SystemExit(f"--db postgresql needs {POSTGRES_URL_ENV}")
    dbs = PostgresDatabases(admin)
    return asyncio.run(dbs.create()), dbs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--serve-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_child is not None:
        asyncio.run(_serve_child(args.serve_child))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        data = Path(tmp)
        url, dbs = _database(args.db, data)
        env = {
            **os.environ,
            "PERSONABOT_DATA_DIR": str(data),
            "PERSONABOT_DATABASE_URL": url,
            "NO_PROXY": "127.0.0.1,localhost",
        }
        port_file = data / "port"
        child = subprocess.Popen(
            [sys.executable, __file__, "--serve-child", str(port_file)], env=env, cwd=ROOT
        )
        try:
            deadline = time.monotonic() + 120
            while not port_file.exists() or not port_file.read_text():
                if child.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the server did not start")
                time.sleep(0.1)
            os.environ["NO_PROXY"] = "127.0.0.1,localhost"
            port, secret = port_file.read_text().split()
            base = f"http://127.0.0.1:{port}/v1"
            server = psutil.Process(child.pid)
            cpu_before = sum(server.cpu_times()[:2])
            count, latencies, errors, took = asyncio.run(_drive(base, secret, args.clients, args.seconds))
            server_cpu = sum(server.cpu_times()[:2]) - cpu_before
        finally:
            child.terminate()
            child.wait(timeout=60)
            if dbs is not None:
                asyncio.run(dbs.drop(url))  # type: ignore[attr-defined]
    ms = sorted(x * 1000 for x in latencies)
    p50 = statistics.median(ms) if ms else float("nan")
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))] if ms else float("nan")
    print(
        f"serve bench ({args.db}, {args.clients} clients, {args.seconds:g} s): {count} requests, "
        f"{count / took:.1f} requests/s, added latency p50 {p50:.1f} ms, p99 {p99:.1f} ms, errors {len(errors)}; "
        f"server CPU {1000 * server_cpu / max(count, 1):.1f} ms/request"
    )
    for error in errors[:5]:
        print(f"  error: {error}")
    return 1 if errors or not count else 0


if __name__ == "__main__":
    raise SystemExit(main())

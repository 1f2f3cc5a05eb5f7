"""The batched decode loop: many prompts, many LoRA adapters, one forward pass per step.

One `generate` call runs a whole batch:

1. **Cache lookup.** Each row takes its channel's cached keys/values when its new prompt shares a
   prefix with the cached ids; only the rest (`new` tokens) needs a prefill.
2. **Layout.** Every row is right-aligned to one column `E` (the longest prompt), so row i occupies
   columns `[E - len_i, E)` of a preallocated `BatchKV` and decoding appends column `E + t` to all rows.
3. **Grouped prefill.** Rows are sorted by new-token count and prefilled in groups (a forward over a
   slice of the rows), chosen by a small dynamic programme that trades padding against passes over
   the weights. A row whose new part is shorter than its group's re-computes a few cached tokens in
   place of padding, so a cached row and a cold row can share one pass without breaking the layout.
   Long prompts are prefilled in chunks of `prefill_chunk` tokens, which bounds activation memory.
   Within a group each adapter's rows sit side by side (and again in the whole batch for decode), so
   LoRA deltas are added without gathering rows where the adapters have as many rows each.
4. **Decode.** One forward per step for all rows, each with its own adapter (`MultiLora`), sampling
   settings, stop ids and stop texts. The loop guard (`bot.generation.guard`) ends a row whose text
   starts repeating itself, at the last complete sentence before the loop. A row that stops hands its result and its keys/values (to the channel LRU)
   over at once; finished rows are dropped from the batch when they are a quarter of it.

Masks and positions are built here and passed to the model as a 4D boolean mask, so padding never
shifts positions and a padded row computes exactly what it computes alone. A Llama model runs through
`LeanLlamaForward` (the same maths in fewer tensor ops, `lean=False` turns it off); there, a forward
with no padded row and no cached prefix passes no mask at all (plain causal attention), and the decode
mask is built once per batch and sliced per step.
"""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from bot.generation.base import GenerationCallbacks, GenerationCancelled, GenerationRequest, GenerationResult
from bot.generation.guard import ReplyText
from bot.generation.kvcache import BatchKV, ChannelKV, KVCacheLRU, common_prefix
from bot.generation.leanforward import LeanLlamaForward, unsupported_reason
from bot.generation.lora import MultiLora
from bot.generation.sampling import BatchSampler

log = logging.getLogger(__name__)


@dataclass
class _Row:
    index: int  # position in the caller's request list
    request: GenerationRequest
    ids: list[int]
    reused: int = 0  # prompt tokens whose keys/values came from the channel cache
    entry: ChannelKV | None = None
    start: int = 0  # first column of the row in the batch cache
    max_new: int = 0
    out: list[int] = field(default_factory=list)
    done: bool = False
    finish: str = "length"
    first_token: float | None = None
    text: ReplyText | None = None  # the reply's text, ended by a stop text or the loop guard
    result: GenerationResult | None = None

    @property
    def new(self) -> int:
        return len(self.ids) - self.reused


def plan_prefill_groups(new_counts: list[int], overhead_tokens: int) -> list[tuple[int, int]]:
    """Split rows sorted by descending new-token count into contiguous prefill groups.

    A group `[a, b)` costs `overhead_tokens` (one pass over the weights, in token equivalents) plus
    `(b - a) * new_counts[a]` token computations (every row padded to the group's longest). Returns the
    cheapest partition.
    """
    n = len(new_counts)
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for b in range(1, n + 1):
        for a in range(b):
            cost = best[a] + overhead_tokens + (b - a) * new_counts[a]
            if cost < best[b]:
                best[b], cut[b] = cost, a
    groups = []
    b = n
    while b > 0:
        groups.append((cut[b], b))
        b = cut[b]
    return groups[::-1]


class BatchEngine:
    """Runs batches of generation requests on one Hugging Face causal LM with `MultiLora` adapters."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        lora: MultiLora | None = None,
        kv: KVCacheLRU | None = None,
        prefill_overhead_tokens: int = 16,
        prefill_chunk: int = 512,
        pad_id: int = 0,
        lean: bool = True,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.lora = lora
        self.kv = kv if kv is not None else KVCacheLRU(0)
        self.prefill_overhead_tokens = prefill_overhead_tokens
        self.prefill_chunk = prefill_chunk
        self.pad_id = pad_id
        params = next(model.parameters())
        self.device, self.dtype = params.device, params.dtype
        self.context_window = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
        head = model.get_output_embeddings()
        self.vocab_size = int(getattr(head, "out_features", 0) or head.weight.shape[0])
        # transformers 5 renamed `past_key_values` to `cache`; pass whichever this model takes.
        names = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in names else "past_key_values"
        self._lean: LeanLlamaForward | None = None
        if lean:
            reason = unsupported_reason(model)
            if reason is None:
                self._lean = LeanLlamaForward(model)
            else:
                log.info("transformers' forward for this model (the lean forward: %s)", reason)

    def compile_decode(self) -> bool:
        """Run batch-1 decode steps as one compiled step (`bot.generation.compiled`), compiling it now;
        False (logged) where this model cannot have one."""
        from bot.generation.compiled import compile_decode

        if self._lean is None:
            log.warning("model.compile: batch-1 decode stays eager: transformers' forward runs this model")
            return False
        self._lean.compiled = compile_decode(self._lean)
        return self._lean.compiled is not None

    # -- one forward pass ---------------------------------------------------------------------------

    def _forward(
        self, cache: BatchKV, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Next-token logits `[rows, vocab]`; `mask` None means plain causal attention (lean path only)."""
        if self._lean is not None:
            return self._lean(cache, ids, positions, mask)
        assert mask is not None
        out = self.model(
            input_ids=ids,
            position_ids=positions,
            attention_mask=mask,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_arg: cache},
        )
        return out.logits[:, -1, :]

    # -- the batch ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(
        self, requests: list[GenerationRequest], callbacks: GenerationCallbacks | None = None
    ) -> list[GenerationResult]:
        callbacks = callbacks or GenerationCallbacks()
        if not requests:
            return []
        started = time.perf_counter()
        rows = [self._row(i, r) for i, r in enumerate(requests)]
        try:
            return self._run(rows, callbacks, started)
        finally:
            if self.lora is not None:
                self.lora.deactivate()

    def _row(self, index: int, request: GenerationRequest) -> _Row:
        if not request.prompt_ids:
            raise ValueError(f"request {index}: empty prompt")
        row = _Row(index, request, list(request.prompt_ids))
        row.max_new = request.sampling.max_new_tokens
        if self.context_window is not None:
            room = self.context_window - len(row.ids)
            if room < 1:
                raise ValueError(
                    f"request {index}: prompt of {len(row.ids)} tokens fills the {self.context_window}-token context"
                )
            row.max_new = min(row.max_new, room)
        row.text = ReplyText(self.tokenizer, request.stop_texts, loop_guard=request.loop_guard)
        key = self._cache_key(request)
        if key is not None:
            entry = self.kv.take(key)
            if entry is not None:
                # Reuse the shared prefix; at least one prompt token is run to get the next logits.
                shared = min(common_prefix(entry.ids, row.ids), len(row.ids) - 1)
                if shared > 0:
                    row.entry, row.reused = entry, shared
        return row

    @staticmethod
    def _cache_key(request: GenerationRequest) -> str | None:
        # The adapter is part of the key: another adapter's keys/values are never reused.
        if request.cache_key is None:
            return None
        return f"{request.cache_key}|{request.adapter or ''}"

    def _run(
        self, rows: list[_Row], callbacks: GenerationCallbacks, started: float
    ) -> list[GenerationResult]:
        # Sort by new-token count so that prefill groups are contiguous slices of the batch; within a
        # group, each adapter's rows side by side, so that a group holding as many rows of each adapter
        # prefills without gathering rows, and decode needs no reordering when there is one group.
        rows.sort(key=lambda r: -r.new)
        groups = plan_prefill_groups([r.new for r in rows], self.prefill_overhead_tokens)
        for a, b in groups:
            rows[a:b] = [rows[a + i] for i in _adapter_sorted([r.request.adapter for r in rows[a:b]])]
        end = max(len(r.ids) for r in rows)
        capacity = end + max(r.max_new for r in rows)
        cache = BatchKV(len(rows), capacity, device=self.device, dtype=self.dtype)
        for i, row in enumerate(rows):
            row.start = end - len(row.ids)
            if row.entry is not None:
                cache.load_row(i, row.start, row.entry, row.reused)
                row.entry = None
        if self.lora is not None:
            self.lora.activate([r.request.adapter for r in rows])
        elif any(r.request.adapter for r in rows):
            raise ValueError("this engine has no LoRA support, but a request names an adapter")
        sampler = BatchSampler(
            [r.request.sampling for r in rows],
            [r.request.seed for r in rows],
            [r.ids for r in rows],
            self.vocab_size,
            self.device,
        )
        logits = self._prefill(cache, rows, groups, end)
        prefill_s = time.perf_counter() - started
        live = list(rows)  # rows still in the batch (finished ones leave at compaction)
        order = adapter_order([r.request.adapter for r in live])
        if order is not None:
            # Decode with each adapter's rows side by side: with as many rows per adapter, the LoRA
            # deltas are added without gathering and scattering rows (`lora._Plan.grouped`).
            index = self._keep_rows(order, cache, sampler)
            live = [live[i] for i in order]
            logits = logits.index_select(0, index)
        starts = torch.tensor([r.start for r in live], device=self.device)
        masks = self._decode_masks(starts, capacity)
        step = 0
        while True:
            tokens = sampler(logits).tolist()
            now = time.perf_counter()
            for i, row in enumerate(live):
                if not row.done:
                    self._advance(row, tokens[i], now, started, callbacks)
                    if row.done:
                        self._finish(row, cache, i, end + step, started, prefill_s, callbacks)
            sampler.observe(torch.tensor(tokens, device=self.device))
            remaining = [i for i, r in enumerate(live) if not r.done]
            if not remaining:
                break
            if callbacks.should_stop is not None and callbacks.should_stop():
                raise GenerationCancelled(f"stopped with {len(remaining)} of {len(rows)} replies unfinished")
            if (len(live) - len(remaining)) * 4 >= len(live):
                index = self._keep_rows(remaining, cache, sampler)
                live = [live[i] for i in remaining]
                starts = starts.index_select(0, index)
                masks = self._decode_masks(starts, capacity)
                tokens = [tokens[i] for i in remaining]
            column = end + step
            cache.active, cache.start = slice(None), column
            ids = torch.tensor(tokens, device=self.device).view(-1, 1)
            positions = (column - starts).view(-1, 1)
            mask = None if masks is None else masks[..., : column + 1]
            logits = self._forward(cache, ids, positions, mask)
            step += 1
        results = [r.result for r in sorted(rows, key=lambda r: r.index)]
        done = [r for r in results if r is not None]
        assert len(done) == len(results), "a row ended without a result"
        return done

    def _keep_rows(self, order: list[int], cache: BatchKV, sampler: BatchSampler) -> torch.Tensor:
        """Keep the batch's rows `order` (finished rows leave, or the rows are reordered): current row i
        becomes old row `order[i]` in the cache, the LoRA plans and the sampler; returns `order` as an
        index tensor."""
        index = torch.tensor(order, device=self.device)
        cache.keep_rows(index)
        if self.lora is not None:
            self.lora.keep_rows(index)
        sampler.keep_rows(order)
        return index

    def _decode_masks(self, starts: torch.Tensor, capacity: int) -> torch.Tensor | None:
        """Every decode step's mask `[rows, 1, 1, capacity]` (a step slices its columns); None: no padding."""
        if self._lean is not None and not bool(starts.any()):
            return None
        columns = torch.arange(capacity, device=self.device)
        return (columns[None, :] >= starts[:, None]).view(len(starts), 1, 1, capacity)

    def _prefill(
        self, cache: BatchKV, rows: list[_Row], groups: list[tuple[int, int]], end: int
    ) -> torch.Tensor:
        """Run every row's uncached tokens, a forward per group of rows `[a, b)` padded to the group's
        longest; returns each row's next-token logits `[rows, vocab]`."""
        parts = []
        for a, b in groups:
            width = max(r.new for r in rows[a:b])
            ids = torch.full((b - a, width), self.pad_id, dtype=torch.long)
            positions = torch.zeros((b - a, width), dtype=torch.long)
            for j, row in enumerate(rows[a:b]):
                take = min(width, len(row.ids))
                ids[j, width - take :] = torch.tensor(row.ids[len(row.ids) - take :])
                positions[j, width - take :] = torch.arange(len(row.ids) - take, len(row.ids))
            ids, positions = ids.to(self.device), positions.to(self.device)
            starts = torch.tensor([r.start for r in rows[a:b]], device=self.device)
            if self.lora is not None:
                self.lora.select_rows(slice(a, b))
            # Long prompts go in chunks: activations and the mask stay bounded by the chunk size.
            first = end - width
            for c0 in range(0, width, self.prefill_chunk):
                c1 = min(width, c0 + self.prefill_chunk)
                cache.active, cache.start = slice(a, b), first + c0
                if self._lean is not None and first + c0 == 0 and not bool(starts.any()):
                    # No padding and no earlier columns: plain causal attention, no mask to build.
                    logits = self._forward(cache, ids[:, c0:c1], positions[:, c0:c1], None)
                    continue
                query_cols = torch.arange(first + c0, first + c1, device=self.device)
                key_cols = torch.arange(first + c1, device=self.device)
                causal = key_cols[None, :] <= query_cols[:, None]  # [chunk, keys]
                valid = key_cols[None, :] >= starts[:, None]  # [rows, keys]
                # A padding query sees only itself, so no attention row is empty (no NaNs in its keys).
                own = key_cols[None, :] == query_cols[:, None]
                mask = (causal[None] & valid[:, None, :]) | own[None]
                logits = self._forward(cache, ids[:, c0:c1], positions[:, c0:c1], mask.unsqueeze(1))
            parts.append(logits)
        if self.lora is not None:
            self.lora.select_rows(slice(None))
        return torch.cat(parts, dim=0)

    def _advance(
        self, row: _Row, token: int, now: float, started: float, callbacks: GenerationCallbacks
    ) -> None:
        if row.first_token is None:
            row.first_token = now - started
            if callbacks.on_first_token is not None:
                callbacks.on_first_token(row.index)
        if token in row.request.stop_ids:
            row.done, row.finish = True, "stop"
            return
        row.out.append(token)
        assert row.text is not None
        text = row.text.add(token)
        if text is None:  # a stop text or the loop guard ended it
            assert row.text.finish is not None
            row.done, row.finish = True, row.text.finish
            return
        if callbacks.on_text is not None:
            callbacks.on_text(row.index, text.lstrip())
        if len(row.out) >= row.max_new:
            row.done, row.finish = True, "length"

    def _finish(
        self,
        row: _Row,
        cache: BatchKV,
        batch_row: int,
        column: int,
        started: float,
        prefill_s: float,
        callbacks: GenerationCallbacks,
    ) -> None:
        # Columns up to `column` (exclusive) hold the prompt and every reply token fed so far; the
        # token sampled last (a stop token, or the final one at the length limit) was never fed.
        key = self._cache_key(row.request)
        if key is not None and self.kv.budget_bytes > 0:
            fed = column - row.start
            keys, values = cache.extract_row(batch_row, row.start, column)
            self.kv.put(ChannelKV(key, (row.ids + row.out)[:fed], keys, values))
        assert row.text is not None
        if row.text.cut is not None:
            text = row.text.cut.strip()
        else:
            text = self.tokenizer.decode(row.out, skip_special_tokens=True).strip()
        row.result = GenerationResult(
            token_ids=list(row.out),
            text=text,
            finish_reason=row.finish,
            prompt_tokens=len(row.ids),
            cached_tokens=row.reused,
            timings={
                "first_token": row.first_token or 0.0,
                "prefill": prefill_s,
                "total": time.perf_counter() - started,
            },
        )
        if callbacks.on_finish is not None:
            callbacks.on_finish(row.index, row.result)


def _adapter_sorted(adapters: list[str | None]) -> list[int]:
    """The rows' indices, each adapter's rows side by side (by name; base-model rows last), in a stable order."""
    return sorted(range(len(adapters)), key=lambda i: (adapters[i] is None, adapters[i] or ""))


def adapter_order(adapters: list[str | None]) -> list[int] | None:
    """The rows reordered so each adapter's rows are side by side, or None when they already are, or
    when only one adapter is used."""
    if len({a for a in adapters if a is not None}) < 2:
        return None
    order = _adapter_sorted(adapters)
    return None if order == list(range(len(adapters))) else order

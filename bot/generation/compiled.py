"""Batch-1 decode as one compiled step (CPU, float32): `model.compile = true`.

One user chatting decodes one token at a time, and on a 135M model most of such a step is not the
arithmetic: the lean forward still runs some 40 tensor ops a layer, each a dispatch through PyTorch,
and its products stream the weights at ~28 GB/s. `CompiledDecode` writes the whole step (30 layers, the
final norm and the output layer) as one function of tensors and gives it to `torch.compile`; inductor
fuses the small ops into a few C++ loops and turns each matrix-vector product, written as a product
and a sum, into one pass over the weight at about the copy rate. (Written as `x @ w.T` it would go to
MKL's matrix-vector product, about 3x slower on one row here.)

- **Only where it pays and fits.** Float32 CPU models whose lean forward keeps dense one-row weights
  (`packed.fuse_one_row`), or int8 weights on the weight-only kernels' layout (`model.weights =
  "int8"` on AVX-512); a one-row, unpadded decode step. Prefill, batches of several rows and every
  other model keep the eager forward.
- **int8.** The step reads the int8 weights and their per-channel scales, converting them in the same
  loop as the product, so it reads a quarter of float32's bytes. Its activations stay float32, where
  the eager weight-only kernel rounds them to bfloat16: the step computes the float32 model whose
  layer weights are the dequantized ones. The output layer is read as int8 too, with its 16 best
  candidates recomputed exactly from the float32 table that a rescored output layer keeps
  (`RescoredTable`), as the eager int8 model's float16 output layer is.
- **LoRA.** A row on a persona's adapter runs the same step with that adapter's A and B for each of
  the seven projections of every layer (zeros where the adapter leaves a projection alone), so there
  are two compiled graphs, with and without an adapter, whatever the adapter's rank.
- **Fewer tensors, fewer checks.** dynamo checks every tensor argument on every call (about 2-3 µs
  each), so the norms are one stacked tensor and the adapter buffers one stacked pair per projection
  name.
- **Cost.** Compiling takes tens of seconds (once per process; inductor caches its kernels on disk,
  so later starts are quicker), and needs a C++ compiler: `warm_up` compiles both graphs when the
  worker starts, and a failure there leaves the eager forward in place with a log line saying why.
- **Results.** The maths is the lean forward's; the sums run in another order, so logits agree to
  float rounding (the one-row kernels already differ from `F.linear` that much), and greedy replies
  matched the eager forward's on SmolLM2-135M (`tests/test_generation_compiled.py`).

The kernels take their thread count when they are compiled, so a compiled step does not follow the
worker's idle-core thread adjustment (`bot.cpu_threads`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from bot.generation.kvcache import BatchKV
from bot.generation.packed import FusedOneRow
from bot.generation.quantized import RESCORE_TOP, int8_weight_only

log = logging.getLogger(__name__)

# One projection's adapter weights, held transposed: A [r, in] and B scaled [out, r]; as the step reads
# them, one pair per projection name with every layer's stacked: A [layers, r, in], B [layers, out, r].
LoraPair = tuple[torch.Tensor, torch.Tensor]
# A product's weight as the step reads it: float32 [out, in], or int8 [out, in] with a float32 scale
# per output channel (`model.weights = "int8"` on the weight-only kernels' layout).
Weight = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class RescoredTable(NamedTuple):
    """An output layer read as int8 with its float32 table kept: the step computes every logit from the
    int8 rows (a quarter of the table's bytes) and recomputes its `RESCORE_TOP` best exactly from the
    table, as the eager int8 model's rescored output layer does with its float16 copy."""

    q: torch.Tensor  # int8 [vocab, hidden]
    scale: torch.Tensor  # float32 [vocab]
    table: torch.Tensor  # float32 [vocab, hidden]


# Inductor options for the step.
# - realize_opcount_threshold 0: store each norm's output once. By default inductor inlines a norm into
#   the product that reads it, recomputing the normalized row (a square root and a division per 16
#   weights) for every output channel: the int8 step took 17 ms instead of 10 on SmolLM2-135M.
# - size_asserts off: the wrapper otherwise checks the sizes and strides of its ~400 tensors on every
#   call (0.4 ms a step), which dynamo's guards have already checked.
_OPTIONS: dict[str, str | int | bool | Callable[..., Any]] = {
    "realize_opcount_threshold": 0,
    "size_asserts": False,
}

# A layer's projections in the order the step reads their LoRA pairs.
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class _Shape:
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    eps: float
    scale: float


def unsupported_reason(lean: Any) -> str | None:
    """Why `lean` (a `LeanLlamaForward`) has no compiled decode step, or None when it can have one."""
    param = next(lean.model.parameters())
    if param.device.type != "cpu" or param.dtype != torch.float32:
        return f"a {param.dtype} model on {param.device.type} (only float32 on the CPU)"
    if lean.fused is None:
        return "the layers keep no dense one-row weights (oneDNN's packed product chosen)"
    for layer, pair in zip(lean.model.model.layers, lean.fused, strict=True):
        own = [_base(m) for m in (layer.self_attn.o_proj, layer.mlp.down_proj)]
        if any(_readable(source) is None for source in (*pair, *own)):
            return "the layers' weights are in a form it cannot read (float16, int4, or fbgemm's int8)"
    if _readable(_base(lean.model.lm_head)) is None:
        return "the output layer keeps no dense weight"
    return None


class CompiledDecode:
    """`(cache, ids, positions) -> logits [1, vocab]` for one unpadded row, one token, compiled."""

    def __init__(self, lean: Any) -> None:
        reason = unsupported_reason(lean)
        if reason is not None:
            raise ValueError(f"no compiled decode step for this model: {reason}")
        self.lean = lean
        inner = lean.model.model
        layers = inner.layers
        self.shape = _Shape(
            layers=len(layers),
            heads=lean.heads,
            kv_heads=lean.kv_heads,
            head_dim=lean.head_dim,
            hidden=lean.hidden,
            intermediate=int(_base(layers[0].mlp.gate_proj).out_features),
            eps=lean.eps,
            scale=float(layers[0].self_attn.scaling),
        )
        # Per layer: the input and post-attention norms' weights, and q|k|v, o, gate|up and down; then
        # the final norm and the output layer. Views of the model's own weights: no copies.
        norms: list[torch.Tensor] = []
        products: list[Weight] = []
        for layer, (qkv, gate_up) in zip(layers, lean.fused, strict=True):
            norms += [layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach()]
            products += [
                _weight(qkv),
                _weight(_base(layer.self_attn.o_proj)),
                _weight(gate_up),
                _weight(_base(layer.mlp.down_proj)),
            ]
        norms.append(inner.norm.weight.detach())
        # one tensor (a 140 KB copy on SmolLM2): one for dynamo to check on every step instead of 61
        self.norms, self.products = torch.stack(norms), products
        self.head = _head(_base(lean.model.lm_head))
        self.projections = [
            getattr(layer.self_attn if name in _PROJECTIONS[:4] else layer.mlp, name)
            for layer in layers
            for name in _PROJECTIONS
        ]
        # The projections a persona's adapter can reach (`MultiLoraLinear`s), by index: read every step.
        self._wrapped = [(i, p) for i, p in enumerate(self.projections) if "plan" in vars(p)]
        # the adapter's A and B as the step reads them, a stacked pair per name in `_PROJECTIONS`
        self._pairs: list[LoraPair] | None = None
        self._sources: list[torch.Tensor | None] | None = None  # the stacks' A they were copied from
        self._step = torch.compile(_make_step(self.shape), dynamic=True, options=_OPTIONS)

    def loras(self) -> tuple[bool, list[LoraPair] | None]:
        """(whether the step covers the row's adapter, and each projection's (A, B scaled) for it, zeros
        where it has none, or None on the base model). Not covered: a plan that is not one adapter on
        the whole row."""
        plans = [p.plan for _, p in self._wrapped]
        if all(plan is None for plan in plans):
            return True, None
        if any(plan is not None and plan.whole is None for plan in plans):
            return False, None
        # A plan's A and B scaled come from one stack: the same A tensor, the same adapter weights.
        sources = [None if plan is None else plan.a for plan in plans]
        if self._sources is None or any(x is not y for x, y in zip(sources, self._sources, strict=True)):
            self._fill(plans)
            self._sources = sources  # kept alive, so identity says the adapter is the same
        return True, self._pairs

    def _fill(self, wrapped_plans: list[Any]) -> None:
        """Copy the adapter's A and B (scaled) into the step's own buffers, padded to one rank."""
        plans: list[Any] = [None] * len(self.projections)
        for (index, _), plan in zip(self._wrapped, wrapped_plans, strict=True):
            plans[index] = plan
        rank = max(int(plan.a.shape[2]) for plan in plans if plan is not None)
        pairs = self._buffers(rank)
        for index, plan in enumerate(plans):
            layer, name = divmod(index, len(_PROJECTIONS))
            a, b = pairs[name][0][layer], pairs[name][1][layer]
            if plan is None:
                a.zero_()
                b.zero_()
                continue
            r = int(plan.a.shape[2])
            a[:r].copy_(plan.a[0].T)
            a[r:].zero_()
            b[:, :r].copy_(plan.b_scaled[0].T)
            b[:, r:].zero_()

    def _buffers(self, rank: int) -> list[LoraPair]:
        """The (A, B) buffers at `rank`, one stacked pair per projection name. The compiled step always
        reads these: torch.compile guards on how its tensors were made (inside inference mode or not) and
        on which of them alias, and the adapters' own tensors differ in both from batch to batch. Stacked,
        they are 14 tensors for dynamo to check on every step instead of 14 a layer."""
        if self._pairs is None or int(self._pairs[0][0].shape[1]) != rank:
            layers = self.shape.layers
            with torch.inference_mode(False):
                self._pairs = [
                    (
                        torch.zeros(layers, rank, _base(p).in_features),
                        torch.zeros(layers, _base(p).out_features, rank),
                    )
                    for p in self.projections[: len(_PROJECTIONS)]
                ]
            self._sources = None
        return self._pairs

    def covers(self, cache: BatchKV, ids: torch.Tensor, mask: torch.Tensor | None) -> bool:
        """Whether this forward is a step it runs: one row, one token, no padding mask."""
        # Not the step that fills the cache's last column: its keys would be the whole buffer, a
        # contiguous tensor, for which torch.compile would compile another graph.
        return ids.numel() == 1 and mask is None and cache.rows == 1 and 0 < cache.start < cache.capacity - 1

    def __call__(
        self, cache: BatchKV, ids: torch.Tensor, positions: torch.Tensor, loras: list[LoraPair] | None
    ) -> torch.Tensor:
        lean, shape = self.lean, self.shape
        inner = lean.model.model
        x = inner.embed_tokens(ids).view(1, shape.hidden)
        cos, sin = inner.rotary_emb(x, positions)
        cos = cos.view(1, shape.head_dim)
        sin = sin.view(1, shape.head_dim) * lean.sign
        keys, values = [], []
        for index in range(shape.layers):
            k, v = cache._layer(index, shape.kv_heads, shape.head_dim)
            keys.append(k)
            values.append(v)
        return self._step(x, cos, sin, self.norms, self.products, self.head, loras, keys, values, cache.start)

    def warm_up(self) -> float:
        """Compile both graphs (base model, and a row on an adapter) now; returns the seconds it took."""
        started = time.perf_counter()
        shape = self.shape
        # Sizes unlike any of the model's (a KV capacity, a position, a LoRA rank): torch.compile takes
        # sizes 0 and 1 as constants, and two sizes that happen to be equal as equal for good, which
        # would compile another graph for the first reply whose sizes differ.
        capacity, start, rank = 37, 23, 7
        with torch.inference_mode():
            ids = torch.tensor([[0]])
            positions = torch.tensor([[start]])
            for loras in (None, [(a.zero_(), b.zero_()) for a, b in self._buffers(rank)]):
                cache = BatchKV(1, capacity, device=torch.device("cpu"), dtype=torch.float32)
                cache.start = start
                self(cache, ids, positions, loras)
                assert cache.keys[shape.layers - 1] is not None
        return time.perf_counter() - started


def _make_step(shape: _Shape) -> Callable[..., torch.Tensor]:
    heads, kv_heads, dim = shape.heads, shape.kv_heads, shape.head_dim
    hidden, intermediate, eps = shape.hidden, shape.intermediate, shape.eps
    groups, half, qk_width = heads // kv_heads, dim // 2, (heads + kv_heads) * dim

    def product(x: torch.Tensor, w: Weight) -> torch.Tensor:
        # [1, K] x [N, K] -> [1, N] as a product and a sum: one fused pass over w once compiled (int8
        # converted in the same loop, so it reads a quarter of the bytes).
        if isinstance(w, tuple):
            return ((w[0].to(torch.float32) * x).sum(-1) * w[1]).unsqueeze(0)
        return (w * x).sum(-1).unsqueeze(0)

    def delta(x: torch.Tensor, pairs: Sequence[LoraPair], name: int, layer: int) -> torch.Tensor:
        # x [1, in] @ A [in, r] @ B [r, out], as products and sums too: fused loops, not 2 calls to MKL.
        # Both are held transposed, so each sum runs along contiguous memory, as the products' do.
        low = (pairs[name][0][layer] * x).sum(-1)
        return (pairs[name][1][layer] * low).sum(-1).unsqueeze(0)

    def step(
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        norms: torch.Tensor,
        products: Sequence[Weight],
        head: Weight | RescoredTable,
        loras: Sequence[LoraPair] | None,
        keys: Sequence[torch.Tensor],
        values: Sequence[torch.Tensor],
        start: int,
    ) -> torch.Tensor:
        for i in range(shape.layers):
            norm1, norm2 = norms[2 * i], norms[2 * i + 1]
            w_qkv, w_o, w_gate_up, w_down = products[4 * i : 4 * i + 4]
            h = torch.rms_norm(x, (hidden,), norm1, eps)
            qkv = product(h, w_qkv)
            if loras is not None:
                qkv = qkv + torch.cat([delta(h, loras, name, i) for name in (0, 1, 2)], -1)
            qk = qkv[:, :qk_width].view(heads + kv_heads, dim)
            qk = qk * cos + qk.roll(half, -1) * sin  # the rotary embedding, as the lean forward's
            q = qk[:heads].view(1, kv_heads, groups, dim)  # a KV head's query heads as its rows
            k = qk[heads:].view(1, kv_heads, 1, dim)
            v = qkv[:, qk_width:].view(1, kv_heads, 1, dim)
            keys[i][:, :, start : start + 1] = k
            values[i][:, :, start : start + 1] = v
            # One query per KV head's group: two small products and a fused softmax. SDPA's CPU kernel
            # cost 0.3-0.4 ms more a step on SmolLM2 (30 calls of ~35 µs; measured side by side).
            k_seen, v_seen = keys[i][:, :, : start + 1], values[i][:, :, : start + 1]
            probs = (torch.matmul(q, k_seen.transpose(-1, -2)) * shape.scale).softmax(-1)
            attended = torch.matmul(probs, v_seen).reshape(1, heads * dim)
            out = product(attended, w_o)
            if loras is not None:
                out = out + delta(attended, loras, 3, i)
            x = x + out
            h = torch.rms_norm(x, (hidden,), norm2, eps)
            gate_up = product(h, w_gate_up)
            if loras is not None:
                gate_up = gate_up + torch.cat([delta(h, loras, 4, i), delta(h, loras, 5, i)], -1)
            gated = F.silu(gate_up[:, :intermediate]) * gate_up[:, intermediate:]
            out = product(gated, w_down)
            if loras is not None:
                out = out + delta(gated, loras, 6, i)
            x = x + out
        x = torch.rms_norm(x, (hidden,), norms[-1], eps)
        if isinstance(head, RescoredTable):
            logits = product(x, (head.q, head.scale))
            top = logits.topk(RESCORE_TOP, -1).indices
            exact = (head.table[top[0]] * x).sum(-1)
            return logits.scatter(-1, top, exact.unsqueeze(0))
        return product(x, head)

    return step


def _base(projection: Any) -> Any:
    """The base linear of a projection (a LoRA wrapper's `base`, or the projection itself). The lean
    forward has the same helper; it imports this module, so this one cannot import it back."""
    return getattr(projection, "base", projection)


def _readable(source: Any) -> Weight | None:
    """A product's weight as the step can read it: a float32 one-row copy (a fused one's, or a
    linear's) or plain weight, int8 with its scales (weight-only kernels' layout), or, for an output
    layer held rounded, its float32 table. `source` is a linear, a `FusedOneRow`, or siblings quantized
    as one (`shared`)."""
    if isinstance(source, FusedOneRow):
        return source.weight
    linear = getattr(source, "shared", source)
    table = getattr(linear, "table", None)
    if isinstance(table, torch.Tensor):
        # the float32 table a rescored output layer keeps (the step takes no output bias)
        return table if getattr(linear, "table_bias", None) is None else None
    kernel, fmt = getattr(linear, "kernel", None), getattr(linear, "fmt", None)
    if kernel is not None:
        if kernel == "weight-only" and fmt == "int8" and getattr(linear, "bias", None) is None:
            return linear.qweight, linear.qscale
        return None
    row = getattr(linear, "row_weight", None)
    if row is not None:
        return row
    weight = getattr(linear, "weight", None)
    return weight.detach() if isinstance(weight, torch.Tensor) else None


def _weight(source: Any) -> Weight:
    """The step's argument for a product: `[N, K]` float32, or int8 `[N, K]` with float32 scales."""
    readable = _readable(source)
    assert readable is not None
    if isinstance(readable, tuple):
        q, scale = readable
        return q, scale.float()
    return readable.reshape(-1, readable.shape[-1])


def _head(source: Any) -> Weight | RescoredTable:
    """The step's output layer: a rescored one (the int8 model's, held in float16 with its float32 table)
    as int8 with that table, any other as `_weight` reads it."""
    table = getattr(source, "table", None)
    if not isinstance(table, torch.Tensor):
        return _weight(source)
    q, scale = int8_weight_only(table.float())
    return RescoredTable(q, scale.float(), table)


def compile_decode(lean: Any) -> CompiledDecode | None:
    """A warmed-up compiled decode step for `lean`, or None (logged) where it cannot have one."""
    reason = unsupported_reason(lean)
    if reason is None:
        try:
            compiled = CompiledDecode(lean)
            seconds = compiled.warm_up()
        except Exception as exc:  # no C++ compiler, an inductor limitation: the eager step still works
            reason = (
                f"compiling failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
            )
        else:
            log.info("model.compile: batch-1 decode compiled in %.1fs", seconds)
            return compiled
    log.warning("model.compile: batch-1 decode stays eager: %s", reason)
    return None

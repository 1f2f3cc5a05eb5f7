"""A Llama forward pass written out with few tensor ops: the engine's per-token Python cost, cut.

transformers' Llama forward spends much of a batch-1 decode step outside the matrix products: module
hooks and decorators, mask helpers, a 6-op RMSNorm, an 8-op rotary embedding per tensor, keyword
plumbing. On a 135M model that is ~30% of a CPU decode step. `LeanLlamaForward` runs the same modules'
weights through the same maths with fewer ops:

- RMSNorm is `torch.rms_norm` (bitwise equal to transformers' formula on the CPU, one op instead of six);
- the rotary embedding is `q * cos + roll(q) * sin'` with the sign of `rotate_half` folded into `sin'`
  (bitwise equal: a roll is the same concatenation, and negating a factor is exact);
- attention calls SDPA directly, as transformers' SDPA integration does (query heads packed per KV head
  for one-token decode, `repeat_kv` otherwise), without a mask where no row is padded;
- only the last position reaches the final norm and the output layer;
- a layer's q, k and v run as one product and its gate and up as another, each LoRA delta added to
  its projection's columns of the fused output, and the rotary embedding over q's and k's heads in
  one pass: 4 products per layer instead of 7 and fewer small ops. Float32 packed weights fuse for
  one-row decode (one user chatting), where they keep dense one-row copies (`packed.fuse_one_row`:
  the copies stacked, no extra memory); quantized weights for every shape, where they were
  quantized together (`quantized.QuantizedSlice`). The logits equal the unfused path's (bit for bit
  on the tests' machine).

The projections are the model's own modules (`PackedLinear`, `MultiLoraLinear`), so packing and LoRA
adapters work unchanged. Models it does not cover (another architecture, a non-default attention
implementation) keep transformers' forward; `unsupported_reason` says why.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from bot.generation.compiled import CompiledDecode
from bot.generation.kvcache import BatchKV
from bot.generation.packed import FusedOneRow, fuse_one_row
from bot.generation.quantized import QuantizedSlice

_MODEL_CLASSES = ("LlamaForCausalLM",)


def unsupported_reason(model: Any) -> str | None:
    """Why `LeanLlamaForward` cannot run `model` exactly as transformers would, or None when it can."""
    name = type(model).__name__
    if name not in _MODEL_CLASSES:
        return f"{name} is not a Llama model"
    config = model.config
    if getattr(config, "hidden_act", None) != "silu":
        return f"activation {config.hidden_act!r}"
    if (getattr(config, "pretraining_tp", 1) or 1) != 1:
        return "pretraining_tp > 1"
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return f"attention implementation {getattr(config, '_attn_implementation', None)!r}"
    if type(model.model.norm).__name__ != "LlamaRMSNorm":
        return "a custom norm"
    return None


class LeanLlamaForward:
    """`(cache, ids, positions, mask) -> next-token logits [rows, vocab]` for a Llama model."""

    def __init__(self, model: Any) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"the lean forward does not cover this model: {reason}")
        self.model = model
        config = model.config
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.heads)
        self.hidden = int(config.hidden_size)
        self.eps = float(model.model.norm.variance_epsilon)
        half = self.head_dim // 2
        # rotate_half(x) * sin == roll(x, half) * (sin with its first half negated)
        sign = torch.ones(self.head_dim)
        sign[:half] = -1.0
        self.sign = sign
        self.half = half
        # A layer's q, k, v run as one product and its gate, up as another: 7 products become 4, and
        # the rotary embedding covers q and k in one pass. Float32 packed weights fuse for one-row
        # decode (one user chatting), where they keep dense one-row copies (`packed.fuse_one_row`);
        # quantized weights fuse for every shape where they were quantized together
        # (`quantized.QuantizedSlice`).
        self.fused: list[tuple[Fused, Fused]] | None = []
        self.fused_any_rows = False
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv_group = [_base(attn.q_proj), _base(attn.k_proj), _base(attn.v_proj)]
            gate_up_group = [_base(mlp.gate_proj), _base(mlp.up_proj)]
            qkv: Fused | None = _shared(qkv_group)
            gate_up: Fused | None = _shared(gate_up_group)
            if qkv is not None and gate_up is not None:
                self.fused_any_rows = True
            else:
                qkv, gate_up = fuse_one_row(qkv_group), fuse_one_row(gate_up_group)
            if qkv is None or gate_up is None:
                self.fused = None
                break
            self.fused.append((qkv, gate_up))
        # Batch-1 decode as one compiled step, once `BatchEngine.compile_decode` has made it.
        self.compiled: CompiledDecode | None = None

    def __call__(
        self, cache: BatchKV, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """One forward over `ids` `[rows, steps]`; `mask` `[rows, 1, steps, keys]` (None: causal, no padding)."""
        compiled = self.compiled
        if compiled is not None and compiled.covers(cache, ids, mask):
            runs, loras = compiled.loras()
            if runs:
                return compiled(cache, ids, positions, loras)
        inner = self.model.model
        x = inner.embed_tokens(ids)
        rows, steps = ids.shape
        cos, sin = inner.rotary_emb(x, positions)
        cos = cos.unsqueeze(2)  # [rows, steps, 1, head_dim]: broadcast over the heads of q and k
        sin = (sin * self.sign.to(sin.device, sin.dtype)).unsqueeze(2)
        fused = self.fused if self.fused_any_rows or rows * steps == 1 else None
        groups = self.heads // self.kv_heads
        for index, layer in enumerate(inner.layers):
            qkv_proj, gate_up_proj = (None, None) if fused is None else fused[index]
            attn, mlp = layer.self_attn, layer.mlp
            norm = layer.input_layernorm
            h = torch.rms_norm(x, (self.hidden,), norm.weight, norm.variance_epsilon)
            q, k, v = self._qkv(attn, h, cos, sin, qkv_proj)
            k, v = cache.update(k, v, index)
            x = x + attn.o_proj(self._attend(attn.scaling, q, k, v, mask, groups))
            norm = layer.post_attention_layernorm
            h = torch.rms_norm(x, (self.hidden,), norm.weight, norm.variance_epsilon)
            x = x + mlp.down_proj(_gated(mlp, h, gate_up_proj))
        last = torch.rms_norm(x[:, -1:], (self.hidden,), inner.norm.weight, self.eps)
        return self.model.lm_head(last)[:, -1]

    def _qkv(
        self, attn: Any, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fused: Fused | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q and k with the rotary embedding, and v, `[rows, heads, steps, head_dim]`: from one fused
        product (the rotary embedding then covers q's heads and k's in one pass), or from three."""
        rows, steps = h.shape[:2]
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        if fused is None:
            q = self._rotate(attn.q_proj(h).view(rows, steps, heads, dim), cos, sin)
            k = self._rotate(attn.k_proj(h).view(rows, steps, kv_heads, dim), cos, sin)
            v = attn.v_proj(h).view(rows, steps, kv_heads, dim)
            return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        qkv = fused(h)  # [rows, steps, q | k | v]
        _add_deltas(h, qkv, (attn.q_proj, attn.k_proj, attn.v_proj), fused.sizes)
        qk_width = (heads + kv_heads) * dim
        qk = self._rotate(qkv[..., :qk_width].view(rows, steps, heads + kv_heads, dim), cos, sin)
        v = qkv[..., qk_width:].view(rows, steps, kv_heads, dim)
        return qk[:, :, :heads].transpose(1, 2), qk[:, :, heads:].transpose(1, 2), v.transpose(1, 2)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The rotary embedding of `x` `[rows, steps, heads, head_dim]`."""
        return x * cos + x.roll(self.half, -1) * sin

    def _attend(
        self,
        scale: float,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        groups: int,
    ) -> torch.Tensor:
        rows, _, steps, dim = q.shape
        if steps == 1:
            # One query per row: its heads become the rows of a [kv_heads, groups] block (no repeat_kv).
            packed = q.reshape(rows, self.kv_heads, groups, dim)
            out = F.scaled_dot_product_attention(packed, k, v, mask, scale=scale)
        elif mask is None:
            # Upper-left causal alignment is only right when the keys are exactly these queries.
            assert k.shape[2] == steps, "a causal forward without a mask must cover every key"
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=groups > 1)
        else:
            if groups > 1:
                k = k.repeat_interleave(groups, dim=1)
                v = v.repeat_interleave(groups, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, mask, scale=scale)
        return out.reshape(rows, -1, steps, dim).transpose(1, 2).reshape(rows, steps, -1)


class _SharedProduct:
    """Sibling projections quantized as one matrix (`QuantizedSlice`s of one `QuantizedLinear`): the
    shared product, with each projection's width."""

    def __init__(self, shared: torch.nn.Module, sizes: tuple[int, ...]) -> None:
        self.shared = shared
        self.sizes = sizes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared(x)


Fused = FusedOneRow | _SharedProduct


def _shared(projections: list[Any]) -> _SharedProduct | None:
    """The product that `projections` were quantized together as, in order and whole, or None."""
    if not all(isinstance(p, QuantizedSlice) for p in projections):
        return None
    shared = projections[0].shared
    start = 0
    for p in projections:
        if p.shared is not shared or p.start != start:
            return None
        start += p.out_features
    if start != shared.out_features:
        return None
    return _SharedProduct(shared, tuple(p.out_features for p in projections))


def _gated(mlp: Any, h: torch.Tensor, fused: Fused | None) -> torch.Tensor:
    """`silu(gate(h)) * up(h)`, from one fused product or from two."""
    if fused is None:
        return F.silu(mlp.gate_proj(h)) * mlp.up_proj(h)
    gate_up = fused(h)  # [rows, steps, gate | up]
    _add_deltas(h, gate_up, (mlp.gate_proj, mlp.up_proj), fused.sizes)
    width = fused.sizes[0]
    return F.silu(gate_up[..., :width]) * gate_up[..., width:]


def _base(projection: Any) -> Any:
    """The base linear of a projection (a LoRA wrapper's `base`, or the projection itself)."""
    return getattr(projection, "base", projection)


def _add_deltas(
    h: torch.Tensor, out: torch.Tensor, projections: tuple[Any, ...], sizes: tuple[int, ...]
) -> None:
    """Add the LoRA deltas of the fused `projections` (those wrapped for an adapter) to their columns of
    `out`, in place."""
    start = 0
    for projection, size in zip(projections, sizes, strict=True):
        if getattr(projection, "plan", None) is not None:
            projection.add_delta(h, out[..., start : start + size])
        start += size

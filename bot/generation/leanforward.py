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

    def __call__(
        self, cache: BatchKV, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """One forward over `ids` `[rows, steps]`; `mask` `[rows, 1, steps, keys]` (None: causal, no padding)."""
        inner = self.model.model
        x = inner.embed_tokens(ids)
        rows, steps = ids.shape
        cos, sin = inner.rotary_emb(x, positions)
        cos = cos.unsqueeze(1)  # [rows, 1, steps, head_dim]: broadcast over heads
        sin = (sin * self.sign.to(sin.device, sin.dtype)).unsqueeze(1)
        if self.fused is not None and (self.fused_any_rows or rows * steps == 1):
            return self._fused_forward(cache, x, cos, sin, mask)
        shape = (rows, steps, -1, self.head_dim)
        groups = self.heads // self.kv_heads
        for index, layer in enumerate(inner.layers):
            attn, mlp = layer.self_attn, layer.mlp
            norm = layer.input_layernorm
            h = torch.rms_norm(x, (self.hidden,), norm.weight, norm.variance_epsilon)
            q = attn.q_proj(h).view(shape).transpose(1, 2)
            k = attn.k_proj(h).view(shape).transpose(1, 2)
            v = attn.v_proj(h).view(shape).transpose(1, 2)
            q = q * cos + q.roll(self.half, -1) * sin
            k = k * cos + k.roll(self.half, -1) * sin
            k, v = cache.update(k, v, index)
            x = x + attn.o_proj(self._attend(attn.scaling, q, k, v, mask, groups))
            norm = layer.post_attention_layernorm
            h = torch.rms_norm(x, (self.hidden,), norm.weight, norm.variance_epsilon)
            x = x + mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
        last = torch.rms_norm(x[:, -1:], (self.hidden,), inner.norm.weight, self.eps)
        return self.model.lm_head(last)[:, -1]

    def _fused_forward(
        self, cache: BatchKV, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The forward on the fused products (`self.fused`)."""
        assert self.fused is not None
        inner = self.model.model
        rows, steps = x.shape[:2]
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        q_width, k_width = heads * dim, kv_heads * dim
        cos, sin = cos.transpose(1, 2), sin.transpose(1, 2)  # [rows, steps, 1, dim]: over the heads
        for index, (layer, (qkv_proj, gate_up_proj)) in enumerate(zip(inner.layers, self.fused, strict=True)):
            attn, mlp = layer.self_attn, layer.mlp
            norm = layer.input_layernorm
            h = torch.rms_norm(x, (self.hidden,), norm.weight, norm.variance_epsilon)
            qkv = qkv_proj(h)  # [rows, steps, q | k | v]
            _add_deltas(h, qkv, (attn.q_proj, attn.k_proj, attn.v_proj), qkv_proj.sizes)
            qk = qkv[..., : q_width + k_width].view(rows, steps, heads + kv_heads, dim)
            qk = qk * cos + qk.roll(self.half, -1) * sin  # q's heads and k's in one pass
            q = qk[:, :, :heads].transpose(1, 2)
            k = qk[:, :, heads:].transpose(1, 2)
            v = qkv[..., q_width + k_width :].view(rows, steps, kv_heads, dim).transpose(1, 2)
            k, v = cache.update(k, v, index)
            x = x + attn.o_proj(self._attend(attn.scaling, q, k, v, mask, heads // kv_heads))
            norm = layer.post_attention_layernorm
            h = torch.rms_norm(x, (self.hidden,), norm.weight, norm.variance_epsilon)
            gate_up = gate_up_proj(h)  # [rows, steps, gate | up]
            _add_deltas(h, gate_up, (mlp.gate_proj, mlp.up_proj), gate_up_proj.sizes)
            width = gate_up_proj.sizes[0]
            x = x + mlp.down_proj(F.silu(gate_up[..., :width]) * gate_up[..., width:])
        last = torch.rms_norm(x[:, -1:], (self.hidden,), inner.norm.weight, self.eps)
        return self.model.lm_head(last)[:, -1]

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

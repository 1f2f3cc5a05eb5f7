"""CPU fast path: the base model's linear layers with their weights pre-packed for oneDNN.

`F.linear` on the CPU re-packs the weight matrix into the BLAS kernel's blocked layout on every call.
For a batch of a few rows (decoding 16 replies at once) that packing costs as much as the arithmetic:
on SmolLM2-135M the output layer (49,152 x 576) takes 25 ms for 16 rows plain and 11 ms pre-packed.
Packing once when the model loads makes a 16-row decode step about 1.5x faster; outputs agree with
`F.linear` to float rounding (~1e-6).

The packed copy replaces the layer's weight (memory stays the same), except where the weight is shared
with another module (a tied input embedding), which keeps its dense copy too. Only float32 models on the
CPU are packed, and only where PyTorch was built with oneDNN (x86); elsewhere nothing changes.

One row (batch-1 decode, one user chatting) is the other shape, and there the fastest kernel depends
on the CPU. Over SmolLM2-135M's layers, 2 threads:

| one-row product | 2-core AMD EPYC (AVX-512) | 2-core Intel Xeon (AVX-512, AMX) |
| --- | --- | --- |
| oneDNN's packed product (`packed`) | ~20 GB/s | ~20 GB/s |
| MKL's matrix-vector product, `F.linear` on the dense weight (`dense`) | ~12 GB/s | ~26 GB/s |
| `bmm([P, N/P, K], x as a [K, 1] column with strides (1, K))`, row blocks (`blocks`) | ~28 GB/s | ~10 GB/s |

So `pack_linears` times the three on the model's own weights when it packs them (about half a
second) and uses the fastest for the layers, and again for the output layer, whose best kernel can
differ (packed, 32 GB/s, on that Xeon). All three agree with `F.linear` to float rounding, as the
packed product does. `dense` and `blocks` need the dense weights beside the packed ones, so they are
candidates only where that costs little: the extra bytes at most an eighth of the machine's memory
(~430 MB for SmolLM2-135M). The output layer's weight is the tied embedding's, kept anyway.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Literal, get_args

import psutil
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

OneRow = Literal["packed", "dense", "blocks"]
ONE_ROW_KERNELS: tuple[OneRow, ...] = get_args(OneRow)


class PackedLinear(nn.Linear):
    """An `nn.Linear` whose forward runs oneDNN's linear on a weight packed once; a one-row input runs
    on `one_row`'s kernel (see the module docstring)."""

    row_weight: torch.Tensor | None

    def __init__(
        self,
        linear: nn.Linear,
        *,
        batch_hint: int,
        keep_weight: bool,
        one_row: OneRow = "packed",
        packed: torch.Tensor | None = None,
    ) -> None:
        nn.Module.__init__(self)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach()
        self.packed = (
            packed if packed is not None else torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)
        )
        self.bias = linear.bias
        if keep_weight:
            self.weight = linear.weight
        else:
            self.register_parameter("weight", None)  # the packed copy replaces it
        # The dense weight for one-row inputs: as it is (`dense`), or viewed as row blocks [P, N/P, K]
        # (`blocks`). A buffer, so the memory it keeps shows in `model.buffers()`.
        self.register_buffer("row_weight", _row_weight(weight, one_row), persistent=False)

    @property
    def one_row(self) -> OneRow:
        w = self.row_weight
        return "packed" if w is None else "dense" if w.dim() == 2 else "blocks"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.row_weight
        if w is not None and x.numel() == self.in_features:
            out = one_row_product(x, w)
            return out if self.bias is None else out + self.bias
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def one_row_product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`x @ W.T` for a one-row `x` (`[..., K]`), `w` a dense `[N, K]` weight or its row blocks `[P, N/P, K]`."""
    if w.dim() == 2:
        return F.linear(x, w)
    if not x.is_contiguous():
        x = x.contiguous()
    k = x.shape[-1]
    # x as a [K, 1] column with strides (1, K), the same for every block (stride 0): one view op
    column = x.as_strided((w.shape[0], k, 1), (0, 1, k))
    return torch.bmm(w, column).view(*x.shape[:-1], w.shape[0] * w.shape[1])


class FusedOneRow:
    """The one-row products of sibling projections that read the same input (a layer's q, k and v; its
    gate and up), as one product over their weights stacked: one kernel call instead of three or two,
    and fewer tensor ops around them. `__call__(x)` gives `[..., sum of out_features]`, each
    projection's columns in order; `sizes` gives their widths.

    Built by `fuse_one_row`, which moves the projections' own one-row weights into the stacked one
    (their `row_weight` become views of it), so it costs no memory."""

    def __init__(self, weight: torch.Tensor, sizes: tuple[int, ...]) -> None:
        self.weight = weight  # dense [N, K] or row blocks [P, N/P, K]
        self.sizes = sizes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return one_row_product(x, self.weight)


def fuse_one_row(linears: list[nn.Module]) -> FusedOneRow | None:
    """Stack the one-row weights of `linears` (`PackedLinear`s without bias reading the same input)
    into one `FusedOneRow`; None when they do not all keep one (packed one-row products)."""
    members: list[PackedLinear] = []
    weights: list[torch.Tensor] = []
    for m in linears:
        if not isinstance(m, PackedLinear) or m.bias is not None or m.row_weight is None:
            return None
        members.append(m)
        weights.append(m.row_weight)
    if len({m.in_features for m in members}) != 1:
        return None
    dense = torch.cat(
        [w.reshape(m.out_features, m.in_features) for m, w in zip(members, weights, strict=True)]
    )
    blocks = any(m.one_row == "blocks" for m in members)
    start = 0
    for m in members:
        own = dense[start : start + m.out_features]  # a contiguous run of rows: views, no copies
        m.row_weight = _row_weight(own, m.one_row)
        start += m.out_features
    fused = _row_weight(dense, "blocks" if blocks else "dense")
    assert fused is not None
    return FusedOneRow(fused, tuple(m.out_features for m in members))


def _row_weight(weight: torch.Tensor, one_row: OneRow) -> torch.Tensor | None:
    if one_row == "packed":
        return None
    blocks = one_row_blocks(weight.shape[0]) if one_row == "blocks" else 0
    if not blocks:  # `dense`, or a row count that does not split: the plain matrix-vector product
        return weight
    return weight.view(blocks, weight.shape[0] // blocks, weight.shape[1])


def can_pack(model: nn.Module) -> bool:
    """A float32 model on the CPU, and a PyTorch with a working oneDNN linear."""
    param = next(model.parameters(), None)
    if param is None or param.device.type != "cpu" or param.dtype != torch.float32:
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        probe = torch.ops.mkldnn._reorder_linear_weight(torch.ones(4, 4), 2)
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 4), probe, None, "none", [], "")
    except (RuntimeError, AttributeError):  # a build without these ops
        return False
    return bool(torch.allclose(out, torch.full((2, 4), 4.0)))


@torch.inference_mode()
def pack_linears(model: nn.Module, *, batch_hint: int = 16, one_row: OneRow | None = None) -> int:
    """Replace every `nn.Linear` of `model` by a `PackedLinear`; returns how many were packed.

    `one_row`: the kernel for one-row inputs (see the module docstring). None measures the three on
    this model's weights and takes the fastest, for the layers and for the tied output layer apart;
    `dense` and `blocks` are candidates for the layers only when their dense copies take at most an
    eighth of the machine's memory."""
    if not can_pack(model):
        return 0
    shared = _shared_weights(model)
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    packed = {id(m): torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), batch_hint) for m in linears}
    kernels: dict[bool, OneRow] = {}  # by "weight shared with another module" (kept dense anyway)
    for tied in (False, True):
        group = [(m.weight.detach(), packed[id(m)]) for m in linears if (id(m.weight) in shared) is tied]
        if one_row is not None or not group:
            kernels[tied] = one_row or "packed"
            continue
        if not tied and one_row_copy_bytes(model) > psutil.virtual_memory().total // 8:
            log.info("one-row products stay packed: dense copies of the weights would not fit")
            kernels[tied] = "packed"
            continue
        rates = one_row_rates(group)
        kernels[tied] = max(rates, key=rates.__getitem__)
        measured = ", ".join(f"{k} {v:.1f}" for k, v in rates.items())
        log.info(
            "one-row products on the %s: %s (GB/s: %s)",
            "output layer" if tied else "layers",
            kernels[tied],
            measured,
        )

    def pack(linear: nn.Linear, keep: bool) -> nn.Module:
        return PackedLinear(
            linear, batch_hint=batch_hint, keep_weight=keep, one_row=kernels[keep], packed=packed[id(linear)]
        )

    count = replace_linears(model, pack)
    log.info("packed the weights of %d linear layers for oneDNN", count)
    return count


def one_row_rates(weights: list[tuple[torch.Tensor, torch.Tensor]], passes: int = 3) -> dict[OneRow, float]:
    """GB/s of one-row products over `weights` ((dense, packed) pairs, in model order) in each kernel:
    the best of `passes` passes over all of them after one to warm up, so the caches hold what they
    hold in a real decode step."""
    rates: dict[OneRow, float] = {}
    total = sum(dense.nbytes for dense, _ in weights)
    for kernel in ONE_ROW_KERNELS:
        layers = [
            PackedLinear(_as_linear(dense), batch_hint=1, keep_weight=False, one_row=kernel, packed=pack)
            for dense, pack in weights
        ]
        inputs = [torch.randn(1, layer.in_features) for layer in layers]
        best = float("inf")
        for index in range(passes + 1):
            started = time.perf_counter()
            for layer, x in zip(layers, inputs, strict=True):
                layer(x)
            if index:
                best = min(best, time.perf_counter() - started)
        rates[kernel] = total / best / 1e9
    return rates


def _as_linear(weight: torch.Tensor) -> nn.Linear:
    """An `nn.Linear` holding `weight` itself (no copy), without a bias."""
    linear = nn.Linear(1, 1, bias=False)
    linear.in_features, linear.out_features = weight.shape[1], weight.shape[0]
    linear.weight = nn.Parameter(weight, requires_grad=False)
    return linear


def one_row_blocks(out_features: int, threads: int | None = None) -> int:
    """How many row blocks a one-row product is split into: the fewest that give every thread one
    (at least two: one block is MKL's slow matrix-vector path), each of at least 16 rows; 0 when
    no split fits (the product stays packed)."""
    want = max(2, threads or os.cpu_count() or 1)
    fits = [p for p in range(2, out_features // 16 + 1) if out_features % p == 0]
    return next((p for p in fits if p >= want), fits[-1] if fits else 0)


def one_row_copy_bytes(model: nn.Module) -> int:
    """The bytes that keeping dense copies for one-row products adds: every plain linear's weight,
    except those shared with another module (a tied embedding), which stay dense anyway."""
    shared = _shared_weights(model)
    return sum(
        m.weight.nbytes for m in model.modules() if type(m) is nn.Linear and id(m.weight) not in shared
    )


def replace_linears(model: nn.Module, make: Callable[[nn.Linear, bool], nn.Module]) -> int:
    """Swap every plain `nn.Linear` for `make(linear, keep_weight)`; returns how many were swapped.

    `make` may return the linear itself to leave it as it is.

    `keep_weight` is true where the weight is shared with another module (a tied input embedding),
    which then still needs the dense copy.
    """
    shared = _shared_weights(model)
    swapped = 0
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear:
            continue
        replacement = make(module, id(module.weight) in shared)
        if replacement is module:  # `make` declined this one
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, replacement)
        swapped += 1
    return swapped


def _shared_weights(model: nn.Module) -> set[int]:
    """Ids of parameters held by more than one module (tied embeddings)."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
    return {pid for pid, count in owners.items() if count > 1}

"""CPU fast path: the base model's linear layers with their weights pre-packed for oneDNN.

`F.linear` on the CPU re-packs the weight matrix into the BLAS kernel's blocked layout on every call.
For a batch of a few rows (decoding 16 replies at once) that packing costs as much as the arithmetic:
on SmolLM2-135M the output layer (49,152 x 576) takes 25 ms for 16 rows plain and 11 ms pre-packed.
Packing once when the model loads makes a 16-row decode step about 1.5x faster; outputs agree with
`F.linear` to float rounding (~1e-6).

The packed copy replaces the layer's weight (memory stays the same), except where the weight is shared
with another module (a tied input embedding), which keeps its dense copy too. Only float32 models on the
CPU are packed, and only where PyTorch was built with oneDNN (x86); elsewhere nothing changes.

One row (batch-1 decode, one user chatting) is the other shape, and there neither kernel streams the
weights at the memory's read rate: oneDNN's packed product reads them at ~20 GB/s and MKL's
matrix-vector product at ~12 GB/s (2 threads of a 2-core AVX-512 EPYC; a plain sum reads ~30). The
same product as a batch of row blocks, `bmm([P, N/P, K], x as a [K, 1] column with strides (1, K))`,
goes through MKL's batched kernel at ~28 GB/s (25 on one thread): a decode step 1.5x faster on
SmolLM2-135M, with the same greedy replies (equal to `F.linear` to float rounding, as the packed product
is). It needs the dense weights beside the packed ones, so they are kept where that costs little
(`one_row_copy`): the extra bytes at most an eighth of the machine's memory (~430 MB for SmolLM2-135M);
else one row stays packed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import psutil
import torch
from torch import nn

log = logging.getLogger(__name__)


class PackedLinear(nn.Linear):
    """An `nn.Linear` whose forward runs oneDNN's linear on a weight packed once."""

    row_blocks: torch.Tensor | None

    def __init__(
        self, linear: nn.Linear, *, batch_hint: int, keep_weight: bool, one_row_blocks: int = 0
    ) -> None:
        nn.Module.__init__(self)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)
        self.bias = linear.bias
        if keep_weight:
            self.weight = linear.weight
        else:
            self.register_parameter("weight", None)  # the packed copy replaces it
        # The dense weight as `one_row_blocks` blocks of rows for one-row inputs (see the module
        # docstring); a buffer, so the memory it keeps shows in `model.buffers()`.
        blocks = None
        if one_row_blocks:
            blocks = weight.view(one_row_blocks, self.out_features // one_row_blocks, self.in_features)
        self.register_buffer("row_blocks", blocks, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = self.row_blocks
        if blocks is not None and x.numel() == self.in_features:
            if not x.is_contiguous():
                x = x.contiguous()
            # x as a [K, 1] column with strides (1, K), the same for every block (stride 0): one view op
            column = x.as_strided((blocks.shape[0], self.in_features, 1), (0, 1, self.in_features))
            out = torch.bmm(blocks, column).view(*x.shape[:-1], self.out_features)
            return out if self.bias is None else out + self.bias
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


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
def pack_linears(model: nn.Module, *, batch_hint: int = 16, one_row_copy: bool | None = None) -> int:
    """Replace every `nn.Linear` of `model` by a `PackedLinear`; returns how many were packed.

    `one_row_copy`: keep the dense weights for one-row products too (see the module docstring);
    None decides by memory: when the copies not already kept take at most an eighth of the machine's."""
    if not can_pack(model):
        return 0
    if one_row_copy is None:
        one_row_copy = one_row_copy_bytes(model) <= psutil.virtual_memory().total // 8

    def pack(linear: nn.Linear, keep: bool) -> nn.Module:
        blocks = one_row_blocks(linear.out_features) if one_row_copy or keep else 0
        return PackedLinear(linear, batch_hint=batch_hint, keep_weight=keep, one_row_blocks=blocks)

    packed = replace_linears(model, pack)
    extra = "" if one_row_copy else " (one-row products packed too: dense copies would not fit)"
    log.info("packed the weights of %d linear layers for oneDNN%s", packed, extra)
    return packed


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

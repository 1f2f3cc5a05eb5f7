"""CPU serving with smaller base weights: the base model's linear layers in int8, int4 or float16.

A batch-1 decode step streams every weight once, so its speed follows the bytes per weight.

- `int8`, on a CPU with AVX-512: per-output-channel symmetric int8 weights (a quarter of float32's
  bytes) through torch's weight-only kernel (`_weight_int8pack_mm`): activations rounded to bfloat16,
  float32 accumulation, each row independent of the others in its batch.
- `int8`, on AVX2 only: the weight-only kernels run 5-20x slower than float32 there, so the weights
  are packed for fbgemm, which quantizes each call's activations to 7 bits (one scale over all rows of
  the batch). That costs answer quality on SmolLM2-135M (README, "Smaller base weights").
- `int4` (AVX-512 only): asymmetric int4 in groups of 32 inputs, GGUF Q4_1's layout, through
  `_weight_int4pack_mm_for_cpu`.
- `float16`: float16 weights packed for fbgemm with float32 activations and accumulation; outputs agree
  with float32 to float16 rounding (~1e-3 relative), row by row.

With int4, and int8 on the weight-only kernels, the output layer is held in float16 and each row's best
candidates are rescored in float32 (`quantize_linears`, `QuantizedLinear`).
Persona LoRAs stay in float32 on top (`bot.generation.lora.MultiLoraLinear` wraps these layers as it
wraps plain ones). A tied input embedding keeps its float32 table.
"""

from __future__ import annotations

import logging
import warnings
from typing import Literal

import torch
from torch import nn

from bot.errors import ConfigError
from bot.generation.packed import replace_linears

log = logging.getLogger(__name__)

WeightFormat = Literal["auto", "float16", "int8", "int4"]


# Quantized weights' group size along the input dimension for int4: GGUF's Q4_0/Q4_1 block size, so
# a Q4_1 model's weights (scale and minimum per block of 32) are held exactly.
INT4_GROUP = 32

# Output-layer candidates per row whose logits are recomputed in float32 (see `QuantizedLinear`).
RESCORE_TOP = 16


def weight_only_kernels() -> bool:
    """torch's weight-only int8/int4 CPU kernels pay here: they are written for AVX-512 (with bf16)."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


class QuantizedLinear(nn.Linear):
    """An `nn.Linear` whose weight is held as int8, int4 or float16.

    `kernel` says how it multiplies: "weight-only" (int8 / int4 weights, the activations rounded to
    bfloat16 for the product, float32 accumulation), "fbgemm-dynamic" (int8 weights, activations
    quantized to 7 bits per call) or "fbgemm-fp16".

    `rescore` is for the output layer when int8 / int4 are served on the weight-only kernels, where it is
    held in float16 (see `quantize_linears`). A rounded output table ties or swaps close candidates: the
    weight-only kernels' bfloat16 output resolves a logit of 25 only to 0.125, and swapped SmolLM2's
    first token for "What is the capital of France?" ("The" 25.33 against "L" 25.24). The float32
    table is kept (a tied embedding's is kept anyway) and each row's `RESCORE_TOP` best candidates are
    recomputed from it exactly: a few rows of reading instead of the whole table.
    """

    def __init__(
        self,
        linear: nn.Linear,
        fmt: Literal["float16", "int8", "int4"],
        *,
        keep_weight: bool,
        rescore: bool = False,
    ) -> None:
        nn.Module.__init__(self)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.fmt = fmt
        weight = linear.weight.detach().float()
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.register_buffer("qweight", None)
        self.register_buffer("qscale", None)
        if fmt == "float16":
            self.kernel = "fbgemm-fp16"
            self.packed = _prepack_fp16(weight, bias)
        elif fmt == "int8" and not weight_only_kernels():
            self.kernel = "fbgemm-dynamic"
            self.packed = _prepack_int8(weight, bias)
        else:
            self.kernel = "weight-only"
            self.qweight, self.qscale = (
                int8_weight_only(weight) if fmt == "int8" else _int4_weight_only(weight)
            )
        self.register_parameter("bias", None)
        if self.kernel == "weight-only" and bias is not None:
            self.bias = nn.Parameter(bias, requires_grad=False)  # the kernels take no bias
        if keep_weight:
            self.weight = linear.weight
        else:
            self.register_parameter("weight", None)  # the quantized copy replaces it
        self.register_buffer("table", linear.weight.detach() if rescore else None, persistent=False)
        self.register_buffer("table_bias", bias if rescore else None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._product(x)
        table = self.table
        return self._rescore(out, x, table) if isinstance(table, torch.Tensor) else out

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "fbgemm-fp16":
            return torch.ops.quantized.linear_dynamic_fp16(x, self.packed)
        if self.kernel == "fbgemm-dynamic":
            # reduce_range: 7-bit activations, so AVX2's 16-bit pair sums cannot saturate.
            return torch.ops.quantized.linear_dynamic(x, self.packed, True)
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self.fmt == "int8":
            out = torch._weight_int8pack_mm(rows, self.qweight, self.qscale)
        else:
            out = torch._weight_int4pack_mm_for_cpu(rows, self.qweight, INT4_GROUP, self.qscale)
        out = out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias

    def _rescore(self, out: torch.Tensor, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """`out` with each row's `RESCORE_TOP` best logits recomputed in float32 from `table`."""
        rows = x.reshape(-1, self.in_features)
        flat = out.reshape(-1, self.out_features)
        top = flat.topk(min(RESCORE_TOP, self.out_features), dim=-1).indices
        exact = torch.bmm(table[top].to(x.dtype), rows[:, :, None]).squeeze(-1)
        if isinstance(self.table_bias, torch.Tensor):
            exact = exact + self.table_bias[top]
        return flat.scatter(-1, top, exact).reshape(out.shape)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"weights={self.fmt}, kernel={self.kernel}"
        )


def quantizable(linear: nn.Linear, fmt: str) -> bool:
    """int4's packing needs whole groups of inputs and whole tiles of outputs; other formats take any."""
    if fmt != "int4":
        return True
    return linear.in_features % INT4_GROUP == 0 and linear.out_features % 16 == 0


def int8_weight_only(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel, for `torch._weight_int8pack_mm`.

    The kernel takes bfloat16 scales, so the integers are chosen for the rounded scale: a rounding error
    in the scale would otherwise bias a whole output channel.
    """
    scale = (weight.abs().amax(dim=1) / 127).clamp(min=1e-12).to(torch.bfloat16)
    q = torch.round(weight / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale


def _int4_weight_only(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int4 in groups of 32 inputs (GGUF Q4_1's layout: a scale and a minimum per group).

    torch's kernel computes w = (q - 8) * scale + zero with a bfloat16 scale and zero, so both are
    rounded first and the integers chosen for the rounded pair.
    """
    rows, cols = weight.shape
    groups = weight.reshape(rows, cols // INT4_GROUP, INT4_GROUP)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((high - low) / 15).clamp(min=1e-12).to(torch.bfloat16).float()
    zero = (low + 8 * scale).to(torch.bfloat16).float()
    q = torch.round((groups - zero[..., None]) / scale[..., None] + 8).clamp(0, 15).to(torch.int32)
    packed = torch._convert_weight_to_int4pack_for_cpu(q.reshape(rows, cols), 1)
    scales_and_zeros = torch.stack([scale.t(), zero.t()], dim=-1).contiguous().to(torch.bfloat16)
    return packed, scales_and_zeros


def _prepack_int8(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    scale = (weight.abs().amax(dim=1) / 127).clamp(min=1e-12).double()
    zero = torch.zeros(weight.shape[0], dtype=torch.long)
    with warnings.catch_warnings():
        # torch marks quantized tensor creation deprecated; the fbgemm kernels still take only these.
        warnings.simplefilter("ignore", UserWarning)
        qweight = torch.quantize_per_channel(weight, scale, zero, 0, torch.qint8)
    return torch.ops.quantized.linear_prepack(qweight, bias)


def _prepack_fp16(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.quantized.linear_prepack_fp16(weight, bias)


def check_weight_format(fmt: str, device: torch.device, dtype: torch.dtype) -> None:
    """A `ConfigError` naming `model.weights` when `fmt` cannot be served here."""
    if fmt == "auto":
        return
    if fmt not in ("float16", "int8", "int4"):
        raise ConfigError(f"model.weights: {fmt!r} is not one of auto, float16, int8, int4")
    if device.type != "cpu" or dtype != torch.float32:
        raise ConfigError(
            f"model.weights = {fmt!r} is for CPU serving of a float32 model "
            f'(here: {device.type}, {str(dtype).removeprefix("torch.")}); use model.weights = "auto"'
        )
    if fmt == "int4" and not weight_only_kernels():
        raise ConfigError(
            f"model.weights = 'int4' needs a CPU with AVX-512 (this one: "
            f'{torch.backends.cpu.get_cpu_capability()}); use "float16" or "int8"'
        )
    if "fbgemm" not in torch.backends.quantized.supported_engines:  # every format's output layer uses it
        raise ConfigError(
            f"model.weights = {fmt!r} needs PyTorch's fbgemm kernels (x86 CPUs), missing from this build"
        )


class QuantizedSlice(nn.Linear):
    """One projection's output columns of a product quantized together with its siblings (a layer's q,
    k and v, or its gate and up: `quantize_linears(fuse_siblings=True)`). The lean forward calls the
    shared product once for all of them; called alone (transformers' forward) it runs the whole
    shared product and keeps its own columns, so the outputs are right but the work is repeated."""

    def __init__(self, shared: QuantizedLinear, start: int, size: int) -> None:
        nn.Module.__init__(self)
        self.in_features = shared.in_features
        self.out_features = size
        self.start = start
        self.shared = shared  # the same module under every sibling: held once
        self.register_parameter("weight", None)
        self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared(x)[..., self.start : self.start + self.out_features]


SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _fuse_siblings(model: nn.Module, fmt: Literal["float16", "int8", "int4"]) -> int:
    """Quantize each group of `SIBLINGS` (bias-free projections of one input) as one matrix, their rows
    stacked, and put a `QuantizedSlice` of it in each one's place; returns how many were replaced. The
    rows are quantized as they would be apart (scales per row, or per row and group of inputs), so
    each projection's output is the same."""
    swapped = 0
    for parent in list(model.modules()):
        for names in SIBLINGS:
            linears = [getattr(parent, name, None) for name in names]
            if not all(type(m) is nn.Linear and m.bias is None for m in linears):
                continue
            group: list[nn.Linear] = linears  # type: ignore[assignment]
            if len({m.in_features for m in group}) != 1:
                continue
            stacked = nn.Linear(group[0].in_features, sum(m.out_features for m in group), bias=False)
            stacked.weight = nn.Parameter(torch.cat([m.weight.detach() for m in group]), requires_grad=False)
            if not quantizable(stacked, fmt):
                continue
            shared = QuantizedLinear(stacked, fmt, keep_weight=False)
            start = 0
            for name, linear in zip(names, group, strict=True):
                setattr(parent, name, QuantizedSlice(shared, start, linear.out_features))
                start += linear.out_features
                swapped += 1
    return swapped


@torch.inference_mode()
def quantize_linears(
    model: nn.Module, fmt: Literal["float16", "int8", "int4"], *, fuse_siblings: bool = False
) -> int:
    """Replace every `nn.Linear` of `model` by a `QuantizedLinear`; returns how many were replaced.

    `fuse_siblings` (for a model the lean forward runs) quantizes a layer's q, k and v as one product
    and its gate and up as another (`QuantizedSlice`): 4 kernel calls per layer instead of 7, which on
    one row saves about 80 µs a layer (int8 and float16 on fbgemm, measured), with the same outputs.

    On the weight-only kernels (int4, and int8 with AVX-512) the output layer is held in float16 with
    its best candidates rescored in float32:
    - its logits pick every token, and a GGUF's output table is stored finer than its Q4_1 layers
      (SmolLM2's: about 29 distinct values per 32, against 16): int4 there dropped top-1 agreement
      with float32 from 98% to 87%;
    - on one row, fbgemm's float16 product of SmolLM2's 49,152 x 576 table takes 2.2 ms where
      `_weight_int8pack_mm` takes 3.4-4 ms, about a fifth of an int4 decode step.
    A layer int4 cannot pack (`quantizable`) keeps its float32 weight.
    """
    output_embeddings = getattr(model, "get_output_embeddings", None)
    head = output_embeddings() if callable(output_embeddings) else None
    weight_only = fmt == "int4" or (fmt == "int8" and weight_only_kernels())

    def make(linear: nn.Linear, keep: bool) -> nn.Module:
        rescored = weight_only and linear is head
        layer_fmt: Literal["float16", "int8", "int4"] = "float16" if rescored else fmt
        if not quantizable(linear, layer_fmt):
            return linear
        return QuantizedLinear(linear, layer_fmt, keep_weight=keep, rescore=rescored)

    swapped = _fuse_siblings(model, fmt) if fuse_siblings else 0
    swapped += replace_linears(model, make)
    kernel = next((m.kernel for m in model.modules() if isinstance(m, QuantizedLinear)), "none")
    log.info("holding the weights of %d linear layers as %s (%s kernels)", swapped, fmt, kernel)
    return swapped

"""CPU serving with smaller base weights: the base model's linear layers in int8 or float16.

A batch-1 decode step streams every weight once, so its speed follows the bytes per weight. These
layers keep the weights packed once for fbgemm (PyTorch's x86 CPU kernels, AVX2 and up):

- `int8`: per-output-channel symmetric int8 weights (a quarter of float32's bytes). fbgemm quantizes
  each forward's activations on the fly (one uint8 scale per call, over all rows of the batch) and
  accumulates in int32. A row's output depends slightly on the other rows of its batch (they share
  the activation scale), and the 7-bit activations cost answer quality on SmolLM2-135M (README,
  "Smaller base weights": eval accuracy 72.7% -> 46.8%); int8 weights alone would not.
- `float16`: float16 weights (half the bytes) with float32 activations and accumulation; outputs
  agree with float32 to float16 rounding (~1e-3 relative), row by row.

torch's weight-only kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) were measured too:
without AVX-512 they run 5-20x slower than oneDNN's float32 linear, so they are not used.

Persona LoRAs stay in float32 on top (`bot.generation.lora.MultiLoraLinear` wraps these layers as it
wraps plain ones). The output layer is quantized too; a tied input embedding keeps its float32 table.
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

WeightFormat = Literal["auto", "float16", "int8"]


class QuantizedLinear(nn.Linear):
    """An `nn.Linear` whose weight is held packed for fbgemm as int8 or float16."""

    def __init__(self, linear: nn.Linear, fmt: Literal["float16", "int8"], *, keep_weight: bool) -> None:
        nn.Module.__init__(self)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.fmt = fmt
        weight = linear.weight.detach().float()
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.packed = _prepack_int8(weight, bias) if fmt == "int8" else _prepack_fp16(weight, bias)
        self.register_parameter("bias", None)  # packed with the weight
        if keep_weight:
            self.weight = linear.weight
        else:
            self.register_parameter("weight", None)  # the packed copy replaces it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fmt == "int8":
            # reduce_range: 7-bit activations, so AVX2's 16-bit pair sums cannot saturate.
            return torch.ops.quantized.linear_dynamic(x, self.packed, True)
        return torch.ops.quantized.linear_dynamic_fp16(x, self.packed)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights={self.fmt}"


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
    if fmt not in ("float16", "int8"):
        raise ConfigError(f"model.weights: {fmt!r} is not one of auto, float16, int8")
    if device.type != "cpu" or dtype != torch.float32:
        raise ConfigError(
            f"model.weights = {fmt!r} is for CPU serving of a float32 model "
            f'(here: {device.type}, {str(dtype).removeprefix("torch.")}); use model.weights = "auto"'
        )
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise ConfigError(
            f"model.weights = {fmt!r} needs PyTorch's fbgemm kernels (x86 CPUs), missing from this build"
        )


@torch.inference_mode()
def quantize_linears(model: nn.Module, fmt: Literal["float16", "int8"]) -> int:
    """Replace every `nn.Linear` of `model` by a `QuantizedLinear`; returns how many were replaced."""
    swapped = replace_linears(model, lambda linear, keep: QuantizedLinear(linear, fmt, keep_weight=keep))
    log.info("holding the weights of %d linear layers as %s", swapped, fmt)
    return swapped

"""Many LoRA adapters on one base model, mixed in one batch with one gathered matmul per projection.

peft's mixed-adapter batches (`adapter_names=`) loop over the adapters inside every layer, so a batch
of four personas costs about four LoRA passes per projection. Here each target `nn.Linear` of the base
model is wrapped once by `MultiLoraLinear`; for a batch, the A matrices of the adapters that batch uses
are stacked into one `[R, in]` matrix and the B matrices into one `[out, R]` matrix, and a per-row
scale vector `[rows, 1, R]` zeroes every block that is not the row's own adapter (and carries
`alpha / r`). A projection then costs two small matmuls whatever the mix of adapters:

    y = base(x) + ((x @ A_cat.T) * row_scale) @ B_cat.T

Adapters are read straight from a peft adapter folder (`adapter_config.json` and
`adapter_model.safetensors`) with the scaling peft would use, so a row's output equals peft's output
for that adapter. Each loaded adapter costs its own weights' bytes; the base model is never copied.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bot.errors import PersonabotError


class AdapterLoadError(PersonabotError):
    """A LoRA adapter folder cannot be used with the loaded base model."""


# peft options that change the math of a LoRA layer; an adapter using them is refused, not misread.
_UNSUPPORTED = {
    "use_dora": "DoRA adapters",
    "modules_to_save": "modules_to_save (fully trained extra modules)",
    "trainable_token_indices": "trainable token indices",
    "target_parameters": "LoRA on raw parameters",
    "layer_replication": "layer replication",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D) adapters",
    "lora_bias": "LoRA bias",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "block-diagonal LoRA",
}


@dataclass(frozen=True)
class LoraModule:
    """One adapted projection: `delta(x) = scaling * (x @ a.T) @ b.T`."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scaling: float


@dataclass(frozen=True)
class LoraAdapter:
    name: str
    folder: Path
    modules: dict[str, LoraModule]  # base-model module name -> weights

    @property
    def nbytes(self) -> int:
        return sum(m.a.nbytes + m.b.nbytes for m in self.modules.values())


def _pattern_value(patterns: dict[str, int | float], module_name: str, default: float) -> float:
    # The same matching rule as peft's `get_pattern_key`: the pattern matches a suffix of the key.
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module_name):
            return float(value)
    return default


def _read_config(folder: Path) -> dict[str, object]:
    path = folder / "adapter_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterLoadError(f"{path}: not found (is {folder} a peft adapter folder?)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterLoadError(f"{path}: cannot read: {exc}") from None
    if not isinstance(config, dict):
        raise AdapterLoadError(f"{path}: expected a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterLoadError(f"{path}: peft_type {config.get('peft_type')!r} is not LORA")
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise AdapterLoadError(f"{path}: {key}: {what} are not supported by the batched worker")
    if config.get("bias", "none") != "none":
        raise AdapterLoadError(f"{path}: bias: only 'none' is supported")
    return config


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise AdapterLoadError(f"{folder}: adapter_model.bin is not supported; save it as safetensors")
        raise AdapterLoadError(f"{path}: not found")
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterLoadError(f"{path}: corrupt or unreadable safetensors file: {exc}") from None


def _module_name(key: str) -> tuple[str, str] | None:
    """`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` -> (`model.layers.0...q_proj`, `A`)."""
    match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
    if match is None:
        return None
    return match.group(1), match.group(2)


def load_adapter(
    folder: Path,
    *,
    name: str,
    linears: dict[str, nn.Linear],
    device: torch.device,
    dtype: torch.dtype,
) -> LoraAdapter:
    """Read a peft LoRA folder and check every matrix against the base model's projections."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterLoadError(f"adapter folder {folder} does not exist")
    config = _read_config(folder)
    tensors = _read_tensors(folder)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        parsed = _module_name(key)
        if parsed is None:
            what = "embedding LoRA" if "lora_embedding" in key else "an unknown tensor"
            raise AdapterLoadError(f"{folder}: {key} is {what}; only LoRA on linear layers is supported")
        pairs.setdefault(parsed[0], {})[parsed[1]] = tensor
    if not pairs:
        raise AdapterLoadError(f"{folder}: adapter_model.safetensors holds no LoRA weights")
    alpha = float(config.get("lora_alpha", 8))  # type: ignore[arg-type]
    rslora = bool(config.get("use_rslora", False))
    alpha_pattern = dict(config.get("alpha_pattern") or {})  # type: ignore[call-overload]
    modules: dict[str, LoraModule] = {}
    for module_name, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterLoadError(f"{folder}: {module_name} has lora_A or lora_B missing")
        linear = linears.get(module_name)
        if linear is None:
            raise AdapterLoadError(
                f"{folder}: {module_name} is not a linear layer of the base model "
                "(was the adapter trained on another model?)"
            )
        a, b = pair["A"], pair["B"]
        r = a.shape[0]
        if a.shape != (r, linear.in_features) or b.shape != (linear.out_features, r):
            raise AdapterLoadError(
                f"{folder}: {module_name}: LoRA shapes {tuple(a.shape)}/{tuple(b.shape)} do not fit "
                f"the base layer ({linear.in_features} -> {linear.out_features}); trained on another model?"
            )
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterLoadError(f"{folder}: {module_name}: weights contain NaN or infinity")
        module_alpha = _pattern_value(alpha_pattern, module_name, alpha)
        scaling = module_alpha / math.sqrt(r) if rslora else module_alpha / r
        modules[module_name] = LoraModule(
            a.to(device=device, dtype=dtype).contiguous(),
            b.to(device=device, dtype=dtype).contiguous(),
            scaling,
        )
    return LoraAdapter(name, folder, modules)


class MultiLoraLinear(nn.Module):
    """A base `nn.Linear` plus whichever LoRA deltas the current batch's rows use."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        # Set per batch by `MultiLora.activate`: (A_cat [R, in], B_cat [out, R], scale [rows, 1, R]).
        self.active: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.rows: slice | torch.Tensor = slice(None)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.active is None:
            return y
        a, b, scale = self.active
        h = torch.nn.functional.linear(x, a) * scale[self.rows]
        return y.add_(torch.nn.functional.linear(h, b))


class MultiLora:
    """Wraps a model's target projections once and serves any mix of loaded adapters per batch."""

    def __init__(self, model: nn.Module, target_modules: Sequence[str] | None = None) -> None:
        self.model = model
        self.adapters: dict[str, LoraAdapter] = {}
        self.wrapped: dict[str, MultiLoraLinear] = {}
        self._linears: dict[str, nn.Linear] = {}
        self._targets = set(target_modules) if target_modules else None
        self._stack_key: tuple[str, ...] | None = None
        self._stacks: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear) and not name.endswith("lm_head"):
                self._linears[name] = module

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _wrap(self, module_name: str) -> None:
        if module_name in self.wrapped:
            return
        parent_name, _, child = module_name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        wrapper = MultiLoraLinear(self._linears[module_name])
        setattr(parent, child, wrapper)
        self.wrapped[module_name] = wrapper

    def load(self, name: str, folder: Path) -> LoraAdapter:
        """Load (or replace) adapter `name` from a peft folder; the model is patched where needed."""
        adapter = load_adapter(folder, name=name, linears=self._linears, device=self.device, dtype=self.dtype)
        for module_name in adapter.modules:
            self._wrap(module_name)
        self.adapters[name] = adapter
        self._stack_key = None
        return adapter

    def unload(self, name: str) -> None:
        if self.adapters.pop(name, None) is not None:
            self._stack_key = None
            self._stacks.clear()

    def _build_stacks(self, names: tuple[str, ...]) -> None:
        # The stacked matrices only depend on which adapters a batch uses; consecutive batches with the
        # same set (the steady state) reuse them.
        if names == self._stack_key:
            return
        self._stacks = {}
        for module_name in self.wrapped:
            blocks = [
                (i, self.adapters[n].modules[module_name])
                for i, n in enumerate(names)
                if module_name in self.adapters[n].modules
            ]
            if not blocks:
                continue
            a_cat = torch.cat([m.a for _, m in blocks], dim=0)
            b_cat = torch.cat([m.b for _, m in blocks], dim=1)
            # Which adapter owns each of the R stacked rank columns, and its alpha / r.
            owner = torch.cat([torch.full((m.a.shape[0],), i, dtype=torch.long) for i, m in blocks])
            scaling = torch.cat(
                [torch.full((m.a.shape[0],), m.scaling, dtype=torch.float64) for _, m in blocks]
            )
            self._stacks[module_name] = (
                a_cat,
                b_cat,
                owner.to(a_cat.device),
                scaling.to(a_cat.device, a_cat.dtype),
            )
        self._stack_key = names

    def activate(self, row_adapters: Sequence[str | None]) -> None:
        """Set each row's adapter (None: the base model) for the next forward passes."""
        for name in row_adapters:
            if name is not None and name not in self.adapters:
                raise KeyError(f"LoRA adapter {name!r} is not loaded")
        names = tuple(sorted({n for n in row_adapters if n is not None}))
        if not names:
            self.deactivate()
            return
        self._build_stacks(names)
        row_owner = torch.tensor(
            [names.index(n) if n is not None else -1 for n in row_adapters],
            dtype=torch.long,
            device=self.device,
        )
        for module_name, wrapper in self.wrapped.items():
            stack = self._stacks.get(module_name)
            if stack is None:
                wrapper.active = None
                continue
            a_cat, b_cat, owner, scaling = stack
            # [rows, 1, R]: the row's own adapter's columns carry its scaling, every other column is 0.
            scale = (row_owner[:, None] == owner[None, :]).to(scaling.dtype) * scaling[None, :]
            wrapper.active = (a_cat, b_cat, scale.unsqueeze(1))
            wrapper.rows = slice(None)

    def select_rows(self, rows: slice | torch.Tensor) -> None:
        """Restrict the next forward to a subset of the activated rows (a prefill group)."""
        for wrapper in self.wrapped.values():
            wrapper.rows = rows

    def keep_rows(self, index: torch.Tensor) -> None:
        """Drop finished rows for good: the batch was compacted to `index`."""
        for wrapper in self.wrapped.values():
            if wrapper.active is not None:
                a, b, scale = wrapper.active
                wrapper.active = (a, b, scale.index_select(0, index))
            wrapper.rows = slice(None)

    def deactivate(self) -> None:
        for wrapper in self.wrapped.values():
            wrapper.active = None
            wrapper.rows = slice(None)

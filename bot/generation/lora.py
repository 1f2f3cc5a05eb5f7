"""Many LoRA adapters on one base model, mixed in one batch with one gathered matmul pair per projection.

peft's mixed-adapter batches (`adapter_names=`) loop over the adapters inside every layer, so a batch
of four personas costs four LoRA passes (and their small-op overhead) per projection. Here each target
`nn.Linear` of the base model is wrapped once by `MultiLoraLinear`. For a batch, the rows are grouped
by adapter into `k` equal-sized slots of `m` rows (short groups padded with a zero-weighted slot), the
adapters' A and B matrices are stacked into `[k, in, r]` and `[k, r, out]`, and a projection costs one
gather, two batched matmuls and one scatter-add, whatever the mix of adapters:

    y = base(x);  y[rows] += scaling * bmm(bmm(x[rows], A), B)

Each row only pays for its own adapter's rank. Rows on the base model (no adapter) take no slot.
Adapters are read with peft's own loaders (`PeftConfig.from_pretrained`, `load_peft_weights`) and get
the rank and scaling peft would give them, so a row's output equals peft's output for that adapter; a
config option this loader does not implement is refused, naming the folder and the option. Each loaded adapter costs its own weights' bytes; the base model is never copied.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from bot.errors import PersonabotError

if TYPE_CHECKING:
    from peft import LoraConfig


class AdapterLoadError(PersonabotError):
    """A LoRA adapter folder cannot be used with the loaded base model."""


# `LoraConfig` fields this loader honours, or that do not change a loaded adapter's math (bookkeeping,
# dropout, how the weights were initialised). Every other field must keep peft's default: an option
# this loader does not implement (DoRA, bias, modules_to_save, one a newer peft adds...) is refused.
_HONOURED = {
    "task_type",
    "peft_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "r",
    "target_modules",
    "exclude_modules",
    "lora_alpha",
    "lora_dropout",
    "use_rslora",
    "init_lora_weights",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "megatron_core",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "qalora_group_size",
    "runtime_config",
    "ensure_weight_tying",
}
# Names for the refused options an operator is most likely to meet.
_WHAT = {
    "use_dora": "DoRA adapters",
    "modules_to_save": "modules_to_save (fully trained extra modules)",
    "trainable_token_indices": "trainable token indices",
    "target_parameters": "LoRA on raw parameters",
    "layer_replication": "layer replication",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D) adapters",
    "bias": "biases (bias other than 'none')",
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


def read_config(folder: Path) -> LoraConfig:
    """The folder's `LoraConfig`, read by peft; any option this loader does not implement is refused."""
    from peft import LoraConfig, PeftConfig

    path = folder / "adapter_config.json"
    if not path.is_file():  # checked here: peft would look for it on the Hugging Face Hub
        raise AdapterLoadError(f"{path}: not found (is {folder} a peft adapter folder?)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            config = PeftConfig.from_pretrained(str(folder))
        except (OSError, UnicodeDecodeError, ValueError, TypeError) as exc:  # JSONDecodeError is a ValueError
            raise AdapterLoadError(f"{path}: cannot read: {exc}") from None
    if not isinstance(config, LoraConfig):
        kind = getattr(config.peft_type, "value", config.peft_type)
        raise AdapterLoadError(f"{path}: peft_type {kind!r} is not LORA")
    # peft drops the options it does not know (a newer peft wrote them) with a warning: refuse instead.
    for warning in caught:
        if "Unexpected keyword arguments" in str(warning.message):
            raise AdapterLoadError(f"{path}: {warning.message}".split(" for class")[0] + " (newer peft?)")
    default = LoraConfig()
    for field in dataclasses.fields(LoraConfig):
        if field.name in _HONOURED:
            continue
        value = getattr(config, field.name)
        if value != getattr(default, field.name):
            what = _WHAT.get(field.name, f"the peft option {field.name}")
            raise AdapterLoadError(
                f"{path}: {field.name}: {what} are not supported by the batched worker (it is {value!r})"
            )
    return config


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from peft.utils import load_peft_weights
    from safetensors import SafetensorError

    if not any((folder / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")):
        # checked here: peft would look for the weights on the Hugging Face Hub
        raise AdapterLoadError(f"{folder / 'adapter_model.safetensors'}: not found")
    try:
        return load_peft_weights(str(folder), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterLoadError(f"{folder}: corrupt or unreadable safetensors file: {exc}") from None


def _module_name(key: str) -> tuple[str, str] | None:
    """`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` -> (`model.layers.0...q_proj`, `A`)."""
    match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
    if match is None:
        return None
    return match.group(1), match.group(2)


def _rank_and_scaling(config: LoraConfig, module_name: str) -> tuple[int, float]:
    """The rank and scaling peft gives `module_name` (the same lookup as `LoraModel._create_and_replace`)."""
    from peft.utils.other import get_pattern_key

    ranks, alphas = config.rank_pattern or {}, config.alpha_pattern or {}
    r = ranks.get(get_pattern_key(list(ranks), module_name), config.r)
    alpha = alphas.get(get_pattern_key(list(alphas), module_name), config.lora_alpha)
    return int(r), (alpha / math.sqrt(r) if config.use_rslora else alpha / r)


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
    config = read_config(folder)
    tensors = _read_tensors(folder)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        parsed = _module_name(key)
        if parsed is None:
            what = "embedding LoRA" if "lora_embedding" in key else "an unknown tensor"
            raise AdapterLoadError(f"{folder}: {key} is {what}; only LoRA on linear layers is supported")
        pairs.setdefault(parsed[0], {})[parsed[1]] = tensor
    if not pairs:
        raise AdapterLoadError(f"{folder}: the adapter holds no LoRA weights")
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
        r, scaling = _rank_and_scaling(config, module_name)
        if a.shape != (r, linear.in_features) or b.shape != (linear.out_features, r):
            raise AdapterLoadError(
                f"{folder}: {module_name}: LoRA shapes {tuple(a.shape)}/{tuple(b.shape)} do not fit "
                f"the base layer ({linear.in_features} -> {linear.out_features}) at rank {r}; "
                "trained on another model?"
            )
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterLoadError(f"{folder}: {module_name}: weights contain NaN or infinity")
        modules[module_name] = LoraModule(
            a.to(device=device, dtype=dtype).contiguous(),
            b.to(device=device, dtype=dtype).contiguous(),
            scaling,
        )
    return LoraAdapter(name, folder, modules)


@dataclass(frozen=True)
class _Plan:
    """How one projection adds the LoRA deltas of the rows in the current forward."""

    a: torch.Tensor  # [k, in, r]: the k adapters' A, transposed, ranks zero-padded to r
    b: torch.Tensor  # [k, r, out]
    b_scaled: torch.Tensor  # [k, r, out]: b times each adapter's scaling
    index: torch.Tensor  # [k * m]: the batch row of each slot (a padding slot repeats a real row)
    scale: torch.Tensor  # [k * m, 1, 1]: the slot's adapter scaling, 0 for padding slots
    k: int
    m: int
    # Every row uses the one adapter, in order (one persona's reply, or a batch of one persona's): the
    # delta is added without gathering and scattering rows, in 4 tensor ops instead of 9 (on one-row
    # decode those ops, not the arithmetic, are the cost).
    whole: float | None = None  # that adapter's scaling
    # The slots are the rows in order (each adapter's rows side by side in equal numbers, none on the
    # base model: the engine orders a decode batch so).
    grouped: bool = False


class MultiLoraLinear(nn.Module):
    """A base `nn.Linear` plus whichever LoRA deltas the current batch's rows use."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.plan: _Plan | None = None  # set per forward by `MultiLora`

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
        return self.add_delta(x, self.base(x))

    def add_delta(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Add the rows' LoRA deltas for input `x` to `y` (this projection's base output, or a view of
        it inside a fused product's output) in place; returns `y`."""
        plan = self.plan
        if plan is None:
            return y
        if plan.whole is not None:
            low = x.reshape(-1, x.shape[-1]).mm(plan.a[0])
            y.view(low.shape[0], -1).addmm_(low, plan.b[0], alpha=plan.whole)
            return y
        if plan.grouped:
            # Each adapter's rows side by side, in equal numbers: a view instead of a gather, and the
            # scaled deltas added in place instead of a scatter.
            low = torch.bmm(x.reshape(plan.k, -1, x.shape[-1]), plan.a)
            y.view(plan.k, -1, y.shape[-1]).baddbmm_(low, plan.b_scaled)
            return y
        rows = x.shape[0]
        x3 = x.reshape(rows, -1, x.shape[-1])
        steps = x3.shape[1]
        grouped = x3.index_select(0, plan.index).view(plan.k, plan.m * steps, -1)
        delta = torch.bmm(torch.bmm(grouped, plan.a), plan.b).view(plan.k * plan.m, steps, -1)
        y3 = y.view(rows, steps, -1)
        y3.index_add_(0, plan.index, delta * plan.scale)
        return y


@dataclass(frozen=True)
class _Stack:
    names: tuple[str, ...]  # the adapters (of the batch) that adapt this projection
    a: torch.Tensor  # [k, in, r]
    b: torch.Tensor  # [k, r, out]
    scaling: torch.Tensor  # [k]
    b_scaled: torch.Tensor  # [k, r, out]: b times each adapter's scaling


class MultiLora:
    """Wraps a model's target projections once and serves any mix of loaded adapters per batch."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.adapters: dict[str, LoraAdapter] = {}
        self.wrapped: dict[str, MultiLoraLinear] = {}
        self._linears: dict[str, nn.Linear] = {}
        self._stack_key: tuple[str, ...] | None = None
        self._stacks: dict[str, _Stack] = {}
        self._rows: list[str | None] = []
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
            self._stacks = {}

    def _build_stacks(self, names: tuple[str, ...]) -> None:
        # The stacked matrices only depend on which adapters a batch uses; consecutive batches with the
        # same set (the steady state) reuse them.
        if names == self._stack_key:
            return
        self._stacks = {}
        for module_name in self.wrapped:
            used = [
                (n, self.adapters[n].modules[module_name])
                for n in names
                if module_name in self.adapters[n].modules
            ]
            if not used:
                continue
            rank = max(m.a.shape[0] for _, m in used)
            linear = self._linears[module_name]
            a = torch.zeros(len(used), linear.in_features, rank, device=self.device, dtype=self.dtype)
            b = torch.zeros(len(used), rank, linear.out_features, device=self.device, dtype=self.dtype)
            for j, (_, m) in enumerate(used):
                r = m.a.shape[0]
                a[j, :, :r] = m.a.T
                b[j, :r, :] = m.b.T
            scaling = torch.tensor([m.scaling for _, m in used], device=self.device, dtype=self.dtype)
            self._stacks[module_name] = _Stack(
                tuple(n for n, _ in used), a, b, scaling, b * scaling.view(-1, 1, 1)
            )
        self._stack_key = names

    def _slots(
        self, rows: Sequence[str | None], names: tuple[str, ...]
    ) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
        """(batch row of each slot, adapter of each slot or -1 for padding, slots per adapter m, whether
        the slots are exactly the rows in order: no padding slot, no row left out)."""
        groups = [[i for i, n in enumerate(rows) if n == name] for name in names]
        m = max(len(g) for g in groups)
        index, owner = [], []
        for j, group in enumerate(groups):
            pad = m - len(group)
            index += group + [group[0] if group else 0] * pad
            owner += [j] * len(group) + [-1] * pad
        in_order = index == list(range(len(rows))) and -1 not in owner
        device = self.device
        return torch.tensor(index, device=device), torch.tensor(owner, device=device), m, in_order

    def _plan(self, rows: Sequence[str | None]) -> None:
        """Give every wrapped projection its plan for a forward over `rows` (adapter name per row).

        The stacks are those of the whole batch (`activate`); an adapter with no row among `rows` (a
        prefill group) just gets zero-weighted slots.
        """
        if all(n is None for n in rows):
            for wrapper in self.wrapped.values():
                wrapper.plan = None
            return
        slots: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor, int, bool]] = {}
        # One adapter on every row: its projections add their deltas without gathering rows (`_Plan.whole`).
        single = (rows[0],) if all(n == rows[0] for n in rows) else None
        for module_name, wrapper in self.wrapped.items():
            stack = self._stacks.get(module_name)
            if stack is None:
                wrapper.plan = None
                continue
            if stack.names not in slots:
                slots[stack.names] = self._slots(rows, stack.names)
            index, owner, m, in_order = slots[stack.names]
            if m == 0:  # none of these rows uses an adapter of this projection
                wrapper.plan = None
                continue
            scale = torch.where(owner >= 0, stack.scaling[owner.clamp(min=0)], 0.0).view(-1, 1, 1)
            # The slots are then the rows in order: no padding, no gather.
            whole = float(stack.scaling[0]) if stack.names == single else None
            grouped = whole is None and in_order
            wrapper.plan = _Plan(
                stack.a, stack.b, stack.b_scaled, index, scale, len(stack.names), m, whole, grouped
            )

    def activate(self, row_adapters: Sequence[str | None]) -> None:
        """Set each row's adapter (None: the base model) for the next forward passes."""
        for name in row_adapters:
            if name is not None and name not in self.adapters:
                raise KeyError(f"LoRA adapter {name!r} is not loaded")
        self._rows = list(row_adapters)
        names = tuple(sorted({n for n in self._rows if n is not None}))
        if names:
            self._build_stacks(names)
        self._plan(self._rows)

    def select_rows(self, rows: slice) -> None:
        """Restrict the next forwards to a slice of the activated rows (a prefill group)."""
        self._plan(self._rows[rows])

    def keep_rows(self, index: torch.Tensor) -> None:
        """Drop finished rows for good: the batch was compacted to the rows in `index`."""
        self._rows = [self._rows[i] for i in index.tolist()]
        self._plan(self._rows)

    def deactivate(self) -> None:
        self._rows = []
        for wrapper in self.wrapped.values():
            wrapper.plan = None

"""Where each part of the model lives: on one device, or spread over GPUs and CPU (`--device-map auto`).

A spread model is cut between decoder layers, never inside one. Everything that touches the inputs
(embeddings, vision and speech towers, projectors, rotary tables) stays on the first device, where the
prompt is assembled and tokens are sampled; the layers then fill the devices in order (GPU 0, GPU 1, …,
CPU), and the final norm and `lm_head` follow the last layer. The decoder moves its activations to each
layer's device (`LyraTextModel.forward_layer`) and back at the end, so nothing outside the decoder needs to
know the plan; each layer's KV cache lives with its layer.

We plan ourselves rather than with accelerate's `infer_auto_device_map`, which walks the modules in
registration order and would put the towers (registered after the layers) on the last device, i.e. on the
CPU; and our size estimate knows the 8/4-bit layers' packed sizes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from lyra_cli.errors import RuntimeSetupError, UsageError, setting

LAYERS_PREFIX = "model.layers"
TAIL_MODULES = ("model.norm", "lm_head")
# Left free on each GPU by `auto` budgets: activations, the KV cache of a long prompt, CUDA's own context.
GPU_RESERVE_FRACTION = 0.15
CPU_RESERVE_BYTES = 2 << 30  # left to the OS and the rest of the process
# Bytes per parameter of a decoder linear weight once quantized (4-bit: two per byte, plus a blockwise
# absmax per 64 weights, itself 8-bit with double quantization).
QUANTIZED_BYTES_PER_PARAM = {"8bit": 1.0, "4bit": 0.5 + 1 / 64}
MAX_MEMORY = setting("max_memory")  # named in errors; `--max-memory` on the command line
SIZE_UNITS = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}


@dataclass(frozen=True)
class Placement:
    """The device of every module: `main` unless a longer-named entry of `modules` says otherwise."""

    main: torch.device
    modules: dict[str, torch.device] = field(default_factory=dict)

    @property
    def spread(self) -> bool:
        return any(device != self.main for device in self.modules.values())

    def device_for(self, name: str) -> torch.device:
        """The device of a module or parameter name (`model.layers.3.mlp.up_proj.weight`)."""
        while name:
            if name in self.modules:
                return self.modules[name]
            name = name.rpartition(".")[0]
        return self.main

    def describe(self) -> str:
        """e.g. `cuda:0 inputs + layers 0–17 · cpu layers 18–27 + lm_head`."""
        parts: dict[torch.device, list[str]] = {self.main: ["inputs"]}
        layers = sorted(int(k.rsplit(".", 1)[1]) for k in self.modules if k.startswith(f"{LAYERS_PREFIX}."))
        for device, group in _runs([(i, self.device_for(f"{LAYERS_PREFIX}.{i}")) for i in layers]):
            parts.setdefault(device, []).append(f"layers {group[0]}–{group[-1]}" if len(group) > 1 else f"layer {group[0]}")
        parts.setdefault(self.device_for("lm_head"), []).append("lm_head")
        return " · ".join(f"{device} {' + '.join(names)}" for device, names in parts.items())


def _runs(items: list[tuple[int, torch.device]]) -> list[tuple[torch.device, list[int]]]:
    runs: list[tuple[torch.device, list[int]]] = []
    for index, device in items:
        if runs and runs[-1][0] == device:
            runs[-1][1].append(index)
        else:
            runs.append((device, [index]))
    return runs


# ---------------------------------------------------------------------------------------------- budgets


def parse_max_memory(spec: str) -> dict[str, int]:
    """`0=20GiB,1=20GiB,cpu=64GiB` -> {"cuda:0": bytes, "cuda:1": bytes, "cpu": bytes}; UsageError if malformed."""
    budgets: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, size = part.partition("=")
        name = name.strip().lower()
        if not sep or not (name == "cpu" or name.isdigit()):
            raise UsageError(f"cannot read {MAX_MEMORY} part `{part}`", f"e.g. {MAX_MEMORY} 0=20GiB,1=20GiB,cpu=64GiB")
        budgets["cpu" if name == "cpu" else f"cuda:{int(name)}"] = _parse_size(size.strip(), part)
    if not budgets:
        raise UsageError(f"{MAX_MEMORY} is empty", f"e.g. {MAX_MEMORY} 0=20GiB,cpu=64GiB")
    return budgets


def _parse_size(text: str, part: str) -> int:
    lowered = text.lower()
    for unit in sorted(SIZE_UNITS, key=len, reverse=True):
        if lowered.endswith(unit):
            number = lowered[: -len(unit)].strip()
            try:
                return int(float(number) * SIZE_UNITS[unit])
            except ValueError:
                break
    raise UsageError(f"cannot read the size in {MAX_MEMORY} `{part}`", "sizes look like 20GiB, 512MiB or 8GB")


def auto_budgets(max_memory: dict[str, int] | None) -> list[tuple[torch.device, int]]:
    """Bytes of weights each device may take, GPUs first in index order, then the CPU.

    Without --max-memory: every visible GPU's free memory less GPU_RESERVE_FRACTION of its total, then the
    memory the OS reports available less CPU_RESERVE_BYTES. With it, only the devices it names."""
    if max_memory is not None:
        gpus = sorted((name for name in max_memory if name != "cpu"), key=lambda n: int(n.split(":")[1]))
        visible = torch.cuda.device_count()
        for name in gpus:
            if int(name.split(":")[1]) >= visible:
                raise RuntimeSetupError(f"{MAX_MEMORY} names {name}, but {visible} GPU(s) are visible",
                                        "name 0…n-1 or cpu")  # fmt: skip
        names = gpus + (["cpu"] if "cpu" in max_memory else [])
        return [(torch.device(name), max_memory[name]) for name in names]
    budgets = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        budgets.append((torch.device("cuda", i), max(0, int(free - GPU_RESERVE_FRACTION * total))))
    budgets.append((torch.device("cpu"), max(0, _available_host_bytes() - CPU_RESERVE_BYTES)))
    return budgets


def _available_host_bytes() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume the weights fit
        return 1 << 62


# ---------------------------------------------------------------------------------------------- planning


def module_sizes(model: nn.Module, dtype: torch.dtype, quantization: str = "none") -> dict[str, int]:
    """Bytes each placement unit needs once loaded: `model.layers.{i}`, `model.norm`, `lm_head`, and
    everything else together under "" (the inputs' side). Works on a meta model; a tied `lm_head` counts
    once, with the embeddings."""
    sizes: dict[str, float] = {}
    float_bytes = torch.empty((), dtype=dtype).element_size()
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        seen.add(id(param))
        unit = placement_unit(name)
        per_param = param.element_size() if not param.is_floating_point() else float_bytes
        if quantization != "none" and unit.startswith(f"{LAYERS_PREFIX}.") and name.endswith("_proj.weight"):
            per_param = QUANTIZED_BYTES_PER_PARAM[quantization]
        sizes[unit] = sizes.get(unit, 0) + param.numel() * per_param
    return {unit: int(size) for unit, size in sizes.items()}


def placement_unit(name: str) -> str:
    """The unit a parameter name is placed with: its decoder layer, the norm, `lm_head`, or "" (inputs)."""
    if name.startswith(f"{LAYERS_PREFIX}."):
        return ".".join(name.split(".")[:3])
    return next((unit for unit in TAIL_MODULES if name == unit or name.startswith(f"{unit}.")), "")


def plan_placement(
    sizes: dict[str, int], n_layers: int, budgets: list[tuple[torch.device, int]], *, tied_lm_head: bool = False
) -> Placement:
    """Fill the devices in order: the inputs' side on the first, then layer after layer, then the tail.

    A unit goes to the current device while it fits, else to the next one; a device is never revisited,
    so the activations cross each boundary once. A tied `lm_head` is the embedding matrix, so it stays on
    the first device. RuntimeSetupError when the devices together are too small."""
    if not budgets:
        raise RuntimeSetupError("no device to place the model on", f"check {MAX_MEMORY}")
    units = ["", *(f"{LAYERS_PREFIX}.{i}" for i in range(n_layers)), *TAIL_MODULES]
    left = [budget for _, budget in budgets]
    current, modules = 0, {}
    for unit in units:
        size = sizes.get(unit, 0)
        if unit:  # the inputs' side must stay on the first device
            while current < len(budgets) - 1 and size > left[current]:
                current += 1
        if size > left[current]:
            needed, offered = sum(sizes.values()), sum(budget for _, budget in budgets)
            raise RuntimeSetupError(
                f"the model needs {needed / 2**30:.1f} GiB but the devices offer {offered / 2**30:.1f} GiB "
                f"(`{unit or 'embeddings and towers'}` does not fit on {budgets[current][0]})",
                f"use --load-4bit or --load-8bit, or raise {MAX_MEMORY}",
            )
        left[current] -= size
        if unit:
            modules[unit] = budgets[current][0]
    if tied_lm_head:
        modules["lm_head"] = budgets[0][0]
    return Placement(budgets[0][0], modules)

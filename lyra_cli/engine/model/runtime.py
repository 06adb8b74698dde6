"""Device, dtype, quantization and placement: resolved once, each with the reason it was chosen.

Nothing below this module calls `.cuda()` or names a float type: everything asks the `Runtime`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import torch

from lyra_cli.errors import RuntimeSetupError, UsageError, setting

log = logging.getLogger(__name__)

DeviceName = Literal["auto", "cpu", "cuda", "mps"]
DtypeName = Literal["auto", "bf16", "fp16", "fp32"]
Quantization = Literal["none", "8bit", "4bit"]

DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda", "mps")
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
QUANTIZATIONS: tuple[str, ...] = ("none", "8bit", "4bit")
DEVICE_MAPS: tuple[str, ...] = ("none", "auto")
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# Settings named in errors (the command line shows them as flags: `--device`).
DEVICE, DEVICE_MAP, MAX_MEMORY = setting("device"), setting("device_map"), setting("max_memory")


@dataclass(frozen=True)
class DeviceMap:
    """Spread the model over the GPUs and the CPU, cut between decoder layers (`placement.py`), with
    optional per-device weight budgets: `max_memory` like `0=20GiB,cpu=64GiB` (None: what is free)."""

    max_memory: str | None = None


@dataclass(frozen=True)
class RuntimeRequest:
    """What the user asked for on the command line."""

    device: str = "auto"
    dtype: str = "auto"
    quantization: str = "none"
    device_map: str = "none"  # "auto": spread over GPUs and CPU (engine/model/placement.py)
    max_memory: str | None = None  # `0=20GiB,cpu=64GiB`: per-device weight budgets for the device map

    def validate(self) -> None:
        _check_choice(setting("device"), self.device, DEVICES)
        _check_choice(setting("dtype"), self.dtype, ("auto", *DTYPES))
        _check_choice("quantization", self.quantization, QUANTIZATIONS)
        _check_choice(setting("device_map"), self.device_map, DEVICE_MAPS)
        if self.device_map == "auto" and self.device not in ("auto", "cuda"):
            raise UsageError(f"{DEVICE_MAP} auto spreads over GPUs; it cannot go with {DEVICE} {self.device}",
                             f"use {DEVICE} auto or cuda, or drop {DEVICE_MAP}")  # fmt: skip
        if self.max_memory is not None:
            if self.device_map != "auto":
                raise UsageError(f"{MAX_MEMORY} only applies with {DEVICE_MAP} auto", f"add {DEVICE_MAP} auto")
            from lyra_cli.engine.model.placement import parse_max_memory

            parse_max_memory(self.max_memory)

    @classmethod
    def of(cls, device: str, dtype: str, quantization: str, device_map: DeviceMap | None) -> RuntimeRequest:
        """The request of a library call: `device_map` None keeps the model on `device`."""
        if device_map is None:
            return cls(device, dtype, quantization)
        return cls(device, dtype, quantization, "auto", device_map.max_memory)


@dataclass(frozen=True)
class Runtime:
    """The resolved placement and numeric format of a model, with reasons for the header."""

    device: torch.device  # the main device: inputs, towers, sampling (and every layer, unless spread)
    dtype: torch.dtype
    quantization: str
    reasons: tuple[str, ...] = field(default=())
    max_memory: dict[str, int] | None = None  # with a device map: budgets per device, None = what is free
    device_map: str = "none"

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]

    def describe(self) -> str:
        quant = "" if self.quantization == "none" else f", {self.quantization}"
        return f"{self.device.type}, {self.dtype_name}{quant}"


def _map_devices(device: torch.device, max_memory: dict[str, int] | None) -> str:
    if device.type != "cuda":
        return f"{device.type} only (no GPU to spread over)"
    if max_memory is not None:
        return ", ".join(max_memory)
    return f"{torch.cuda.device_count()} GPU(s) and the CPU"


def _check_choice(flag: str, value: str, choices: tuple[str, ...] | list[str]) -> None:
    if value not in choices:
        raise UsageError(f"unknown {flag} value `{value}`", f"choose one of: {', '.join(choices)}")


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def _resolve_device(name: str) -> tuple[torch.device, str]:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda"), "cuda: a CUDA GPU is available"
        if _mps_available():
            return torch.device("mps"), "mps: Apple GPU available, no CUDA"
        return torch.device("cpu"), "cpu: no CUDA or MPS device found"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeSetupError(f"`{DEVICE} cuda` was asked for but no CUDA GPU is visible",
                                f"use {DEVICE} cpu or auto")  # fmt: skip
    if name == "mps" and not _mps_available():
        raise RuntimeSetupError(f"`{DEVICE} mps` was asked for but MPS is not available", f"use {DEVICE} cpu or auto")
    return torch.device(name), f"{name}: requested"


def _resolve_dtype(name: str, device: torch.device) -> tuple[torch.dtype, str]:
    if name != "auto":
        dtype = DTYPES[name]
        if device.type == "cpu" and dtype == torch.float16:
            return dtype, "fp16: requested (slow on CPU; bf16 or fp32 are faster there)"
        return dtype, f"{name}: requested"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            # The release weights are stored in bf16; bf16 keeps their range (the authors' fp16 can overflow).
            return torch.bfloat16, "bf16: the weights' own format, supported by this GPU"
        return torch.float16, "fp16: this GPU has no bf16"
    if device.type == "mps":
        return torch.float16, "fp16: the fastest format MPS supports"
    return torch.float32, "fp32: CPU kernels are fastest and exact in fp32"


def resolve_runtime(request: RuntimeRequest) -> Runtime:
    """Turn the user's request into a concrete runtime, or fail with a reason before any weights load."""
    request.validate()
    device, device_reason = _resolve_device(request.device)
    dtype, dtype_reason = _resolve_dtype(request.dtype, device)
    reasons = [f"device {device_reason}", f"dtype {dtype_reason}"]
    if request.quantization != "none":
        if device.type == "mps":
            raise RuntimeSetupError("8/4-bit loading is not supported on MPS", f"use {DEVICE} cpu or a CUDA GPU")
        reasons.append(f"quantization {request.quantization}: requested (bitsandbytes)")
    max_memory = None
    if request.device_map == "auto":
        from lyra_cli.engine.model.placement import parse_max_memory

        max_memory = parse_max_memory(request.max_memory) if request.max_memory is not None else None
        reasons.append(f"device map auto: layers over {_map_devices(device, max_memory)}, cut between layers")
    runtime = Runtime(device, dtype, request.quantization, tuple(reasons), max_memory, request.device_map)
    log.info("runtime: %s (%s)", runtime.describe(), "; ".join(reasons))
    return runtime


# glibc mallopt parameter: allocations at or above this size get their own mmap, returned on free.
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's initial value, kept fixed


def keep_large_buffers_off_the_heap() -> bool:
    """Make glibc give large temporary buffers back to the OS as soon as they are freed.

    glibc raises its mmap threshold each time a large mmapped buffer is freed, so the encoder's
    per-batch temporaries (tens of MB of STFT and activations) soon land on the brk heap, where
    fragmentation makes the process grow with every batch: +140 MB over an hour of audio on the tiny
    model. A fixed threshold keeps the audio stage's memory flat. No-op (False) off glibc.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False

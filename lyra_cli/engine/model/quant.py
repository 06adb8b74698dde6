"""8-bit and 4-bit weights through bitsandbytes: swap loaded `nn.Linear` layers for bnb layers in place.

bitsandbytes quantizes a layer's weight when the layer is moved to a device (`.to(device)`), so each
replacement is built on the meta device (no throw-away random init), handed the real weight, and moved to
the device the original weight was on. On CPU (bitsandbytes >= 0.49):

- 8-bit (LLM.int8()) runs in eval mode as an int8 matmul with fp16 outlier columns; activations are cast to
  fp16 for quantization, which bitsandbytes logs on *every* call unless the input is fp16 (we let that
  warning through once). In training mode it dequantizes and runs a plain float matmul.
- 4-bit runs, at the first eval/no-grad call on a CPU with AVX512-BF16, through a repacked layout
  (`_convert_weight_packed_for_cpu`): it needs in_features % 64 == 0 and out_features % 32 == 0, and it
  replaces the double-quantized statistics by plain bf16 ones. Layers of other shapes are therefore kept in
  full precision on CPU (logged), instead of failing at their first forward.
"""

from __future__ import annotations

import logging
from typing import Callable, Literal

import torch
from torch import nn

from lyra_cli.errors import MissingDependencyError

log = logging.getLogger(__name__)

QuantMode = Literal["8bit", "4bit"]
QUANT_MODES: tuple[QuantMode, ...] = ("8bit", "4bit")
INT8_OUTLIER_THRESHOLD = 6.0  # LLM.int8(): activation columns above this stay in fp16
NF4 = "nf4"
# bitsandbytes' 4-bit block size and the CPU packed kernel's output tile: shape constraints on CPU.
NF4_BLOCKSIZE = 64
CPU_4BIT_OUT_TILE = 32
_INT8_CAST_LOGGER = "bitsandbytes.autograd._functions"


def describe_quantization(mode: QuantMode, compute_dtype: torch.dtype | None = None) -> str:
    """One line for the run header, e.g. "4-bit NF4, double quantization, compute bf16"."""
    _check_mode(mode)
    compute = f", compute {_short_dtype(compute_dtype)}" if compute_dtype is not None else ""
    if mode == "8bit":
        return f"8-bit LLM.int8(), outlier threshold {INT8_OUTLIER_THRESHOLD:g}{compute}"
    return f"4-bit NF4, double quantization{compute}"


def quantize_linears(
    module: nn.Module,
    mode: QuantMode,
    *,
    compute_dtype: torch.dtype,
    skip: Callable[[str], bool] = lambda name: False,
    device_for: Callable[[str], torch.device] | None = None,
) -> int:
    """Replace every plain `nn.Linear` below `module` (qualified names not `skip`ped) by a bnb layer.

    The linears must already hold their real weights; each is quantized onto `device_for(name)` (default:
    where its weight is) and keeps its bias. The loader stages the weights on the CPU and quantizes onto the GPU one
    layer at a time, so the GPU never holds the full-precision decoder. A linear that stays in full
    precision (skipped, or a shape the CPU kernel lacks) is moved to its device as it is. Returns the number
    of layers replaced. Subclasses of `nn.Linear` are left alone: some (e.g.
    `nn.MultiheadAttention.out_proj`) are read by weight, not called.
    """
    _check_mode(mode)
    bnb = _import_bitsandbytes()
    if mode == "8bit":
        _log_int8_cast_once()
    targets = [(name, child) for name, child in module.named_modules() if type(child) is nn.Linear and name]
    replaced = 0
    for name, linear in targets:
        target = linear.weight.device if device_for is None else torch.device(device_for(name))
        if skip(name) or not _quantizable(name, linear, mode, target):
            linear.to(target)
            continue
        if mode == "8bit":
            new = _int8_linear(bnb, linear, target)
        else:
            new = _nf4_linear(bnb, linear, compute_dtype, target)
        parent_name, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent_name), attr, new)
        replaced += 1
    log.debug("quantized %d linear layers: %s", replaced, describe_quantization(mode, compute_dtype))
    return replaced


def _int8_linear(bnb, linear: nn.Linear, device: torch.device) -> nn.Module:  # type: ignore[no-untyped-def]
    layer = bnb.nn.Linear8bitLt(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        has_fp16_weights=False,
        threshold=INT8_OUTLIER_THRESHOLD,
        device="meta",
    )
    # Int8Params quantizes only when moved *from* CPU: a CUDA weight takes one round trip.
    layer.weight = bnb.nn.Int8Params(linear.weight.data.cpu(), requires_grad=False, has_fp16_weights=False)
    layer.bias = linear.bias
    return layer.to(device).train(linear.training)


def _nf4_linear(bnb, linear: nn.Linear, compute_dtype: torch.dtype, device: torch.device) -> nn.Module:  # type: ignore[no-untyped-def]
    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=True,
        quant_type=NF4,
        device="meta",
    )
    layer.weight = bnb.nn.Params4bit(
        linear.weight.data, requires_grad=False, compress_statistics=True, quant_type=NF4, module=layer
    )
    layer.bias = linear.bias
    return layer.to(device).train(linear.training)


def _quantizable(name: str, linear: nn.Linear, mode: QuantMode, target: torch.device) -> bool:
    if linear.weight.device.type == "meta":
        raise ValueError(f"`{name}` has no weights yet (meta device): load the checkpoint before quantizing")
    if mode == "4bit" and target.type == "cpu":
        fits = linear.in_features % NF4_BLOCKSIZE == 0 and linear.out_features % CPU_4BIT_OUT_TILE == 0
        if not fits:
            log.warning(
                "keeping `%s` (%d -> %d) in full precision: bitsandbytes' CPU 4-bit kernel needs in_features "
                "divisible by %d and out_features by %d",
                name, linear.in_features, linear.out_features, NF4_BLOCKSIZE, CPU_4BIT_OUT_TILE,
            )  # fmt: skip
        return fits
    return True


def _import_bitsandbytes():  # type: ignore[no-untyped-def]
    try:
        import bitsandbytes
    except ImportError as exc:
        raise MissingDependencyError("bitsandbytes", "8-bit and 4-bit loading", extra="quant") from exc
    return bitsandbytes


class _FirstOnly(logging.Filter):
    """Let a record through the first time its message (with arguments) is seen."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def _log_int8_cast_once() -> None:
    # MatMul8bitLt warns "inputs will be cast ... to float16" on every forward of every layer when the
    # activations are fp32/bf16: one line is information, thousands per token are noise.
    bnb_log = logging.getLogger(_INT8_CAST_LOGGER)
    if not any(isinstance(f, _FirstOnly) for f in bnb_log.filters):
        bnb_log.addFilter(_FirstOnly())


def _check_mode(mode: str) -> None:
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization mode `{mode}`; valid: {', '.join(QUANT_MODES)}")


def _short_dtype(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))

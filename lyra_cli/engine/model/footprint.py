"""How much memory a model folder needs at each precision, from the safetensors headers alone (torch-free).

The figures follow what the loader does (loader.py): with 8/4-bit only the decoder's linear weights
(`model.layers.*_proj.weight`) are quantized; everything else — embeddings, norms, lm_head, towers,
projectors, adapters — stays in the compute dtype. The KV cache grows with the prompt:
2 (keys and values) × layers × KV heads × head width × bytes per value, per token.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lyra_cli.engine.model.config import LyraConfig
from lyra_cli.engine.model.towers import (
    SPEECH_PREFIX,
    VISION_PREFIX,
    ModelSources,
    TensorInfo,
    safetensors_header,
    tower_folder_tensors,
)

# Kept in full precision when quantizing: everything but the decoder's linear layers (norms, embeddings,
# lm_head, towers and projectors are small or precision-sensitive). The loader stages and quantizes by this rule.
QUANTIZED_SCOPE = "model.layers."
COMPUTE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# The compute dtype each device gets with `--dtype auto` (runtime.py): bf16 on a GPU, fp16 on MPS, fp32 on CPU.
DEVICE_DTYPES = {"cuda": "bf16", "mps": "fp16", "cpu": "fp32"}
INT8_BYTES = 1.0
INT8_ROW_STATS_BYTES = 4  # LLM.int8(): one fp32 scale per output row
NF4_BYTES = 0.5
NF4_BLOCK = 64  # one absmax per 64 weights …
NF4_DOUBLE_QUANT_BLOCK = 256  # … quantized to 8 bits, with one fp32 scale per 256 absmax values
NF4_OVERHEAD_BYTES = 1 / NF4_BLOCK + 4 / (NF4_BLOCK * NF4_DOUBLE_QUANT_BLOCK)
KV_TOKENS = 1000
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# adapters.ADAPTER_DIRS' folders, in its order (adapters.py imports torch; a test keeps the two equal)
ADAPTER_FOLDERS = ("speech_lora", "long_speech_lora")
GIB = 1024**3


def numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def in_quantized_linear(key: str) -> bool:
    """`model.layers.{i}.self_attn.q_proj.weight` and the like: a parameter (weight or bias) of a decoder linear."""
    return key.startswith(QUANTIZED_SCOPE) and key.rpartition(".")[0].endswith("_proj")


def is_quantized_weight(key: str) -> bool:
    """The weight of a decoder linear: stored at 8 or 4 bits when quantizing (its bias stays full precision)."""
    return in_quantized_linear(key) and key.endswith(".weight")


@dataclass(frozen=True)
class ParameterCounts:
    quantizable: int  # decoder linear weights
    rest: int  # everything else the model holds
    quantizable_rows: int  # output rows of those weights (8-bit keeps a scale per row)

    @property
    def total(self) -> int:
        return self.quantizable + self.rest


def count_parameters(tensors: Mapping[str, TensorInfo], extra: Mapping[str, TensorInfo] | None = None) -> ParameterCounts:
    """`tensors`: the model's weights as the loader reads them; `extra`: adapters and other loaded parts."""
    quantizable = rest = rows = 0
    for key, info in tensors.items():
        if is_quantized_weight(key):
            quantizable += numel(info.shape)
            rows += info.shape[0]
        else:
            rest += numel(info.shape)
    rest += sum(numel(info.shape) for info in (extra or {}).values())
    return ParameterCounts(quantizable, rest, rows)


@dataclass(frozen=True)
class MemoryRow:
    precision: str  # "bf16", "fp32", "8-bit", "4-bit"
    weights_bytes: int
    kv_bytes_per_1k: int

    def to_dict(self) -> dict[str, object]:
        return {"precision": self.precision, "weights_bytes": self.weights_bytes,
                "kv_cache_bytes_per_1k_tokens": self.kv_bytes_per_1k}  # fmt: skip


def kv_bytes_per_1k(config: LyraConfig, compute_bytes: int) -> int:
    text = config.text
    return 2 * text.num_layers * text.num_kv_heads * text.head_dim * KV_TOKENS * compute_bytes


def memory_table(counts: ParameterCounts, config: LyraConfig, compute: str) -> list[MemoryRow]:
    """Weights and KV cache at full precision (`compute`), 8-bit and 4-bit, the rest in `compute`."""
    unit = COMPUTE_BYTES[compute]
    kv = kv_bytes_per_1k(config, unit)
    rest = counts.rest * unit
    int8 = counts.quantizable * INT8_BYTES + counts.quantizable_rows * INT8_ROW_STATS_BYTES
    nf4 = counts.quantizable * (NF4_BYTES + NF4_OVERHEAD_BYTES)
    return [
        MemoryRow(compute, counts.total * unit, kv),
        MemoryRow("8-bit", round(rest + int8), kv),
        MemoryRow("4-bit", round(rest + nf4), kv),
    ]


def loaded_tensors(shards: Mapping[str, TensorInfo], sources: ModelSources, config: LyraConfig) -> dict[str, TensorInfo]:
    """The weights the loader keeps: the shards, each tower from its folder when it holds weights
    (checkpoint.use_tower_folder), no tower the config does not use, no lm_head when it is tied."""
    tensors = dict(shards)
    for prefix, resolved in ((VISION_PREFIX, sources.vision), (SPEECH_PREFIX, sources.speech)):
        folder = tower_folder_tensors(resolved.located.path, prefix) if resolved is not None else {}
        if resolved is None or folder:
            tensors = {k: t for k, t in tensors.items() if not k.startswith(prefix)}
        tensors.update(folder)
    if config.text.tie_word_embeddings:
        tensors = {k: t for k, t in tensors.items() if not k.startswith("lm_head.")}
    return tensors


def adapter_tensors(model_dir: Path) -> dict[str, TensorInfo]:
    """The LoRA weights of each adapter folder present (as `folder/key`); the loader injects them all."""
    tensors: dict[str, TensorInfo] = {}
    for folder in ADAPTER_FOLDERS:
        path = model_dir / folder / ADAPTER_WEIGHTS
        if not path.is_file():
            continue
        for key, entry in safetensors_header(path).items():
            tensors[f"{folder}/{key}"] = TensorInfo(tuple(entry["shape"]), str(entry["dtype"]))
    return tensors

"""`lyra train merge`: fold a LoRA adapter and its speech projector into a full model folder.

The result is a release-layout folder without adapter folders, whose decoder weights are
W + scaling · B·A for every LoRA target and whose `model.mm_speech_projector.*` are the adapter's own
projector: what the authors' stage 4 starts from ("stage-2 model with speech_lora merged",
docs/authors-behaviour.md#training-stages), and a model that answers speech without PEFT installed.

The merge streams shard by shard (one shard in memory at a time, the LoRA deltas computed in fp32 and
rounded once), writes into a staging folder beside `out` and renames it into place at the end: an
interrupted merge leaves no `out`. `config.json` gains `merged_adapter`, so the loader knows why the
adapter folders are absent and routes speech to the merged weights without a warning.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from lyra_cli.engine.model.adapters import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_DIRS,
    MERGED_KEY,
    PROJECTOR_FILE,
    Adapter,
    lora_numbers,
    lora_state,
    projector_state,
)
from lyra_cli.engine.model.checkpoint import INDEX_FILE, SINGLE_FILE, load_safetensors, weight_files
from lyra_cli.engine.model.config import CONFIG_FILE, read_json
from lyra_cli.errors import CheckpointError, LyraError

PROJECTOR_PREFIX = "model.mm_speech_projector."
LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"
SAVE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

ProgressFn = Callable[[int, int], None]  # (shards done, shards in all)


@dataclass(frozen=True)
class MergeReport:
    out: Path
    merged_layers: int  # weight matrices that received a LoRA delta
    projector_tensors: int  # projector tensors replaced by the adapter's
    dropped: tuple[str, ...]  # adapter folders not carried over


@dataclass(frozen=True)
class _Lora:
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]  # checkpoint weight key -> (A (r, in), B (out, r))
    scaling: float


def _read_lora(folder: Path, adapter: Adapter) -> _Lora:
    scaling = lora_numbers(folder).scaling
    state = lora_state(folder)
    pairs = {}
    for key in state:
        if key.endswith(LORA_A):
            module = key.removesuffix(LORA_A)
            if module + LORA_B not in state:
                raise CheckpointError(f"`{folder.name}` has `{key}` but no `{module}{LORA_B}`", "re-export the adapter")
            pairs[module + ".weight"] = (state[key], state[module + LORA_B])
    if not pairs:
        raise CheckpointError(f"`{folder}` holds no LoRA weights", f"is it a {adapter.value} adapter folder?")
    return _Lora(pairs, scaling)


def _shards(model_dir: Path) -> dict[str, list[str]]:
    """shard file name -> its keys, from the index (or the single file), checked as the loader checks them."""
    files = weight_files(model_dir)
    if files is None:
        raise CheckpointError(f"`{model_dir}` holds no `{INDEX_FILE}` or `{SINGLE_FILE}`",
                              "point --model at a Lyra release folder")  # fmt: skip
    grouped: dict[str, list[str]] = {}
    for key, path in files.items():
        grouped.setdefault(path.name, []).append(key)
    return grouped


def merge_adapter(
    model_dir: Path,
    adapter: Adapter,
    out: Path,
    *,
    adapter_dir: Path | None = None,
    save_dtype: str | None = None,
    on_progress: ProgressFn | None = None,
) -> MergeReport:
    """Write `out`: `model_dir` with `adapter` (its folder in `model_dir`, or `adapter_dir`) merged in.

    save_dtype (bf16/fp16/fp32) converts every floating weight; None keeps each tensor's stored dtype.
    """
    if adapter is Adapter.NONE:
        raise LyraError("there is no adapter to merge for `none`", "choose speech or long_speech")
    folder = adapter_dir or model_dir / ADAPTER_DIRS[adapter]
    if not (folder / ADAPTER_CONFIG_FILE).is_file():
        raise CheckpointError(f"no adapter in `{folder}` (no {ADAPTER_CONFIG_FILE})",
                              "pass --adapter-folder with a trained adapter, e.g. OUT/speech_lora")  # fmt: skip
    if out.exists() and any(out.iterdir()):
        raise LyraError(f"`{out}` already exists and is not empty", "choose a new folder for the merged model")
    config = read_json(model_dir / CONFIG_FILE)
    lora = _read_lora(folder, adapter)
    projector = {PROJECTOR_PREFIX + k: v for k, v in projector_state(folder / PROJECTOR_FILE).items()} \
        if (folder / PROJECTOR_FILE).is_file() else {}  # fmt: skip
    target = SAVE_DTYPES[save_dtype] if save_dtype else None
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.merging-", dir=out.parent))
    try:
        merged, replaced = _write_shards(model_dir, staging, lora, projector, target, on_progress)
        dropped = _copy_rest(model_dir, staging)
        if save_dtype:
            config["torch_dtype"] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[save_dtype]
        config[MERGED_KEY] = adapter.value
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if out.exists():
            out.rmdir()  # empty, checked above
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return MergeReport(out, merged, replaced, dropped)


def _write_shards(
    model_dir: Path,
    staging: Path,
    lora: _Lora,
    projector: dict[str, torch.Tensor],
    target: torch.dtype | None,
    on_progress: ProgressFn | None,
) -> tuple[int, int]:
    shards = _shards(model_dir)
    pending_lora, pending_projector = set(lora.pairs), set(projector)
    total_bytes = 0
    for done, name in enumerate(sorted(shards), start=1):
        tensors = load_safetensors(model_dir / name)
        for key, value in tensors.items():
            dtype = target if target is not None and value.is_floating_point() else value.dtype
            if key in lora.pairs:
                a, b = lora.pairs[key]
                value = value.float() + lora.scaling * (b.float() @ a.float())
                pending_lora.discard(key)
            elif key in projector:
                value = projector[key]
                pending_projector.discard(key)
            tensors[key] = value.to(dtype).contiguous()
            total_bytes += tensors[key].numel() * tensors[key].element_size()
        save_file(tensors, str(staging / name), metadata={"format": "pt"})
        if on_progress is not None:
            on_progress(done, len(shards))
    if pending_lora or pending_projector:
        missing = sorted(pending_lora | pending_projector)
        raise CheckpointError(f"the adapter does not fit this model: {len(missing)} of its weights have no "
                              f"counterpart, e.g. `{missing[0]}`", "was it trained on this base model?")  # fmt: skip
    if (model_dir / INDEX_FILE).is_file():
        index = read_json(model_dir / INDEX_FILE)
        index["metadata"] = {**index.get("metadata", {}), "total_size": total_bytes}  # changes with save_dtype
        (staging / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return len(lora.pairs), len(projector)


def _copy_rest(model_dir: Path, staging: Path) -> tuple[str, ...]:
    """Everything else (tokenizer, towers, generator, vocoder...), without the adapter folders."""
    skipped = {*ADAPTER_DIRS.values(), CONFIG_FILE, INDEX_FILE, *(p.name for p in staging.iterdir())}
    for path in sorted(model_dir.iterdir()):
        if path.name in skipped:
            continue
        if path.is_dir():
            shutil.copytree(path, staging / path.name)
        else:
            shutil.copy2(path, staging / path.name)
    return tuple(d for d in ADAPTER_DIRS.values() if (model_dir / d).is_dir())

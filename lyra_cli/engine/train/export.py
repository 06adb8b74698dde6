"""Write trained weights in the layout the release uses, so `lyra chat --model` loads them as they are.

- stage 2/3: an adapter folder (`speech_lora/` or `long_speech_lora/`) holding a PEFT adapter
  (`adapter_config.json`, `adapter_model.safetensors` with `base_model.model.model.layers.{i}.….lora_A.weight`
  keys), `non_lora_trainables.bin` (the speech projector, keys `model.model.mm_speech_projector.*`, bf16)
  and a `config.json` snapshot (docs/release-format.md#adapters);
- stage 1: `mm_speech_projector.bin` (keys `model.mm_speech_projector.*`), the authors' stage-1 output;
- stage 4: `speech_generator.safetensors` (keys `speech_generator.*`).

To use a trained adapter, put its folder into a release folder in place of the shipped `speech_lora/`
(or `long_speech_lora/`): the loader injects whatever adapter folders it finds there.
Every file is written beside its target and renamed into place; an adapter folder is swapped whole.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from lyra_cli.engine.model.adapters import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_DIRS,
    ADAPTER_WEIGHTS_FILE,
    PEFT_KEY_PREFIX,
    PROJECTOR_FILE,
)
from lyra_cli.engine.model.checkpoint import GENERATOR_PREFIX, SPEECH_GENERATOR_FILE
from lyra_cli.engine.model.network import LyraForCausalLM
from lyra_cli.engine.train.stages import LORA_TARGET_MODULES, StageConfig, Trains
from lyra_cli.errors import UsageError
from lyra_cli.fileio import write_atomically

EXPORT_DTYPE = torch.bfloat16  # what the release ships (non_lora_trainables.bin is a bf16 pickle)
STAGE1_PROJECTOR_FILE = "mm_speech_projector.bin"
CONFIG_FILE = "config.json"
STAGE_FILE = "lyra_stage.json"  # our record of the stage settings; ignored by every loader
# Saved from `model.base_model.named_parameters()` of a PeftModel (train.py:1868-1874): one extra `model.`.
ADAPTER_PROJECTOR_PREFIX = "model.model.mm_speech_projector."
STAGE1_PROJECTOR_PREFIX = "model.mm_speech_projector."


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_atomically(path, lambda p: p.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8"))


def _swap_in(staging: Path, target: Path) -> None:
    """Replace the folder `target` with `staging`; the old folder is removed only after the rename."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        os.replace(target, old / target.name)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _cpu(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", dtype).contiguous().clone() for k, v in tensors.items()}


# ---------------------------------------------------------------------------------------------- state dicts


def lora_state(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The adapter's weights under PEFT's saved names: the adapter name dropped, `base_model.model.` added.

    `model.layers.0.self_attn.q_proj.lora_A.speech.weight`
    → `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`
    """
    tag = f".{adapter_name}."
    state = {}
    for name, param in model.named_parameters():
        if "lora_" in name and tag in name:
            state[PEFT_KEY_PREFIX + name.replace(tag, ".")] = param
    if not state:
        raise UsageError(f"the model holds no `{adapter_name}` LoRA weights", "was it prepared for a LoRA stage?")
    return state


def _projector(model: LyraForCausalLM) -> nn.Module:
    projector = model.model.mm_speech_projector
    if projector is None:
        raise UsageError("this model has no speech projector to export", "train a model with a speech tower")
    return projector


def projector_state(model: LyraForCausalLM, prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in _projector(model).state_dict().items()}


def adapter_config(stage: StageConfig, base_model: str | None = None) -> dict[str, Any]:
    """A PEFT `adapter_config.json` for the stage's LoRA, as `peft.LoraConfig.save_pretrained` writes it."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": stage.lora_r,
        "lora_alpha": stage.lora_alpha,
        "lora_dropout": stage.lora_dropout,
        "target_modules": list(LORA_TARGET_MODULES),
        "bias": "none",
        "use_rslora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "base_model_name_or_path": base_model,
        "inference_mode": True,
    }


# ---------------------------------------------------------------------------------------------- exports


def export_adapter(model: LyraForCausalLM, stage: StageConfig, out_dir: Path, *, base_model: str | None = None) -> Path:
    """Write the stage's adapter folder into `out_dir` (replacing one already there); returns its path."""
    if stage.trains is not Trains.LORA_AND_PROJECTOR or stage.adapter is None:
        raise UsageError(f"{stage.name} trains no LoRA adapter", "use export_projector or export_speech_generator")
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / ADAPTER_DIRS[stage.adapter]
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=out_dir))
    try:
        lora = _cpu(lora_state(model, stage.adapter.value), EXPORT_DTYPE)
        save_file(lora, str(staging / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
        _write_json(staging / ADAPTER_CONFIG_FILE, adapter_config(stage, base_model))
        torch.save(_cpu(projector_state(model, ADAPTER_PROJECTOR_PREFIX), EXPORT_DTYPE), staging / PROJECTOR_FILE)
        _write_json(staging / CONFIG_FILE, dict(model.config.raw))
        _write_json(staging / STAGE_FILE, dataclasses.asdict(stage))
        _swap_in(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def export_projector(model: LyraForCausalLM, out_path: Path) -> Path:
    """Stage 1: the speech projector as `mm_speech_projector.bin` (`out_path` may be a folder)."""
    path = out_path / STAGE1_PROJECTOR_FILE if out_path.is_dir() else out_path
    state = _cpu(projector_state(model, STAGE1_PROJECTOR_PREFIX), EXPORT_DTYPE)
    write_atomically(path, lambda p: torch.save(state, p))
    return path


def export_speech_generator(generator: nn.Module, out_dir: Path, dtype: torch.dtype = EXPORT_DTYPE) -> Path:
    """Stage 4: `out_dir/speech_generator.safetensors` with `speech_generator.*` keys."""
    state = _cpu({GENERATOR_PREFIX + k: v for k, v in generator.state_dict().items()}, dtype)
    path = out_dir / SPEECH_GENERATOR_FILE
    write_atomically(path, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    return path

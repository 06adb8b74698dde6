"""The four training stages of Lyra (docs/authors-behaviour.md#training-stages) and what each one trains.

A stage is a frozen `StageConfig` holding every hyper-parameter of the authors' script as its default;
`resolve_stage` applies user overrides (from flags or a JSON/YAML file) and `prepare_for_stage` freezes
the model, injects a fresh LoRA adapter where the stage has one, and returns the exact trainable set.

| stage  | trains                                   | adapter folder      |
|--------|------------------------------------------|---------------------|
| stage1 | speech projector                         | (mm_speech_projector.bin) |
| stage2 | speech LoRA r64/α16 + projector, LCMR on | speech_lora/        |
| stage3 | long-speech LoRA r128/α256 + projector   | long_speech_lora/   |
| stage4 | speech generator only (LLM frozen)       | (speech_generator.safetensors) |
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import warnings
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lyra_cli.engine.model.adapters import DECODER_TARGETS, Adapter, AdapterBank, activate
from lyra_cli.engine.model.config import ExtractorConfig
from lyra_cli.engine.model.network import LyraForCausalLM
from lyra_cli.engine.run.extractor import parse_extract
from lyra_cli.engine.train.lcmr import ALIGN_TEMPERATURE, LCMR_WEIGHT, SOFT_DTW_GAMMA, LcmrConfig
from lyra_cli.errors import InputError, MissingDependencyError, UsageError

log = logging.getLogger(__name__)

# Common to every script (docs/authors-behaviour.md#training-stages).
WARMUP_RATIO = 0.03
WEIGHT_DECAY = 0.0
LR_SCHEDULE = "cosine"
OPTIMIZER = "adamw_torch"
LORA_DROPOUT = 0.05
MAX_GRAD_NORM = 1.0  # HF Trainer's default, which the authors' scripts keep
# The authors' `target_modules` list, in their order (train.py:1627-1643); we match it as DECODER_TARGETS.
LORA_TARGET_MODULES = ("v_proj", "o_proj", "down_proj", "gate_proj", "q_proj", "k_proj", "up_proj")
PROJECTOR_MODULE = "model.mm_speech_projector"
GENERATOR_MODULE = "speech_generator"


class Trains(str, Enum):
    """Which part of the model a stage updates."""

    PROJECTOR = "projector"
    LORA_AND_PROJECTOR = "lora+projector"
    SPEECH_GENERATOR = "speech_generator"


@dataclass(frozen=True)
class StageConfig:
    """One training stage; defaults are the authors' settings for Lyra-Base (8 GPUs per node)."""

    name: str
    trains: Trains
    init: str  # what the authors started from, for the dry-run header
    adapter: Adapter | None = None  # the LoRA adapter trained (LORA_AND_PROJECTOR only)
    learning_rate: float = 2e-4
    warmup_ratio: float = WARMUP_RATIO
    epochs: int = 1
    per_device_batch_size: int = 1
    grad_accumulation: int = 1
    reference_devices: int = 32  # GPUs in the authors' run: global batch = per_device × devices × accumulation
    max_length: int = 2048  # tokens
    weight_decay: float = WEIGHT_DECAY
    max_grad_norm: float = MAX_GRAD_NORM  # 0 = no clipping
    lr_schedule: str = LR_SCHEDULE
    optimizer: str = OPTIMIZER
    lora_r: int = 0
    lora_alpha: float = 0.0
    lora_dropout: float = LORA_DROPOUT
    lcmr: bool = False
    lcmr_weight: float = LCMR_WEIGHT  # λ
    lcmr_temperature: float = ALIGN_TEMPERATURE  # τ
    lcmr_gamma: float = SOFT_DTW_GAMMA  # γ
    ctc_loss_weight: float = 1.0  # stage 4 only
    bf16: bool = True
    tf32: bool = True
    gradient_checkpointing: bool = True
    zero_stage: int = 3  # DeepSpeed ZeRO stage of the authors' run (reported; see REFERENCE_ONLY)
    group_by_modality_length: bool = False  # the authors' sampler grouping for padded batches (REFERENCE_ONLY)
    extract: str = ""  # LMME as BLOCKSxRATIO (e.g. "4x0.7"); "" = off, as in every official script

    @property
    def lora_scaling(self) -> float:
        """α / r, the factor PEFT applies to B·A."""
        return self.lora_alpha / self.lora_r if self.lora_r else 0.0

    def global_batch(self, n_devices: int | None = None) -> int:
        return self.per_device_batch_size * (n_devices or self.reference_devices) * self.grad_accumulation

    def lcmr_config(self) -> LcmrConfig | None:
        if not self.lcmr:
            return None
        return LcmrConfig(weight=self.lcmr_weight, temperature=self.lcmr_temperature, gamma=self.lcmr_gamma)


STAGES: dict[str, StageConfig] = {
    "stage1": StageConfig(
        name="stage1", trains=Trains.PROJECTOR, init="plain LLM, no vision tower",
        learning_rate=1e-3, epochs=1, per_device_batch_size=8, reference_devices=32, max_length=2048, zero_stage=2,
    ),
    "stage2": StageConfig(
        name="stage2", trains=Trains.LORA_AND_PROJECTOR, adapter=Adapter.SPEECH,
        init="plain LLM + ViT + stage-1 speech projector",
        learning_rate=2e-4, epochs=1, per_device_batch_size=4, reference_devices=32, max_length=8192,
        lora_r=64, lora_alpha=16.0, lcmr=True,
    ),
    "stage3": StageConfig(
        name="stage3", trains=Trains.LORA_AND_PROJECTOR, adapter=Adapter.LONG_SPEECH,
        init="plain LLM + ViT + stage-1 speech projector (not stage 2)",
        learning_rate=1e-4, epochs=3, per_device_batch_size=1, reference_devices=32, max_length=131072,
        lora_r=128, lora_alpha=256.0,
    ),
    "stage4": StageConfig(
        name="stage4", trains=Trains.SPEECH_GENERATOR, init="stage-2 model with speech_lora merged",
        learning_rate=2e-4, warmup_ratio=0.09, epochs=3, per_device_batch_size=2, reference_devices=16,
        max_length=16384, group_by_modality_length=True,
    ),
}  # fmt: skip

# Recorded from the authors' scripts so a dry run shows their whole setup, but with no effect here:
# `reference_devices` only sizes the authors' global batch for comparison; ZeRO partitioning is not performed
# (plain data parallel); grouping records by modality and length saves padding, and we never pad.
REFERENCE_ONLY = frozenset({"reference_devices", "zero_stage", "group_by_modality_length"})
OPTIMIZERS = ("adamw_torch",)  # the authors' (HF's default); the only one implemented

# What a stage *is* cannot be overridden; only how it is trained.
FIXED_FIELDS = frozenset({"name", "trains", "init", "adapter"})
LR_SCHEDULES = ("cosine", "linear", "constant")


# ---------------------------------------------------------------------------------------------- resolving


def _coerce(key: str, value: Any, default: Any) -> Any:
    """A JSON/YAML/flag value for `key`, converted to the type of its default."""
    kind = type(default)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif kind is int and not isinstance(value, bool):
        with contextlib.suppress(TypeError, ValueError):  # not a number: reported below
            if float(value) == int(float(value)):
                return int(float(value))
    elif kind is float and not isinstance(value, bool):
        with contextlib.suppress(TypeError, ValueError):  # not a number: reported below
            return float(value)
    elif kind is str and isinstance(value, str):
        return value
    raise UsageError(f"stage setting `{key}` must be a {kind.__name__}, got `{value!r}`",
                     f"e.g. --set {key}=… with a {kind.__name__}; `--dry-run` shows every setting's value")  # fmt: skip


def _validate(stage: StageConfig) -> None:
    checks = [
        (stage.learning_rate > 0, "learning_rate must be > 0"),
        (0 <= stage.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
        (stage.epochs >= 1, "epochs must be >= 1"),
        (stage.per_device_batch_size >= 1 and stage.grad_accumulation >= 1, "batch sizes must be >= 1"),
        (stage.max_length >= 1, "max_length must be >= 1"),
        (stage.weight_decay >= 0, "weight_decay must be >= 0"),
        (stage.max_grad_norm >= 0, "max_grad_norm must be >= 0 (0: no clipping)"),
        (stage.lr_schedule in LR_SCHEDULES, f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}"),
        (stage.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}"),
        (0 <= stage.lora_dropout < 1, "lora_dropout must be in [0, 1)"),
        (stage.trains is not Trains.LORA_AND_PROJECTOR or (stage.lora_r >= 1 and stage.lora_alpha > 0),
         "lora_r must be >= 1 and lora_alpha > 0"),
    ]  # fmt: skip
    for ok, message in checks:
        if not ok:
            raise UsageError(f"{stage.name}: {message}", "change it with --set KEY=VALUE or in --config")
    try:
        stage.lcmr_config()
    except ValueError as exc:
        raise UsageError(f"{stage.name}: {exc}", "change the lcmr_* settings with --set KEY=VALUE") from exc


def resolve_stage(name: str, overrides: dict[str, Any] | None = None) -> StageConfig:
    """The registered stage `name` with `overrides` (field name → value) applied and checked."""
    if name not in STAGES:
        raise UsageError(f"unknown training stage `{name}`", f"choose one of: {', '.join(STAGES)}")
    base = STAGES[name]
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    changes = {}
    for key, value in (overrides or {}).items():
        key = key.replace("-", "_")
        if key not in fields or key in FIXED_FIELDS:
            settable = sorted(set(fields) - FIXED_FIELDS)
            raise UsageError(f"unknown setting `{key}` for {name}", f"settable: {', '.join(settable)}")
        changes[key] = _coerce(key, value, fields[key])
    stage = dataclasses.replace(base, **changes)
    _validate(stage)
    return stage


def read_stage_file(path: Path) -> dict[str, Any]:
    """A stage file: a JSON (or, with PyYAML installed, YAML) mapping of settings, optionally with `stage`."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        what = "is a folder" if path.is_dir() else f"cannot be read ({exc.strerror})"
        raise InputError(f"stage file `{path}` {what}", "give a JSON or YAML file of stage settings") from exc
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as exc:
            raise MissingDependencyError("pyyaml", "YAML stage files") from exc
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise InputError(f"`{path}` is not valid YAML", str(exc).splitlines()[0]) from exc
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"`{path}` is not valid JSON (line {exc.lineno}: {exc.msg})",
                             "fix the file: it holds one object of stage settings") from exc  # fmt: skip
    if not isinstance(data, dict):
        raise InputError(f"`{path}` must hold a mapping of stage settings, not a {type(data).__name__}",
                         'e.g. {"learning_rate": 1e-4, "lora_r": 64}')  # fmt: skip
    return data


def stage_from_file(path: Path, name: str | None = None, overrides: dict[str, Any] | None = None) -> StageConfig:
    """Settings from `path`, then `overrides` (flags win); the stage is `name` or the file's `stage` key."""
    data = read_stage_file(path)
    file_name = data.pop("stage", None)
    chosen = name or file_name
    if not chosen:
        raise UsageError(f"`{path}` names no stage", f"add `\"stage\": \"stage2\"` or pass one of: {', '.join(STAGES)}")
    return resolve_stage(str(chosen), {**data, **(overrides or {})})


def deepspeed_overrides(path: Path) -> tuple[dict[str, Any], int | None]:
    """The settings a DeepSpeed config (e.g. the authors' scripts/zero3.json) fixes, as stage overrides, and
    its ZeRO stage. "auto" values (the authors' choice for every size) leave the stage's own setting.

    We read the file so the authors' command lines keep working; training itself is plain data parallel,
    the ZeRO stage is reported, not performed."""
    data = read_stage_file(path)
    overrides: dict[str, Any] = {}
    for key, setting in (("train_micro_batch_size_per_gpu", "per_device_batch_size"),
                         ("gradient_accumulation_steps", "grad_accumulation"),
                         ("gradient_clipping", "max_grad_norm")):  # fmt: skip
        if data.get(key, "auto") != "auto":
            overrides[setting] = data[key]
    bf16 = data.get("bf16")
    if isinstance(bf16, dict) and isinstance(bf16.get("enabled"), bool):
        overrides["bf16"] = bf16["enabled"]
    zero = data.get("zero_optimization")
    zero_stage = zero.get("stage") if isinstance(zero, dict) else None
    if isinstance(zero_stage, int):
        overrides["zero_stage"] = zero_stage
    return overrides, zero_stage if isinstance(zero_stage, int) else None


# ---------------------------------------------------------------------------------------------- trainable set


@dataclass
class TrainablePlan:
    """The parameters a stage updates; `names` are as in `model.named_parameters()` (generator: prefixed)."""

    stage: StageConfig
    parameters: dict[str, nn.Parameter] = field(repr=False)
    frozen_count: int = 0
    projector: nn.Module | None = field(default=None, repr=False)  # what projects speech in this stage's forward

    @property
    def names(self) -> list[str]:
        return sorted(self.parameters)

    @property
    def count(self) -> int:
        return sum(p.numel() for p in self.parameters.values())


def _lora_config(stage: StageConfig) -> Any:
    try:
        from peft import LoraConfig
    except ImportError as exc:
        raise MissingDependencyError("peft", "LoRA training") from exc
    return LoraConfig(
        r=stage.lora_r,
        lora_alpha=stage.lora_alpha,
        lora_dropout=stage.lora_dropout,
        target_modules=DECODER_TARGETS,  # the LLM decoder only, as the authors' training did
        bias="none",
    )


def _tuner_layers(model: nn.Module) -> list[Any]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def inject_fresh_adapter(model: LyraForCausalLM, stage: StageConfig) -> str:
    """Add a newly initialised LoRA adapter (B = 0: the model is unchanged) and make it the active one.

    An adapter of the same name loaded from the model folder is dropped first: training starts fresh.
    """
    assert stage.adapter is not None
    name = stage.adapter.value
    config = _lora_config(stage)
    from peft import inject_adapter_in_model

    with warnings.catch_warnings():
        # deleting the active adapter and adding a second one both warn; both are intended here
        warnings.filterwarnings("ignore", message=".*(multiple adapters|which is now deleted).*")
        layers = [layer for layer in _tuner_layers(model) if name in layer.lora_A]
        for layer in layers:
            layer.delete_adapter(name)
        if layers:
            log.info("dropped the loaded `%s` adapter: %s trains a fresh one", name, stage.name)
        inject_adapter_in_model(config, model, adapter_name=name)
    for layer in _tuner_layers(model):
        layer.enable_adapters(True)
        layer.set_adapter(name)
    return name


def _stage_start(model: LyraForCausalLM, stage: StageConfig, bank: AdapterBank | None) -> nn.Module | None:
    """Put the shipped adapters where the stage's official starting point has them; return the speech
    projector its forward uses. stage 1: the plain LLM (adapters off); stage 4: the stage-2 model with
    `speech_lora` merged, i.e. the speech adapter on with its own projector; LoRA stages: the fresh adapter."""
    base = model.model.mm_speech_projector
    if bank is None:
        return base
    if stage.trains is Trains.PROJECTOR:
        activate(model, bank, Adapter.NONE)
    elif stage.trains is Trains.SPEECH_GENERATOR:
        if Adapter.SPEECH in bank.available:
            activate(model, bank, Adapter.SPEECH)
            return bank.projector(Adapter.SPEECH)
        if bank.merged is not Adapter.SPEECH:
            log.warning("no speech adapter in this model folder: %s runs the plain LLM, not the authors' "
                        "stage-2 model", stage.name)  # fmt: skip
    return base


def prepare_for_stage(
    model: LyraForCausalLM, stage: StageConfig, generator: nn.Module | None = None, bank: AdapterBank | None = None
) -> TrainablePlan:
    """Freeze everything, then unfreeze (and for LoRA stages first inject) exactly what `stage` trains.

    With the model's adapter `bank`, the shipped adapters are also set as the stage starts from them."""
    if stage.trains is Trains.SPEECH_GENERATOR and generator is None:
        raise UsageError(f"{stage.name} trains the speech generator, but this model has none",
                         "use a model folder whose config.json declares `speech_generator_type: ctc`")  # fmt: skip
    if stage.trains is not Trains.SPEECH_GENERATOR and model.model.mm_speech_projector is None:
        raise UsageError(f"{stage.name} trains the speech projector, but this model has no speech tower",
                         "use a model folder whose config.json declares `mm_speech_tower`")  # fmt: skip
    stage_extractor(stage, model)  # a bad --extract fails here, before any data is read
    projector = _stage_start(model, stage, bank)
    if stage.trains is Trains.LORA_AND_PROJECTOR:
        inject_fresh_adapter(model, stage)
        model.train(model.training)  # new dropout modules start in training mode; follow the model's mode
    model.requires_grad_(False)
    if generator is not None:
        generator.requires_grad_(False)
    params: dict[str, nn.Parameter] = {}
    if stage.trains is Trains.SPEECH_GENERATOR:
        assert generator is not None
        params = {f"{GENERATOR_MODULE}.{n}": p for n, p in generator.named_parameters()}
    else:
        params = {f"{PROJECTOR_MODULE}.{n}": p for n, p in model.model.mm_speech_projector.named_parameters()}
    if stage.trains is Trains.LORA_AND_PROJECTOR:
        tag = f".{stage.adapter.value}."  # type: ignore[union-attr]
        params |= {n: p for n, p in model.named_parameters() if "lora_" in n and tag in n}
    for p in params.values():
        if p.dtype != torch.float32:  # fp32 master weights: AdamW steps on 16-bit weights round small updates away
            p.data = p.data.float()
        p.requires_grad_(True)
    total = sum(_logical_numel(p) for p in model.parameters())
    frozen = total - sum(p.numel() for n, p in params.items() if not n.startswith(GENERATOR_MODULE))
    return TrainablePlan(stage, params, frozen_count=frozen, projector=projector)


def stage_extractor(stage: StageConfig, model: LyraForCausalLM) -> ExtractorConfig | None:
    """The stage's `extract` setting for this model's depth (None when off)."""
    if not stage.extract:
        return None
    return parse_extract(stage.extract, len(model.model.layers))


def _logical_numel(param: nn.Parameter) -> int:
    """Weights a parameter stands for: a bitsandbytes 4-bit one stores two per byte (its quant_state keeps
    the real shape)."""
    state = getattr(param, "quant_state", None)
    shape = getattr(state, "shape", None)
    return int(torch.Size(shape).numel()) if shape is not None else param.numel()


def describe(plan: TrainablePlan) -> str:
    """A few lines for a dry-run header: what trains, how many weights, and the schedule."""
    s = plan.stage
    lines = [
        f"stage {s.name}: trains {s.trains.value}" + (f" (`{s.adapter.value}` LoRA r{s.lora_r}/α{s.lora_alpha:g}, "
                                                     f"scaling {s.lora_scaling:g})" if s.adapter else ""),
        f"  init: {s.init}",
        f"  trainable: {plan.count:,} weights in {len(plan.parameters)} tensors; frozen: {plan.frozen_count:,}",
        f"  lr {s.learning_rate:g} ({s.lr_schedule}, warmup {s.warmup_ratio:g}), {s.epochs} epoch(s), "
        f"batch {s.per_device_batch_size}×{s.grad_accumulation} per device, max length {s.max_length}",
        f"  weight decay {s.weight_decay:g}, {'bf16' if s.bf16 else 'fp32'}, "
        f"gradient checkpointing {'on' if s.gradient_checkpointing else 'off'}",
    ]  # fmt: skip
    if s.lcmr:
        lines.append(f"  LCMR on: λ {s.lcmr_weight:g}, τ {s.lcmr_temperature:g}, γ {s.lcmr_gamma:g}")
    if s.extract:
        lines.append(f"  extractor on: {s.extract} (blocks x kept ratio per block)")
    return "\n".join(lines)

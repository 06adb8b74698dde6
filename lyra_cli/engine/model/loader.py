"""Assemble a ready-to-run Lyra model from a release folder: config → empty modules → weights →
quantization → adapters → tokenizer and processors."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from transformers import Qwen2VLVisionConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

from lyra_cli.engine.model import checkpoint as ckpt
from lyra_cli.engine.model.adapters import AdapterBank, load_adapters
from lyra_cli.engine.model.config import GENERATION_CONFIG_FILE, LyraConfig, load_config, read_json
from lyra_cli.engine.model.footprint import QUANTIZED_SCOPE, in_quantized_linear
from lyra_cli.engine.model.network import LyraForCausalLM
from lyra_cli.engine.model.placement import Placement, auto_budgets, module_sizes, plan_placement
from lyra_cli.engine.model.runtime import Runtime
from lyra_cli.engine.model.speech_encoder import whisper_config
from lyra_cli.engine.model.tokenizer import end_token_ids, load_tokenizer
from lyra_cli.engine.model.towers import ModelSources, Resolved, TowerOverrides, resolve_sources
from lyra_cli.engine.model.vision import VisionPreprocessConfig, VisualProcessor
from lyra_cli.engine.model.config import SamplingConfig, sampling_from_generation_config
from lyra_cli.errors import CheckpointError

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: LyraForCausalLM
    config: LyraConfig
    tokenizer: Any
    runtime: Runtime
    placement: Placement
    visual: VisualProcessor | None
    adapters: AdapterBank
    sampling_defaults: SamplingConfig
    end_ids: set[int]
    model_dir: Path
    load_s: float
    unused_keys: list[str]
    sources: ModelSources  # where each tower, the processor settings and the vocoder came from (the header)


def _vit_config(vision: Resolved) -> Qwen2VLVisionConfig:
    raw = dict(vision.require() or {})
    raw.pop("model_type", None)
    vit = Qwen2VLVisionConfig(**raw)
    vit._attn_implementation = "sdpa"
    return vit


def _build_towers(sources: ModelSources, source: ckpt.WeightSource) -> tuple[nn.Module | None, ...]:
    vit = whisper = None
    if sources.vision is not None:
        vit_cfg = _vit_config(sources.vision)
        vit = ckpt.build_empty(lambda: Qwen2VisionTransformerPretrainedModel(vit_cfg))
    if sources.speech is not None:
        if not source.keys_with_prefix(ckpt.SPEECH_PREFIX):
            raise CheckpointError(
                f"no speech tower weights: neither `{ckpt.SPEECH_PREFIX}*` in the shards nor a tower folder at "
                f"`{sources.speech.located.requested}`",
                "the model folder is incomplete",
            )
        whisper_cfg = whisper_config(sources.speech.require() or {})
        from lyra_cli.engine.model.speech_encoder import build_whisper_encoder

        whisper = ckpt.build_empty(lambda: build_whisper_encoder(whisper_cfg))
    return vit, whisper


def _visual_processor(sources: ModelSources) -> VisualProcessor | None:
    if sources.processor is None or sources.vision is None:
        return None
    sources.vision.require()  # the ViT's own problem first: the processor's follows from it
    settings = sources.processor.require() or {}
    try:
        return VisualProcessor(VisionPreprocessConfig.from_dict(dict(settings)))
    except (ValueError, TypeError, AttributeError) as exc:  # bad value types in the file
        raise CheckpointError(f"image processor settings ({sources.processor.origin}) are not valid: {exc}",
                              "restore the vision tower's preprocessor_config.json from the release")  # fmt: skip


def read_generation_config(model_dir: Path) -> dict:
    """`generation_config.json` ({} when the folder has none); a broken one is a `CheckpointError`."""
    path = model_dir / GENERATION_CONFIG_FILE
    return read_json(path) if path.is_file() else {}


def _placement(model: LyraForCausalLM, config: LyraConfig, runtime: Runtime) -> Placement:
    """One device, or with `--device-map auto` on CUDA the layers spread over GPUs and CPU."""
    if runtime.device_map != "auto" or runtime.device.type != "cuda":
        return Placement(runtime.device)
    sizes = module_sizes(model, runtime.dtype, runtime.quantization)
    placement = plan_placement(sizes, config.text.num_layers, auto_budgets(runtime.max_memory),
                               tied_lm_head=config.text.tie_word_embeddings)  # fmt: skip
    log.info("placement: %s", placement.describe())
    return placement


def _staging_device_for(runtime: Runtime, placement: Placement) -> Callable[[str], torch.device]:
    """Where each weight goes as it is read. With 8/4-bit, the decoder's linear weights wait on the CPU
    and are quantized onto their device layer by layer (`_quantize`): the GPU then never holds the
    full-precision decoder, which is the point of quantizing (a 4-bit Lyra-Base on a GPU too small for
    it in bf16). Everything else goes straight to its device."""
    if runtime.quantization == "none":
        return placement.device_for
    staging = torch.device("cpu")
    return lambda key: staging if in_quantized_linear(key) else placement.device_for(key)


def _quantize(model: LyraForCausalLM, runtime: Runtime, placement: Placement) -> None:
    from lyra_cli.engine.model.quant import quantize_linears

    n = quantize_linears(model.model.layers, runtime.quantization, compute_dtype=runtime.dtype,  # type: ignore[arg-type]
                         device_for=lambda name: placement.device_for(f"{QUANTIZED_SCOPE}{name}"))  # fmt: skip
    log.info("quantized %d decoder linear layers to %s", n, runtime.quantization)


def _move_buffers(model: nn.Module, placement: Placement) -> None:
    """Move every buffer to its module's device. Not the parameters: they were placed as they were read,
    and bitsandbytes' packed ones must not be moved again."""
    for module_name, module in model.named_modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            setattr(module, name, buffer.to(placement.device_for(module_name)))


def _check_vocab(tokenizer: Any, config: LyraConfig) -> None:
    if len(tokenizer) > config.text.vocab_size:
        raise CheckpointError(
            f"the tokenizer has {len(tokenizer)} tokens but the model only {config.text.vocab_size}",
            "the tokenizer files belong to another model",
        )


def load_model(model_dir: Path, runtime: Runtime, overrides: TowerOverrides | None = None) -> LoadedModel:
    """Load every part of a release folder onto `runtime`; raises `CheckpointError` naming what is wrong.
    Towers and the vocoder are found as `towers.py` describes; `overrides` are the command-line folders."""
    start = time.perf_counter()
    config = load_config(model_dir)
    tokenizer = load_tokenizer(model_dir)  # cheap, and a broken folder fails before any weights move
    _check_vocab(tokenizer, config)
    overrides = overrides or TowerOverrides()
    overrides.check()
    sources = resolve_sources(model_dir, config, overrides)
    visual = _visual_processor(sources)  # before the weights: a missing processor config fails fast
    source = ckpt.load_config_and_source(model_dir, config, sources)
    vit, whisper = _build_towers(sources, source)
    model: LyraForCausalLM = ckpt.build_empty(lambda: LyraForCausalLM(config, vit, whisper))  # type: ignore[assignment]
    model.tie_weights()
    ignore = (ckpt.GENERATOR_PREFIX, "lm_head.") if config.text.tie_word_embeddings else (ckpt.GENERATOR_PREFIX,)
    placement = _placement(model, config, runtime)
    device_for = _staging_device_for(runtime, placement)
    report = ckpt.load_weights(model, source, device_for=device_for, dtype=runtime.dtype, ignore_prefixes=ignore)
    model.tie_weights()
    model.eval().requires_grad_(False)
    if runtime.quantization != "none":
        _quantize(model, runtime, placement)
    _move_buffers(model, placement)  # the rotary tables were built on the CPU
    adapters = load_adapters(model, model_dir, config, runtime.dtype)
    generation = read_generation_config(model_dir)
    return LoadedModel(
        model=model,
        config=config,
        tokenizer=tokenizer,
        runtime=runtime,
        placement=placement,
        visual=visual,
        adapters=adapters,
        sampling_defaults=sampling_from_generation_config(generation),
        end_ids=end_token_ids(tokenizer, generation),
        model_dir=model_dir,
        load_s=time.perf_counter() - start,
        unused_keys=report.unused_keys,
        sources=sources,
    )

"""Assemble a ready-to-run Lyra model from a release folder: config → empty modules → weights →
quantization → adapters → tokenizer and processors."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from transformers import Qwen2VLVisionConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

from lyra_cli.engine import checkpoint as ckpt
from lyra_cli.engine.adapters import AdapterBank, load_adapters
from lyra_cli.engine.config import GENERATION_CONFIG_FILE, LyraConfig, load_config, read_json
from lyra_cli.engine.generate import SamplingConfig, sampling_from_generation_config
from lyra_cli.engine.model import LyraForCausalLM
from lyra_cli.engine.runtime import Runtime
from lyra_cli.engine.speech import whisper_config, whisper_config_from_shapes
from lyra_cli.engine.tokenizer import end_token_ids, load_tokenizer
from lyra_cli.engine.vision import VisualProcessor
from lyra_cli.errors import CheckpointError

log = logging.getLogger(__name__)

# Kept in full precision when quantizing: everything but the decoder's linear layers
# (norms, embeddings, lm_head, towers and projectors are small or precision-sensitive).
QUANTIZED_SCOPE = "model.layers"


@dataclass
class LoadedModel:
    model: LyraForCausalLM
    config: LyraConfig
    tokenizer: Any
    runtime: Runtime
    visual: VisualProcessor | None
    adapters: AdapterBank
    sampling_defaults: SamplingConfig
    end_ids: set[int]
    model_dir: Path
    load_s: float
    unused_keys: list[str]


def _vit_config(config: LyraConfig, tower_dir: Path | None) -> Qwen2VLVisionConfig:
    raw = dict(config.vision.tower_config) if config.vision else {}
    if tower_dir is not None and (tower_dir / "config.json").is_file():
        folder = read_json(tower_dir / "config.json")
        raw = dict(folder.get("vision_config") or folder)
    if not raw:
        raise CheckpointError(
            "no vision tower configuration found", "config.json needs `vision_config` or the tower folder a config.json"
        )
    raw.pop("model_type", None)
    vit = Qwen2VLVisionConfig(**raw)
    vit._attn_implementation = "sdpa"
    return vit


def _build_towers(config: LyraConfig, model_dir: Path, source: ckpt.WeightSource) -> tuple[nn.Module | None, ...]:
    vit = whisper = None
    if config.vision is not None:
        vit_cfg = _vit_config(config, ckpt.resolve_tower_dir(model_dir, config.vision.tower))
        vit = ckpt.build_empty(lambda: Qwen2VisionTransformerPretrainedModel(vit_cfg))
    if config.speech is not None:
        keys = source.keys_with_prefix(ckpt.SPEECH_PREFIX)
        if not keys:
            raise CheckpointError(
                f"no speech tower weights: neither `{ckpt.SPEECH_PREFIX}*` in the shards nor a tower folder at "
                f"`{config.speech.tower}`",
                "the model folder is incomplete",
            )
        whisper_cfg = whisper_config(
            ckpt.resolve_tower_dir(model_dir, config.speech.tower),
            lambda: whisper_config_from_shapes(source.shape, keys, ckpt.SPEECH_PREFIX),
        )
        from lyra_cli.engine.speech import build_whisper_encoder

        whisper = ckpt.build_empty(lambda: build_whisper_encoder(whisper_cfg))
    return vit, whisper


def read_generation_config(model_dir: Path) -> dict:
    """`generation_config.json` ({} when the folder has none); a broken one is a `CheckpointError`."""
    path = model_dir / GENERATION_CONFIG_FILE
    return read_json(path) if path.is_file() else {}


def _quantize(model: LyraForCausalLM, runtime: Runtime) -> None:
    from lyra_cli.engine.quant import quantize_linears

    n = quantize_linears(model.model.layers, runtime.quantization, compute_dtype=runtime.dtype)  # type: ignore[arg-type]
    log.info("quantized %d decoder linear layers to %s", n, runtime.quantization)


def _check_vocab(tokenizer: Any, config: LyraConfig) -> None:
    if len(tokenizer) > config.text.vocab_size:
        raise CheckpointError(
            f"the tokenizer has {len(tokenizer)} tokens but the model only {config.text.vocab_size}",
            "the tokenizer files belong to another model",
        )


def load_model(model_dir: Path, runtime: Runtime) -> LoadedModel:
    """Load every part of a release folder onto `runtime`; raises `CheckpointError` naming what is wrong."""
    start = time.perf_counter()
    config = load_config(model_dir)
    tokenizer = load_tokenizer(model_dir)  # cheap, and a broken folder fails before any weights move
    _check_vocab(tokenizer, config)
    source = ckpt.load_config_and_source(model_dir, config)
    vit, whisper = _build_towers(config, model_dir, source)
    model: LyraForCausalLM = ckpt.build_empty(lambda: LyraForCausalLM(config, vit, whisper))  # type: ignore[assignment]
    model.tie_weights()
    ignore = (ckpt.GENERATOR_PREFIX, "lm_head.") if config.text.tie_word_embeddings else (ckpt.GENERATOR_PREFIX,)
    report = ckpt.load_weights(model, source, device_for=lambda _: runtime.device, dtype=runtime.dtype, ignore_prefixes=ignore)
    model.tie_weights()
    model.to(runtime.device)  # buffers (rotary tables) were built on the CPU
    model.eval().requires_grad_(False)
    if runtime.quantization != "none":
        _quantize(model, runtime)
    adapters = load_adapters(model, model_dir, config, runtime.dtype)
    generation = read_generation_config(model_dir)
    visual = None
    if config.vision is not None:
        visual = VisualProcessor.from_dir(ckpt.resolve_tower_dir(model_dir, config.vision.tower))
    return LoadedModel(
        model=model,
        config=config,
        tokenizer=tokenizer,
        runtime=runtime,
        visual=visual,
        adapters=adapters,
        sampling_defaults=sampling_from_generation_config(generation),
        end_ids=end_token_ids(tokenizer, generation),
        model_dir=model_dir,
        load_s=time.perf_counter() - start,
        unused_keys=report.unused_keys,
    )

"""`--model tiny`: a deterministic random checkpoint in the exact release layout.

Same files, key names and formats as `Lyra_Base_9B` — config.json with the `mm_*` keys, two shards
and an index, tower folders under model_zoo/, both adapter folders with `non_lora_trainables.bin`, a
small trained byte-level BPE tokenizer with the Qwen special tokens, generation_config.json — at a
size that loads and answers in seconds on two CPU cores. Random weights say random things.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import Qwen2VLVisionConfig, WhisperConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

from lyra_cli.audio.features import ENCODER_FRAMES, N_MELS
from lyra_cli.audio.io import SAMPLE_RATE_HZ
from lyra_cli.engine.model.adapters import ADAPTER_DIRS, Adapter
from lyra_cli.engine.model.config import parse_config
from lyra_cli.engine.model.network import LyraForCausalLM
from lyra_cli.engine.model.speech_encoder import build_whisper_encoder
from lyra_cli.engine.model.speech_generator import tiny_generator_config, write_tiny_speech_generator
from lyra_cli.engine.model.tokenizer import build_tiny_tokenizer
from lyra_cli.engine.model.vision import IMAGE_MEAN, IMAGE_STD, MIN_PIXELS
from lyra_cli.engine.model.vocoder import write_tiny_vocoder
from lyra_cli.fileio import CACHE_DIR_ENV, cache_root
from lyra_cli.outputs import check_cache_dir

# Bump when the tiny layout changes, so cached copies are rebuilt.
TINY_FORMAT_VERSION = 4
DEFAULT_SEED = 0
# The fewest layers on which every README example runs: `--extract 4x0.7` needs 4 blocks, i.e. ≥ 4 layers
# (one layer per block, drops after layers 0, 1 and 2). More layers would slow every test that loads it.
TINY_LAYERS = 4

HIDDEN = 64  # ≥ 64: bitsandbytes' 4-bit layers need inputs at least this wide
VOCAB_MULTIPLE = 64
VISION_TOWER_DIR = "model_zoo/vision/Qwen2VL_tiny_ViT"
SPEECH_TOWER_DIR = "model_zoo/audio/whisper-tiny-128"
VOCODER_DIR = "model_zoo/audio/vocoder"  # where the authors' CLI looks for g_00500000 + config.json
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Stand-ins for the official r64/α16 (speech) and r128/α256 (long speech), scaled down.
TINY_LORA = {Adapter.SPEECH: (8, 2.0), Adapter.LONG_SPEECH: (16, 32.0)}
LORA_B_STD = 0.05  # non-zero, so an adapter visibly changes the answer
# A tiny ViT budget: at most 64 merged tokens per image keeps CPU answers fast.
TINY_MAX_PIXELS = 28 * 28 * 64


@dataclass(frozen=True)
class TinySize:
    """The language model's dimensions: the tiny defaults, or larger ones for benchmarks at mid size."""

    hidden: int = HIDDEN
    intermediate: int = 128
    layers: int = TINY_LAYERS
    heads: int = 4
    kv_heads: int = 2

    @property
    def mrope_section(self) -> list[int]:
        """Qwen2-VL's split of the rotary half-dimension into (t, h, w): [16, 24, 24] for 128-wide heads."""
        half = self.hidden // self.heads // 2
        temporal = half // 4
        return [temporal, (half - temporal) // 2, half - temporal - (half - temporal) // 2]


def _vocab_size(n_tokens: int) -> int:
    return -(-n_tokens // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def _vision_config(hidden: int = HIDDEN) -> dict[str, Any]:
    return {
        "depth": 2, "embed_dim": 32, "hidden_size": hidden, "mlp_ratio": 2, "num_heads": 2, "in_channels": 3,
        "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "hidden_act": "quick_gelu",
    }  # fmt: skip


def _whisper_config() -> dict[str, Any]:
    return {
        # one 64-wide head, the width every real Whisper uses
        "model_type": "whisper", "num_mel_bins": N_MELS, "d_model": 64, "encoder_layers": 2,
        "encoder_attention_heads": 1, "encoder_ffn_dim": 128, "decoder_layers": 1, "decoder_attention_heads": 2,
        "decoder_ffn_dim": 128, "max_source_positions": ENCODER_FRAMES, "vocab_size": 64,
        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 1, "decoder_start_token_id": 2,
    }  # fmt: skip


def tiny_config(vocab_size: int, tokenizer_ids: dict[str, int], size: TinySize = TinySize()) -> dict[str, Any]:
    """config.json with the keys the release uses (docs/release-format.md#config-keys), at tiny sizes."""
    return {
        "architectures": ["Lyra2SQwen2VLForCausalLM"],
        "model_type": "Lyra_Qwen2VL_SpeechGenerator",
        "vocab_size": vocab_size,
        "hidden_size": size.hidden,
        "intermediate_size": size.intermediate,
        "num_hidden_layers": size.layers,
        "num_attention_heads": size.heads,
        "num_key_value_heads": size.kv_heads,
        "max_window_layers": size.layers,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": size.mrope_section},
        "max_position_embeddings": 32768,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": tokenizer_ids["<|endoftext|>"],
        "eos_token_id": tokenizer_ids["<|im_end|>"],
        "vision_config": _vision_config(size.hidden),
        "mm_vision_tower": VISION_TOWER_DIR,
        "mm_projector_type": "identity",
        "mm_hidden_size": size.hidden,
        "mm_speech_tower": SPEECH_TOWER_DIR,
        "mm_speech_projector_type": "simple_mlp",
        "mm_speech_hidden_size": 64,
        "speech_encoder_ds_rate": 5,
        "speech_encoder_hidden_size": 64,
        "speech_norm": False,
        "asr_align": False,
        "check_data_modality": False,
        "tune_mm_mlp_adapter": False,
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "image_aspect_ratio": "qwen2vl",
        "tokenizer_model_max_length": 8192,
        "tokenizer_padding_side": "right",
        "compress": False,
        "compress_gap": 33,
        "keep_rate": 1.0,
        "keep_global": False,
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _build_model(config_dict: dict[str, Any]) -> LyraForCausalLM:
    config = parse_config(config_dict)
    vit_cfg = Qwen2VLVisionConfig(**config_dict["vision_config"])
    whisper_cfg = WhisperConfig(**_whisper_config())
    vit = Qwen2VisionTransformerPretrainedModel(vit_cfg)
    whisper = build_whisper_encoder(whisper_cfg)
    model = LyraForCausalLM(config, vit, whisper)
    for name, param in model.named_parameters():
        # transformers' towers are initialised by their own post_init; our modules get a small normal init
        if not name.startswith(("model.vision_tower", "model.speech_tower")) and param.ndim >= 2:
            torch.nn.init.normal_(param, std=0.1)
    return model


def _write_shards(model: LyraForCausalLM, out: Path) -> None:
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    towers = {k: v for k, v in state.items() if k.startswith(("model.vision_tower.", "model.speech_tower."))}
    shards = [{k: v for k, v in state.items() if k not in towers}, towers]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in state.values())
    write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def lora_shapes(layers: nn.Module, rank: int) -> dict[str, tuple[int, int]]:
    """PEFT's key → shape for a rank-`rank` LoRA on every decoder linear in `LORA_TARGETS` (works on meta)."""
    shapes = {}
    for name, module in layers.named_modules():
        if name.rsplit(".", 1)[-1] in LORA_TARGETS:
            prefix = f"base_model.model.model.layers.{name}"
            out_f, in_f = module.weight.shape
            shapes[f"{prefix}.lora_A.weight"] = (rank, in_f)
            shapes[f"{prefix}.lora_B.weight"] = (out_f, rank)
    return shapes


def lora_init(key: str, shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """A: scaled like a fan-in init; B: non-zero (`LORA_B_STD`), so an adapter visibly changes the answer."""
    if ".lora_A." in key:
        return torch.randn(shape, generator=gen) / shape[1] ** 0.5
    return torch.randn(shape, generator=gen) * LORA_B_STD


def _lora_weights(model: LyraForCausalLM, rank: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    shapes = lora_shapes(model.model.layers, rank)
    return {k: lora_init(k, shape, gen).to(torch.bfloat16) for k, shape in shapes.items()}


def write_adapter_configs(folder: Path, adapter: Adapter, rank: int, alpha: float, config_dict: dict[str, Any]) -> None:
    """adapter_config.json (PEFT) and the folder's config.json snapshot, as the release's adapter folders hold."""
    write_json(folder / "adapter_config.json", {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.05,
        "bias": "none", "target_modules": LORA_TARGETS, "base_model_name_or_path": None, "inference_mode": True,
    })  # fmt: skip
    write_json(folder / "config.json", {**config_dict, "asr_align": adapter is Adapter.SPEECH})


def _write_adapter(model: LyraForCausalLM, out: Path, adapter: Adapter, config_dict: dict[str, Any], seed: int) -> None:
    folder = out / ADAPTER_DIRS[adapter]
    folder.mkdir()
    rank, alpha = TINY_LORA[adapter]
    gen = torch.Generator().manual_seed(seed + 1 + list(ADAPTER_DIRS).index(adapter))
    save_file(_lora_weights(model, rank, gen), str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    write_adapter_configs(folder, adapter, rank, alpha, config_dict)
    projector = model.model.mm_speech_projector
    state = {
        f"model.model.mm_speech_projector.{k}": (v + torch.randn(v.shape, generator=gen) * 0.05).to(torch.bfloat16)
        for k, v in projector.state_dict().items()
    }
    torch.save(state, folder / "non_lora_trainables.bin")


def write_tower_configs(
    out: Path, vision: tuple[str, dict[str, Any]], speech: tuple[str, dict[str, Any]], max_pixels: int
) -> None:
    """The tower folders' config.json and preprocessor_config.json: `vision` and `speech` are (folder, config)."""
    vision_dir, vision_config = vision
    speech_dir, whisper_config = speech
    write_json(out / vision_dir / "config.json", {"model_type": "qwen2_vl", **vision_config})
    write_json(out / vision_dir / "preprocessor_config.json", {
        "image_processor_type": "Qwen2VLImageProcessor", "min_pixels": MIN_PIXELS, "max_pixels": max_pixels,
        "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2, "image_mean": list(IMAGE_MEAN), "image_std": list(IMAGE_STD),
        "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
    })  # fmt: skip
    write_json(out / speech_dir / "config.json", whisper_config)
    write_json(out / speech_dir / "preprocessor_config.json", {
        "feature_extractor_type": "WhisperFeatureExtractor", "feature_size": N_MELS, "sampling_rate": SAMPLE_RATE_HZ,
        "hop_length": 160, "n_fft": 400, "chunk_length": 30, "padding_value": 0.0, "return_attention_mask": False,
    })  # fmt: skip


def _write_towers(out: Path, hidden: int) -> None:
    write_tower_configs(out, (VISION_TOWER_DIR, _vision_config(hidden)), (SPEECH_TOWER_DIR, _whisper_config()),
                        TINY_MAX_PIXELS)  # fmt: skip


def generation_config(ids: dict[str, int]) -> dict[str, Any]:
    # The values the Qwen2-VL instruct release ships (docs/release-format.md#generation-config):
    # sampling with top_k 1 = greedy.
    return {
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"], "do_sample": True, "temperature": 0.1, "top_k": 1, "top_p": 0.001,
        "repetition_penalty": 1.05,
    }  # fmt: skip


def write_tokenizer(out: Path) -> tuple[int, dict[str, int]]:
    """The tiny byte-level BPE tokenizer into `out`: (its length, ids of `<|endoftext|>` and `<|im_end|>`)."""
    build_tiny_tokenizer(out)
    from lyra_cli.engine.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(out)
    return len(tokenizer), {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>")}


def write_tiny_model(out: Path, *, seed: int = DEFAULT_SEED, size: TinySize = TinySize()) -> None:
    """Write the tiny checkpoint (or one with the language model at `size`) into the empty or new `out`."""
    out.mkdir(parents=True, exist_ok=True)
    n_tokens, ids = write_tokenizer(out)
    config_dict = tiny_config(_vocab_size(n_tokens), ids, size) | tiny_generator_config()
    torch.manual_seed(seed)
    model = _build_model(config_dict)
    write_json(out / "config.json", config_dict)
    write_json(out / "generation_config.json", generation_config(ids))
    _write_shards(model, out)
    _write_towers(out, size.hidden)
    for adapter in ADAPTER_DIRS:
        _write_adapter(model, out, adapter, config_dict, seed)
    write_tiny_speech_generator(out, size.hidden, config_dict["rope_theta"], seed=seed)
    write_tiny_vocoder(out / VOCODER_DIR, seed=seed)


def tiny_model_dir(seed: int = DEFAULT_SEED) -> Path:
    """The cached tiny checkpoint for `seed`, written once (atomically: built aside, then renamed)."""
    target = cache_root() / f"tiny-v{TINY_FORMAT_VERSION}-seed{seed}"
    if (target / "config.json").is_file():
        return target
    check_cache_dir(target.parent, env=CACHE_DIR_ENV)  # `--model tiny` cannot do without it
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        write_tiny_model(staging, seed=seed)
        os.replace(staging, target)
    except OSError:
        if not (target / "config.json").is_file():  # not a lost race with another process: a real failure
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target

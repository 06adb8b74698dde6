"""Release-shaped random checkpoints: `Lyra_Mini_3B` / `Lyra_Base_9B` with random weights.

    python -m benchmarks.release_shapes --size mini --out DIR      # 9.7 GB (3 min on a busy 2-core VM)
    python -m benchmarks.release_shapes --size base --out DIR      # 22.5 GB (4.5 min there)

Writes the authors' layout (docs/release-format.md#folder-layout), with the exact key names, shapes and
dtype (bf16) of the release:

    DIR/work_dirs/Lyra_Mini_3B/   config.json generation_config.json tokenizer files
                                  model-0000k-of-0000n.safetensors + model.safetensors.index.json
                                  speech_generator.safetensors            ctc_decoder_config (2,4096,32,11008)
                                  speech_lora/ long_speech_lora/          r64/α16 and r128/α256 LoRA on the
                                                                          decoder's 7 linears + the projector
    DIR/model_zoo/vision/Qwen2VL_2B_ViT/       config.json preprocessor_config.json model.safetensors
    DIR/model_zoo/audio/whisper-large-v3-turbo/ config.json preprocessor_config.json model.safetensors
    DIR/model_zoo/audio/vocoder/               g_00500000 + config.json (fairseq CodeHiFiGAN, km1000)

The main shards hold LLM + ViT + Whisper encoder + speech projector, as in the release
(docs/release-format.md#weight-shards-and-key-names); the tower
folders hold the same random tensors (each tensor is drawn from a generator seeded by its key). Shards are
split as transformers' `save_pretrained(max_shard_size="5GB")` splits them: keys in module order, a new
shard when the next tensor would pass 5·10⁹ bytes. For Mini that gives the release's two shards (5.0 GB +
0.73 GB); the reference does not list Base's shards, so Base gets what the same convention gives (4).
Mini ties lm_head to the embeddings (Qwen2-VL-2B), so its shards have no `lm_head.weight`; Base does not.

Differences from the release, on purpose:
  - the tokenizer is the tiny model's small byte-level BPE (~1k tokens + Qwen's special tokens), not Qwen's
    (which cannot be downloaded here); `vocab_size` and the embedding rows are the release's 151,936, which is
    what memory and speed depend on. Token ids in config.json/generation_config.json are this tokenizer's.
  - the Whisper tower folder holds the encoder only (`model.encoder.*`); the decoder is never read. Its
    config.json is the full one (decoder sizes included).
  - the vocoder has the release config's width (km1000, 512 channels) with random weights.

Tensors are generated and written one at a time (a streamed safetensors writer), so writing needs about
the largest tensor in memory (the 151,936-row embedding), not a shard. `config.json` of the model folder
is written last: a folder with it is complete, and an existing complete folder is kept unless --force.

A `--size smoke` model has this layout at toy dimensions, for tests and `gpu_check.sh --cpu-smoke`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Qwen2VLVisionConfig, WhisperConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

from lyra_cli.audio.features import ENCODER_FRAMES, N_MELS
from lyra_cli.engine.model import checkpoint as ckpt
from lyra_cli.engine.model.adapters import ADAPTER_DIRS, PROJECTOR_FILE, Adapter
from lyra_cli.engine.model.config import parse_config
from lyra_cli.engine.model.network import INIT_STD, LyraForCausalLM
from lyra_cli.engine.model.speech_encoder import build_whisper_encoder
from lyra_cli.engine.model.speech_generator import RELEASE_UNIT_VOCAB_SIZE, RELEASE_UPSAMPLE_FACTOR, SpeechGenerator
from lyra_cli.engine.model.tiny import (
    VOCODER_DIR,
    TinySize,
    generation_config,
    lora_init,
    lora_shapes,
    tiny_config,
    write_adapter_configs,
    write_json,
    write_tokenizer,
    write_tower_configs,
)
from lyra_cli.engine.model.vision import MAX_PIXELS
from lyra_cli.engine.model.vocoder import TINY_VOCODER_CONFIG, write_tiny_vocoder

RELEASE_VOCAB = 151_936  # Qwen2-VL's embedding rows (the tokenizer has 151,646 tokens; rows are padded)
SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size "5GB"
SPEECH_ENCODER_HIDDEN = 1280  # whisper-large-v3(-turbo) d_model: the projector's input is 5 × 1280
RELEASE_GENERATOR = "(2,4096,32,11008)"  # ctc_decoder_config (docs/release-format.md#config-keys)
RELEASE_LORA = {Adapter.SPEECH: (64, 16.0), Adapter.LONG_SPEECH: (128, 256.0)}  # docs/release-format.md#adapters
MAX_LENGTH = 8192  # tokenizer_model_max_length of the stage-2 scripts (docs/release-format.md#config-keys)
# The mHuBERT km1000 CodeHiFiGAN's config.json (docs/release-format.md#unit-vocoder; tests/test_vocoder.py
# RELEASE_CONFIG).
RELEASE_VOCODER_CONFIG: dict[str, Any] = {
    "resblock": "1", "upsample_rates": [5, 4, 4, 2, 2], "upsample_kernel_sizes": [11, 8, 8, 4, 4],
    "upsample_initial_channel": 512, "resblock_kernel_sizes": [3, 7, 11],
    "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]], "num_embeddings": 1000, "embedding_dim": 128,
    "model_in_dim": 128, "segment_size": 8960, "code_hop_size": 320, "f0": False,
    "dur_predictor_params": {"encoder_embed_dim": 128, "var_pred_hidden_dim": 128, "var_pred_kernel_size": 3,
                             "var_pred_dropout": 0.5},
    "sampling_rate": 16000,
}  # fmt: skip
SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float32: "F32"}
HEADER_ALIGN = 8  # safetensors pads its JSON header to a multiple of 8 bytes


def _vit(depth: int, embed_dim: int, heads: int, hidden: int) -> dict[str, Any]:
    """Qwen2-VL's vision_config: 14-px patches, 2×2 merge, 2 frames per temporal patch, mlp ratio 4."""
    return {
        "depth": depth, "embed_dim": embed_dim, "hidden_size": hidden, "mlp_ratio": 4, "num_heads": heads,
        "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
        "hidden_act": "quick_gelu",
    }  # fmt: skip


def _whisper(d_model: int, layers: int, heads: int, ffn: int, decoder_layers: int) -> dict[str, Any]:
    """A full Whisper config.json (128 mels, 1500 positions, the v3 vocabulary and special ids)."""
    return {
        "model_type": "whisper", "num_mel_bins": N_MELS, "d_model": d_model, "encoder_layers": layers,
        "encoder_attention_heads": heads, "encoder_ffn_dim": ffn, "decoder_layers": decoder_layers,
        "decoder_attention_heads": heads, "decoder_ffn_dim": ffn, "max_source_positions": ENCODER_FRAMES,
        "max_target_positions": 448, "vocab_size": 51866, "pad_token_id": 50256, "bos_token_id": 50257,
        "eos_token_id": 50257, "decoder_start_token_id": 50258, "torch_dtype": "float16",
    }  # fmt: skip


@dataclass(frozen=True)
class ReleaseSpec:
    """One release's shapes and names."""

    name: str
    llm: TinySize
    tie_embeddings: bool
    vision_dir: str
    vision: dict[str, Any]
    speech_dir: str
    whisper: dict[str, Any]
    vocab_size: int = RELEASE_VOCAB
    generator: str = RELEASE_GENERATOR
    lora: dict[Adapter, tuple[int, float]] = field(default_factory=lambda: dict(RELEASE_LORA))
    vocoder: dict[str, Any] = field(default_factory=lambda: dict(RELEASE_VOCODER_CONFIG))
    max_pixels: int = MAX_PIXELS


SPECS = {
    "mini": ReleaseSpec(
        name="Lyra_Mini_3B",
        llm=TinySize(hidden=1536, intermediate=8960, layers=28, heads=12, kv_heads=2),  # Qwen2-VL-2B LLM
        tie_embeddings=True,
        vision_dir="model_zoo/vision/Qwen2VL_2B_ViT",
        vision=_vit(depth=32, embed_dim=1280, heads=16, hidden=1536),
        speech_dir="model_zoo/audio/whisper-large-v3-turbo",
        whisper=_whisper(1280, 32, 20, 5120, decoder_layers=4),
    ),
    "base": ReleaseSpec(
        name="Lyra_Base_9B",
        llm=TinySize(hidden=3584, intermediate=18944, layers=28, heads=28, kv_heads=4),  # Qwen2-VL-7B LLM
        tie_embeddings=False,
        vision_dir="model_zoo/vision/Qwen2VL_7B_ViT",
        vision=_vit(depth=32, embed_dim=1280, heads=16, hidden=3584),
        speech_dir="model_zoo/audio/whisper-large-v3",
        whisper=_whisper(1280, 32, 20, 5120, decoder_layers=32),
    ),
    # The release layout at toy sizes (seconds to write and load): for tests and the GPU check's CPU smoke run.
    "smoke": ReleaseSpec(
        name="Lyra_Mini_smoke",
        llm=TinySize(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2),
        tie_embeddings=True,
        vision_dir="model_zoo/vision/Qwen2VL_smoke_ViT",
        vision=_vit(depth=1, embed_dim=32, heads=2, hidden=64),
        speech_dir="model_zoo/audio/whisper-smoke",
        whisper=_whisper(64, 1, 1, 128, decoder_layers=1),
        vocab_size=2048,
        generator="(1,64,4,128)",
        lora={Adapter.SPEECH: (4, 1.0), Adapter.LONG_SPEECH: (8, 16.0)},
        vocoder=dict(TINY_VOCODER_CONFIG),
        max_pixels=28 * 28 * 64,
    ),
}


# ------------------------------------------------------------------------------------------ random tensors


def _generator(seed: int, key: str, device: str) -> torch.Generator:
    # Seeded by the key, so the tower folders get exactly the tensors of the main shards.
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))


def random_tensor(key: str, shape: tuple[int, ...], seed: int, device: str = "cpu") -> torch.Tensor:
    """Norm weights 1, biases 0, everything else N(0, `INIT_STD`), in bf16 (drawn on `device`: a GPU draws
    Lyra-Base's 9 B values in seconds; the values then differ from a CPU-written checkpoint's)."""
    if len(shape) == 1:
        is_norm = key.endswith(".weight") and ("norm" in key or ".ln_" in key)  # RMSNorm / LayerNorm scales
        return torch.full(shape, 1.0 if is_norm else 0.0, dtype=torch.bfloat16)
    out = torch.empty(shape, dtype=torch.bfloat16, device=device)
    return out.normal_(0.0, INIT_STD, generator=_generator(seed, key, device)).cpu()


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], make: Any) -> int:
    """Write a bf16 safetensors file tensor by tensor (`make(key, shape)` → tensor); returns its data bytes."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, shape in shapes.items():
        size = 2 * _numel(shape)
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % HEADER_ALIGN)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")  # renamed when complete: no half-written shard
    try:
        with partial.open("wb") as out:
            out.write(struct.pack("<Q", len(raw)) + raw)
            for key, shape in shapes.items():
                tensor = make(key, shape).to(torch.bfloat16).contiguous()
                out.write(tensor.view(torch.int16).numpy().tobytes())
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    return offset


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# ------------------------------------------------------------------------------------------ layout


def release_config(spec: ReleaseSpec, ids: dict[str, int]) -> dict[str, Any]:
    """The main config.json: tiny's keys with the release's values (docs/release-format.md#config-keys)."""
    raw = tiny_config(spec.vocab_size, ids, spec.llm)
    raw.update({
        "tie_word_embeddings": spec.tie_embeddings, "vision_config": spec.vision, "mm_vision_tower": spec.vision_dir,
        "mm_hidden_size": spec.llm.hidden, "mm_speech_tower": spec.speech_dir, "mm_speech_hidden_size": SPEECH_ENCODER_HIDDEN,
        "speech_encoder_hidden_size": spec.whisper["d_model"], "tokenizer_model_max_length": MAX_LENGTH,
        "speech_generator_type": "ctc", "ctc_decoder_config": spec.generator, "ctc_upsample_factor": RELEASE_UPSAMPLE_FACTOR,
        "ctc_loss_weight": 1.0, "unit_vocab_size": RELEASE_UNIT_VOCAB_SIZE,
    })  # fmt: skip
    return raw


def meta_model(spec: ReleaseSpec, config_dict: dict[str, Any]) -> LyraForCausalLM:
    """The model on the meta device: its parameters give every key and shape, in module order."""
    config = parse_config(config_dict)
    vit_cfg = Qwen2VLVisionConfig(**spec.vision)
    whisper_cfg = WhisperConfig(**spec.whisper)
    return ckpt.build_empty(lambda: LyraForCausalLM(config, Qwen2VisionTransformerPretrainedModel(vit_cfg),
                                                    build_whisper_encoder(whisper_cfg)))  # type: ignore[return-value]  # fmt: skip


def main_shapes(model: LyraForCausalLM, tied: bool) -> dict[str, tuple[int, ...]]:
    """Key → shape of the main shards (a tied lm_head is not saved, as transformers saves tied weights)."""
    return {k: tuple(p.shape) for k, p in model.named_parameters() if not (tied and k == "lm_head.weight")}


def shard_plan(shapes: dict[str, tuple[int, ...]], max_bytes: int = SHARD_BYTES) -> list[dict[str, tuple[int, ...]]]:
    """transformers' greedy split: a new shard when the next tensor would take this one past `max_bytes`."""
    shards: list[dict[str, tuple[int, ...]]] = [{}]
    size = 0
    for key, shape in shapes.items():
        nbytes = 2 * _numel(shape)
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = shape
        size += nbytes
    return shards


def _write_main_shards(model_dir: Path, shapes: dict[str, tuple[int, ...]], seed: int, device: str) -> None:
    shards = shard_plan(shapes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    total, weight_map = 0, {}
    for name, shard in zip(names, shards):
        total += write_safetensors(model_dir / name, shard, lambda k, s: random_tensor(k, s, seed, device))
        weight_map.update({k: name for k in shard})
    write_json(model_dir / ckpt.INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})


def _write_tower_folders(root: Path, spec: ReleaseSpec, shapes: dict[str, tuple[int, ...]], seed: int,
                         device: str) -> None:  # fmt: skip
    """HF tower folders: the ViT as `save_pretrained` names it (no prefix), Whisper under `model.encoder.`."""
    write_tower_configs(root, (spec.vision_dir, spec.vision), (spec.speech_dir, spec.whisper), spec.max_pixels)
    for prefix, folder, stored in ((ckpt.VISION_PREFIX, spec.vision_dir, ""),
                                   (ckpt.SPEECH_PREFIX, spec.speech_dir, "model.encoder.")):  # fmt: skip
        tower = {stored + k[len(prefix):]: s for k, s in shapes.items() if k.startswith(prefix)}
        write_safetensors(root / folder / ckpt.SINGLE_FILE, tower,
                          lambda k, s, p=prefix, st=stored: random_tensor(p + k[len(st):], s, seed, device))  # fmt: skip


def _write_generator(model_dir: Path, spec: ReleaseSpec, config_dict: dict[str, Any], seed: int, device: str) -> None:
    config = parse_config(config_dict)
    assert config.speech_generator is not None
    generator = ckpt.build_empty(lambda: SpeechGenerator(config.speech_generator, spec.llm.hidden, config.text.rope_theta))
    shapes = {ckpt.GENERATOR_PREFIX + k: tuple(p.shape) for k, p in generator.named_parameters()}
    write_safetensors(model_dir / ckpt.SPEECH_GENERATOR_FILE, shapes, lambda k, s: random_tensor(k, s, seed, device))


def _write_adapters(model_dir: Path, spec: ReleaseSpec, model: LyraForCausalLM, config_dict: dict[str, Any],
                    seed: int) -> None:  # fmt: skip
    projector = {k: tuple(p.shape) for k, p in model.model.mm_speech_projector.named_parameters()}
    for i, (adapter, folder_name) in enumerate(ADAPTER_DIRS.items()):
        folder = model_dir / folder_name
        rank, alpha = spec.lora[adapter]
        gen = torch.Generator().manual_seed(seed + 1 + i)
        write_safetensors(folder / "adapter_model.safetensors", lora_shapes(model.model.layers, rank),
                          lambda k, s: lora_init(k, s, gen))  # fmt: skip
        write_adapter_configs(folder, adapter, rank, alpha, {**config_dict, "model_type": "Lyra_Qwen2VL"})
        # the release's non_lora_trainables.bin: a torch pickle of the projector's bf16 tensors
        # (docs/release-format.md#adapters)
        state = {f"model.model.mm_speech_projector.{k}": random_tensor(f"{folder_name}/{k}", s, seed)
                 for k, s in projector.items()}  # fmt: skip
        torch.save(state, folder / PROJECTOR_FILE)


def write_release(out: Path, size: str, *, seed: int = 0, force: bool = False) -> Path:
    """Write the release-shaped checkpoint of `size` under `out`; returns the model folder."""
    spec = SPECS[size]
    model_dir = out / "work_dirs" / spec.name
    if (model_dir / "config.json").is_file() and not force:
        return model_dir
    shutil.rmtree(model_dir, ignore_errors=True)
    model_dir.mkdir(parents=True)
    _, ids = write_tokenizer(model_dir)
    config_dict = release_config(spec, ids)
    model = meta_model(spec, config_dict)
    shapes = main_shapes(model, spec.tie_embeddings)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _write_main_shards(model_dir, shapes, seed, device)
    _write_tower_folders(out, spec, shapes, seed, device)
    _write_generator(model_dir, spec, config_dict, seed, device)
    _write_adapters(model_dir, spec, model, config_dict, seed)
    write_tiny_vocoder(out / VOCODER_DIR, seed=seed, raw_config=spec.vocoder)
    write_json(model_dir / "generation_config.json", generation_config(ids))
    write_json(model_dir / "config.json", config_dict)  # last: its presence marks a complete folder
    return model_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SPECS), default="mini")
    parser.add_argument("--out", type=Path, required=True, help="root folder: work_dirs/<name> and model_zoo/ go here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rewrite a complete model folder")
    args = parser.parse_args()
    model_dir = write_release(args.out, args.size, seed=args.seed, force=args.force)
    total = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"{model_dir} ({total / 1e9:.2f} GB under {args.out})")


if __name__ == "__main__":
    main()

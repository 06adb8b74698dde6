"""Speech input: Whisper encoder (transformers, frozen) + concat-k projector = 300 tokens per 30 s window.

The encoder config comes from the tower folder's `config.json` when the release ships it
(`model_zoo/audio/whisper-large-v3`), else it is read off the checkpoint's own tensor shapes, so a
release folder without the tower folder still loads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from lyra_cli.audio.features import ENCODER_FRAMES, N_MELS, log_mel_spectrogram
from lyra_cli.engine.config import read_json
from lyra_cli.errors import CheckpointError

log = logging.getLogger(__name__)

WHISPER_HEAD_DIM = 64  # every released Whisper size uses 64-wide heads
DEFAULT_ENCODE_BATCH = 8  # windows per encoder call: bounds activation memory for long audio


def _count_layers(keys: list[str], prefix: str) -> int:
    indices = {int(k[len(prefix) :].split(".", 1)[0]) for k in keys if k.startswith(prefix)}
    return max(indices) + 1 if indices else 0


def whisper_config_from_shapes(shape_of: Callable[[str], tuple[int, ...]], keys: list[str], prefix: str) -> WhisperConfig:
    """Infer the encoder hyper-parameters from the stored tensors (conv1: (d_model, n_mels, 3))."""
    d_model, n_mels, _ = shape_of(prefix + "conv1.weight")
    ffn_dim, _ = shape_of(prefix + "layers.0.fc1.weight")
    n_positions, _ = shape_of(prefix + "embed_positions.weight")
    n_layers = _count_layers(keys, prefix + "layers.")
    return WhisperConfig(
        num_mel_bins=n_mels,
        d_model=d_model,
        encoder_layers=n_layers,
        encoder_attention_heads=max(1, d_model // WHISPER_HEAD_DIM),
        encoder_ffn_dim=ffn_dim,
        max_source_positions=n_positions,
    )


def whisper_config(tower_dir: Path | None, infer: Callable[[], WhisperConfig]) -> WhisperConfig:
    if tower_dir is not None and (tower_dir / "config.json").is_file():
        config = WhisperConfig(**read_json(tower_dir / "config.json"))
    else:
        config = infer()
        log.info("Whisper encoder config inferred from the checkpoint's shapes (no tower folder)")
    if config.num_mel_bins != N_MELS or config.max_source_positions != ENCODER_FRAMES:
        raise CheckpointError(
            f"the speech tower expects {config.num_mel_bins} mel bins and {config.max_source_positions} frames",
            f"Lyra's speech front-end produces {N_MELS} mel bins and {ENCODER_FRAMES} encoder frames (whisper-large-v3)",
        )
    config._attn_implementation = "sdpa"
    return config


def build_whisper_encoder(config: WhisperConfig) -> nn.Module:
    return WhisperEncoder(config)


@torch.inference_mode()
def encode_windows(
    tower: nn.Module,
    windows: list[np.ndarray],
    *,
    batch_size: int = DEFAULT_ENCODE_BATCH,
    on_batch: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Audio windows (each ≤ 30 s of 16 kHz samples) → encoder frames (N, 1500, E), in batches of windows.

    The frames are kept before projection: each adapter has its own projector (official-lyra.md §5),
    so a conversation can re-project the same clip when the adapter changes without re-encoding.
    """
    param = next(tower.parameters())
    chunks = []
    for start in range(0, len(windows), batch_size):
        mel = log_mel_spectrogram(windows[start : start + batch_size], device=param.device)  # (b, 128, 3000)
        chunks.append(tower(mel.to(param.dtype)).last_hidden_state)  # (b, 1500, E)
        if on_batch is not None:
            on_batch(min(start + batch_size, len(windows)))
    return torch.cat(chunks)


@torch.inference_mode()
def project_frames(projector: nn.Module, frames: torch.Tensor) -> torch.Tensor:
    """Encoder frames (N, 1500, E) → speech tokens (N·300, H) through one projector."""
    weight = next(projector.parameters())
    return projector(frames.to(device=weight.device, dtype=weight.dtype)).flatten(0, 1)

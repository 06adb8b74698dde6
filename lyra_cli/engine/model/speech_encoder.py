"""Speech input: Whisper encoder (transformers, frozen) + concat-k projector = 300 tokens per 30 s window.

The encoder config comes from the tower folder's `config.json` (`model_zoo/audio/whisper-large-v3`), or,
without the folder, from the public encoder its stored weights are recognised as (towers.py): the head
count cannot be read off the weights, so it is never guessed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from lyra_cli.audio.features import ENCODER_FRAMES, N_MELS, log_mel_spectrogram
from lyra_cli.errors import CheckpointError

log = logging.getLogger(__name__)

DEFAULT_ENCODE_BATCH = 8  # windows per encoder call: bounds activation memory for long audio


def whisper_config(settings: Mapping[str, Any]) -> WhisperConfig:
    """transformers' config from the settings `towers.resolve_speech` determined; checked against Lyra's front end."""
    config = WhisperConfig(**settings)
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

    The frames are kept before projection: each adapter has its own projector
    (docs/authors-behaviour.md#adapter-switch), so a conversation can re-project the same clip when the adapter
    changes without re-encoding.
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

"""Speech input: Whisper encoder (transformers, frozen) + concat-k projector = 300 tokens per 30 s window.

The encoder config comes from the tower folder's `config.json` (`model_zoo/audio/whisper-large-v3`), or,
without the folder, from the public encoder its stored weights are recognised as (towers.py): the head
count cannot be read off the weights, so it is never guessed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from lyra_cli.audio.features import ENCODER_FRAMES, N_MELS, log_mel_spectrogram
from lyra_cli.audio.io import SAMPLE_RATE_HZ
from lyra_cli.audio.windows import iter_window_batches
from lyra_cli.engine.model.adapters import Adapter, AdapterBank, route
from lyra_cli.engine.run.prompt import SpeechPart
from lyra_cli.errors import CheckpointError, InputError

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


def encode_speech(
    tower: nn.Module,
    bank: AdapterBank,
    windows: Iterable[np.ndarray],
    source: str,
    *,
    batch_size: int = DEFAULT_ENCODE_BATCH,
    keep_frames: bool = True,
    on_batch: Callable[[float], None] | None = None,
) -> SpeechPart:
    """The one speech path: 30 s windows (a list, or a stream of any length) → a `SpeechPart`.

    Windows are encoded `batch_size` at a time. `keep_frames` (a clip held in memory) keeps every frame
    and projects nothing: each turn projects them with its own adapter's projector. Without it (a streamed
    recording) each batch is projected as soon as `adapters.route` has decided the adapter, so only one
    batch of frames is ever held; `on_batch(seconds encoded so far)` follows the progress.
    """
    frames: list[torch.Tensor] = []  # all of them, or (streamed) those whose adapter is not decided yet
    tokens: list[torch.Tensor] = []
    n_windows, n_samples = 0, 0
    adapter = Adapter.NONE
    for batch in iter_window_batches(windows, batch_size):
        frames.append(encode_windows(tower, batch, batch_size=len(batch)))  # (b, 1500, E): one encoder call
        n_windows += len(batch)
        n_samples += sum(len(w) for w in batch)
        adapter = route([n_windows])
        # more windows never route a clip back from long speech, so its batches are final once it gets there
        if not keep_frames and adapter is Adapter.LONG_SPEECH:
            tokens.extend(project_frames(bank.projector(adapter), f) for f in frames)
            frames.clear()
        if on_batch is not None:
            on_batch(n_samples / SAMPLE_RATE_HZ)
    if n_windows == 0 or n_samples == 0:
        raise InputError(f"`{source}` contains no audio samples (0-second audio)", "check the recording")
    duration_s = n_samples / SAMPLE_RATE_HZ
    if keep_frames:
        return SpeechPart(n_windows, duration_s, source, frames=torch.cat(frames))
    if frames:  # a single window: the short-speech adapter and its projector
        tokens.append(project_frames(bank.projector(adapter), torch.cat(frames)))
    return SpeechPart(n_windows, duration_s, source, tokens=torch.cat(tokens), adapter=adapter)

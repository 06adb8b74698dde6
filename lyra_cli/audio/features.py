"""128-bin log-mel spectrograms of 30 s windows, as Whisper large-v3 (and so Lyra's speech encoder) expects.

Numerically this is transformers' `WhisperFeatureExtractor(feature_size=128)` on its torch path, which the
authors call once per window: zero-pad to 30 s, STFT, power, slaney mel, log10, an 80 dB floor below each
window's own maximum (taken after padding), then `(x + 4) / 4`. Written here so that it batches windows, runs
on any device, and needs neither librosa nor openai-whisper.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch

from lyra_cli.audio.io import SAMPLE_RATE_HZ
from lyra_cli.audio.windows import WINDOW_SAMPLES, WINDOW_SECONDS

N_MELS = 128  # large-v3 and Lyra; earlier Whisper models used 80
N_FFT = 400  # 25 ms analysis window
HOP_LENGTH = 160  # 10 ms between frames
N_FRAMES = WINDOW_SAMPLES // HOP_LENGTH  # 3000 mel frames per window
ENCODER_FRAMES = N_FRAMES // 2  # 1500: the encoder's second conv has stride 2
PROJECTOR_STRIDE = 5  # Lyra's projector concatenates 5 encoder frames into one token
TOKENS_PER_WINDOW = ENCODER_FRAMES // PROJECTOR_STRIDE  # 300
TOKEN_SECONDS = WINDOW_SECONDS / TOKENS_PER_WINDOW  # 0.1 s of audio per speech token

MEL_FMAX_HZ = SAMPLE_RATE_HZ / 2  # filters span 0 Hz to Nyquist
LOG_FLOOR = 1e-10  # power floor before log10
DYNAMIC_RANGE = 8.0  # log10 units (80 dB) kept below each window's maximum

# Slaney's mel scale, written as transformers and librosa write it (same float64 rounding).
_MIN_LOG_HZ = 1000.0  # where the scale turns from linear to logarithmic
_MIN_LOG_MEL = 15.0  # = 3 * _MIN_LOG_HZ / 200
_MELS_PER_LOG_HZ = 27.0 / np.log(6.4)


@lru_cache(maxsize=None)
def mel_filters(n_mels: int = N_MELS) -> torch.Tensor:
    """Slaney-scale, slaney-normalised triangular filters: float32 (n_mels, N_FFT // 2 + 1), on CPU.

    Equal to `transformers.audio_utils.mel_filter_bank(..., norm="slaney", mel_scale="slaney").T` (and to
    librosa's default `filters.mel`); computed in float64 like both, then cast. Cached: do not modify it.
    """
    fft_freqs_hz = np.linspace(0, SAMPLE_RATE_HZ // 2, N_FFT // 2 + 1)  # (n_freqs,)
    mel_edges = np.linspace(_hz_to_mel(0.0), _hz_to_mel(MEL_FMAX_HZ), n_mels + 2)
    edges_hz = _mel_to_hz(mel_edges)  # (n_mels + 2,): lower edge, centre and upper edge of each filter
    widths_hz = np.diff(edges_hz)  # (n_mels + 1,)
    slopes = edges_hz[None, :] - fft_freqs_hz[:, None]  # (n_freqs, n_mels + 2)
    rising = -slopes[:, :-2] / widths_hz[:-1]
    falling = slopes[:, 2:] / widths_hz[1:]
    weights = np.maximum(0.0, np.minimum(rising, falling))  # (n_freqs, n_mels)
    weights *= 2.0 / (edges_hz[2:] - edges_hz[:-2])  # equal area per filter: roughly constant energy per band
    return torch.from_numpy(weights.T.astype(np.float32))


def log_mel_spectrogram(
    windows: Sequence[np.ndarray] | torch.Tensor,
    n_mels: int = N_MELS,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Whisper log-mel features of each 16 kHz window: float32 (n_windows, n_mels, N_FRAMES) on `device`.

    `windows` is a sequence of 1-D arrays (e.g. from `split_windows`) or a tensor (n_windows, n_samples) or
    (n_samples,). Each window is zero-padded, or truncated, to WINDOW_SAMPLES first. Peak memory is about
    10 MB per window, so callers with hours of audio pass bounded batches.
    """
    audio = _padded_batch(windows, torch.device(device))  # (N, WINDOW_SAMPLES)
    stft = torch.stft(
        audio, N_FFT, HOP_LENGTH, window=torch.hann_window(N_FFT, device=audio.device), return_complex=True
    )  # (N, N_FFT // 2 + 1, N_FRAMES + 1); center=True reflect-pads by N_FFT // 2
    power = (stft[..., :-1].abs() ** 2).contiguous()  # (N, n_freqs, N_FRAMES): Whisper drops the last frame
    mel = mel_filters(n_mels).to(audio.device) @ power  # (N, n_mels, N_FRAMES)
    log_spec = torch.clamp(mel, min=LOG_FLOOR).log10()
    window_max = log_spec.amax(dim=(1, 2), keepdim=True)  # (N, 1, 1): per window, so batching changes nothing
    log_spec = torch.maximum(log_spec, window_max - DYNAMIC_RANGE)
    return (log_spec + 4.0) / 4.0  # roughly into [-1, 1]


def _padded_batch(windows: Sequence[np.ndarray] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Stack `windows` into float32 (N, WINDOW_SAMPLES) on `device`, zero-padding or truncating each."""
    if isinstance(windows, torch.Tensor):
        audio = windows.to(device=device, dtype=torch.float32)
        audio = audio[None] if audio.ndim == 1 else audio
        if audio.ndim != 2 or audio.shape[0] == 0:
            raise ValueError(f"expected a tensor (n_windows, n_samples) or (n_samples,), got {tuple(audio.shape)}")
        audio = audio[:, :WINDOW_SAMPLES]
        return torch.nn.functional.pad(audio, (0, WINDOW_SAMPLES - audio.shape[1]))
    if len(windows) == 0:
        raise ValueError("no windows to compute features for")
    batch = np.zeros((len(windows), WINDOW_SAMPLES), dtype=np.float32)
    for row, window in zip(batch, windows):
        if np.ndim(window) != 1:
            raise ValueError(f"expected 1-D windows of shape (n_samples,), got shape {np.shape(window)}")
        n_samples = min(len(window), WINDOW_SAMPLES)
        row[:n_samples] = window[:n_samples]
    return torch.from_numpy(batch).to(device)


def _hz_to_mel(freq_hz: np.ndarray | float) -> np.ndarray:
    """Slaney's mel scale: linear (3 mels per 200 Hz) below 1 kHz, logarithmic above."""
    freq_hz = np.asarray(freq_hz, dtype=np.float64)
    log_region = freq_hz >= _MIN_LOG_HZ
    safe_hz = np.where(log_region, freq_hz, _MIN_LOG_HZ)  # no log(0) in the branch that np.where discards
    return np.where(log_region, _MIN_LOG_MEL + np.log(safe_hz / _MIN_LOG_HZ) * _MELS_PER_LOG_HZ, 3.0 * freq_hz / 200.0)


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    """Inverse of `_hz_to_mel`."""
    log_region = mels >= _MIN_LOG_MEL
    return np.where(log_region, _MIN_LOG_HZ * np.exp((mels - _MIN_LOG_MEL) / _MELS_PER_LOG_HZ), 200.0 * mels / 3.0)

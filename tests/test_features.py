"""Contracts of `lyra_cli.audio.features`: equal to transformers' WhisperFeatureExtractor, batched per window."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import WhisperFeatureExtractor
from transformers.audio_utils import mel_filter_bank

from lyra_cli.audio.features import (
    ENCODER_FRAMES,
    HOP_LENGTH,
    N_FFT,
    N_FRAMES,
    N_MELS,
    PROJECTOR_STRIDE,
    TOKEN_SECONDS,
    TOKENS_PER_WINDOW,
    log_mel_spectrogram,
    mel_filters,
)
from lyra_cli.audio.io import SAMPLE_RATE_HZ, load_audio
from lyra_cli.audio.windows import WINDOW_SAMPLES

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def extractor() -> WhisperFeatureExtractor:
    return WhisperFeatureExtractor(feature_size=N_MELS)  # large-v3's settings: 128 bins, 30 s, hop 160


@pytest.fixture(scope="module")
def jfk() -> np.ndarray:
    return load_audio(REAL / "jfk.flac")


def _reference(extractor: WhisperFeatureExtractor, wav: np.ndarray) -> np.ndarray:
    """(1, N_MELS, N_FRAMES), as the authors compute it for one window."""
    return extractor(wav, sampling_rate=SAMPLE_RATE_HZ, return_tensors="np")["input_features"]


def test_constants():
    assert (N_MELS, N_FFT, HOP_LENGTH) == (128, 400, 160)
    assert N_FRAMES == 3000 == WINDOW_SAMPLES // HOP_LENGTH
    assert ENCODER_FRAMES == 1500
    assert PROJECTOR_STRIDE == 5
    assert TOKENS_PER_WINDOW == 300
    assert TOKEN_SECONDS == pytest.approx(0.1)


@pytest.mark.parametrize("n_mels", [N_MELS, 80])
def test_mel_filters_equal_transformers(n_mels):
    expected = mel_filter_bank(
        num_frequency_bins=N_FFT // 2 + 1,
        num_mel_filters=n_mels,
        min_frequency=0.0,
        max_frequency=SAMPLE_RATE_HZ / 2,
        sampling_rate=SAMPLE_RATE_HZ,
        norm="slaney",
        mel_scale="slaney",
    ).T  # (n_mels, n_freqs)
    filters = mel_filters(n_mels)
    assert filters.shape == (n_mels, N_FFT // 2 + 1) and filters.dtype == torch.float32
    np.testing.assert_allclose(filters.numpy(), expected, rtol=1e-6, atol=1e-9)
    assert mel_filters(n_mels) is filters  # cached


def _clips(jfk: np.ndarray) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "jfk": jfk,
        "extreme_ironing_mp3": load_audio(REAL / "extreme_ironing.mp3"),
        "exactly_30s": np.tile(jfk, 3)[:WINDOW_SAMPLES],
        "half_second": jfk[: SAMPLE_RATE_HZ // 2],
        "white_noise": (0.1 * rng.standard_normal(20 * SAMPLE_RATE_HZ)).astype(np.float32),
    }


@pytest.mark.parametrize("name", ["jfk", "extreme_ironing_mp3", "exactly_30s", "half_second", "white_noise"])
def test_equal_to_whisper_feature_extractor(extractor, jfk, name):
    wav = _clips(jfk)[name]
    ours = log_mel_spectrogram([wav])
    assert ours.shape == (1, N_MELS, N_FRAMES) and ours.dtype == torch.float32
    assert np.abs(ours.numpy() - _reference(extractor, wav)).max() <= TOLERANCE


def test_batch_equals_windows_one_at_a_time(jfk):
    """The -80 dB floor is per window: a quiet window next to a loud one must not be clipped by the loud one."""
    quiet = jfk * 1e-3
    batch = log_mel_spectrogram([jfk, quiet])
    assert batch.shape == (2, N_MELS, N_FRAMES)
    torch.testing.assert_close(batch[0], log_mel_spectrogram([jfk])[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(batch[1], log_mel_spectrogram([quiet])[0], atol=1e-6, rtol=0)


def test_tensor_input_equals_list_input(jfk):
    from_list = log_mel_spectrogram([jfk])
    torch.testing.assert_close(log_mel_spectrogram(torch.from_numpy(jfk)), from_list, atol=0, rtol=0)
    torch.testing.assert_close(log_mel_spectrogram(torch.from_numpy(jfk)[None]), from_list, atol=0, rtol=0)


def test_longer_input_is_truncated_to_one_window(jfk):
    long_wav = np.tile(jfk, 3)  # 33 s
    torch.testing.assert_close(
        log_mel_spectrogram([long_wav]), log_mel_spectrogram([long_wav[:WINDOW_SAMPLES]]), atol=0, rtol=0
    )


def test_empty_window_is_all_padding():
    """The authors' extra window at exact multiples of 30 s: log10(1e-10) everywhere, i.e. (-10 + 4) / 4."""
    features = log_mel_spectrogram([np.zeros(0, dtype=np.float32)])
    assert features.shape == (1, N_MELS, N_FRAMES)
    assert torch.all(features == -1.5)


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError):
        log_mel_spectrogram([])
    with pytest.raises(ValueError):
        log_mel_spectrogram([np.zeros((2, 100), dtype=np.float32)])

"""Contracts of `lyra_cli.audio.windows`: how many 30 s windows, and exactly which samples each holds."""

from __future__ import annotations

import numpy as np
import pytest

from lyra_cli.audio.io import SAMPLE_RATE_HZ
from lyra_cli.audio.windows import WINDOW_SAMPLES, WINDOW_SECONDS, count_windows, split_windows


def _samples(seconds: float) -> int:
    return round(seconds * SAMPLE_RATE_HZ)


def test_window_constants():
    assert WINDOW_SECONDS == 30
    assert WINDOW_SAMPLES == 480_000 == WINDOW_SECONDS * SAMPLE_RATE_HZ


@pytest.mark.parametrize(
    ("seconds", "ours", "official"),
    [(0.5, 1, 1), (29.9, 1, 1), (30.0, 1, 2), (30.1, 2, 2), (60.0, 2, 3), (61.0, 3, 3)],
)
def test_count_windows(seconds, ours, official):
    n_samples = _samples(seconds)
    assert count_windows(n_samples) == ours
    assert count_windows(n_samples, official_extra_window=True) == official


def test_one_sample_past_a_window_opens_another():
    assert count_windows(WINDOW_SAMPLES) == 1
    assert count_windows(WINDOW_SAMPLES + 1) == 2
    assert count_windows(1) == 1


@pytest.mark.parametrize("n_samples", [0, -1])
@pytest.mark.parametrize("official", [False, True])
def test_no_windows_for_no_audio(n_samples, official):
    with pytest.raises(ValueError, match="empty"):
        count_windows(n_samples, official_extra_window=official)


@pytest.mark.parametrize(
    ("seconds", "lengths"),
    [
        (0.5, [8_000]),
        (29.9, [478_400]),
        (30.0, [WINDOW_SAMPLES]),
        (30.1, [WINDOW_SAMPLES, 1_600]),
        (61.0, [WINDOW_SAMPLES, WINDOW_SAMPLES, 16_000]),
    ],
)
def test_split_windows_are_consecutive_views(seconds, lengths):
    wav = np.arange(_samples(seconds), dtype=np.float32)
    windows = split_windows(wav)
    assert [len(w) for w in windows] == lengths
    np.testing.assert_array_equal(np.concatenate(windows), wav)  # no overlap, no gap, nothing dropped
    assert all(np.shares_memory(w, wav) for w in windows)


def test_official_mode_adds_an_empty_window_at_exact_multiples():
    wav = np.ones(_samples(30.0), dtype=np.float32)
    windows = split_windows(wav, official_extra_window=True)
    assert [len(w) for w in windows] == [WINDOW_SAMPLES, 0]
    assert [len(w) for w in split_windows(wav)] == [WINDOW_SAMPLES]


def test_official_mode_matches_ours_off_the_multiples():
    wav = np.ones(_samples(45.0), dtype=np.float32)
    ours, official = split_windows(wav), split_windows(wav, official_extra_window=True)
    assert [len(w) for w in ours] == [len(w) for w in official] == [WINDOW_SAMPLES, _samples(15.0)]


def test_split_rejects_empty_and_multichannel_audio():
    with pytest.raises(ValueError):
        split_windows(np.zeros(0, dtype=np.float32))
    with pytest.raises(ValueError, match="mono"):
        split_windows(np.zeros((2, 100), dtype=np.float32))

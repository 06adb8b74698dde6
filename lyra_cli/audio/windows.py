"""Cut 16 kHz audio into the 30-second windows that Whisper's encoder, and so Lyra, consumes.

Windows are consecutive and do not overlap; the last one may be shorter (features pad it to 30 s).
The authors compute `n // WINDOW_SAMPLES + 1` windows, so audio of exactly k·30 s gets an extra empty window
(300 tokens of padding). We count `ceil(n / WINDOW_SAMPLES)`; `official_extra_window=True` restores theirs.
"""

from __future__ import annotations

import numpy as np

from lyra_cli.audio.io import SAMPLE_RATE_HZ

WINDOW_SECONDS = 30  # Whisper's fixed input length
WINDOW_SAMPLES = WINDOW_SECONDS * SAMPLE_RATE_HZ


def count_windows(n_samples: int, *, official_extra_window: bool = False) -> int:
    """Number of 30 s windows for `n_samples` of 16 kHz audio: 30.0 s -> 1, 30.1 s -> 2 (official: 2 and 2)."""
    if n_samples <= 0:
        raise ValueError(f"cannot window {n_samples} samples: audio must not be empty")
    if official_extra_window:
        return n_samples // WINDOW_SAMPLES + 1
    return -(-n_samples // WINDOW_SAMPLES)  # ceil without floats


def split_windows(wav: np.ndarray, *, official_extra_window: bool = False) -> list[np.ndarray]:
    """Split `wav` (n_samples,) into consecutive views of WINDOW_SAMPLES samples; the last may be shorter.

    With `official_extra_window`, audio of exactly k·30 s ends with an extra window of shape (0,).
    """
    if wav.ndim != 1:
        raise ValueError(f"expected mono audio of shape (n_samples,), got shape {wav.shape}")
    n_windows = count_windows(wav.shape[0], official_extra_window=official_extra_window)
    return [wav[i * WINDOW_SAMPLES : (i + 1) * WINDOW_SAMPLES] for i in range(n_windows)]

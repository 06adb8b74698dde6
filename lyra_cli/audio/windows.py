"""Cut 16 kHz audio into the 30-second windows that Whisper's encoder, and so Lyra, consumes.

Windows are consecutive and do not overlap; the last one may be shorter (features pad it to 30 s).
The authors compute `n // WINDOW_SAMPLES + 1` windows, so audio of exactly k·30 s gets an extra empty window
(300 tokens of padding). We count `ceil(n / WINDOW_SAMPLES)`; `official_extra_window=True` restores theirs.

`split_windows` cuts audio already in memory; `iter_windows` cuts a stream of blocks (from
`open_audio_stream`) into the same windows while holding one window and one block, so hours of audio never
sit in memory at once. `iter_window_batches` groups them for an encoder that runs a few windows per call.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

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


def iter_windows(blocks: Iterable[np.ndarray], *, official_extra_window: bool = False) -> Iterator[np.ndarray]:
    """Regroup mono blocks (n_samples,) of any sizes into float32 windows of WINDOW_SAMPLES; the last may be shorter.

    Yields exactly what `split_windows` gives on the concatenated blocks (fresh arrays rather than views, so a
    caller may keep a batch of them). Raises `ValueError` on a multichannel block or an empty stream.
    """
    window = np.empty(WINDOW_SAMPLES, dtype=np.float32)
    n_filled, n_total = 0, 0
    for block in blocks:
        if np.ndim(block) != 1:
            raise ValueError(f"expected mono blocks of shape (n_samples,), got shape {np.shape(block)}")
        n_total += block.shape[0]
        start = 0
        while start < block.shape[0]:  # a block may fill several windows, or only part of one
            n_taken = min(WINDOW_SAMPLES - n_filled, block.shape[0] - start)
            window[n_filled : n_filled + n_taken] = block[start : start + n_taken]
            n_filled, start = n_filled + n_taken, start + n_taken
            if n_filled == WINDOW_SAMPLES:
                yield window
                window, n_filled = np.empty(WINDOW_SAMPLES, dtype=np.float32), 0
    count_windows(n_total)  # the same ValueError as split_windows for an empty stream
    if n_filled:
        yield window[:n_filled].copy()  # a copy, so that the unused tail of the buffer is freed
    elif official_extra_window:
        yield np.zeros(0, dtype=np.float32)


def iter_window_batches(windows: Iterable[np.ndarray], batch_size: int) -> Iterator[list[np.ndarray]]:
    """Group consecutive windows into lists of `batch_size` (the last may be shorter), for batched encoding."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    batch: list[np.ndarray] = []
    for window in windows:
        batch.append(window)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch

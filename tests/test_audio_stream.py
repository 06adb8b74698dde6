"""Contracts of streamed audio: the stream equals one-shot decoding, windows equal `split_windows`, bounded memory."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile
import soxr

from lyra_cli.audio.io import (
    RESAMPLE_QUALITY,
    SAMPLE_RATE_HZ,
    AudioStream,
    _decode_blocks,
    load_audio,
    open_audio_stream,
)
from lyra_cli.audio.windows import WINDOW_SAMPLES, iter_window_batches, iter_windows, split_windows
from lyra_cli.errors import InputError

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
JFK = REAL / "jfk.flac"  # 11.0 s, 44.1 kHz, stereo
IRONING_MP3 = REAL / "extreme_ironing.mp3"  # 2.09 s, 24 kHz mono
MOVEMENT_MP4 = REAL / "movement.mp4"  # aac sound track at 44.1 kHz, decoded by PyAV
PRED_WAV = REAL / "pred_round0.wav"  # 16 s, 16 kHz mono: no resampling at all

REAL_FILES = [JFK, IRONING_MP3, MOVEMENT_MP4, PRED_WAV]
BLOCK_SECONDS = [0.01, 1.0, 10.0, 1_000.0]  # a block per codec frame, several per window, one for the whole file


def _one_shot(path: Path, channel_mix: str = "mean") -> np.ndarray:
    """The reference: decode everything, mix, then resample in a single soxr call. (n_samples,) float32."""
    native_rate_hz, blocks = _decode_blocks(path)
    native = np.concatenate(list(blocks))  # (n_frames, n_channels)
    mono = native.mean(axis=1, dtype=np.float32) if channel_mix == "mean" else np.ascontiguousarray(native[:, 0])
    if native_rate_hz == SAMPLE_RATE_HZ:
        return mono
    return soxr.resample(mono, native_rate_hz, SAMPLE_RATE_HZ, quality=RESAMPLE_QUALITY)


def _seconds(seconds: float) -> int:
    return round(seconds * SAMPLE_RATE_HZ)


# ---------------------------------------------------------------------------------------------------------
# The stream equals one-shot decoding
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", REAL_FILES, ids=lambda p: p.name)
@pytest.mark.parametrize("block_seconds", BLOCK_SECONDS)
def test_stream_is_bit_identical_to_one_shot_resampling(path, block_seconds):
    """soxr's streaming resampler carries its filter state across blocks: no seams, not even rounding."""
    stream = open_audio_stream(path, block_seconds=block_seconds)
    blocks = list(stream)
    assert all(block.dtype == np.float32 and block.ndim == 1 for block in blocks)
    np.testing.assert_array_equal(np.concatenate(blocks), _one_shot(path))
    np.testing.assert_array_equal(np.concatenate(blocks), load_audio(path))


def test_first_channel_stream_equals_one_shot():
    streamed = np.concatenate(list(open_audio_stream(JFK, channel_mix="first", block_seconds=0.5)))
    np.testing.assert_array_equal(streamed, _one_shot(JFK, channel_mix="first"))


@pytest.mark.parametrize("path", [JFK, PRED_WAV], ids=lambda p: p.name)
def test_blocks_hold_about_block_seconds(path):
    lengths = [len(block) for block in open_audio_stream(path, block_seconds=2.0)]
    assert sum(lengths) == len(_one_shot(path))
    # soxr releases output in its own chunks (measured: within 400 samples); the final flush comes last.
    assert all(abs(n - _seconds(2.0)) < _seconds(0.05) for n in lengths[:-2])


@pytest.mark.parametrize(
    ("path", "duration_s"), [(JFK, 11.0), (IRONING_MP3, 2.088), (MOVEMENT_MP4, 4.294), (PRED_WAV, 16.0)]
)
def test_duration_comes_from_metadata_and_position_counts_audio(path, duration_s):
    stream = open_audio_stream(path)
    assert isinstance(stream, AudioStream) and stream.source == path
    assert stream.duration_s == pytest.approx(duration_s, abs=0.01)  # known before decoding anything
    assert stream.position_s == 0.0
    n_samples = sum(len(block) for block in stream)
    assert stream.position_s == n_samples / SAMPLE_RATE_HZ == pytest.approx(duration_s, abs=0.05)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="block_seconds"):
        open_audio_stream(JFK, block_seconds=0)
    with pytest.raises(ValueError, match="first"):
        open_audio_stream(JFK, channel_mix="left")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------
# Errors: on opening when the file says so, while iterating when only decoding can tell
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["notes.wav", "notes.mp3", "notes.flac"])
def test_text_file_fails_on_open(tmp_path, name):
    path = tmp_path / name
    path.write_text("these are meeting notes, not a recording\n" * 20)
    with pytest.raises(InputError, match="could not be decoded"):
        open_audio_stream(path)


def test_missing_file_and_directory_fail_on_open(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        open_audio_stream(tmp_path / "nope.wav")
    with pytest.raises(InputError, match="is a folder"):
        open_audio_stream(tmp_path)


def test_video_without_sound_fails_on_open(tmp_path):
    path = tmp_path / "silent_film.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for packet in [*stream.encode(av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8))), *stream.encode()]:
            container.mux(packet)
    with pytest.raises(InputError, match="has no audio track"):
        open_audio_stream(path)


@pytest.mark.parametrize("native_rate_hz", [SAMPLE_RATE_HZ, 44_100])
def test_zero_second_audio_fails_when_the_stream_ends(tmp_path, native_rate_hz):
    path = tmp_path / "empty.wav"
    soundfile.write(path, np.zeros(0, dtype=np.float32), native_rate_hz)
    stream = open_audio_stream(path)  # the header is valid: nothing to object to yet
    with pytest.raises(InputError, match="0-second audio"):
        list(stream)


def test_nan_samples_fail_while_streaming(tmp_path):
    path = tmp_path / "nan.wav"
    wav = np.zeros(3 * SAMPLE_RATE_HZ, dtype=np.float32)
    wav[-10] = np.nan
    soundfile.write(path, wav, SAMPLE_RATE_HZ, subtype="FLOAT")
    with pytest.raises(InputError, match="NaN"):
        list(open_audio_stream(path, block_seconds=1.0))


# ---------------------------------------------------------------------------------------------------------
# iter_windows == split_windows
# ---------------------------------------------------------------------------------------------------------


def _random_partition(wav: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Cut `wav` into blocks from empty up to 1.5 windows long."""
    blocks, start = [], 0
    while start < len(wav):
        size = int(rng.choice([0, 1, rng.integers(1, 5_000), rng.integers(1, 3 * WINDOW_SAMPLES // 2)]))
        blocks.append(wav[start : start + size])
        start += size
    return blocks


def _assert_same_windows(streamed: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert [len(w) for w in streamed] == [len(w) for w in expected]
    for got, want in zip(streamed, expected):
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("seconds", [0.5, 29.9, 30.0, 30.1, 60.0, 61.0])
@pytest.mark.parametrize("official", [False, True])
def test_iter_windows_equals_split_windows_for_random_blocks(seconds, official):
    wav = np.arange(_seconds(seconds), dtype=np.float32)  # every sample distinct (exact below 2**24)
    expected = split_windows(wav, official_extra_window=official)
    rng = np.random.default_rng(round(seconds * 10) + official)
    for _ in range(4):
        streamed = list(iter_windows(_random_partition(wav, rng), official_extra_window=official))
        _assert_same_windows(streamed, expected)


@pytest.mark.parametrize("official", [False, True])
def test_iter_windows_with_blocks_cut_at_window_edges_and_larger_than_windows(official):
    wav = np.arange(2 * WINDOW_SAMPLES, dtype=np.float32)  # exactly two windows
    expected = split_windows(wav, official_extra_window=official)
    for sizes in ([WINDOW_SAMPLES, WINDOW_SAMPLES], [2 * WINDOW_SAMPLES], [WINDOW_SAMPLES - 1, 1, WINDOW_SAMPLES]):
        blocks = np.split(wav, np.cumsum(sizes)[:-1])
        _assert_same_windows(list(iter_windows(blocks, official_extra_window=official)), expected)


def test_iter_windows_yields_independent_arrays():
    """An encoder batches windows: a later window must not overwrite an earlier one."""
    wav = np.arange(_seconds(75.0), dtype=np.float32)
    windows = list(iter_windows(np.array_split(wav, 7)))
    assert not any(np.shares_memory(a, b) for i, a in enumerate(windows) for b in windows[i + 1 :])
    np.testing.assert_array_equal(np.concatenate(windows), wav)


def test_iter_windows_on_a_real_stream():
    expected = split_windows(load_audio(PRED_WAV))
    _assert_same_windows(list(iter_windows(open_audio_stream(PRED_WAV, block_seconds=0.3))), expected)


def test_iter_windows_rejects_empty_streams_and_multichannel_blocks():
    with pytest.raises(ValueError, match="empty"):
        list(iter_windows([]))
    with pytest.raises(ValueError, match="empty"):
        list(iter_windows([np.zeros(0, np.float32)], official_extra_window=True))
    with pytest.raises(ValueError, match="mono"):
        list(iter_windows([np.zeros((100, 2), np.float32)]))


def test_iter_window_batches():
    windows = [np.full(3, i, np.float32) for i in range(7)]
    batches = list(iter_window_batches(iter(windows), 3))
    assert [len(b) for b in batches] == [3, 3, 1]
    assert [w[0] for b in batches for w in b] == list(range(7))
    with pytest.raises(ValueError, match="batch_size"):
        list(iter_window_batches(windows, 0))


# ---------------------------------------------------------------------------------------------------------
# Bounded memory
# ---------------------------------------------------------------------------------------------------------

LONG_RATE_HZ = 22_050  # not 16 kHz, so that the resampler is part of what is measured
WINDOW_BYTES = WINDOW_SAMPLES * 4  # one float32 window: 1.92 MB


def _write_long_flac(path: Path, minutes: float) -> int:
    """Tile a real clip into a FLAC of `minutes` at LONG_RATE_HZ, written in pieces; return its frame count."""
    clip = load_audio(PRED_WAV)
    n_frames = round(minutes * 60 * LONG_RATE_HZ)
    with soundfile.SoundFile(path, "w", LONG_RATE_HZ, 1, format="FLAC") as file:
        for start in range(0, n_frames, len(clip)):
            file.write(clip[: n_frames - start])
    return n_frames


def _peak_bytes_while_windowing(path: Path) -> tuple[int, int]:
    """(peak bytes traced by tracemalloc, samples seen) while streaming `path` through iter_windows."""
    tracemalloc.start()
    try:
        n_samples = sum(len(window) for window in iter_windows(open_audio_stream(path)))
        return tracemalloc.get_traced_memory()[1], n_samples
    finally:
        tracemalloc.stop()


def test_streaming_memory_does_not_grow_with_duration(tmp_path):
    """numpy reports its buffers to tracemalloc, so the peak covers every block and window the stream held."""
    peaks = {}
    for minutes in (2, 20):
        path = tmp_path / f"long_{minutes}.flac"
        n_frames = _write_long_flac(path, minutes)
        peaks[minutes], n_samples = _peak_bytes_while_windowing(path)
        assert n_samples == pytest.approx(n_frames * SAMPLE_RATE_HZ / LONG_RATE_HZ, abs=1)
    full_decode_bytes = 20 * 60 * SAMPLE_RATE_HZ * 4  # 76.8 MB of float32 at 16 kHz
    assert peaks[20] < 5 * WINDOW_BYTES  # measured: ~8 MB (two windows, a 10 s block and soxr's input)
    assert peaks[20] < full_decode_bytes / 8
    assert abs(peaks[20] - peaks[2]) < WINDOW_BYTES / 4  # ten times the audio, the same peak

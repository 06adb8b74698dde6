"""`--official-audio`'s resampler against the windowed-sinc formula of torchaudio's default `Resample`.

The reference (`_direct`) is written from the definition, independently of the implementation: rates in Hz
(the gcd enters only to place the output instants as torchaudio does), float64 numpy, one output sample at a
time (vectorized over outputs), every input sample within the filter's support, the signal zero outside the
recording.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lyra_cli.audio.frontend import AudioFrontEnd
from lyra_cli.audio.io import SAMPLE_RATE_HZ, _decode_blocks, load_audio, open_audio_stream
from lyra_cli.audio.resample import ROLLOFF, ZERO_CROSSINGS, SincResampleStream, output_length, resample_sinc, sinc_kernel

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
# (file, native rate): 44.1 kHz stereo flac, 24 kHz mp3, a 44.1 kHz aac track in an mp4, 44.1 kHz mp3, 16 kHz wav
REAL_FILES = ["jfk.flac", "extreme_ironing.mp3", "movement.mp4", "movement.mp3", "pred_round1.wav"]
TOLERANCE = 1e-6  # the bound between ours and the formula
QUIRK_BOUND = 1e-5  # ours (= torchaudio's instants) vs the formula at exact instants: measured up to ~2e-6 on speech
OUTPUTS_PER_CALL = 20_000  # rows of the reference's (outputs, taps) matrix at a time: a few MB


def _direct(x: np.ndarray, from_hz: int, to_hz: int, *, torchaudio_instants: bool = True) -> np.ndarray:
    """y[m] = sum_k x[k] (base/from) sinc(base (k/from - t_m)) cos^2(pi base (k/from - t_m) / 12), float64.

    t_m is output m's instant in seconds: m/to exactly, or with `torchaudio_instants` as torchaudio's default
    `Resample` places it: the rates share g = gcd(from, to), each 1/g s holds to/g outputs, and the offset of
    output j within its block, j/(to/g) of a block, is rounded to float32 (its default dtype) before use.
    """
    x = x.astype(np.float64)
    base_hz = min(from_hz, to_hz) * ROLLOFF
    reach = math.ceil(ZERO_CROSSINGS * from_hz / base_hz) + 1  # input samples on each side within the support
    n_out = math.ceil(to_hz * len(x) / from_hz)
    padded = np.concatenate([np.zeros(reach), x, np.zeros(reach + 1)])  # zero outside the recording
    gcd = math.gcd(from_hz, to_hz)
    per_block = to_hz // gcd
    out = np.empty(n_out)
    for first in range(0, n_out, OUTPUTS_PER_CALL):
        m = np.arange(first, min(first + OUTPUTS_PER_CALL, n_out))
        if torchaudio_instants:
            offset = (np.float32(1) * (m % per_block) / np.float32(per_block)).astype(np.float32)
            t_m = (m // per_block + offset.astype(np.float64)) / gcd
        else:
            t_m = m / to_hz
        centre = (m * from_hz) // to_hz  # the input sample at or before output m's instant
        k = centre[:, None] + np.arange(-reach, reach + 1)[None, :]  # (outputs, taps) input indices
        u = base_hz * (k / from_hz - t_m[:, None])  # distance in zero crossings of the low-pass sinc
        h = (base_hz / from_hz) * np.sinc(u) * np.cos(np.pi * u / (2 * ZERO_CROSSINGS)) ** 2
        h[np.abs(u) > ZERO_CROSSINGS] = 0.0
        out[m] = (padded[k + reach] * h).sum(axis=1)
    return out


def test_the_reference_rounds_instants_like_torchaudio():
    """The float32 offset matters only where j/(to/g) is not exact in float32: 44.1k (160 phases), not 48k (1)."""
    x = np.random.default_rng(1).uniform(-1, 1, 2000)
    assert np.array_equal(_direct(x, 48_000, 16_000), _direct(x, 48_000, 16_000, torchaudio_instants=False))
    assert not np.array_equal(_direct(x, 44_100, 16_000), _direct(x, 44_100, 16_000, torchaudio_instants=False))


def _native_first_channel(path: Path) -> tuple[np.ndarray, int]:
    rate_hz, blocks = _decode_blocks(path)
    return np.ascontiguousarray(np.concatenate(list(blocks))[:, 0]), rate_hz


# ---------------------------------------------------------------------------------------------------------
# The real recordings: within 1e-6 of the formula, whole-file and streamed
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", REAL_FILES)
def test_official_audio_matches_the_formula_on_real_recordings(real, name):
    path = real / name
    channel0, rate_hz = _native_first_channel(path)
    official = load_audio(path, channel_mix="first", resampler="sinc")  # what --official-audio feeds the model
    assert official.dtype == np.float32
    if rate_hz == SAMPLE_RATE_HZ:  # Resample returns equal rates untouched
        np.testing.assert_array_equal(official, channel0)
        return
    reference = _direct(channel0, rate_hz, SAMPLE_RATE_HZ)
    assert official.shape == reference.shape == (math.ceil(SAMPLE_RATE_HZ * len(channel0) / rate_hz),)
    assert np.abs(official - reference).max() <= TOLERANCE
    assert np.abs(reference).max() > 0.1  # a real signal, not a trivially matching silence
    # torchaudio's float32 output instants move its result off the exact-instant formula by a few 1e-6 at most
    exact_instants = _direct(channel0, rate_hz, SAMPLE_RATE_HZ, torchaudio_instants=False)
    assert np.abs(official - exact_instants).max() <= QUIRK_BOUND


@pytest.mark.parametrize("block_seconds", [0.05, 0.37, 10.0])
def test_streamed_sinc_equals_whole_file(real, block_seconds):
    path = real / "jfk.flac"
    channel0, rate_hz = _native_first_channel(path)
    whole = resample_sinc(channel0, rate_hz, SAMPLE_RATE_HZ)
    stream = open_audio_stream(path, channel_mix="first", resampler="sinc", block_seconds=block_seconds)
    streamed = np.concatenate(list(stream))
    assert streamed.shape == whole.shape
    assert np.abs(streamed - whole).max() <= TOLERANCE


def test_front_end_selects_channel_zero_and_the_sinc(real):
    path = real / "jfk.flac"  # stereo, and its channels really differ
    official, ours = AudioFrontEnd.official().load(path), AudioFrontEnd().load(path)
    channel0, rate_hz = _native_first_channel(path)
    np.testing.assert_allclose(official, resample_sinc(channel0, rate_hz, SAMPLE_RATE_HZ), atol=TOLERANCE, rtol=0)
    assert official.shape == ours.shape  # the same length rule: ceil(16000 * n / 44100)
    assert np.abs(official - ours).max() > 0.01


# ---------------------------------------------------------------------------------------------------------
# Synthetic signals
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("from_hz", "to_hz"), [(44_100, 16_000), (48_000, 16_000), (22_050, 16_000), (8_000, 16_000)])
def test_random_signals_match_the_formula(from_hz, to_hz):
    x = np.random.default_rng(from_hz).uniform(-1, 1, 3 * from_hz // 10 + 7).astype(np.float32)  # odd length
    np.testing.assert_allclose(resample_sinc(x, from_hz, to_hz), _direct(x, from_hz, to_hz), atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("from_hz", [44_100, 48_000, 24_000, 8_000])
def test_dc_keeps_its_level_away_from_the_edges(from_hz):
    y = resample_sinc(np.full(from_hz, 0.5, dtype=np.float32), from_hz, SAMPLE_RATE_HZ)
    interior = y[200:-200]  # the zero padding beyond either end pulls only the first and last few samples
    assert np.abs(interior - 0.5).max() < 2e-3  # the Hann-windowed sinc's DC gain is 1 within its ripple


def test_a_tone_below_the_cutoff_is_preserved():
    from_hz, tone_hz = 44_100, 1_000.0
    x = np.sin(2 * np.pi * tone_hz * np.arange(from_hz) / from_hz).astype(np.float32)
    y = resample_sinc(x, from_hz, SAMPLE_RATE_HZ)
    expected = np.sin(2 * np.pi * tone_hz * np.arange(len(y)) / SAMPLE_RATE_HZ)  # same phase: no delay
    assert np.abs(y - expected)[100:-100].max() < 2e-3


def test_a_tone_above_the_new_nyquist_is_removed():
    from_hz = 44_100
    x = np.sin(2 * np.pi * 12_000.0 * np.arange(from_hz) / from_hz).astype(np.float32)  # would alias to 4 kHz
    y = resample_sinc(x, from_hz, SAMPLE_RATE_HZ)
    assert np.sqrt(np.mean(y[100:-100] ** 2)) < 0.01


def test_equal_rates_are_the_identity():
    x = np.random.default_rng(0).standard_normal(1001).astype(np.float32)
    np.testing.assert_array_equal(resample_sinc(x, 16_000, 16_000), x)


@pytest.mark.parametrize("n_samples", [0, 1, 2, 440, 441, 442, 44_100, 44_101])
def test_output_length_is_the_ceiling_rule(n_samples):
    expected = math.ceil(16_000 * n_samples / 44_100)
    assert output_length(n_samples, 44_100, 16_000) == expected
    assert resample_sinc(np.ones(n_samples, dtype=np.float32), 44_100, 16_000).shape == (expected,)


def test_kernel_layout_for_44k1():
    kernel = sinc_kernel(44_100, 16_000)
    # gcd 100: 441 inputs -> 160 outputs; width ceil(6 * 441 / (160 * 0.99)) = 17
    assert (kernel.orig, kernel.new, kernel.width) == (441, 160, 17)
    assert kernel.taps == 2 * 17 + 441 and kernel.frames == 2  # 475 taps span two frames of 441 inputs
    assert kernel.weights.shape == (160, 441, 2)  # (phases, samples per frame, frames)
    by_tap = kernel.weights.permute(0, 2, 1).reshape(160, -1)  # tap q*441 + r
    assert not by_tap[:, kernel.taps :].any() and by_tap[:, : kernel.taps].abs().max() > 0.3
    assert bool((kernel.weights == kernel.weights.float().double()).all())  # torchaudio's float32 coefficients
    assert torch.allclose(by_tap.sum(dim=1), torch.ones(160, dtype=torch.float64), atol=2e-3)  # unit DC gain


@pytest.mark.parametrize("sizes", [[1] * 500, [7, 3000, 1, 441, 440, 5], [4410] * 3])
def test_stream_of_any_block_sizes_equals_whole(sizes):
    x = np.random.default_rng(len(sizes)).uniform(-1, 1, sum(sizes)).astype(np.float32)
    stream = SincResampleStream(44_100, 16_000)
    pieces = [stream.push(block) for block in np.split(x, np.cumsum(sizes)[:-1])] + [stream.finish()]
    np.testing.assert_allclose(np.concatenate(pieces), resample_sinc(x, 44_100, 16_000), atol=TOLERANCE, rtol=0)
    with pytest.raises(RuntimeError, match="after finish"):
        stream.push(x[:1])


def test_empty_stream_gives_nothing():
    assert SincResampleStream(48_000, 16_000).finish().shape == (0,)


def test_stereo_wav_official_takes_channel_zero(tmp_path):
    soundfile = pytest.importorskip("soundfile")
    rng = np.random.default_rng(3)
    stereo = np.stack([rng.uniform(-0.5, 0.5, 4800), np.zeros(4800)], axis=1).astype(np.float32)
    path = tmp_path / "stereo_48k.wav"
    soundfile.write(path, stereo, 48_000, subtype="FLOAT")
    official = AudioFrontEnd.official().load(path)
    np.testing.assert_allclose(official, _direct(stereo[:, 0], 48_000, SAMPLE_RATE_HZ), atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(AudioFrontEnd("mean", "sinc").load(path), official / 2, atol=TOLERANCE, rtol=0)


def test_bad_rates_and_resamplers_are_rejected(real):
    with pytest.raises(ValueError, match="positive integers"):
        sinc_kernel(44_100.0, 16_000)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sinc"):
        open_audio_stream(real / "jfk.flac", resampler="linear")  # type: ignore[arg-type]


def test_front_end_key_settings_and_description():
    assert AudioFrontEnd().key_settings() == {"channel_mix": "mean", "resampler": "soxr"}
    assert AudioFrontEnd.official().key_settings() == {"channel_mix": "first", "resampler": "sinc"}
    assert AudioFrontEnd.choose(True).is_official and not AudioFrontEnd.choose(False).is_official
    assert AudioFrontEnd.official().describe() == "channel 0, sinc resampling (official)"

"""Contracts of `lyra_cli.audio.io`: what each real format decodes to, and a clear error for each bad file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile

from lyra_cli.audio.io import SAMPLE_RATE_HZ, SILENCE_PEAK, audio_duration_s, load_audio, require_speech
from lyra_cli.errors import InputError

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
JFK = REAL / "jfk.flac"  # 11.0 s, 44.1 kHz, stereo, 24-bit
IRONING_MP3 = REAL / "extreme_ironing.mp3"  # 24 kHz mono
HI_MP3 = REAL / "Hi.mp3"  # 24 kHz mono, 3.6 s
MOVEMENT_MP4 = REAL / "movement.mp4"  # h264 video + aac sound track


def _tone(freq_hz: float, n_samples: int, sample_rate_hz: int, amplitude: float = 0.5) -> np.ndarray:
    t_s = np.arange(n_samples) / sample_rate_hz
    return (amplitude * np.sin(2 * np.pi * freq_hz * t_s)).astype(np.float32)


def _best_correlation(reference: np.ndarray, decoded: np.ndarray, max_lag: int = 2048) -> tuple[float, int]:
    """Highest normalised correlation of `decoded` with `reference` over lags in [-max_lag, max_lag]."""
    n = min(len(reference), len(decoded)) - 2 * max_lag
    ref = reference[max_lag : max_lag + n]
    scores = []
    for lag in range(-max_lag, max_lag + 1):
        seg = decoded[max_lag + lag : max_lag + lag + n]
        scores.append(float(ref @ seg) / (np.linalg.norm(ref) * np.linalg.norm(seg) + 1e-12))
    return max(scores), int(np.argmax(scores)) - max_lag


def _encode_with_pyav(path: Path, codec: str, channels: np.ndarray, sample_rate_hz: int) -> None:
    """Write `channels` (n_channels, n_samples) float32 at 16 kHz to `path` with an FFmpeg encoder."""
    layout = "mono" if len(channels) == 1 else "stereo"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=sample_rate_hz, layout=layout)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(channels), format="fltp", layout=layout)
        frame.sample_rate = SAMPLE_RATE_HZ
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)


# ---------------------------------------------------------------------------------------------------------
# Real recordings
# ---------------------------------------------------------------------------------------------------------


def test_jfk_decodes_to_16k_mono_float32_of_11_seconds():
    wav = load_audio(JFK)
    native, native_rate_hz = soundfile.read(JFK, dtype="float32")  # (n, 2) at 44.1 kHz
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert audio_duration_s(wav) == pytest.approx(11.0, abs=0.05)
    assert len(wav) == pytest.approx(len(native) * SAMPLE_RATE_HZ / native_rate_hz, abs=1)
    # jfk has almost no energy above 8 kHz, so resampling keeps the level of the channel mean.
    expected_rms = float(np.sqrt(np.mean(native.mean(axis=1) ** 2)))
    assert float(np.sqrt(np.mean(wav**2))) == pytest.approx(expected_rms, rel=0.01)
    assert expected_rms == pytest.approx(0.142, abs=0.002)


def test_jfk_first_channel_differs_from_mean():
    first, mean = load_audio(JFK, channel_mix="first"), load_audio(JFK, channel_mix="mean")
    assert first.shape == mean.shape
    assert np.abs(first - mean).max() > 0.01  # jfk's two channels really differ


def test_resampling_keeps_a_tone_in_place(tmp_path):
    path = tmp_path / "tone_44k.wav"
    soundfile.write(path, _tone(1000, 44_100, 44_100), 44_100, subtype="FLOAT")
    wav = load_audio(path)
    expected = _tone(1000, SAMPLE_RATE_HZ, SAMPLE_RATE_HZ)
    assert len(wav) == SAMPLE_RATE_HZ
    interior = slice(200, -200)  # the resampling filter rings at the two ends
    assert np.abs(wav[interior] - expected[interior]).max() < 1e-3


def test_resampling_removes_what_16k_cannot_hold(tmp_path):
    """An 8.5 kHz tone is above the new Nyquist (8 kHz): it must vanish, not alias down to 7.5 kHz."""
    path = tmp_path / "tone_8500.wav"
    soundfile.write(path, _tone(8_500, 44_100, 44_100), 44_100, subtype="FLOAT")
    wav = load_audio(path)
    assert np.sqrt(np.mean(wav[500:-500] ** 2)) < 1e-7  # soxr HQ: ~4e-8; MQ and below: > 5e-7


def test_other_target_rate(tmp_path):
    wav = load_audio(JFK, sample_rate_hz=8_000)
    assert audio_duration_s(wav, 8_000) == pytest.approx(11.0, abs=0.05)


def test_channel_mix_first_and_mean_on_a_stereo_wav(tmp_path):
    left, right = _tone(440, 8_000, SAMPLE_RATE_HZ, 0.5), _tone(880, 8_000, SAMPLE_RATE_HZ, 0.25)
    path = tmp_path / "stereo.wav"
    soundfile.write(path, np.stack([left, right], axis=1), SAMPLE_RATE_HZ, subtype="FLOAT")
    first = load_audio(path, channel_mix="first")
    mean = load_audio(path, channel_mix="mean")
    np.testing.assert_array_equal(first, left)  # already 16 kHz: no resampling, bit-exact
    np.testing.assert_allclose(mean, (left + right) / 2, atol=1e-7)
    assert np.abs(first - mean).max() > 0.1


def test_unknown_channel_mix_is_rejected():
    with pytest.raises(ValueError, match="first"):
        load_audio(JFK, channel_mix="left")  # type: ignore[arg-type]


def test_mp3_at_24k_is_resampled_to_the_right_length():
    native, native_rate_hz = soundfile.read(IRONING_MP3, dtype="float32")  # an independent mp3 decoder
    assert native_rate_hz == 24_000
    wav = load_audio(IRONING_MP3)
    assert len(wav) == pytest.approx(len(native) * SAMPLE_RATE_HZ / native_rate_hz, abs=1)
    assert audio_duration_s(wav) == pytest.approx(2.09, abs=0.05)
    assert _best_correlation(native[::3], wav[::2], max_lag=64)[0] > 0.95  # both at 8 kHz, same content


def test_mp3_is_decoded_to_its_real_end(tmp_path):
    """A loud-then-quiet VBR stream without a Xing header: libsndfile would stop at its length estimate."""
    tone = _tone(440, 5 * SAMPLE_RATE_HZ, SAMPLE_RATE_HZ)[None]
    parts = []
    for bit_rate in (160_000, 32_000):
        part = tmp_path / f"part_{bit_rate}.mp3"
        with av.open(str(part), "w", format="mp3", options={"write_xing": "0"}) as container:
            stream = container.add_stream("libmp3lame", rate=SAMPLE_RATE_HZ, layout="mono")
            stream.bit_rate = bit_rate
            frame = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
            frame.sample_rate = SAMPLE_RATE_HZ
            for packet in [*stream.encode(frame), *stream.encode(None)]:
                container.mux(packet)
        parts.append(part.read_bytes())
    joined = tmp_path / "joined.mp3"
    joined.write_bytes(b"".join(parts))
    assert audio_duration_s(load_audio(joined)) == pytest.approx(10.0, abs=0.15)


def test_sound_track_of_a_video():
    with av.open(str(MOVEMENT_MP4)) as container:
        video = container.streams.video[0]
        video_s = float(video.duration * video.time_base)
    wav = load_audio(MOVEMENT_MP4)
    assert video_s == pytest.approx(4.29, abs=0.01)
    assert audio_duration_s(wav) == pytest.approx(video_s, abs=0.05)
    assert np.sqrt(np.mean(wav**2)) > 0.01  # real sound, not padding


@pytest.mark.parametrize(("suffix", "codec", "codec_rate_hz"), [("m4a", "aac", 16_000), ("webm", "libopus", 48_000)])
def test_formats_libsndfile_lacks_decode_through_pyav(tmp_path, suffix, codec, codec_rate_hz):
    speech = load_audio(HI_MP3)
    path = tmp_path / f"hi.{suffix}"
    _encode_with_pyav(path, codec, np.stack([speech, 0.5 * speech]), codec_rate_hz)
    with pytest.raises(RuntimeError):
        soundfile.info(path)  # so this really is the FFmpeg path

    first, mean = load_audio(path, channel_mix="first"), load_audio(path, channel_mix="mean")
    assert audio_duration_s(first) == pytest.approx(audio_duration_s(speech), abs=0.1)
    correlation, _lag = _best_correlation(speech, first)  # aac files written this way keep 1024 priming samples
    assert correlation > 0.99
    assert np.sqrt(np.mean(mean**2)) / np.sqrt(np.mean(first**2)) == pytest.approx(0.75, rel=0.05)


def test_truncated_wav_keeps_what_is_there(tmp_path):
    data = (REAL / "pred_round0.wav").read_bytes()
    path = tmp_path / "half.wav"
    path.write_bytes(data[: len(data) // 2])
    wav = load_audio(path)
    assert audio_duration_s(wav) == pytest.approx(8.0, abs=0.01)  # 16 s file, cut in half


# ---------------------------------------------------------------------------------------------------------
# Bad files: each an InputError naming the file
# ---------------------------------------------------------------------------------------------------------


def _raises_input_error(path: Path, match: str) -> InputError:
    with pytest.raises(InputError, match=match) as info:
        load_audio(path)
    assert f"`{path}`" in info.value.message
    assert info.value.hint
    return info.value


def test_missing_file(tmp_path):
    _raises_input_error(tmp_path / "nope.wav", "does not exist")


def test_directory(tmp_path):
    _raises_input_error(tmp_path, "is a folder")


@pytest.mark.parametrize("name", ["notes.wav", "notes.mp3", "notes.flac"])
def test_text_file_with_an_audio_name(tmp_path, name):
    path = tmp_path / name
    path.write_text("these are meeting notes, not a recording\n" * 20)
    _raises_input_error(path, "could not be decoded")


@pytest.mark.parametrize("source", [IRONING_MP3, HI_MP3])
@pytest.mark.parametrize("seed", range(4))
def test_mp3_header_followed_by_garbage(tmp_path, source, seed):
    path = tmp_path / "corrupt.mp3"
    path.write_bytes(source.read_bytes()[:200] + np.random.default_rng(seed).bytes(5_000))
    _raises_input_error(path, "could not be decoded")


def test_video_without_a_sound_track(tmp_path):
    path = tmp_path / "silent_film.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        image = np.zeros((32, 32, 3), dtype=np.uint8)
        for _ in range(3):
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    _raises_input_error(path, "has no audio track")


def test_zero_second_wav(tmp_path):
    path = tmp_path / "empty.wav"
    soundfile.write(path, np.zeros(0, dtype=np.float32), SAMPLE_RATE_HZ)
    _raises_input_error(path, "0-second audio")


def test_wav_with_nan_samples(tmp_path):
    path = tmp_path / "nan.wav"
    wav = _tone(440, 1_600, SAMPLE_RATE_HZ)
    wav[100] = np.nan
    soundfile.write(path, wav, SAMPLE_RATE_HZ, subtype="FLOAT")
    _raises_input_error(path, "NaN")


# ---------------------------------------------------------------------------------------------------------
# require_speech
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("peak", [0.0, SILENCE_PEAK / 10])
def test_silent_wav_is_rejected(tmp_path, peak):
    path = tmp_path / "silence.wav"
    soundfile.write(path, np.full(SAMPLE_RATE_HZ, peak, dtype=np.float32), SAMPLE_RATE_HZ, subtype="FLOAT")
    wav = load_audio(path)  # decoding silence is fine; using it as speech is not
    with pytest.raises(InputError, match="silent") as info:
        require_speech(wav, path)
    assert f"`{path}`" in info.value.message
    assert "recording" in info.value.hint


def test_empty_audio_is_not_speech():
    with pytest.raises(InputError, match="0-second"):
        require_speech(np.zeros(0, dtype=np.float32), "x.wav")


def test_quiet_speech_is_speech():
    require_speech(load_audio(HI_MP3) * 0.01, HI_MP3)  # -40 dB is quiet, not silent


def test_importing_audio_io_and_windows_does_not_import_torch():
    code = "import sys, lyra_cli.audio.io, lyra_cli.audio.windows; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)

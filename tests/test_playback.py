"""Sinks for spoken answers: atomic wav files, the playback queue and its barge-in `stop`, device selection and
its errors, and `SpeakerSink` on a virtual ALSA device whose output lands in a file.

The virtual device is ALSA's `file` plugin, configured in `.asoundrc` of a temporary HOME (PortAudio reads the
ALSA configuration once, when sounddevice is imported, so device tests run in a subprocess). It writes what
it is given as raw S16_LE 16 kHz mono, without pacing: the whole answer arrives at once, bit-exact.
Needs the Debian package `libportaudio2` (which brings `libasound2`); those tests skip without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile
from helpers.sinks import MemorySink, NullSink
from helpers.virtual_audio import needs_portaudio, portaudio_missing

from lyra_cli.audio import playback
from lyra_cli.audio.io import SAMPLE_RATE_HZ, load_audio
from lyra_cli.audio.playback import (
    DeviceInfo,
    PlaybackBuffer,
    WavWriter,
    float_to_pcm16,
    pick_device,
)
from lyra_cli.errors import LyraError, MissingDependencyError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def answer(real: Path) -> np.ndarray:
    """5.0 s of speech that the released Lyra model produced: the output our sinks carry."""
    return load_audio(real / "pred_round1.wav")


# ---------------------------------------------------------------------------------------------------------
# WavWriter: complete or absent
# ---------------------------------------------------------------------------------------------------------


def test_wav_writer_writes_16k_mono_int16_of_the_right_length(tmp_path: Path) -> None:
    first = np.linspace(-1.2, 1.2, 1001, dtype=np.float32)  # beyond full scale on both ends: clipped
    second = np.array([0.5, -0.25, 1 / 32768], dtype=np.float32)
    path = tmp_path / "answer.wav"
    with WavWriter(path) as writer:
        writer.write(first)
        writer.write(second)
        assert not path.exists()  # nothing until close
        assert writer.played_s == pytest.approx(1004 / SAMPLE_RATE_HZ)
    info = soundfile.info(path)
    assert (info.samplerate, info.channels, info.subtype, info.format) == (SAMPLE_RATE_HZ, 1, "PCM_16", "WAV")
    assert info.frames == 1004
    pcm, _ = soundfile.read(path, dtype="int16")
    np.testing.assert_array_equal(pcm, float_to_pcm16(np.concatenate([first, second])))
    assert pcm.min() == -32768 and pcm.max() == 32767
    assert pcm[-3:].tolist() == [16384, -8192, 1]  # on the int16 grid: exact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answer.wav"]  # no temporary file left


def test_wav_writer_abort_leaves_nothing_and_keeps_an_older_file(tmp_path: Path) -> None:
    writer = WavWriter(tmp_path / "new.wav")
    writer.write(np.ones(1600, np.float32))
    writer.abort()
    writer.close()  # after abort: nothing to write
    assert list(tmp_path.iterdir()) == []

    old = tmp_path / "old.wav"
    old.write_bytes(b"previous answer")
    with pytest.raises(KeyboardInterrupt), WavWriter(old) as writer:  # Ctrl-C mid-answer
        writer.write(np.ones(1600, np.float32))
        raise KeyboardInterrupt
    assert old.read_bytes() == b"previous answer"
    assert [p.name for p in tmp_path.iterdir()] == ["old.wav"]


@pytest.mark.parametrize("crash", [OSError("disk full"), KeyboardInterrupt()])
def test_wav_writer_crash_mid_write_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash: BaseException
) -> None:
    def write_half_then_fail(file, pcm):  # type: ignore[no-untyped-def]
        Path(file).write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt ")  # a torn header is on disk when it fails
        raise crash

    monkeypatch.setattr(playback, "_write_tagged_wav", write_half_then_fail)
    writer = WavWriter(tmp_path / "answer.wav")
    writer.write(np.zeros(16000, np.float32))
    with pytest.raises(type(crash)):
        writer.close()
    assert list(tmp_path.iterdir()) == []


def test_wav_writer_refuses_a_missing_folder_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(LyraError, match="does not exist"):
        WavWriter(tmp_path / "no" / "such" / "answer.wav")


# ---------------------------------------------------------------------------------------------------------
# The playback queue: underflow is silence, stop drops what is queued
# ---------------------------------------------------------------------------------------------------------


def test_playback_buffer_hands_out_what_was_written_then_silence() -> None:
    buffer = PlaybackBuffer()
    chunks = [np.arange(n, dtype=np.float32) + 1 for n in (5, 1, 11)]
    for chunk in chunks:
        buffer.write(chunk)
    out = [np.full(7, np.nan, np.float32) for _ in range(3)]
    copied = [buffer.fill(block) for block in out]
    assert copied == [7, 7, 3]  # blocks cross chunk boundaries
    np.testing.assert_array_equal(np.concatenate(out)[:17], np.concatenate(chunks))
    assert not np.concatenate(out)[17:].any()  # underflow: zeros, not stale data or NaN
    assert not buffer.playing and buffer.played_s == 17 / SAMPLE_RATE_HZ


def test_memory_sink_stop_drops_queued_audio(answer: np.ndarray) -> None:
    sink = MemorySink()
    sink.write(answer)
    first = sink.pull(4000)  # the device played 0.25 s
    assert sink.playing
    sink.stop()  # barge-in
    assert not sink.playing and sink.played_s == pytest.approx(0.25)
    assert not sink.pull(8000).any()  # silence from now on
    np.testing.assert_array_equal(sink.audio, answer[:4000])
    np.testing.assert_array_equal(first, answer[:4000])

    sink.write(answer[:800])  # the next answer plays normally
    np.testing.assert_array_equal(sink.pull(800), answer[:800])


def test_memory_sink_close_plays_out_or_drops(answer: np.ndarray) -> None:
    waited = MemorySink()
    waited.write(answer)
    waited.close(wait=True)
    np.testing.assert_array_equal(waited.audio, answer)

    dropped = MemorySink()
    dropped.write(answer)
    dropped.close(wait=False)
    assert dropped.audio.size == 0 and not dropped.playing


def test_null_sink_is_never_playing() -> None:
    sink = NullSink()
    sink.write(np.ones(100, np.float32))
    sink.stop()
    sink.close()
    assert not sink.playing and sink.played_s == 0.0


# ---------------------------------------------------------------------------------------------------------
# Device selection and its errors
# ---------------------------------------------------------------------------------------------------------

_DEVICES = [
    DeviceInfo(0, "HDA Intel PCH: ALC3246 Analog (hw:0,0)", 2, 2, 48000.0, False, False, "ALSA"),
    DeviceInfo(1, "USB Headset: Audio (hw:1,0)", 1, 2, 44100.0, False, False, "ALSA"),
    DeviceInfo(2, "USB Headset: Audio Monitor", 2, 0, 44100.0, False, False, "ALSA"),
    DeviceInfo(3, "default", 32, 32, 44100.0, True, True, "ALSA"),
]


@pytest.mark.parametrize(
    ("spec", "kind", "expected"),
    [
        (None, "output", None),  # the system default: left to PortAudio
        ("1", "output", 1),
        ("alc3246", "input", 0),  # part of the name, any case
        ("usb headset: audio (hw:1,0)", "input", 1),  # an exact name beats its other matches
        ("monitor", "input", 2),
        ("DEFAULT", "output", 3),
    ],
)
def test_pick_device_by_index_or_name(
    monkeypatch: pytest.MonkeyPatch, spec: str | None, kind: str, expected: int | None
) -> None:
    monkeypatch.setattr(playback, "list_devices", lambda: _DEVICES)
    assert pick_device(spec, kind) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("spec", "kind", "message"),
    [
        ("7", "output", "there is no audio output device `7`"),
        ("2", "output", "there is no audio output device `2`"),  # exists, but records only
        ("speakers", "output", "no audio output device matches `speakers`"),
        ("usb", "output", None),  # one match among output devices: no error (checked below)
        ("usb", "input", "`usb` matches several audio input devices: `USB Headset: Audio (hw:1,0)` (1), `USB"),
    ],
)
def test_pick_device_errors_list_the_choices(
    monkeypatch: pytest.MonkeyPatch, spec: str, kind: str, message: str | None
) -> None:
    monkeypatch.setattr(playback, "list_devices", lambda: _DEVICES)
    if message is None:
        assert pick_device(spec, kind) == 1  # type: ignore[arg-type]
        return
    with pytest.raises(LyraError) as err:
        pick_device(spec, kind)  # type: ignore[arg-type]
    assert err.value.message.startswith(message)
    assert err.value.hint is not None


def test_pick_device_without_a_default_takes_the_first_capable(monkeypatch: pytest.MonkeyPatch) -> None:
    no_default = [DeviceInfo(4, "a", 0, 2, 48000.0, False, False), DeviceInfo(5, "b", 1, 2, 48000.0, False, False)]
    monkeypatch.setattr(playback, "list_devices", lambda: no_default)
    assert (pick_device(None, "output"), pick_device(None, "input")) == (4, 5)


@needs_portaudio
def test_no_audio_device_names_the_flags_that_help(monkeypatch: pytest.MonkeyPatch) -> None:
    import sounddevice

    if len(sounddevice.query_devices()) > 0:  # a machine with a sound card: pretend it has none
        monkeypatch.setattr(sounddevice, "query_devices", lambda *args, **kwargs: [])
    assert playback.list_devices() == []
    with pytest.raises(LyraError) as out:
        pick_device(None, "output")
    assert out.value.message == "no audio output device found"
    assert "`--speech-out FILE.wav`" in str(out.value.hint) and "`lyra listen --list-devices`" in str(out.value.hint)
    with pytest.raises(LyraError) as inp:
        pick_device("USB", "input")
    assert inp.value.message == "no audio input device found"
    assert "`--input-file FILE`" in str(inp.value.hint) and "`lyra listen --list-devices`" in str(inp.value.hint)
    with pytest.raises(LyraError, match="no audio output device found"):
        playback.SpeakerSink()


def test_missing_sounddevice_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sounddevice", None)  # makes `import sounddevice` fail
    with pytest.raises(MissingDependencyError) as err:
        playback.list_devices()
    assert "`sounddevice`" in err.value.message and "lyra-cli[mic]" in str(err.value.hint)


class _NoPortAudio:
    """A meta-path finder that fails `import sounddevice` as the package does without the C library."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name == "sounddevice":
            raise OSError("PortAudio library not found")


def test_missing_portaudio_library_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "sounddevice", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_NoPortAudio(), *sys.meta_path])
    with pytest.raises(LyraError) as err:
        playback.list_devices()
    assert "PortAudio" in err.value.message and "libportaudio2" in str(err.value.hint)
    assert "--input-file" in str(err.value.hint)


# ---------------------------------------------------------------------------------------------------------
# SpeakerSink's callback, driven by hand through a stand-in stream
# ---------------------------------------------------------------------------------------------------------


class _FakeOutputStream:
    """Stands in for sounddevice.OutputStream: the test plays the device by calling `pull`."""

    def __init__(self, *, callback, samplerate, **kwargs) -> None:  # type: ignore[no-untyped-def]
        self.callback = callback
        self.samplerate = samplerate
        self.latency = 0.0
        self.calls: list[str] = []
        self.closed = False

    def start(self) -> None:
        self.calls.append("start")

    def stop(self) -> None:
        self.calls.append("stop")

    def abort(self) -> None:
        self.calls.append("abort")

    def close(self) -> None:
        if self.calls[-1] == "start":  # PortAudio aborts a stream closed while active
            self.calls.append("abort")
        self.closed = True

    def pull(self, n_frames: int) -> np.ndarray:
        outdata = np.full((n_frames, 1), np.nan, np.float32)  # (frames, channels), as PortAudio hands it
        self.callback(outdata, n_frames, None, None)
        return outdata[:, 0]


SpeakerFactory = Callable[..., playback.SpeakerSink]


@pytest.fixture
def fake_speaker(monkeypatch: pytest.MonkeyPatch) -> SpeakerFactory:
    """A `SpeakerSink` on a stand-in stream; call it with the device's rate."""
    if portaudio_missing():
        pytest.skip(str(portaudio_missing()))
    import sounddevice

    monkeypatch.setattr(sounddevice, "OutputStream", _FakeOutputStream)
    monkeypatch.setattr(playback, "pick_device", lambda spec, kind: None)

    def make(rate_hz: int = SAMPLE_RATE_HZ) -> playback.SpeakerSink:
        monkeypatch.setattr(playback, "_stream_rate_hz", lambda sd, device, kind: rate_hz)
        return playback.SpeakerSink()

    return make


def test_speaker_stop_silences_at_once_and_plays_the_next_answer(
    fake_speaker: SpeakerFactory, answer: np.ndarray
) -> None:
    sink = fake_speaker()
    stream = sink.stream
    sink.write(answer)
    np.testing.assert_array_equal(stream.pull(4000), answer[:4000])
    sink.stop()
    assert not sink.playing and sink.played_s == pytest.approx(0.25)
    assert not stream.pull(4000).any()
    sink.write(answer[:1000])
    np.testing.assert_array_equal(stream.pull(1000), answer[:1000])
    sink.close(wait=False)
    # stopped, never aborted: aborting cancels PortAudio's callback thread, which can die holding the GIL
    assert stream.calls == ["start", "stop"] and stream.closed


def test_speaker_callback_never_raises(fake_speaker: SpeakerFactory, caplog: pytest.LogCaptureFixture) -> None:
    sink = fake_speaker()
    sink.write(np.ones(100, np.float32))
    broken = np.full(64, np.nan, np.float32)  # 1-D: `outdata[:, 0]` fails inside the callback
    sink.stream.callback(broken, 64, None, None)
    assert not broken.any()  # the device got silence, and no exception reached PortAudio
    assert (sink.stream.pull(100) == 1).all()  # and the next callback plays on
    sink.close()
    sink.close()  # idempotent
    assert sink.stream.calls == ["start", "stop"]
    assert "the audio callback failed" in caplog.text


def test_speaker_resamples_for_a_device_without_16k(fake_speaker: SpeakerFactory, answer: np.ndarray) -> None:
    import soxr

    sink = fake_speaker(48_000)
    sink.write(answer[:8000])
    sink.write(answer[8000:])
    played = sink.stream.pull(3 * answer.shape[0])
    n = round(sink.played_s * 48_000)
    expected = soxr.resample(answer, SAMPLE_RATE_HZ, 48_000, quality=playback.RESAMPLE_QUALITY)
    assert n > 0.99 * expected.shape[0]  # all but the resampler's last few ms (flushed at the next answer)
    np.testing.assert_array_equal(played[:n], expected[:n])
    sink.close(wait=False)


def test_speaker_open_failure_is_a_lyra_error(monkeypatch: pytest.MonkeyPatch, fake_speaker: SpeakerFactory) -> None:
    import sounddevice

    def refuse(**kwargs):  # type: ignore[no-untyped-def]
        raise sounddevice.PortAudioError("Device unavailable")

    monkeypatch.setattr(sounddevice, "OutputStream", refuse)
    with pytest.raises(LyraError) as err:
        fake_speaker()
    assert err.value.message == "could not open the default audio output device (Device unavailable)"
    assert "--speech-out FILE.wav" in str(err.value.hint)


# ---------------------------------------------------------------------------------------------------------
# SpeakerSink on a virtual ALSA device (subprocess with a temporary HOME)
# ---------------------------------------------------------------------------------------------------------

_ASOUNDRC = """\
pcm.!default {{ type asym playback.pcm "lyra_speaker" capture.pcm "lyra_mic" }}
pcm.lyra_speaker {{ type plug slave {{ pcm "lyra_speaker_tap" format S16_LE rate 16000 channels 1 }} }}
pcm.lyra_speaker_tap {{ type file slave.pcm "lyra_null" file "{out}" format "raw" }}
pcm.lyra_mic {{ type plug slave {{ pcm "lyra_mic_tap" format S16_LE rate 16000 channels 1 }} }}
pcm.lyra_mic_tap {{ type file slave.pcm "lyra_null" file "/dev/null" infile "{infile}" format "raw" }}
pcm.lyra_null {{ type null }}
"""


def _run_on_virtual_speaker(tmp_path: Path, script: str, *args: str) -> tuple[dict, np.ndarray]:
    """Run `script` with ALSA's file plugin as the sound card; return its JSON line and what was played."""
    home, out = tmp_path / "home", tmp_path / "speaker.raw"
    home.mkdir()
    (tmp_path / "silence.raw").write_bytes(bytes(3200))
    (home / ".asoundrc").write_text(_ASOUNDRC.format(out=out, infile=tmp_path / "silence.raw"))
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-c", textwrap.dedent(script), *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1]), np.fromfile(out, "<i2")


def _trim_silence(pcm: np.ndarray) -> np.ndarray:
    """Without leading and trailing zeros: PortAudio primes and drains the device with silence."""
    nonzero = np.flatnonzero(pcm)
    return pcm[nonzero[0] : nonzero[-1] + 1] if nonzero.size else pcm[:0]


_PLAY_ALL = """
    import json, sys
    from lyra_cli.audio.io import load_audio
    from lyra_cli.audio.playback import SpeakerSink, list_devices

    answer = load_audio(sys.argv[1])
    names = [d.name for d in list_devices() if d.max_output_channels > 0]
    with SpeakerSink("lyra_speaker") as sink:  # picked by name
        # One write: the file-backed device is not paced, so pieces written over time would underrun it
        # (the sink then plays zeros, as a real device must) and the comparison would depend on timing.
        sink.write(answer)
    print(json.dumps({"names": names, "played_s": sink.played_s, "closed": sink.stream.closed}))
"""


@needs_portaudio
def test_speaker_plays_every_sample_on_a_virtual_device(tmp_path: Path, real: Path, answer: np.ndarray) -> None:
    result, played = _run_on_virtual_speaker(tmp_path, _PLAY_ALL, str(real / "pred_round1.wav"))
    assert {"lyra_speaker", "lyra_mic", "default"} <= set(result["names"])
    assert result["played_s"] == pytest.approx(answer.shape[0] / SAMPLE_RATE_HZ) and result["closed"]
    expected = _trim_silence(float_to_pcm16(answer))
    played = _trim_silence(played)
    assert played.shape == expected.shape
    assert np.abs(played.astype(np.int32) - expected).max() <= 1  # ALSA's float -> int16 may round differently


# The device takes audio as fast as it is given (no pacing), so "while it plays" is made exact: the first part
# is played out completely, then the rest is queued and barge-in comes before the device can take any of it.
# A long GIL switch interval keeps PortAudio's (Python) callback from running between those two calls.
_BARGE_IN = """
    import json, sys, time
    sys.setswitchinterval(30.0)
    from lyra_cli.audio.io import load_audio
    from lyra_cli.audio.playback import SpeakerSink

    answer = load_audio(sys.argv[1])
    first, rest = answer[:40000], answer[40000:]
    with SpeakerSink("lyra_speaker") as sink:
        sink.write(first)
        deadline = time.monotonic() + 10
        while sink.played_s < len(first) / 16000 and time.monotonic() < deadline:
            time.sleep(0.001)
        sink.write(rest)
        playing_before = sink.playing
        sink.stop()  # the user started speaking
        result = {"playing_before": playing_before, "playing_after": sink.playing, "played_s": sink.played_s}
    print(json.dumps(result))
"""


@needs_portaudio
def test_barge_in_stops_the_speaker_before_the_rest_is_played(tmp_path: Path, real: Path, answer: np.ndarray) -> None:
    result, played = _run_on_virtual_speaker(tmp_path, _BARGE_IN, str(real / "pred_round1.wav"))
    assert result == {"playing_before": True, "playing_after": False, "played_s": 2.5}
    played = _trim_silence(played)
    first = _trim_silence(float_to_pcm16(answer[:40000]))
    assert played.shape[0] < _trim_silence(float_to_pcm16(answer)).shape[0]  # shorter than the full answer
    assert played.shape == first.shape  # exactly the part played before barge-in, nothing of the rest
    assert np.abs(played.astype(np.int32) - first).max() <= 1

"""Spoken turns: silero-vad on real speech, the turn detector's settings, barge-in, recordings and the
microphone as frame sources, and Ctrl-C in a capture loop.

The conversation used throughout is jfk.flac (11.0 s; pauses of 1.06 s, 1.02 s and 0.56 s between its four
phrases), 2 s of silence, then Hi.mp3 (3.6 s; pauses of 0.29 s and 0.42 s). Silero's probabilities are
computed once per module and replayed, so that settings can be compared cheaply; one test runs the model
end to end. The microphone is ALSA's `file` plugin reading a raw S16_LE recording (`infile`), configured in
the `.asoundrc` of a temporary HOME, in a subprocess (PortAudio reads the ALSA configuration when sounddevice
is imported). It is not paced in real time: capture delivers the whole file at once, bit-exact.
Needs the Debian package `libportaudio2`; those tests skip without it.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np

from helpers.signals import sigint_default
from helpers.sinks import MemorySink
from helpers.virtual_audio import needs_portaudio
from helpers.virtual_audio import virtual_mic_env as _virtual_mic_env
import pytest
import soundfile

from lyra_cli.audio.io import SAMPLE_RATE_HZ, load_audio
from lyra_cli.audio.mic import TRAILING_SILENCE_S, FileSource
from lyra_cli.audio.playback import float_to_pcm16
from lyra_cli.audio.vad import (
    FRAME_S,
    FRAME_SAMPLES,
    SileroVad,
    SpeechStarted,
    TurnDetector,
    TurnEnded,
    VadConfig,
    barge_in,
    detect_turns,
)
from lyra_cli.errors import InputError

REPO = Path(__file__).resolve().parent.parent
HELPER = REPO / "tests" / "helpers" / "capture_until_sigint.py"
GAP_S = 2.0  # silence between the two recordings

# Speech found by silero at the default settings (start_s, end_s), on the 32 ms frame grid: "And so my fellow
# Americans" | "ask not" | "what your country can do for you; ask what you can do for your country" | "Hi ..."
EXPECTED_TURNS = [(0.352, 2.240), (3.296, 4.416), (5.408, 11.008), (13.184, 16.320)]


@pytest.fixture(scope="module")
def jfk(real: Path) -> np.ndarray:
    return load_audio(real / "jfk.flac")


@pytest.fixture(scope="module")
def conversation(jfk: np.ndarray, real: Path) -> np.ndarray:
    """jfk, 2 s of silence, Hi, then the trailing silence a FileSource adds; whole frames. (n_samples,)"""
    hi = load_audio(real / "Hi.mp3")
    audio = np.concatenate([jfk, np.zeros(round(GAP_S * SAMPLE_RATE_HZ), np.float32), hi])
    n_tail = -audio.shape[0] % FRAME_SAMPLES + round(TRAILING_SILENCE_S / FRAME_S) * FRAME_SAMPLES
    return np.concatenate([audio, np.zeros(n_tail, np.float32)])


def _frames(audio: np.ndarray) -> list[np.ndarray]:
    return list(audio[: audio.shape[0] // FRAME_SAMPLES * FRAME_SAMPLES].reshape(-1, FRAME_SAMPLES))


class _Replay:
    """A `SpeechScorer` replaying probabilities computed earlier, frame by frame."""

    def __init__(self, probs: list[float]) -> None:
        self.probs = probs
        self.n = 0

    def speech_prob(self, frame: np.ndarray) -> float:
        self.n += 1
        return self.probs[self.n - 1]

    def reset(self) -> None:
        self.n = 0


@pytest.fixture(scope="module")
def silero() -> SileroVad:
    return SileroVad()


@pytest.fixture(scope="module")
def probs(conversation: np.ndarray, silero: SileroVad) -> list[float]:
    silero.reset()
    return [silero.speech_prob(frame) for frame in _frames(conversation)]


def _turns(conversation: np.ndarray, probs: list[float], **settings: float) -> list[TurnEnded]:
    events = detect_turns(_frames(conversation), VadConfig(**settings), _Replay(probs))
    return [event for event in events if isinstance(event, TurnEnded)]


def _spans(turns: list[TurnEnded]) -> list[tuple[float, float]]:
    return [(round(turn.start_s, 3), round(turn.end_s, 3)) for turn in turns]


# ---------------------------------------------------------------------------------------------------------
# Turn detection on real speech
# ---------------------------------------------------------------------------------------------------------


def test_turns_of_a_real_conversation_from_a_file(tmp_path: Path, conversation: np.ndarray, silero: SileroVad) -> None:
    path = tmp_path / "conversation.wav"
    n_speech = conversation.shape[0] - round(TRAILING_SILENCE_S / FRAME_S) * FRAME_SAMPLES
    soundfile.write(path, conversation[:n_speech], SAMPLE_RATE_HZ, subtype="FLOAT")  # float: no rounding
    with FileSource(path) as source:
        events = list(detect_turns(source, scorer=silero))

    turns = [event for event in events if isinstance(event, TurnEnded)]
    assert _spans(turns) == EXPECTED_TURNS
    assert [type(event) for event in events] == [SpeechStarted, TurnEnded] * 4
    assert [event.t_s for event in events[::2]] == [turn.start_s for turn in turns]
    for turn in turns:  # the audio is the recording itself, with 9 frames of pre-roll and 3 of post-roll
        assert turn.audio_start_s == pytest.approx(turn.start_s - 9 * FRAME_S)
        assert turn.audio_end_s == pytest.approx(turn.end_s + 3 * FRAME_S)
        first = round(turn.audio_start_s * SAMPLE_RATE_HZ)
        np.testing.assert_array_equal(turn.audio, conversation[first : first + turn.audio.shape[0]])
        assert not turn.forced


@pytest.mark.parametrize(
    ("silence_s", "n_turns"),
    [(0.48, 5), (0.7, 4), (1.2, 2), (2.5, 1)],  # jfk's pauses: 1.06, 1.02, 0.56 s; then 2.2 s before Hi
)
def test_end_of_turn_silence_decides_which_pauses_end_a_turn(
    conversation: np.ndarray, probs: list[float], silence_s: float, n_turns: int
) -> None:
    turns = _turns(conversation, probs, end_of_turn_silence_s=silence_s)
    assert len(turns) == n_turns
    assert (turns[0].start_s, turns[-1].end_s) == (0.352, 16.32)  # merging pauses moves no outer boundary
    if silence_s == 0.48:  # the 0.56 s pause splits the third phrase, Hi's 0.42 s pause does not
        assert _spans(turns) == [*EXPECTED_TURNS[:2], (5.408, 7.648), (8.192, 11.008), EXPECTED_TURNS[3]]


def test_a_higher_threshold_keeps_less_speech(conversation: np.ndarray, probs: list[float]) -> None:
    spans = {th: _spans(_turns(conversation, probs, threshold=th)) for th in (0.2, 0.5, 0.9)}
    assert all(len(found) == 4 for found in spans.values())
    for lower, higher in [(0.2, 0.5), (0.5, 0.9)]:
        for (start_lo, end_lo), (start_hi, end_hi) in zip(spans[lower], spans[higher]):
            assert start_lo <= start_hi and end_hi <= end_lo  # each turn shrinks (or stays)

    def speech_s(found: list[tuple[float, float]]) -> float:
        return sum(end - start for start, end in found)

    assert speech_s(spans[0.2]) > speech_s(spans[0.5]) > speech_s(spans[0.9])


def test_min_speech_drops_short_bursts(conversation: np.ndarray, probs: list[float]) -> None:
    turns = _turns(conversation, probs, min_speech_s=0.6)
    # "ask not" is two bursts of 0.5 s and 0.4 s; Hi's first burst (0.35 s) no longer starts its turn
    assert _spans(turns) == [EXPECTED_TURNS[0], EXPECTED_TURNS[2], (13.824, 16.32)]


def test_max_turn_cuts_long_speech_without_losing_audio(conversation: np.ndarray, probs: list[float]) -> None:
    turns = _turns(conversation, probs, max_turn_s=3.0)
    assert [turn.forced for turn in turns] == [False, False, True, False, True]
    assert all(turn.end_s - turn.start_s <= 3.0 + FRAME_S / 2 for turn in turns)  # 3.0 s -> 94 frames
    cut, rest = turns[2], turns[3]
    assert rest.start_s == cut.end_s and rest.audio_start_s == cut.audio_end_s  # contiguous: no gap, no overlap


def test_speech_started_is_sent_once_speech_is_certain(conversation: np.ndarray, probs: list[float]) -> None:
    detector = TurnDetector(VadConfig(min_speech_s=0.25), _Replay(probs))
    sent_at = []
    for frame in _frames(conversation):
        for event in detector.feed(frame):
            if isinstance(event, SpeechStarted):
                sent_at.append((event.t_s, detector.position_s))
                assert detector.speaking
    assert [t_s for t_s, _ in sent_at] == pytest.approx([start for start, _ in EXPECTED_TURNS])
    assert all(at_s - t_s == pytest.approx(8 * FRAME_S) for t_s, at_s in sent_at)  # 0.25 s -> 8 frames


def test_silence_and_noise_are_no_speech(silero: SileroVad) -> None:
    rng = np.random.default_rng(0)
    quiet = np.concatenate([np.zeros(SAMPLE_RATE_HZ, np.float32), 0.003 * rng.standard_normal(2 * SAMPLE_RATE_HZ)])
    assert list(detect_turns(_frames(quiet.astype(np.float32)), scorer=silero)) == []


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="threshold"):
        VadConfig(threshold=1.5)
    with pytest.raises(ValueError, match="end_of_turn_silence_s"):
        VadConfig(end_of_turn_silence_s=-1)
    with pytest.raises(ValueError, match="max_turn_s"):
        VadConfig(max_turn_s=0.1)
    with pytest.raises(ValueError, match="512"):
        SileroVad().speech_prob(np.zeros(480, np.float32))  # webrtcvad's 30 ms is not silero's 32 ms


def test_loading_silero_keeps_torch_threads() -> None:
    import torch

    before = torch.get_num_threads()
    SileroVad()  # importing silero_vad calls torch.set_num_threads(1) for the process
    assert torch.get_num_threads() == before


# ---------------------------------------------------------------------------------------------------------
# Barge-in
# ---------------------------------------------------------------------------------------------------------


def test_barge_in_stops_only_a_playing_sink() -> None:
    sink = MemorySink()
    assert not barge_in(SpeechStarted(1.0), sink)  # nothing playing: nothing to interrupt
    sink.write(np.ones(SAMPLE_RATE_HZ, np.float32))
    assert not barge_in(TurnEnded(np.zeros(0, np.float32), 0.0, 0.5, 0.0), sink)
    assert sink.playing
    assert barge_in(SpeechStarted(1.0), sink)
    assert not sink.playing


def test_user_speaking_over_the_answer_cuts_it_short(jfk: np.ndarray, probs: list[float]) -> None:
    """A spoken answer plays while the microphone hears the user start "And so my fellow Americans"."""
    answer = np.full(5 * SAMPLE_RATE_HZ, 0.1, np.float32)
    speaker, detector = MemorySink(), TurnDetector(scorer=_Replay(probs))
    speaker.write(answer)
    interrupted_at = None
    for frame in _frames(jfk):  # one clock: each 32 ms frame heard, 32 ms of answer played
        speaker.pull(FRAME_SAMPLES)
        if any(barge_in(event, speaker) for event in detector.feed(frame)):
            interrupted_at = detector.position_s
            break
    # speech starts at 0.352 s and is certain 0.25 s later: the answer stops there, not after 5 s
    assert interrupted_at == pytest.approx(0.352 + 8 * FRAME_S)
    assert speaker.played_s == pytest.approx(interrupted_at)
    assert not speaker.playing and not speaker.pull(FRAME_SAMPLES).any()


# ---------------------------------------------------------------------------------------------------------
# FileSource
# ---------------------------------------------------------------------------------------------------------


def test_file_source_yields_the_recording_in_frames_then_silence(real: Path, jfk: np.ndarray) -> None:
    with FileSource(real / "jfk.flac", trailing_silence_s=0.5) as source:
        frames = list(source)
    assert all(frame.shape == (FRAME_SAMPLES,) and frame.dtype == np.float32 for frame in frames)
    n_audio = -(-jfk.shape[0] // FRAME_SAMPLES)  # the last partial frame is zero-padded
    assert len(frames) == n_audio + round(0.5 / FRAME_S)
    joined = np.concatenate(frames)
    np.testing.assert_array_equal(joined[: jfk.shape[0]], jfk)
    assert not joined[jfk.shape[0] :].any()
    assert source.position_s == pytest.approx(len(frames) * FRAME_S)


def test_file_source_in_real_time_is_paced_and_stops_on_close(tmp_path: Path) -> None:
    path = tmp_path / "tone.wav"
    tone = 0.1 * np.sin(np.arange(8000) / 5).astype(np.float32)
    soundfile.write(path, tone, SAMPLE_RATE_HZ)  # 0.5 s
    start = time.monotonic()
    n_frames = sum(1 for _ in FileSource(path, realtime=True, trailing_silence_s=0.0))
    assert n_frames == 16 and time.monotonic() - start >= 16 * FRAME_S - 0.01  # 0.512 s, not at once

    source = FileSource(path, realtime=True, trailing_silence_s=60.0)
    threading.Timer(0.2, source.close).start()  # e.g. the loop's Ctrl-C handler, from another thread
    start = time.monotonic()
    n_frames = sum(1 for _ in source)
    assert time.monotonic() - start < 1.0 and 4 <= n_frames <= 8


def test_file_source_checks_the_file_at_once(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        FileSource(tmp_path / "missing.wav")


# ---------------------------------------------------------------------------------------------------------
# The microphone, through ALSA's file plugin (subprocess with a temporary HOME)
# ---------------------------------------------------------------------------------------------------------

_CAPTURE = """
    import itertools, json, sys
    import numpy as np
    from lyra_cli.audio.mic import MicSource

    out, n_frames, device = sys.argv[1], int(sys.argv[2]), sys.argv[3] or None
    with MicSource(device) as mic:
        frames = list(itertools.islice(mic, n_frames))
    np.save(out, np.stack(frames))
    print(json.dumps({"rate_hz": mic.sample_rate_hz, "closed": mic.stream.closed}))
"""


def _capture(env: dict[str, str], out: Path, n_frames: int, device: str = "") -> dict:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_CAPTURE), str(out), str(n_frames), device],
        env=env, capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@needs_portaudio
def test_microphone_frames_are_the_recording_and_hold_its_turns(
    tmp_path: Path, jfk: np.ndarray, silero: SileroVad
) -> None:
    clip = float_to_pcm16(jfk).astype(np.float32) / 32768  # what a 16-bit microphone can deliver
    n_frames = -(-clip.shape[0] // FRAME_SAMPLES)
    result = _capture(_virtual_mic_env(tmp_path, clip), tmp_path / "frames.npy", n_frames)  # the default device
    assert result == {"rate_hz": SAMPLE_RATE_HZ, "closed": True}
    captured = np.load(tmp_path / "frames.npy").reshape(-1)
    np.testing.assert_array_equal(captured[: clip.shape[0]], clip)  # bit-exact

    silero.reset()
    frames = [*_frames(captured), *[np.zeros(FRAME_SAMPLES, np.float32)] * 30]  # then the user is silent
    turns = [event for event in detect_turns(frames, scorer=silero) if isinstance(event, TurnEnded)]
    assert _spans(turns) == EXPECTED_TURNS[:3]


@needs_portaudio
def test_microphone_at_48k_is_resampled_to_16k(tmp_path: Path, jfk: np.ndarray) -> None:
    import soxr

    recording = float_to_pcm16(soxr.resample(jfk, SAMPLE_RATE_HZ, 48_000)).astype(np.float32) / 32768
    env = _virtual_mic_env(tmp_path, recording, mic_rate_hz=48_000)
    result = _capture(env, tmp_path / "frames.npy", n_frames=100, device="lyra_mic")
    assert result == {"rate_hz": 48_000, "closed": True}  # the device's own rate, not 16 kHz
    captured = np.load(tmp_path / "frames.npy").reshape(-1)
    expected = soxr.resample(recording, 48_000, SAMPLE_RATE_HZ)  # one shot; the microphone streamed it
    np.testing.assert_array_equal(captured, expected[: captured.shape[0]])
    assert np.abs(captured - jfk[: captured.shape[0]]).max() < 2e-3  # and close to the 16 kHz original


# ---------------------------------------------------------------------------------------------------------
# Ctrl-C: a capture loop in a subprocess gets SIGINT
# ---------------------------------------------------------------------------------------------------------


def _start_helper(env: dict[str, str], out: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(HELPER), str(out), *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=sigint_default,
    )  # fmt: skip


def _wait_for_ready(proc: subprocess.Popen[str], timeout_s: float = 60.0) -> None:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    line = proc.stdout.readline() if ready else ""
    if line.strip() != "READY":
        proc.kill()
        pytest.fail(f"the capture loop did not start: {line!r} {proc.communicate()[1]}")


def _interrupt(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    time.sleep(0.3)  # let it capture for a while
    proc.send_signal(signal.SIGINT)
    try:
        stdout, stderr = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()  # never leave a spinning capture loop behind a failed test
        _, stderr = proc.communicate()
        pytest.fail(f"the capture loop did not stop within 30 s of SIGINT: {stderr[-2000:]}")
    return proc.returncode, stdout, stderr


def test_ctrl_c_during_a_paced_recording_exits_cleanly(tmp_path: Path, real: Path) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = _start_helper(env, out_dir / "turns.wav", "--input-file", str(real / "jfk.flac"), "--realtime")
    _wait_for_ready(proc)
    returncode, stdout, stderr = _interrupt(proc)
    assert returncode == 130
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert stdout.splitlines()[-1] == "CLOSED source=True speaker=None"  # NullSink: no stream to close
    assert list(out_dir.iterdir()) == []  # no wav, no temporary file


@needs_portaudio
def test_ctrl_c_while_microphone_and_speaker_run_closes_both(tmp_path: Path, jfk: np.ndarray) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    env = _virtual_mic_env(tmp_path, jfk)
    proc = _start_helper(env, out_dir / "turns.wav", "--mic", "lyra_mic", "--speaker", "lyra_speaker")
    _wait_for_ready(proc)
    returncode, stdout, stderr = _interrupt(proc)
    assert returncode == 130
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert stdout.splitlines()[-1] == "CLOSED source=True speaker=True"  # both sounddevice streams closed
    assert list(out_dir.iterdir()) == []


def test_the_same_loop_run_to_the_end_writes_every_turn(
    tmp_path: Path, conversation: np.ndarray, probs: list[float]
) -> None:
    path = tmp_path / "conversation.wav"
    soundfile.write(path, conversation, SAMPLE_RATE_HZ, subtype="FLOAT")
    done = subprocess.run(
        [sys.executable, str(HELPER), str(tmp_path / "turns.wav"), "--input-file", str(path)],
        env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "CLOSED source=True speaker=None"
    written, rate_hz = soundfile.read(tmp_path / "turns.wav", dtype="int16")
    expected = np.concatenate([turn.audio for turn in _turns(conversation, probs)])
    assert rate_hz == SAMPLE_RATE_HZ
    np.testing.assert_array_equal(written, float_to_pcm16(expected))

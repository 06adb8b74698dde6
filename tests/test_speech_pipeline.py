"""Spoken answers: streamed audio equals vocoding the answer's units at the end, and lands in a valid wav."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from helpers.virtual_audio import needs_portaudio

from lyra_cli.engine.model.loader import load_model
from lyra_cli.engine.model.runtime import RuntimeRequest, resolve_runtime
from lyra_cli.engine.run.events import AudioChunk, Done
from lyra_cli.engine.run.generate import SamplingConfig
from lyra_cli.engine.run.pipeline import Engine
from lyra_cli.engine.run.prompt import Conversation, TextPart
from lyra_cli.engine.run.voice import VoiceConfig, load_voice
from lyra_cli.main import run

STREAM_TOLERANCE = 1e-5  # the vocoder stream's stated bound (tests/test_vocoder.py)


@pytest.fixture(scope="module")
def engine(tiny_dir: Path) -> Engine:
    return Engine(load_model(tiny_dir, resolve_runtime(RuntimeRequest(device="cpu"))))


def _speak(engine: Engine, voice, n_tokens: int = 60):  # noqa: ANN001
    events = list(engine.respond(Conversation(), [TextPart("tell me a story")], SamplingConfig(max_new_tokens=n_tokens),
                                 voice=voice))  # fmt: skip
    audio = [e for e in events if isinstance(e, AudioChunk)]
    return events[-1], audio, events


@pytest.mark.parametrize("chunk_units", [pytest.param(1, marks=pytest.mark.slow), 7, 40])
def test_streamed_answer_equals_vocoding_at_the_end(engine: Engine, chunk_units: int) -> None:
    """Chunks of 7 units stand for small chunks in the default run; `slow` adds chunks of 1 (a vocoder call
    per unit, the extreme of the same arithmetic; tests/test_vocoder.py keeps chunks of 1 by default)."""
    voice = load_voice(engine.loaded, None, VoiceConfig(chunk_units=chunk_units))
    done, audio, events = _speak(engine, voice)
    assert isinstance(done, Done) and len(done.units) > 40
    streamed = np.concatenate([a.samples for a in audio])
    with torch.inference_mode():
        offline = voice.vocoder(torch.tensor(done.units)).numpy()  # the authors' order: all units, then vocode
    assert streamed.shape == offline.shape
    assert np.abs(streamed - offline).max() <= STREAM_TOLERANCE
    starts = [a.start_s for a in audio]
    assert starts == sorted(starts) and starts[0] == 0.0
    if chunk_units == 7:  # audio interleaves with text: the first chunk comes before the last text delta
        kinds = [type(e).__name__ for e in events]
        assert kinds.index("AudioChunk") < len(kinds) - 1 - kinds[::-1].index("TextDelta")


def test_aligned_voice_feeds_each_tokens_own_state(engine: Engine) -> None:
    """The authors' inputs: the state that predicted each token, the end token's included."""
    voice = load_voice(engine.loaded, None, VoiceConfig())
    done, _, _ = _speak(engine, voice, n_tokens=30)
    assert done.timings["first_audio_s"] <= done.timings["total_s"]
    aligned = load_voice(engine.loaded, None, VoiceConfig(aligned=True))
    done_aligned, _, _ = _speak(engine, aligned, n_tokens=30)
    assert done_aligned.text == done.text and done_aligned.units != done.units  # same words, shifted inputs


def test_chat_speech_out_writes_a_wav_matching_units_and_durations(tiny_dir: Path, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    out = tmp_path / "answer.wav"
    assert run(["chat", "--text", "say something", "--speech-out", str(out), "--json", "--max-new-tokens", "30",
                "-q"]) == 0  # fmt: skip
    record = json.loads(capsys.readouterr().out)
    info = sf.info(out)
    assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
    # the same greedy answer through the engine gives the units; their durations fix the wav's length
    engine = Engine(load_model(tiny_dir, resolve_runtime(RuntimeRequest(device="cpu"))))
    voice = load_voice(engine.loaded, None, VoiceConfig())
    sampling = dataclasses.replace(engine.loaded.sampling_defaults, max_new_tokens=30)
    done = list(engine.respond(Conversation(), [TextPart("say something")], sampling, voice=voice))[-1]
    assert len(done.units) == record["speech_units"] > 0
    with torch.inference_mode():
        frames = int(voice.vocoder.durations(torch.tensor(done.units)).sum())
    assert info.frames == frames * voice.vocoder.samples_per_frame
    assert record["timings"]["audio_s"] == pytest.approx(info.frames / 16000)


def test_speech_out_is_checked_before_loading(capsys, tmp_path: Path) -> None:  # noqa: ANN001
    assert run(["chat", "--text", "hi", "--speech-out", str(tmp_path / "no" / "a.wav")]) == 2
    assert run(["chat", "--text", "hi", "--speech-out", str(tmp_path / "a.mp3")]) == 2
    err = capsys.readouterr().err
    assert "a.mp3" in err and "loaded in" not in err


def test_speak_without_a_sound_card_names_the_flags(capsys, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    import lyra_cli.audio.playback as playback

    monkeypatch.setattr(playback, "list_devices", lambda: [])
    assert run(["chat", "--text", "hi", "--speak"]) == 1
    err = capsys.readouterr().err
    assert "no audio output device" in err and "--speech-out" in err


@needs_portaudio
def test_speak_and_speech_out_together_through_a_virtual_sound_card(tiny_dir: Path, tmp_path: Path) -> None:
    """Playback through a (file-backed) speaker while the same answer is written to a wav."""
    import os
    import subprocess
    import sys

    from helpers.virtual_audio import virtual_mic_env

    env = {**virtual_mic_env(tmp_path, np.zeros(16000, dtype=np.float32)), "LYRA_CACHE_DIR": os.environ["LYRA_CACHE_DIR"]}
    out = tmp_path / "answer.wav"
    done = subprocess.run([sys.executable, "-m", "lyra_cli.main", "chat", "--text", "say something", "--speak",
                           "--output-device", "lyra_speaker", "--speech-out", str(out), "--json",
                           "--max-new-tokens", "20", "-q"], env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert sf.info(out).frames / 16000 == pytest.approx(record["timings"]["audio_s"])

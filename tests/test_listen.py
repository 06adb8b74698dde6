"""`lyra listen`: spoken turns answered in text and speech, barge-in, the microphone path, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from helpers.signals import sigint_default
from helpers.virtual_audio import needs_portaudio, virtual_mic_env

from lyra_cli.audio.io import SAMPLE_RATE_HZ, load_audio
from lyra_cli.main import run

PAUSE = np.zeros(2 * SAMPLE_RATE_HZ, dtype=np.float32)


@pytest.fixture(scope="module")
def two_turns(real: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two real spoken questions with pauses: the VAD must cut two turns."""
    audio = np.concatenate([PAUSE[:8000], load_audio(real / "extreme_ironing.mp3"), PAUSE,
                            load_audio(real / "Hi.mp3"), PAUSE])  # fmt: skip
    path = tmp_path_factory.mktemp("listen") / "two_turns.wav"
    sf.write(path, audio, SAMPLE_RATE_HZ)
    return path


def test_input_file_turns_are_answered_and_replies_written(two_turns: Path, tiny_dir: Path, tmp_path: Path,
                                                          capsys) -> None:  # noqa: ANN001  # fmt: skip
    out = tmp_path / "reply.wav"
    assert run(["listen", "--input-file", str(two_turns), "--speech-out", str(out), "--json", "--max-new-tokens",
                "12", "-q"]) == 0  # fmt: skip
    turns = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [t["turn"] for t in turns] == [1, 2]
    assert all(t["adapter"] == "speech" and t["speech_units"] > 0 for t in turns)
    assert 1.5 < turns[0]["user_speech_s"] < 4.0  # the 2.1 s question with the VAD's pre/post roll
    for path in (out, tmp_path / "reply-2.wav"):
        info = sf.info(path)
        assert (info.samplerate, info.channels) == (16000, 1) and info.frames > 0
    assert turns[0]["latency"]["end_of_speech_to_first_token_s"] <= turns[0]["latency"]["end_of_speech_to_first_audio_s"]


def test_barge_in_abandons_the_answer(tiny_dir: Path, real: Path, tmp_path: Path) -> None:
    """Speaking while Lyra answers: playback stops, the answer is dropped, nothing is written."""
    from helpers.sinks import MemorySink

    from lyra_cli.audio.outputs import SpeechOutputs
    from lyra_cli.commands.listen import Listener
    from lyra_cli.engine.model.runtime import RuntimeRequest, resolve_runtime
    from lyra_cli.engine.run.generate import SamplingConfig
    from lyra_cli.engine.run.pipeline import Engine
    from lyra_cli.engine.run.prompt import Conversation
    from lyra_cli.engine.run.session import TurnJob
    from lyra_cli.engine.run.voice import VoiceConfig, load_voice

    engine = Engine.load(tiny_dir, resolve_runtime(RuntimeRequest(device="cpu")))
    engine.loaded.end_ids = set()  # a long answer, so the barge-in lands while it is generated
    outputs = SpeechOutputs(speak=False, device=None, speech_out=tmp_path / "reply.wav")
    outputs.speaker = MemorySink()  # "plays" only when pulled: stays playing until stopped
    notes: list[str] = []
    listener = Listener(engine=engine, sampling=SamplingConfig(max_new_tokens=2000),
                        voice=load_voice(engine.loaded, None, VoiceConfig()), outputs=outputs,
                        render_text=lambda _: None, render_done=lambda *_: None, note=notes.append, realtime=True,
                        conversation=Conversation())  # fmt: skip
    listener.start_turn(TurnJob(load_audio(real / "Hi.mp3"), time.perf_counter(), 1))
    deadline = time.monotonic() + 60
    while not outputs.speaker.playing and time.monotonic() < deadline:  # wait for the first audio
        time.sleep(0.01)
    assert outputs.speaker.playing and listener.answering
    listener.barge_in()
    assert not listener.answering and not outputs.speaker.playing  # generation and playback stopped
    assert notes == ["(interrupted)"] and listener.interrupted == 1 and listener.turns_done == 0
    assert listener.conversation.turns == []  # the unfinished answer never entered the conversation
    assert list(tmp_path.iterdir()) == []  # no reply, no temp file


def _lyra(*args: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lyra_cli.main", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=sigint_default)  # fmt: skip


@needs_portaudio
def test_microphone_through_a_virtual_sound_card(tiny_dir: Path, real: Path, tmp_path: Path) -> None:
    recording = np.concatenate([PAUSE[:8000], load_audio(real / "extreme_ironing.mp3"), PAUSE])
    env = {**virtual_mic_env(tmp_path, recording), "LYRA_CACHE_DIR": os.environ["LYRA_CACHE_DIR"]}
    out = tmp_path / "reply.wav"
    proc = _lyra("listen", "--mic", "--input-device", "lyra_mic", "--no-speak", "--speech-out", str(out),
                 "--max-turns", "1", "--json", "--max-new-tokens", "8", "-q", env=env)  # fmt: skip
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    turn = json.loads(stdout.splitlines()[0])
    assert turn["turn"] == 1 and 1.5 < turn["user_speech_s"] < 4.0
    assert sf.info(out).frames > 0


def test_ctrl_c_exits_cleanly_and_writes_nothing(two_turns: Path, tiny_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out = tmp_path / "reply.wav"
    proc = _lyra("listen", "--input-file", str(two_turns), "--realtime", "--speech-out", str(out),
                 "--max-new-tokens", "5", env=env)  # fmt: skip
    deadline = time.monotonic() + 60
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:  # wait until it listens, then interrupt in the middle of the first question
        seen.append(line)
        if "Ctrl-C quits" in line or time.monotonic() > deadline:  # the line that says it started
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    watchdog = threading.Timer(60, proc.kill)  # a process that ignores the signal must not stall the suite
    watchdog.start()
    try:
        stderr = "".join(seen) + proc.stderr.read()  # the same buffered reader: nothing read ahead is lost
    finally:
        watchdog.cancel()
    assert proc.wait(timeout=60) == 130, stderr
    assert "Traceback" not in stderr and "interrupted" in stderr
    assert list(tmp_path.iterdir()) == []  # no reply and no half-written temp file


def test_no_microphone_stops_before_loading_and_names_the_flags(capsys, monkeypatch) -> None:  # noqa: ANN001
    import lyra_cli.audio.playback as playback

    monkeypatch.setattr(playback, "list_devices", lambda: [])
    assert run(["listen", "--mic"]) == 1
    err = capsys.readouterr().err
    assert "no audio input device" in err and "--input-file" in err and "--list-devices" in err
    assert "loaded in" not in err

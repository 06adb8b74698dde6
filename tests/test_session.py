"""The engine's spoken session (`lyra_cli.engine.run.session`) driven without the CLI: a real recording in, typed
events out, in order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
from helpers.sinks import MemorySink

from lyra_cli.audio.io import SAMPLE_RATE_HZ, load_audio

PAUSE = np.zeros(2 * SAMPLE_RATE_HZ, dtype=np.float32)


def test_session_answers_each_turn_with_its_events_in_order(tiny_dir: Path, real: Path, tmp_path: Path) -> None:
    from lyra_cli.audio.mic import FileSource
    from lyra_cli.audio.outputs import SpeechOutputs
    from lyra_cli.audio.vad import SileroVad, TurnDetector, VadConfig
    from lyra_cli.engine.model.runtime import RuntimeRequest, resolve_runtime
    from lyra_cli.engine.run.events import AudioChunk, Done, TextDelta
    from lyra_cli.engine.run.generate import SamplingConfig
    from lyra_cli.engine.run.pipeline import Engine
    from lyra_cli.engine.run.session import SessionConfig, SpokenSession, TurnAnswered, TurnStarted
    from lyra_cli.engine.run.voice import VoiceConfig, load_voice

    recording = tmp_path / "two_turns.wav"
    sf.write(recording, np.concatenate([PAUSE[:8000], load_audio(real / "extreme_ironing.mp3"), PAUSE,
                                        load_audio(real / "Hi.mp3"), PAUSE]), SAMPLE_RATE_HZ)  # fmt: skip
    engine = Engine.load(tiny_dir, resolve_runtime(RuntimeRequest(device="cpu")))
    outputs = SpeechOutputs(speak=False, device=None, speech_out=None)
    outputs.speaker = MemorySink()  # plays only when pulled: the first answer is still "playing" at turn 2
    events: list = []
    session = SpokenSession(engine, SamplingConfig(max_new_tokens=12), outputs,
                            voice=load_voice(engine.loaded, None, VoiceConfig()),
                            config=SessionConfig(realtime=False), on_event=events.append)  # fmt: skip
    source = FileSource(recording)
    try:
        session.run(source, TurnDetector(VadConfig(), SileroVad()))
    finally:
        source.close()

    starts = [i for i, e in enumerate(events) if isinstance(e, TurnStarted)]
    assert [events[i].turn.number for i in starts] == [1, 2]
    assert session.turns_done == 2 and session.interrupted == 0 and len(session.conversation.turns) == 2
    chunks_by_turn = []
    for start, end in zip(starts, [*starts[1:], len(events)], strict=True):
        turn = events[start].turn
        answered = events[end - 1]
        assert isinstance(answered, TurnAnswered) and answered.turn is turn  # each answer closes its own turn
        between = events[start + 1 : end - 1]
        assert not any(isinstance(e, (TurnStarted, TurnAnswered, Done)) for e in between)  # Done only inside
        assert "".join(e.text for e in between if isinstance(e, TextDelta)) == answered.done.text
        chunks = [e.samples for e in between if isinstance(e, AudioChunk)]
        assert chunks and sum(len(c) for c in chunks) > 0 and len(answered.done.units) > 0
        chunks_by_turn.append(np.concatenate(chunks))
    assert 1.5 < events[starts[0]].turn.duration_s < 4.0  # the 2.1 s question with the VAD's pre/post roll
    # the second question's speech silenced the first answer's playback; the second answer plays out in full
    outputs.close(wait=True)
    np.testing.assert_array_equal(outputs.speaker.audio, chunks_by_turn[1])

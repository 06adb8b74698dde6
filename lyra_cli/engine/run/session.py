"""A spoken conversation: audio in, turns cut by the voice-activity detector, answers in text and speech.

`SpokenSession.run(source, detector)` reads an audio source (microphone or file) frame by frame on the
calling thread and feeds the detector, so the user is heard at every moment; a worker thread answers each
finished turn. When the user starts speaking while an answer is being generated or played (barge-in),
playback stops at once, the answer is abandoned (dropped from the conversation, its wav never written)
and the new turn is taken. What happens is reported as typed events to `on_event`; `lyra listen` renders
them on the console, a server can send them to its client.

    session = SpokenSession(engine, SamplingConfig(), outputs, voice=voice, on_event=print)
    session.run(FileSource("question.wav"), TurnDetector(VadConfig(), SileroVad()))
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lyra_cli.engine.run.events import AudioChunk, Done, Event

if TYPE_CHECKING:  # the rest on first use: `lyra listen`'s module (and so `lyra --help`) imports this one
    import numpy as np

    from lyra_cli.audio.mic import AudioSource
    from lyra_cli.audio.outputs import SpeechOutputs
    from lyra_cli.audio.vad import TurnDetector
    from lyra_cli.engine.run.generate import SamplingConfig
    from lyra_cli.engine.run.pipeline import Engine
    from lyra_cli.engine.run.prompt import Conversation
    from lyra_cli.engine.run.voice import Voice


@dataclass(frozen=True)
class SessionConfig:
    """`realtime`: the source runs at speaking speed (a microphone), so the session listens while it
    answers and counts latency from the end of speech; otherwise (a file read faster than speech) each
    turn is answered before reading on. `max_turns`: stop after answering this many (None: to the end)."""

    realtime: bool = True
    max_turns: int | None = None


@dataclass(frozen=True, eq=False)
class TurnJob:
    """A finished user turn to answer: its (n_samples,) float32 16 kHz audio, when the speech ended
    (a `time.perf_counter()` value: latency counts from it) and its number in the session (1, 2, …)."""

    audio: np.ndarray
    started_at: float
    number: int

    @property
    def duration_s(self) -> float:
        from lyra_cli.audio.io import SAMPLE_RATE_HZ

        return len(self.audio) / SAMPLE_RATE_HZ


@dataclass(frozen=True)
class TurnStarted:
    """The user's turn `turn` is being answered; its answer's events follow."""

    turn: TurnJob


@dataclass(frozen=True)
class TurnAnswered:
    """The answer to `turn` is complete and recorded in the conversation (its wav, if any, written)."""

    turn: TurnJob
    done: Done


@dataclass(frozen=True)
class Interrupted:
    """Barge-in: the user spoke over the answer to `turn`; it was abandoned and playback stopped."""

    turn: TurnJob


SessionEvent = TurnStarted | Event | TurnAnswered | Interrupted
"""What `on_event` receives: per turn `TurnStarted`, the engine's events for the answer (`TextDelta`,
`AudioChunk`, `Prefilled`, …, but not its `Done`, which comes inside `TurnAnswered`), then `TurnAnswered`,
or `Interrupted` once the abandoned answer has stopped."""
OnEvent = Callable[[SessionEvent], None]


class SpokenSession:
    """The conversation loop. `on_event` is called from the reading thread and from the answering thread,
    never from both at once (the reader waits for the answer before it reports anything)."""

    def __init__(
        self,
        engine: Engine,
        sampling: SamplingConfig,
        outputs: SpeechOutputs,
        *,
        voice: Voice | None = None,
        conversation: Conversation | None = None,
        config: SessionConfig = SessionConfig(),
        on_event: OnEvent | None = None,
    ) -> None:
        self.engine = engine
        self.sampling = sampling
        self.outputs = outputs
        self.voice = voice
        if conversation is None:
            from lyra_cli.engine.run.prompt import Conversation

            conversation = Conversation()
        self.conversation = conversation
        self.config = config
        self.on_event: OnEvent = on_event if on_event is not None else (lambda _: None)
        self.turns_done = 0
        self.interrupted = 0
        self._cancel = threading.Event()
        self._worker: threading.Thread | None = None
        self._turn: TurnJob | None = None  # the turn answered last (or now)
        self._error: BaseException | None = None  # raised by the worker, re-raised on the reading thread

    @property
    def answering(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    @property
    def cancelled(self) -> bool:
        """The last answer was abandoned (barge-in or `stop`)."""
        return self._cancel.is_set()

    def run(self, source: AudioSource, detector: TurnDetector) -> None:
        """Listen to `source` until it ends (or `max_turns` are answered), answering each turn."""
        from lyra_cli.audio.vad import SpeechStarted, TurnEnded

        number = 0
        for frame in source:
            for event in detector.feed(frame):
                if isinstance(event, SpeechStarted) and (self.answering or self.outputs.playing):
                    self.barge_in()
                elif isinstance(event, TurnEnded):
                    number += 1
                    lag_s = detector.position_s - event.end_s if self.config.realtime else 0.0
                    self.start_turn(TurnJob(event.audio, time.perf_counter() - lag_s, number))
                    if not self.config.realtime:  # a file is read faster than speech: answer before reading on
                        self.wait()
            if self._enough_turns():
                break
        for event in detector.flush():
            if isinstance(event, TurnEnded) and not self._enough_turns():
                number += 1
                self.start_turn(TurnJob(event.audio, time.perf_counter(), number))
        self.wait()

    def barge_in(self) -> None:
        """The user speaks: silence the speaker and abandon the answer under way, if any."""
        self.outputs.stop_playback()
        if self.answering:
            self._cancel.set()
            self.wait()
            self.interrupted += 1
            assert self._turn is not None  # a worker only runs for a started turn
            self.on_event(Interrupted(self._turn))

    def start_turn(self, turn: TurnJob) -> None:
        """Answer `turn` on the worker thread (after the previous answer has finished)."""
        self.wait()
        self._cancel.clear()
        self._turn = turn
        self.on_event(TurnStarted(turn))
        self._worker = threading.Thread(target=self._answer, args=(turn,), name=f"lyra-turn-{turn.number}",
                                        daemon=True)  # fmt: skip
        self._worker.start()

    def wait(self) -> None:
        """Until the answer under way is finished; re-raises what the worker raised."""
        if self._worker is not None:
            self._worker.join()
            self._worker = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def stop(self) -> None:
        """Ctrl-C: abandon the answer under way and silence the speaker."""
        self._cancel.set()
        self.outputs.stop_playback()
        self.wait()

    def _enough_turns(self) -> bool:
        return self.config.max_turns is not None and self.turns_done >= self.config.max_turns

    def _answer(self, turn: TurnJob) -> None:
        try:
            self._answer_turn(turn)
        except BaseException as exc:  # noqa: BLE001 - handed to the reading thread, which raises it
            self.outputs.abort_turn()
            self._error = exc

    def _answer_turn(self, turn: TurnJob) -> None:
        from lyra_cli.engine.run.pipeline import DecodedSpeech

        part = self.engine.encode(DecodedSpeech(turn.audio, f"turn {turn.number}"))
        self.outputs.begin_turn()
        events = self.engine.respond(self.conversation, [part], self.sampling, voice=self.voice,
                                     started_at=turn.started_at)  # fmt: skip
        try:
            for event in events:
                if self._cancel.is_set():
                    self.outputs.abort_turn()
                    return  # closing the generator drops the unfinished turn from the conversation
                if isinstance(event, AudioChunk):
                    self.outputs.write(event.samples)
                if isinstance(event, Done):
                    self.outputs.end_turn()
                    self.turns_done += 1
                    self.on_event(TurnAnswered(turn, event))
                else:
                    self.on_event(event)
        finally:
            events.close()

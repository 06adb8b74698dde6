"""Voice-activity detection: cut a stream of 16 kHz frames into spoken turns.

    frames (FRAME_SAMPLES,) float32 -> SpeechScorer (silero-vad, 32 ms windows) -> speech probability
    -> TurnDetector (hysteresis, min speech, end-of-turn silence, pre-roll, max turn)
    -> SpeechStarted(t_s) ... TurnEnded(audio, start_s, end_s)

Why silero-vad and not webrtcvad: silero is a small neural model (its weights ship in the wheel, load offline
in ~50 ms, and need only torch, which we have anyway) that scores a 32 ms window in ~0.7 ms on one CPU thread
and gives a probability, so the threshold is a meaningful knob. webrtcvad's GMM only answers yes/no at four
coarse "aggressiveness" levels and is known to fire on music and noise; its PyPI package (`webrtcvad`) no
longer imports on current Python (`pkg_resources`), leaving a fork (`webrtcvad-wheels`) as the only option.

The detector emits `SpeechStarted` once speech has lasted `min_speech_s` (so a cough does not count), with
the time speech began; during playback that event is the barge-in signal (`barge_in`). Times are in seconds
of the fed stream, counted from the first frame.
"""

from __future__ import annotations

import logging
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from lyra_cli.audio.io import SAMPLE_RATE_HZ
from lyra_cli.errors import MissingDependencyError

if TYPE_CHECKING:
    from lyra_cli.audio.playback import AudioSink

log = logging.getLogger(__name__)

FRAME_SAMPLES = 512  # silero-vad's fixed window at 16 kHz: the model rejects any other size
FRAME_S = FRAME_SAMPLES / SAMPLE_RATE_HZ  # 0.032 s
HYSTERESIS = 0.15  # silero's own rule: speech ends below `threshold - 0.15`, so a wobbling score does not flap


@dataclass(frozen=True)
class VadConfig:
    """How speech is told from silence, and when a turn is over. All durations in seconds."""

    threshold: float = 0.5  # speech probability at or above which a frame is speech (silero's default)
    min_speech_s: float = 0.25  # shorter bursts (a cough, a click) are ignored: no event at all
    end_of_turn_silence_s: float = 0.7  # a pause this long ends the turn; shorter pauses stay inside it
    pre_roll_s: float = 0.3  # audio kept before the detected start: onsets (soft consonants) score low
    post_roll_s: float = 0.1  # audio kept after the detected end: trailing sounds fade below threshold
    max_turn_s: float = 30.0  # a turn is cut here even without a pause (Whisper's encoder sees 30 s)

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        for name in ("min_speech_s", "end_of_turn_silence_s", "pre_roll_s", "post_roll_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.max_turn_s <= self.min_speech_s:
            raise ValueError(f"max_turn_s ({self.max_turn_s}) must exceed min_speech_s ({self.min_speech_s})")

    @property
    def release_threshold(self) -> float:
        """Below this probability a frame counts as silence (between the two: no change)."""
        return max(0.0, self.threshold - HYSTERESIS)


# ---------------------------------------------------------------------------------------------------------
# Events
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpeechStarted:
    """The user started speaking at `t_s` (emitted `min_speech_s` later, once it is clearly speech)."""

    t_s: float


@dataclass(frozen=True, eq=False)
class TurnEnded:
    """A finished turn: speech from `start_s` to `end_s`; `audio` (n_samples,) float32 at 16 kHz starts at
    `audio_start_s` (pre-roll before `start_s`, post-roll after `end_s`). `forced` when `max_turn_s` cut it."""

    audio: np.ndarray
    start_s: float
    end_s: float
    audio_start_s: float
    forced: bool = False

    @property
    def audio_end_s(self) -> float:
        return self.audio_start_s + self.audio.shape[0] / SAMPLE_RATE_HZ


VadEvent = SpeechStarted | TurnEnded
_State = Literal["silent", "pending", "speaking"]


# ---------------------------------------------------------------------------------------------------------
# Scorers: speech probability per frame
# ---------------------------------------------------------------------------------------------------------


class SpeechScorer(Protocol):
    """Speech probability of each consecutive (FRAME_SAMPLES,) float32 frame; stateful across frames."""

    def speech_prob(self, frame: np.ndarray) -> float: ...

    def reset(self) -> None: ...


class SileroVad:
    """silero-vad's bundled TorchScript model, one 32 ms frame at a time (it keeps context between calls)."""

    def __init__(self) -> None:
        self._torch, self._model = _load_silero()

    def speech_prob(self, frame: np.ndarray) -> float:
        if frame.shape != (FRAME_SAMPLES,):
            raise ValueError(f"silero-vad takes frames of shape ({FRAME_SAMPLES},), got {frame.shape}")
        torch = self._torch
        # One thread: a 32 ms window is too small to split, and on a busy CPU extra threads wait on each other
        # (measured 10x slower with 2 threads on 2 loaded cores). The setting is per calling thread: restored.
        n_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.inference_mode():
                return float(self._model(torch.from_numpy(np.ascontiguousarray(frame, np.float32)), SAMPLE_RATE_HZ))
        finally:
            torch.set_num_threads(n_threads)

    def reset(self) -> None:
        self._model.reset_states()


def _load_silero() -> tuple[Any, Any]:
    import torch

    # Importing silero_vad calls torch.set_num_threads(1) for the whole process (silero_vad/model.py),
    # which would slow the language model down; keep the caller's setting.
    n_threads = torch.get_num_threads()
    try:
        from silero_vad import load_silero_vad
    except ImportError as err:
        raise MissingDependencyError("silero-vad", "voice-activity detection", extra="mic") from err
    finally:
        torch.set_num_threads(n_threads)
    with warnings.catch_warnings():  # its loader uses deprecated importlib/torch.jit calls: not ours to fix
        warnings.simplefilter("ignore", DeprecationWarning)
        model = load_silero_vad()
    return torch, model


# ---------------------------------------------------------------------------------------------------------
# Turn detection
# ---------------------------------------------------------------------------------------------------------


class TurnDetector:
    """Feed consecutive 16 kHz frames; get `SpeechStarted` and `TurnEnded` events.

    States: silent -> pending (speech seen, shorter than `min_speech_s`) -> speaking (SpeechStarted sent)
    -> silent again after `end_of_turn_silence_s` of silence (TurnEnded sent). Streaming state is all here:
    feeding a recording frame by frame gives the same events however the frames arrive.
    """

    def __init__(self, config: VadConfig | None = None, scorer: SpeechScorer | None = None) -> None:
        self.config = config or VadConfig()
        self.scorer = scorer if scorer is not None else SileroVad()
        self._min_speech_frames = _n_frames(self.config.min_speech_s)
        self._end_silence_frames = max(1, _n_frames(self.config.end_of_turn_silence_s))
        self._max_turn_frames = max(1, _n_frames(self.config.max_turn_s))
        self._post_roll_frames = _n_frames(self.config.post_roll_s)
        self._recent: deque[np.ndarray] = deque(maxlen=max(1, _n_frames(self.config.pre_roll_s)))
        self.reset()

    def reset(self) -> None:
        """Forget everything (the model's context too); times restart at 0."""
        self.scorer.reset()
        self._recent.clear()  # the last frames fed, whatever the state: where pre-roll comes from
        self._n_fed = 0  # frames fed so far: the clock
        self._state: _State = "silent"
        self._turn: list[np.ndarray] = []  # frames from the turn's audio start (pre-roll included) on
        self._turn_first = 0  # frame index of the turn's first audio frame
        self._onset = 0  # frame index where speech began
        self._n_silent = 0  # consecutive silent frames at the end of the turn
        self._free_from = 0  # earliest frame a pre-roll may reach back to: never into the previous turn

    @property
    def speaking(self) -> bool:
        """True between `SpeechStarted` and its `TurnEnded`."""
        return self._state == "speaking"

    @property
    def position_s(self) -> float:
        return self._n_fed * FRAME_S

    def feed(self, frame: np.ndarray) -> list[VadEvent]:
        """Score one (FRAME_SAMPLES,) float32 frame; return the events it caused (usually none)."""
        if frame.shape != (FRAME_SAMPLES,):
            raise ValueError(f"expected a frame of shape ({FRAME_SAMPLES},), got {frame.shape}")
        frame = np.array(frame, dtype=np.float32)  # a copy: the caller may reuse its array, the turn keeps it
        prob = self.scorer.speech_prob(frame)
        if self._state == "silent":
            events = self._while_silent(frame, prob)
        else:
            self._turn.append(frame)
            self._n_fed += 1
            events = self._while_pending(prob) if self._state == "pending" else self._while_speaking(prob)
        self._recent.append(frame)
        return events

    def flush(self) -> list[VadEvent]:
        """End of input: a turn still being spoken ends at its last speech frame."""
        events: list[VadEvent] = []
        if self._state == "speaking":
            events.append(self._end_turn(forced=False))
        self._state, self._turn = "silent", []
        return events

    def _while_silent(self, frame: np.ndarray, prob: float) -> list[VadEvent]:
        index = self._n_fed
        self._n_fed += 1
        if prob < self.config.threshold:
            return []
        n_pre = min(len(self._recent), index - self._free_from)
        self._turn = [*list(self._recent)[len(self._recent) - n_pre :], frame]
        self._turn_first, self._onset, self._n_silent = index - n_pre, index, 0
        self._state = "pending"
        return self._while_pending(prob)

    def _while_pending(self, prob: float) -> list[VadEvent]:
        if prob < self.config.release_threshold:  # too short to be speech: forget it
            self._state, self._turn = "silent", []
            return []
        if self._n_fed - self._onset < max(1, self._min_speech_frames):
            return []
        self._state = "speaking"
        return [SpeechStarted(self._onset * FRAME_S)]

    def _while_speaking(self, prob: float) -> list[VadEvent]:
        if prob >= self.config.threshold:
            self._n_silent = 0
        elif prob < self.config.release_threshold or self._n_silent:  # in between: silence, once started
            self._n_silent += 1
        if self._n_silent >= self._end_silence_frames:
            return [self._end_turn(forced=False)]
        if self._n_fed - self._n_silent - self._onset >= self._max_turn_frames:  # speech, not its pause
            return [self._end_turn(forced=True)]
        return []

    def _end_turn(self, *, forced: bool) -> TurnEnded:
        end = self._n_fed - self._n_silent  # first silent frame: the exclusive end of speech
        keep = min(len(self._turn), end + self._post_roll_frames - self._turn_first)
        audio = np.concatenate(self._turn[:keep])
        self._free_from = self._turn_first + keep
        self._state, self._turn, self._n_silent = "silent", [], 0
        return TurnEnded(audio, self._onset * FRAME_S, end * FRAME_S, self._turn_first * FRAME_S, forced)


def detect_turns(
    frames: Iterable[np.ndarray], config: VadConfig | None = None, scorer: SpeechScorer | None = None
) -> Iterator[VadEvent]:
    """The events of a whole frame stream (a `FileSource`, a `MicSource`), flushed at its end."""
    detector = TurnDetector(config, scorer)
    for frame in frames:
        yield from detector.feed(frame)
    yield from detector.flush()


def barge_in(event: VadEvent, sink: AudioSink) -> bool:
    """Stop `sink` if `event` is the user starting to speak while it plays; True if it interrupted.

    The conversation loop calls this for every detector event while an answer is being spoken. Echo of our
    own voice from the speaker into the microphone triggers it too: use headphones, or a device with echo
    cancellation, for spoken conversations.
    """
    if isinstance(event, SpeechStarted) and sink.playing:
        sink.stop()
        log.debug("barge-in at %.2f s: playback stopped", event.t_s)
        return True
    return False


def _n_frames(seconds: float) -> int:
    """Whole frames in `seconds`, rounded to the nearest (0.7 s -> 22 frames = 0.704 s)."""
    return round(seconds / FRAME_S)

"""Speech out in OpenAI's shapes: the engine's `TextDelta` / `AudioChunk` events -> `message.audio` and
streamed `delta.audio` objects, and the store that lets a later request name an earlier spoken answer.

    request = AudioRequest.from_request(body["audio"], stream=True)     # voice and format, checked
    answer = SpokenAnswer(store, request.format)
    for event in engine.respond(...):
        if isinstance(event, TextDelta):
            answer.on_text(event.text)
        elif isinstance(event, AudioChunk):
            delta = answer.on_audio(event)           # streamed: `choices[0].delta.audio`, sent at once
    deltas = answer.finish()                          # streamed: the rest, ending with the `expires_at` marker
    audio = answer.message_audio()                    # not streamed: `choices[0].message.audio`

Streamed audio is what OpenAI streams: base64 pcm16 (little-endian 16-bit mono) at 24 kHz, resampled from
the vocoder's 16 kHz by one soxr stream across the whole answer, so the deltas joined are the answer's audio
resampled at once (`pcm16` of `message_audio`). OpenAI's delta sequence is followed: the first audio delta
carries the answer's `id`, every delta its `data` and the `transcript` of the same span (the answer text
generated since the previous audio delta: the transcripts join to the answer text), and a final delta
carries only `expires_at`. SDK helpers that accumulate deltas join strings, so each delta's `data` holds a
multiple of 3 bytes (of 3 samples: at most 2 samples, 83 µs, wait for the next delta) and the joined base64
decodes as one.

Lyra speaks with one voice, its unit vocoder's speaker: every OpenAI voice name (`VOICES`) is accepted and
speaks with it, so clients written for OpenAI work unchanged; any other name is refused.
"""

from __future__ import annotations

import base64
import io
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lyra_cli.serve.errors import ApiError

if TYPE_CHECKING:
    import numpy as np

    from lyra_cli.engine import AudioChunk

STREAM_RATE_HZ = 24_000  # the rate OpenAI streams pcm16 at, and its clients play it at
STREAM_FORMAT = "pcm16"  # the only format OpenAI streams
PCM16_BYTES = 2
DELTA_ALIGN_SAMPLES = 3  # 3 samples = 6 bytes: base64 of each delta ends without padding
RESAMPLE_QUALITY = "HQ"  # soxr's, as the speech front end uses (`lyra_cli.audio.io.RESAMPLE_QUALITY`)
# OpenAI's voice names: all speak with Lyra's one voice; `lyra` names it directly
VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse", "marin",
          "cedar", "lyra")  # fmt: skip
DEFAULT_FORMAT = "wav"
SAMPLE_RATE_FALLBACK_HZ = 16_000  # an answer without any audio: an empty file at the vocoder's usual rate
AUDIO_ID_PREFIX = "audio_"
DEFAULT_TTL_S = 3600  # how long an answer can be named by a later request (OpenAI keeps them about an hour)
DEFAULT_MAX_ANSWERS = 1024  # the oldest are forgotten beyond this (each holds only its transcript)


# ---------------------------------------------------------------------------------------------------------
# Formats: samples -> file bytes


def _soundfile(kind: str) -> Callable[[np.ndarray, int], bytes]:
    def write(samples: np.ndarray, rate_hz: int) -> bytes:
        import soundfile

        buffer = io.BytesIO()
        soundfile.write(buffer, samples, rate_hz, format=kind, subtype="PCM_16")
        return buffer.getvalue()

    return write


def _ffmpeg(container: str, codec: str) -> Callable[[np.ndarray, int], bytes]:
    def write(samples: np.ndarray, rate_hz: int) -> bytes:
        import av
        import numpy as np

        buffer = io.BytesIO()
        with av.open(buffer, "w", format=container) as out:
            stream = out.add_stream(codec, rate=rate_hz, layout="mono")
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples, dtype=np.float32)[None], format="flt",
                                               layout="mono")  # fmt: skip
            frame.sample_rate = rate_hz
            for packet in [*stream.encode(frame), *stream.encode(None)]:  # PyAV cuts the codec's frame sizes
                out.mux(packet)
        return buffer.getvalue()

    return write


def pcm16(samples: np.ndarray, rate_hz: int) -> bytes:
    """Raw little-endian 16-bit mono at 24 kHz (OpenAI's `pcm16`), resampled from `rate_hz` at once."""
    import soxr

    resampled = samples if rate_hz == STREAM_RATE_HZ else soxr.resample(samples, rate_hz, STREAM_RATE_HZ,
                                                                         quality=RESAMPLE_QUALITY)  # fmt: skip
    return to_pcm16(resampled)


def to_pcm16(samples: np.ndarray) -> bytes:
    """float32 in [-1, 1] -> little-endian int16 bytes (clipped, rounded to nearest)."""
    import numpy as np

    return (np.clip(np.rint(samples * 32767.0), -32768, 32767).astype("<i2")).tobytes()


# format -> writer(samples at the vocoder's rate, that rate) -> the file's bytes. wav and flac keep the
# vocoder's 16 kHz (what `lyra chat --speak` writes); mp3 (LAME), opus (in Ogg) and aac (ADTS, with the
# codec's usual 1,024 priming samples) are encoded by PyAV's bundled FFmpeg.
FORMATS: dict[str, Callable[[np.ndarray, int], bytes]] = {
    "wav": _soundfile("WAV"),
    "flac": _soundfile("FLAC"),
    "pcm16": pcm16,
    "mp3": _ffmpeg("mp3", "libmp3lame"),
    "opus": _ffmpeg("ogg", "libopus"),
    "aac": _ffmpeg("adts", "aac"),
}


def encode_audio(samples: np.ndarray, rate_hz: int, audio_format: str) -> bytes:
    """Mono float32 `samples` (n,) at `rate_hz` as a file of `audio_format` (a key of `FORMATS`)."""
    return FORMATS[audio_format](samples, rate_hz)


# ---------------------------------------------------------------------------------------------------------
# The request's `audio` object


@dataclass(frozen=True)
class AudioRequest:
    """A request's `audio: {"voice", "format"}`, checked: `voice` one of `VOICES` (all Lyra's one voice),
    `format` one of `FORMATS`; a streamed request must ask for `pcm16`, as OpenAI requires."""

    voice: str = "alloy"
    format: str = DEFAULT_FORMAT

    @classmethod
    def from_request(cls, audio: Mapping[str, Any] | None, *, stream: bool, param: str = "audio") -> AudioRequest:
        audio = {} if audio is None else audio
        if not isinstance(audio, Mapping):
            raise ApiError(400, f"`{param}` must be an object with `voice` and `format`", param=param)
        voice = audio.get("voice", "alloy")
        if voice not in VOICES:
            raise ApiError(400, f"`{param}.voice` is `{voice}`; Lyra has one voice, which each of these names "
                                f"speaks with: {_listed(VOICES)}", param=f"{param}.voice")  # fmt: skip
        audio_format = audio.get("format", STREAM_FORMAT if stream else DEFAULT_FORMAT)
        if audio_format not in FORMATS:
            raise ApiError(400, f"`{param}.format` is `{audio_format}`; lyra writes {_listed(list(FORMATS))}",
                           param=f"{param}.format")  # fmt: skip
        if stream and audio_format != STREAM_FORMAT:
            raise ApiError(400, f"streamed audio is `{STREAM_FORMAT}` (24 kHz, as OpenAI streams it); "
                                f"`{param}.format` is `{audio_format}`", param=f"{param}.format")  # fmt: skip
        return cls(voice, audio_format)


def _listed(names: tuple[str, ...] | list[str]) -> str:
    return ", ".join(f"`{n}`" for n in names)


# ---------------------------------------------------------------------------------------------------------
# Earlier answers, by id


class AudioStore:
    """Each spoken answer's id -> its transcript, for `max_answers` answers and `ttl_s` seconds each, so
    that a later request's `{"role": "assistant", "audio": {"id": ...}}` stands for that answer's text.
    Thread-safe; `clock` (unix seconds) is replaceable for tests."""

    def __init__(self, ttl_s: float = DEFAULT_TTL_S, max_answers: int = DEFAULT_MAX_ANSWERS,
                 clock: Callable[[], float] = time.time) -> None:  # fmt: skip
        self.ttl_s = ttl_s
        self.max_answers = max_answers
        self.clock = clock
        self._answers: OrderedDict[str, tuple[str, float]] = OrderedDict()  # id -> (transcript, expires_at)
        self._lock = threading.Lock()

    def new_id(self) -> str:
        """A fresh id no client can guess (it names another client's answer otherwise)."""
        return AUDIO_ID_PREFIX + secrets.token_hex(12)

    def put(self, audio_id: str, transcript: str) -> int:
        """Keep an answer; returns its `expires_at` (unix seconds)."""
        expires_at = int(self.clock() + self.ttl_s)
        with self._lock:
            self._answers[audio_id] = (transcript, expires_at)
            self._answers.move_to_end(audio_id)
            self._forget(self.clock())
        return expires_at

    def transcript(self, audio_id: Any, *, param: str) -> str:
        """The transcript of answer `audio_id`; 400 naming `param` when it is unknown or has expired."""
        with self._lock:
            self._forget(self.clock())
            found = self._answers.get(audio_id) if isinstance(audio_id, str) else None
        if found is None:
            raise ApiError(400, f"`{param}` names no answer this server still holds (`{audio_id}`): answers are "
                                f"kept {self.ttl_s / 60:g} minutes, and only the last {self.max_answers:,}",
                           param=param, code="audio_not_found")  # fmt: skip
        return found[0]

    def _forget(self, now: float) -> None:
        while len(self._answers) > self.max_answers:
            self._answers.popitem(last=False)
        for audio_id in [i for i, (_, expires_at) in self._answers.items() if expires_at <= now]:
            del self._answers[audio_id]

    def __len__(self) -> int:
        return len(self._answers)


# ---------------------------------------------------------------------------------------------------------
# One spoken answer


class SpokenAnswer:
    """Fed one answer's events in order; gives OpenAI's streamed `delta.audio` objects as audio arrives and
    its `message.audio` at the end. No HTTP in it: the server wraps the objects in chunks and responses."""

    def __init__(self, store: AudioStore, audio_format: str = DEFAULT_FORMAT) -> None:
        if audio_format not in FORMATS:
            raise ValueError(f"unknown audio format {audio_format!r}; valid: {', '.join(FORMATS)}")
        self.store = store
        self.format = audio_format
        self.id = store.new_id()
        self.text: list[str] = []  # every text delta
        self._unspoken = 0  # text deltas not yet carried by an audio delta
        self._chunks: list[np.ndarray] = []  # the answer's audio at the vocoder's rate
        self.rate_hz: int | None = None
        self._resampler: Any = None  # one soxr stream to 24 kHz across the answer (streamed deltas)
        self._held = b""  # pcm16 bytes waiting to make a multiple of DELTA_ALIGN_SAMPLES samples
        self._sent_id = False
        self.expires_at: int | None = None

    @property
    def transcript(self) -> str:
        """The answer text as the engine's `Done.text` gives it (no surrounding whitespace)."""
        return "".join(self.text).strip()

    def on_text(self, text: str) -> None:
        """Answer text (a `TextDelta`'s): carried as `transcript` by the next audio delta."""
        self.text.append(text)
        self._unspoken += 1

    def on_audio(self, chunk: AudioChunk) -> dict[str, Any] | None:
        """The streamed `delta.audio` for this chunk (pcm16 at 24 kHz), or None when it completes no sample."""
        import numpy as np

        if self.rate_hz is None:
            self._start(chunk.sample_rate_hz)
        elif chunk.sample_rate_hz != self.rate_hz:
            raise ValueError(f"audio chunks at {chunk.sample_rate_hz} Hz after {self.rate_hz} Hz")
        samples = np.ascontiguousarray(chunk.samples, dtype=np.float32)
        self._chunks.append(samples)
        resampled = self._resampler.resample_chunk(samples, last=False)
        return self._delta(to_pcm16(resampled), final=False)

    def finish(self) -> list[dict[str, Any]]:
        """The streamed deltas left once the answer ends: its last samples and text (if any), then OpenAI's
        final `{"expires_at"}`. Keeps the answer in the store."""
        deltas = []
        if self._resampler is not None:
            tail = self._delta(to_pcm16(self._resampler.resample_chunk(_empty(), last=True)), final=True)
            deltas += [tail] if tail is not None else []
        if not self._sent_id or self._unspoken:  # no audio at all, or text after the last audio
            deltas.append(self._delta(b"", final=True, force=True))
        return [*deltas, {"expires_at": self._keep()}]

    def message_audio(self) -> dict[str, Any]:
        """`choices[0].message.audio` of the whole answer: `{id, data, expires_at, transcript}`, `data` the
        base64 of a file in the requested format. Keeps the answer in the store."""
        data = encode_audio(self.samples, self.rate_hz or SAMPLE_RATE_FALLBACK_HZ, self.format)
        return {"id": self.id, "data": base64.b64encode(data).decode("ascii"), "expires_at": self._keep(),
                "transcript": self.transcript}  # fmt: skip

    @property
    def samples(self) -> np.ndarray:
        """The answer's audio so far at the vocoder's rate (n,) float32."""
        import numpy as np

        return np.concatenate(self._chunks) if self._chunks else _empty()

    def _start(self, rate_hz: int) -> None:
        import soxr

        self.rate_hz = rate_hz
        self._resampler = soxr.ResampleStream(rate_hz, STREAM_RATE_HZ, 1, dtype="float32", quality=RESAMPLE_QUALITY)

    def _delta(self, pcm: bytes, *, final: bool, force: bool = False) -> dict[str, Any] | None:
        pcm = self._held + pcm
        cut = len(pcm) if final else len(pcm) - len(pcm) % (DELTA_ALIGN_SAMPLES * PCM16_BYTES)
        pcm, self._held = pcm[:cut], pcm[cut:]
        if not pcm and not force:
            return None
        delta: dict[str, Any] = {} if self._sent_id else {"id": self.id}
        self._sent_id = True
        delta["data"] = base64.b64encode(pcm).decode("ascii")
        delta["transcript"] = "".join(self.text[len(self.text) - self._unspoken :]) if self._unspoken else ""
        self._unspoken = 0
        return delta

    def _keep(self) -> int:
        if self.expires_at is None:
            self.expires_at = self.store.put(self.id, self.transcript)
        return self.expires_at


def _empty() -> np.ndarray:
    import numpy as np

    return np.zeros(0, dtype=np.float32)

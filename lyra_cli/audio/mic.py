"""Where spoken turns come from: the microphone, or a recording fed as if spoken.

Both sources yield float32 mono 16 kHz frames of shape (FRAME_SAMPLES,) = 32 ms, the window silero-vad
scores, so frames go straight into `TurnDetector.feed`:

    MicSource:  sounddevice InputStream at the device's own rate -> callback copies each block into a
                bounded queue (never blocks PortAudio's thread) -> iterator: soxr ResampleStream to 16 kHz
                -> fixed frames
    FileSource: lyra_cli.audio.io.open_audio_stream (any format, 16 kHz) -> fixed frames -> trailing silence,
                optionally paced at wall-clock speed (realtime=True) as a microphone would deliver them
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from lyra_cli.audio.frontend import AudioFrontEnd
from lyra_cli.audio.io import RESAMPLE_QUALITY, SAMPLE_RATE_HZ
from lyra_cli.audio.playback import PCM16_SCALE, device_error, import_sounddevice, pick_device, release_stream
from lyra_cli.audio.vad import FRAME_S, FRAME_SAMPLES

log = logging.getLogger(__name__)

TRAILING_SILENCE_S = 1.5  # after a recording: longer than any sensible end-of-turn silence, so its last turn ends
MAX_QUEUED_S = 60.0  # microphone audio held while the consumer is busy; beyond this, new audio is dropped
POLL_S = 0.1  # a waiting iterator wakes this often to notice `close()` from another thread
# 16-bit capture: what microphones deliver, so no host-side conversion, and int16 / 32768 gives exactly the
# floats that decoding the same samples from a file gives. (Float capture through ALSA's `plug` conversion
# also skipped whole periods with the ALSA file plugin used in our tests.)
CAPTURE_DTYPE = "int16"


class AudioSource(Protocol):
    """An iterable of (FRAME_SAMPLES,) float32 mono 16 kHz frames; `close()` releases it (idempotent)."""

    def __iter__(self) -> Iterator[np.ndarray]: ...

    def close(self) -> None: ...


class _Framer:
    """Recuts blocks of any length into (FRAME_SAMPLES,) frames; `flush` zero-pads the rest into one more."""

    def __init__(self) -> None:
        self._pending = np.zeros(0, np.float32)

    def push(self, block: np.ndarray) -> list[np.ndarray]:
        joined = np.concatenate([self._pending, block]) if self._pending.size else block
        n_full = joined.shape[0] // FRAME_SAMPLES * FRAME_SAMPLES
        self._pending = joined[n_full:]
        return [joined[start : start + FRAME_SAMPLES] for start in range(0, n_full, FRAME_SAMPLES)]

    def flush(self) -> np.ndarray | None:
        if self._pending.size == 0:
            return None
        frame = np.zeros(FRAME_SAMPLES, np.float32)
        frame[: self._pending.shape[0]] = self._pending
        self._pending = np.zeros(0, np.float32)
        return frame


# ---------------------------------------------------------------------------------------------------------
# A recording
# ---------------------------------------------------------------------------------------------------------


class FileSource:
    """`--input-file`: a recording (any format `load_audio` reads) fed frame by frame as if spoken.

    `front_end` decodes it (`--official-audio`: the authors' channel 0 and sinc resampling).
    Raises `InputError` here for a missing or undecodable file. `trailing_silence_s` of zeros follow the
    recording so that a turn running to its very end is closed by the detector's end-of-turn silence.
    With `realtime`, frame k is yielded no earlier than (k + 1) * 32 ms after iteration began.
    """

    def __init__(
        self, path: str | Path, *, realtime: bool = False, trailing_silence_s: float = TRAILING_SILENCE_S,
        front_end: AudioFrontEnd = AudioFrontEnd(),
    ) -> None:
        self._stream = front_end.open_stream(path)
        self.path = self._stream.source
        self.realtime = realtime
        self._n_silence_frames = math.ceil(trailing_silence_s / FRAME_S)
        self._closed = threading.Event()  # also what a paced iterator sleeps on, so close() wakes it
        self.n_frames = 0

    @property
    def position_s(self) -> float:
        return self.n_frames * FRAME_S

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def __iter__(self) -> Iterator[np.ndarray]:
        start = time.monotonic()
        for frame in self._frames():
            if self.realtime and self._closed.wait(max(0.0, start + (self.n_frames + 1) * FRAME_S - time.monotonic())):
                return
            if self._closed.is_set():
                return
            self.n_frames += 1
            yield frame

    def _frames(self) -> Iterator[np.ndarray]:
        framer = _Framer()
        for block in self._stream:
            yield from framer.push(block)
        last = framer.flush()
        if last is not None:
            yield last
        for _ in range(self._n_silence_frames):
            yield np.zeros(FRAME_SAMPLES, np.float32)

    def close(self) -> None:
        """Stop iteration at the next frame and release the file. Idempotent, safe from any thread."""
        self._closed.set()
        # ValueError: another thread is decoding right now; it drops the stream when it sees the flag
        with contextlib.suppress(ValueError):
            self._stream.close()

    def __enter__(self) -> FileSource:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------------
# The microphone
# ---------------------------------------------------------------------------------------------------------


class MicSource:
    """`--mic`: a sounddevice `InputStream`, capturing from construction until `close()`.

    `device` is an index, part of a name, or None for the default (see `pick_device`). The stream runs at
    `sample_rate_hz`, by default the device's own rate (a rate the hardware really runs at, so no converter
    of unknown quality sits in between), in 16-bit samples, and is resampled here to 16 kHz with soxr.
    Each callback block is one frame's duration. If the consumer falls `max_queued_s` behind, newer audio is dropped and counted
    (`dropped_s`) rather than blocking PortAudio's thread.
    """

    def __init__(
        self,
        device: int | str | None = None,
        *,
        sample_rate_hz: int | None = None,
        max_queued_s: float = MAX_QUEUED_S,
    ) -> None:
        sd = import_sounddevice()
        index = pick_device(None if device is None else str(device), "input")
        self.sample_rate_hz = sample_rate_hz or int(sd.query_devices(index, "input")["default_samplerate"])
        block_frames = max(1, round(self.sample_rate_hz * FRAME_S))
        # int16 (block_frames,) blocks, one per callback; None ends iteration
        self._queue: queue.Queue[np.ndarray | None] = queue.Queue(maxsize=max(1, math.ceil(max_queued_s / FRAME_S)))
        self._n_dropped = 0  # input samples dropped because the queue was full
        self._n_overflows = 0  # blocks PortAudio reported as overflowed (the device lost audio)
        self._callback_error: BaseException | None = None
        self._closed = False
        try:
            self._stream = sd.InputStream(
                device=index,
                samplerate=self.sample_rate_hz,
                channels=1,
                dtype=CAPTURE_DTYPE,
                blocksize=block_frames,
                callback=self._callback,
            )
            self._stream.start()
        except sd.PortAudioError as err:
            raise device_error("input", device, err) from err
        log.debug("microphone: device %s at %d Hz, blocks of %d", index, self.sample_rate_hz, block_frames)

    @property
    def dropped_s(self) -> float:
        return self._n_dropped / self.sample_rate_hz

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def stream(self) -> Any:
        """The sounddevice stream (`.active`, `.closed`, `.latency`), for diagnostics."""
        return self._stream

    def __iter__(self) -> Iterator[np.ndarray]:
        framer = _Framer()
        resampler = _to_16k(self.sample_rate_hz)
        while True:
            try:
                block = self._queue.get(timeout=POLL_S)
            except queue.Empty:
                if self._closed:
                    return
                continue
            if block is None:  # close() was called
                return
            block = block.astype(np.float32) / PCM16_SCALE
            if resampler is not None:
                block = resampler.resample_chunk(block)
            yield from framer.push(block)

    def close(self) -> None:
        """Stop capturing now (buffered input is dropped) and end iteration. Idempotent, safe from any thread."""
        if self._closed:
            return
        self._closed = True
        try:
            release_stream(self._stream)  # the callback drops what arrives meanwhile: _closed is set
        finally:
            self._wake_iterator()
        if self._n_dropped:
            log.warning("microphone: %.1f s of audio dropped: it was not read fast enough", self.dropped_s)
        if self._n_overflows:
            log.warning("microphone: the device lost audio %d times (input overflow)", self._n_overflows)
        if self._callback_error is not None:
            log.warning("microphone: the audio callback failed (%r)", self._callback_error)

    def __enter__(self) -> MicSource:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _wake_iterator(self) -> None:
        while True:
            try:
                self._queue.put_nowait(None)
                return
            except queue.Full:  # make room: what is queued is being thrown away anyway
                with contextlib.suppress(queue.Empty):
                    self._queue.get_nowait()

    def _callback(self, indata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        # Runs on PortAudio's thread: it must neither block nor raise.
        try:
            if status.input_overflow:
                self._n_overflows += 1
            if self._closed:
                return
            self._queue.put_nowait(indata[:, 0].copy())
        except queue.Full:
            self._n_dropped += frames
        except BaseException as err:  # noqa: BLE001 - an escaping exception would end the stream
            if self._callback_error is None:
                self._callback_error = err


def _to_16k(rate_hz: int) -> Any:
    if rate_hz == SAMPLE_RATE_HZ:
        return None
    import soxr

    return soxr.ResampleStream(rate_hz, SAMPLE_RATE_HZ, 1, dtype="float32", quality=RESAMPLE_QUALITY)

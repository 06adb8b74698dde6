"""Where spoken answers go: the speaker, a wav file, or nowhere.

Every sink takes float32 mono 16 kHz samples of shape (n_samples,) through `write`, which never waits for a
device: generation pushes audio as the vocoder makes it and goes on. `SpeakerSink` plays from a thread-safe
queue in PortAudio's callback (through `sounddevice`); the callback hands the device silence when the queue
runs dry and never lets an exception escape (one escaping would stop the stream for good). `stop()` is
barge-in: queued audio is dropped at once and the speaker goes silent within the device's latency.

`list_devices` and `pick_device` resolve `--output-device` / `--input-device` (an index or part of a name);
with no device at all they raise a `LyraError` naming the flags that work without one.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, Protocol

import numpy as np
import soundfile

from lyra_cli.audio.io import RESAMPLE_QUALITY, SAMPLE_RATE_HZ
from lyra_cli.errors import LyraError, MissingDependencyError
from lyra_cli.fileio import write_atomically
from lyra_cli.outputs import LYRA_SOFTWARE_TAG

log = logging.getLogger(__name__)

DeviceKind = Literal["input", "output"]

OUTPUT_LATENCY_S = 0.1  # device buffer: barge-in silences the speaker this fast, and a busy CPU gets 100 ms slack
DRAIN_MARGIN_S = 1.0  # close(wait=True) waits for the queued audio plus this, then gives up on a stuck device
PCM16_SCALE = 32768.0  # float <-> int16 as libsndfile and PortAudio convert: int16 / 32768 reads back exactly

_LIST_HINT = "`lyra listen --list-devices` lists the devices found"  # chat has no such flag: name the command
_NO_DEVICE_HINTS: dict[str, str] = {
    "output": f"pass `--speech-out FILE.wav` to write the spoken answer to a file instead; {_LIST_HINT}",
    "input": f"pass `--input-file FILE` to feed a recording instead of the microphone; {_LIST_HINT}",
}


# ---------------------------------------------------------------------------------------------------------
# The sink interface
# ---------------------------------------------------------------------------------------------------------


class AudioSink(Protocol):
    """Takes (n_samples,) float32 mono 16 kHz audio as it is generated."""

    @property
    def playing(self) -> bool:
        """Audio is queued and not yet handed to the device (False once `stop` or `close` returned)."""
        ...

    @property
    def played_s(self) -> float:
        """Audio handed to the device (or file) so far, in seconds."""
        ...

    def write(self, samples: np.ndarray) -> None:
        """Queue `samples`; returns at once, never waiting for the device."""
        ...

    def stop(self) -> None:
        """Barge-in: drop everything queued; the sink stays open for the next answer."""
        ...

    def close(self, wait: bool = True) -> None:
        """Finish: play (or write) what is queued first if `wait`, else drop it. Idempotent."""
        ...


class PlaybackBuffer:
    """The thread-safe FIFO between the producer (`write`) and a device (`fill`, from its callback).

    Samples are kept as the arrays written (no copy into a ring), with the read offset of the first one.
    `fill` copies what is queued into the device's buffer and zeroes the rest (underflow is silence).
    """

    def __init__(self, sample_rate_hz: int = SAMPLE_RATE_HZ) -> None:
        self.sample_rate_hz = sample_rate_hz
        self._lock = threading.Lock()
        self._chunks: deque[np.ndarray] = deque()
        self._head = 0  # samples of _chunks[0] already played
        self._n_queued = 0
        self._n_played = 0
        self._drained = threading.Event()
        self._drained.set()

    @property
    def playing(self) -> bool:
        return self._n_queued > 0

    @property
    def played_s(self) -> float:
        return self._n_played / self.sample_rate_hz

    @property
    def queued_s(self) -> float:
        return self._n_queued / self.sample_rate_hz

    def write(self, samples: np.ndarray) -> None:
        samples = _mono_float32(samples).copy()  # the caller may reuse its array once we return
        if samples.size == 0:
            return
        with self._lock:
            self._chunks.append(samples)
            self._n_queued += samples.shape[0]
            self._drained.clear()

    def stop(self) -> int:
        """Drop all queued audio; return how many samples were dropped."""
        with self._lock:
            dropped = self._n_queued
            self._chunks.clear()
            self._head = self._n_queued = 0
            self._drained.set()
        return dropped

    def fill(self, out: np.ndarray) -> int:
        """Copy up to len(out) queued samples into `out` (n,), zero the rest; return the samples copied."""
        n_copied = 0
        with self._lock:
            while self._chunks and n_copied < out.shape[0]:
                chunk = self._chunks[0]
                n = min(chunk.shape[0] - self._head, out.shape[0] - n_copied)
                out[n_copied : n_copied + n] = chunk[self._head : self._head + n]
                n_copied += n
                self._head += n
                if self._head == chunk.shape[0]:
                    self._chunks.popleft()
                    self._head = 0
            self._n_queued -= n_copied
            self._n_played += n_copied
            if self._n_queued == 0:
                self._drained.set()
        out[n_copied:] = 0.0
        return n_copied

    def wait_drained(self, timeout_s: float | None = None) -> bool:
        """Block until the queue is empty (True) or `timeout_s` passed (False)."""
        return self._drained.wait(timeout_s)


# ---------------------------------------------------------------------------------------------------------
# The speaker
# ---------------------------------------------------------------------------------------------------------


class SpeakerSink:
    """Plays through a sounddevice `OutputStream`, fed by a callback from a `PlaybackBuffer`.

    `device` is an index, part of a name, or None for the system default (see `pick_device`). The stream
    runs at 16 kHz when the device takes it (PortAudio or the sound server converts), else at the device's
    own rate, resampled here with soxr. Use it as a context manager, or call `close`.
    """

    def __init__(self, device: int | str | None = None, *, latency_s: float = OUTPUT_LATENCY_S) -> None:
        sd = import_sounddevice()
        index = pick_device(None if device is None else str(device), "output")
        rate_hz = _stream_rate_hz(sd, index, "output")
        self._buffer = PlaybackBuffer(rate_hz)
        self._resampler = _resampler(rate_hz)
        self._write_lock = threading.Lock()  # write (generation) and stop (barge-in) may come from two threads
        self._callback_error: BaseException | None = None
        self._closed = False
        try:
            self._stream = sd.OutputStream(
                device=index,
                samplerate=rate_hz,
                channels=1,
                dtype="float32",
                latency=latency_s,
                callback=self._callback,
            )
            self._stream.start()
        except sd.PortAudioError as err:
            raise device_error("output", device, err) from err
        log.debug("speaker: device %s at %d Hz, latency %.3f s", index, rate_hz, self._stream.latency)

    @property
    def playing(self) -> bool:
        return self._buffer.playing

    @property
    def played_s(self) -> float:
        return self._buffer.played_s

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def stream(self) -> Any:
        """The sounddevice stream (`.active`, `.closed`, `.latency`), for diagnostics."""
        return self._stream

    def write(self, samples: np.ndarray) -> None:
        if self._closed:
            raise RuntimeError("write to a closed SpeakerSink")
        samples = _mono_float32(samples)
        with self._write_lock:
            if self._resampler is not None:
                samples = self._resampler.resample_chunk(samples)
            self._buffer.write(samples)

    def stop(self) -> None:
        """Drop what is queued now; the caller stops feeding the interrupted answer."""
        with self._write_lock:
            dropped = self._buffer.stop()
            if self._resampler is not None:
                self._resampler.clear()  # its tail belongs to the interrupted answer
        log.debug("speaker: stopped, %.2f s of queued audio dropped", dropped / self._buffer.sample_rate_hz)

    def close(self, wait: bool = True) -> None:
        """Play out the queue first if `wait` (bounded by its length), then release the device.

        Safe to interrupt (Ctrl-C while waiting drops the queue instead of draining it) and to call twice.
        """
        if self._closed:
            return
        self._closed = True
        try:
            if wait and not self._buffer.wait_drained(self._buffer.queued_s + DRAIN_MARGIN_S):
                log.warning("speaker: the device stopped taking audio; the rest of the answer was dropped")
        finally:
            self._buffer.stop()  # from here the callback hands the device silence
            release_stream(self._stream)
            if self._callback_error is not None:
                log.warning("speaker: the audio callback failed (%r); it played silence instead", self._callback_error)

    def __enter__(self) -> SpeakerSink:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        self.close(wait=exc_type is None)

    def _callback(self, outdata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        # Runs on PortAudio's thread: an exception escaping here would end the stream, so none may.
        try:
            self._buffer.fill(outdata[:, 0])
        except BaseException as err:  # noqa: BLE001 - see above
            outdata.fill(0)
            if self._callback_error is None:
                self._callback_error = err


def release_stream(stream: Any) -> None:
    """Stop a sounddevice stream whose callback is Python, then close it.

    Never `abort()`: on Linux PortAudio aborts by `pthread_cancel`-ing its callback thread, and a thread
    cancelled while it waits for the GIL dies holding the GIL's mutex, which hangs the process for good (seen
    on Ctrl-C with a microphone and a speaker open). `stop()` asks the thread to finish its current buffer and
    joins it; `close()` of an active stream would abort it, hence stop first.
    """
    try:
        stream.stop()
    finally:
        stream.close()


# ---------------------------------------------------------------------------------------------------------
# A wav file, written atomically
# ---------------------------------------------------------------------------------------------------------


class WavWriter:
    """Collects the answer's samples and writes `path` (16-bit PCM, 16 kHz, mono) at `close`, atomically.

    The file is written to a temporary name in the same folder and renamed over `path` (`os.replace`), so
    `path` is either absent or complete: an error or Ctrl-C during the write removes the temporary file, and
    `abort()` (or leaving a `with` block by an exception) writes nothing. Also an `AudioSink` (`--speech-out`):
    never `playing`, and `stop` keeps what was written, like a recording of an interrupted answer.
    """

    playing = False

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        if not self.path.parent.is_dir():
            raise LyraError(
                f"cannot write `{self.path}`: the folder `{self.path.parent}` does not exist",
                "create the folder first, or pass a path in an existing one",
            )
        self._blocks: list[np.ndarray] = []  # int16 (n,) each: half the memory of float32
        self._n_samples = 0
        self.closed = False

    @property
    def played_s(self) -> float:
        return self._n_samples / SAMPLE_RATE_HZ

    def write(self, samples: np.ndarray) -> None:
        if self.closed:
            raise RuntimeError(f"write to a closed WavWriter ({self.path})")
        pcm = float_to_pcm16(_mono_float32(samples))
        self._blocks.append(pcm)
        self._n_samples += pcm.shape[0]

    def stop(self) -> None:
        """A file keeps what was generated: barge-in silences the speaker, not the record."""

    def close(self, wait: bool = True) -> None:
        """Write the file (all samples so far). Idempotent; after `abort`, does nothing."""
        if self.closed:
            return
        self.closed = True
        pcm = np.concatenate(self._blocks) if self._blocks else np.zeros(0, np.int16)
        self._blocks = []
        _write_wav_atomic(self.path, pcm)

    def abort(self) -> None:
        """Drop the samples; `path` is not created (an existing file there is left as it was)."""
        self.closed = True
        self._blocks = []

    def __enter__(self) -> WavWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _write_wav_atomic(path: Path, pcm: np.ndarray) -> None:
    write_atomically(path, lambda tmp: _write_tagged_wav(tmp, pcm))


def _write_tagged_wav(path: Path, pcm: np.ndarray) -> None:
    """16-bit PCM with `lyra` in the INFO chunk: how a later `--speech-out` knows it may replace this file."""
    with soundfile.SoundFile(path, "w", SAMPLE_RATE_HZ, 1, subtype="PCM_16", format="WAV") as handle:
        handle.software = LYRA_SOFTWARE_TAG
        handle.write(pcm)


def float_to_pcm16(samples: np.ndarray) -> np.ndarray:
    """float32 (n,) nominally in [-1, 1] -> int16 (n,), rounded and clipped (full scale +1.0 clips to 32767)."""
    return np.clip(np.round(samples * PCM16_SCALE), -PCM16_SCALE, PCM16_SCALE - 1).astype(np.int16)


# ---------------------------------------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceInfo:
    """One PortAudio device, as `--list-devices` shows it."""

    index: int
    name: str
    max_input_channels: int
    max_output_channels: int
    default_samplerate: float
    is_default_input: bool
    is_default_output: bool
    hostapi: str = ""

    def channels(self, kind: DeviceKind) -> int:
        return self.max_input_channels if kind == "input" else self.max_output_channels


def import_sounddevice() -> ModuleType:
    """`sounddevice`, imported on first use: it loads PortAudio and scans the devices (slow, may fail)."""
    try:
        import sounddevice
    except ImportError as err:
        raise MissingDependencyError("sounddevice", "speaker and microphone", extra="mic") from err
    except OSError as err:  # the Python package is there but the PortAudio C library is not
        raise LyraError(
            f"the audio library PortAudio could not be loaded ({err})",
            "install it (Debian/Ubuntu: `apt-get install libportaudio2`, macOS: `brew install portaudio`), "
            "or pass `--input-file FILE` / `--speech-out FILE.wav`, which need no audio device",
        ) from err
    return sounddevice


def list_devices() -> list[DeviceInfo]:
    """Every audio device PortAudio finds (none on a machine without a sound card or sound server)."""
    sd = import_sounddevice()
    default_input, default_output = _default_indices(sd)
    hostapis = [api["name"] for api in sd.query_hostapis()]
    return [
        DeviceInfo(
            index=int(dev["index"]),
            name=str(dev["name"]),
            max_input_channels=int(dev["max_input_channels"]),
            max_output_channels=int(dev["max_output_channels"]),
            default_samplerate=float(dev["default_samplerate"]),
            is_default_input=dev["index"] == default_input,
            is_default_output=dev["index"] == default_output,
            hostapi=hostapis[dev["hostapi"]] if 0 <= dev["hostapi"] < len(hostapis) else "",
        )
        for dev in sd.query_devices()
    ]


def pick_device(spec: str | None, kind: DeviceKind) -> int | None:
    """The device index for `--input-device` / `--output-device`: an index, or part of a name (any case).

    None (no flag) means the system default, returned as None so PortAudio follows it; if the system has no
    default but has devices of `kind`, the first one. Raises `LyraError` when there is no device of `kind`
    at all (naming `--speech-out` / `--input-file` and `--list-devices`), or none matching `spec`.
    """
    capable = [dev for dev in list_devices() if dev.channels(kind) > 0]
    if not capable:
        raise LyraError(f"no audio {kind} device found", _NO_DEVICE_HINTS[kind])
    if spec is None:
        has_default = any(dev.is_default_input if kind == "input" else dev.is_default_output for dev in capable)
        return None if has_default else capable[0].index
    spec = spec.strip()
    if spec.isdigit():
        return _by_index(int(spec), capable, kind)
    return _by_name(spec, capable, kind)


def _by_index(index: int, capable: list[DeviceInfo], kind: DeviceKind) -> int:
    if index not in {dev.index for dev in capable}:
        raise LyraError(f"there is no audio {kind} device `{index}`", _choices_hint(capable))
    return index


def _by_name(spec: str, capable: list[DeviceInfo], kind: DeviceKind) -> int:
    matches = [dev for dev in capable if spec.lower() in dev.name.lower()]
    exact = [dev for dev in matches if dev.name.lower() == spec.lower()]
    if len(exact) == 1 or len(matches) == 1:
        return (exact or matches)[0].index
    if not matches:
        raise LyraError(f"no audio {kind} device matches `{spec}`", _choices_hint(capable))
    names = ", ".join(f"`{dev.name}` ({dev.index})" for dev in matches)
    raise LyraError(f"`{spec}` matches several audio {kind} devices: {names}", "pass the device's index instead")


def _choices_hint(capable: list[DeviceInfo]) -> str:
    listed = ", ".join(f"{dev.index}: `{dev.name}`" for dev in capable[:8])
    more = f" and {len(capable) - 8} more" if len(capable) > 8 else ""
    return f"pass an index or part of a name ({listed}{more}); {_LIST_HINT}"


def _default_indices(sd: ModuleType) -> tuple[int, int]:
    """(input, output) default device indices; -1 where there is none."""
    try:
        default_input, default_output = sd.default.device
    except (TypeError, ValueError):
        return -1, -1
    return int(default_input if default_input is not None else -1), int(
        default_output if default_output is not None else -1
    )


def _stream_rate_hz(sd: ModuleType, device: int | None, kind: DeviceKind) -> int:
    """16 kHz if the device accepts it (no resampling of ours), else its default rate."""
    check = sd.check_input_settings if kind == "input" else sd.check_output_settings
    try:
        check(device=device, channels=1, dtype="float32", samplerate=SAMPLE_RATE_HZ)
        return SAMPLE_RATE_HZ
    except sd.PortAudioError:
        return int(sd.query_devices(device, kind)["default_samplerate"])


def _resampler(rate_hz: int) -> Any:
    """A streaming 16 kHz -> `rate_hz` resampler, or None when the device runs at 16 kHz."""
    if rate_hz == SAMPLE_RATE_HZ:
        return None
    import soxr

    return soxr.ResampleStream(SAMPLE_RATE_HZ, rate_hz, 1, dtype="float32", quality=RESAMPLE_QUALITY)


def device_error(kind: DeviceKind, device: int | str | None, err: Exception) -> LyraError:
    name = "the default" if device is None else f"the `{device}`"
    return LyraError(f"could not open {name} audio {kind} device ({err})", _NO_DEVICE_HINTS[kind])


def _mono_float32(samples: np.ndarray) -> np.ndarray:
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim != 1:
        raise ValueError(f"expected mono samples of shape (n_samples,), got shape {samples.shape}")
    return samples

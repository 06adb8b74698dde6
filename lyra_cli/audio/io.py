"""Decode an audio file (or a video's sound track) to float32 mono at 16 kHz.

libsndfile (through `soundfile`) reads wav, flac and ogg, whose headers state an exact length. FFmpeg
(through PyAV, in-process, no `ffmpeg` binary) reads everything else: mp3, m4a/aac, webm/opus and the sound
tracks of mp4/mov/mkv/webm videos. Both backends yield blocks of frames; `open_audio_stream` mixes each
block to mono and resamples it with soxr's streaming resampler, so hours of audio pass through in bounded
memory. `load_audio` concatenates that same stream: soxr's streamed output is bit-identical to its one-shot
`soxr.resample` (measured on 8-96 kHz inputs and block sizes of 1 to 65,536 frames), so the two cannot drift.
`resampler="sinc"` swaps soxr for the authors' windowed sinc (audio/resample.py), streamed exactly as well.
"""

from __future__ import annotations

import logging
import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import soundfile
import soxr

from lyra_cli.errors import InputError, LyraError
from lyra_cli.inputs import require_input_file

log = logging.getLogger(__name__)

SAMPLE_RATE_HZ = 16_000  # what Whisper's feature extractor, and so Lyra's speech encoder, expects
SILENCE_PEAK = 1e-4  # peak |amplitude| below -80 dBFS: nothing a speech encoder can use
BLOCK_FRAMES = 1 << 16  # frames per libsndfile read (1.5 s at 44.1 kHz); FFmpeg's blocks are its own frames
STREAM_BLOCK_SECONDS = 10.0  # audio per streamed block: few soxr calls, yet only ~2 MB held at 48 kHz stereo
RESAMPLE_QUALITY = "HQ"  # soxr's default; ~1 ms for 5 s of audio, far below any model cost
# Guards on what a header may claim (a damaged one claims anything): outside these the file is refused
# before decoding, rather than resampled from 1 Hz for minutes or read 65,535 channels at a time.
MIN_SAMPLE_RATE_HZ = 1_000  # far below telephone audio (8 kHz); lower rates hold no speech
MAX_SAMPLE_RATE_HZ = 768_000  # the highest rate audio interfaces record at
MAX_CHANNELS = 64  # FFmpeg's channel layouts stop here; beyond, a header field is damaged
# Float formats may exceed full scale a little; samples past 16 (+24 dBFS) are integer values stored as
# float or garbage, and would dominate the log-mel features. Integer formats cannot exceed 1.
MAX_SAMPLE_PEAK = 16.0

ChannelMix = Literal["mean", "first"]
Resampler = Literal["soxr", "sinc"]  # ours (soxr HQ) or the authors' (torchaudio's default sinc: audio/resample.py)
_CHANNEL_MIXERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    # float64: the mean of float32 samples near their maximum overflows to inf in float32
    "mean": lambda block: block.mean(axis=1, dtype=np.float64),  # ours: no channel is thrown away
    "first": lambda block: block[:, 0],  # the authors' `wav[0]`
}
_FORMATS = "wav, flac, ogg, mp3, m4a, webm, or a video with sound"
_CHECK_FILE_HINT = f"check that it is an audio file ({_FORMATS}) and complete; `ffmpeg -i FILE` shows what it holds"


@dataclass
class AudioStream:
    """Mono float32 blocks of shape (n_samples,) at `sample_rate_hz`, decoded lazily from `source`.

    Iterate it once (`for block in stream`). `duration_s` comes from the file's header or container without
    decoding (None when the file does not say; an estimate for mp3 without a Xing header, the header's claim
    for a truncated wav); `position_s` counts the audio yielded so far, for progress in audio time.
    Errors found only by decoding (damaged data, NaN samples, zero samples) are raised while iterating.
    """

    source: Path
    duration_s: float | None
    blocks: Iterator[np.ndarray] = field(repr=False)
    sample_rate_hz: int = SAMPLE_RATE_HZ
    n_samples_read: int = 0

    def __iter__(self) -> Iterator[np.ndarray]:
        for block in self.blocks:
            self.n_samples_read += block.shape[0]
            yield block

    @property
    def position_s(self) -> float:
        return self.n_samples_read / self.sample_rate_hz

    def close(self) -> None:
        """Release the file now rather than when the stream is garbage-collected."""
        close = getattr(self.blocks, "close", None)
        if close is not None:
            close()


def open_audio_stream(
    path: str | Path,
    *,
    channel_mix: ChannelMix = "mean",
    resampler: Resampler = "soxr",
    block_seconds: float = STREAM_BLOCK_SECONDS,
    sample_rate_hz: int = SAMPLE_RATE_HZ,
) -> AudioStream:
    """Open `path` for streaming: blocks of about `block_seconds` of mono float32 at `sample_rate_hz`.

    Raises `InputError` here, before any block, for a missing path, a directory, a file that is not audio
    and a video without a sound track. Holds about one block (at the native rate) at a time.
    """
    mix = _channel_mixer(channel_mix)
    if resampler not in _RESAMPLERS:
        raise ValueError(f"unknown resampler {resampler!r}; valid: {', '.join(_RESAMPLERS)}")
    if sample_rate_hz <= 0:
        raise ValueError(f"sample_rate_hz must be positive, got {sample_rate_hz}")
    if not block_seconds > 0:
        raise ValueError(f"block_seconds must be positive, got {block_seconds}")
    path = require_input_file(path, "audio")
    try:
        decoder = _open_decoder(path)
    except _decode_errors() as err:  # a damaged header that neither backend reports as one
        raise _undecodable(path, err) from err
    _check_format(path, decoder.native_rate_hz, decoder.n_channels)
    block_frames = max(1, round(block_seconds * decoder.native_rate_hz))
    mono_blocks = _mono_blocks(_translated(decoder.blocks, path), mix, block_frames, path)
    blocks = _RESAMPLERS[resampler](mono_blocks, decoder.native_rate_hz, sample_rate_hz, path)
    return AudioStream(path, decoder.duration_s, blocks, sample_rate_hz)


def load_audio(
    path: str | Path,
    *,
    channel_mix: ChannelMix = "mean",
    resampler: Resampler = "soxr",
    sample_rate_hz: int = SAMPLE_RATE_HZ,
) -> np.ndarray:
    """Decode `path` to mono float32 of shape (n_samples,) at `sample_rate_hz`, values nominally in [-1, 1].

    Raises `InputError` for a missing path, a directory, a file that is not (decodable) audio, a video
    without a sound track, and audio with zero samples. The concatenation of `open_audio_stream`'s blocks.
    """
    stream = open_audio_stream(path, channel_mix=channel_mix, resampler=resampler, sample_rate_hz=sample_rate_hz)
    return np.concatenate(list(stream))


def require_speech(wav: np.ndarray, path: str | Path) -> None:
    """Raise `InputError` if `wav` (n_samples,) is empty or silent (peak below `SILENCE_PEAK`)."""
    if wav.size == 0:
        raise _empty_audio(path)
    peak = float(np.abs(wav).max())
    if not peak >= SILENCE_PEAK:  # written this way round so that NaN counts as silent too
        raise InputError(
            f"`{path}` is silent: its peak amplitude `{peak:.1e}` is below `{SILENCE_PEAK:.0e}`",
            "check the recording: the microphone may have been muted, or the file holds only silence",
        )


def audio_duration_s(wav: np.ndarray, sample_rate_hz: int = SAMPLE_RATE_HZ) -> float:
    """Duration in seconds of `wav` (n_samples,) at `sample_rate_hz`."""
    return wav.shape[-1] / sample_rate_hz


# ---------------------------------------------------------------------------------------------------------
# Decoding: (native sample rate, iterator of float32 blocks of shape (n_frames, n_channels))
# ---------------------------------------------------------------------------------------------------------


@dataclass
class _Decoder:
    native_rate_hz: int
    n_channels: int
    duration_s: float | None  # from metadata, without decoding
    blocks: Iterator[np.ndarray]  # float32 (n_frames, n_channels)


def _decode_blocks(path: Path) -> tuple[int, Iterator[np.ndarray]]:
    """Open `path` with the backend that reads it exactly; return its sample rate and its blocks."""
    decoder = _open_decoder(path)
    return decoder.native_rate_hz, decoder.blocks


def _open_decoder(path: Path) -> _Decoder:
    try:
        sound_file = soundfile.SoundFile(path)
    except RuntimeError:  # libsndfile does not know the format (mp4, m4a, webm, ...) or it is not audio
        return _open_pyav(path)
    if sound_file.format == "MP3":
        # libsndfile stops mp3 at an *estimated* frame count: a VBR file without a Xing header (or two
        # concatenated mp3s) is silently cut short. FFmpeg decodes to the real end.
        sound_file.close()
        return _open_pyav(path)
    log.debug("decoding %s with libsndfile (%s, %d Hz)", path, sound_file.format, sound_file.samplerate)
    duration_s = sound_file.frames / sound_file.samplerate if sound_file.frames > 0 else None
    return _Decoder(sound_file.samplerate, sound_file.channels, duration_s, _soundfile_blocks(sound_file, path))


def _soundfile_blocks(sound_file: soundfile.SoundFile, path: Path) -> Iterator[np.ndarray]:
    # read() until it returns nothing, rather than SoundFile.blocks(): blocks() trusts the header's frame
    # count and pads a short final read with whatever was left in its buffer.
    with sound_file:
        while True:
            try:
                block = sound_file.read(BLOCK_FRAMES, dtype="float32", always_2d=True)
            except RuntimeError as err:
                raise _undecodable(path, err) from err
            if len(block) == 0:
                return
            yield block


def _open_pyav(path: Path) -> _Decoder:
    import av  # imported here: FFmpeg is only needed for what libsndfile cannot read

    try:
        container = av.open(str(path))
    except av.FFmpegError as err:
        raise _undecodable(path, err) from err
    if not container.streams.audio:
        container.close()
        raise InputError(f"`{path}` has no audio track", f"pass an audio file ({_FORMATS})")
    stream = container.streams.audio[0]
    sample_rate_hz = stream.codec_context.sample_rate if stream.codec_context is not None else 0
    if not sample_rate_hz:  # FFmpeg falls back to the file name's extension, e.g. for a text file named .flac
        container.close()
        raise InputError(f"`{path}` could not be decoded as audio (no audio stream found)", _CHECK_FILE_HINT)
    log.debug("decoding %s with FFmpeg (%s, %d Hz)", path, stream.codec_context.name, sample_rate_hz)
    # Planar float at the stream's own rate and layout, so that every block stacks with the others even if
    # the stream changes format midway; mixing and resampling stay ours (the same for both backends).
    resampler = av.AudioResampler(format="fltp", layout=stream.codec_context.layout, rate=sample_rate_hz)
    blocks = _pyav_blocks(container, stream, resampler, path)
    n_channels = stream.codec_context.layout.nb_channels
    return _Decoder(sample_rate_hz, n_channels, _pyav_duration_s(container, stream), blocks)


def _pyav_duration_s(container: Any, stream: Any) -> float | None:
    """The sound track's duration from the container, without decoding; None when it does not say."""
    import av

    if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
        return float(stream.duration * stream.time_base)
    if container.duration is not None and container.duration > 0:  # the whole container's, in FFmpeg's µs
        return container.duration / av.time_base
    return None  # unknown, or a damaged header's negative or zero claim


def _pyav_blocks(container: Any, stream: Any, resampler: Any, path: Path) -> Iterator[np.ndarray]:
    import av

    n_bad_packets, n_frames = 0, 0
    with container:
        for packet in _demux(container, stream, path):  # ends with an empty packet that flushes the decoder
            try:
                decoded = packet.decode()
            except av.FFmpegError:  # one damaged packet: skip it, as ffmpeg does, and keep the rest
                n_bad_packets += 1
                continue
            for frame in [*decoded, None] if packet.size == 0 else decoded:  # None flushes the resampler
                for out in resampler.resample(frame):
                    n_frames += out.samples
                    yield out.to_ndarray().T  # (n_channels, n_frames) -> (n_frames, n_channels)
    if n_bad_packets and n_frames == 0:
        raise InputError(f"`{path}` could not be decoded: every audio packet is damaged", _CHECK_FILE_HINT)
    if n_bad_packets:
        log.warning("%s: skipped %d damaged audio packets", path, n_bad_packets)


def _demux(container: Any, stream: Any, path: Path) -> Iterator[Any]:
    import av

    try:
        yield from container.demux(stream)
    except av.FFmpegError as err:  # the container itself is broken: we cannot tell what is missing
        raise _undecodable(path, err) from err


# ---------------------------------------------------------------------------------------------------------
# Checks and conversions
# ---------------------------------------------------------------------------------------------------------


def _check_format(path: Path, sample_rate_hz: int, n_channels: int) -> None:
    """Refuse header claims no recording makes, before a block is decoded (see the guards above)."""
    if not MIN_SAMPLE_RATE_HZ <= sample_rate_hz <= MAX_SAMPLE_RATE_HZ:
        raise InputError(
            f"`{path}` claims a sample rate of `{sample_rate_hz}` Hz, outside "
            f"`{MIN_SAMPLE_RATE_HZ}`-`{MAX_SAMPLE_RATE_HZ}` Hz: its header is damaged",
            _CHECK_FILE_HINT,
        )
    if not 1 <= n_channels <= MAX_CHANNELS:
        raise InputError(
            f"`{path}` claims `{n_channels}` audio channels (at most `{MAX_CHANNELS}` are read): its header is damaged",
            _CHECK_FILE_HINT,
        )


def _decode_errors() -> tuple[type[BaseException], ...]:
    """What the backends raise for a damaged file, beyond their own error types: libsndfile's are
    RuntimeErrors; FFmpeg's mostly ValueError/OSError subclasses, a few only `av.FFmpegError`; a header
    that claims absurd sizes can surface as MemoryError, EOFError or struct.error."""
    errors: tuple[type[BaseException], ...] = (RuntimeError, ValueError, OSError, EOFError, MemoryError, struct.error)
    av = sys.modules.get("av")  # only when FFmpeg is in use: importing it just for this would cost 0.2 s
    return (*errors, av.FFmpegError) if av is not None else errors


def _translated(blocks: Iterator[np.ndarray], path: Path) -> Iterator[np.ndarray]:
    """`blocks`, with any backend error raised while decoding turned into an `InputError` naming `path`."""
    try:
        yield from blocks
    except LyraError:
        raise
    except _decode_errors() as err:
        raise _undecodable(path, err) from err
    finally:
        close = getattr(blocks, "close", None)
        if close is not None:
            close()


def _channel_mixer(channel_mix: str) -> Callable[[np.ndarray], np.ndarray]:
    if channel_mix not in _CHANNEL_MIXERS:
        raise ValueError(f"unknown channel_mix {channel_mix!r}; valid: {', '.join(_CHANNEL_MIXERS)}")
    return _CHANNEL_MIXERS[channel_mix]


def _mono_blocks(
    blocks: Iterator[np.ndarray], mix: Callable[[np.ndarray], np.ndarray], block_frames: int, path: Path
) -> Iterator[np.ndarray]:
    """Mix each decoded (n_frames, n_channels) block to mono and recut the result into (block_frames,) blocks.

    Recutting matters for FFmpeg, whose blocks are codec frames (576 samples for mp3): one soxr call each
    would cost more than the decoding. The last block is shorter.
    """
    pending: list[np.ndarray] = []  # mixed audio not yet passed on: under one block, plus one decoded block
    n_pending = 0
    for block in blocks:
        with np.errstate(invalid="ignore", over="ignore"):  # NaN and inf are refused just below
            mono = mix(block)
        _check_samples(mono, path)
        pending.append(mono.astype(np.float32, copy=False))
        n_pending += mono.shape[0]
        if n_pending >= block_frames:  # concatenate once per block, not once per codec frame
            joined = np.concatenate(pending)
            n_full = n_pending - n_pending % block_frames
            yield from np.split(joined[:n_full], n_full // block_frames)
            pending, n_pending = [joined[n_full:]], n_pending - n_full
    if n_pending:
        yield np.concatenate(pending)


def _resampled(blocks: Iterator[np.ndarray], from_hz: int, to_hz: int, path: Path) -> Iterator[np.ndarray]:
    """Resample mono blocks from `from_hz` to `to_hz` in one continuous soxr stream (no seams).

    Raises `InputError` at the end if nothing came out (0-second audio).
    """
    n_out = 0
    if from_hz == to_hz:
        for block in blocks:
            n_out += block.shape[0]
            yield np.ascontiguousarray(block, dtype=np.float32)
    else:
        log.debug("resampling %s from %d Hz to %d Hz in blocks", path, from_hz, to_hz)
        resampler = soxr.ResampleStream(from_hz, to_hz, 1, dtype="float32", quality=RESAMPLE_QUALITY)
        # last=True flushes the filter's tail; sent once, after the final block, as soxr requires.
        for block, last in _with_end_marker(blocks):
            out = resampler.resample_chunk(np.ascontiguousarray(block, dtype=np.float32), last=last)
            n_out += out.shape[0]
            if out.shape[0]:
                yield out
    if n_out == 0:
        raise _empty_audio(path)


def _sinc_resampled(blocks: Iterator[np.ndarray], from_hz: int, to_hz: int, path: Path) -> Iterator[np.ndarray]:
    """Resample mono blocks with the authors' windowed sinc (torchaudio's default `Resample`), streamed exactly.

    Equal rates pass the blocks through unchanged, as `Resample` does. Raises `InputError` at the end if
    nothing came out (0-second audio).
    """
    if from_hz == to_hz:
        yield from _resampled(blocks, from_hz, to_hz, path)  # no filter at all: the same pass-through
        return
    from lyra_cli.audio.resample import SincResampleStream  # torch: only for the authors' front end

    log.debug("resampling %s from %d Hz to %d Hz with the windowed sinc, in blocks", path, from_hz, to_hz)
    resampler, n_out = SincResampleStream(from_hz, to_hz), 0
    for block, last in _with_end_marker(blocks):
        out = resampler.finish() if last else resampler.push(block)
        n_out += out.shape[0]
        if out.shape[0]:
            yield out
    if n_out == 0:
        raise _empty_audio(path)


def _with_end_marker(blocks: Iterator[np.ndarray]) -> Iterator[tuple[np.ndarray, bool]]:
    """(block, False) for each block, then (empty block, True)."""
    for block in blocks:
        yield block, False
    yield np.zeros(0, dtype=np.float32), True


_RESAMPLERS: dict[str, Callable[[Iterator[np.ndarray], int, int, Path], Iterator[np.ndarray]]] = {
    "soxr": _resampled,
    "sinc": _sinc_resampled,
}


def _check_samples(mono: np.ndarray, path: Path) -> None:
    """Refuse NaN, infinity and samples beyond `MAX_SAMPLE_PEAK` (possible in float files only)."""
    if not mono.size:
        return
    peak = float(np.abs(mono).max())
    if not np.isfinite(peak):  # would poison every feature downstream
        raise InputError(
            f"`{path}` contains invalid samples (NaN, or infinite in float32)", "re-export it as 16-bit PCM wav"
        )
    if peak > MAX_SAMPLE_PEAK:
        raise InputError(
            f"`{path}` has samples up to `{peak:.3g}`, far outside the audio range [-1, 1]",
            "the file stores raw values as float samples: re-export it as 16-bit PCM wav",
        )


def _empty_audio(path: str | Path) -> InputError:
    return InputError(f"`{path}` contains no audio samples (0-second audio)", "check the recording: it is empty")


def _undecodable(path: Path, err: Exception) -> InputError:
    # FFmpeg errors carry `strerror`, libsndfile errors `error_string`; both without the path repeated.
    reason = getattr(err, "strerror", None) or getattr(err, "error_string", None) or str(err) or type(err).__name__
    return InputError(f"`{path}` could not be decoded as audio ({reason})", _CHECK_FILE_HINT)

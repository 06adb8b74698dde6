"""Decode an audio file (or a video's sound track) to float32 mono at 16 kHz.

libsndfile (through `soundfile`) reads wav, flac and ogg, whose headers state an exact length. FFmpeg
(through PyAV, in-process, no `ffmpeg` binary) reads everything else: mp3, m4a/aac, webm/opus and the sound
tracks of mp4/mov/mkv/webm videos. Both backends yield blocks of frames, so a later streaming reader can
consume hours of audio one block at a time; `load_audio` simply concatenates them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import soundfile
import soxr

from lyra_cli.errors import InputError

log = logging.getLogger(__name__)

SAMPLE_RATE_HZ = 16_000  # what Whisper's feature extractor, and so Lyra's speech encoder, expects
SILENCE_PEAK = 1e-4  # peak |amplitude| below -80 dBFS: nothing a speech encoder can use
BLOCK_FRAMES = 1 << 16  # frames per decoded block (1.5 s at 44.1 kHz): the unit of a future streaming read
RESAMPLE_QUALITY = "HQ"  # soxr's default; ~1 ms for 5 s of audio, far below any model cost

ChannelMix = Literal["mean", "first"]
_CHANNEL_MIXERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "mean": lambda block: block.mean(axis=1, dtype=np.float32),  # ours: no channel is thrown away
    "first": lambda block: block[:, 0],  # the authors' `wav[0]`
}
_FORMATS = "wav, flac, ogg, mp3, m4a, webm, or a video with sound"
_CHECK_FILE_HINT = f"check that it is an audio file ({_FORMATS}) and complete; `ffmpeg -i FILE` shows what it holds"


def load_audio(
    path: str | Path,
    *,
    channel_mix: ChannelMix = "mean",
    sample_rate_hz: int = SAMPLE_RATE_HZ,
) -> np.ndarray:
    """Decode `path` to mono float32 of shape (n_samples,) at `sample_rate_hz`, values nominally in [-1, 1].

    Raises `InputError` for a missing path, a directory, a file that is not (decodable) audio, a video
    without a sound track, and audio with zero samples.
    """
    mix = _channel_mixer(channel_mix)
    if sample_rate_hz <= 0:
        raise ValueError(f"sample_rate_hz must be positive, got {sample_rate_hz}")
    path = _existing_file(path)
    native_rate_hz, blocks = _decode_blocks(path)
    wav = np.concatenate([mix(block) for block in blocks] or [np.zeros(0, np.float32)])
    _check_decoded(wav, path)
    return _resample(wav, native_rate_hz, sample_rate_hz)


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


def _decode_blocks(path: Path) -> tuple[int, Iterator[np.ndarray]]:
    """Open `path` with the backend that reads it exactly; return its sample rate and its blocks."""
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
    return sound_file.samplerate, _soundfile_blocks(sound_file, path)


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


def _open_pyav(path: Path) -> tuple[int, Iterator[np.ndarray]]:
    import av  # imported here: FFmpeg is only needed for what libsndfile cannot read

    try:
        container = av.open(str(path))
    except av.FFmpegError as err:
        raise _undecodable(path, err) from err
    if not container.streams.audio:
        container.close()
        raise InputError(f"`{path}` has no audio track", f"pass an audio file ({_FORMATS})")
    stream = container.streams.audio[0]
    sample_rate_hz = stream.codec_context.sample_rate
    if not sample_rate_hz:  # FFmpeg falls back to the file name's extension, e.g. for a text file named .flac
        container.close()
        raise InputError(f"`{path}` could not be decoded as audio (no audio stream found)", _CHECK_FILE_HINT)
    log.debug("decoding %s with FFmpeg (%s, %d Hz)", path, stream.codec_context.name, sample_rate_hz)
    # Planar float at the stream's own rate and layout, so that every block stacks with the others even if
    # the stream changes format midway; mixing and resampling stay ours (the same for both backends).
    resampler = av.AudioResampler(format="fltp", layout=stream.codec_context.layout, rate=sample_rate_hz)
    return sample_rate_hz, _pyav_blocks(container, stream, resampler, path)


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


def _existing_file(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if path.is_dir():
        raise InputError(f"`{path}` is a directory, not an audio file", f"pass an audio file ({_FORMATS})")
    if not path.exists():
        raise InputError(f"`{path}` does not exist", "check the path (a relative path starts at the current folder)")
    return path


def _channel_mixer(channel_mix: str) -> Callable[[np.ndarray], np.ndarray]:
    if channel_mix not in _CHANNEL_MIXERS:
        raise ValueError(f"unknown channel_mix {channel_mix!r}; valid: {', '.join(_CHANNEL_MIXERS)}")
    return _CHANNEL_MIXERS[channel_mix]


def _check_decoded(wav: np.ndarray, path: Path) -> None:
    if wav.size == 0:
        raise _empty_audio(path)
    if not np.isfinite(wav).all():  # possible in float wav files; would poison every feature downstream
        raise InputError(f"`{path}` contains invalid samples (NaN or infinity)", "re-export it as 16-bit PCM wav")


def _resample(wav: np.ndarray, from_hz: int, to_hz: int) -> np.ndarray:
    if from_hz == to_hz:
        return np.ascontiguousarray(wav, dtype=np.float32)
    log.debug("resampling %d samples from %d Hz to %d Hz", wav.size, from_hz, to_hz)
    return soxr.resample(wav, from_hz, to_hz, quality=RESAMPLE_QUALITY).astype(np.float32, copy=False)


def _empty_audio(path: str | Path) -> InputError:
    return InputError(f"`{path}` contains no audio samples (0-second audio)", "check the recording: it is empty")


def _undecodable(path: Path, err: Exception) -> InputError:
    # FFmpeg errors carry `strerror`, libsndfile errors `error_string`; both without the path repeated.
    reason = getattr(err, "strerror", None) or getattr(err, "error_string", None) or str(err)
    return InputError(f"`{path}` could not be decoded as audio ({reason})", _CHECK_FILE_HINT)

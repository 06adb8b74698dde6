"""Seeded mutation fuzzing of every real input type through the decoders the commands call.

Small excerpts of the real files in ../shared/data/real (wav, flac, mp3, mp4, jpg, png) are mutated —
bit flips, byte overwrites, truncation, chunk duplication and insertion, and header fields (RIFF and fmt
sizes, sample rate, channel count, FLAC STREAMINFO, PNG/JPEG dimensions, mp4 box sizes and sample-entry
fields) set to 0, 1 or huge values — and each mutant goes through `read_media` (what `lyra chat` runs
for --speech/--image/--video) or the long-speech stream (`open_audio_stream` → `iter_windows`, what
`lyra longspeech` runs). Each must either decode to something sane or raise a `LyraError` naming the
file; anything else (a traceback, NaN samples, an absurd image) fails the test with the case's id, and
`LYRA_FUZZ_SEED=<seed>` plus the id reproduces it.

The default run mutates `DEFAULT_CASES` files in-process; `-m slow` runs `LYRA_FUZZ_N` (default 20,000).
"""

from __future__ import annotations

import io
import itertools
import os
import random
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from lyra_cli.audio.io import SAMPLE_RATE_HZ, open_audio_stream
from lyra_cli.audio.windows import iter_windows
from lyra_cli.engine.model.vision import CLI_MAX_SIDE, IMAGE_FACTOR, MIN_SIDE
from lyra_cli.engine.run.pipeline import read_media
from lyra_cli.errors import LyraError

DEFAULT_CASES = 1_200  # ~200 per format; a few seconds in all
SLOW_CASES = 20_000
SEED = int(os.environ.get("LYRA_FUZZ_SEED", "20241212"))
MAX_AUDIO_PEAK = 16.0 * 1.2  # the decoder's sample bound, plus the resampler's overshoot
HUGE_U32 = (0, 1, 0x7FFF_FFFF, 0xFFFF_FFFF, 65_535, 1 << 24)
HUGE_U16 = (0, 1, 0xFFFF, 0x8000, 255)

Mutation = Callable[[bytearray, random.Random], bytearray]


# ---------------------------------------------------------------------------------------------------------
# Seeds: small excerpts of the real files, so that each decode takes milliseconds
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seed:
    name: str  # file name of the mutants, extension included: the decoders pick a backend by content
    data: bytes
    kind: str  # "speech", "image", "video"


def _audio_excerpt(real: Path, seconds: float) -> tuple[np.ndarray, int]:
    samples, rate = sf.read(real / "jfk.flac", frames=int(seconds * 44_100), start=44_100, dtype="float32")
    return samples, rate


def _encode_audio(samples: np.ndarray, rate: int, fmt: str, subtype: str) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def _mp4_excerpt(real: Path) -> bytes:
    """Eight 64×48 frames (h264, as the real clip) and one second of its sound (aac), from movement.mp4."""
    import av

    buffer = io.BytesIO()
    with av.open(str(real / "movement.mp4")) as src:
        frames = [f.to_image().resize((64, 48)) for f in itertools.islice(src.decode(video=0), 8)]
    samples, rate = _audio_excerpt(real, 1.0)
    with av.open(buffer, "w", format="mp4") as out:
        video = out.add_stream("libx264", rate=4)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        audio = out.add_stream("aac", rate=rate)
        audio.layout = "stereo"
        for image in frames:
            out.mux(video.encode(av.VideoFrame.from_image(image)))
        out.mux(video.encode(None))
        planar = np.ascontiguousarray(samples.T.astype(np.float32))
        frame = av.AudioFrame.from_ndarray(planar, format="fltp", layout="stereo")
        frame.sample_rate = rate
        out.mux(audio.encode(frame))
        out.mux(audio.encode(None))
    return buffer.getvalue()


def _image_bytes(real: Path, fmt: str, mode: str) -> bytes:
    image = Image.open(real / "extreme_ironing.jpg").convert(mode)
    image.thumbnail((96, 96))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def make_seeds(real: Path) -> list[Seed]:
    samples, rate = _audio_excerpt(real, 0.5)
    return [
        Seed("pcm16.wav", _encode_audio(samples, rate, "WAV", "PCM_16"), "speech"),
        Seed("float.wav", _encode_audio(samples, rate, "WAV", "FLOAT"), "speech"),  # NaN/inf/huge are possible
        Seed("clip.flac", _encode_audio(samples[:, 0], 16_000, "FLAC", "PCM_16"), "speech"),
        Seed("clip.mp3", (real / "Hi.mp3").read_bytes()[:6_000], "speech"),  # mp3 frames stand alone
        Seed("clip.mp4", _mp4_excerpt(real), "video"),
        Seed("photo.jpg", _image_bytes(real, "JPEG", "RGB"), "image"),
        Seed("photo.png", _image_bytes(real, "PNG", "RGBA"), "image"),
    ]


# ---------------------------------------------------------------------------------------------------------
# Mutations
# ---------------------------------------------------------------------------------------------------------


def _span(data: bytearray, rng: random.Random, most: int = 64) -> tuple[int, int]:
    start = rng.randrange(len(data))
    return start, min(len(data), start + rng.randint(1, most))


def flip_bits(data: bytearray, rng: random.Random) -> bytearray:
    for _ in range(rng.randint(1, 8)):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return data


def overwrite_bytes(data: bytearray, rng: random.Random) -> bytearray:
    start, end = _span(data, rng)
    fill = rng.choice([b"\x00", b"\xff", None])
    data[start:end] = fill * (end - start) if fill else rng.randbytes(end - start)
    return data


def truncate(data: bytearray, rng: random.Random) -> bytearray:
    return data[: rng.randrange(len(data))]


def duplicate_chunk(data: bytearray, rng: random.Random) -> bytearray:
    start, end = _span(data, rng, most=512)
    at = rng.randrange(len(data))
    return data[:at] + data[start:end] + data[at:]


def insert_random(data: bytearray, rng: random.Random) -> bytearray:
    at = rng.randrange(len(data))
    return data[:at] + rng.randbytes(rng.randint(1, 256)) + data[at:]


def _put(data: bytearray, offset: int, fmt: str, values: tuple[int, ...], rng: random.Random) -> bytearray:
    if offset + struct.calcsize(fmt) <= len(data):
        struct.pack_into(fmt, data, offset, rng.choice(values))
    return data


def wav_header(data: bytearray, rng: random.Random) -> bytearray:
    """RIFF size, fmt chunk size, format tag, channels, sample rate, byte rate, block align, bits, data size."""
    field = rng.choice([(4, "<I"), (16, "<I"), (20, "<H"), (22, "<H"), (24, "<I"), (28, "<I"), (32, "<H"),
                        (34, "<H"), (40, "<I")])  # fmt: skip
    return _put(data, field[0], field[1], HUGE_U16 if field[1] == "<H" else HUGE_U32, rng)


def flac_header(data: bytearray, rng: random.Random) -> bytearray:
    """STREAMINFO (bytes 8-41): block sizes, frame sizes, then rate/channels/bits/total samples packed."""
    start = 8 + rng.randrange(18)
    data[start : start + 2] = rng.choice([b"\x00\x00", b"\xff\xff", rng.randbytes(2)])
    return data


def mp3_header(data: bytearray, rng: random.Random) -> bytearray:
    """The third byte of a frame header: bitrate, sample-rate index, padding; or the ID3 tag's size."""
    syncs = [i for i in range(len(data) - 3) if data[i] == 0xFF and data[i + 1] & 0xE0 == 0xE0]
    if data[:3] == b"ID3" and rng.random() < 0.2:
        data[6:10] = rng.choice([b"\x7f\x7f\x7f\x7f", b"\x00\x00\x00\x00", rng.randbytes(4)])
    elif syncs:
        at = rng.choice(syncs[:50])
        data[at + rng.choice([1, 2, 3])] = rng.randrange(256)
    return data


def _png_chunk_crc(data: bytearray, offset: int) -> None:
    """Recompute the CRC of the PNG chunk whose length field is at `offset`, so that PIL reads on."""
    (length,) = struct.unpack_from(">I", data, offset)
    end = offset + 8 + length
    if end + 4 <= len(data):
        struct.pack_into(">I", data, end, zlib.crc32(data[offset + 4 : end]))


def png_header(data: bytearray, rng: random.Random) -> bytearray:
    """IHDR width, height, bit depth, colour type (CRC fixed), or a box-like chunk length."""
    choice = rng.randrange(4)
    if choice == 0:
        _put(data, 16, ">I", HUGE_U32 + (100_000, 3), rng)
    elif choice == 1:
        _put(data, 20, ">I", HUGE_U32 + (100_000, 3), rng)
    elif choice == 2:
        data[24 + rng.randrange(2)] = rng.choice([0, 1, 2, 3, 4, 6, 8, 16, 255])
    else:
        _put(data, 33, ">I", HUGE_U32, rng)  # the next chunk's length
        return data
    _png_chunk_crc(data, 8)
    return data


def jpeg_header(data: bytearray, rng: random.Random) -> bytearray:
    """The frame header (SOF0/SOF2): height, width, component count; or a segment length."""
    sof = max(data.find(b"\xff\xc0"), data.find(b"\xff\xc2"))
    if sof < 0 or rng.random() < 0.2:
        markers = [i for i in range(len(data) - 4) if data[i] == 0xFF and 0xC0 <= data[i + 1] <= 0xFE]
        return _put(data, rng.choice(markers) + 2, ">H", HUGE_U16, rng) if markers else data
    field = rng.choice([(sof + 5, ">H", HUGE_U16), (sof + 7, ">H", HUGE_U16), (sof + 9, ">B", (0, 1, 2, 4, 255))])
    return _put(data, *field, rng)


def _mp4_boxes(data: bytearray) -> list[int]:
    """Offsets of every box header (size, type) found by walking the tree, containers opened."""
    containers = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts", b"udta"}
    found, stack = [], [(0, len(data))]
    while stack:
        offset, end = stack.pop()
        while offset + 8 <= min(end, len(data)):
            size, kind = struct.unpack_from(">I4s", data, offset)
            found.append(offset)
            if size < 8:
                break
            if kind in containers:
                stack.append((offset + 8, offset + size))
            elif kind == b"stsd":
                stack.append((offset + 16, offset + size))
            offset += size
    return found


def mp4_header(data: bytearray, rng: random.Random) -> bytearray:
    """A box's size; or a field inside it: timescales, durations, counts, sample-entry width/height/rate."""
    boxes = _mp4_boxes(data)
    if not boxes:
        return data
    at = rng.choice(boxes)
    if rng.random() < 0.4:
        return _put(data, at, ">I", HUGE_U32 + (7, 8, 9), rng)
    kind = bytes(data[at + 4 : at + 8])
    fields = {b"avc1": [(at + 32, ">H"), (at + 34, ">H")], b"mp4a": [(at + 24, ">H"), (at + 32, ">I")]}
    offset, fmt = rng.choice(fields.get(kind, [(at + 8 + 4 * rng.randrange(6), ">I")]))
    return _put(data, offset, fmt, HUGE_U16 if fmt == ">H" else HUGE_U32, rng)


GENERIC: list[Mutation] = [flip_bits, overwrite_bytes, truncate, duplicate_chunk, insert_random]
SPECIFIC: dict[str, Mutation] = {".wav": wav_header, ".flac": flac_header, ".mp3": mp3_header,
                                 ".png": png_header, ".jpg": jpeg_header, ".mp4": mp4_header}  # fmt: skip


def mutate(seed: Seed, rng: random.Random) -> bytes:
    data = bytearray(seed.data)
    specific = SPECIFIC[Path(seed.name).suffix]
    for _ in range(rng.choice([1, 1, 2, 3])):
        mutation = specific if rng.random() < 0.5 else rng.choice(GENERIC)
        data = mutation(data, rng)
        if not data:
            break
    return bytes(data)


# ---------------------------------------------------------------------------------------------------------
# The decoders, and what a success must look like
# ---------------------------------------------------------------------------------------------------------


def check_speech(wav: np.ndarray) -> None:
    assert wav.dtype == np.float32 and wav.ndim == 1 and wav.size > 0, (wav.dtype, wav.shape)
    assert np.isfinite(wav).all(), "non-finite samples"
    assert np.abs(wav).max() <= MAX_AUDIO_PEAK, f"peak {np.abs(wav).max()}"


def decode_speech(path: Path) -> None:
    check_speech(read_media("speech", path).wav)


def decode_long_speech(path: Path) -> None:
    """What `lyra longspeech` runs: the streamed decoder, regrouped into 30 s windows."""
    stream = open_audio_stream(path)
    try:
        windows = list(iter_windows(iter(stream)))
    finally:
        stream.close()
    check_speech(np.concatenate(windows))
    assert stream.sample_rate_hz == SAMPLE_RATE_HZ
    assert stream.duration_s is None or np.isfinite(stream.duration_s)


def decode_image(path: Path) -> None:
    image = read_media("image", path).image
    assert image.mode == "RGB", image.mode
    assert MIN_SIDE <= min(image.size) and max(image.size) <= CLI_MAX_SIDE, image.size


def decode_video(path: Path) -> None:
    frames = read_media("video", path).frames
    assert frames.dtype == np.uint8 and frames.ndim == 4 and frames.shape[-1] == 3, frames.shape
    assert len(frames) >= 2 and len(frames) % 2 == 0, frames.shape
    assert frames.shape[1] % IMAGE_FACTOR == 0 and frames.shape[2] % IMAGE_FACTOR == 0, frames.shape


DECODERS: dict[str, list[Callable[[Path], None]]] = {
    "speech": [decode_speech, decode_long_speech],
    "image": [decode_image],
    "video": [decode_video, decode_speech],  # `--video`, and `--speech` on a video's sound track
}


def run_case(seed: Seed, case: int, folder: Path) -> str | None:
    """None if the mutant decoded sanely or was refused with a LyraError naming it; else what went wrong."""
    rng = random.Random(f"{SEED}/{seed.name}/{case}")
    path = folder / f"{case}-{seed.name}"
    data = mutate(seed, rng)
    path.write_bytes(data)
    decoders = DECODERS[seed.kind]
    decode = decoders[case % len(decoders)]
    try:
        decode(path)
    except LyraError as err:
        if path.name not in err.message:
            return f"{path.name} via {decode.__name__}: message does not name the file: {err.message}"
        if not err.hint:
            return f"{path.name} via {decode.__name__}: no hint: {err.message}"
    except Exception as err:  # noqa: BLE001 - the point of the test: anything else is a bug
        return f"{path.name} via {decode.__name__}: {type(err).__name__}: {err}"
    finally:
        changed = path.read_bytes() != data  # decoders only read: the user's file stays as it was
        path.unlink()
    if changed or sorted(folder.iterdir()) != []:
        return f"{path.name} via {decode.__name__}: the input was changed or a file was left beside it"
    return None


def run_fuzz(real: Path, folder: Path, n_cases: int) -> list[str]:
    seeds = make_seeds(real)
    for seed in seeds:  # the unmutated excerpts must decode: otherwise every refusal would be vacuous
        path = folder / seed.name
        path.write_bytes(seed.data)
        for decode in DECODERS[seed.kind]:
            decode(path)
        path.unlink()
    failures = []
    for case in range(n_cases):
        failure = run_case(seeds[case % len(seeds)], case, folder)
        if failure is not None:
            failures.append(failure)
    return failures


def _report(failures: list[str], n_cases: int) -> str:
    shown = "\n".join(failures[:20])
    return f"{len(failures)} of {n_cases} mutants failed (LYRA_FUZZ_SEED={SEED}; case id leads the name):\n{shown}"


def test_mutated_inputs_decode_or_fail_cleanly(real: Path, tmp_path: Path) -> None:
    failures = run_fuzz(real, tmp_path, DEFAULT_CASES)
    assert not failures, _report(failures, DEFAULT_CASES)


@pytest.mark.slow
def test_many_mutated_inputs_decode_or_fail_cleanly(real: Path, tmp_path: Path) -> None:
    n_cases = int(os.environ.get("LYRA_FUZZ_N", SLOW_CASES))
    failures = run_fuzz(real, tmp_path, n_cases)
    assert not failures, _report(failures, n_cases)


# ---------------------------------------------------------------------------------------------------------
# The crash classes the fuzzer found, each pinned by a hand-made file
# ---------------------------------------------------------------------------------------------------------


def test_wav_header_claiming_1_hz_is_refused_before_decoding(tmp_path: Path) -> None:
    """Was: 22,050 frames "at 1 Hz" resampled to 16 kHz for 40 s (352 M samples), then accepted."""
    path = tmp_path / "one_hertz.wav"
    data = bytearray(_encode_audio(np.zeros((22_050, 2), np.float32), 22_050, "WAV", "PCM_16"))
    struct.pack_into("<I", data, 24, 1)  # fmt chunk: sample rate
    path.write_bytes(bytes(data))
    with pytest.raises(LyraError, match=r"claims a sample rate of `1` Hz") as err:
        read_media("speech", path)
    assert path.name in err.value.message


def test_float_samples_at_float32_max_are_refused_not_mixed_to_inf(tmp_path: Path) -> None:
    """Was: the float32 mean of two channels at 3e38 overflowed to inf ("NaN or infinity")."""
    path = tmp_path / "huge.wav"
    sf.write(path, np.full((16_000, 2), 3e38, np.float32), 16_000, subtype="FLOAT")
    with pytest.raises(LyraError, match=r"samples up to `3e\+38`, far outside the audio range"):
        read_media("speech", path)
    loud = tmp_path / "loud.wav"  # float files may exceed full scale a little: kept as they are
    sf.write(loud, np.full((16_000, 2), 1.5, np.float32), 16_000, subtype="FLOAT")
    assert np.abs(read_media("speech", loud).wav).max() == pytest.approx(1.5, rel=1e-3)


def test_video_frames_above_the_size_limit_are_refused_before_decoding(
    real: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The header's frame size is checked first (lowered limit: an 8K test file would be slow to make)."""
    import lyra_cli.engine.model.vision as vision

    path = tmp_path / "clip.mp4"
    path.write_bytes(_mp4_excerpt(real))
    monkeypatch.setattr(vision, "MAX_VIDEO_FRAME_PIXELS", 64 * 48 - 1)
    decoded = []
    monkeypatch.setattr(vision, "_decode_frames", lambda *args: decoded.append(args))
    with pytest.raises(LyraError, match=r"video `.*clip\.mp4` has frames of `64×48` px, above 8K"):
        read_media("video", path)
    assert decoded == []

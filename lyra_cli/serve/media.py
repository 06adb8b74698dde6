"""OpenAI message content -> the engine's prompt parts, in two steps: decode (no model) then encode.

    limits = MediaLimits()                                         # the server's flags
    with decode_content(message["content"], limits, param="messages[1].content") as decoded:
        ...                                                        # request thread: validated, decoded
        parts = encode_content(engine, decoded, cache=speech_cache) # worker thread: the model's encoders

A content is a string (one text part) or a list of parts, taken in order like `lyra chat`'s inputs:
`{"type": "text", "text"}`, `{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`,
`{"type": "input_audio", "input_audio": {"data": BASE64, "format": "wav"}}` and the extension
`{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,..."}}`. Only `data:` URLs are taken:
the server never fetches a URL and never reads a path a request names.

Each medium is written to a private temporary folder and read back by the same `read_media` as the command
line, so every check of a bad file applies with the same words (the temporary path is replaced by the
request field in them). The limits of `MediaLimits` are checked before anything is decoded: the size from
the base64 text's length, the duration, pixels or frames from the file's header. A part over a limit is a
400 naming the limit and its `lyra serve` flag; 413 stays for the request body as a whole (checked by the
server before the JSON is parsed), as OpenAI answers an oversized upload.

Long recordings take the long-speech path of `lyra longspeech`: a recording longer than one 30 s window
(the point where `adapters.route` switches to the `long_speech` adapter anyway) is not decoded on the
request thread; its file stays in the temporary folder until `encode_content` streams it through
`RecordingEncoder` (decoding in blocks, windows encoded in batches, the speech-token cache), so its memory
stays bounded whatever its length. The temporary folder lives as long as the `DecodedContent`: close it
(or leave its `with` block) once encoded; it is removed on every path, errors included.
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lyra_cli.errors import LyraError
from lyra_cli.serve.errors import ApiError, from_lyra_error

if TYPE_CHECKING:
    from lyra_cli.engine.run.speech_cache import SpeechTokenCache
    from lyra_cli.serve.media_cache import MediaCache
    from lyra_cli.audio.frontend import AudioFrontEnd
    from lyra_cli.engine import Engine, Part, Progress

log = logging.getLogger(__name__)

MIB = 1 << 20
SAMPLE_RATE_HZ = 16_000  # the speech front end's rate (`lyra_cli.audio.io.SAMPLE_RATE_HZ`; a test holds them equal)
WINDOW_SECONDS = 30  # one Whisper window (`lyra_cli.audio.windows.WINDOW_SECONDS`; a test holds them equal)
# Recordings longer than one window take the long-speech path: from there on `adapters.route` picks the
# `long_speech` adapter whichever path encodes them, and streaming keeps their memory bounded.
LONG_SPEECH_MIN_S = WINDOW_SECONDS
# Lyra's LLM (Qwen2-VL) has 32,768 positions (`TextModelConfig.max_position_embeddings`); the longest recording
# whose long-speech prompt fits them is `longspeech.longest_fitting_s(32768)` = 54:30 (a test holds them
# equal). Longer needs the extractor (`lyra.extract`) and `--max-audio-s` raised.
DEFAULT_MAX_AUDIO_S = 3270.0
DEFAULT_MAX_PART_MB = 64  # an hour of 128 kb/s mp3 is 58 MB
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000  # a 50-megapixel photo; the model sees at most 2880 px per side anyway
DEFAULT_MAX_VIDEO_S = 600.0  # the model samples at most 16 frames, but every frame up to the last is decoded
DEFAULT_MAX_VIDEO_FRAMES = 36_000  # 10 minutes at 60 frames per second

# `input_audio.format` -> the temporary file's suffix (the decoders also sniff the content itself)
AUDIO_FORMATS = {"wav": ".wav", "mp3": ".mp3", "flac": ".flac", "ogg": ".ogg", "opus": ".opus", "m4a": ".m4a",
                 "aac": ".aac", "webm": ".webm", "mp4": ".mp4"}  # fmt: skip
# a data: URL's media type -> the temporary file's suffix, a hint for FFmpeg's probe (content decides)
MEDIA_TYPE_SUFFIXES = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp", "image/gif": ".gif",
                       "image/bmp": ".bmp", "image/tiff": ".tiff", "video/mp4": ".mp4", "video/webm": ".webm",
                       "video/quicktime": ".mov", "video/x-matroska": ".mkv", "video/x-msvideo": ".avi"}  # fmt: skip
PART_TYPES = ("text", "image_url", "input_audio", "video_url")
# the `lyra serve` flag that sets each limit, for the messages that name it
LIMIT_FLAGS = {"max_part_bytes": "--max-media-mb", "max_audio_s": "--max-audio-s",
               "max_image_pixels": "--max-image-pixels", "max_video_s": "--max-video-s",
               "max_video_frames": "--max-video-frames"}  # fmt: skip
MEDIA_TOO_LARGE = "media_too_large"  # the `code` of a part over a limit


@dataclass(frozen=True)
class MediaLimits:
    """What one media part of a request may hold; set by `lyra serve`'s flags (`LIMIT_FLAGS`)."""

    max_part_bytes: int = DEFAULT_MAX_PART_MB * MIB
    max_audio_s: float = DEFAULT_MAX_AUDIO_S
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_video_s: float = DEFAULT_MAX_VIDEO_S
    max_video_frames: int = DEFAULT_MAX_VIDEO_FRAMES


@dataclass(frozen=True)
class MediaOptions:
    """lyra's own media options of a request (its `lyra` object): `official_audio` selects the authors'
    audio front end, as `--official-audio` does."""

    official_audio: bool = False

    @property
    def front_end(self) -> AudioFrontEnd:
        from lyra_cli.audio.frontend import AudioFrontEnd

        return AudioFrontEnd.choose(self.official_audio)

    @classmethod
    def from_request(cls, lyra: Mapping[str, Any] | None, *, param: str = "lyra") -> MediaOptions:
        """The options in a request's `lyra` object (None: the defaults); other keys are left to the server."""
        value = (lyra or {}).get("official_audio", False)
        if not isinstance(value, bool):
            raise ApiError(400, f"`{param}.official_audio` must be true or false", param=f"{param}.official_audio")
        return cls(official_audio=value)


@dataclass(frozen=True)
class Recording:
    """A recording longer than one window (by its header), still a file: `encode_content` streams it through
    the long-speech path (or, should it hold one window after all, encodes it as a clip)."""

    path: Path
    duration_s: float
    front_end: AudioFrontEnd
    source: str  # the request field it came from, named in messages instead of the temporary path


@dataclass(eq=False)
class DecodedContent:
    """One message's content, decoded and validated: `items` in order, each a `TextPart`, a decoded medium
    (`read_media`'s `DecodedImage` / `DecodedVideo` / `DecodedSpeech`) or a `Recording`.

    Owns the temporary folder its recordings lie in: `close()` (or the end of its `with` block) removes it.
    """

    items: list[Any] = field(default_factory=list)
    folder: Path | None = None
    cache_keys: dict[int, str] = field(default_factory=dict)  # item index -> its `MediaCache` key, once encoded

    def close(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    def __enter__(self) -> DecodedContent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def recordings(self) -> list[Recording]:
        return [item for item in self.items if isinstance(item, Recording)]


# ---------------------------------------------------------------------------------------------------------
# Step 1: decode (request thread, no model)


def decode_content(
    content: Any,
    limits: MediaLimits,
    *,
    param: str,
    options: MediaOptions = MediaOptions(),
    cache: MediaCache | None = None,
) -> DecodedContent:
    """A message's `content` (a string or a list of parts) decoded in order; `param` names it in errors
    (`messages[1].content`). Raises `ApiError` (400) for a malformed part, a medium over `limits` (before
    decoding it) or one the decoders refuse (`read_media`'s message). The caller closes the result.

    With a `cache`, a medium encoded before (the same bytes and options) is neither decoded nor checked
    again: it becomes a `CachedMedium`, its limits passed when it was first seen (they are the server's,
    fixed). Every other medium gets its key in `cache_keys`, for `encode_content` to store its part."""
    if isinstance(content, str):
        return DecodedContent(items=[_text_part(content)])
    if not isinstance(content, list):
        raise ApiError(400, f"`{param}` must be a string or a list of content parts", param=param)
    with _new_content() as decoded:
        for index, part in enumerate(content):
            item, key = _decode_part(part, limits, f"{param}[{index}]", decoded.folder, options, cache)
            decoded.items.append(item)
            if key is not None and not isinstance(item, Recording):  # recordings have the on-disk cache
                decoded.cache_keys[index] = key
    return decoded


@contextmanager
def _new_content() -> Iterator[DecodedContent]:
    """A content with a fresh private folder (mode 0700): removed on any error, and at the end unless a
    `Recording` still needs its file (then the caller's `close()` removes it)."""
    decoded = DecodedContent(folder=Path(tempfile.mkdtemp(prefix="lyra-serve-")))
    try:
        yield decoded
    except BaseException:
        decoded.close()
        raise
    if not decoded.recordings:  # every medium is in memory: the files are no longer needed
        decoded.close()


def _decode_part(
    part: Any, limits: MediaLimits, param: str, folder: Path, options: MediaOptions, cache: MediaCache | None
) -> tuple[Any, str | None]:
    """The part's item, and its cache key (None: no cache, or text)."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind not in PART_TYPES:
        got = f"`{kind}`" if isinstance(kind, str) else "no type"
        raise ApiError(400, f"`{param}` has {got}; content parts are of type {_listed(PART_TYPES)}",
                       param=f"{param}.type", code="invalid_type")  # fmt: skip
    if kind == "text":
        return _text_part(_field(part, "text", str, param)), None
    body = _field(part, kind, dict, param)
    if kind == "input_audio":
        param = f"{param}.input_audio"
        audio_format = _audio_format(body, param)
        payload = _field(body, "data", str, param)
        # the front end changes the samples, so the encoding
        key = _cache_key(cache, kind, audio_format, options.official_audio, payload=payload)
        if (hit := _cached(cache, key, f"{param}.data")) is not None:
            return hit, key
        data = base64_bytes(payload, limits, param=f"{param}.data")
        return _audio_item(_write(folder, data, AUDIO_FORMATS[audio_format]), limits, f"{param}.data", options), key
    param = f"{param}.{kind}.url"
    media_type, payload = data_url_payload(_field(body, "url", str, param.removesuffix(".url")), param=param)
    key = _cache_key(cache, kind, media_type, payload=payload)
    if (hit := _cached(cache, key, param)) is not None:
        return hit, key
    path = _write(folder, base64_bytes(payload, limits, param=param), MEDIA_TYPE_SUFFIXES.get(media_type, ".bin"))
    if kind == "image_url":
        return _decode_image(path, limits, param), key
    return _decode_video(path, limits, param), key


def _cache_key(cache: MediaCache | None, *options: object, payload: str) -> str | None:
    return None if cache is None else cache.key(*options, payload=payload)


def _cached(cache: MediaCache | None, key: str | None, source: str) -> Any:
    """A `CachedMedium` for `source` when the cache holds `key`, else None."""
    if cache is None or key is None or (part := cache.get(key)) is None:
        return None
    from lyra_cli.serve.media_cache import CachedMedium

    return CachedMedium(part, source)


def _field(body: Mapping[str, Any], name: str, kind: type, param: str) -> Any:
    value = body.get(name)
    if not isinstance(value, kind):
        expected = {str: "a string", dict: "an object"}[kind]
        raise ApiError(400, f"`{param}.{name}` must be {expected}", param=f"{param}.{name}")
    return value


def _text_part(text: str) -> Any:
    from lyra_cli.engine import TextPart

    return TextPart(text)


def _listed(names: Sequence[str]) -> str:
    return ", ".join(f"`{n}`" for n in names)


def _write(folder: Path, data: bytes, suffix: str) -> Path:
    path = Path(tempfile.mkstemp(suffix=suffix, dir=folder)[1])  # a fresh name each time, created 0600
    path.write_bytes(data)
    return path


# -- base64 and data: URLs --------------------------------------------------------------------------------


def base64_bytes(text: str, limits: MediaLimits, *, param: str) -> bytes:
    """Decode standard base64, refusing it from its length alone when it would exceed `max_part_bytes`."""
    n_bytes = len(text) * 3 // 4 - text[-2:].count("=")  # exact for unpadded-free, whitespace-free base64
    if n_bytes > limits.max_part_bytes:
        raise too_large(param, f"{n_bytes / MIB:.1f} MB", f"{limits.max_part_bytes / MIB:g} MB", "max_part_bytes")
    try:
        data = _b64decode(text)
    except (binascii.Error, ValueError) as err:
        raise ApiError(400, f"`{param}` is not valid base64 ({err})", param=param, code="invalid_base64") from err
    if not data:
        raise ApiError(400, f"`{param}` is empty", param=param)
    return data


def _b64decode(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def data_url_payload(url: str, *, param: str) -> tuple[str, str]:
    """The media type and base64 text (still encoded: `base64_bytes` decodes it) of a `data:[type];base64,DATA`
    URL. Any other URL is refused: the server fetches nothing and reads no file a request names."""
    if not url.startswith("data:"):
        scheme, colon, _ = url.partition(":")
        given = f"a `{scheme}:` URL" if colon and scheme.isalnum() else "a path or other text"
        raise ApiError(400, f"`{param}` must be a `data:` URL with the file in base64, not {given}: "
                            "lyra serve never fetches URLs or reads files on the server",
                       param=param, code="unsupported_url")  # fmt: skip
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise ApiError(400, f"`{param}` must be a base64 `data:` URL (`data:image/png;base64,...`)",
                       param=param, code="invalid_data_url")  # fmt: skip
    media_type = header[len("data:") : -len(";base64")].split(";", 1)[0].strip().lower()
    return media_type, payload


def too_large(param: str, actual: str, limit: str, name: str) -> ApiError:
    """A part over one of `MediaLimits` (`name`): a 400 naming the limit and the flag that raises it."""
    return ApiError(400, f"`{param}` holds {actual}, over this server's limit of {limit} "
                         f"(`lyra serve {LIMIT_FLAGS[name]}`)", param=param, code=MEDIA_TOO_LARGE)  # fmt: skip


# -- audio ------------------------------------------------------------------------------------------------


def _audio_format(body: Mapping[str, Any], param: str) -> str:
    audio_format = _field(body, "format", str, param).lower()
    if audio_format not in AUDIO_FORMATS:
        raise ApiError(400, f"`{param}.format` is `{audio_format}`; lyra reads {_listed(list(AUDIO_FORMATS))}",
                       param=f"{param}.format", code="unsupported_format")  # fmt: skip
    return audio_format


def _audio_item(path: Path, limits: MediaLimits, param: str, options: MediaOptions) -> Any:
    """An audio file, its length checked first: decoded (`DecodedSpeech`), or a `Recording` when long."""
    front_end = options.front_end
    with lyra_errors(path, param):
        duration_s = _audio_duration_s(path, front_end, limits, param)
        if duration_s > LONG_SPEECH_MIN_S:
            return Recording(path, duration_s, front_end, param)
        speech = _read_media("speech", path, front_end)
        _check_audio_s(speech.duration_s, limits, param)  # a header can understate (an mp3's estimate)
        return replace(speech, source=param)


def decode_audio_file(
    data: bytes, suffix: str, limits: MediaLimits, *, param: str, options: MediaOptions = MediaOptions()
) -> DecodedContent:
    """An uploaded audio file (a multipart form's bytes) as a content of one item, decoded as an
    `input_audio` part is; `suffix` (`.mp3`, or `""`) is a hint, the decoders read the content itself."""
    if len(data) > limits.max_part_bytes:
        raise too_large(param, f"{len(data) / MIB:.1f} MB", f"{limits.max_part_bytes / MIB:g} MB", "max_part_bytes")
    if not data:
        raise ApiError(400, f"`{param}` is empty", param=param)
    with _new_content() as decoded:
        decoded.items.append(_audio_item(_write(decoded.folder, data, suffix), limits, param, options))
    return decoded


def _audio_duration_s(path: Path, front_end: AudioFrontEnd, limits: MediaLimits, param: str) -> float:
    """From the header when it says (opening decodes nothing); else by decoding, stopped at the limit."""
    stream = front_end.open_stream(path)
    try:
        if stream.duration_s is not None:
            _check_audio_s(stream.duration_s, limits, param)
            return stream.duration_s
        n_samples = 0
        for block in stream:  # a file that does not state its length: counted, never held
            n_samples += len(block)
            _check_audio_s(n_samples / SAMPLE_RATE_HZ, limits, param)
        return n_samples / SAMPLE_RATE_HZ
    finally:
        stream.close()


def _check_audio_s(duration_s: float, limits: MediaLimits, param: str) -> None:
    if duration_s > limits.max_audio_s:
        raise too_large(param, f"{_clock(duration_s)} of audio", _clock(limits.max_audio_s), "max_audio_s")


def _clock(seconds: float) -> str:
    from lyra_cli.timefmt import clock

    return f"`{clock(seconds)}`"


# -- images and videos ------------------------------------------------------------------------------------


def _decode_image(path: Path, limits: MediaLimits, param: str) -> Any:
    from PIL import Image

    with lyra_errors(path, param):
        try:  # the header only; a file PIL cannot open gets read_media's message below
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit below decides
                with Image.open(path) as header:
                    width, height = header.size
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
            width = height = 0
        if width * height > limits.max_image_pixels:
            raise too_large(param, f"`{width}×{height}` px", f"`{limits.max_image_pixels:,}` pixels",
                            "max_image_pixels")  # fmt: skip
        return replace(_read_media("image", path), source=param)


def _decode_video(path: Path, limits: MediaLimits, param: str) -> Any:
    with lyra_errors(path, param):
        frames, duration_s = _video_header(path)
        if duration_s is not None and duration_s > limits.max_video_s:
            raise too_large(param, f"{_clock(duration_s)} of video", _clock(limits.max_video_s), "max_video_s")
        if frames is not None and frames > limits.max_video_frames:
            raise too_large(param, f"`{frames:,}` frames", f"`{limits.max_video_frames:,}` frames", "max_video_frames")
        return replace(_read_media("video", path), source=param)


def _video_header(path: Path) -> tuple[int | None, float | None]:
    """(frames, seconds) of the first video stream as the container states them, decoding nothing; None
    where it does not say (or is not a video: `read_media` then says what is wrong)."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                return None, None
            stream = container.streams.video[0]
            duration_s = None
            if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
                duration_s = float(stream.duration * stream.time_base)
            elif container.duration is not None and container.duration > 0:
                duration_s = container.duration / av.time_base
            frames = stream.frames or None
            if frames is None and duration_s is not None and stream.average_rate:
                frames = math.ceil(duration_s * float(stream.average_rate))
            return frames, duration_s
    except (av.FFmpegError, OSError, ValueError, UnicodeDecodeError):
        return None, None


# -- the command line's decoders, their messages naming the request field ---------------------------------


def _read_media(kind: str, path: Path, front_end: AudioFrontEnd | None = None) -> Any:
    """`lyra_cli.engine.read_media`, the decoder `lyra chat` uses (the one place media are decoded)."""
    from lyra_cli.engine import read_media

    return read_media(kind, path) if front_end is None else read_media(kind, path, front_end)


@contextmanager
def lyra_errors(path: Path | None, param: str) -> Iterator[None]:
    """Turns a `LyraError` raised inside into a 400 `ApiError` for `param`, with the temporary `path` in
    its message replaced by the request field (a response never shows the server's paths)."""
    try:
        yield
    except LyraError as error:
        if path is not None:
            error.message = error.message.replace(str(path), param)
            error.hint = error.hint.replace(str(path), param) if error.hint else error.hint
        raise from_lyra_error(error, param=param) from error


# ---------------------------------------------------------------------------------------------------------
# Step 2: encode (the engine's worker thread)


def encode_content(
    engine: Engine,
    decoded: DecodedContent,
    *,
    cache: SpeechTokenCache | None = None,
    media_cache: MediaCache | None = None,
    extract: bool = False,
    on_progress: Callable[[Progress], None] | None = None,
) -> list[Part]:
    """The prompt parts of a decoded content, in order: text as is, media through `engine.encode`, each
    `Recording` through the long-speech path (`RecordingEncoder`, the speech-token `cache` when given,
    `on_progress` following its encoding in seconds of audio).

    A `CachedMedium` is its part as stored, renamed for this request's field; each medium with a key in
    `decoded.cache_keys` is stored in `media_cache` once encoded.

    A recording whose prompt would exceed the model's positions is refused (400) unless `extract` (the
    extractor is on for this request), as `lyra longspeech` refuses it. Raises `ApiError` (400) for media
    this model cannot take (no vision or speech tower)."""
    from lyra_cli.engine import TextPart
    from lyra_cli.serve.media_cache import CachedMedium

    parts: list[Part] = []
    for index, item in enumerate(decoded.items):
        if isinstance(item, TextPart):
            parts.append(item)
        elif isinstance(item, CachedMedium):
            parts.append(replace(item.part, source=item.source))  # the same tensors, never changed
        elif isinstance(item, Recording):
            with lyra_errors(item.path, item.source):  # damage found only while decoding surfaces here
                parts.append(_encode_recording(engine, item, cache, extract, on_progress))
        else:
            with lyra_errors(None, item.source):
                parts.append(engine.encode(item))
            if media_cache is not None and index in decoded.cache_keys:
                media_cache.put(decoded.cache_keys[index], parts[-1])
    return parts


def _encode_recording(
    engine: Engine,
    recording: Recording,
    cache: SpeechTokenCache | None,
    extract: bool,
    on_progress: Callable[[Progress], None] | None,
) -> Part:
    # engine internals the public API does not cover yet: the long-speech path of `lyra longspeech`
    from lyra_cli.engine.run.longspeech import (
        LongSpeechSettings,
        RecordingEncoder,
        longest_fitting_s,
        prompt_tokens,
        windows_for,
    )
    from lyra_cli.errors import InputError

    if engine.model.model.speech_tower is None:
        raise InputError("this model has no speech tower", "send no `input_audio` to this model")
    max_positions = engine.loaded.config.text.max_position_embeddings
    if not extract and prompt_tokens(windows_for(recording.duration_s)) > max_positions:
        fits = _clock(longest_fitting_s(max_positions))
        raise ApiError(400, f"`{recording.source}` holds {_clock(recording.duration_s)} of audio, more than the "
                            f"model's {max_positions:,} positions take ({fits}): send `lyra.extract` to drop unneeded "
                            "speech tokens while reading, or a shorter recording",
                       param=recording.source, code="context_length_exceeded")  # fmt: skip
    settings = LongSpeechSettings(front_end=recording.front_end, use_cache=cache is not None)
    part, _cached = RecordingEncoder(engine, settings, cache).encode(recording.path, on_progress)
    if part.n_windows == 1:  # its header overstated it: a clip after all, kept as frames like every clip
        clip = _read_media("speech", recording.path, recording.front_end)
        return engine.encode(replace(clip, source=recording.source))
    return replace(part, source=recording.source)

"""`POST /v1/audio/transcriptions`: Lyra as a speech recogniser, prompted as the authors' LibriSpeech eval.

    form = parse_form(response_format="json")            # the server reads the multipart form
    with decode_upload(data, filename, limits) as decoded:     # request thread: limits, decoding
        result = transcribe(engine, decoded)                    # worker thread: encode + generate
    body = response_body(result, "json")                        # {"text": ...}

The prompt is the eval's (`lyra eval librispeech`): the recording, then the authors' instruction
(`suites.ASR_INSTRUCTION`), in a fresh conversation with the default system prompt, answered greedily with
the eval's token budget (`suites.ASR_MAX_NEW_TOKENS`) per 30 s window — the eval's clips are one window;
a longer recording (through the long-speech path, as in chat) gets the same budget for each window.

Response formats: `json` (`{"text"}`, the default), `text` (the text alone) and `verbose_json`
(`{"task", "language", "duration", "text"}`; Lyra detects no language, so `language` is the request's own
`language` field, or null). `srt` and `vtt` need timestamps, which Lyra does not produce: refused (400).
The file is checked against the same `MediaLimits` as an `input_audio` part.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lyra_cli.errors import LyraError
from lyra_cli.serve.errors import ApiError, from_lyra_error
from lyra_cli.serve.media import (
    AUDIO_FORMATS,
    DecodedContent,
    MediaLimits,
    MediaOptions,
    decode_audio_file,
    encode_content,
)

if TYPE_CHECKING:
    from lyra_cli.audio.cache import SpeechTokenCache
    from lyra_cli.engine import Done, Engine, Part

RESPONSE_FORMATS = ("json", "text", "verbose_json")
UNTIMED_FORMATS = ("srt", "vtt")  # OpenAI's, refused: they need timestamps
FILE_PARAM = "file"
# an upload's suffix -> the temporary file's (OpenAI's list: flac mp3 mp4 mpeg mpga m4a ogg wav webm)
UPLOAD_SUFFIXES = {*AUDIO_FORMATS.values(), ".mpeg", ".mpga", ".oga"}


@dataclass(frozen=True, eq=False)
class Transcription:
    """What `transcribe` heard: the text, the recording's length, the prompt's parts and the turn's `Done`."""

    text: str
    duration_s: float
    parts: list[Part]
    done: Done


def check_response_format(value: Any, *, param: str = "response_format") -> str:
    """`json` (the default, for None), `text` or `verbose_json`; others are a 400 naming the valid ones."""
    value = "json" if value is None else value
    if value in RESPONSE_FORMATS:
        return value
    why = " (they need timestamps, which Lyra does not produce)" if value in UNTIMED_FORMATS else ""
    raise ApiError(400, f"`{param}` is `{value}`{why}; lyra answers {', '.join(f'`{f}`' for f in RESPONSE_FORMATS)}",
                   param=param)  # fmt: skip


def decode_upload(
    data: bytes, filename: str | None, limits: MediaLimits, *, options: MediaOptions = MediaOptions()
) -> DecodedContent:
    """The uploaded file decoded (limits first) as one audio item; its name's suffix is a hint, the decoders
    read the content. The caller closes the result (a long recording keeps its temporary file till then)."""
    suffix = Path(filename or "").suffix.lower()
    return decode_audio_file(data, suffix if suffix in UPLOAD_SUFFIXES else "", limits, param=FILE_PARAM,
                             options=options)  # fmt: skip


def transcribe(
    engine: Engine,
    decoded: DecodedContent,
    *,
    temperature: float | None = None,
    cache: SpeechTokenCache | None = None,
) -> Transcription:
    """The eval's LibriSpeech prompt on the decoded upload, greedy unless `temperature` is given."""
    from lyra_cli.engine import Conversation

    (speech,) = encode_content(engine, decoded, cache=cache)
    parts = librispeech_prompt(speech)
    budget = asr_max_new_tokens() * speech.n_windows
    try:
        sampling = engine.sampling(temperature=0.0 if temperature is None else temperature, max_new_tokens=budget)
    except LyraError as error:  # a bad `temperature`
        raise from_lyra_error(error) from error
    done = engine.generate(Conversation(), parts, sampling, voice=None)
    return Transcription(done.text, speech.duration_s, parts, done)


def librispeech_prompt(speech: Part) -> list[Part]:
    """The user turn of `lyra eval librispeech` (its suite's layout) with `speech` as the recording."""
    # engine internals: the eval's suite registry, so the prompt cannot drift from the eval's
    from lyra_cli.engine import TextPart
    from lyra_cli.engine.eval.suites import SPEECH_MODE, EvalItem, get_suite

    item = EvalItem(id="upload", index=0, question=None, image=None, speech=Path(FILE_PARAM))
    pieces = get_suite("librispeech").layouts[SPEECH_MODE](item)
    return [speech if piece.kind == "speech" else TextPart(piece.value) for piece in pieces]


def asr_max_new_tokens() -> int:
    """The eval's token budget for one LibriSpeech clip."""
    from lyra_cli.engine.eval.suites import get_suite

    return get_suite("librispeech").max_new_tokens


def response_body(result: Transcription, response_format: str, *, language: str | None = None) -> dict | str:
    """The response in `response_format` (checked by `check_response_format`): a JSON object, or for `text`
    the text alone (the server sends it as `text/plain`)."""
    if response_format == "text":
        return result.text
    if response_format == "verbose_json":
        return {"task": "transcribe", "language": language, "duration": round(result.duration_s, 3),
                "text": result.text}  # fmt: skip
    return {"text": result.text}

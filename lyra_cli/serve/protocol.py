"""OpenAI's Chat Completions in and out: a request body checked field by field into a `ChatRequest`, and the
`chat.completion` / `chat.completion.chunk` objects built from the engine's events.

Every field the request may carry is listed here; anything else is a 400 naming it, so a client never
believes an option took effect when lyra ignored it. Errors name the field as the request spells it
(`messages[1].content[0].image_url`), as OpenAI's `param` does."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lyra_cli.serve.errors import ApiError

if TYPE_CHECKING:
    from lyra_cli.engine import TokenLogprob

MB = 1024 * 1024
DEFAULT_MAX_REQUEST_MB = 50  # a request body: a few minutes of wav, or a handful of large images, in base64
MAX_STOP_SEQUENCES = 4  # as OpenAI
MAX_TOP_LOGPROBS = 20
SYSTEM_ROLES = ("system", "developer")  # `developer` is OpenAI's newer name for the system message
# accepted and without effect on the answer: bookkeeping fields clients send by default
IGNORED_FIELDS = ("metadata", "store", "service_tier", "parallel_tool_calls")
SAMPLING_FIELDS = ("temperature", "top_p", "max_tokens", "max_completion_tokens", "seed")
CHAT_FIELDS = frozenset({
    "model", "messages", "stream", "stream_options", "n", "stop", "logprobs", "top_logprobs", "user",
    "frequency_penalty", "presence_penalty", "modalities", "audio", "response_format", "lyra",
    *SAMPLING_FIELDS, *IGNORED_FIELDS,
})  # fmt: skip
LYRA_SAMPLING = ("top_k", "repetition_penalty")  # sampling settings OpenAI's API has no field for
LYRA_FIELDS = ("extract", "official_audio", *LYRA_SAMPLING)
MODALITIES = ("text", "audio")


@dataclass(frozen=True)
class Message:
    """One turn of the request's history: the user's content as sent (a string or a list of parts, decoded
    later by `media.decode_content`) with where it sits in the request (`messages[2].content`), one pair per
    user message of the turn, and the assistant's answer (None for the question being asked)."""

    contents: tuple[tuple[Any, str], ...]
    answer: str | None = None
    answer_audio_id: str | None = None  # an earlier spoken answer named by its audio id
    answer_param: str | None = None  # where the answer sits (`messages[3]`)


@dataclass(frozen=True)
class ChatRequest:
    model: str
    system: str | None  # None: the model's default system prompt
    turns: tuple[Message, ...]  # the last one is the question
    sampling: Mapping[str, Any]  # engine `SamplingConfig` fields the request sets
    stream: bool = False
    include_usage: bool = False
    top_logprobs: int | None = None  # None: no logprobs asked for
    stop: tuple[str, ...] = ()
    audio: Mapping[str, Any] | None = None  # `audio` with "audio" in `modalities`: speak the answer
    lyra: Mapping[str, Any] = field(default_factory=dict)
    user: str | None = None
    fields: frozenset[str] = frozenset()  # the fields the body set (errors name them as sent)


def parse_chat(body: Any) -> ChatRequest:
    """A request body (parsed JSON) as a `ChatRequest`; a 400 `ApiError` naming the field at fault."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - CHAT_FIELDS)
    if unknown:
        raise ApiError(400, f"unsupported parameter `{unknown[0]}`", param=unknown[0], code="unsupported_parameter")
    _refuse_unsupported(body)
    system, turns = parse_messages(body.get("messages"))
    stream = _bool(body, "stream")
    lyra = _lyra(body.get("lyra"))
    return ChatRequest(
        model=_str(body, "model", required=True),
        system=system,
        turns=turns,
        sampling={**_sampling(body), **{k: lyra[k] for k in LYRA_SAMPLING if k in lyra}},
        stream=stream,
        include_usage=_include_usage(body, stream),
        top_logprobs=_logprobs(body),
        stop=_stop(body.get("stop")),
        audio=_audio(body),
        lyra=lyra,
        user=_str(body, "user"),
        fields=frozenset(body),
    )


def _refuse_unsupported(body: Mapping[str, Any]) -> None:
    """Fields OpenAI defines that lyra does not implement: refused unless set to their no-op value."""
    n = body.get("n")
    if n is not None and n != 1:
        raise ApiError(400, f"`n` must be 1 (lyra answers one choice per request), got `{n}`", param="n")
    for name in ("frequency_penalty", "presence_penalty"):
        value = body.get(name)
        if value not in (None, 0, 0.0):
            raise ApiError(400, f"`{name}` is not supported (lyra has `repetition_penalty` in the model's "
                                f"generation config); leave it out or 0", param=name)  # fmt: skip
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise ApiError(400, "only `response_format` {\"type\": \"text\"} is supported", param="response_format")


# -- messages -------------------------------------------------------------------------------------


def parse_messages(messages: Any) -> tuple[str | None, tuple[Message, ...]]:
    """The system prompt and the turns: each user message a turn, the assistant message after it its answer;
    consecutive user messages make one turn. The last message must be the user's question."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "`messages` must be a non-empty list", param="messages")
    system: list[str] = []
    turns: list[Message] = []
    contents: list[tuple[Any, str]] = []  # the user turn being collected
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        role = _role(message, param)
        if role in SYSTEM_ROLES:
            if turns or contents:
                raise ApiError(400, "a system message must come before the conversation's turns", param=param)
            system.append(_text_only(message.get("content"), f"{param}.content"))
        elif role == "user":
            contents.append((_user_content(message.get("content"), f"{param}.content"), f"{param}.content"))
        else:
            if not contents:
                raise ApiError(400, "an assistant message must follow a user message", param=param)
            turns.append(_answered(tuple(contents), message, param))
            contents = []
    if not contents:
        raise ApiError(400, "the last message must be the user's (the question to answer)", param="messages")
    turns.append(Message(tuple(contents)))
    return ("\n".join(system) if system else None), tuple(turns)


def _role(message: Any, param: str) -> str:
    if not isinstance(message, dict):
        raise ApiError(400, "each message must be an object with `role` and `content`", param=param)
    role = message.get("role")
    if role not in (*SYSTEM_ROLES, "user", "assistant"):
        raise ApiError(400, f"unsupported role `{role}` (lyra takes system, user and assistant messages)",
                       param=f"{param}.role")  # fmt: skip
    return role


def _user_content(content: Any, param: str) -> Any:
    """A user message's content, its parts checked when decoded (`media.decode_content`)."""
    if isinstance(content, str) or (isinstance(content, list) and content):
        return content
    raise ApiError(400, "`content` must be a string or a non-empty list of parts", param=param)


def _answered(contents: tuple[tuple[Any, str], ...], message: Mapping[str, Any], at: str) -> Message:
    """The user turn with the assistant's answer: its text, or an earlier spoken answer by audio id."""
    audio = message.get("audio")
    audio_id = None
    if audio is not None:
        if not isinstance(audio, dict) or not isinstance(audio.get("id"), str):
            raise ApiError(400, "`audio` of an assistant message must be {\"id\": ...}", param=f"{at}.audio")
        audio_id = audio["id"]
    content = message.get("content")
    if content is None and audio_id is None:
        raise ApiError(400, "an assistant message needs `content` or `audio`", param=f"{at}.content")
    # the engine keeps its own answers stripped: the same text renders the same prompt
    text = _text_only(content, f"{at}.content").strip() if content is not None else None
    return Message(contents, answer=text, answer_audio_id=audio_id, answer_param=at)


def _text_only(content: Any, param: str) -> str:
    """System and assistant content: a string or text parts only."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(_part_text(p, f"{param}[{j}]") for j, p in enumerate(content))
    raise ApiError(400, "this message's `content` must be text (a string or text parts)", param=param)


def _part_text(part: Mapping[str, Any], param: str) -> str:
    text = part.get("text")
    if not isinstance(text, str):
        raise ApiError(400, "a text part needs a string `text`", param=f"{param}.text")
    return text


# -- options --------------------------------------------------------------------------------------


def _sampling(body: Mapping[str, Any]) -> dict[str, Any]:
    """The sampling fields as `SamplingConfig` fields (values checked by the engine's own validation)."""
    sampling: dict[str, Any] = {}
    for name, kind in (("temperature", (int, float)), ("top_p", (int, float)), ("seed", int)):
        value = body.get(name)
        if value is not None:
            sampling[name] = _typed(value, kind, name)
    if sampling.get("temperature", 0) > 2:
        raise ApiError(400, f"`temperature` must be in [0, 2], got `{sampling['temperature']}`", param="temperature")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        sampling["max_new_tokens"] = _typed(max_tokens, int, name)
    return sampling


def _typed(value: Any, kind: type | tuple[type, ...], name: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, kind):
        wanted = "an integer" if kind is int else "a number"
        raise ApiError(400, f"`{name}` must be {wanted}, got `{value!r}`", param=name)
    return value


def _logprobs(body: Mapping[str, Any]) -> int | None:
    wanted = _bool(body, "logprobs")
    top = body.get("top_logprobs")
    if top is not None:
        _typed(top, int, "top_logprobs")
        if not 0 <= top <= MAX_TOP_LOGPROBS:
            raise ApiError(400, f"`top_logprobs` must be 0..{MAX_TOP_LOGPROBS}, got `{top}`", param="top_logprobs")
        if not wanted:
            raise ApiError(400, "`top_logprobs` needs `logprobs: true`", param="top_logprobs")
    return (top or 0) if wanted else None


def _stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "`stop` must be a non-empty string or a list of them", param="stop")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise ApiError(400, f"`stop` takes at most {MAX_STOP_SEQUENCES} sequences, got {len(stops)}", param="stop")
    return tuple(stops)


def _include_usage(body: Mapping[str, Any], stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise ApiError(400, "`stream_options` is only allowed with `stream: true`", param="stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise ApiError(400, "`stream_options` takes only `include_usage`", param="stream_options")
    return _bool(options, "include_usage", param="stream_options.include_usage")


def _audio(body: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """`audio` (voice, format) when `modalities` asks for audio; the values are checked by the speech side."""
    modalities = body.get("modalities")
    if modalities is None:
        modalities = ["text"]
    if not isinstance(modalities, list) or not set(modalities) <= set(MODALITIES) or "text" not in modalities:
        raise ApiError(400, "`modalities` must be [\"text\"] or [\"text\", \"audio\"]", param="modalities")
    audio = body.get("audio")
    if "audio" not in modalities:
        if audio is not None:
            raise ApiError(400, "`audio` needs `modalities: [\"text\", \"audio\"]`", param="audio")
        return None
    if not isinstance(audio, dict):
        raise ApiError(400, "`modalities` with audio needs `audio`: {\"voice\": ..., \"format\": ...}", param="audio")
    return audio


def _lyra(options: Any) -> dict[str, Any]:
    """lyra's own options (the SDK's `extra_body={"lyra": {...}}`)."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ApiError(400, "`lyra` must be an object of lyra's options", param="lyra")
    unknown = sorted(set(options) - set(LYRA_FIELDS))
    if unknown:
        raise ApiError(400, f"unknown lyra option `{unknown[0]}` (known: {', '.join(LYRA_FIELDS)})",
                       param=f"lyra.{unknown[0]}")  # fmt: skip
    if "extract" in options and not isinstance(options["extract"], str):
        raise ApiError(400, "`lyra.extract` must be a string like `4x0.7`", param="lyra.extract")
    if "official_audio" in options:
        _bool(options, "official_audio", param="lyra.official_audio")
    if "top_k" in options:
        _typed(options["top_k"], int, "lyra.top_k")
    if "repetition_penalty" in options:
        _typed(options["repetition_penalty"], (int, float), "lyra.repetition_penalty")
    return dict(options)


def _bool(body: Mapping[str, Any], name: str, *, param: str | None = None) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"`{param or name}` must be true or false, got `{value!r}`", param=param or name)
    return value


def _str(body: Mapping[str, Any], name: str, *, required: bool = False) -> Any:
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise ApiError(400, f"`{name}` must be a string", param=name)
    return value


# -- stop sequences -------------------------------------------------------------------------------


class StopScanner:
    """Cuts the answer at the first stop sequence, in a stream: text that may be the start of one is held back
    until it is known not to be, so a stop sequence never reaches the client, even split over deltas.

    Log-probabilities travel with the text they belong to: those of held-back text wait with it."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.stopped = False
        self._text = ""
        self._logprobs: list = []

    def push(self, text: str, logprobs: Sequence = ()) -> tuple[str, list]:
        """The text (and logprobs) safe to send now; sets `stopped` when a stop sequence appeared."""
        self._text += text
        self._logprobs += logprobs
        cut = min((i for i in (self._text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._release(cut)
        return self._release(len(self._text) - self._held_back())

    def flush(self) -> tuple[str, list]:
        return self._release(len(self._text))

    def _held_back(self) -> int:
        """Length of the longest end of the text that begins a stop sequence."""
        return max((n for s in self.stops for n in range(1, len(s)) if self._text.endswith(s[:n])), default=0)

    def _release(self, n: int) -> tuple[str, list]:
        text, self._text = self._text[:n], ("" if self.stopped else self._text[n:])
        if self._text and not self.stopped:
            return text, []  # the logprobs wait with the held-back text
        logprobs, self._logprobs = self._logprobs, []
        return text, logprobs


# -- responses ------------------------------------------------------------------------------------


def completion_id() -> str:
    return f"chatcmpl-{secrets.token_hex(12)}"


def finish_reason(stop_reason: str, stopped_by_sequence: bool) -> str:
    """OpenAI's names: "stop" for an end token or a stop sequence, "length" for the token cap."""
    return "stop" if stopped_by_sequence or stop_reason == "end" else "length"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    """`cached_tokens`: prompt tokens whose keys and values came from this client's previous prompt."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def logprobs_content(logprobs: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
    """OpenAI's `logprobs.content`: per token its text, UTF-8 bytes, log-probability and alternatives."""
    return [
        {**_token(lp.token, lp.logprob), "top_logprobs": [_token(t.token, t.logprob) for t in lp.top_logprobs]}
        for lp in logprobs
    ]


def _token(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def completion(
    cid: str, model: str, message: Mapping[str, Any], finish: str, usage_: Mapping[str, Any],
    logprobs: Sequence[TokenLogprob] | None,
) -> dict[str, Any]:  # fmt: skip
    """The `chat.completion` object of a non-streamed answer."""
    choice = {
        "index": 0,
        "message": {"role": "assistant", "refusal": None, **message},
        "logprobs": {"content": logprobs_content(logprobs), "refusal": None} if logprobs is not None else None,
        "finish_reason": finish,
    }
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [choice], "usage": dict(usage_), "system_fingerprint": None}  # fmt: skip


def chunk(
    cid: str, model: str, delta: Mapping[str, Any], *, finish: str | None = None,
    logprobs: Sequence[TokenLogprob] | None = None, include_usage: bool = False, created: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """One `chat.completion.chunk` with a choice (`usage` null when the client asked for usage at the end);
    `created` (unix seconds) is now unless given: all chunks of an answer carry the same one, as OpenAI's."""
    choice = {"index": 0, "delta": dict(delta), "logprobs": _chunk_logprobs(logprobs), "finish_reason": finish}
    return _chunk_body(cid, model, choice, include_usage, int(time.time()) if created is None else created)


def _chunk_logprobs(logprobs: Sequence[TokenLogprob] | None) -> dict[str, Any] | None:
    return {"content": logprobs_content(logprobs), "refusal": None} if logprobs is not None else None


def _chunk_body(cid: str, model: str, choice: Any, include_usage: bool, created: int) -> dict[str, Any]:
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [choice], "system_fingerprint": None}  # fmt: skip
    if include_usage:
        body["usage"] = None
    return body


_to_json = json.JSONEncoder(ensure_ascii=False).encode  # `json.dumps(..., ensure_ascii=False)`, built once


def sse(body: Any) -> str:
    """One server-sent event carrying `body` as JSON."""
    return f"data: {_to_json(body)}\n\n"


class DeltaChunks:
    """The server-sent events of one streamed answer's delta chunks, each the text `sse(chunk(...))` gives
    for the same delta: everything but the delta and its logprobs is the same in every chunk of an answer,
    so it is rendered once, and each chunk encodes only what changes (it is sent once a token)."""

    def __init__(self, cid: str, model: str, *, include_usage: bool, created: int | None = None) -> None:
        self.created = int(time.time()) if created is None else created
        # stand-ins for the delta and the logprobs, found again in the rendered text (a random name: no other
        # string of the chunk can contain it)
        delta, logprobs = (f"lyra-{what}-{secrets.token_hex(8)}" for what in ("delta", "logprobs"))
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": None}
        template = sse(_chunk_body(cid, model, choice, include_usage, self.created))
        self._head, rest = template.split(_to_json(delta))
        self._middle, self._tail = rest.split(_to_json(logprobs))

    def sse(self, delta: Mapping[str, Any], logprobs: Sequence[TokenLogprob] | None = None) -> str:
        return f"{self._head}{_to_json(delta)}{self._middle}{_to_json(_chunk_logprobs(logprobs))}{self._tail}"


def usage_chunk(cid: str, model: str, usage_: Mapping[str, Any], created: int | None = None) -> dict[str, Any]:
    """The extra last chunk of `stream_options.include_usage`: no choices, the whole request's usage."""
    created = int(time.time()) if created is None else created
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [], "usage": dict(usage_), "system_fingerprint": None}  # fmt: skip

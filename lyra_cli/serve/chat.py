"""`POST /v1/chat/completions`: a `ChatRequest` becomes an engine job, and the job's events become OpenAI's
answer: one `chat.completion`, or `chat.completion.chunk` server-sent events as they come.

Each request builds its own `Conversation` from its messages (the history's media encoded again, so a turn
renders exactly as it did the first time and the client's prefix cache matches); nothing of one request is
visible to another. Streamed and non-streamed answers consume the same events through `Answer`, so their
text, logprobs and usage are the same."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool

from lyra_cli.serve import internals, protocol
from lyra_cli.serve.errors import INTERNAL_ERROR, ApiError, from_lyra_error
from lyra_cli.serve.worker import Finished, Job

if TYPE_CHECKING:
    from lyra_cli.engine import Engine, SamplingConfig
    from lyra_cli.serve.media import DecodedContent, MediaLimits
    from lyra_cli.serve.media_cache import MediaCache
    from lyra_cli.serve.speech import AudioStore, SpokenAnswer

log = logging.getLogger(__name__)

SSE_DONE = "data: [DONE]\n\n"


@dataclass(frozen=True)
class ChatJob:
    """What the worker needs to answer a request: the conversation's content, decoded and checked on the
    request's side (`media.decode_content`), and the generation settings. The worker encodes the media (the
    towers run on its thread) and calls `close` when done, which removes the decoded files."""

    system: str | None
    history: tuple[tuple[tuple["DecodedContent", ...], str], ...]  # (user content, answer) per earlier turn
    question: tuple["DecodedContent", ...]
    sampling: "SamplingConfig"
    extractor: Any = None  # the request's `lyra.extract` (None: the model's config decides)
    extracting: bool = False  # whether an extractor runs (the request's, or the config's)
    voice: Any = None  # the engine's `Voice` when the answer is spoken
    speech_cache: Any = None  # the speech-token cache long recordings are encoded through
    media_cache: Any = None  # the server's `MediaCache`, where the media encoded here are kept for later turns

    def __call__(self, engine: "Engine", check: Callable[[], None]) -> Iterator[Any]:
        from lyra_cli.engine import Conversation

        conversation = Conversation() if self.system is None else Conversation(system=self.system)
        for contents, answer in self.history:
            conversation.turns.append(internals.answered_turn(self._parts(engine, contents, check), answer))
        parts = self._parts(engine, self.question, check)
        self._check_fits(engine, conversation, parts)
        check()
        yield from internals.respond(engine, conversation, parts, self.sampling, extractor=self.extractor,
                                     voice=self.voice, on_prefill_progress=lambda _done, _total: check())  # fmt: skip

    def _check_fits(self, engine: "Engine", conversation: Any, parts: list) -> None:
        """Refuse a prompt that with its answer would not fit the model's positions, before it is prefilled
        (a huge one would exhaust memory first). With an extractor, long media may exceed them (it drops
        tokens as it reads, as `lyra longspeech` does), but the text still has to fit."""
        turns = [(turn.user, turn.answer) for turn in conversation.turns] + [(parts, None)]
        n_prompt = internals.prompt_tokens(engine, conversation.system, turns, media=not self.extracting)
        context = internals.context_tokens(engine)
        if n_prompt + self.sampling.max_new_tokens > context:
            raise ApiError(400, f"this conversation takes about {n_prompt:,} tokens and `max_tokens` asks for "
                                f"{self.sampling.max_new_tokens:,} more: the model has {context:,} positions; send "
                                "a shorter conversation or a smaller `max_tokens`",
                           param="messages", code="context_length_exceeded")  # fmt: skip

    def _parts(self, engine: "Engine", contents: Sequence["DecodedContent"], check: Callable[[], None]) -> list:
        from lyra_cli.serve.media import encode_content

        return [part for decoded in contents
                for part in encode_content(engine, decoded, cache=self.speech_cache, media_cache=self.media_cache,
                                           extract=self.extracting, on_progress=lambda _progress: check())]  # fmt: skip

    def close(self) -> None:
        for contents in (*(c for c, _ in self.history), self.question):
            for decoded in contents:
                decoded.close()


def decode_turns(request: protocol.ChatRequest, limits: "MediaLimits", store: "AudioStore",
                 media_cache: "MediaCache | None" = None) -> tuple[tuple, tuple]:  # fmt: skip
    """Every user message's content decoded (limits checked first), and each earlier turn's answer text
    (an answer named by its audio id stands for its transcript). On an error nothing decoded is left.
    Media found in `media_cache` (earlier turns, usually) are neither decoded nor encoded again."""
    from lyra_cli.serve.media import MediaOptions, decode_content

    options = MediaOptions.from_request(request.lyra)
    decoded: list = []
    turns = []
    try:
        for message in request.turns:
            contents = []
            for content, param in message.contents:
                contents.append(decode_content(content, limits, param=param, options=options, cache=media_cache))
                decoded.append(contents[-1])
            turns.append((tuple(contents), _answer_text(message, store)))
    except BaseException:
        for item in decoded:
            item.close()
        raise
    history = tuple(turns[:-1])
    return history, turns[-1][0]


def _answer_text(message: protocol.Message, store: "AudioStore") -> str:
    if message.answer is not None:
        return message.answer
    if message.answer_audio_id is not None:
        return store.transcript(message.answer_audio_id, param=f"{message.answer_param}.audio.id").strip()
    return ""


def sampling_for(engine: "Engine", request: protocol.ChatRequest) -> "SamplingConfig":
    """The model's defaults with the request's fields on top (OpenAI's default temperature is 1; lyra keeps
    the model's own, greedy for the release, so an answer repeats unless the client asks otherwise).
    `lyra.top_k` and `lyra.repetition_penalty` set what OpenAI's API has no field for."""
    from lyra_cli.errors import LyraError

    overrides = dict(request.sampling)
    if "temperature" in overrides or "top_p" in overrides:
        # OpenAI samples over the whole vocabulary (it has no top_k, and top_p is 1 unless sent); a release's
        # generation config keeps top_k 1 and top_p 0.001, under which a request's temperature would change nothing
        overrides.setdefault("top_k", 0)
        overrides.setdefault("top_p", 1.0)
    if request.top_logprobs is not None:
        overrides["logprobs"] = request.top_logprobs
    elif request.stop:  # a cut answer's token count comes from its logprobs (cheap: one log-softmax a step)
        overrides["logprobs"] = 0
    try:
        sampling = engine.sampling(**overrides)
    except LyraError as exc:
        raise from_lyra_error(exc) from None
    context = internals.context_tokens(engine)
    if sampling.max_new_tokens >= context:
        name = "max_completion_tokens" if "max_completion_tokens" in request.fields else "max_tokens"
        raise ApiError(400, f"`{name}` is `{sampling.max_new_tokens:,}`: the model has {context:,} positions for "
                            "the prompt and the answer together", param=name, code="context_length_exceeded")  # fmt: skip
    return sampling


@dataclass
class Answer:
    """The answer as its events arrive: each event's deltas for the client, and what the final object needs.

    Text goes out as `content` deltas as soon as it is known not to start a stop sequence; with speech on,
    `audio` deltas (speech.py's `SpokenAnswer`) go out as the vocoder gives them, and their transcripts carry
    the same text again, as OpenAI's do."""

    request: protocol.ChatRequest
    spoken: "SpokenAnswer | None" = None
    scanner: protocol.StopScanner = field(init=False)
    text: list[str] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    stop_reason: str = "length"
    done: bool = False  # the engine finished, or a stop sequence ended the answer

    def __post_init__(self) -> None:
        self.scanner = protocol.StopScanner(self.request.stop)

    def on_event(self, event: Any) -> list[dict[str, Any]]:
        """The deltas this event adds: `{"content", "logprobs"}` and `{"audio"}` pieces, in order."""
        from lyra_cli.engine import AudioChunk, Done, Prefilled, TextDelta

        if self.done:
            return []
        if isinstance(event, Prefilled):
            self.prompt_tokens, self.cached_tokens = event.prompt_tokens, event.reused_tokens
        elif isinstance(event, TextDelta):
            self.completion_tokens += len(event.logprobs)
            return self._text(*self.scanner.push(event.text, event.logprobs))
        elif isinstance(event, AudioChunk) and self.spoken is not None:
            audio = self.spoken.on_audio(event)
            return [{"audio": audio}] if audio is not None else []
        elif isinstance(event, Done):
            self.stop_reason = event.stop_reason
            self.prompt_tokens, self.completion_tokens = event.prompt_tokens, event.new_tokens
            self.cached_tokens = event.reused_tokens
            return self._text(*self.scanner.flush(), last=True)
        return []

    def _text(self, text: str, logprobs: list, *, last: bool = False) -> list[dict[str, Any]]:
        self.text.append(text)
        self.logprobs += logprobs
        deltas = []
        if text or logprobs:
            deltas.append({"content": text, "logprobs": logprobs if self.request.top_logprobs is not None else None})
        if text and self.spoken is not None:
            self.spoken.on_text(text)
        if last or self.scanner.stopped:
            self.done = True
            if self.spoken is not None and self.request.stream:
                deltas += [{"audio": audio} for audio in self.spoken.finish()]
        return deltas

    def message(self) -> dict[str, Any]:
        """The non-streamed `message`: the text, and the spoken answer when asked for."""
        message: dict[str, Any] = {"content": "".join(self.text)}
        if self.spoken is not None:
            message["audio"] = self.spoken.message_audio()
        return message

    @property
    def finish_reason(self) -> str:
        return protocol.finish_reason(self.stop_reason, self.scanner.stopped)

    def usage(self) -> dict[str, Any]:
        return protocol.usage(self.prompt_tokens, self.completion_tokens, self.cached_tokens)

    def reported_logprobs(self) -> list[Any] | None:
        return self.logprobs if self.request.top_logprobs is not None else None


async def job_batches(job: Job) -> AsyncIterator[list[Any]]:
    """The job's engine events in order, in batches of those that arrived together (never waiting for more
    than the first); its failure raised as the `ApiError` the client gets, after the events before it."""
    while True:
        items = await job.events.take()
        if not isinstance(items[-1], Finished):  # `Finished` is the last item a job posts
            yield items
            continue
        *events, finished = items
        if events:
            yield events
        if finished.error is not None:
            raise api_error(finished.error)
        if finished.cancelled:
            raise ApiError(503, "the answer was cancelled (the server is stopping)", code="cancelled")
        return


async def job_events(job: Job) -> AsyncIterator[Any]:
    """The job's engine events one by one (see `job_batches`)."""
    async for batch in job_batches(job):
        for event in batch:
            yield event


def api_error(error: BaseException) -> ApiError:
    from lyra_cli.errors import LyraError

    if isinstance(error, ApiError):
        return error
    if isinstance(error, LyraError):
        return from_lyra_error(error)
    log.error("a request failed", exc_info=error)
    return INTERNAL_ERROR


async def complete(job: Job, answer: Answer, model: str) -> dict[str, Any]:
    """The non-streamed answer: every event consumed, one `chat.completion`."""
    async for batch in job_batches(job):
        _consume(answer, batch)
        if answer.done:
            break
    job.cancel()  # a stop sequence ended it early: the worker drops the rest at its next step
    # encoding the audio file (mp3, opus…) takes a while: off the event loop
    message = answer.message() if answer.spoken is None else await run_in_threadpool(answer.message)
    return protocol.completion(protocol.completion_id(), model, message, answer.finish_reason, answer.usage(),
                               answer.reported_logprobs())  # fmt: skip


def _consume(answer: Answer, events: Sequence[Any]) -> list[dict[str, Any]]:
    """The deltas of `events`, in order, up to the end of the answer (a stop sequence may end it early)."""
    deltas = []
    for event in events:
        deltas += answer.on_event(event)
        if answer.done:
            break
    return deltas


async def first_event(job: Job) -> tuple[list[Any], AsyncIterator[list[Any]]]:
    """Wait for the job's first events, so that a request that fails before answering gets its status code
    (headers are not sent yet); then the rest of the events, in batches (`job_batches`)."""
    batches = job_batches(job)
    first = await batches.__anext__()  # a job always yields `Prefilled` before ending well
    return first, batches


def joined_text(deltas: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Text deltas that follow each other as one (texts and logprobs joined, as OpenAI's chunks may carry
    several tokens): the tokens that arrived together cost the client one chunk to parse. Audio deltas keep
    their place between them."""
    joined: list[Mapping[str, Any]] = []
    for delta in deltas:
        previous = joined[-1] if joined else None
        if previous is not None and _is_text(previous) and _is_text(delta):
            logprobs = previous.get("logprobs"), delta.get("logprobs")
            joined[-1] = {"content": previous["content"] + delta["content"],
                          "logprobs": None if logprobs == (None, None) else [*(logprobs[0] or ()), *(logprobs[1] or ())]}  # fmt: skip
        else:
            joined.append(delta)
    return joined


def _is_text(delta: Mapping[str, Any]) -> bool:
    return "content" in delta and set(delta) <= {"content", "logprobs"}


async def stream(job: Job, answer: Answer, model: str, first: list[Any],
                 batches: AsyncIterator[list[Any]]) -> AsyncIterator[str]:  # fmt: skip
    """The streamed answer as server-sent events; the job is cancelled if the client goes away. The events
    that arrived together go out in one write (the first chunk at once, never waiting for more)."""
    cid = protocol.completion_id()
    usage_on = answer.request.include_usage
    chunks = protocol.DeltaChunks(cid, model, include_usage=usage_on)

    def sse_deltas(events: Sequence[Any]) -> list[str]:
        return [chunks.sse({k: v for k, v in delta.items() if k != "logprobs"}, delta.get("logprobs"))
                for delta in joined_text(_consume(answer, events))]  # fmt: skip

    try:
        pending = [chunks.sse({"role": "assistant", "content": ""}), *sse_deltas(first)]
        while not answer.done:
            if pending:
                yield "".join(pending)
                pending = []
            try:
                batch = await batches.__anext__()
            except StopAsyncIteration:
                break
            pending = sse_deltas(batch)
        job.cancel()  # ended by a stop sequence: the worker drops the rest
        ending = protocol.chunk(cid, model, {}, finish=answer.finish_reason, include_usage=usage_on,
                                created=chunks.created)  # fmt: skip
        pending.append(protocol.sse(ending))
        if usage_on:
            pending.append(protocol.sse(protocol.usage_chunk(cid, model, answer.usage(), created=chunks.created)))
        yield "".join([*pending, SSE_DONE])
    except ApiError as exc:  # the status line is sent: the error goes in the stream, as OpenAI does
        yield protocol.sse(exc.body())
    except Exception as exc:  # a fault of ours mid-stream: logged, and the client told, never the traceback
        yield protocol.sse(api_error(exc).body())
    finally:
        job.cancel()  # the client went away (or the answer ended): nothing more to compute

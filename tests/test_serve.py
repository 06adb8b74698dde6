"""`lyra serve` on the tiny model, talked to with the official `openai` SDK: answers equal the engine's own,
streamed equals non-streamed, usage and logprobs as OpenAI shapes them, stop sequences, per-client prefix
reuse, every error status, the queue's 503 and cancellation when a client goes away.

One server for the module (in a thread of this process, so tests can reach its worker); answers are a few
tokens long."""

from __future__ import annotations

import asyncio
import base64
import http.client
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from helpers.serving import RunningServer, running_server  # noqa: E402

from lyra_cli.serve.app import ServeConfig  # noqa: E402
from lyra_cli.serve.errors import INTERNAL_ERROR  # noqa: E402
from lyra_cli.serve.protocol import MB  # noqa: E402
from lyra_cli.serve.worker import Job  # noqa: E402

KEY = "test-key-123"
MAX_QUEUE = 2
MAX_REQUEST_MB = 1
TOKENS = 6
QUESTION = "What is in the picture?"
IDLE_TIMEOUT_S = 30  # a wait, not a timing: the worker must become free, however slow the machine


@pytest.fixture(scope="module")
def engine(tiny_dir: Path) -> Any:
    import lyra_cli.engine as api

    return api.load(tiny_dir, device="cpu", voice=api.VoiceConfig(chunk_units=7))  # several chunks per answer


@pytest.fixture(scope="module")
def server(engine: Any) -> Iterator[RunningServer]:
    config = ServeConfig(model_id="tiny", api_key=KEY, max_request_bytes=MAX_REQUEST_MB * MB, max_queue=MAX_QUEUE)
    with running_server(engine, config) as running:
        yield running


@pytest.fixture
def client(server: RunningServer) -> Any:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


def ask(client: Any, content: str = QUESTION, **options: Any) -> Any:
    options.setdefault("max_tokens", TOKENS)
    options.setdefault("temperature", 0)
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}], **options)


def reference_answer(engine: Any, server: RunningServer, question: str, tokens: int = TOKENS) -> str:
    """The same question answered in-process by the engine (the worker is idle, so it is ours meanwhile)."""
    from lyra_cli.engine import Conversation, TextPart

    assert server.service.worker.wait_idle(IDLE_TIMEOUT_S)
    sampling = engine.sampling(temperature=0, max_new_tokens=tokens)
    return engine.generate(Conversation(), [TextPart(question)], sampling, voice=None).text


def raw_post(server: RunningServer, path: str, body: bytes, headers: dict[str, str] | None = None,
             *, chunked: bool = False) -> tuple[int, dict[str, str], Any]:  # fmt: skip
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=IDLE_TIMEOUT_S)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **(headers or {})}
    try:
        if chunked:
            conn.request("POST", path, body=iter([body[i : i + 65536] for i in range(0, len(body), 65536)]),
                         headers=headers, encode_chunked=True)  # fmt: skip
        else:
            conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), json.loads(response.read() or b"null")
    finally:
        conn.close()


# -- answers ----------------------------------------------------------------------------------------


def test_models_health_and_page(server: RunningServer, client: Any) -> None:
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with urlopen(f"{server.url}/health") as response:  # no key needed: load balancers poll it
        health = json.loads(response.read())
    assert health["status"] == "ok" and health["model"] == "tiny" and health["queued"] == 0
    page = Path(__file__).resolve().parent.parent / "lyra_cli" / "serve" / "static" / "index.html"
    status, body = _get(f"{server.url}/")
    if page.is_file():
        assert status == 200 and body.startswith(b"<")
    else:
        assert status == 404 and set(json.loads(body)["error"]) == {"message", "type", "param", "code"}


def test_text_answer_is_the_engines(engine: Any, server: RunningServer, client: Any) -> None:
    completion = ask(client)
    choice = completion.choices[0]
    assert completion.object == "chat.completion" and completion.model == "tiny"
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert completion.usage.completion_tokens == TOKENS
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + TOKENS
    assert choice.message.content.strip() == reference_answer(engine, server, QUESTION)


def test_any_model_name_is_answered_by_the_served_model(client: Any) -> None:
    completion = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=2)  # fmt: skip
    assert completion.model == "tiny"


def test_streamed_deltas_are_the_answer(client: Any) -> None:
    whole = ask(client, user="stream-ref")
    chunks = list(ask(client, stream=True, stream_options={"include_usage": True}, user="stream"))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finishing] == ["length"] and finishing[0] is chunks[-2]
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == whole.usage.completion_tokens
    assert usage.usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_the_raw_stream_is_server_sent_events_ending_in_done(server: RunningServer) -> None:
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=IDLE_TIMEOUT_S)
    body = json.dumps({"model": "tiny", "stream": True, "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]})
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Authorization": f"Bearer {KEY}"})
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
    events = response.read().decode().split("\n\n")
    conn.close()
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1]) and len({c["id"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)


def test_a_temperature_samples_and_a_seed_repeats_it(client: Any) -> None:
    """The release's generation config (top_k 1, top_p 0.001) would make any temperature greedy: a request that
    sets one samples over the whole vocabulary, as OpenAI does, unless `lyra.top_k` says otherwise."""
    answers = [ask(client, temperature=1.0, seed=seed, max_tokens=12).choices[0].message.content
               for seed in (7, 7, 8)]  # fmt: skip
    assert answers[0] == answers[1] != answers[2]
    greedy = [ask(client, temperature=1.0, seed=seed, max_tokens=12, extra_body={"lyra": {"top_k": 1}})
              for seed in (7, 8)]  # fmt: skip
    plain = ask(client, max_tokens=12).choices[0].message.content
    assert greedy[0].choices[0].message.content == greedy[1].choices[0].message.content == plain


def test_logprobs_one_per_token_with_alternatives(client: Any) -> None:
    completion = ask(client, logprobs=True, top_logprobs=3)
    content = completion.choices[0].logprobs.content
    assert len(content) == completion.usage.completion_tokens == TOKENS
    for token in content:
        assert token.logprob <= 0 and token.bytes == list(token.token.encode())
        assert len(token.top_logprobs) == 3
        assert token.top_logprobs[0].logprob >= token.logprob  # the greedy choice is the most likely
    streamed = list(ask(client, logprobs=True, top_logprobs=3, stream=True))
    tokens = [t.token for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert tokens == [t.token for t in content]
    assert ask(client).choices[0].logprobs is None


def test_stop_sequence_cuts_the_answer(client: Any) -> None:
    answer = ask(client, max_tokens=12).choices[0].message.content
    stop = answer[len(answer) // 2 : len(answer) // 2 + 3]
    expected = answer[: answer.index(stop)]
    completion = ask(client, max_tokens=12, stop=[stop, "never-said"])
    assert completion.choices[0].message.content == expected
    assert completion.choices[0].finish_reason == "stop"
    assert 0 < completion.usage.completion_tokens <= 12
    chunks = list(ask(client, max_tokens=12, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_a_continued_conversation_reuses_its_clients_prefix(client: Any) -> None:
    first = ask(client, "hello there", user="alice")
    ask(client, "something else entirely", user="bob")  # another client between alice's turns
    history = [{"role": "user", "content": "hello there"},
               {"role": "assistant", "content": first.choices[0].message.content},
               {"role": "user", "content": "and again"}]  # fmt: skip
    second = client.chat.completions.create(model="tiny", messages=history, max_tokens=TOKENS, temperature=0,
                                            user="alice")  # fmt: skip
    fresh = client.chat.completions.create(model="tiny", messages=history, max_tokens=TOKENS, temperature=0,
                                           user="carol")  # fmt: skip
    assert second.usage.prompt_tokens_details.cached_tokens > 10
    assert fresh.usage.prompt_tokens_details.cached_tokens == 0
    assert second.choices[0].message.content == fresh.choices[0].message.content  # reuse changes nothing
    assert second.usage.prompt_tokens == fresh.usage.prompt_tokens > first.usage.prompt_tokens


def test_system_message_replaces_the_default(client: Any) -> None:
    default = ask(client, user="sys")
    custom = client.chat.completions.create(
        model="tiny", max_tokens=TOKENS, temperature=0,
        messages=[{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": QUESTION}],
    )  # fmt: skip
    assert custom.usage.prompt_tokens != default.usage.prompt_tokens


# -- media in, speech out -------------------------------------------------------------------------


def data_url(path: Path, media_type: str) -> str:
    return f"data:{media_type};base64,{base64.b64encode(path.read_bytes()).decode()}"


def test_an_image_and_spoken_question_is_answered_as_the_engine_does(engine: Any, server: RunningServer,
                                                                     client: Any, real: Path) -> None:  # fmt: skip
    from lyra_cli.engine import Conversation, TextPart, read_media

    content = [
        {"type": "image_url", "image_url": {"url": data_url(real / "extreme_ironing.jpg", "image/jpeg")}},
        {"type": "input_audio", "input_audio": {"data": base64.b64encode((real / "extreme_ironing.mp3").read_bytes()).decode(),
                                                "format": "mp3"}},
        {"type": "text", "text": "Answer briefly."},
    ]  # fmt: skip
    completion = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                                max_tokens=TOKENS, temperature=0)  # fmt: skip
    assert server.service.worker.wait_idle(IDLE_TIMEOUT_S)
    parts = [engine.encode(read_media("image", real / "extreme_ironing.jpg")),
             engine.encode(read_media("speech", real / "extreme_ironing.mp3")), TextPart("Answer briefly.")]  # fmt: skip
    done = engine.generate(Conversation(), parts, engine.sampling(temperature=0, max_new_tokens=TOKENS), voice=None)
    assert completion.choices[0].message.content.strip() == done.text
    assert completion.usage.prompt_tokens == done.prompt_tokens > 300  # image tokens + 300 speech tokens


def test_lyra_options_reach_the_engine(engine: Any, server: RunningServer, client: Any, real: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """`lyra.extract` runs the extractor and `lyra.official_audio` the authors' audio front end, as the flags do."""
    from lyra_cli.audio.frontend import AudioFrontEnd
    from lyra_cli.engine import read_media
    from lyra_cli.serve import internals

    asked: list[tuple[list, dict]] = []
    respond = engine.respond

    def spy(conversation: Any, parts: Any, sampling: Any, **options: Any) -> Any:
        asked.append((list(parts), options))
        return respond(conversation, parts, sampling, **options)

    monkeypatch.setattr(engine, "respond", spy)
    audio = {"type": "input_audio", "input_audio": {"data": base64.b64encode((real / "Hi.mp3").read_bytes()).decode(),
                                                    "format": "mp3"}}  # fmt: skip
    for lyra in ({}, {"extract": "4x0.7", "official_audio": True}):
        client.chat.completions.create(model="tiny", max_tokens=2, extra_body={"lyra": lyra},
                                       messages=[{"role": "user", "content": [audio]}])  # fmt: skip
    (plain, plain_options), (tuned, tuned_options) = asked
    official = engine.encode(read_media("speech", real / "Hi.mp3", AudioFrontEnd.official()))
    default = engine.encode(read_media("speech", real / "Hi.mp3"))
    assert torch.equal(tuned[0].frames, official.frames) and torch.equal(plain[0].frames, default.frames)
    assert not torch.equal(official.frames, default.frames)  # the two front ends differ on this file
    assert tuned_options["extractor"] == internals.extractor(engine, "4x0.7")  # the CLI's parsing of `--extract`
    assert tuned_options["extractor"].enabled
    assert plain_options["extractor"] is None


def test_a_spoken_answer_is_a_wav_with_its_transcript(client: Any) -> None:
    import soundfile as sf

    completion = ask(client, modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"})
    message = completion.choices[0].message
    samples, rate = sf.read(io.BytesIO(base64.b64decode(message.audio.data)), dtype="float32")
    assert rate == 16_000 and len(samples) > 0 and np.isfinite(samples).all()
    assert message.audio.transcript == message.content.strip() and message.audio.id.startswith("audio_")
    assert message.audio.expires_at > time.time()


def test_streamed_speech_arrives_in_chunks_before_the_text_ends(client: Any) -> None:
    speech = {"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "pcm16"}, "max_tokens": 40}
    whole = ask(client, **speech)
    deltas = [c.choices[0].delta for c in ask(client, stream=True, **speech) if c.choices]
    with_audio = [i for i, d in enumerate(deltas) if d.audio is not None and d.audio.data]
    with_text = [i for i, d in enumerate(deltas) if d.content]
    assert len(with_audio) >= 2 and with_audio[0] < with_text[-1]  # speech streams while the text does
    joined = np.frombuffer(b"".join(base64.b64decode(deltas[i].audio.data) for i in with_audio), dtype="<i2")
    expected = np.frombuffer(base64.b64decode(whole.choices[0].message.audio.data), dtype="<i2")
    assert len(joined) == len(expected) > 0 and np.abs(joined.astype(int) - expected).max() <= 1  # int16 rounding
    transcript = "".join(d.audio.transcript or "" for d in deltas if d.audio is not None)
    assert transcript.strip() == whole.choices[0].message.audio.transcript
    assert deltas[with_audio[0]].audio.id.startswith("audio_") and deltas[-2].audio.expires_at > time.time()


def test_a_later_request_names_an_earlier_spoken_answer(client: Any) -> None:
    spoken = ask(client, "hello there", modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"})
    audio_id = spoken.choices[0].message.audio.id

    def follow_up(assistant: dict) -> Any:
        messages = [{"role": "user", "content": "hello there"}, {"role": "assistant", **assistant},
                    {"role": "user", "content": "and again"}]  # fmt: skip
        return client.chat.completions.create(model="tiny", messages=messages, max_tokens=TOKENS, temperature=0)

    by_id = follow_up({"audio": {"id": audio_id}})
    by_text = follow_up({"content": spoken.choices[0].message.audio.transcript})
    assert by_id.choices[0].message.content == by_text.choices[0].message.content
    assert by_id.usage.prompt_tokens == by_text.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError) as caught:
        follow_up({"audio": {"id": "audio_unknown"}})
    assert caught.value.body["param"] == "messages[1].audio.id"


def test_speech_out_without_a_voice_is_400(engine: Any, client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "voice", None)
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"})
    assert caught.value.body["param"] == "modalities" and "--no-voice" in caught.value.body["message"]


def test_streamed_speech_must_be_pcm16(client: Any) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, stream=True, modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"})
    assert caught.value.body["param"] == "audio.format"


def test_a_transcription_is_the_recogniser_run_in_process(engine: Any, server: RunningServer, client: Any,
                                                           real: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from lyra_cli.serve import transcribe as asr
    from lyra_cli.serve.media import MediaLimits
    from lyra_cli.serve.transcribe import decode_upload, transcribe

    monkeypatch.setattr(asr, "asr_max_new_tokens", lambda: TOKENS)  # random weights talk until the budget

    path = real / "Hi.mp3"
    with path.open("rb") as file:
        served = client.audio.transcriptions.create(model="whisper-1", file=file)
    assert server.service.worker.wait_idle(IDLE_TIMEOUT_S)
    with decode_upload(path.read_bytes(), path.name, MediaLimits()) as decoded:
        expected = transcribe(engine, decoded).text
    assert served.text == expected
    with path.open("rb") as file:
        assert client.audio.transcriptions.create(model="x", file=file, response_format="text").strip() == expected
    with path.open("rb") as file:
        verbose = client.audio.transcriptions.create(model="x", file=file, response_format="verbose_json",
                                                     language="en")  # fmt: skip
    assert verbose.text == expected and verbose.language == "en" and verbose.duration > 0


@pytest.mark.parametrize(("options", "param"), [({"response_format": "srt"}, "response_format"),
                                                ({"prompt": "spell it"}, "prompt"),
                                                ({"temperature": -1}, "temperature")])  # fmt: skip
def test_bad_transcription_requests_are_400(client: Any, real: Path, options: dict, param: str) -> None:
    with (real / "Hi.mp3").open("rb") as file, pytest.raises(openai.BadRequestError) as caught:
        client.audio.transcriptions.create(model="x", file=file, **options)
    assert caught.value.body["param"] == param


# -- errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"n": 2}, "n"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"presence_penalty": 1.0}, "presence_penalty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"extra_body": {"lyra": {"bogus": 1}}}, "lyra.bogus"),
        ({"extra_body": {"lyra": {"extract": "9x9"}}}, "lyra.extract"),
        ({"extra_body": {"tools": []}}, "tools"),
    ],
)
def test_bad_parameters_are_400_naming_the_field(client: Any, options: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, **options)
    assert caught.value.body["param"] == param
    assert caught.value.body["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}], "messages[0]"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "messages"),
        ([{"role": "tool", "content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}],
         "messages[0].content[0].image_url.url"),
        ([{"role": "user", "content": [{"type": "text", "text": "x"},
                                       {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}],
         "messages[0].content[1].image_url.url"),
        ([{"role": "user", "content": [{"type": "text", "text": "x"},
                                       {"type": "video_url", "video_url": {"url": "/etc/passwd"}}]}],
         "messages[0].content[1].video_url.url"),
        ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "bm90IGF1ZGlv", "format": "wav"}}]}],
         "messages[0].content[0].input_audio.data"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,!!"}}]}],
         "messages[0].content[0].image_url.url"),
    ],
)  # fmt: skip
def test_bad_messages_are_400(client: Any, messages: list, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
    assert caught.value.body["param"] == param


def test_a_prompt_or_answer_beyond_the_models_positions_is_400(client: Any) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, max_tokens=10**9)  # refused before any cache is reserved for it
    assert caught.value.body["param"] == "max_tokens" and caught.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, "word " * 40_000)  # 200 kB of text: within the body limit, over 32,768 positions
    assert caught.value.body["param"] == "messages" and caught.value.body["code"] == "context_length_exceeded"
    assert ask(client).choices[0].message.content  # served again


def test_malformed_json_is_400(server: RunningServer) -> None:
    status, _headers, body = raw_post(server, "/v1/chat/completions", b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]


def test_wrong_or_missing_key_is_401(server: RunningServer) -> None:
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        ask(wrong)
    assert caught.value.response.headers["www-authenticate"].startswith("Bearer")
    status, _headers, body = raw_post(server, "/v1/chat/completions", b"{}", {"Authorization": ""})
    assert status == 401 and body["error"]["type"] == "authentication_error"


def test_a_body_over_the_limit_is_413(server: RunningServer) -> None:
    big = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x" * (MAX_REQUEST_MB * MB)}]})
    status, _headers, body = raw_post(server, "/v1/chat/completions", big.encode())  # Content-Length declared
    assert status == 413 and body["error"]["code"] == "request_too_large"
    status, _headers, body = raw_post(server, "/v1/chat/completions", big.encode(), chunked=True)  # counted
    assert status == 413 and body["error"]["code"] == "request_too_large"


def test_an_internal_fault_is_500_without_a_traceback(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from lyra_cli.serve import chat

    def broken(self: Any, engine: Any, check: Any) -> Any:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(chat.ChatJob, "__call__", broken)
    for stream in (False, True):
        with pytest.raises(openai.InternalServerError) as caught:
            result = ask(client, stream=stream)
            list(result) if stream else None
        assert caught.value.status_code == 500
        assert caught.value.body == INTERNAL_ERROR.body()["error"]
        assert "secret" not in caught.value.response.text and "Traceback" not in caught.value.response.text


def test_a_fault_mid_stream_ends_it_with_the_500_error_object(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from lyra_cli.serve import protocol

    def broken(_logprobs: Any) -> Any:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(protocol, "logprobs_content", broken)
    stream = ask(client, stream=True, logprobs=True)
    with pytest.raises(openai.APIError) as caught:
        list(stream)
    assert caught.value.body == INTERNAL_ERROR.body()["error"] and "secret" not in str(caught.value)


def test_a_full_queue_is_503_with_retry_after(server: RunningServer, client: Any) -> None:
    """The worker busy and MAX_QUEUE requests waiting: the next one is refused at once."""
    release = threading.Event()

    def blocking(_engine: Any, _check: Any) -> Iterator[Any]:
        release.wait(IDLE_TIMEOUT_S)
        yield from ()

    worker = server.service.worker
    loop = asyncio.new_event_loop()  # never run: nobody reads these jobs' events
    try:
        worker.submit(Job(blocking, "test", loop))
        _wait(lambda: worker.busy)
        for _ in range(MAX_QUEUE):
            worker.submit(Job(blocking, "test", loop))
        with pytest.raises(openai.APIStatusError) as caught:
            ask(client)
        assert caught.value.status_code == 503
        assert int(caught.value.response.headers["retry-after"]) > 0
        assert caught.value.body["code"] == "queue_full"
    finally:
        release.set()
    assert worker.wait_idle(IDLE_TIMEOUT_S)
    loop.close()
    assert ask(client).choices[0].message.content  # served again


# -- cancellation -----------------------------------------------------------------------------------


@pytest.fixture
def slow_engine(engine: Any, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Each engine event takes a while, and the test sees how many came and whether the iterator was closed."""
    seen: dict[str, Any] = {"events": 0, "closed": False}
    respond = engine.respond

    def slow(*args: Any, **kwargs: Any) -> Iterator[Any]:
        inner = respond(*args, **kwargs)
        try:
            for event in inner:
                seen["events"] += 1
                time.sleep(0.02)
                yield event
        finally:
            seen["closed"] = True
            inner.close()

    monkeypatch.setattr(engine, "respond", slow)
    return seen


LONG_ANSWER = 400  # tokens: ~8 s at the slowed pace, so the disconnect comes first


def test_a_disconnected_stream_cancels_its_generation(engine: Any, server: RunningServer, client: Any,
                                                      slow_engine: dict) -> None:  # fmt: skip
    stream = ask(client, max_tokens=LONG_ANSWER, stream=True)
    next(iter(stream))
    next(iter(stream))
    stream.close()
    assert server.service.worker.wait_idle(IDLE_TIMEOUT_S)
    assert slow_engine["closed"] and slow_engine["events"] < LONG_ANSWER
    _assert_engine_intact(engine, server, client)


def test_a_disconnected_request_cancels_its_generation(engine: Any, server: RunningServer,
                                                       slow_engine: dict) -> None:  # fmt: skip
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": QUESTION}],
                       "max_tokens": LONG_ANSWER}).encode()  # fmt: skip
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port))
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Authorization": f"Bearer {KEY}"})
    _wait(lambda: slow_engine["events"] > 2)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    assert server.service.worker.wait_idle(IDLE_TIMEOUT_S)
    assert slow_engine["closed"] and slow_engine["events"] < LONG_ANSWER
    _assert_engine_intact(engine, server, openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0))


def _assert_engine_intact(engine: Any, server: RunningServer, client: Any) -> None:
    """After a cancelled answer the next request is served, and answers as a fresh engine would."""
    served = ask(client, user="after-cancel").choices[0].message.content
    assert served.strip() == reference_answer(engine, server, QUESTION)


# -- helpers ----------------------------------------------------------------------------------------


def urlopen(url: str) -> Any:
    from urllib.request import urlopen as open_url

    return open_url(url, timeout=IDLE_TIMEOUT_S)


def _get(url: str) -> tuple[int, bytes]:
    from urllib.error import HTTPError

    try:
        with urlopen(url) as response:
            return response.status, response.read()
    except HTTPError as exc:
        return exc.code, exc.read()


def _wait(condition: Any) -> None:
    deadline = time.monotonic() + IDLE_TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)

"""A streamed answer as server-sent events, fed engine events by hand (no server, no model): what has
arrived goes out together in one write, the first chunk never waits for the rest, and a client that goes
away cancels the job."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from lyra_cli.engine.run.events import Done, Prefilled, TextDelta
from lyra_cli.serve import chat, protocol
from lyra_cli.serve.worker import Finished, Job

WAIT_S = 30  # a wait, not a timing


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def answer(**fields: Any) -> chat.Answer:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True, **fields}
    return chat.Answer(protocol.parse_chat(body))


def done(text: str) -> Done:
    return Done(text=text, prompt_tokens=5, new_tokens=len(text), adapter="", stop_reason="end")


def events_of(piece: str) -> list[Any]:
    """The events of one write, parsed (`[DONE]` kept as the string)."""
    assert piece.endswith("\n\n")
    data = [event.removeprefix("data: ") for event in piece[:-2].split("\n\n")]
    return [d if d == "[DONE]" else json.loads(d) for d in data]


def contents(events: list[Any]) -> list[str]:
    return [e["choices"][0]["delta"].get("content") for e in events if e != "[DONE]" and e["choices"]]


async def started(job: Job, a: chat.Answer) -> AsyncIterator[str]:
    first, batches = await asyncio.wait_for(chat.first_event(job), WAIT_S)
    return chat.stream(job, a, "tiny", first, batches)


def test_events_that_arrived_together_go_out_in_one_write(loop: asyncio.AbstractEventLoop) -> None:
    job = Job(lambda *_: iter(()), None, loop)
    a = answer(stream_options={"include_usage": True})
    for event in (Prefilled(5, 5, 0.1), TextDelta("Hel"), TextDelta("lo"), done("Hello"),
                  Finished()):  # fmt: skip
        job.post(event)

    async def run() -> list[str]:
        return [piece async for piece in await started(job, a)]

    (piece,) = loop.run_until_complete(run())
    events = events_of(piece)
    assert contents(events) == ["", "Hello", None]  # the role chunk, the text (one chunk: it came together), the finish chunk
    assert events[-3]["choices"][0]["finish_reason"] == "stop"
    assert events[-2]["usage"]["completion_tokens"] == 5 and events[-1] == "[DONE]"
    assert len({e["created"] for e in events[:-1]}) == 1 and len({e["id"] for e in events[:-1]}) == 1


def test_the_first_chunk_goes_out_before_the_answer_ends(loop: asyncio.AbstractEventLoop) -> None:
    job = Job(lambda *_: iter(()), None, loop)
    a = answer()
    job.post(Prefilled(5, 5, 0.1))
    job.post(TextDelta("Hel"))

    async def run() -> tuple[str, str]:
        body = await started(job, a)
        first = await asyncio.wait_for(body.__anext__(), WAIT_S)  # nothing more has come: it does not wait
        for event in (TextDelta("lo"), TextDelta("!"), done("Hello!"), Finished()):
            job.post(event)
        rest = [piece async for piece in body]
        assert len(rest) == 1
        return first, rest[0]

    first, rest = loop.run_until_complete(run())
    assert contents(events_of(first)) == ["", "Hel"]
    assert contents(events_of(rest)) == ["lo!", None] and rest.endswith(chat.SSE_DONE)  # what came together: one chunk


def test_a_client_going_away_cancels_the_job(loop: asyncio.AbstractEventLoop) -> None:
    job = Job(lambda *_: iter(()), None, loop)
    job.post(Prefilled(5, 5, 0.1))
    job.post(TextDelta("Hel"))

    async def run() -> None:
        body = await started(job, answer())
        await asyncio.wait_for(body.__anext__(), WAIT_S)
        assert not job.cancelled
        await body.aclose()  # what the server does when the client disconnects

    loop.run_until_complete(run())
    assert job.cancelled


def test_an_error_after_some_text_comes_in_the_stream_after_that_text(loop: asyncio.AbstractEventLoop) -> None:
    job = Job(lambda *_: iter(()), None, loop)
    for event in (Prefilled(5, 5, 0.1), TextDelta("Hel"), Finished(error=ValueError("boom"))):
        job.post(event)

    async def run() -> list[str]:
        return [piece async for piece in await started(job, answer())]

    pieces = loop.run_until_complete(run())
    events = [e for piece in pieces for e in events_of(piece)]
    assert contents(events[:-1]) == ["", "Hel"]
    assert events[-1]["error"]["type"] and "boom" not in json.dumps(events[-1])  # a 500, never the exception text


def test_text_deltas_that_arrived_together_are_one_chunk_and_audio_keeps_its_place() -> None:
    from lyra_cli.serve.chat import joined_text

    audio = {"audio": {"data": "AAAA", "transcript": "a b"}}
    deltas = [{"content": "a", "logprobs": ["la"]}, {"content": " b", "logprobs": ["lb"]}, audio,
              {"content": " c", "logprobs": None}, {"content": " d", "logprobs": None}]  # fmt: skip
    assert joined_text(deltas) == [{"content": "a b", "logprobs": ["la", "lb"]}, audio, {"content": " c d", "logprobs": None}]
    assert joined_text([]) == [] and joined_text([audio, audio]) == [audio, audio]

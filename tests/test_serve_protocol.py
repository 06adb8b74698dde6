"""Chat Completions requests parsed field by field, and stop sequences cut in a stream (no server, no model)."""

from __future__ import annotations

import json

import pytest

from lyra_cli.engine.run.events import TokenLogprob, TopLogprob
from lyra_cli.serve.errors import ApiError
from lyra_cli.serve.protocol import (
    DeltaChunks,
    StopScanner,
    chunk,
    parse_chat,
    parse_messages,
    sse,
)


def user(content: object) -> dict:
    return {"role": "user", "content": content}


def test_history_turns_pair_each_user_message_with_its_answer() -> None:
    system, turns = parse_messages([
        {"role": "system", "content": "Be brief."}, {"role": "developer", "content": [{"type": "text", "text": "Really."}]},
        user("a"), user([{"type": "text", "text": "b"}]), {"role": "assistant", "content": "  first answer \n"},
        user("c"),
    ])  # fmt: skip
    assert system == "Be brief.\nReally."
    first, question = turns
    assert first.contents == (("a", "messages[2].content"), ([{"type": "text", "text": "b"}], "messages[3].content"))
    assert first.answer == "first answer"  # stripped, as the engine keeps its own answers
    assert question.contents == (("c", "messages[5].content"),) and question.answer is None


def test_an_answer_may_be_an_earlier_spoken_answer() -> None:
    _system, (first, _question) = parse_messages([user("a"), {"role": "assistant", "audio": {"id": "audio_1"}},
                                                  user("b")])  # fmt: skip
    assert first.answer is None and first.answer_audio_id == "audio_1" and first.answer_param == "messages[1]"


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([], "messages"),
        ([user("a"), {"role": "system", "content": "late"}], "messages[1]"),
        ([{"role": "assistant", "content": "x"}, user("a")], "messages[0]"),
        ([user("a"), {"role": "assistant"}], "messages[1].content"),
        ([user("a"), {"role": "assistant", "content": [{"type": "image_url"}]}], "messages[1].content"),
        ([user("")], None),  # an empty string is text; the engine decides (nothing refused here)
        ([user([])], "messages[0].content"),
        (["hello"], "messages[0]"),
        ([{"role": "function", "content": "x"}], "messages[0].role"),
    ],
)  # fmt: skip
def test_malformed_messages_name_the_field(messages: list, param: str | None) -> None:
    if param is None:
        parse_messages(messages)
        return
    with pytest.raises(ApiError) as caught:
        parse_messages(messages)
    assert caught.value.status == 400 and caught.value.param == param


def test_sampling_fields_map_to_the_engines() -> None:
    request = parse_chat({"model": "m", "messages": [user("q")], "temperature": 0.5, "top_p": 0.9, "seed": 3,
                          "max_completion_tokens": 7, "logprobs": True, "stop": "END", "user": "u1"})  # fmt: skip
    assert request.sampling == {"temperature": 0.5, "top_p": 0.9, "seed": 3, "max_new_tokens": 7}
    assert request.top_logprobs == 0 and request.stop == ("END",) and request.user == "u1"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 3}, "n"), ({"frequency_penalty": 1}, "frequency_penalty"), ({"temperature": "hot"}, "temperature"),
        ({"temperature": 2.5}, "temperature"), ({"max_tokens": 1.5}, "max_tokens"), ({"seed": True}, "seed"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"stop": [""]}, "stop"), ({"top_logprobs": 21, "logprobs": True},
        "top_logprobs"), ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"modalities": ["audio"]}, "modalities"), ({"audio": {"voice": "alloy"}}, "audio"),
        ({"modalities": ["text", "audio"]}, "audio"), ({"lyra": {"extract": 4}}, "lyra.extract"),
        ({"lyra": {"official_audio": "yes"}}, "lyra.official_audio"), ({"response_format": {"type": "json_object"}},
        "response_format"), ({"functions": []}, "functions"), ({"model": None}, "model"),
    ],
)  # fmt: skip
def test_bad_fields_are_400_naming_them(fields: dict, param: str) -> None:
    with pytest.raises(ApiError) as caught:
        parse_chat({"model": "m", "messages": [user("q")], **fields})
    assert caught.value.status == 400 and caught.value.param == param


def test_lyras_sampling_options_join_the_sampling_fields() -> None:
    request = parse_chat({"model": "m", "messages": [user("q")], "temperature": 0.7,
                          "lyra": {"top_k": 20, "repetition_penalty": 1.1}})  # fmt: skip
    assert request.sampling == {"temperature": 0.7, "top_k": 20, "repetition_penalty": 1.1}
    for bad in ({"top_k": 1.5}, {"repetition_penalty": "high"}):
        with pytest.raises(ApiError) as caught:
            parse_chat({"model": "m", "messages": [user("q")], "lyra": bad})
        assert caught.value.param == f"lyra.{next(iter(bad))}"


def test_no_op_values_of_unsupported_fields_are_accepted() -> None:
    request = parse_chat({"model": "m", "messages": [user("q")], "n": 1, "presence_penalty": 0, "store": False,
                          "response_format": {"type": "text"}, "modalities": ["text"]})  # fmt: skip
    assert request.audio is None


def run_scanner(stops: list[str], deltas: list[str]) -> tuple[list[str], bool]:
    scanner = StopScanner(stops)
    sent = []
    for delta in deltas:
        text, _ = scanner.push(delta)
        sent.append(text)
        if scanner.stopped:
            return sent, True
    sent.append(scanner.flush()[0])
    return sent, False


def test_a_stop_sequence_split_over_deltas_never_reaches_the_client() -> None:
    sent, stopped = run_scanner(["STOP"], ["he", "llo S", "T", "OP and more"])
    assert stopped and "".join(sent) == "hello " and sent[1] == "llo "  # `S` held back until known


def test_text_that_only_looked_like_a_stop_sequence_is_released() -> None:
    sent, stopped = run_scanner(["STOP"], ["a ST", "ORM", " here"])
    assert not stopped and "".join(sent) == "a STORM here" and sent[0] == "a "


def test_the_earliest_of_several_stop_sequences_wins() -> None:
    sent, stopped = run_scanner(["world", "lo"], ["hello world"])
    assert stopped and "".join(sent) == "hel"


def test_logprobs_wait_with_held_back_text() -> None:
    scanner = StopScanner(["xyz"])
    assert scanner.push("ab x", ["t1", "t2"]) == ("ab ", [])  # `x` may start the stop sequence
    assert scanner.push("q", ["t3"]) == ("xq", ["t1", "t2", "t3"])


@pytest.mark.parametrize("usage_on", [False, True])
@pytest.mark.parametrize("delta, logprobs", [
    ({"role": "assistant", "content": ""}, None),
    ({"content": "ü \"quoted\" \\ \n 猫"}, None),
    ({"content": "Hi"}, [TokenLogprob("Hi", 7, -0.25, (TopLogprob("Hi", 7, -0.25), TopLogprob("Ho", 8, -1.5)))]),
    ({"audio": {"id": "audio_1", "data": "AAAA", "transcript": "Hi"}}, None),
])  # fmt: skip
def test_pre_rendered_delta_chunks_are_the_chunks_json(delta: dict, logprobs: list | None, usage_on: bool) -> None:
    model = 'a "model" named {"delta": 1}'  # whatever the model id holds stays a string
    chunks = DeltaChunks("chatcmpl-1", model, include_usage=usage_on, created=1_700_000_000)
    expected = chunk("chatcmpl-1", model, delta, logprobs=logprobs, include_usage=usage_on, created=1_700_000_000)
    rendered = chunks.sse(delta, logprobs)
    assert rendered == sse(expected)  # byte for byte what rendering the whole chunk gives
    assert rendered.startswith("data: ") and rendered.endswith("\n\n")
    assert json.loads(rendered[len("data: "):]) == expected

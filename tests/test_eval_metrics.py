"""Benchmark metrics against hand-computed cases; the MM-Vet export and judge against a fake endpoint."""

from __future__ import annotations

import http.server
import json
import sys
import threading
import urllib.error
from fractions import Fraction
from typing import Any

import pytest

from lyra_cli.engine.eval import metrics
from lyra_cli.engine.eval.metrics import (
    anls,
    exact_match,
    levenshtein,
    normalize_vqa_answer,
    relaxed_accuracy,
    remove_punc_official,
    summarize,
    textvqa_accuracy,
    wer_official,
    wer_whisper,
)
from lyra_cli.engine.eval.mmvet import (
    GRADER_PROMPT,
    MAX_GRADING_ATTEMPTS,
    MAX_HTTP_RETRIES,
    RETRY_SUFFIX,
    JudgeError,
    MMVetRecord,
    chat_completions_url,
    export_mmvet,
    judge_mmvet,
    parse_score,
)
from lyra_cli.errors import InputError, MissingDependencyError

# --- EvalAI answer processing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "processed"),
    [
        ("Two", "2"),  # number words become digits
        ("none", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),  # only zero..ten are mapped
        ("The cat.", "cat"),  # article dropped, final period stripped
        ("an apple", "apple"),
        ("another", "another"),  # articles only as whole words
        ("a man's hat", "man 's hat"),  # "'s" is split off its word before anything else
        ("dont", "don't"),  # contractions fixed
        ("isnt", "isn't"),
        ("what's", "what 's"),  # the "'s" split wins over the table's "whats"
        ("Im", "im"),  # the table's key is "Im": it never matches lower-cased text
        ("3.14", "3.14"),  # a period before a digit stays
        ("version 2.0.", "version 2.0"),
        ("Mr.Smith", "mrsmith"),  # any other period goes, even between letters
        ("1,000", "1000"),  # commas are deleted outright
        ("yes!", "yes"),
        ("Yes?", "yes"),
        ("e-mail", "e mail"),  # a mark touching no space becomes a space...
        ("rock - n-roll", "rock nroll"),  # ...but if it touches a space anywhere, every copy is deleted
        ("10%", "10%"),  # "%" and ":" are not in the punctuation list
        ("3:30", "3:30"),
        ("Hello\tWorld\n", "hello world"),
        ("  Coca   Cola ", "coca cola"),
    ],
)
def test_evalai_processing(raw: str, processed: str) -> None:
    assert normalize_vqa_answer(raw) == processed


def test_evalai_strips_at_most_32_periods() -> None:
    # `re.UNICODE` (32) passed as re.sub's count in the original: reproduced so that scores agree.
    assert normalize_vqa_answer("." * 40) == "." * 8


# --- TextVQA soft accuracy ---------------------------------------------------------------------------------


def _ten(matching: int, answer: str = "coca cola", other: str = "pepsi") -> list[str]:
    return [answer] * matching + [other] * (10 - matching)


@pytest.mark.parametrize(
    ("matching", "expected"),
    [
        # (k · min(1, (k-1)/3) + (10-k) · min(1, k/3)) / 10 over the leave-one-out subsets
        (0, Fraction(0)),
        (1, Fraction(3, 10)),  # (1·0 + 9·1/3) / 10
        (2, Fraction(6, 10)),  # (2·1/3 + 8·2/3) / 10
        (3, Fraction(9, 10)),  # (3·2/3 + 7·1) / 10: three matches are not full credit
        (4, Fraction(1)),  # (4·1 + 6·1) / 10
        (10, Fraction(1)),
    ],
)
def test_textvqa_accuracy_leave_one_out(matching: int, expected: Fraction) -> None:
    assert textvqa_accuracy("coca cola", _ten(matching)) == float(expected)


def test_textvqa_accuracy_processes_both_sides() -> None:
    gts = ["Two", "2", "two.", "2", "the 2", "3", "3", "3", "3", "3"]  # all five "2"s after processing
    assert textvqa_accuracy("TWO!", gts) == 1.0
    assert textvqa_accuracy("3", gts) == 1.0
    assert textvqa_accuracy("4", gts) == 0.0


def test_textvqa_accuracy_rejects_no_answers() -> None:
    with pytest.raises(ValueError, match="no ground-truth"):
        textvqa_accuracy("x", [])


# --- DocVQA / ChartQA exact match, ANLS --------------------------------------------------------------------


def test_exact_match_after_processing() -> None:
    assert exact_match("The Answer.", ["answer", "other"]) == 1.0
    assert exact_match("1,000", ["1000"]) == 1.0
    assert exact_match("answers", ["answer"]) == 0.0
    assert exact_match("12", "12") == 1.0  # a lone string is one answer, not its characters
    assert exact_match("1", "12") == 0.0


@pytest.mark.parametrize(
    ("a", "b", "distance"),
    [("kitten", "sitting", 3), ("", "abc", 3), ("abc", "", 3), ("flaw", "lawn", 2), ("same", "same", 0)],
)
def test_levenshtein(a: str, b: str, distance: int) -> None:
    assert levenshtein(a, b) == distance


def test_anls() -> None:
    assert anls("Hello  World ", ["hello world"]) == 1.0  # case and whitespace do not count
    assert anls("abcdefghij", ["abcdefghiX"]) == pytest.approx(0.9, abs=1e-12)  # 1 - 1/10
    assert anls("abcd", ["zzzz", "abce"]) == pytest.approx(0.75, abs=1e-12)  # best ground truth
    assert anls("ab", ["aX"]) == 0.5  # exactly at the threshold: kept
    assert anls("abc", ["aXY"]) == 0.0  # 1/3 < 0.5
    assert anls("abc", ["aXY"], threshold=0.3) == pytest.approx(1 / 3)
    assert anls("", [""]) == 1.0


# --- ChartQA relaxed accuracy ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        ("104", "100", 1.0),  # 4 % off
        ("95", "100", 1.0),  # 5 % off: the bound is inclusive
        ("106", "100", 0.0),  # 6 % off
        ("12%", "0.12", 1.0),  # "%" divides by 100 (Pix2Struct convention)...
        ("12%", "12", 0.0),  # ...so a percentage does not match its bare number
        ("1,020", "1000", 1.0),  # thousands separators read
        ("1,00", "100", 0.0),  # not a grouping: text, and unequal
        ("0.0", "0", 1.0),  # zero needs zero
        ("0.01", "0", 0.0),
        (" Yes ", "yes", 1.0),  # text: lower-cased, stripped, then equal
        ("no", "yes", 0.0),
        ("five", "5", 0.0),  # words are not numbers here
        ("nan", "nan", 1.0),  # not read as float("nan"), which equals nothing
    ],
)
def test_relaxed_accuracy(prediction: str, answer: str, expected: float) -> None:
    assert relaxed_accuracy(prediction, [answer]) == expected


def test_relaxed_accuracy_any_answer_and_tolerance() -> None:
    assert relaxed_accuracy("50", ["10", "49"]) == 1.0
    assert relaxed_accuracy("104", "100", tolerance=0.01) == 0.0


# --- WER ---------------------------------------------------------------------------------------------------

REFERENCES = [
    "Mr. Smith's 2 dogs",
    "HELLO WORLD",
    "I DO NOT KNOW",
    "the cat sat on the mat",
    "good morning everyone",
]
HYPOTHESES = [
    "mister smith's two dogs",
    "Hello, world.",
    "I don't know.",
    "a cat sat on the mat today",
    "good morning",
]


@pytest.fixture
def whisper_normalizer() -> None:
    pytest.importorskip("whisper.normalizers", reason="openai-whisper is not installed (the `eval` extra)")


def test_wer_whisper_equates_formatting(whisper_normalizer: None) -> None:
    # Both sides become "mister smith is 2 dogs", "hello world", "i do not know".
    result = wer_whisper(REFERENCES[:3], HYPOTHESES[:3])
    assert (result.errors, result.n_words, result.wer) == (0, 11, 0.0)


def test_wer_whisper_counts(whisper_normalizer: None) -> None:
    # Real errors only: the→a (S), +today (I), -everyone (D), over 5 + 2 + 4 + 6 + 3 = 20 reference words.
    result = wer_whisper(REFERENCES, HYPOTHESES)
    assert (result.substitutions, result.deletions, result.insertions, result.n_words) == (1, 1, 1, 20)
    assert result.wer == 3 / 20


def test_wer_official_counts_punctuation() -> None:
    pytest.importorskip("jiwer", reason="jiwer is not installed (the `eval` extra)")
    # Neither side is normalised: "mr."/"mister" and "2"/"two" are substitutions, and so are "hello,"
    # "world." "know." (punctuation stays). With the→a, +today, -everyone: S=6, D=1, I=1 over 20 words
    # (jiwer splits "smith's" into "smith is" on both sides).
    result = wer_official(REFERENCES, HYPOTHESES)
    assert (result.substitutions, result.deletions, result.insertions, result.n_words) == (6, 1, 1, 20)
    assert result.wer == 8 / 20
    assert wer_official(["HELLO WORLD"], ["hello world"]).wer == 0.0  # case and spacing do not count
    assert wer_official(["I DO NOT KNOW"], ["i don't know"]).wer == 0.0  # jiwer expands contractions


def test_official_remove_punc_is_almost_a_no_op() -> None:
    assert remove_punc_official("Hello, world. It's done!") == "Hello, world. It's done!"
    assert remove_punc_official('a,"<b') == "ab"  # the only kind of thing its pattern matches


def test_wer_rejects_mismatched_lists() -> None:
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        wer_whisper(["a", "b"], ["a"])


def test_wer_without_whisper_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    metrics._english_normalizer.cache_clear()
    monkeypatch.setitem(sys.modules, "whisper", None)
    monkeypatch.setitem(sys.modules, "whisper.normalizers", None)
    try:
        with pytest.raises(MissingDependencyError) as caught:
            wer_whisper(["a"], ["a"])
    finally:
        metrics._english_normalizer.cache_clear()
    assert "`openai-whisper`" in caught.value.message
    assert caught.value.hint == "run `pip install --no-deps openai-whisper` and `pip install 'lyra-cli[eval]'`"


# --- summary -----------------------------------------------------------------------------------------------


def test_summarize() -> None:
    assert summarize([1.0, 0.0, 0.5, 0.9]) == {"score": pytest.approx(60.0), "count": 4}
    assert summarize([]) == {"score": None, "count": 0}


# --- MM-Vet ------------------------------------------------------------------------------------------------


def test_export_mmvet_keys_and_order() -> None:
    exported = export_mmvet({"12": "b", "0": "a", "v1_3": "c"})
    assert list(exported.items()) == [("v1_0", "a"), ("v1_3", "c"), ("v1_12", "b")]
    assert export_mmvet({7: "x"}) == {"v1_7": "x"}


def test_export_mmvet_rejects_bad_and_duplicate_ids() -> None:
    with pytest.raises(InputError, match="`q7`"):
        export_mmvet({"q7": "x"})
    with pytest.raises(InputError, match="same question id"):
        export_mmvet({"3": "x", "v1_3": "y"})


def test_chat_completions_url() -> None:
    assert chat_completions_url("https://api.openai.com/v1") == "https://api.openai.com/v1/chat/completions"
    assert chat_completions_url("http://localhost:8000/") == "http://localhost:8000/v1/chat/completions"
    assert chat_completions_url("http://h/v1/chat/completions") == "http://h/v1/chat/completions"


@pytest.mark.parametrize(
    ("content", "score"),
    [("0.7", 0.7), ("1.0", 1.0), ("0", 0.0), ("Correctness: 0.4", 0.4), (" .5\n", 0.5), ("1.5", None),
     ("-0.2", None), ("I think it is right", None), ("", None)],
)  # fmt: skip
def test_parse_score(content: str, score: float | None) -> None:
    assert parse_score(content) == score


RECORD = MMVetRecord("v1_0", "What is x in the equation?", "-1<AND>-5", "x = -1")


def _reply(content: Any) -> dict[str, Any]:
    return {"choices": [{"message": {"role": "assistant", "content": content}}]}


class FakeEndpoint:
    """Plays back scripted replies (a dict, or an exception to raise) and records every request."""

    def __init__(self, *replies: Any) -> None:
        self.replies = list(replies)
        self.requests: list[tuple[str, dict[str, Any], dict[str, str]]] = []

    def __call__(self, url: str, payload: dict[str, Any], headers: dict[str, str]) -> Any:
        self.requests.append((url, payload, headers))
        reply = self.replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply


def _judge(
    endpoint: FakeEndpoint, records: list[MMVetRecord], sleeps: list[float] | None = None
) -> list[float]:
    sleeps = [] if sleeps is None else sleeps
    return judge_mmvet(
        records, base_url="http://judge.test/v1", api_key="sk-test", model="gpt-4-0613",
        client=endpoint, sleep=sleeps.append,
    )  # fmt: skip


def test_judge_sends_the_grader_request() -> None:
    endpoint = FakeEndpoint(_reply("0.5"), _reply("1.0"))
    other = MMVetRecord("v1_1", "Name the dish.", "pad thai<OR>phad thai", "Pad Thai")
    assert _judge(endpoint, [RECORD, other]) == [0.5, 1.0]
    url, payload, headers = endpoint.requests[0]
    assert url == "http://judge.test/v1/chat/completions"
    assert headers["Authorization"] == "Bearer sk-test"
    assert (payload["model"], payload["max_tokens"], payload["temperature"]) == ("gpt-4-0613", 3, 0.0)
    message = payload["messages"][0]
    assert message["role"] == "user"
    assert message["content"] == GRADER_PROMPT + "\nWhat is x in the equation? | -1 <AND> -5 | x = -1 | "
    assert endpoint.requests[1][1]["messages"][0]["content"].endswith(
        "| pad thai <OR> phad thai | Pad Thai | "
    )


def test_judge_asks_again_after_unreadable_replies() -> None:
    endpoint = FakeEndpoint(_reply("Sure!"), {"error": "no choices"}, _reply("0.4"))
    assert _judge(endpoint, [RECORD]) == [0.4]
    retried = endpoint.requests[1][1]
    assert retried["messages"][0]["content"].endswith(RETRY_SUFFIX)
    assert [request[1]["temperature"] for request in endpoint.requests] == [0.0, 0.5, 1.0]


def test_judge_scores_zero_when_no_reply_is_readable() -> None:
    endpoint = FakeEndpoint(*[_reply("maybe")] * MAX_GRADING_ATTEMPTS)
    assert _judge(endpoint, [RECORD]) == [0.0]
    assert len(endpoint.requests) == MAX_GRADING_ATTEMPTS


def test_judge_retries_transient_http_errors() -> None:
    busy = urllib.error.HTTPError("http://judge.test", 503, "busy", None, None)  # type: ignore[arg-type]
    endpoint = FakeEndpoint(busy, ConnectionResetError("reset"), _reply("0.9"))
    sleeps: list[float] = []
    assert _judge(endpoint, [RECORD], sleeps) == [0.9]
    assert sleeps == [2.0, 4.0]  # exponential back-off


def test_judge_gives_up_on_a_refusal_or_a_dead_endpoint() -> None:
    refused = urllib.error.HTTPError("http://judge.test", 401, "Unauthorized", None, None)  # type: ignore[arg-type]
    with pytest.raises(JudgeError, match="HTTP 401") as caught:
        _judge(FakeEndpoint(refused), [RECORD])
    assert "API key" in (caught.value.hint or "")
    down = [urllib.error.URLError("connection refused")] * (MAX_HTTP_RETRIES + 1)
    with pytest.raises(JudgeError, match=f"after {MAX_HTTP_RETRIES + 1} tries"):
        _judge(FakeEndpoint(*down), [RECORD])


def test_judge_default_client_talks_http_on_loopback() -> None:
    """The standard-library client against a local server: JSON in, JSON out, bearer token sent."""
    seen: list[tuple[str, dict[str, Any], str | None]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # the name http.server dispatches POST requests to
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, body, self.headers.get("Authorization")))
            reply = json.dumps(_reply("0.8")).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args: Any) -> None:  # keep test output clean
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base_url = f"http://127.0.0.1:{server.server_address[1]}"
        assert judge_mmvet([RECORD], base_url=base_url, api_key="sk-local", model="judge") == [0.8]
    finally:
        server.shutdown()
        server.server_close()
    path, body, authorization = seen[0]
    assert (path, body["model"], authorization) == ("/v1/chat/completions", "judge", "Bearer sk-local")

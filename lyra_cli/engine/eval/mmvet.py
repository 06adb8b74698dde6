"""MM-Vet^s: export answers for the public MM-Vet grader, or grade them with an OpenAI-compatible judge.

MM-Vet has no reference answers that string matching could use: a GPT judge compares each prediction
with the ground truth and gives a correctness score from 0.0 to 1.0, and the benchmark score is their mean
× 100. The authors of Lyra export a JSON file for the online grader (huggingface.co/spaces/whyu/
MM-Vet_Evaluator); `judge_mmvet` does the grading locally through any `/v1/chat/completions` endpoint, with
the grader's prompt, token limit and retry rules, using only the standard library.
"""

from __future__ import annotations

import json
import logging
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lyra_cli.errors import InputError, LyraError

log = logging.getLogger(__name__)

# The grader looks answers up by the ids of its `mm-vet.json`: "v1_0" … "v1_217" (LLaVA's and Lyra's
# `convert_mmvet_for_eval.py` write f"v1_{question_id}").
MMVET_KEY_PREFIX = "v1_"
_MMVET_KEY = re.compile(rf"{MMVET_KEY_PREFIX}(\d+)")

# Our own grading instructions, following the protocol MM-Vet describes (a 0.0–1.0 correctness score in
# tenths, `<AND>` / `<OR>` in ground truths, a few graded examples, the score alone as the reply). They are
# written for this project, not copied: scores from an endpoint judge are for quick comparisons; numbers
# to publish come from the public MM-Vet grader fed with `export_mmvet`'s JSON.
GRADER_PROMPT = """You grade answers of AI assistants against a reference answer.
Give a correctness score from 0.0 (wrong) to 1.0 (fully right) in steps of 0.1.
In the reference, "A <AND> B" means every listed element must appear in the answer for full marks (partial
credit for some of them); "A <OR> B" means any one listed element is enough.
Judge meaning, not wording; for open-ended questions, give credit in proportion to how much of the
reference's content the answer covers correctly. Reply with the score only.

Question | Reference | Answer | Score
--- | --- | --- | ---
How many apples are on the plate? | 3 | There are three apples. | 1.0
How many apples are on the plate? | 3 | I count four apples. | 0.0
Which two colours dominate the flag? | red <AND> white | The flag is mostly red. | 0.5
Which two colours dominate the flag? | red <AND> white | Red and white. | 1.0
What could this sign mean? | no parking <OR> parking prohibited | Cars may not park here. | 1.0
Why is the scene funny? | A cat sits in a box far too small for it while a large empty box stands beside it, the opposite of what one expects. | A cat squeezed into a tiny box. | 0.5
"""
# Appended by the grader when a reply held no readable score, before asking again.
RETRY_SUFFIX = "\nAnswer with a single number between 0.0 and 1.0: "
JUDGE_MAX_TOKENS = 3  # "0.7": the grader asks for the score alone
JUDGE_TEMPERATURE = 0.0
RETRY_TEMPERATURE_STEP = 0.5  # the grader samples more freely after each unreadable reply
MAX_GRADING_ATTEMPTS = 5  # unreadable replies tolerated per answer; then the answer scores 0.0, as there
MIN_SCORE, MAX_SCORE = 0.0, 1.0
_SCORE = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")

# HTTP: rate limits and server hiccups are retried with exponential back-off; anything else is fatal.
TRANSIENT_HTTP_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
MAX_HTTP_RETRIES = 4
BACKOFF_BASE_S = 2.0
REQUEST_TIMEOUT_S = 60.0
CHAT_COMPLETIONS_PATH = "/chat/completions"
API_VERSION_PATH = "/v1"

# (url, JSON payload, headers) -> parsed JSON reply; raises like urllib does (HTTPError, URLError, ...).
ChatClient = Callable[[str, dict[str, Any], dict[str, str]], Any]


class JudgeError(LyraError):
    """The judge endpoint refused the requests or could not be reached."""


@dataclass(frozen=True)
class MMVetRecord:
    """One MM-Vet question to grade; `answer` is MM-Vet's ground truth (may hold `<AND>` / `<OR>`)."""

    question_id: str
    question: str
    answer: str
    prediction: str


def mmvet_key(question_id: str | int) -> str:
    """The grader's id for a question: 12, "12" and "v1_12" all give "v1_12"."""
    text = str(question_id).strip()
    if _MMVET_KEY.fullmatch(text):
        return text
    if text.isdigit():
        return f"{MMVET_KEY_PREFIX}{int(text)}"
    raise InputError(
        f"MM-Vet question id `{question_id}` is neither a number nor `{MMVET_KEY_PREFIX}<number>`",
        "MM-Vet ids are 0..217 (the grader's keys `v1_0`..`v1_217`)",
    )


def export_mmvet(predictions: Mapping[str, str] | Mapping[int, str]) -> dict[str, str]:
    """{"v1_0": "answer", "v1_1": …} in question order: the JSON the MM-Vet grader reads."""
    keyed = {mmvet_key(question_id): text for question_id, text in predictions.items()}
    if len(keyed) != len(predictions):
        raise InputError("two MM-Vet predictions have the same question id (e.g. `3` and `v1_3`)",
                         "keep one answer per question in the predictions file")  # fmt: skip
    return dict(sorted(keyed.items(), key=lambda item: int(item[0][len(MMVET_KEY_PREFIX) :])))


def grading_prompt(record: MMVetRecord, *, retry: bool = False) -> str:
    """The grader's message: the prompt, then "question | ground truth | prediction | " to complete."""
    answer = record.answer.replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")
    row = f"{record.question} | {answer} | {record.prediction} | "
    return f"{GRADER_PROMPT}\n{row}" + (RETRY_SUFFIX if retry else "")


def parse_score(content: str) -> float | None:
    """The first number of a judge's reply when it lies in [0, 1] ("0.7", "Correctness: 1.0"), else None."""
    match = _SCORE.search(content)
    if match is None:
        return None
    score = float(match.group())
    return score if MIN_SCORE <= score <= MAX_SCORE else None


def judge_mmvet(
    records: Sequence[MMVetRecord],
    *,
    base_url: str,
    api_key: str,
    model: str,
    client: ChatClient | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> list[float]:
    """One correctness score in [0, 1] per record, in order, from the judge `model` at `base_url`.

    `base_url` is the API root as OpenAI clients take it ("https://api.openai.com/v1"); a root without
    "/v1" gets it appended, and a full ".../chat/completions" URL is used as is. Like MM-Vet's grader, an
    unreadable reply is asked again with a firmer instruction and a higher temperature, and an answer with
    no readable score after `MAX_GRADING_ATTEMPTS` replies scores 0.0 (logged).
    """
    url = chat_completions_url(base_url)
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    post = client or _urllib_post
    return [_grade(record, url, headers, model, post, sleep) for record in records]


def chat_completions_url(base_url: str) -> str:
    root = base_url.rstrip("/")
    if root.endswith(CHAT_COMPLETIONS_PATH):
        return root
    if not root.endswith(API_VERSION_PATH):
        root += API_VERSION_PATH
    return root + CHAT_COMPLETIONS_PATH


def _grade(
    record: MMVetRecord,
    url: str,
    headers: dict[str, str],
    model: str,
    post: ChatClient,
    sleep: Callable[[float], None],
) -> float:
    for attempt in range(MAX_GRADING_ATTEMPTS):
        payload = {
            "model": model,
            "messages": [{"role": "user", "content": grading_prompt(record, retry=attempt > 0)}],
            "max_tokens": JUDGE_MAX_TOKENS,
            "temperature": JUDGE_TEMPERATURE + RETRY_TEMPERATURE_STEP * attempt,
        }
        content = _reply_content(_post_with_retries(post, url, payload, headers, sleep))
        score = parse_score(content) if content is not None else None
        if score is not None:
            return score
        log.debug("MM-Vet %s: unreadable judge reply %r", record.question_id, content)
    log.warning("MM-Vet %s: no score in %d judge replies; scored 0", record.question_id, MAX_GRADING_ATTEMPTS)
    return MIN_SCORE


def _reply_content(reply: Any) -> str | None:
    """choices[0].message.content of a chat-completions reply; None when the reply has another shape."""
    try:
        content = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None


def _post_with_retries(
    post: ChatClient,
    url: str,
    payload: dict[str, Any],
    headers: dict[str, str],
    sleep: Callable[[float], None],
) -> Any:
    for retry in range(MAX_HTTP_RETRIES + 1):
        try:
            return post(url, payload, headers)
        except urllib.error.HTTPError as err:
            if err.code not in TRANSIENT_HTTP_STATUS:
                raise _refused(url, err) from err
            failure: Exception = err
        except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
            failure = err
        if retry < MAX_HTTP_RETRIES:
            delay_s = BACKOFF_BASE_S * 2**retry
            log.info("judge request failed (%s); retrying in %.0f s", failure, delay_s)
            sleep(delay_s)
    raise JudgeError(
        f"the judge at `{url}` did not answer after {MAX_HTTP_RETRIES + 1} tries: {failure}",
        "check that the endpoint is up and reachable, then run the evaluation again",
    )


def _refused(url: str, err: urllib.error.HTTPError) -> JudgeError:
    return JudgeError(
        f"the judge at `{url}` refused the request: HTTP {err.code} {err.reason}",
        "check the judge URL, API key and model name",
    )


def _urllib_post(url: str, payload: dict[str, Any], headers: dict[str, str]) -> Any:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
        body = response.read()
    try:
        return json.loads(body)
    except ValueError:
        return None  # not JSON: read as an unreadable reply, asked again like one

"""Benchmark metrics as pure functions: VQA answer processing and accuracies, ANLS, relaxed accuracy, WER.

Each metric gives, item by item, the number of the scorer its published numbers came from (the tests
recompute each one with an independent implementation of that scorer on adversarial items):

- `normalize_vqa_answer` is the EvalAI answer processor that TextVQA, ST-VQA and the Lyra authors'
  `m4c_evaluator.py` use (itself MMF's copy of the VQA challenge rules). Its quirks are reproduced on
  purpose, because the published numbers were computed with them (see the function's docstring).
- `textvqa_accuracy` is EvalAI's soft VQA accuracy over the human answers, empty answers included;
  `exact_match` is how the authors score DocVQA^s and ChartQA^s (`eval_speech.py` →
  `STVQAAccuracyEvaluator`); `anls` is the DocVQA competition's ANLS (as lmms-eval and VLMEvalKit copy it)
  and `relaxed_accuracy` Pix2Struct's ChartQA relaxed correctness with the deviations its docstring lists.
- `wer_official` is the authors' `eval_asr_wer.py` (references as written in the data file, punctuation
  kept); `wer_whisper` the usual LibriSpeech WER (Whisper's English normaliser on both sides).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lyra_cli.errors import MissingDependencyError

# ---------------------------------------------------------------------------------------------------------
# EvalAI answer processing. The tables below are data from the VQA evaluation code (GT-Vision-Lab/VQA
# `vqaEval.py`, MMF `m4c_evaluators.py`), reproduced entry by entry, typos included: a few keys are
# capitalised ("Im", "Ive") or already contain an apostrophe, so they can never match the lower-cased,
# "'s"-split text. They are kept so that the table stays comparable line by line with the original.
# ---------------------------------------------------------------------------------------------------------

CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip

NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})
# Removed, or replaced by a space; note what is *not* here: ' . : % $ # & * and others survive.
PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)  # fmt: skip
# The original `(?!<=\d)` is a typo for a look-behind: as written it is a look-ahead that never fails, so
# every period not followed by a digit goes ("3.14" keeps its point, "Mr.Smith" loses it).
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
# The original passes `re.UNICODE` (== 32) where `re.sub` expects `count`: at most 32 periods are stripped.
MAX_PERIOD_STRIPS = int(re.UNICODE)


def normalize_vqa_answer(text: str) -> str:
    """EvalAI answer processing, step for step as in `EvalAIAnswerProcessor.__call__`.

    1. lower-case; delete every "," and "?"; split "'s" off its word ("man's" → "man 's"); strip;
    2. newlines and tabs to spaces;
    3. each punctuation mark is deleted when it touches a space anywhere in the text, else it becomes a
       space; periods not followed by a digit are deleted;
    4. number words zero..ten (and "none") become digits, articles are dropped, contractions are fixed.

    Because commas are deleted in step 1, "1,000" becomes "1000" and the comma rule of step 3 never fires.
    """
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digits_and_articles(_process_punctuation(text))


def _process_punctuation(text: str) -> str:
    # Both tests look at the input text, not at the text being edited: MMF and VQA do the same.
    delete = COMMA_STRIP.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        touches_space = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if touches_space or delete else " ")
    return PERIOD_STRIP.sub("", out, count=MAX_PERIOD_STRIPS)


def _process_digits_and_articles(text: str) -> str:
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


# ---------------------------------------------------------------------------------------------------------
# VQA-style accuracies
# ---------------------------------------------------------------------------------------------------------

# An answer given by this many *other* annotators earns full credit (VQA's "min(#humans/3, 1)").
VQA_FULL_CREDIT_MATCHES = 3


def textvqa_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """EvalAI's soft VQA accuracy of one prediction against the human answers (10 in TextVQA).

    acc = (1/n) · Σ_i min(1, m_i / 3), where m_i counts the answers j ≠ i equal to the prediction, after
    `normalize_vqa_answer` on both sides: the average over the n leave-one-out subsets. With 10 answers,
    k matching give 0, 0.3, 0.6, 0.9, 1.0 for k = 0..4 (three matches are *not* full credit). Every
    answer counts, empty ones too: an annotator's "" is one of the 10, and a prediction that processes to
    "" (say "the") matches it. The terms are float thirds summed in the answers' order, as EvalAI sums
    them, so the result equals EvalAI's to the last bit (two matches of ten give 0.6 or 0.5999999999999999,
    depending on where in the list they stand).
    """
    answers = [normalize_vqa_answer(answer) for answer in _answer_list(gt_answers)]
    predicted = normalize_vqa_answer(prediction)
    n_matching = sum(answer == predicted for answer in answers)
    # Leaving out a matching answer leaves n_matching - 1 matches; leaving out another leaves n_matching.
    credits = [min(1.0, (n_matching - (answer == predicted)) / VQA_FULL_CREDIT_MATCHES) for answer in answers]
    return sum(credits) / len(credits)


def exact_match(prediction: str, gt_answers: Sequence[str] | str) -> float:
    """1.0 when the processed prediction equals any processed ground truth, else 0.0.

    This is the authors' DocVQA^s / ChartQA^s score (`STVQAAccuracyEvaluator`). A single string is one
    answer, not a sequence of characters.
    """
    predicted = normalize_vqa_answer(prediction)
    return float(any(predicted == normalize_vqa_answer(answer) for answer in _answer_list(gt_answers)))


def _answer_list(gt_answers: Sequence[str] | str) -> list[str]:
    answers = [gt_answers] if isinstance(gt_answers, str) else list(gt_answers)
    if not answers:
        raise ValueError("no ground-truth answers to score against")
    return answers


# ---------------------------------------------------------------------------------------------------------
# ANLS (DocVQA)
# ---------------------------------------------------------------------------------------------------------

ANLS_THRESHOLD = 0.5


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each costing 1), two rows of the DP table."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def anls(prediction: str, gt_answers: Sequence[str] | str, threshold: float = ANLS_THRESHOLD) -> float:
    """Average Normalised Levenshtein Similarity of one prediction, as the DocVQA competition computes it
    (and lmms-eval and VLMEvalKit, which copy that script):

    s = 1 − min over the ground truths g of lev(norm(g), norm(p)) / max(|upper(g)|, |upper(p)|),
    and 0 when s < threshold.

    norm lower-cases, strips and collapses inner whitespace; the denominator, though, is the length of the
    *raw* strings upper-cased, so surrounding spaces lengthen it and "ß" (upper "SS") counts twice. A
    distance over a zero length (both raw strings empty) is 0: two empty strings are identical.
    """
    distances = [_normalised_distance(answer, prediction) for answer in _answer_list(gt_answers)]
    similarity = 1 - min(distances)
    return similarity if similarity >= threshold else 0.0


def _normalised_distance(answer: str, prediction: str) -> float:
    length = max(len(answer.upper()), len(prediction.upper()))
    return 0.0 if length == 0 else levenshtein(_anls_text(answer), _anls_text(prediction)) / length


def _anls_text(text: str) -> str:
    return " ".join(text.strip().lower().split())


# ---------------------------------------------------------------------------------------------------------
# Relaxed accuracy (ChartQA)
# ---------------------------------------------------------------------------------------------------------

RELAXED_TOLERANCE = 0.05
PERCENT_SIGN = "%"
_GROUPED_NUMBER = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")  # "1,234,567.5": commas every 3 digits


def relaxed_accuracy(
    prediction: str, gt_answers: Sequence[str] | str, tolerance: float = RELAXED_TOLERANCE
) -> float:
    """ChartQA relaxed accuracy: 1.0 if the prediction matches any ground truth, else 0.0 — Pix2Struct's
    `relaxed_correctness` (which lmms-eval uses), where

    - two numbers match when |p − g| / |g| ≤ tolerance (5 % relative change by default);
    - anything else matches when equal after lower-casing.

    A number is what Python's `float()` reads ("1e3", "1_000", "+.5", "١٢" too); trailing "%" signs are
    dropped and divide by 100, so "12%" matches "0.12" but not "12". Our deviations, each on purpose:
    1. thousands separators in groups of three are read ("1,000" is 1000; "1,00" stays text);
    2. a ground truth of 0 needs a prediction equal to 0, where Pix2Struct compares the strings
       ("0.0" ≠ "0" there);
    3. surrounding whitespace is ignored, in numbers ("5% ") and in text (" Yes");
    4. "nan" and "inf" are text, so "nan" matches "nan" (in Pix2Struct it matches nothing, itself included).
    Words ("five") stay text.
    """
    return float(any(_relaxed_match(prediction, answer, tolerance) for answer in _answer_list(gt_answers)))


def _relaxed_match(prediction: str, answer: str, tolerance: float) -> bool:
    predicted, expected = _parse_number(prediction), _parse_number(answer)
    if predicted is None or expected is None:
        return prediction.strip().lower() == answer.strip().lower()
    if expected == 0:
        return predicted == 0
    return abs(predicted - expected) / abs(expected) <= tolerance  # Pix2Struct's division, bit for bit


def _parse_number(text: str) -> float | None:
    text = text.strip()
    is_percent = text.endswith(PERCENT_SIGN)
    if is_percent:
        text = text.rstrip(PERCENT_SIGN)
    if _GROUPED_NUMBER.fullmatch(text.strip()):
        text = text.replace(",", "")
    try:
        value = float(text)
    except ValueError:
        return None
    if not math.isfinite(value):
        return None
    return value / 100 if is_percent else value


# ---------------------------------------------------------------------------------------------------------
# Word error rate (LibriSpeech)
# ---------------------------------------------------------------------------------------------------------

# The authors' `remove_punc` pattern, verbatim. It reads as a character class followed by the *literal*
# `"<`, so it only deletes sequences such as `,"<`: in practice a no-op, and punctuation stays in.
OFFICIAL_PUNCTUATION_PATTERN = re.compile("[,.!']+\"<>?~*")
WER_FEATURE = "LibriSpeech WER"
EVAL_EXTRA = "eval"
# The modules the WER code imports (directly or through `whisper/__init__`), by the PyPI name to install.
_PACKAGE_OF_MODULE = {"whisper": "openai-whisper", "more_itertools": "more-itertools"}


@dataclass(frozen=True)
class WerResult:
    """Word errors over a corpus: wer = (S + D + I) / N, with N the number of reference words."""

    wer: float
    substitutions: int
    deletions: int
    insertions: int
    hits: int

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def n_words(self) -> int:
        return self.hits + self.substitutions + self.deletions


def wer_whisper(references: Sequence[str], hypotheses: Sequence[str]) -> WerResult:
    """Corpus WER after Whisper's `EnglishTextNormalizer` on references and hypotheses alike.

    The normaliser lower-cases, removes punctuation and fillers ("uh", "hmm"), spells out abbreviations
    ("Mr." → "mister"), expands contractions ("'s" → "is") and writes numbers as digits ("two" → "2"),
    so formatting differences are not counted. Utterances are aligned one by one (jiwer's default
    transform).
    """
    _check_pairs(references, hypotheses)
    jiwer = _import_jiwer()
    normalize = _english_normalizer()
    output = jiwer.process_words(
        [normalize(text) for text in references], [normalize(text) for text in hypotheses]
    )
    return _wer_result(output)


def wer_official(references: Sequence[str], hypotheses: Sequence[str]) -> WerResult:
    """The WER the Lyra authors report (`lyra/eval/eval_asr_wer.py`), reproduced step for step.

    References are used as written in the data file: the authors normalised their LibriSpeech transcripts
    once, when they prepared the file, and their script never touches them again (normalising here would
    change some: Whisper's normaliser turns "007" into "7"). Hypotheses are the raw model output. Both go
    through `remove_punc` (in practice a no-op, see `OFFICIAL_PUNCTUATION_PATTERN`) and `jiwer.wer` with
    `wer_standardize_contiguous` on both sides: lower-case, expand contractions, drop Kaldi non-words
    ("<unk>", "[noise]"), collapse whitespace and join all utterances into **one** sentence before
    aligning. Punctuation is never removed: "world." against "world" is a substitution.
    """
    _check_pairs(references, hypotheses)
    jiwer = _import_jiwer()
    transform = jiwer.wer_standardize_contiguous
    output = jiwer.process_words(
        [remove_punc_official(text) for text in references],
        [remove_punc_official(text) for text in hypotheses],
        reference_transform=transform,
        hypothesis_transform=transform,
    )
    return _wer_result(output)


def remove_punc_official(text: str) -> str:
    """The authors' `remove_punc`: deletes matches of `OFFICIAL_PUNCTUATION_PATTERN` (almost never any)."""
    return OFFICIAL_PUNCTUATION_PATTERN.sub("", text)


def _check_pairs(references: Sequence[str], hypotheses: Sequence[str]) -> None:
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    if not references:
        raise ValueError("no utterances to score")


def _wer_result(output: Any) -> WerResult:
    return WerResult(
        wer=output.wer,
        substitutions=output.substitutions,
        deletions=output.deletions,
        insertions=output.insertions,
        hits=output.hits,
    )


def _import_jiwer() -> Any:
    try:
        import jiwer
    except ModuleNotFoundError as err:
        raise _missing(err) from err
    return jiwer


@functools.lru_cache(maxsize=1)
def _english_normalizer() -> Callable[[str], str]:
    """Whisper's normaliser, built once (it reads its spelling table from a JSON file shipped with it).

    `import whisper.normalizers` runs `whisper/__init__`, which also imports torch, tqdm, tiktoken and
    numba, so a missing one of those is reported by its own name.
    """
    try:
        from whisper.normalizers import EnglishTextNormalizer
    except ModuleNotFoundError as err:
        raise _missing(err) from err
    return EnglishTextNormalizer()


def _missing(err: ModuleNotFoundError) -> MissingDependencyError:
    module = (err.name or "whisper").split(".")[0]
    missing = MissingDependencyError(_PACKAGE_OF_MODULE.get(module, module), WER_FEATURE, extra=EVAL_EXTRA)
    if module == "whisper":  # installed without its dependencies: they would pull triton (~1 GB) for nothing
        missing.hint = f"run `pip install --no-deps openai-whisper` and `pip install 'lyra-cli[{EVAL_EXTRA}]'`"
    return missing


# ---------------------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------------------

PERCENT = 100.0


def summarize(scores: Sequence[float]) -> dict[str, float | int | None]:
    """{"score": mean of the per-item scores × 100, "count": number of items}; score is None when empty."""
    if not scores:
        return {"score": None, "count": 0}
    return {"score": PERCENT * math.fsum(scores) / len(scores), "count": len(scores)}

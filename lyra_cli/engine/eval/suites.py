"""The paper's benchmarks (docs/authors-behaviour.md#evaluation): where each suite's files lie, how a record reads,
which prompt asks it in speech mode (S+I) and in text mode (T+I), and which metric scores it.

Every suite reads the authors' layout under `data/Lyra_Eval/` as their scripts do
(`scripts/eval/lyra_*_speech.sh` → `lyra/eval/model_lyra_image_speech.py`, `model_lyra_text_speech.py`):

    TextVQA_speech/lyra_textvqa_val_v051_ocr_withspeechid.jsonl  train_images/  lyra_audios/  TextVQA_0.5.1_val.json
    Docvqa_val/lyra_docvqa_audio.jsonl       (images relative to Docvqa_val/)     lyra_audios/
    Chartvqa_human/lyra_chartvqa_audio.jsonl (images relative to Chartvqa_human/) lyra_audios/
    MM_vet_speech/lyra_mm_vet.jsonl          images/                               lyra_audios/
    LibriSpeech/test-clean.jsonl             (audio relative to LibriSpeech/)

The record fields are LLaVA's (`question_id`, `image`, `text`, `prompt`, `answer`/`answers`) plus the
speech id (`speech`); the audio of a question is `lyra_audios/<speech or question_id>.mp3`, else `.wav`.
The authors never published the jsonl files' full schema, so documented alternatives are accepted
(`FIELDS_*` below). A record that cannot be read becomes an item with a `problem`: the runner records it
as skipped with that reason instead of crashing or scoring it zero.

Nothing here imports torch: `lyra eval --help` and `--score-only` stay light.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lyra_cli.errors import InputError, UsageError

SPEECH_MODE = "speech"  # the question is spoken (the paper's S+I rows)
TEXT_MODE = "text"  # the same question written (T+I)
MODES = (SPEECH_MODE, TEXT_MODE)

SPEECH_PLACEHOLDER = "<speech>"
IMAGE_PLACEHOLDER = "<image>"
AUDIO_SUFFIXES = (".mp3", ".wav")  # the authors try `<id>.mp3`, then the same name with `.wav`
VQA_MAX_NEW_TOKENS = 1024  # model_lyra_image_speech.py hard-codes this
ASR_MAX_NEW_TOKENS = 128  # model_lyra_text_speech.py's default
# After `<speech>` our renderer adds one newline, so this makes the official `<speech>\n\nRecord…`.
ASR_INSTRUCTION = "\nRecord the spoken words as text."

# Record fields, first match wins (the first name of each tuple is what the authors' code reads).
FIELDS_ID = ("question_id", "id")
FIELDS_IMAGE = ("image", "image_path")
FIELDS_SPEECH_ID = ("speech", "speech_id", "audio")
FIELDS_QUESTION = ("text", "question", "prompt")  # DocVQA / ChartQA / MM-Vet: the question as text
FIELDS_TEXTVQA_QUESTION = ("prompt", "question")  # TextVQA's text-mode prompt (question + OCR tokens)
FIELDS_ANSWERS = ("answer", "answers", "gt_answers")
FIELDS_ASR_AUDIO = ("audio", "speech")
FIELDS_ASR_TEXT = ("text", "gt_text")

# Why an item was not answered: the keys of a summary's `skipped` counts.
SKIP_UNREADABLE_RECORD = "unreadable record"
SKIP_MISSING_IMAGE = "missing image"
SKIP_MISSING_AUDIO = "missing audio"
SKIP_UNREADABLE_IMAGE = "unreadable image"
SKIP_UNREADABLE_AUDIO = "unreadable audio"
SKIP_NO_REFERENCE = "no reference answer"
SKIP_NO_QUESTION_TEXT = "no question text"
SKIP_UNKNOWN_ID = "unknown id"  # a prediction whose id is not in the data set


@dataclass(frozen=True)
class Skip:
    reason: str  # one of the SKIP_* categories
    detail: str  # the specific file or field, for the predictions file


@dataclass(frozen=True)
class Piece:
    """One element of a user turn, before decoding: an image or speech file, or text."""

    kind: str  # "image" | "speech" | "text"
    value: str


@dataclass(frozen=True)
class EvalItem:
    """One question of a benchmark, as read from its data file (nothing decoded yet)."""

    id: str
    index: int  # position among the file's records: shards and merges keep this order
    question: str | None  # the question as text (text mode); None when the record has none
    image: Path | None
    speech: Path | None
    answers: tuple[str, ...] = ()
    speech_prompt: str | None = None  # TextVQA: the record's own text, holding `<speech>`
    extra: Mapping[str, Any] = field(default_factory=dict)
    problem: Skip | None = None
    # TextVQA: (image id, lower-cased question), how the authors' scorer matches an answer to its question
    # (`eval_textvqa.py`); None where the data has only the question id.
    key: tuple[str, str] | None = None


# ---------------------------------------------------------------------------------------------------
# Records


def first_field(record: Mapping[str, Any], names: Sequence[str]) -> Any:
    for name in names:
        value = record.get(name)
        if value not in (None, ""):
            return value
    return None


def as_answers(value: Any) -> tuple[str, ...]:
    """`"3"`, `["3", "three"]` or `[{"answer": "3"}]` (VQA's annotation style) → a tuple of strings.

    Empty answers in a list are kept: TextVQA's soft accuracy averages over all 10 human answers, an
    annotator's "" included, and dropping it changes the score (EvalAI keeps it)."""
    if value is None:
        return ()
    if isinstance(value, (str, int, float)):
        return (str(value),)
    return tuple(str(entry.get("answer", "")) if isinstance(entry, dict) else str(entry) for entry in value)


def strip_placeholders(text: str) -> str:
    return text.replace(IMAGE_PLACEHOLDER, "").replace(SPEECH_PLACEHOLDER, "").strip()


def read_jsonl(path: Path) -> list[dict[str, Any] | Skip]:
    """Each line's record, or a `Skip` for a line that is not a JSON object (blank lines are dropped)."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        raise InputError(f"cannot read `{path}`: {exc.strerror}", "check the file's permissions") from None
    records: list[dict[str, Any] | Skip] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            records.append(Skip(SKIP_UNREADABLE_RECORD, f"line {number}: {exc.msg}"))
            continue
        not_object = Skip(SKIP_UNREADABLE_RECORD, f"line {number}: not an object")
        records.append(record if isinstance(record, dict) else not_object)
    return records


def unique_ids(raw_ids: Sequence[str]) -> list[str]:
    """Ids made unique in file order: LLaVA's TextVQA file reuses the image id as `question_id` for every
    question about that image, so the 2nd, 3rd… occurrence becomes `ID#2`, `ID#3`."""
    seen: dict[str, int] = {}
    out = []
    for raw in raw_ids:
        seen[raw] = seen.get(raw, 0) + 1
        out.append(raw if seen[raw] == 1 else f"{raw}#{seen[raw]}")
    return out


def resolve_audio(folder: Path, speech_id: str) -> Path:
    """`folder/<id>.mp3`, else `.wav` (the authors' fallback); an id with its own suffix is taken as is.
    When none exists the `.mp3` path is returned, so the skip reason names what was looked for."""
    if Path(speech_id).suffix:
        return folder / speech_id
    candidates = [folder / f"{speech_id}{suffix}" for suffix in AUDIO_SUFFIXES]
    return next((c for c in candidates if c.is_file()), candidates[0])


# ---------------------------------------------------------------------------------------------------
# Per-suite readers: (suite folder, records) → items


@dataclass(frozen=True)
class ReadContext:
    suite: "Suite"
    root: Path  # the suite's folder, e.g. data/Lyra_Eval/Docvqa_val


def _broken(index: int, skip: Skip) -> EvalItem:
    return EvalItem(id=f"line-{index + 1}", index=index, question=None, image=None, speech=None, problem=skip)


def _vqa_item(ctx: ReadContext, index: int, raw_id: str, record: dict[str, Any], answers: tuple[str, ...],
              question: str | None, speech_prompt: str | None = None) -> EvalItem:  # fmt: skip
    image_name = first_field(record, FIELDS_IMAGE)
    if image_name is None:
        return _broken(index, Skip(SKIP_UNREADABLE_RECORD, f"record `{raw_id}` has no `image` field"))
    speech_id = str(first_field(record, FIELDS_SPEECH_ID) or raw_id)
    image_dir = ctx.root / (ctx.suite.image_dir or "")
    return EvalItem(
        id=raw_id, index=index, question=question, answers=answers, speech_prompt=speech_prompt,
        image=image_dir / str(image_name), speech=resolve_audio(ctx.root / ctx.suite.audio_dir, speech_id),
        extra={k: record[k] for k in ("category", "question_type") if k in record},
    )  # fmt: skip


def _raw_id(record: dict[str, Any]) -> str | None:
    value = first_field(record, FIELDS_ID)
    return None if value is None else str(value)


def read_vqa(ctx: ReadContext, records: list[dict[str, Any] | Skip]) -> list[EvalItem]:
    """DocVQA^s, ChartQA^s, MM-Vet^s: answers in the record itself (`eval_speech.py` reads `answer`)."""
    items, ids = [], unique_ids([(_raw_id(r) or "") if isinstance(r, dict) else "" for r in records])
    for index, (record, item_id) in enumerate(zip(records, ids)):
        if isinstance(record, Skip) or not _raw_id(record):
            items.append(_broken(index, record if isinstance(record, Skip) else
                                 Skip(SKIP_UNREADABLE_RECORD, f"record {index + 1} has no `question_id`")))  # fmt: skip
            continue
        question = first_field(record, FIELDS_QUESTION)
        question = strip_placeholders(str(question)) if question is not None else None
        items.append(_vqa_item(ctx, index, item_id, record, as_answers(first_field(record, FIELDS_ANSWERS)),
                               question or None))  # fmt: skip
    return items


MMVET_ANNOTATIONS_KEY = "v1_{}"  # MM-Vet's own mm-vet.json keys its questions "v1_0" … "v1_217"


def read_mmvet(ctx: ReadContext, records: list[dict[str, Any] | Skip]) -> list[EvalItem]:
    """MM-Vet^s: like DocVQA; the ground truth (needed only by the judge) comes from the record's `answer`,
    else from MM-Vet's own `mm-vet.json` beside the records when it is there."""
    items = read_vqa(ctx, records)
    path = ctx.root / (ctx.suite.annotations or "")
    if not ctx.suite.annotations or not path.is_file():
        return items
    try:
        truth = {key: str(entry["answer"]) for key, entry in json.loads(path.read_text(encoding="utf-8")).items()}
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"cannot read the MM-Vet ground truth `{path}`: {exc}",
                         'it should be MM-Vet\'s mm-vet.json ({"v1_0": {"answer": ...}, ...})') from None  # fmt: skip
    return [item if item.answers or item.problem else
            replace(item, answers=as_answers(truth.get(MMVET_ANNOTATIONS_KEY.format(item.id), truth.get(item.id))))
            for item in items]  # fmt: skip


def textvqa_question(prompt: str) -> str:
    """The question inside a TextVQA prompt, lower-cased: the authors' `prompt_processor`
    (`eval_textvqa.py`), which picks the line that is not the OCR reference; any other shape → line 1."""
    if prompt.startswith("OCR tokens: "):
        match = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        if match:
            return match.group(1).lower()
    lines = prompt.split("\n")
    if "Reference OCR token: " in prompt and len(lines) == 3 and prompt.startswith("Reference OCR token:"):
        return lines[1].lower()
    return lines[0].lower()


def _textvqa_annotations(ctx: ReadContext) -> dict[tuple[str, str], tuple[str, ...]]:
    """(image_id, lower-cased question) → the 10 answers, from `TextVQA_0.5.1_val.json` when present."""
    path = ctx.root / (ctx.suite.annotations or "")
    if not ctx.suite.annotations or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))["data"]
        return {(str(a["image_id"]), str(a["question"]).lower()): as_answers(a["answers"]) for a in data}
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InputError(f"cannot read the TextVQA annotations `{path}`: {exc}",
                         "it should be the official TextVQA_0.5.1_val.json ({\"data\": [...]})") from None  # fmt: skip


def read_textvqa(ctx: ReadContext, records: list[dict[str, Any] | Skip]) -> list[EvalItem]:
    """TextVQA^s: answers from the annotation file keyed as `eval_textvqa.py` does — (`question_id`, which
    LLaVA's file sets to the image id, and the question recovered from `prompt`); or inline `answers`."""
    annotations = _textvqa_annotations(ctx)
    items, ids = [], unique_ids([(_raw_id(r) or "") if isinstance(r, dict) else "" for r in records])
    for index, (record, item_id) in enumerate(zip(records, ids)):
        raw_id = _raw_id(record) if isinstance(record, dict) else None
        if isinstance(record, Skip) or raw_id is None:
            items.append(_broken(index, record if isinstance(record, Skip) else
                                 Skip(SKIP_UNREADABLE_RECORD, f"record {index + 1} has no `question_id`")))  # fmt: skip
            continue
        text_prompt = first_field(record, FIELDS_TEXTVQA_QUESTION)
        speech_prompt = record.get("text")
        key_text = str(text_prompt or speech_prompt or "")
        image_stem = Path(str(first_field(record, FIELDS_IMAGE) or "")).stem
        question = textvqa_question(strip_placeholders(key_text)) if key_text else ""
        answers = as_answers(first_field(record, FIELDS_ANSWERS)) or annotations.get((raw_id, question)) or \
            annotations.get((image_stem, question), ())  # fmt: skip
        item = _vqa_item(ctx, index, item_id, record, answers, str(text_prompt) if text_prompt else None,
                         str(speech_prompt) if speech_prompt else None)  # fmt: skip
        items.append(replace(item, key=(raw_id, question)) if question and not item.problem else item)
    return items


def textvqa_key(question_id: Any, prompt: Any) -> tuple[str, str] | None:
    """The (image id, question) of an authors' TextVQA answer line (`question_id`, `prompt`), as
    `eval_textvqa.py` recovers it; None when the line has no prompt."""
    if question_id in (None, "") or not isinstance(prompt, str) or not prompt.strip():
        return None
    return str(question_id), textvqa_question(strip_placeholders(prompt))


def read_librispeech(ctx: ReadContext, records: list[dict[str, Any] | Skip]) -> list[EvalItem]:
    """LibriSpeech: `{"audio": path under LibriSpeech/, "text": normalised transcript}`; the id is the path."""
    items = []
    for index, record in enumerate(records):
        audio = first_field(record, FIELDS_ASR_AUDIO) if isinstance(record, dict) else None
        if isinstance(record, Skip) or audio is None:
            items.append(_broken(index, record if isinstance(record, Skip) else
                                 Skip(SKIP_UNREADABLE_RECORD, f"record {index + 1} has no `audio` field")))  # fmt: skip
            continue
        reference = first_field(record, FIELDS_ASR_TEXT)
        items.append(EvalItem(id=str(audio), index=index, question=None, image=None, speech=ctx.root / str(audio),
                              answers=(str(reference),) if reference is not None else ()))  # fmt: skip
    return items


# ---------------------------------------------------------------------------------------------------
# Prompts: mode → the pieces of the user turn (the system prompt is the default one, as in the eval scripts)


def image_then_speech(item: EvalItem) -> list[Piece]:
    """DocVQA / ChartQA / MM-Vet speech mode: `<|vision_start|><image><|vision_end|><speech>`."""
    return [Piece("image", str(item.image)), Piece("speech", str(item.speech))]


def image_then_question(item: EvalItem) -> list[Piece]:
    """Text mode (T+I): the same image, the question written: `<|vision_start|><image><|vision_end|>{question}`."""
    return [Piece("image", str(item.image)), Piece("text", item.question or "")]


def textvqa_speech(item: EvalItem) -> list[Piece]:
    """TextVQA speech mode: `<image>\\n` + the record's `text`, whose `<speech>` is the spoken question
    (docs/authors-behaviour.md#prompt-template). Our renderer puts one newline after a speech clip followed by text,
    so one leading newline of the text after `<speech>` is dropped here to keep the official string. Without a
    placeholder, the speech goes first and the text follows it [our choice: the file's text is UNVERIFIED]."""
    text = item.speech_prompt or SPEECH_PLACEHOLDER
    before, found, after = text.partition(SPEECH_PLACEHOLDER)
    if not found:
        before, after = "", "\n" + text
    pieces = [Piece("image", str(item.image))]
    if before:
        pieces.append(Piece("text", before))
    pieces.append(Piece("speech", str(item.speech)))
    after = after[1:] if after.startswith("\n") else after
    if after:
        pieces.append(Piece("text", after))
    return pieces


def speech_then_instruction(item: EvalItem) -> list[Piece]:
    """LibriSpeech: `<speech>\\n\\nRecord the spoken words as text.`"""
    return [Piece("speech", str(item.speech)), Piece("text", ASR_INSTRUCTION)]


# ---------------------------------------------------------------------------------------------------
# Metrics: name → how to compute it (functions live in `metrics.py`, imported when scoring)


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str  # "item": mean of a per-item score; "corpus": one value over all (reference, prediction) pairs
    function: str  # the function's name in lyra_cli.engine.eval.metrics
    higher_is_better: bool = True


METRICS: dict[str, Metric] = {
    "textvqa_accuracy": Metric("textvqa_accuracy", "item", "textvqa_accuracy"),
    "exact_match": Metric("exact_match", "item", "exact_match"),
    "anls": Metric("anls", "item", "anls"),
    "relaxed_accuracy": Metric("relaxed_accuracy", "item", "relaxed_accuracy"),
    "wer": Metric("wer", "corpus", "wer_official", higher_is_better=False),
    "wer_whisper": Metric("wer_whisper", "corpus", "wer_whisper", higher_is_better=False),
    "gpt_judge": Metric("gpt_judge", "judge", "judge_mmvet"),
}


# ---------------------------------------------------------------------------------------------------
# The registry


Reader = Callable[[ReadContext, list[dict[str, Any] | Skip]], list[EvalItem]]
Layout = Callable[[EvalItem], list[Piece]]


@dataclass(frozen=True)
class Suite:
    name: str
    title: str
    folder: str  # under data/Lyra_Eval
    questions: str  # the records file, in `folder`
    audio_dir: str  # where the spoken questions (or LibriSpeech audio) lie, relative to `folder`
    reader: Reader
    layouts: Mapping[str, Layout]  # mode → prompt; a mode missing here is not meaningful for the suite
    metrics: tuple[str, ...]  # names in METRICS; the first is the suite's score
    max_new_tokens: int
    image_dir: str | None = None  # images relative to `folder` ("" = the folder itself); None: no images
    annotations: str | None = None  # a separate answer file, relative to `folder`
    paper: Mapping[str, float] = field(default_factory=dict)  # the README's numbers (Mini, Base)
    needs_answers: bool = True  # False: scored by an external judge that holds the references

    @property
    def primary(self) -> Metric:
        return METRICS[self.metrics[0]]


SUITES: dict[str, Suite] = {
    "textvqa-s": Suite(
        "textvqa-s", "TextVQA^s", "TextVQA_speech", "lyra_textvqa_val_v051_ocr_withspeechid.jsonl", "lyra_audios",
        read_textvqa, {SPEECH_MODE: textvqa_speech, TEXT_MODE: image_then_question}, ("textvqa_accuracy",),
        VQA_MAX_NEW_TOKENS, image_dir="train_images", annotations="TextVQA_0.5.1_val.json",
        paper={"Lyra-Mini": 73.6, "Lyra-Base": 80.5},
    ),
    "docvqa-s": Suite(
        "docvqa-s", "DocVQA^s", "Docvqa_val", "lyra_docvqa_audio.jsonl", "lyra_audios", read_vqa,
        {SPEECH_MODE: image_then_speech, TEXT_MODE: image_then_question}, ("exact_match", "anls"),
        VQA_MAX_NEW_TOKENS, image_dir="", paper={"Lyra-Mini": 76.0, "Lyra-Base": 86.2},
    ),
    "chartqa-s": Suite(
        "chartqa-s", "ChartQA^s", "Chartvqa_human", "lyra_chartvqa_audio.jsonl", "lyra_audios", read_vqa,
        {SPEECH_MODE: image_then_speech, TEXT_MODE: image_then_question}, ("exact_match", "relaxed_accuracy"),
        VQA_MAX_NEW_TOKENS, image_dir="", paper={"Lyra-Mini": 42.2, "Lyra-Base": 61.0},
    ),
    "mmvet-s": Suite(
        "mmvet-s", "MM-Vet^s", "MM_vet_speech", "lyra_mm_vet.jsonl", "lyra_audios", read_mmvet,
        {SPEECH_MODE: image_then_speech, TEXT_MODE: image_then_question}, ("gpt_judge",),
        VQA_MAX_NEW_TOKENS, image_dir="images", annotations="mm-vet.json", paper={"Lyra-Mini": 47.8, "Lyra-Base": 57.0},
        needs_answers=False,
    ),
    "librispeech": Suite(
        "librispeech", "LibriSpeech test-clean", "LibriSpeech", "test-clean.jsonl", "", read_librispeech,
        {SPEECH_MODE: speech_then_instruction}, ("wer", "wer_whisper"), ASR_MAX_NEW_TOKENS,
        paper={"Lyra-Mini": 2.4, "Lyra-Base": 2.0},
    ),
}  # fmt: skip


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise UsageError(f"unknown eval suite `{name}`", f"choose one of: {', '.join([*SUITES, 'needle'])}")
    return SUITES[name]


def check_mode(suite: Suite, mode: str) -> None:
    if mode not in MODES:
        raise UsageError(f"unknown --mode `{mode}`", f"choose one of: {', '.join(MODES)}")
    if mode not in suite.layouts:
        raise UsageError(f"{suite.title} has no `{mode}` mode: the question is the audio itself",
                         f"use --mode {', '.join(suite.layouts)}")  # fmt: skip


def suite_root(suite: Suite, data_dir: Path) -> Path:
    """The suite's folder: `DATA/<folder>` when DATA is `data/Lyra_Eval`, or DATA itself when it is the folder."""
    for root in (data_dir / suite.folder, data_dir):
        if (root / suite.questions).is_file():
            return root
    if not data_dir.is_dir():
        raise InputError(f"data folder `{data_dir}` does not exist", f"give data/Lyra_Eval, or its {suite.folder}/")
    raise InputError(
        f"no `{suite.folder}/{suite.questions}` under `{data_dir}`",
        f"--data takes the authors' data/Lyra_Eval folder (or its {suite.folder}/ folder); see README's `lyra eval`",
    )


def load_items(suite: Suite, data_dir: Path) -> list[EvalItem]:
    """Every record of the suite's data file, in file order, as items (unreadable ones carry a `problem`)."""
    root = suite_root(suite, data_dir)
    return suite.reader(ReadContext(suite, root), read_jsonl(root / suite.questions))


def select(items: Sequence[EvalItem], *, limit: int | None = None, shard: tuple[int, int] = (0, 1)) -> list[EvalItem]:
    """The first `limit` items, then those of shard i of n (every n-th item from i: shards stay balanced
    even when the data file is sorted by difficulty or length)."""
    chosen = list(items[:limit] if limit is not None else items)
    index, count = shard
    return [item for k, item in enumerate(chosen) if k % count == index]


def layout(suite: Suite, item: EvalItem, mode: str) -> list[Piece] | Skip:
    """The user turn for this item and mode, or why it cannot be asked (checked before anything is decoded)."""
    if item.problem is not None:
        return item.problem
    if suite.needs_answers and not item.answers:
        return Skip(SKIP_NO_REFERENCE, f"no reference answer for `{item.id}`")
    if mode == TEXT_MODE and not item.question:
        return Skip(SKIP_NO_QUESTION_TEXT, f"record `{item.id}` has no question text for --mode text")
    pieces = suite.layouts[mode](item)
    for piece in pieces:
        if piece.kind in ("image", "speech") and not Path(piece.value).is_file():
            reason = SKIP_MISSING_IMAGE if piece.kind == "image" else SKIP_MISSING_AUDIO
            return Skip(reason, f"`{piece.value}` does not exist")
    return pieces

"""Running a benchmark so that it survives: one JSON line per item, appended as it comes, resumable,
shardable, mergeable, and scored from the file alone.

A predictions file holds one line per item, answered or skipped:

    {"id": "34", "index": 3, "suite": "docvqa-s", "mode": "speech", "shard": "0/1", "prediction": "…",
     "answers": ["…"], "question": "…", "prompt_tokens": 412, "new_tokens": 5, "kept_tokens": 412,
     "seconds": 0.81, "stop_reason": "end", "settings": {…}}
    {"id": "35", "index": 4, …, "skipped": "missing image", "detail": "`…/35.png` does not exist", …}

With `--logprobs N` an answered line also holds `logprobs` (as `lyra chat --json` gives them) and its
`settings` say N, so a file never mixes lines with and without them; scoring ignores the field.

Each line is flushed and fsynced before the next item starts, so a killed run loses at most the item in
flight; a line cut by the kill is detected (no newline, or not JSON) and cut off before appending. On
resume every id already in the file, skipped ones included, is not asked again. `settings` (model,
decoding, extractor) must match for a file to be resumed or merged: answers of two set-ups never mix.

Scoring reads only `id` and `prediction` (or, for the authors' answer files, `question_id` and `text`, and
for TextVQA the `prompt` holding the question), and takes the references from the data set, so predictions
of other systems score the same way. Lines are matched to questions by these keys, never by their order.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lyra_cli.audio.frontend import AudioFrontEnd
from lyra_cli.engine.eval.suites import (
    METRICS,
    SKIP_NO_REFERENCE,
    SKIP_UNKNOWN_ID,
    SKIP_UNREADABLE_AUDIO,
    SKIP_UNREADABLE_IMAGE,
    EvalItem,
    Piece,
    Skip,
    Suite,
    layout,
    load_items,
    select,
    textvqa_key,
    unique_ids,
)
from lyra_cli.errors import InputError, LyraError, UsageError
from lyra_cli.fileio import write_atomically

SHARD_SUFFIX = ".shard-{index}-of-{count}"
# Set by torchrun and `accelerate launch` in every process they start.
RANK_ENV, WORLD_SIZE_ENV, LOCAL_RANK_ENV = "RANK", "WORLD_SIZE", "LOCAL_RANK"
SHARD_POLL_S = 5.0  # how often rank 0 looks at the other shards' files while waiting to merge
TIMING_KEYS = ("seconds", "samples_per_s", "tokens_per_s")  # differ between runs of the same predictions

ProgressCallback = Callable[[int, int, Mapping[str, Any]], None]  # (done, total, the item's record)
Judge = Callable[[list[Any]], list[float]]  # MM-Vet: records → one score in [0, 1] each


# ---------------------------------------------------------------------------------------------------
# Shards


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    @property
    def label(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def pair(self) -> tuple[int, int]:
        return self.index, self.count


SINGLE = Shard(0, 1)


def parse_shard(text: str) -> Shard:
    """`i/n` with 0 ≤ i < n."""
    index, slash, count = text.partition("/")
    if not (slash and index.strip().isdigit() and count.strip().isdigit()):
        raise UsageError(f"cannot read --shard `{text}`", "use i/n, e.g. --shard 0/4 … --shard 3/4, or --shard auto")
    shard = Shard(int(index), int(count))
    if not 0 <= shard.index < shard.count:
        raise UsageError(f"--shard `{text}` is out of range", f"the index goes from 0 to {shard.count - 1}")
    return shard


def shard_from_env(env: Mapping[str, str]) -> Shard:
    """The shard of this process under torchrun / `accelerate launch` (RANK of WORLD_SIZE); 0/1 alone."""
    if RANK_ENV not in env or WORLD_SIZE_ENV not in env:
        return SINGLE
    try:
        return parse_shard(f"{int(env[RANK_ENV])}/{int(env[WORLD_SIZE_ENV])}")
    except ValueError:
        raise UsageError(
            f"cannot read {RANK_ENV}=`{env[RANK_ENV]}` / {WORLD_SIZE_ENV}=`{env[WORLD_SIZE_ENV]}`",
            "these are set by torchrun or accelerate launch; unset them to run alone",
        ) from None


def shard_path(out_path: Path, shard: Shard) -> Path:
    """`run.jsonl` → `run.shard-1-of-4.jsonl`."""
    suffix = SHARD_SUFFIX.format(index=shard.index, count=shard.count)
    return out_path.with_name(out_path.stem + suffix + out_path.suffix)


# ---------------------------------------------------------------------------------------------------
# The predictions file


@dataclass
class PredictionsFile:
    records: list[dict[str, Any]]
    good_bytes: int  # the file's length up to the end of its last complete, readable line
    torn_tail: bool  # the last line was cut short (a run killed while writing it)
    corrupt_lines: int = 0  # complete lines that are not JSON objects (ignored)


def read_predictions(path: Path) -> PredictionsFile:
    """Every readable line of a predictions file. A last line without its newline is a torn write."""
    if not path.exists():
        return PredictionsFile([], 0, False)
    if not path.is_file():
        raise InputError(f"`{path}` is not a file", "give a .jsonl predictions file")
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # after the last newline: empty unless the last write was cut short
    records, corrupt, good, offset = [], 0, 0, 0
    for line in lines:
        offset += len(line) + 1
        record = _parse_line(line)
        if record is None:
            corrupt += line.strip() != b""
        else:
            records.append(record)
        good = offset
    return PredictionsFile(records, good, tail.strip() != b"", corrupt)


def _parse_line(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


class PredictionWriter:
    """Appends one line per record; each is on disk (flush + fsync) before `append` returns."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("ab")

    def append(self, record: Mapping[str, Any]) -> None:
        self._file.write((json.dumps(record, ensure_ascii=False) + "\n").encode())
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "PredictionWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def recorded_settings(record: Mapping[str, Any]) -> dict[str, Any]:
    """A prediction's run settings. Lines written before the audio front end was recorded were made with the
    default one (channel mean, soxr), so they still resume and merge with a default run."""
    from lyra_cli.audio.frontend import AudioFrontEnd

    return {**AudioFrontEnd().key_settings(), **(record.get("settings") or {})}


def check_resumable(existing: PredictionsFile, path: Path, suite: Suite, mode: str,
                    settings: Mapping[str, Any]) -> None:  # fmt: skip
    """Refuse to append to a file made by another suite, mode or set-up (the answers would mix)."""
    ours = {"suite": suite.name, "mode": mode, **settings}
    for record in existing.records:
        theirs = {"suite": record.get("suite"), "mode": record.get("mode"), **recorded_settings(record)}
        differences = [f"{key} `{theirs.get(key)}` ≠ `{ours.get(key)}`" for key in {**theirs, **ours}
                       if theirs.get(key) != ours.get(key)]  # fmt: skip
        if differences:
            raise UsageError(f"`{path}` holds predictions of another run (file ≠ now: {'; '.join(differences)})",
                             "give another --out, or --no-resume to start this file again")  # fmt: skip


def prepare_output(path: Path, *, resume: bool, suite: Suite, mode: str, settings: Mapping[str, Any]) -> set[str]:
    """Make `path` ready to append to; returns the ids it already answers (or skipped)."""
    if not resume:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
        return set()
    existing = read_predictions(path)
    check_resumable(existing, path, suite, mode, settings)
    if existing.torn_tail or existing.corrupt_lines:
        _rewrite_readable(path, existing)
    return {str(r["id"]) for r in existing.records if "id" in r}


def _rewrite_readable(path: Path, existing: PredictionsFile) -> None:
    """Cut a torn last line off; rewrite the file when lines in the middle are damaged too."""
    if existing.corrupt_lines == 0:
        with path.open("r+b") as f:
            f.truncate(existing.good_bytes)
        return
    _write_atomically(path, existing.records)


def _write_atomically(path: Path, records: Iterable[Mapping[str, Any]]) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)

    write_atomically(path, write)


# ---------------------------------------------------------------------------------------------------
# Answering


@dataclass(frozen=True)
class Answering:
    """How every item is answered: the input layout `mode`, the decoding (`sampling`), the extractor (None:
    the config's) and how speech files are decoded (`front_end`; `--official-audio`: the authors')."""

    mode: str
    sampling: Any
    extractor: Any = None
    front_end: AudioFrontEnd = AudioFrontEnd()


@dataclass(frozen=True)
class Output:
    """Where the answers go: `path` (JSON lines), continued when `resume` and its `settings` (model,
    decoding…, which must match on resume) allow, as this run's `shard`."""

    path: Path
    resume: bool = True
    shard: Shard = SINGLE
    settings: Mapping[str, Any] = field(default_factory=dict)


def run_suite(
    engine: Any,
    suite: Suite,
    items: Sequence[EvalItem],
    answering: Answering,
    output: Output,
    *,
    on_progress: ProgressCallback | None = None,
) -> "Summary":
    """Answer every item of `items` (already selected for this shard) not yet in `output.path`, then score
    the file against `items`."""
    settings = dict(output.settings)
    done = prepare_output(output.path, resume=output.resume, suite=suite, mode=answering.mode, settings=settings)
    pending = [item for item in items if item.id not in done]
    n_before = len(items) - len(pending)
    header = {"suite": suite.name, "mode": answering.mode, "shard": output.shard.label}
    if on_progress is not None and n_before:
        on_progress(n_before, len(items), {})  # a resumed run's bar starts where the last one stopped
    with PredictionWriter(output.path) as writer:
        for n, item in enumerate(pending, start=1):
            record = {"id": item.id, "index": item.index, **header, **answer_item(engine, suite, item, answering),
                      "settings": settings}  # fmt: skip
            writer.append(record)
            if on_progress is not None:
                on_progress(n_before + n, len(items), record)
    summary = score_file(suite, items, output.path)
    summary.resumed = n_before
    return summary


def answer_item(engine: Any, suite: Suite, item: EvalItem, answering: Answering) -> dict[str, Any]:
    """The item's record: its prediction with token counts and time, or why it was skipped."""
    pieces = layout(suite, item, answering.mode)
    if isinstance(pieces, Skip):
        return _skipped(pieces)
    start = time.perf_counter()
    media = decode_pieces(pieces, answering.front_end)
    if isinstance(media, Skip):
        return _skipped(media)
    parts = [engine.encode(m) if not isinstance(m, str) else _text_part(m) for m in media]
    done = engine.generate(_conversation(), parts, answering.sampling, extractor=answering.extractor)
    reference = {"reference": item.answers[0]} if suite.primary.kind == "corpus" and item.answers else {}
    return {
        "prediction": done.text, "question": item.question, "answers": list(item.answers), **reference,
        "prompt_tokens": done.prompt_tokens, "new_tokens": done.new_tokens, "kept_tokens": done.kept_tokens,
        "seconds": round(time.perf_counter() - start, 4), "stop_reason": done.stop_reason,
        **({"logprobs": [lp.to_json() for lp in done.logprobs]} if done.logprobs is not None else {}),
    }  # fmt: skip


def _skipped(skip: Skip) -> dict[str, Any]:
    return {"skipped": skip.reason, "detail": skip.detail}


def decode_pieces(pieces: Sequence[Piece], front_end: AudioFrontEnd = AudioFrontEnd()) -> list[Any] | Skip:
    """Decode images (at the authors' eval size) and speech; a file that does not decode is a skip."""
    from lyra_cli.engine.model.vision import EVAL_MAX_SIDE, load_image
    from lyra_cli.engine.run.pipeline import DecodedImage, read_media

    decoded: list[Any] = []
    for piece in pieces:
        try:
            if piece.kind == "image":
                decoded.append(DecodedImage(load_image(piece.value, max_side=EVAL_MAX_SIDE), piece.value))
            elif piece.kind == "speech":
                decoded.append(read_media("speech", piece.value, front_end))
            else:
                decoded.append(piece.value)
        except InputError as exc:
            reason = SKIP_UNREADABLE_IMAGE if piece.kind == "image" else SKIP_UNREADABLE_AUDIO
            return Skip(reason, exc.message)
    return decoded


def _text_part(text: str) -> Any:
    from lyra_cli.engine.run.prompt import TextPart

    return TextPart(text)


def _conversation() -> Any:
    """Each item in a fresh conversation with the default system prompt, as the eval scripts ask."""
    from lyra_cli.engine.run.prompt import Conversation

    return Conversation()


# ---------------------------------------------------------------------------------------------------
# Scoring


@dataclass
class Summary:
    """What a run (or a predictions file) scores. Scores are percentages, as in the paper (WER too)."""

    suite: str
    mode: str
    metric: str
    score: float | None  # None when nothing could be scored, never a silent 0
    metrics: dict[str, float | None]
    count: int  # items scored
    skipped: dict[str, int]  # reason → items
    missing: int  # selected items with no line in the file
    seconds: float  # model time summed over the answered items
    samples_per_s: float | None
    tokens_per_s: float | None
    prompt_tokens: int
    new_tokens: int
    predictions: str
    paper: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    resumed: int = 0  # items found already answered when this run started
    per_item: list[dict[str, Any]] = field(default_factory=list, repr=False)  # one record per scored item

    def to_json(self) -> dict[str, Any]:
        """The summary without its per-item records (those go to their own file, see `write_per_item`)."""
        return {k: v for k, v in asdict(self).items() if k != "per_item"}

    def comparable(self) -> dict[str, Any]:
        """The summary without what changes between two runs of the same predictions (time, resume, file)."""
        return {k: v for k, v in self.to_json().items() if k not in (*TIMING_KEYS, "resumed", "predictions")}


def prediction_id(record: Mapping[str, Any]) -> str | None:
    """Ours: `id`; the authors' answer files: `question_id` (VQA) or `speech` (LibriSpeech)."""
    for key in ("id", "question_id", "speech"):
        if record.get(key) not in (None, ""):
            return str(record[key])
    return None


def prediction_text(record: Mapping[str, Any]) -> str | None:
    value = record.get("prediction", record.get("text"))
    return None if value is None else str(value)


def keyed_predictions(records: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Mapping[str, Any]], int]:
    """id → record (first wins) and the number of duplicate lines. Files without our `id` field (the
    authors' answer files) reuse ids as their data file does, so those get the same `#2` numbering."""
    raw = [prediction_id(r) or "" for r in records]
    ids = [str(r["id"]) if "id" in r else new for r, new in zip(records, unique_ids(raw))]
    keyed: dict[str, Mapping[str, Any]] = {}
    for item_id, record in zip(ids, records):
        keyed.setdefault(item_id, record)
    return keyed, len(ids) - len(keyed)


@dataclass
class Matched:
    """A predictions file's lines, each paired with the item it answers, in the file's order."""

    pairs: list[tuple[EvalItem, Mapping[str, Any]]]
    unknown: int  # lines whose id or (image, question) is not in the data
    duplicates: int  # lines answering an item an earlier line already answered (the first is scored)


def match_predictions(items: Sequence[EvalItem], records: Sequence[Mapping[str, Any]]) -> Matched:
    """Pair each line with its item, never by position: our lines carry the item's `id`; the authors'
    TextVQA answer lines carry the image id as `question_id` and the prompt, so they are matched by
    (image, question) as `eval_textvqa.py` does — two questions about one image answered in any order
    each find their own; other files by `question_id` (or `speech`), the only key their data has."""
    by_id = {item.id: item for item in items}
    by_key: dict[tuple[str, str], list[EvalItem]] = {}
    for item in items:
        if item.key is not None:
            by_key.setdefault(item.key, []).append(item)
    # Lines without our `id` that repeat a question id get the data file's `#2` numbering (unique_ids).
    fallback_ids = unique_ids([prediction_id(r) or "" for r in records])
    pairs: list[tuple[EvalItem, Mapping[str, Any]]] = []
    unknown, taken = 0, set()
    for record, fallback_id in zip(records, fallback_ids):
        key = textvqa_key(record.get("question_id"), record.get("prompt")) if by_key and "id" not in record else None
        if key is not None:
            item = _first_free(by_key.get(key, []), taken)
        else:
            item = by_id.get(str(record["id"]) if "id" in record else fallback_id)
        if item is None:
            unknown += 1
        elif item.id not in taken:
            taken.add(item.id)
            pairs.append((item, record))
    return Matched(pairs, unknown, len(records) - unknown - len(pairs))


def _first_free(candidates: Sequence[EvalItem], taken: set[str]) -> EvalItem | None:
    """The first item with this (image, question) not answered yet; when all are, the first (a duplicate
    line, not an unknown one); None when no item has it. One question asked twice about one image has the
    same answers both times, as in the authors' scorer, which keys its annotations the same way."""
    return next((item for item in candidates if item.id not in taken), candidates[0] if candidates else None)


def score_predictions(
    suite: Suite,
    data_dir: Path,
    predictions_path: Path,
    *,
    limit: int | None = None,
    shard: Shard = SINGLE,
    mode: str | None = None,
    judge: Judge | None = None,
    require_scores: bool = False,
) -> Summary:
    """Score a predictions file (ours or another system's) against the suite's data, no model needed.
    With `require_scores`, a file in which nothing can be scored is an error rather than a score of None."""
    _check_predictions_path(predictions_path)
    items = select(load_items(suite, data_dir), limit=limit, shard=shard.pair)
    summary = score_file(suite, items, predictions_path, mode=mode, judge=judge)
    if require_scores and summary.count == 0:
        raise _nothing_scored(suite, predictions_path, summary)
    return summary


def _check_predictions_path(path: Path) -> None:
    if path.is_dir():
        raise InputError(f"predictions file `{path}` is a folder", "give the .jsonl file a run wrote, not its folder")
    if not path.is_file():
        raise InputError(f"predictions file `{path}` does not exist", "give the .jsonl a run wrote")
    if not os.access(path, os.R_OK):
        raise InputError(f"cannot read `{path}`: permission denied", "check the file's permissions")


def _nothing_scored(suite: Suite, path: Path, summary: Summary) -> InputError:
    """Why not one line of the file could be scored, in terms a user can act on."""
    n_lines = len(read_predictions(path).records)
    if n_lines == 0:
        return InputError(f"`{path}` holds no prediction lines (JSON objects with `id` and `prediction`)",
                          f"give the .jsonl a `lyra eval {suite.name}` run wrote, or the authors' answer file")
    if summary.skipped.get(SKIP_UNKNOWN_ID, 0) == n_lines:
        return InputError(f"none of the {n_lines} line(s) of `{path}` answers a question of {suite.title} in the data",
                          "score it with the suite, data and item selection of the run that wrote it")
    reasons = ", ".join(f"{reason}: {n}" for reason, n in summary.skipped.items())
    return InputError(f"nothing in `{path}` can be scored ({reasons})",
                      "every line was skipped or lacks a reference answer: fix the data, then rerun those items")


def score_file(suite: Suite, items: Sequence[EvalItem], path: Path, *, mode: str | None = None,
               judge: Judge | None = None) -> Summary:  # fmt: skip
    content = read_predictions(path)
    matched = match_predictions(items, content.records)
    skipped: Counter[str] = Counter({SKIP_UNKNOWN_ID: matched.unknown} if matched.unknown else {})
    answered: list[tuple[EvalItem, Mapping[str, Any], str]] = []
    for item, record in matched.pairs:
        text = prediction_text(record)
        if "skipped" in record:
            skipped[str(record["skipped"])] += 1
        elif text is None:
            skipped["no prediction text"] += 1
        elif not item.answers and (suite.needs_answers or judge is not None):
            skipped[SKIP_NO_REFERENCE] += 1
        else:
            answered.append((item, record, text))
    answered_ids = {item.id for item, _ in matched.pairs}
    missing = 0
    for item in (item for item in items if item.id not in answered_ids):
        reason = _unanswerable(suite, item)
        if reason is None:
            missing += 1
        else:
            skipped[reason] += 1
    metrics, item_scores, notes = _metric_values(suite, answered, judge)
    notes += _file_notes(content, matched.duplicates)
    mode = _file_mode(content.records) or mode or "unknown"  # a file of ours says which mode it was run in
    summary = _summary(suite, mode, answered, metrics, skipped, missing=missing, path=path, notes=notes)
    summary.per_item = per_item_records(suite, answered, item_scores)
    return summary


def _unanswerable(suite: Suite, item: EvalItem) -> str | None:
    """Why an item without a prediction could not have had one (a predictions file from elsewhere may
    leave out the data set's broken records): counted as skipped, not as missing."""
    if item.problem is not None:
        return item.problem.reason
    return SKIP_NO_REFERENCE if suite.needs_answers and not item.answers else None


def _file_mode(records: Sequence[Mapping[str, Any]]) -> str | None:
    modes = {str(r["mode"]) for r in records if "mode" in r}
    return modes.pop() if len(modes) == 1 else None


def _file_notes(content: PredictionsFile, duplicates: int) -> list[str]:
    notes = []
    if content.torn_tail:
        notes.append("the file's last line is cut short (a run was killed while writing it): ignored")
    if content.corrupt_lines:
        notes.append(f"{content.corrupt_lines} line(s) are not JSON objects: ignored")
    if duplicates:
        notes.append(f"{duplicates} line(s) repeat an id: the first of each was scored")
    return notes


ItemScores = dict[str, list[float | None]]  # metric → one score per answered item


def _metric_values(suite: Suite, answered: list[tuple[EvalItem, Mapping[str, Any], str]],
                   judge: Judge | None) -> tuple[dict[str, float | None], ItemScores, list[str]]:  # fmt: skip
    """Each metric over the answered items (percentages), and its score for each item (fractions)."""
    from lyra_cli.engine.eval import metrics as m

    values: dict[str, float | None] = {}
    per_item: ItemScores = {}
    notes: list[str] = []
    for name in suite.metrics:
        metric = METRICS[name]
        function = getattr(m, metric.function) if metric.kind != "judge" else None
        if metric.kind == "item":
            scores = [function(text, list(item.answers)) for item, _, text in answered]
            values[name], per_item[name] = m.summarize(scores)["score"], list(scores)
        elif metric.kind == "corpus":
            refs, hyps = [item.answers[0] for item, _, _ in answered], [text for _, _, text in answered]
            values[name] = m.PERCENT * function(refs, hyps).wer if refs else None
            # An utterance's own WER; the corpus WER weights utterances by length, so it is not their mean.
            per_item[name] = [function([ref], [hyp]).wer for ref, hyp in zip(refs, hyps)]
        else:
            values[name], per_item[name], note = _judged(answered, judge)
            notes += note
    return values, per_item, notes


def _judged(answered: list[tuple[EvalItem, Mapping[str, Any], str]],
            judge: Judge | None) -> tuple[float | None, list[float | None], list[str]]:  # fmt: skip
    """MM-Vet: a GPT judge grades each answer against MM-Vet's ground truth; without one, no score."""
    if judge is None:
        return None, [None] * len(answered), [
            "MM-Vet is graded by a GPT judge: give --judge-url and --judge-model, or upload the "
            "exported .mmvet.json to the online MM-Vet grader"]  # fmt: skip
    from lyra_cli.engine.eval import metrics as m
    from lyra_cli.engine.eval.mmvet import MMVetRecord

    records = [MMVetRecord(item.id, item.question or "", item.answers[0], text) for item, _, text in answered]
    scores = judge(records) if records else []
    return m.summarize(scores)["score"], list(scores), []


# ---------------------------------------------------------------------------------------------------
# Per-item scores: why a number moved

PER_ITEM_FIELDS = ("id", "suite", "prediction", "references", "scores")  # a per-item file's records, exactly


def per_item_records(suite: Suite, answered: list[tuple[EvalItem, Mapping[str, Any], str]],
                     item_scores: ItemScores) -> list[dict[str, Any]]:  # fmt: skip
    """One record per scored item, in the predictions file's order: its prediction, its references and
    each metric's score for it (a fraction; the summary's percentages are 100 × the mean of these)."""
    return [dict(zip(PER_ITEM_FIELDS, (item.id, suite.name, text, list(item.answers),
                                       {name: scores[k] for name, scores in item_scores.items()})))
            for k, (item, _, text) in enumerate(answered)]  # fmt: skip


def write_per_item(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    """The per-item records as JSON lines, written whole or not at all (the command checked the target first)."""
    _write_atomically(path, records)


def _summary(suite: Suite, mode: str, answered: list[tuple[EvalItem, Mapping[str, Any], str]],
             metrics: dict[str, float | None], skipped: Counter[str], *, missing: int, path: Path,
             notes: list[str]) -> Summary:  # fmt: skip
    seconds = math.fsum(float(r.get("seconds", 0.0)) for _, r, _ in answered)
    new_tokens = sum(int(r.get("new_tokens", 0)) for _, r, _ in answered)
    return Summary(
        suite=suite.name, mode=mode, metric=suite.primary.name, score=metrics[suite.primary.name], metrics=metrics,
        count=len(answered), skipped=dict(sorted(skipped.items())), missing=missing, seconds=round(seconds, 3),
        samples_per_s=round(len(answered) / seconds, 3) if seconds > 0 else None,
        tokens_per_s=round(new_tokens / seconds, 2) if seconds > 0 else None,
        prompt_tokens=sum(int(r.get("prompt_tokens", 0)) for _, r, _ in answered), new_tokens=new_tokens,
        predictions=str(path), paper=dict(suite.paper), notes=notes,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Shards → one file


@dataclass(frozen=True)
class MergeReport:
    out: Path
    records: int
    files: int
    duplicates: int  # identical lines found in more than one file (kept once)
    shards: list[str]


def merge_predictions(paths: Sequence[Path], out_path: Path) -> MergeReport:
    """Shard files → one file in data order, each id once. Refuses files of different suites, modes or
    settings, an incomplete set of shards, and two different answers to one id."""
    if not paths:
        raise UsageError("nothing to merge", "give the shard files, e.g. run.shard-0-of-2.jsonl run.shard-1-of-2.jsonl")
    contents = {path: read_predictions(_existing(path)) for path in paths}
    records = [r for content in contents.values() for r in content.records]
    _check_same_run(records, paths)
    shards = _check_shards(records)
    merged: dict[str, dict[str, Any]] = {}
    duplicates = 0
    for record in records:
        item_id = str(record.get("id"))
        if item_id in merged:
            _check_same_answer(merged[item_id], record)
            duplicates += 1
            continue
        merged[item_id] = record
    ordered = sorted(merged.values(), key=lambda r: (int(r.get("index", 0)), str(r.get("id"))))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(out_path, ordered)
    return MergeReport(out_path, len(ordered), len(paths), duplicates, shards)


def _existing(path: Path) -> Path:
    from lyra_cli.outputs import is_predictions_file

    if path.is_dir():
        raise InputError(f"predictions file `{path}` is a folder", "give the .jsonl files the shards wrote")
    if not path.is_file():
        raise InputError(f"predictions file `{path}` does not exist", "give the .jsonl files the shards wrote")
    try:
        ours = is_predictions_file(path)
    except (OSError, ValueError):  # ValueError: JSON or UTF-8
        ours = False
    if not ours:
        raise InputError(f"`{path}` is not a lyra predictions file", "give the .jsonl files the shards wrote")
    return path


def _check_same_run(records: Sequence[Mapping[str, Any]], paths: Sequence[Path]) -> None:
    runs = {json.dumps([r.get("suite"), r.get("mode"), recorded_settings(r)], sort_keys=True) for r in records}
    if len(runs) > 1:
        raise UsageError(f"the files hold predictions of different runs: {' · '.join(sorted(runs))}",
                         f"merge only the shards of one run ({len(paths)} files given)")  # fmt: skip


def _check_shards(records: Sequence[Mapping[str, Any]]) -> list[str]:
    labels = sorted({str(r["shard"]) for r in records if "shard" in r})
    shards = [parse_shard(label) for label in labels]
    counts = {s.count for s in shards}
    if len(counts) > 1:
        raise UsageError(f"the files come from different shardings ({', '.join(labels)})", "merge one run's shards")
    if counts:
        count = counts.pop()
        missing = sorted(set(range(count)) - {s.index for s in shards})
        if missing and count > 1:
            raise UsageError(f"shard(s) {', '.join(f'{i}/{count}' for i in missing)} are missing",
                             f"give all {count} shard files (run the missing ones first)")  # fmt: skip
    return labels


def _check_same_answer(first: Mapping[str, Any], other: Mapping[str, Any]) -> None:
    keys = ("prediction", "skipped")
    if any(first.get(k) != other.get(k) for k in keys):
        raise LyraError(f"id `{first.get('id')}` has two different answers in the files",
                        "the same item was run twice with different results; remove one of the files")  # fmt: skip


def wait_for_shards(expected: Mapping[Path, set[str]], *, timeout_s: float, poll_s: float = SHARD_POLL_S,
                    sleep: Callable[[float], None] = time.sleep,
                    clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
    """Block until every shard file holds a line for each of its ids (rank 0, before merging)."""
    deadline = clock() + timeout_s
    while True:
        waiting = {p: ids - {str(r.get("id")) for r in read_predictions(p).records} for p, ids in expected.items()}
        waiting = {p: ids for p, ids in waiting.items() if ids}
        if not waiting:
            return
        if clock() >= deadline:
            lagging = ", ".join(f"`{p}` ({len(ids)} to go)" for p, ids in waiting.items())
            raise LyraError(f"the other shards did not finish in time: {lagging}",
                            "rerun the missing ranks (they resume), then `lyra eval merge`")  # fmt: skip
        sleep(poll_s)

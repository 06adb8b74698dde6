"""Training data: the official record schemas (docs/authors-behaviour.md#training-data) → labelled prompts
(docs/authors-behaviour.md#label-masking).

A record is parsed and checked once (`parse_records`): every problem is counted by reason with the record's
index and id, and the record is dropped; nothing is ever swapped for another sample. A kept record becomes
a `TrainExample` through the *inference* prompt code (`render_user`, `build_inputs`, `encode_chunk`), so
training and serving cannot drift apart. Only the answer is laid out differently from `render`: it is its
own text chunk, `{answer}<|im_end|>`, followed by a masked `\\n` chunk, so label boundaries fall exactly
on token boundaries (docs/authors-behaviour.md#label-masking: the answer tokens and `<|im_end|>` are supervised,
everything else is IGNORE_INDEX).

    records, problems = parse_records(path, image_folder=root, speech_folder=root)
    example = build_example(records[0], tokenizer, encode_media)
    inputs = example.prompt_inputs(embed_ids=..., project_speech=...)   # (1, T, H) and labels (T,)
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lyra_cli.audio.features import TOKENS_PER_WINDOW
from lyra_cli.engine.run.prompt import (
    DEFAULT_SYSTEM_PROMPT,
    IM_END,
    IM_START,
    Part,
    PromptInputs,
    Segment,
    SpeechPart,
    TextPart,
    VisualPart,
    build_inputs,
    encode_chunk,
    render_user,
)
from lyra_cli.errors import InputError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # what torch's cross-entropy skips
IMAGE_PLACEHOLDER = "<image>"
SPEECH_PLACEHOLDER = "<speech>"
UNIT_PATTERN = re.compile(r"<(\d+)>")  # the authors' tgt_unit parse (train.py:1347-1350)
UNIT_VOCAB_SIZE = 1000  # mHuBERT layer-11 k-means units; 1000 is the CTC blank, never a target
JPG_FALLBACKS = (".gif", ".png")  # the authors retry a missing `.jpg` with these suffixes
ROLES = {"human": "user", "gpt": "assistant"}


class Problem:
    """The reasons a record is dropped; the values are what reports print."""

    MALFORMED = "malformed entry"
    NO_CONVERSATIONS = "no conversations"
    UNKNOWN_ROLE = "turn with an unknown `from`"
    BAD_TURN_ORDER = "turns do not alternate human/gpt"
    MISSING_IMAGE = "missing image file"
    MISSING_VIDEO = "missing video file"
    MISSING_SPEECH = "missing speech file"
    IMAGE_WITHOUT_FILE = "`<image>` placeholder without an image or video"
    SPEECH_WITHOUT_FILE = "`<speech>` placeholder without a speech file"
    BAD_TGT_UNIT = "unparsable tgt_unit"
    NO_TGT_UNIT = "no tgt_unit (stage 4 learns the speech units)"


# -- records ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordTurn:
    human: str
    gpt: str


@dataclass(frozen=True)
class TrainRecord:
    """One checked record; media paths are resolved and exist."""

    index: int  # position in the data file
    id: str
    turns: tuple[RecordTurn, ...]
    images: tuple[Path, ...] = ()
    video: Path | None = None
    speech: tuple[Path, ...] = ()  # one per `<speech>`, in placeholder order
    long_speech: Path | None = None
    speech_asr: str | None = None
    tgt_units: tuple[int, ...] | None = None


@dataclass
class ParseProblems:
    """Dropped records: `(index, id, reason)` each, and counts by reason."""

    items: list[tuple[int, str, str]] = field(default_factory=list)

    def add(self, index: int, record_id: str, reason: str) -> None:
        self.items.append((index, record_id, reason))

    @property
    def counts(self) -> Counter[str]:
        return Counter(reason for _, _, reason in self.items)

    def __len__(self) -> int:
        return len(self.items)

    def summary(self) -> str:
        return ", ".join(f"{n} × {reason}" for reason, n in sorted(self.counts.items())) or "none"


class _RecordProblem(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def load_entries(path: Path) -> list[Any]:
    """The raw entries of a `.json` list or a `.jsonl` file; an unparsable jsonl line becomes `None`."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"training data `{path}` is a folder", "give the path of a .json or .jsonl file")
    if not path.is_file():
        raise InputError(f"training data `{path}` does not exist", "give the path of a .json or .jsonl file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"training data `{path}` is not UTF-8 text (byte {exc.start})",
                         "give the official JSON file, saved as UTF-8") from exc  # fmt: skip
    except OSError as exc:
        raise InputError(f"cannot read training data `{path}` ({exc.strerror})", "check the file's permissions") from exc
    if path.suffix == ".jsonl":
        return [_json_or_none(line) for line in text.splitlines() if line.strip()]
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"`{path}` is not valid JSON: {exc}", "a .json data file holds one list of records") from exc
    if not isinstance(entries, list):
        raise InputError(f"`{path}` holds a JSON {type(entries).__name__}, not a list", "wrap the records in [...]")
    return entries


def _json_or_none(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def parse_records(
    path: str | Path, *, image_folder: str | Path, speech_folder: str | Path, strict: bool = False
) -> tuple[list[TrainRecord], ParseProblems]:
    """Parse and check every record; `strict` raises on the first problem instead of dropping the record."""
    records, problems = [], ParseProblems()
    for index, entry in enumerate(load_entries(Path(path))):
        record_id = str(entry.get("id", index)) if isinstance(entry, dict) else str(index)
        try:
            records.append(parse_record(index, entry, Path(image_folder), Path(speech_folder)))
        except _RecordProblem as exc:
            if strict:
                raise InputError(
                    f"record {index} (id `{record_id}`) in `{path}`: {exc.reason}{exc.detail}",
                    "fix or remove the record, or train without --strict to skip bad records",
                ) from None
            problems.add(index, record_id, exc.reason)
    if problems:
        log.warning("dropped %d of %d records: %s", len(problems), len(problems) + len(records), problems.summary())
    return records, problems


def keep_with_units(records: list[TrainRecord], problems: ParseProblems, *, strict: bool = False,
                    path: str | Path = "") -> list[TrainRecord]:  # fmt: skip
    """Stage 4 learns each record's `tgt_unit`: a record without one is skipped and counted in `problems`
    like any other unusable record (`strict`: the first one fails)."""
    kept = []
    for record in records:
        if record.tgt_units is not None:
            kept.append(record)
        elif strict:
            raise InputError(f"record {record.index} (id `{record.id}`) in `{path}`: {Problem.NO_TGT_UNIT}",
                             "give every stage-4 record a `tgt_unit`, or train without --strict to skip them")  # fmt: skip
        else:
            problems.add(record.index, record.id, Problem.NO_TGT_UNIT)
    return kept


def short_speech_count(records: Sequence[TrainRecord]) -> int:
    """Records without a `long_speech` recording: stage 3's adapter is for long speech (> 30 s)."""
    return sum(record.long_speech is None for record in records)


def parse_record(index: int, entry: Any, image_folder: Path, speech_folder: Path) -> TrainRecord:
    if not isinstance(entry, dict):
        raise _RecordProblem(Problem.MALFORMED)
    turns = _turns(entry.get("conversations"))
    text = "\x00".join(t.human for t in turns)
    images = tuple(_media_path(image_folder, p, Problem.MISSING_IMAGE, jpg=True) for p in _paths(entry, "image"))
    video = next((_media_path(image_folder, p, Problem.MISSING_VIDEO) for p in _paths(entry, "video")), None)
    long_paths = _paths(entry, "long_speech")
    long_speech = _media_path(speech_folder, long_paths[0], Problem.MISSING_SPEECH) if long_paths else None
    speech = tuple(_media_path(speech_folder, p, Problem.MISSING_SPEECH) for p in _paths(entry, "speech"))
    n_visual = text.count(IMAGE_PLACEHOLDER)
    if n_visual > len(images) + (video is not None):
        raise _RecordProblem(Problem.IMAGE_WITHOUT_FILE)
    n_speech = text.count(SPEECH_PLACEHOLDER)
    if n_speech > (1 if long_speech is not None else len(speech)):
        raise _RecordProblem(Problem.SPEECH_WITHOUT_FILE)
    asr = entry.get("speech_asr")
    return TrainRecord(
        index=index,
        id=str(entry.get("id", index)),
        turns=turns,
        images=images,
        video=video,
        speech=speech if long_speech is None else (),
        long_speech=long_speech,
        speech_asr=asr if isinstance(asr, str) and asr.strip() else None,
        tgt_units=parse_units(entry["tgt_unit"]) if "tgt_unit" in entry else None,
    )


def _turns(conversations: Any) -> tuple[RecordTurn, ...]:
    """human/gpt pairs; a leading non-human turn is dropped as the authors do (`source[1:]`)."""
    if not isinstance(conversations, list) or not conversations:
        raise _RecordProblem(Problem.NO_CONVERSATIONS)
    if not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in conversations):
        raise _RecordProblem(Problem.MALFORMED)
    roles = [t.get("from") for t in conversations]
    unknown = [r for r in roles if r not in ROLES]
    if unknown:
        raise _RecordProblem(Problem.UNKNOWN_ROLE, f" `{unknown[0]}`")
    if roles[0] != "human":
        conversations, roles = conversations[1:], roles[1:]
    if not roles or len(roles) % 2 or roles != ["human", "gpt"] * (len(roles) // 2):
        raise _RecordProblem(Problem.BAD_TURN_ORDER)
    pairs = zip(conversations[::2], conversations[1::2], strict=True)
    return tuple(RecordTurn(h["value"], g["value"]) for h, g in pairs)


def _paths(entry: dict, key: str) -> list[str]:
    value = entry.get(key)
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, str) and v for v in values):
        raise _RecordProblem(Problem.MALFORMED, f" (`{key}` is not a path or a list of paths)")
    return values


def _media_path(folder: Path, relative: str, missing: str, *, jpg: bool = False) -> Path:
    path = folder / relative
    if path.is_file():
        return path
    if jpg and path.suffix.lower() == ".jpg":
        for suffix in JPG_FALLBACKS:
            if path.with_suffix(suffix).is_file():
                return path.with_suffix(suffix)
    raise _RecordProblem(missing, f" `{path}`")


def parse_units(tgt_unit: Any) -> tuple[int, ...]:
    """`<12><7>…` (optionally wrapped in `<sosp>…<eosp>`) → unit ids; no unit, or one ≥ 1000, is a problem."""
    if not isinstance(tgt_unit, str):
        raise _RecordProblem(Problem.BAD_TGT_UNIT, " (not a string)")
    units = tuple(int(u) for u in UNIT_PATTERN.findall(tgt_unit))
    if not units:
        raise _RecordProblem(Problem.BAD_TGT_UNIT, " (no `<digits>` units)")
    if max(units) >= UNIT_VOCAB_SIZE:
        raise _RecordProblem(Problem.BAD_TGT_UNIT, f" (unit {max(units)} ≥ {UNIT_VOCAB_SIZE})")
    return units


# -- conversation → user parts ------------------------------------------------------------------

MediaEncoder = Callable[[str, Path], Part]  # (kind: image|video|speech|long_speech, path) → encoded part


def user_parts(text: str, visuals: Sequence[Part], speeches: Sequence[Part]) -> list[Part]:
    """One human turn as prompt parts, the authors' way (docs/authors-behaviour.md#prompt-template,
    `preprocess_multimodal`): every `<image>` goes to the front (the rest of the text stripped), then the text with
    each `<speech>` where it stands.
    `render_user` puts back the `\\n` between a clip and the text after it, so one is dropped here."""
    n_visual = text.count(IMAGE_PLACEHOLDER)
    parts: list[Part] = list(visuals[:n_visual])
    rest = text.replace(IMAGE_PLACEHOLDER, "").strip() if n_visual else text
    clips = iter(speeches)
    for i, piece in enumerate(rest.split(SPEECH_PLACEHOLDER)):
        if i > 0:
            parts.append(next(clips))
            piece = piece.removeprefix("\n")
        if piece:
            parts.append(TextPart(piece))
    return parts


# -- examples -----------------------------------------------------------------------------------


@dataclass(eq=False)
class TrainExample:
    """One record's prompt plan. `segments` are what `build_inputs` splices (text chunks are tokenised
    exactly as inference does); `labels` (T,) are aligned with the built prompt's positions."""

    record: TrainRecord
    segments: list[Segment]
    labels: torch.Tensor  # (T,) long: token id where supervised, IGNORE_INDEX elsewhere
    asr_ids: list[int] | None  # `speech_asr` tokens for LCMR, no special tokens
    tgt_units: list[int] | None
    encode_text: Callable[[str], list[int]] = field(repr=False)

    @property
    def n_tokens(self) -> int:
        return self.labels.numel()

    @property
    def speech_parts(self) -> list[SpeechPart]:
        return [s for s in self.segments if isinstance(s, SpeechPart)]

    def prompt_inputs(
        self,
        *,
        embed_ids: Callable[[torch.Tensor], torch.Tensor],
        project_speech: Callable[[SpeechPart], torch.Tensor],
    ) -> PromptInputs:
        inputs = build_inputs(self.segments, encode_text=self.encode_text, embed_ids=embed_ids,
                              project_speech=project_speech)  # fmt: skip
        if inputs.n_tokens != self.n_tokens:  # a projector that does not give 300 tokens per window
            raise InputError(
                f"record `{self.record.id}` built {inputs.n_tokens} prompt tokens but has {self.n_tokens} labels",
                "the speech projector must give TOKENS_PER_WINDOW tokens per window",
            )
        return inputs


def training_segments(system: str, turns: Sequence[tuple[list[Part], str]]) -> list[tuple[Segment, bool]]:
    """`render`'s layout with each answer as its own chunk: (segment, supervised) pairs, adjacent text of
    the same kind merged exactly as `render` merges it."""
    pieces: list[tuple[Segment, bool]] = [(f"{IM_START}system\n{system}{IM_END}\n", False)]
    for parts, answer in turns:
        pieces.append((f"{IM_START}user\n", False))
        pieces += [(seg, False) for seg in render_user(parts)]
        pieces += [(f"{IM_END}\n{IM_START}assistant\n", False), (f"{answer}{IM_END}", True), ("\n", False)]
    merged: list[tuple[Segment, bool]] = []
    for seg, supervised in pieces:
        last = merged[-1] if merged else None
        if isinstance(seg, str) and last is not None and isinstance(last[0], str) and last[1] == supervised:
            merged[-1] = (last[0] + seg, supervised)
        else:
            merged.append((seg, supervised))
    return merged


def build_example(
    record: TrainRecord, tokenizer: Any, encode_media: MediaEncoder, *, system: str = DEFAULT_SYSTEM_PROMPT
) -> TrainExample:
    visuals = [encode_media("image", p) for p in record.images]
    if record.video is not None:
        visuals.append(encode_media("video", record.video))
    if record.long_speech is not None:
        speeches = [encode_media("long_speech", record.long_speech)]
    else:
        speeches = [encode_media("speech", p) for p in record.speech]
    visual_iter, speech_iter = iter(visuals), iter(speeches)
    turns = []
    for turn in record.turns:
        n_v, n_s = turn.human.count(IMAGE_PLACEHOLDER), turn.human.count(SPEECH_PLACEHOLDER)
        mine_v = [next(visual_iter) for _ in range(n_v)]
        mine_s = [next(speech_iter) for _ in range(n_s)]
        turns.append((user_parts(turn.human, mine_v, mine_s), turn.gpt))
    pieces = training_segments(system, turns)
    encode_text = _memo(lambda text: encode_chunk(tokenizer, text))
    labels = torch.cat([_labels(seg, supervised, encode_text) for seg, supervised in pieces])
    return TrainExample(
        record=record,
        segments=[seg for seg, _ in pieces],
        labels=labels,
        asr_ids=encode_chunk(tokenizer, record.speech_asr) if record.speech_asr else None,
        tgt_units=list(record.tgt_units) if record.tgt_units is not None else None,
        encode_text=encode_text,
    )


def _labels(seg: Segment, supervised: bool, encode_text: Callable[[str], list[int]]) -> torch.Tensor:
    if isinstance(seg, str):
        ids = torch.tensor(encode_text(seg), dtype=torch.long)
        return ids if supervised else torch.full_like(ids, IGNORE_INDEX)
    return torch.full((media_tokens(seg),), IGNORE_INDEX, dtype=torch.long)


def media_tokens(part: VisualPart | SpeechPart) -> int:
    """How many prompt positions an encoded media part takes, without projecting it."""
    if isinstance(part, VisualPart):
        return part.tokens.shape[0]
    if part.frames is not None:
        return part.frames.shape[0] * TOKENS_PER_WINDOW
    return part.tokens.shape[0]


def _memo(fn: Callable[[str], list[int]]) -> Callable[[str], list[int]]:
    cache: dict[str, list[int]] = {}

    def cached(text: str) -> list[int]:
        if text not in cache:
            cache[text] = fn(text)
        return cache[text]

    return cached


def engine_media_encoder(engine: Any) -> MediaEncoder:
    """Encode training media exactly as `Engine.encode` does for a request (`long_speech` is a speech file
    split into 30 s windows; a `speech` longer than 30 s is windowed too, where the authors truncate it)."""

    def encode(kind: str, path: Path) -> Part:
        return engine.encode(read_training_media(kind, path))

    return encode


def read_training_media(kind: str, path: Path) -> Any:
    """Decode one record's file as the authors' training loader does: images capped at `TRAIN_MAX_SIDE`
    (requests use the CLI's 2880), `long_speech` read as speech (windowed by the encoder)."""
    from lyra_cli.engine.model.vision import TRAIN_MAX_SIDE, load_image
    from lyra_cli.engine.run.pipeline import DecodedImage, read_media

    if kind == "image":
        return DecodedImage(load_image(path, max_side=TRAIN_MAX_SIDE), str(path))
    return read_media("speech" if kind == "long_speech" else kind, path)


# -- iteration ----------------------------------------------------------------------------------


class TrainDataset:
    """Records in a seeded order, reshuffled every epoch, addressable by a global `position` so that a
    resumed run continues with exactly the sample it would have seen next."""

    def __init__(self, records: Sequence[TrainRecord], make_example: Callable[[TrainRecord], TrainExample],
                 *, seed: int) -> None:  # fmt: skip
        if not records:
            raise InputError("no usable training records", "check the data file and the problems reported for it")
        self.records = list(records)
        self.make_example = make_example
        self.seed = seed
        self._orders: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.records)

    def order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._orders[epoch] = torch.randperm(len(self.records), generator=generator).tolist()
        return self._orders[epoch]

    def record_at(self, position: int) -> TrainRecord:
        epoch, offset = divmod(position, len(self.records))
        return self.records[self.order(epoch)[offset]]

    def example_at(self, position: int) -> TrainExample:
        return self.make_example(self.record_at(position))

    def iter_from(self, position: int = 0, *, stop: int | None = None) -> Iterator[tuple[int, TrainExample]]:
        """(position, example) from `position` up to `stop` (exclusive; None: forever)."""
        while stop is None or position < stop:
            yield position, self.make_example(self.record_at(position))
            position += 1

    def __iter__(self) -> Iterator[TrainExample]:
        for _, example in self.iter_from(0, stop=len(self.records)):
            yield example

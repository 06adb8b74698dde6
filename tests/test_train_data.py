"""Training records → labelled prompts (docs/authors-behaviour.md#training-data,
docs/authors-behaviour.md#label-masking), through the inference prompt code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.synthetic import write_synthetic_set

from lyra_cli.engine.model.adapters import activate, route
from lyra_cli.engine.model.loader import load_model
from lyra_cli.engine.model.runtime import RuntimeRequest, resolve_runtime
from lyra_cli.engine.model.tokenizer import load_tokenizer
from lyra_cli.engine.run.pipeline import Engine, speech_tokens
from lyra_cli.engine.run.prompt import Conversation, SpeechPart, TextPart, Turn, VisualPart, build_inputs, encode_chunk
from lyra_cli.engine.train.data import (
    IGNORE_INDEX,
    Problem,
    RecordTurn,
    TrainDataset,
    TrainRecord,
    build_example,
    engine_media_encoder,
    parse_records,
    parse_units,
    user_parts,
)
from lyra_cli.errors import InputError

HIDDEN = 4


@pytest.fixture(scope="module")
def tokenizer(tiny_dir: Path):  # noqa: ANN201
    return load_tokenizer(tiny_dir)


@pytest.fixture(scope="module")
def engine(tiny_dir: Path) -> Engine:
    return Engine(load_model(tiny_dir, resolve_runtime(RuntimeRequest(device="cpu"))))


@pytest.fixture(scope="module")
def synthetic(real: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_set(tmp_path_factory.mktemp("synth"), real, n_records=12, seed=3, with_bad=True)


def _fake_media(kind: str, path: Path):  # noqa: ANN202
    if kind in ("image", "video"):
        return VisualPart(torch.ones(6, HIDDEN), (1, 4, 6), kind, str(path))
    return SpeechPart(1, 11.0, str(path), frames=torch.zeros(1, 1500, 8))


def _supervised_runs(labels: torch.Tensor) -> list[list[int]]:
    runs, current = [], []
    for label in labels.tolist():
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    return runs + ([current] if current else [])


def test_labels_supervise_exactly_answers_and_im_end(tokenizer) -> None:  # noqa: ANN001
    record = TrainRecord(0, "two_rounds", (RecordTurn("<speech>\nquestion one", "answer1"),
                                           RecordTurn("question two", "answer2")), speech=(Path("q.mp3"),))  # fmt: skip
    example = build_example(record, tokenizer, _fake_media)
    runs = _supervised_runs(example.labels)
    assert [tokenizer.decode(r) for r in runs] == ["answer1<|im_end|>", "answer2<|im_end|>"]
    # each supervised run is followed by the masked "\n", and the sequence ends with it
    newline = encode_chunk(tokenizer, "\n")
    assert example.labels[-1] == IGNORE_INDEX and len(newline) == 1
    ids = _all_ids(example, tokenizer)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ends = [i for i, label in enumerate(example.labels.tolist()) if label == im_end]
    assert len(ends) == 2 and all(ids[i + 1] == newline[0] for i in ends)
    assert (example.labels == IGNORE_INDEX).sum() == example.n_tokens - sum(map(len, runs))


def _all_ids(example, tokenizer) -> list[int]:  # noqa: ANN001
    """The prompt's token ids (-1 for media positions)."""
    inputs = build_inputs(example.segments, encode_text=lambda t: encode_chunk(tokenizer, t),
                          embed_ids=lambda ids: ids[:, None].float(),
                          project_speech=lambda p: torch.full((p.n_windows * 300, 1), -1.0))  # fmt: skip
    ids = inputs.embeds[0, :, 0].long().tolist()
    return [i if k == 0 else -1 for i, k in zip(ids, inputs.kinds.tolist(), strict=True)]


def test_image_placeholder_moves_to_front() -> None:
    visual, speech = _fake_media("image", Path("a.jpg")), _fake_media("speech", Path("q.mp3"))
    assert user_parts("What is this?\n<image>", [visual], []) == [visual, TextPart("What is this?")]
    assert user_parts("<image>\n<speech>", [visual], [speech]) == [visual, speech]
    assert user_parts("<speech>\nTranscribe.", [], [speech]) == [speech, TextPart("Transcribe.")]


@pytest.mark.parametrize("record_id", ["mm_1", "multi_3"])
def test_training_prompt_equals_inference_prompt(synthetic: Path, engine: Engine, record_id: str) -> None:
    records, _ = parse_records(synthetic, image_folder=synthetic.parent, speech_folder=synthetic.parent)
    record = next(r for r in records if r.id == record_id)
    example = build_example(record, engine.loaded.tokenizer, engine_media_encoder(engine))
    # inference: the same encoded parts, every answer but the last, asking for the last
    turns, parts = [], [s for s in example.segments if not isinstance(s, str)]
    media = iter(parts)
    for turn in record.turns:
        n = turn.human.count("<image>") + turn.human.count("<speech>")

        mine = [next(media) for _ in range(n)]
        turns.append(Turn(user_parts(turn.human, [m for m in mine if isinstance(m, VisualPart)],
                                     [m for m in mine if isinstance(m, SpeechPart)]), turn.gpt))  # fmt: skip
    turns[-1].answer = None
    served, adapter = engine.prepare(Conversation(turns=turns))
    projector = engine.loaded.adapters.projector(activate(engine.model, engine.loaded.adapters, adapter))
    embed = engine.model.model.embed_tokens
    with torch.inference_mode():
        trained = example.prompt_inputs(embed_ids=embed, project_speech=lambda p: speech_tokens(p, adapter, projector))
    n = served.n_tokens
    assert adapter == route(p.n_windows for p in example.speech_parts)
    assert torch.equal(trained.positions[:, :, :n], served.positions)
    assert torch.equal(trained.embeds[:, :n], served.embeds)
    decode = engine.loaded.tokenizer.decode
    history = [decode(run) for run in _supervised_runs(example.labels[:n])]  # earlier answers train too
    assert history == [t.gpt + "<|im_end|>" for t in record.turns[:-1]]
    assert (example.labels[n:-1] != IGNORE_INDEX).all() and example.labels[-1] == IGNORE_INDEX
    assert decode(example.labels[n:-1].tolist()) == record.turns[-1].gpt + "<|im_end|>"


def test_bad_records_are_counted_by_reason(synthetic: Path) -> None:
    records, problems = parse_records(synthetic, image_folder=synthetic.parent, speech_folder=synthetic.parent)
    assert len(records) == 12
    reasons = (Problem.MISSING_IMAGE, Problem.MALFORMED, Problem.UNKNOWN_ROLE, Problem.SPEECH_WITHOUT_FILE,
               Problem.BAD_TGT_UNIT, Problem.NO_CONVERSATIONS)
    assert problems.counts == dict.fromkeys(reasons, 1)
    assert [(index, rid) for index, rid, _ in problems.items][:2] == [(12, "bad_missing_image"), (13, "13")]


def test_strict_raises_on_first_problem(synthetic: Path) -> None:
    with pytest.raises(InputError, match=r"record 12 \(id `bad_missing_image`\).*missing image file"):
        parse_records(synthetic, image_folder=synthetic.parent, speech_folder=synthetic.parent, strict=True)


def test_jsonl_and_jpg_fallback(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"")
    lines = [{"id": "x", "image": "a.jpg", "conversations": [{"from": "human", "value": "<image>"},
                                                              {"from": "gpt", "value": "y"}]}, "{not json"]  # fmt: skip
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(x) if isinstance(x, dict) else x for x in lines))
    records, problems = parse_records(path, image_folder=tmp_path, speech_folder=tmp_path)
    assert records[0].images == (tmp_path / "a.png",)
    assert problems.items == [(1, "1", Problem.MALFORMED)]


def test_tgt_unit_parsing() -> None:
    assert parse_units("<sosp><12><7><999><eosp>") == (12, 7, 999)
    for bad in ("<sosp><eosp>", "12 7", "<1000>", 5):
        with pytest.raises(Exception, match="tgt_unit"):
            parse_units(bad)


def test_synthetic_set_is_deterministic_and_clean(real: Path, tmp_path: Path, tokenizer) -> None:  # noqa: ANN001
    a = write_synthetic_set(tmp_path / "a", real, n_records=10, seed=7)
    b = write_synthetic_set(tmp_path / "b", real, n_records=10, seed=7)
    files = sorted(p.relative_to(a.parent) for p in a.parent.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b.parent) for p in b.parent.rglob("*") if p.is_file())
    assert all((a.parent / f).read_bytes() == (b.parent / f).read_bytes() for f in files)
    records, problems = parse_records(a, image_folder=a.parent, speech_folder=a.parent)
    assert len(problems) == 0 and len(records) == 10
    assert any(r.long_speech for r in records) and any(r.tgt_units for r in records)
    assert any(len(r.turns) > 1 for r in records)
    asr = next(r for r in records if r.speech_asr and r.id.startswith("asr"))
    example = build_example(asr, tokenizer, _fake_media)
    assert example.asr_ids == encode_chunk(tokenizer, asr.speech_asr)


def test_dataset_order_is_seeded_and_resumable(synthetic: Path) -> None:
    records, _ = parse_records(synthetic, image_folder=synthetic.parent, speech_folder=synthetic.parent)
    make = lambda r: r  # noqa: E731  (the order does not depend on building examples)
    first = [r.id for _, r in TrainDataset(records, make, seed=1).iter_from(0, stop=30)]
    again = [r.id for _, r in TrainDataset(records, make, seed=1).iter_from(17, stop=30)]
    other = [r.id for _, r in TrainDataset(records, make, seed=2).iter_from(0, stop=30)]
    assert again == first[17:] and other != first
    assert sorted(first[:12]) == sorted(r.id for r in records) and first[:12] != first[12:24]


def test_training_images_are_capped_at_the_authors_training_side(tmp_path: Path) -> None:
    """Training caps an image's long side at 2560 (requests at 2880, eval at 1920), as the authors' loader."""
    from PIL import Image

    from lyra_cli.engine.model.vision import TRAIN_MAX_SIDE
    from lyra_cli.engine.train.data import read_training_media

    path = tmp_path / "wide.png"
    Image.new("RGB", (3000, 300), "white").save(path)
    assert read_training_media("image", path).image.size == (TRAIN_MAX_SIDE, 256)

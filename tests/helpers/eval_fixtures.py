"""Tiny benchmark folders in the authors' layout (docs/authors-behaviour.md#evaluation), built from ../shared/data/real.

Each suite gets 3–5 records: real photos with their real spoken questions, Pillow-drawn documents and
charts, and on purpose one broken record per kind of damage (missing image, missing or unreadable audio,
a line that is not JSON), so that every skip reason is exercised. `build_all(real, root)` writes
`root/<suite folder>/…` exactly as `data/Lyra_Eval/` is laid out and returns `root`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import soundfile as sf
from PIL import Image, ImageDraw

from lyra_cli.audio.io import SAMPLE_RATE_HZ, load_audio

JFK_TEXT = "and so my fellow americans ask not what your country can do for you ask what you can do for your country"
OCR_SUFFIX = "\nReference OCR token: STOP, 42\nAnswer the question using a single word or phrase."
NOT_AUDIO = b"this is not audio at all\n"


def drawn_image(path: Path, lines: list[str], size: tuple[int, int] = (320, 240), bars: list[int] | None = None) -> Path:
    """A white page with text lines, and optionally a bar chart: a stand-in for a document or a chart."""
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(lines):
        draw.text((12, 12 + 22 * i), line, fill="black")
    for i, height in enumerate(bars or []):
        x = 40 + 50 * i
        draw.rectangle((x, size[1] - 20 - height, x + 30, size[1] - 20), fill=(60, 90, 200))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def copy(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst


def wav_from(src: Path, dst: Path) -> Path:
    """A 16 kHz wav of a real clip (exercises the authors' `.mp3` → `.wav` fallback)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    sf.write(dst, load_audio(src), SAMPLE_RATE_HZ)
    return dst


def not_audio(dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(NOT_AUDIO)
    return dst


def write_jsonl(path: Path, records: list[dict | str]) -> None:
    """Records as JSON lines; a str is written verbatim (a damaged line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


def build_textvqa(real: Path, root: Path) -> None:
    folder = root / "TextVQA_speech"
    copy(real / "extreme_ironing.jpg", folder / "train_images" / "iron01.jpg")
    drawn_image(folder / "train_images" / "sign01.png", ["STOP", "42"])
    copy(real / "extreme_ironing.mp3", folder / "lyra_audios" / "tv0.mp3")
    wav_from(real / "Hi.mp3", folder / "lyra_audios" / "tv1.wav")
    not_audio(folder / "lyra_audios" / "tv2.mp3")
    copy(real / "Chinese_painting.mp3", folder / "lyra_audios" / "tv3.mp3")
    questions = ["what is the man doing?", "what does the sign say?", "what number is on the sign?", "what is it?"]
    records = [
        {"question_id": "iron01", "image": "iron01.jpg", "speech": "tv0", "text": "<speech>" + OCR_SUFFIX,
         "prompt": questions[0] + OCR_SUFFIX},
        {"question_id": "sign01", "image": "sign01.png", "speech": "tv1", "text": "<speech>" + OCR_SUFFIX,
         "prompt": questions[1] + OCR_SUFFIX},
        {"question_id": "sign01", "image": "sign01.png", "speech": "tv2", "text": "<speech>" + OCR_SUFFIX,
         "prompt": questions[2] + OCR_SUFFIX},  # same image: LLaVA's file reuses the image id
        {"question_id": "gone01", "image": "gone01.jpg", "speech": "tv3", "text": "<speech>" + OCR_SUFFIX,
         "prompt": questions[3] + OCR_SUFFIX},
    ]  # fmt: skip
    write_jsonl(folder / "lyra_textvqa_val_v051_ocr_withspeechid.jsonl", records)
    answers = [["ironing"] * 10, ["stop"] * 9 + ["stop sign"], ["42"] * 10, ["nothing"] * 10]
    data = [{"image_id": r["question_id"], "question": q, "answers": a} for r, q, a in zip(records, questions, answers)]
    (folder / "TextVQA_0.5.1_val.json").write_text(json.dumps({"data": data}))


def build_docvqa(real: Path, root: Path) -> None:
    folder = root / "Docvqa_val"
    drawn_image(folder / "documents" / "doc1.png", ["INVOICE", "Total: 42.00"])
    drawn_image(folder / "documents" / "doc2.png", ["MEMO", "To: all staff"])
    copy(real / "extreme_ironing.mp3", folder / "lyra_audios" / "1.mp3")
    copy(real / "Chinese_painting.mp3", folder / "lyra_audios" / "2.mp3")
    copy(real / "Hi.mp3", folder / "lyra_audios" / "3.mp3")
    write_jsonl(folder / "lyra_docvqa_audio.jsonl", [
        {"question_id": 1, "image": "documents/doc1.png", "text": "What is the total?", "answer": ["42.00", "42"]},
        {"question_id": 2, "image": "documents/doc2.png", "text": "Who is the memo for?", "answer": ["all staff"]},
        '{"question_id": 4, "image": "documents/doc4.png", "text": "broken',
        {"question_id": 3, "image": "documents/missing.png", "text": "What is the date?", "answer": ["today"]},
    ])  # fmt: skip


def build_chartqa(real: Path, root: Path) -> None:
    folder = root / "Chartvqa_human"
    drawn_image(folder / "png" / "chart1.png", ["Sales"], bars=[40, 120, 80])
    drawn_image(folder / "png" / "chart2.png", ["Rain (mm)"], bars=[100, 30])
    copy(real / "Hi.mp3", folder / "lyra_audios" / "c1.mp3")
    write_jsonl(folder / "lyra_chartvqa_audio.jsonl", [
        {"question_id": "c1", "image": "png/chart1.png", "text": "Which bar is highest?", "answer": "2"},
        {"question_id": "c2", "image": "png/chart2.png", "text": "How much rain fell in total?", "answer": "130"},
    ])  # fmt: skip  (c2 has no recording: a missing audio in speech mode, fine in text mode)


def build_mmvet(real: Path, root: Path) -> None:
    folder = root / "MM_vet_speech"
    copy(real / "Chinese_painting.jpg", folder / "images" / "v1_0.jpg")
    copy(real / "extreme_ironing.jpg", folder / "images" / "v1_1.jpg")
    copy(real / "Chinese_painting.mp3", folder / "lyra_audios" / "0.mp3")
    copy(real / "extreme_ironing.mp3", folder / "lyra_audios" / "1.mp3")
    write_jsonl(folder / "lyra_mm_vet.jsonl", [
        {"question_id": 0, "image": "v1_0.jpg", "text": "What is shown in the painting?"},
        {"question_id": 1, "image": "v1_1.jpg", "text": "What is unusual about this image?"},
    ])  # fmt: skip
    (folder / "mm-vet.json").write_text(json.dumps({"v1_0": {"answer": "horses"}, "v1_1": {"answer": "ironing"}}))


def build_librispeech(real: Path, root: Path) -> None:
    folder = root / "LibriSpeech"
    copy(real / "jfk.flac", folder / "test-clean" / "61" / "70968" / "61-70968-0000.flac")
    wav_from(real / "pred_round1.wav", folder / "test-clean" / "61" / "70968" / "61-70968-0001.wav")
    not_audio(folder / "test-clean" / "61" / "70968" / "61-70968-0002.flac")
    write_jsonl(folder / "test-clean.jsonl", [
        {"audio": "test-clean/61/70968/61-70968-0000.flac", "text": JFK_TEXT},
        {"audio": "test-clean/61/70968/61-70968-0001.wav", "text": "a reply spoken by lyra"},
        {"audio": "test-clean/61/70968/61-70968-0002.flac", "text": "unreadable"},
        {"audio": "test-clean/61/70968/61-70968-0003.flac", "text": "missing"},
    ])  # fmt: skip


BUILDERS = {
    "textvqa-s": build_textvqa,
    "docvqa-s": build_docvqa,
    "chartqa-s": build_chartqa,
    "mmvet-s": build_mmvet,
    "librispeech": build_librispeech,
}

# What each tiny data set holds, per mode: (items answered, {skip reason: count}).
EXPECTED = {
    ("textvqa-s", "speech"): (2, {"missing image": 1, "unreadable audio": 1}),
    ("textvqa-s", "text"): (3, {"missing image": 1}),
    ("docvqa-s", "speech"): (2, {"missing image": 1, "unreadable record": 1}),
    ("docvqa-s", "text"): (2, {"missing image": 1, "unreadable record": 1}),
    ("chartqa-s", "speech"): (1, {"missing audio": 1}),
    ("chartqa-s", "text"): (2, {}),
    ("mmvet-s", "speech"): (2, {}),
    ("librispeech", "speech"): (2, {"missing audio": 1, "unreadable audio": 1}),
}


def build_all(real: Path, root: Path) -> Path:
    for build in BUILDERS.values():
        build(real, root)
    return root


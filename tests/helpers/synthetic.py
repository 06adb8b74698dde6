"""A small training set in the official schema (docs/authors-behaviour.md#training-data), for tests (and benchmarks/train_step.py).

Images are drawn (a coloured shape on a plain ground, the question asks for its colour); speech comes
from the real recordings beside the checkout (`../shared/data/real`): `jfk.flac` with its known transcript
as `speech_asr`, the spoken questions as the `<speech>` of image+speech records. One `long_speech` record
tiles jfk.flac past 30 s; a few records carry random `tgt_unit` strings. With `with_bad=True` a few
deliberately broken records follow, one per problem reason that `parse_records` counts.

Everything is a function of `seed`: two calls write byte-identical files.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import soundfile
from PIL import Image, ImageDraw

from lyra_cli.audio.io import SAMPLE_RATE_HZ, load_audio
from lyra_cli.audio.windows import WINDOW_SECONDS

JFK_TRANSCRIPT = (
    "and so my fellow americans ask not what your country can do for you ask what you can do for your country"
)
QUESTION_CLIPS = ("extreme_ironing.mp3", "Chinese_painting.mp3", "Hi.mp3", "movement.mp3")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle", "triangle")
IMAGE_SIZE = (112, 112)
LONG_SPEECH_SECONDS = WINDOW_SECONDS + 3  # just past one window: the long-speech adapter's case
DATA_FILE = "train.json"


def write_synthetic_set(
    out_dir: str | Path, real_dir: str | Path, *, n_records: int = 12, seed: int = 0, with_bad: bool = False
) -> Path:
    """Write `train.json`, `images/` and `speech/` under `out_dir`; media paths are relative to `out_dir`
    (use it as both image and speech folder). Returns the data file's path."""
    out, real = Path(out_dir), Path(real_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "speech").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for name in ("jfk.flac", *QUESTION_CLIPS):
        shutil.copyfile(real / name, out / "speech" / name)
    _write_long_speech(real / "jfk.flac", out / "speech" / "long_jfk.wav")
    makers = (_asr_record, _image_speech_record, _image_text_record, _multi_turn_record, _unit_record)
    records = [makers[i % len(makers)](i, rng, out) for i in range(max(0, n_records - 1))]
    records.append(_long_speech_record(len(records)))
    if with_bad:
        records += _bad_records()
    (out / DATA_FILE).write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return out / DATA_FILE


def _conversation(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [turn for human, gpt in pairs for turn in ({"from": "human", "value": human}, {"from": "gpt", "value": gpt})]


def _draw(i: int, rng: random.Random, out: Path, suffix: str = ".png") -> tuple[str, str, str]:
    """A shape image; returns (relative path, colour, shape). `.jpg` names are written as `.png` files
    half the time, to exercise the authors' `.jpg` → `.gif`/`.png` fallback."""
    colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
    image = Image.new("RGB", IMAGE_SIZE, (245, 245, 240))
    draw = ImageDraw.Draw(image)
    box = [rng.randint(8, 30), rng.randint(8, 30), rng.randint(70, 104), rng.randint(70, 104)]
    if shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    elif shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    else:
        draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=COLOURS[colour])
    name = f"images/shape_{i:03d}"
    image.save(out / f"{name}.png")
    return f"{name}{suffix}", colour, shape


def _asr_record(i: int, rng: random.Random, out: Path) -> dict:
    instruction = rng.choice(["Record the spoken words as text.", "Transcribe the audio.", "What is said here?"])
    return {"id": f"asr_{i}", "speech": "speech/jfk.flac", "speech_asr": JFK_TRANSCRIPT,
            "conversations": _conversation((f"<speech>\n{instruction}", JFK_TRANSCRIPT))}  # fmt: skip


def _image_speech_record(i: int, rng: random.Random, out: Path) -> dict:
    image, colour, shape = _draw(i, rng, out, ".jpg")
    clip = rng.choice(QUESTION_CLIPS)
    return {"id": f"mm_{i}", "image": image, "speech": f"speech/{clip}", "speech_asr": f"what colour is the {shape}",
            "conversations": _conversation(("<image>\n<speech>", f"The {shape} is {colour}."))}  # fmt: skip


def _image_text_record(i: int, rng: random.Random, out: Path) -> dict:
    image, colour, shape = _draw(i, rng, out)
    return {"id": f"img_{i}", "image": image,
            "conversations": _conversation(("What shape is drawn here?\n<image>", f"A {colour} {shape}."))}  # fmt: skip


def _multi_turn_record(i: int, rng: random.Random, out: Path) -> dict:
    image, colour, shape = _draw(i, rng, out)
    clip = rng.choice(QUESTION_CLIPS)
    pairs = (("<image>\nWhat shape is this?", f"It is a {shape}."), ("And its colour?", f"It is {colour}."),
             ("<speech>", f"A {colour} {shape} on a light background."))  # fmt: skip
    return {"id": f"multi_{i}", "image": image, "speech": f"speech/{clip}", "conversations": _conversation(*pairs)}


def _unit_record(i: int, rng: random.Random, out: Path) -> dict:
    answer = rng.choice(["Hello there.", "Nice to meet you.", "The sky is blue."])
    units = "".join(f"<{rng.randrange(1000)}>" for _ in range(rng.randint(20, 60)))
    return {"id": f"unit_{i}", "tgt_unit": f"<sosp>{units}<eosp>",
            "conversations": _conversation(("Say something friendly.", answer))}  # fmt: skip


def _long_speech_record(i: int) -> dict:
    return {"id": f"long_{i}", "long_speech": "speech/long_jfk.wav",
            "conversations": _conversation(("<speech>\nWhat is this speech about?",
                                            "It asks citizens what they can do for their country."))}  # fmt: skip


def _write_long_speech(source: Path, target: Path) -> None:
    """jfk.flac tiled past one 30 s window, as 16 kHz PCM so the file is exactly reproducible."""
    wav = load_audio(source)
    n_samples = LONG_SPEECH_SECONDS * SAMPLE_RATE_HZ
    tiled = np.tile(wav, -(-n_samples // len(wav)))[:n_samples]
    soundfile.write(target, tiled, SAMPLE_RATE_HZ, subtype="PCM_16")


def _bad_records() -> list:
    """One record per problem reason (see data.Problem): missing file, malformed entry, unknown `from`,
    `<speech>` with no speech file, unparsable tgt_unit, no conversations."""
    ok = _conversation(("<speech>\nTranscribe.", JFK_TRANSCRIPT))
    return [
        {"id": "bad_missing_image", "image": "images/does_not_exist.jpg",
         "conversations": _conversation(("<image>\nWhat?", "x"))},
        "this entry is not an object",
        {"id": "bad_role", "conversations": [{"from": "narrator", "value": "hi"}, {"from": "gpt", "value": "x"}]},
        {"id": "bad_no_speech", "conversations": ok},
        {"id": "bad_units", "tgt_unit": "<sosp>no units here<eosp>", "conversations": _conversation(("Hi.", "Hello."))},
        {"id": "bad_empty", "conversations": []},
    ]  # fmt: skip

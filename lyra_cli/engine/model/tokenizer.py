"""The Qwen2 tokenizer: loading a checkpoint's, building a tiny one for tests, chunk encoding, stop ids.

Lyra adds no tokens to Qwen2-VL's vocabulary (docs/release-format.md#tokenizer-and-special-ids): `<image>` and
`<speech>` are removed by string splitting, and every text chunk between them is tokenised on its own
(docs/authors-behaviour.md#tokenisation), so BPE merges never cross a placeholder. Qwen prepends no BOS.

`build_tiny_tokenizer` trains a small byte-level BPE of the same kind (Qwen2's split regex, NFC,
ByteLevel, no BOS) on an embedded English corpus and appends the 14 Qwen2-VL special tokens after the
learned vocabulary, exactly where the real tokenizer has them (ids 151643… there, `vocab_size`… here).
Its files load offline with `AutoTokenizer.from_pretrained` as a `Qwen2Tokenizer`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lyra_cli.errors import CheckpointError

log = logging.getLogger(__name__)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"

# Qwen2-VL's added tokens, in id order (ids 151643..151656 in the released tokenizer).
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    ENDOFTEXT,
    IM_START,
    IM_END,
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    VISION_START,
    VISION_END,
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen2's pre-tokenizer split: contractions, letter runs (with one leading non-letter), single digits,
# punctuation runs, newlines, whitespace. Digits are split one by one, as in Qwen2.
QWEN_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN_MODEL_MAX_LENGTH = 32768
TINY_VOCAB_SIZE = 1024  # learned tokens (bytes + merges); the special tokens come after them

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG_JSON = "tokenizer_config.json"
VOCAB_JSON = "vocab.json"
MERGES_TXT = "merges.txt"
MERGES_HEADER = "#version: 0.2"

# A few KB of plain sentences written for this project: enough pairs for ~1000 merges, and the words
# our prompts and tests use (image, picture, video, speech, what, man, ironing, digits, chat roles).
TINY_CORPUS = """\
You are a helpful assistant. You are a helpful multi-modality assistant called Lyra.
What is in the image? What is in this picture? What is the man doing in the image?
A man is ironing clothes on an ironing board attached to the back of a yellow taxi.
The man is standing on the back of a moving car in the middle of a busy city street.
Describe the image in detail. Describe the picture in one sentence. Describe the video.
What is unusual about this image? It is unusual to iron clothes on the back of a car.
Listen to the speech and answer the question. Record the spoken words as text.
Please transcribe the speech. The speaker says that the weather will be sunny today.
The user asks a question with their voice, and the assistant answers in text and speech.
A Chinese painting shows mountains, rivers, trees, birds and a small boat on the water.
The painting uses black ink on white paper with light colours of green, blue and brown.
In the video, a person moves from the left side of the room to the right side.
The movement is slow at first, then faster, and finally the person stops near the door.
There are 2 cats, 3 dogs and 14 birds. The year was 2024 and the month was December.
Count from zero to ten: 0 1 2 3 4 5 6 7 8 9 10. Numbers like 100, 256, 1024 and 3000.
The answer is 42. The price is 19.99 dollars. The time is 12:30 in the afternoon.
Reference OCR token: STOP, EXIT, OPEN, CLOSED, SALE, 50% OFF, MAIN STREET, PARKING.
What does the sign say? What colour is the taxi? How many people are in the picture?
Where was this photo taken? Who is speaking first? Summarize the recording in 3 points.
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a step.
She sells sea shells by the sea shore, and the shells she sells are surely sea shells.
Speech recognition turns spoken language into written text. Speech synthesis does the reverse.
The model reads images, videos, speech and text, and it can answer with text and with speech.
Large language models predict the next token. Each token is a piece of a word or a symbol.
An image is made of pixels. A picture with more pixels shows more detail in every part.
The chart shows sales for each month. The table lists the names, ages and cities of people.
The document is a letter from a bank. The first line gives the date and the address.
Question: what is the title of the book? Answer: the title is written at the top of the cover.
Question: how many apples are on the table? Answer: there are five apples on the table.
The weather today is cold and windy, with rain in the morning and snow in the evening.
He walked to the station, bought a ticket, and waited for the train to the north.
They played music in the park on Sunday, and many families came to listen and dance.
Water boils at 100 degrees and freezes at 0 degrees on the Celsius scale.
The meeting starts at 9 and ends at 11. Please bring your notes and a pen.
I think the answer is yes, but I am not sure. Could you say that again, please?
Thank you very much! You're welcome. I'm happy to help. Let's begin. It's a nice day.
The assistant should be honest, clear and brief, and it should say when it does not know.
Hello, how are you? I am fine, thanks. Good morning, good afternoon and good night.
The cat sat on the mat. The dog ran in the garden. The bird sang in the tree.
Open the window, close the door, turn on the light and turn off the radio.
Read the text in the image and tell me what it says, word by word, from left to right.
Is the man safe? Ironing on a moving taxi is dangerous, so he should be very careful.
Audio, video, image and text are the four modalities. Long speech can last for hours.
The recording is two hours long, so the model listens to it in windows of 30 seconds.
Every window of speech becomes 300 tokens, so one second of speech becomes 10 tokens.
The river flows through the valley and the mountains rise high above the green fields.
Children learn to read and write at school, and they learn to count with their fingers.
The library has thousands of books about history, science, art, music and languages.
Please answer the question using a single word or phrase. Answer briefly and exactly.
Café, naïve, résumé, façade and jalapeño are words that English borrowed from other languages.
"""


def build_tiny_tokenizer(out_dir: Path, *, vocab_size: int = TINY_VOCAB_SIZE) -> None:
    """Train a tiny Qwen2-style byte-level BPE on `TINY_CORPUS` and write its files into `out_dir`.

    `vocab_size` counts the learned tokens (256 bytes + merges); the 14 special tokens get the ids
    `vocab_size .. vocab_size + 13`, so `len(tokenizer) == vocab_size + len(QWEN_SPECIAL_TOKENS)`.
    The files are byte-identical for the same `vocab_size`.
    """
    tokenizer = _train_bpe(vocab_size)
    tokenizer.add_special_tokens(list(QWEN_SPECIAL_TOKENS))
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_json = json.loads(tokenizer.to_str())
    _write_text(out_dir / TOKENIZER_JSON, json.dumps(tokenizer_json, indent=2, ensure_ascii=False))
    _write_text(out_dir / VOCAB_JSON, json.dumps(tokenizer_json["model"]["vocab"], ensure_ascii=False))
    _write_text(out_dir / MERGES_TXT, "\n".join([MERGES_HEADER, *_merge_lines(tokenizer_json)]))
    config = _tokenizer_config(special_ids=range(vocab_size, vocab_size + len(QWEN_SPECIAL_TOKENS)))
    _write_text(out_dir / TOKENIZER_CONFIG_JSON, json.dumps(config, indent=2, ensure_ascii=False))


def _train_bpe(vocab_size: int) -> Any:
    """A trained `tokenizers.Tokenizer` with exactly `vocab_size` learned tokens, no special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, so any text encodes
    )
    tokenizer.train_from_iterator(TINY_CORPUS.splitlines(), trainer=trainer)
    learned = tokenizer.get_vocab_size()
    if learned != vocab_size:
        raise ValueError(f"the tiny corpus supports {learned} tokens, not the requested {vocab_size}")
    return tokenizer


def _merge_lines(tokenizer_json: dict[str, Any]) -> list[str]:
    """merges.txt lines ("a b") from tokenizer.json, whose merges are pairs or "a b" strings."""
    return [m if isinstance(m, str) else " ".join(m) for m in tokenizer_json["model"]["merges"]]


def _tokenizer_config(special_ids: Iterable[int]) -> dict[str, Any]:
    """tokenizer_config.json as Qwen2-VL ships it, with our ids for the special tokens."""
    added = {
        str(token_id): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for token_id, token in zip(special_ids, QWEN_SPECIAL_TOKENS, strict=True)
    }
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:]),
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": IM_END,
        "errors": "replace",
        "model_max_length": QWEN_MODEL_MAX_LENGTH,
        "pad_token": ENDOFTEXT,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def _write_text(path: Path, text: str) -> None:
    """Write UTF-8 with "\\n" line ends whatever the platform, so builds are byte-identical."""
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        handle.write(text + "\n")


# ---------------------------------------------------------------------------------------------------
# Loading and using a tokenizer


def load_tokenizer(model_dir: Path) -> Any:
    """The checkpoint's tokenizer, from local files only and never with remote code."""
    model_dir = Path(model_dir)
    has_json = (model_dir / TOKENIZER_JSON).is_file()
    has_bpe_files = (model_dir / VOCAB_JSON).is_file() and (model_dir / MERGES_TXT).is_file()
    if not has_json and not has_bpe_files:
        raise CheckpointError(
            f"no tokenizer in `{model_dir}`: it has neither `{TOKENIZER_JSON}` nor `{VOCAB_JSON}` + `{MERGES_TXT}`",
            "copy the tokenizer files of the release into the model folder",
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # transformers and tokenizers raise OSError, ValueError, and bare Exception
        raise CheckpointError(
            f"cannot load the tokenizer in `{model_dir}`: {_first_line(exc)}",
            f"check `{TOKENIZER_JSON}` and `{TOKENIZER_CONFIG_JSON}` against the release's files",
        ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def end_token_ids(tokenizer: Any, generation_config: dict[str, Any] | None) -> set[int]:
    """The ids that end generation: `<|im_end|>`, `<|endoftext|>`, the tokenizer's eos and the
    generation config's `eos_token_id` (an int or a list), as the official CLI stops on 151645/151643.
    """
    ids = {_token_id(tokenizer, token) for token in (IM_END, ENDOFTEXT)}
    ids.add(tokenizer.eos_token_id)
    configured = (generation_config or {}).get("eos_token_id")
    ids.update(configured if isinstance(configured, list) else [configured])
    return {int(i) for i in ids if i is not None}


def _token_id(tokenizer: Any, token: str) -> int | None:
    """The single id of `token`, or None when the vocabulary lacks it (not the unknown-token id)."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or tokenizer.convert_ids_to_tokens(token_id) != token:
        return None
    return int(token_id)

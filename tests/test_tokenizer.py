"""The tiny Qwen2-style tokenizer: deterministic files, offline loading, special ids, chunk encoding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lyra_cli.engine.model.tokenizer import (
    ENDOFTEXT,
    IM_END,
    QWEN_SPECIAL_TOKENS,
    TINY_VOCAB_SIZE,
    build_tiny_tokenizer,
    end_token_ids,
    load_tokenizer,
)
from lyra_cli.engine.run.prompt import encode_chunk
from lyra_cli.errors import CheckpointError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny_tokenizer")
    build_tiny_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def tok(tiny_dir: Path):
    return load_tokenizer(tiny_dir)


def _build_in_subprocess(out: Path) -> None:
    # A fresh process each time: the Rust trainer's hash maps are seeded per process.
    code = f"from pathlib import Path; from lyra_cli.engine.model.tokenizer import build_tiny_tokenizer; build_tiny_tokenizer(Path({str(out)!r}))"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_two_builds_in_separate_processes_write_identical_files(tmp_path: Path) -> None:
    _build_in_subprocess(tmp_path / "a")
    _build_in_subprocess(tmp_path / "b")
    for name in TOKENIZER_FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_loads_offline_as_qwen2_tokenizer(tiny_dir: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from lyra_cli.engine.model.tokenizer import load_tokenizer; "
        "t = load_tokenizer(Path(sys.argv[1])); print(type(t).__name__, len(t), t.eos_token_id, t.bos_token_id)"
    )
    # Offline, and a dead endpoint: any attempt to reach a hub would fail loudly.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    result = subprocess.run(
        [sys.executable, "-c", code, str(tiny_dir)], env=env, capture_output=True, text=True, check=True,
        cwd=Path(__file__).parents[1],
    )
    n_total = TINY_VOCAB_SIZE + len(QWEN_SPECIAL_TOKENS)
    eos_id = TINY_VOCAB_SIZE + QWEN_SPECIAL_TOKENS.index(IM_END)
    assert result.stdout.split() == ["Qwen2Tokenizer", str(n_total), str(eos_id), "None"]


def test_config_matches_qwen2_vl_conventions(tiny_dir: Path) -> None:
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "Qwen2Tokenizer"
    assert (config["eos_token"], config["pad_token"], config["bos_token"]) == (IM_END, ENDOFTEXT, None)
    added = {int(i): entry["content"] for i, entry in config["added_tokens_decoder"].items()}
    assert added == {TINY_VOCAB_SIZE + k: token for k, token in enumerate(QWEN_SPECIAL_TOKENS)}
    assert all(entry["special"] for entry in config["added_tokens_decoder"].values())


def test_special_tokens_are_single_ids_after_the_vocabulary(tok) -> None:
    for offset, token in enumerate(QWEN_SPECIAL_TOKENS):
        token_id = TINY_VOCAB_SIZE + offset
        assert tok.convert_tokens_to_ids(token) == token_id
        assert encode_chunk(tok, token) == [token_id]
        assert tok.decode([token_id]) == token
    assert tok.eos_token_id == tok.convert_tokens_to_ids(IM_END)
    assert tok.pad_token_id == tok.convert_tokens_to_ids(ENDOFTEXT)


@pytest.mark.parametrize(
    "text",
    [
        "What is the man doing in the image?",
        "Describe this picture in 12 words, please.\n\nThanks!",
        "Café naïve résumé — 中文 テスト 😀👍🏽",
        "  leading and trailing spaces  \t tabs\r\n",
        "<|im_start|>user\nhello<|im_end|>\n",
    ],
)
def test_round_trip(tok, text: str) -> None:
    ids = encode_chunk(tok, text)
    assert tok.decode(ids) == text
    assert all(0 <= i < len(tok) for i in ids)


def test_no_bos_and_digits_split_one_by_one(tok) -> None:
    assert encode_chunk(tok, "2024") == [tok.convert_tokens_to_ids(d) for d in "2024"]
    assert tok("hello").input_ids == encode_chunk(tok, "hello")  # Qwen adds no BOS/EOS


def test_matches_the_raw_tokenizers_file(tiny_dir: Path, tok) -> None:
    # transformers rebuilds Qwen2's pipeline from vocab + merges: it must equal our tokenizer.json.
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    text = "What is unusual about this image? 3 taxis, 中文 and é.<|im_end|>"
    assert raw.encode(text, add_special_tokens=False).ids == encode_chunk(tok, text)


def test_chunks_do_not_merge_across_a_placeholder(tok) -> None:
    left, right = "What is in th", "e image?"
    whole = encode_chunk(tok, left + right)
    chunked = encode_chunk(tok, left) + encode_chunk(tok, right)
    assert whole != chunked  # BPE would merge "th" + "e" if the text were encoded in one piece
    assert tok.decode(encode_chunk(tok, left)) == left
    assert tok.decode(chunked) == left + right


def test_end_token_ids(tok) -> None:
    im_end, endoftext = tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(ENDOFTEXT)
    assert end_token_ids(tok, None) == {im_end, endoftext}
    assert end_token_ids(tok, {"eos_token_id": 7}) == {im_end, endoftext, 7}
    assert end_token_ids(tok, {"eos_token_id": [im_end, 9]}) == {im_end, endoftext, 9}
    assert end_token_ids(tok, {"eos_token_id": None}) == {im_end, endoftext}


def test_missing_tokenizer_files_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no tokenizer") as info:
        load_tokenizer(tmp_path)
    assert info.value.hint


def test_broken_tokenizer_json_is_a_checkpoint_error(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json")
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "Qwen2Tokenizer"}')
    with pytest.raises(CheckpointError, match="cannot load the tokenizer"):
        load_tokenizer(tmp_path)

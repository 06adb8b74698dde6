"""Contracts of the speech-token cache: exact round trips, misses on any changed key field, damaged entries
rebuilt and never used, atomic writes, and a model identity that follows the weights without reading them."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from lyra_cli import fileio
from lyra_cli.engine.run.speech_cache import (
    CACHE_FORMAT_VERSION,
    CachedSpeech,
    CacheKey,
    SpeechTokenCache,
    default_cache_dir,
    file_digest,
    model_fingerprint,
)
from lyra_cli.errors import CheckpointError
from lyra_cli.fileio import CACHE_DIR_ENV

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
JFK = REAL / "jfk.flac"

SETTINGS = {"adapter": "long_speech", "dtype": "bfloat16", "channel_mix": "mean", "official_window": False,
            "max_audio_s": 3600.0, "batch_windows": 4}  # fmt: skip
META = {"n_windows": 2, "duration_s": 41.5, "source": "talk.mp3"}


def _key(**changes) -> CacheKey:
    fields = {"audio_sha256": "a" * 64, "model_id": "lyra-mini-3b@1234", "settings": dict(SETTINGS)}
    return CacheKey(**{**fields, **changes})


def _tokens(dtype: torch.dtype = torch.bfloat16, n_tokens: int = 600, hidden: int = 64) -> torch.Tensor:
    """(n_tokens, hidden) speech tokens: 2 windows of 300 at a tiny hidden size."""
    return torch.randn(n_tokens, hidden, generator=torch.Generator().manual_seed(0)).to(dtype)


@pytest.fixture
def store(tmp_path) -> SpeechTokenCache:
    return SpeechTokenCache(tmp_path / "speech")


# ---------------------------------------------------------------------------------------------------------
# Round trips and keys
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_round_trip_keeps_dtype_values_and_meta(store, dtype):
    tokens = _tokens(dtype)
    path = store.put(_key(), tokens, META)
    assert path == store.root / f"{_key().digest()}.safetensors" and path.is_file()
    cached = store.get(_key())
    assert isinstance(cached, CachedSpeech)
    assert cached.tokens.dtype == dtype and cached.tokens.shape == (600, 64)
    assert torch.equal(cached.tokens, tokens)
    assert cached.meta == META


def test_put_stores_a_non_contiguous_view_by_value(store):
    tokens = _tokens(torch.float32, hidden=128)[:, ::2]  # (600, 64), strided
    store.put(_key(), tokens, META)
    assert torch.equal(store.get(_key()).tokens, tokens)


def test_put_rejects_tokens_that_are_not_two_dimensional(store):
    with pytest.raises(ValueError, match="n_tokens, hidden"):
        store.put(_key(), torch.zeros(2, 300, 64), META)


def test_missing_entry_is_a_miss(store):
    assert store.get(_key()) is None


@pytest.mark.parametrize(
    "changed",
    [
        {"audio_sha256": "b" * 64},
        {"model_id": "lyra-mini-3b@1235"},
        *({"settings": {**SETTINGS, name: value}} for name, value in [
            ("adapter", "speech"), ("dtype", "float16"), ("channel_mix", "first"), ("official_window", True),
            ("max_audio_s", 1800.0), ("batch_windows", 8)]),  # fmt: skip
        {"settings": {**SETTINGS, "vad": True}},  # a new setting
        {"settings": {k: v for k, v in SETTINGS.items() if k != "dtype"}},  # a setting dropped
    ],
)
def test_any_changed_key_field_misses(store, changed):
    store.put(_key(), _tokens(), META)
    assert store.get(_key(**changed)) is None
    assert store.get(_key()) is not None  # a miss for another key leaves this entry alone


def test_key_json_is_canonical_and_versioned():
    reordered = _key(settings=dict(reversed(list(SETTINGS.items()))))
    assert reordered.to_json() == _key().to_json() and reordered.digest() == _key().digest()
    assert json.loads(_key().to_json())["format"] == CACHE_FORMAT_VERSION
    as_bool, as_int = (_key(settings={**SETTINGS, "batch_windows": value}) for value in (True, 1))
    assert as_bool.digest() != as_int.digest()  # JSON keeps the types apart


def test_key_is_frozen_and_copies_its_settings():
    settings = dict(SETTINGS)
    key = _key(settings=settings)
    settings["dtype"] = "float32"  # the caller's dict changes afterwards ...
    assert key.settings["dtype"] == "bfloat16"  # ... the key does not
    with pytest.raises(dataclasses.FrozenInstanceError):
        key.model_id = "other"  # type: ignore[misc]


def test_key_rejects_nested_settings():
    with pytest.raises(TypeError, match="layers"):
        _key(settings={"layers": [1, 2]})


def test_key_for_file_hashes_the_content():
    assert CacheKey.for_file(JFK, "m", {}).audio_sha256 == hashlib.sha256(JFK.read_bytes()).hexdigest()


@pytest.mark.parametrize("chunk", [1, 1000, 1 << 20])
def test_file_digest_equals_hashlib_on_the_whole_file(tmp_path, chunk):
    path = tmp_path / "blob.bin"
    path.write_bytes(os.urandom(12_345) if chunk > 1 else b"tiny")
    assert file_digest(path, chunk=chunk) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path))
    assert default_cache_dir() == tmp_path / "speech"
    monkeypatch.delenv(CACHE_DIR_ENV)
    assert default_cache_dir() == Path.home() / ".cache" / "lyra" / "speech"


# ---------------------------------------------------------------------------------------------------------
# Damaged entries: detected, deleted, never used
# ---------------------------------------------------------------------------------------------------------


def _flip_middle(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes(b ^ 0xFF for b in data[middle : middle + 4]) + data[middle + 4 :]


def _tamper_meta(data: bytes) -> bytes:
    """Change `n_windows` 2 -> 3 inside the header: still valid JSON and a valid safetensors file."""
    assert data.count(b'n_windows\\":2') == 1
    return data.replace(b'n_windows\\":2', b'n_windows\\":3')


@pytest.mark.parametrize(
    "damage",
    [
        _flip_middle,
        lambda data: data[: len(data) // 2],  # truncated
        lambda data: data[:-1],  # one byte short
        lambda data: os.urandom(len(data)),  # garbage
        lambda data: b"",  # empty
        _tamper_meta,
    ],
    ids=["flipped", "truncated", "short-by-one", "garbage", "empty", "meta-tampered"],
)
def test_damaged_entry_is_deleted_and_missed(store, damage, caplog):
    path = store.put(_key(), _tokens(torch.float32), META)
    path.write_bytes(damage(path.read_bytes()))
    assert store.get(_key()) is None
    assert not path.exists()
    assert "unusable" in caplog.text
    store.put(_key(), _tokens(torch.float32), META)  # the caller rebuilds it
    assert torch.equal(store.get(_key()).tokens, _tokens(torch.float32))


def test_dtype_changed_in_the_header_is_caught(store):
    """bf16 -> f16 keeps every data byte and the header's length: only a checksum over the dtype sees it."""
    path = store.put(_key(), _tokens(torch.bfloat16), META)
    data = path.read_bytes()
    path.write_bytes(data.replace(b'"BF16"', b'"F16"').replace(b'{"__metadata__"', b'{ "__metadata__"'))
    assert store.get(_key()) is None
    assert not path.exists()


def test_entry_written_for_another_key_is_not_used(store):
    """A digest collision (or a file copied by hand) must not serve another recording's tokens."""
    other = store.put(_key(audio_sha256="b" * 64), _tokens(), META)
    target = store.path_for(_key())
    os.replace(other, target)
    assert store.get(_key()) is None
    assert not target.exists()


# ---------------------------------------------------------------------------------------------------------
# Atomic writes and housekeeping
# ---------------------------------------------------------------------------------------------------------


def test_failed_put_leaves_neither_entry_nor_temporary_file(store, monkeypatch):
    def crash(src, dst):
        raise OSError("disk unplugged")

    monkeypatch.setattr(fileio.os, "replace", crash)
    with pytest.raises(OSError, match="unplugged"):
        store.put(_key(), _tokens(), META)
    assert list(store.root.iterdir()) == []


def test_failed_overwrite_keeps_the_previous_entry(store, monkeypatch):
    store.put(_key(), _tokens(torch.float32), META)
    monkeypatch.setattr(fileio.os, "replace", lambda src, dst: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        store.put(_key(), torch.zeros(600, 64), {"n_windows": 9})
    monkeypatch.undo()
    cached = store.get(_key())
    assert torch.equal(cached.tokens, _tokens(torch.float32)) and cached.meta == META
    assert len(list(store.root.iterdir())) == 1


def test_clear_counts_entries_and_leftover_temporaries_only(store):
    for i in range(3):
        store.put(_key(audio_sha256=f"{i}" * 64), _tokens(), META)
    leftover = store.root / f".{'c' * 64}.x1y2z3.tmp"  # what a killed process leaves behind
    leftover.write_bytes(b"partial")
    unrelated = store.root / "notes.txt"
    unrelated.write_text("not ours")
    assert store.size_bytes() > 3 * 600 * 64 * 2
    assert store.clear() == 4
    assert store.size_bytes() == 0 and store.clear() == 0
    assert unrelated.exists()  # clear() only removes what the cache wrote


def test_clear_and_size_of_a_cache_never_written(tmp_path):
    store = SpeechTokenCache(tmp_path / "never")
    assert store.clear() == 0 and store.size_bytes() == 0 and store.get(_key()) is None


# ---------------------------------------------------------------------------------------------------------
# model_fingerprint
# ---------------------------------------------------------------------------------------------------------


def _model_dir(root: Path) -> Path:
    """A folder in the release layout, with small stand-ins for the weights."""
    model = root / "Lyra_Mini_3B"
    (model / "speech_lora").mkdir(parents=True)
    (model / "vocoder").mkdir()
    files = {
        "config.json": '{"model_type": "Lyra_Qwen2VL", "hidden_size": 1536}',
        "model.safetensors.index.json": '{"weight_map": {}}',
        "model-00001-of-00002.safetensors": "shard one",
        "model-00002-of-00002.safetensors": "shard two",
        "speech_generator.safetensors": "ctc",
        "tokenizer.json": "{}",
        "speech_lora/adapter_config.json": '{"r": 8}',
        "speech_lora/adapter_model.safetensors": "lora",
        "speech_lora/non_lora_trainables.bin": "projector",
        "vocoder/g_00500000": "vocoder",
        "vocoder/config.json": "{}",
    }
    for name, text in files.items():
        (model / name).write_text(text)
    return model


def _bump_mtime(path: Path) -> None:
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))


@pytest.mark.parametrize(
    "change",
    [
        lambda m: _bump_mtime(m / "model-00001-of-00002.safetensors"),
        lambda m: os.truncate(m / "model-00001-of-00002.safetensors", 3),  # size
        lambda m: (m / "config.json").write_text('{"model_type": "Lyra_Qwen2VL", "hidden_size": 2048}'),
        lambda m: (m / "model.safetensors.index.json").write_text('{"weight_map": {"a": "b"}}'),
        lambda m: _bump_mtime(m / "speech_lora" / "non_lora_trainables.bin"),
        lambda m: _bump_mtime(m / "speech_lora" / "adapter_model.safetensors"),
        lambda m: (m / "speech_lora" / "adapter_config.json").write_text('{"r": 16}'),
        lambda m: (m / "model-00003-of-00003.safetensors").write_text("a new shard"),
    ],
    ids=["shard-mtime", "shard-size", "config", "index", "projector", "lora", "lora-config",
         "new-shard"],  # fmt: skip
)
def test_fingerprint_follows_the_weights(tmp_path, change):
    model = _model_dir(tmp_path)
    before = model_fingerprint(model)
    change(model)
    assert model_fingerprint(model) != before


def test_fingerprint_ignores_what_does_not_change_speech_tokens(tmp_path):
    model = _model_dir(tmp_path)
    before = model_fingerprint(model)
    assert model_fingerprint(model) == before  # deterministic
    (model / "tokenizer.json").write_text('{"changed": true}')
    (model / "README.md").write_text("notes")
    _bump_mtime(model / "vocoder" / "g_00500000")  # not an adapter folder: the vocoder never sees speech input
    os.utime(model / "config.json")  # touched, same content
    assert model_fingerprint(model) == before
    moved = model.rename(tmp_path / "elsewhere")  # names are relative to the folder
    assert model_fingerprint(moved) == before


def test_fingerprint_of_a_missing_folder_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match="not a model folder"):
        model_fingerprint(tmp_path / "nope")

"""On-disk cache of projected speech tokens, so a second question about the same recording skips the encoder.

An entry is one safetensors file, `<key digest>.safetensors`, holding the tokens (n_tokens, hidden) in their
own dtype and, in its string metadata, the key it was written for, the caller's meta (n_windows,
duration_s, ...) and a sha256 over all of these. The key is the audio file's content hash, the model's
identity and every setting that changes the tokens, so a stale entry is never looked up at all.

Entries are written to a temporary file in the same folder and renamed over the final name, which is atomic:
a crash leaves at worst a hidden `*.tmp` file (removed by `clear`), never a partial entry. An entry that fails
any check on reading is logged, deleted and reported as a miss: the caller re-encodes, nothing wrong is used.
safetensors never unpickles, so a planted cache file cannot run code.

torch and safetensors are imported where used, so that clearing the cache or hashing a file does not need them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lyra_cli.errors import CheckpointError
from lyra_cli.fileio import cache_root, write_atomically

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1  # bump when the entry layout or the meaning of a key field changes
SPEECH_SUBDIR = "speech"
HASH_CHUNK_BYTES = 1 << 20  # 1 MiB reads: hashing runs at disk speed without holding the file

ENTRY_SUFFIX = ".safetensors"
TOKENS_TENSOR = "tokens"
_ENTRY_NAME = re.compile(r"[0-9a-f]{64}\.safetensors")  # only what we wrote: clear() never touches other files
_TEMP_NAME = re.compile(r"\.[0-9a-f]{64}\..*\.tmp")  # fileio.write_atomically's temporaries (and older ones)

# What identifies a model folder cheaply (see `model_fingerprint`).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
ADAPTER_MARKERS = ("adapter_config.json", "non_lora_trainables.bin")  # a subfolder with one is an adapter

SettingValue = str | int | float | bool


def default_cache_dir() -> Path:
    """`$LYRA_CACHE_DIR/speech`, or `~/.cache/lyra/speech` when the variable is unset or empty."""
    return cache_root() / SPEECH_SUBDIR


def file_digest(path: str | Path, chunk: int = HASH_CHUNK_BYTES) -> str:
    """sha256 (hex) of the content of `path`, read `chunk` bytes at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Keys and entries
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheKey:
    """Everything that decides the speech tokens of one recording.

    `settings` holds each option that changes the tokens (projector/adapter, dtype, channel mix, resampler,
    official window flag, max-audio cut, ...), as flat str/int/float/bool values. Note that `1`, `1.0` and `True` are
    different settings: pass each option in one consistent type.
    """

    audio_sha256: str
    model_id: str
    settings: dict[str, SettingValue] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        for name, value in self.settings.items():
            if not isinstance(name, str) or not isinstance(value, (str, int, float, bool)):
                raise TypeError(f"cache setting {name!r} must map a str to a str/int/float/bool, got {value!r}")
        object.__setattr__(self, "settings", dict(self.settings))  # a private copy: the key cannot change later

    @classmethod
    def for_file(cls, path: str | Path, model_id: str, settings: dict[str, SettingValue]) -> CacheKey:
        return cls(file_digest(path), model_id, settings)

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces, format version included): equal keys give equal text."""
        fields = {"format": CACHE_FORMAT_VERSION, "audio_sha256": self.audio_sha256, "model_id": self.model_id}
        return _canonical_json({**fields, "settings": self.settings})

    def digest(self) -> str:
        """sha256 (hex) of `to_json()`: the entry's file name."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()


@dataclass
class CachedSpeech:
    """A cache hit: `tokens` (n_tokens, hidden) on CPU in their stored dtype; `meta` as it was put."""

    tokens: torch.Tensor
    meta: dict[str, Any]


class _CorruptEntry(ValueError):
    """An entry that reads but does not check out."""


class SpeechTokenCache:
    """Speech tokens on disk under `root`, one safetensors file per `CacheKey`."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()

    def path_for(self, key: CacheKey) -> Path:
        return self.root / f"{key.digest()}{ENTRY_SUFFIX}"

    def get(self, key: CacheKey) -> CachedSpeech | None:
        """The entry for `key`, or None on a miss. A damaged or mismatched entry is deleted and is a miss."""
        from safetensors import SafetensorError

        path = self.path_for(key)
        if not path.is_file():
            log.debug("speech cache miss: %s", path.name)
            return None
        try:
            cached = _read_entry(path, key)
        except (SafetensorError, OSError, ValueError, KeyError) as err:  # ValueError covers _CorruptEntry, JSON
            log.warning("speech cache entry %s is unusable (%s); deleting it, the audio will be re-encoded", path, err)
            path.unlink(missing_ok=True)
            return None
        log.debug("speech cache hit: %s (%d tokens)", path.name, cached.tokens.shape[0])
        return cached

    def put(self, key: CacheKey, tokens: torch.Tensor, meta: dict[str, Any]) -> Path:
        """Store `tokens` (n_tokens, hidden) and JSON-able `meta` under `key`, atomically; return the entry's path."""
        from safetensors.torch import save_file

        if tokens.ndim != 2:
            raise ValueError(f"expected speech tokens of shape (n_tokens, hidden), got {tuple(tokens.shape)}")
        tokens = tokens.detach().to("cpu").contiguous()
        key_json, meta_json = key.to_json(), _canonical_json(meta)
        metadata = {"key": key_json, "meta": meta_json, "entry_sha256": _entry_sha256(tokens, key_json, meta_json)}
        final = self.path_for(key)
        write_atomically(final, lambda temp: save_file({TOKENS_TENSOR: tokens}, temp, metadata=metadata))
        log.debug("speech cache: stored %d tokens in %s", tokens.shape[0], final.name)
        return final

    def clear(self) -> int:
        """Delete every entry (and any temporary file a crash left); return how many files were removed."""
        files = self._owned_files()
        for path in files:
            path.unlink(missing_ok=True)
        return len(files)

    def size_bytes(self) -> int:
        """Disk space taken by the cache's files."""
        return sum(path.stat().st_size for path in self._owned_files())

    def _owned_files(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return [p for p in self.root.iterdir() if _ENTRY_NAME.fullmatch(p.name) or _TEMP_NAME.fullmatch(p.name)]


def _read_entry(path: Path, key: CacheKey) -> CachedSpeech:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as entry:
        metadata = entry.metadata() or {}
        tokens = entry.get_tensor(TOKENS_TENSOR)
    if metadata.get("key") != key.to_json():  # a digest collision, or a file renamed or copied by hand
        raise _CorruptEntry("it was written for another key")
    if tokens.ndim != 2:
        raise _CorruptEntry(f"its tokens have shape {tuple(tokens.shape)}")
    if metadata.get("entry_sha256") != _entry_sha256(tokens, metadata["key"], metadata["meta"]):
        raise _CorruptEntry("its checksum does not match")
    return CachedSpeech(tokens, json.loads(metadata["meta"]))


def _entry_sha256(tokens: torch.Tensor, key_json: str, meta_json: str) -> str:
    """sha256 over the key, the meta, the dtype, the shape and the raw bytes of `tokens` (contiguous, CPU).

    The header's dtype and shape are covered too: a flipped bit there could turn bf16 into f16 with the
    same bytes, which a checksum of the data alone would miss.
    """
    import torch

    digest = hashlib.sha256(_canonical_json([key_json, meta_json, str(tokens.dtype), list(tokens.shape)]).encode())
    digest.update(tokens.reshape(-1).view(torch.uint8).numpy())  # the bytes in place, without a copy
    return digest.hexdigest()


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)



# ---------------------------------------------------------------------------------------------------------
# Model identity
# ---------------------------------------------------------------------------------------------------------


def model_fingerprint(model_dir: str | Path) -> str:
    """A cheap sha256 identity of a model folder, for cache keys.

    Covers the content of config.json, of the shard index and of each adapter's adapter_config.json, and the
    (relative name, size, mtime_ns) of every weight file in the folder and in its adapter subfolders (those
    holding adapter_config.json or non_lora_trainables.bin). Hashing the weights themselves would read GBs,
    costing more than encoding the audio the cache saves; any rewrite of a weight file changes its mtime.
    Moving or renaming the folder keeps the fingerprint (names are relative).
    """
    model_dir = Path(model_dir).expanduser()
    if not model_dir.is_dir():
        raise CheckpointError(f"`{model_dir}` is not a model folder", "pass the folder that holds config.json")
    texts = [model_dir / "config.json", *(model_dir / name for name in INDEX_FILES)]
    weights = _weight_files(model_dir)
    for adapter_dir in _adapter_dirs(model_dir):
        texts.append(adapter_dir / "adapter_config.json")
        weights += _weight_files(adapter_dir)
    identity = {
        "texts": {_relative(p, model_dir): file_digest(p) for p in texts if p.is_file()},
        "weights": [[_relative(p, model_dir), p.stat().st_size, p.stat().st_mtime_ns] for p in weights],
    }
    return hashlib.sha256(_canonical_json(identity).encode()).hexdigest()


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def _adapter_dirs(model_dir: Path) -> list[Path]:
    subdirs = sorted(p for p in model_dir.iterdir() if p.is_dir())
    return [d for d in subdirs if any((d / marker).is_file() for marker in ADAPTER_MARKERS)]


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()

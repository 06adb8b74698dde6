"""Read a model folder in the Lyra release layout (docs/release-format.md#folder-layout).

    config.json  generation_config.json  tokenizer files
    model.safetensors.index.json + model-0000k-of-0000n.safetensors   (or one model.safetensors)
    speech_generator.safetensors                                       (read by the speech-out stage)
    speech_lora/ long_speech_lora/                                     (adapters.py)
    model_zoo/vision/<ViT>/  model_zoo/audio/<whisper>/                (tower configs, optionally weights;
                                                                       found as in towers.py)

The model is built on the meta device and tensors are streamed file by file straight onto their
device, so peak host memory stays near the size of the weights. Every parameter is either loaded or
named in a `CheckpointError`; checkpoint keys we do not use are reported in `LoadReport`.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError, safe_open

from lyra_cli.engine.model.config import LyraConfig
from lyra_cli.engine.model.towers import (
    INDEX_FILE,
    SINGLE_FILE,
    SPEECH_PREFIX,
    VISION_PREFIX,
    ModelSources,
    folder_weight_files,
    resolve_sources,
    tower_folder_keys,
)
from lyra_cli.errors import CheckpointError, setting

if TYPE_CHECKING:  # torch and accelerate are imported where weights are loaded: `lyra info` reads headers only
    import torch
    from torch import nn

log = logging.getLogger(__name__)

SPEECH_GENERATOR_FILE = "speech_generator.safetensors"
GENERATOR_PREFIX = "speech_generator."
weight_files = folder_weight_files  # key → file of a folder's safetensors, read from the headers (merge, speech_out)
_MAX_KEYS_SHOWN = 5


def _show_keys(keys: list[str]) -> str:
    shown = ", ".join(f"`{k}`" for k in sorted(keys)[:_MAX_KEYS_SHOWN])
    more = len(keys) - _MAX_KEYS_SHOWN
    return shown + (f" and {more} more" if more > 0 else "")


@dataclass
class WeightSource:
    """Where each checkpoint key lives: key (in our naming) → (file, key inside the file)."""

    locations: dict[str, tuple[Path, str]] = field(default_factory=dict)

    def add(self, key: str, path: Path, stored_key: str) -> None:
        self.locations.setdefault(key, (path, stored_key))

    def keys_with_prefix(self, prefix: str) -> list[str]:
        return [k for k in self.locations if k.startswith(prefix)]

    def by_file(self, keys: set[str]) -> dict[Path, list[tuple[str, str]]]:
        grouped: dict[Path, list[tuple[str, str]]] = defaultdict(list)
        for key in sorted(keys):
            path, stored = self.locations[key]
            grouped[path].append((key, stored))
        return grouped

    def shape(self, key: str) -> tuple[int, ...]:
        path, stored = self.locations[key]
        with _open(path) as handle:
            _require_key(handle, path, stored)
            return tuple(handle.get_slice(stored).get_shape())


def _open(path: Path):  # noqa: ANN202 - safetensors' handle type is private
    if path.is_dir():
        raise CheckpointError(f"weight file `{path}` is a folder", "re-download the model folder; a shard is absent")
    if not path.is_file():
        raise CheckpointError(f"weight file `{path}` is missing", "re-download the model folder; a shard is absent")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"weight file `{path}` is unreadable ({exc})", "re-download this file") from exc


def _require_key(handle, path: Path, key: str) -> None:  # noqa: ANN001
    """The index names the file of every key; a shard that disagrees is a broken download, not a crash."""
    if key not in handle.keys():
        raise CheckpointError(f"weight file `{path}` has no tensor `{key}`, although `{INDEX_FILE}` puts it there",
                              "the shards and the index disagree: re-download the model folder")  # fmt: skip


def _get_tensor(handle, path: Path, key: str) -> torch.Tensor:  # noqa: ANN001
    _require_key(handle, path, key)
    try:
        return handle.get_tensor(key)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"tensor `{key}` in `{path}` is unreadable ({exc})", "re-download this file") from exc


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file, with a `CheckpointError` naming the file (and key) on damage."""
    with _open(path) as handle:
        return {key: _get_tensor(handle, path, key) for key in handle.keys()}


def file_keys(path: Path) -> list[str]:
    with _open(path) as handle:
        return list(handle.keys())


def main_weight_source(model_dir: Path) -> WeightSource:
    files = weight_files(model_dir)
    if files is None:
        raise CheckpointError(
            f"`{model_dir}` holds no `{INDEX_FILE}` or `{SINGLE_FILE}`", f"point {setting('model')} at a Lyra release folder"
        )
    folders = sorted({p.name for p in files.values() if p.is_dir()})
    if folders:
        raise CheckpointError(f"shard `{folders[0]}` listed in `{INDEX_FILE}` is a folder in `{model_dir}`",
                              "the shard must be a .safetensors file: fetch it again")  # fmt: skip
    missing_files = sorted({p.name for p in files.values() if not p.is_file()})
    if missing_files:
        raise CheckpointError(
            f"shard {_show_keys(missing_files)} listed in `{INDEX_FILE}` is missing from `{model_dir}`",
            "the download is incomplete: fetch the missing shard(s) again",
        )
    source = WeightSource()
    for key, path in files.items():
        source.add(key, path, key)
    return source


def use_tower_folder(source: WeightSource, prefix: str, tower_dir: Path | None) -> None:
    """Tower weights come from the tower's own folder when it holds them (the authors' code always loads
    the towers from there and drops the copies in the shards), else from the shards."""
    files = weight_files(tower_dir) if tower_dir is not None else None
    if not files:
        return
    mapped = {ours: (path, stored) for stored, path in files.items() if (ours := tower_folder_keys(stored, prefix))}
    if not mapped:
        return
    for key in source.keys_with_prefix(prefix):
        del source.locations[key]
    for key, (path, stored) in mapped.items():
        source.add(key, path, stored)
    log.info("tower weights for `%s` read from `%s`", prefix.rstrip("."), tower_dir)


@dataclass
class LoadReport:
    loaded: int
    unused_keys: list[str]


def build_empty(factory: Callable[[], nn.Module]) -> nn.Module:
    """Construct a module with parameters on the meta device (buffers stay real), allocating nothing."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return factory()


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def _iter_tensors(source: WeightSource, keys: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
    for path, pairs in source.by_file(keys).items():
        with _open(path) as handle:
            for key, stored in pairs:
                yield key, _get_tensor(handle, path, stored)


def load_weights(
    model: nn.Module,
    source: WeightSource,
    *,
    device_for: Callable[[str], torch.device | str],
    dtype: torch.dtype,
    ignore_prefixes: tuple[str, ...] = (),
) -> LoadReport:
    """Stream every expected parameter of `model` from `source` onto its device, file by file."""
    from accelerate.utils import set_module_tensor_to_device

    expected = {name: p for name, p in model.named_parameters(remove_duplicate=True)}
    missing = sorted(set(expected) - set(source.locations))
    if missing:
        raise CheckpointError(
            f"{len(missing)} weight(s) missing from the checkpoint: {_show_keys(missing)}",
            "the model folder is incomplete or from another model; nothing is initialised at random",
        )
    for key, tensor in _iter_tensors(source, set(expected)):
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"`{key}` has shape {tuple(tensor.shape)} in the checkpoint, the config says {tuple(expected[key].shape)}",
                "config.json does not match the weights",
            )
        # `dtype=` matters: without it accelerate casts the value back to the meta parameter's dtype (fp32)
        target = dtype if tensor.is_floating_point() else None
        set_module_tensor_to_device(model, key, device_for(key), value=_cast(tensor, dtype), dtype=target)
    unused = sorted(k for k in set(source.locations) - set(expected) if not k.startswith(ignore_prefixes))
    if unused:
        log.warning("%d checkpoint key(s) not used by this model: %s", len(unused), _show_keys(unused))
    return LoadReport(loaded=len(expected), unused_keys=unused)


def load_config_and_source(model_dir: Path, config: LyraConfig, sources: ModelSources | None = None) -> WeightSource:
    """The main shards, with each tower's weights from its folder when it holds them, ready for `load_weights`."""
    source = main_weight_source(model_dir)
    sources = sources if sources is not None else resolve_sources(model_dir, config)
    for prefix, resolved in ((VISION_PREFIX, sources.vision), (SPEECH_PREFIX, sources.speech)):
        if resolved is not None:
            use_tower_folder(source, prefix, resolved.located.path)
    return source

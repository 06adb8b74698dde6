"""Read a model folder in the Lyra release layout (official-lyra.md §1.4–1.5, §5).

    config.json  generation_config.json  tokenizer files
    model.safetensors.index.json + model-0000k-of-0000n.safetensors   (or one model.safetensors)
    speech_generator.safetensors                                       (read by the speech-out stage)
    speech_lora/ long_speech_lora/                                     (adapters.py)
    model_zoo/vision/<ViT>/  model_zoo/audio/<whisper>/                (tower configs, optionally weights)

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

from lyra_cli.engine.config import LyraConfig, read_json
from lyra_cli.errors import CheckpointError

if TYPE_CHECKING:  # torch and accelerate are imported where weights are loaded: `lyra info` reads headers only
    import torch
    from torch import nn

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SPEECH_GENERATOR_FILE = "speech_generator.safetensors"
VISION_PREFIX = "model.vision_tower.vision_tower."
SPEECH_PREFIX = "model.speech_tower.speech_tower."
GENERATOR_PREFIX = "speech_generator."
# How tower weights are named when they come from a tower's own folder (HF WhisperModel / ViT saves).
_TOWER_FOLDER_PREFIXES = {
    SPEECH_PREFIX: ("model.encoder.", "encoder."),
    VISION_PREFIX: ("visual.", "model.visual.", ""),
}
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
            return tuple(handle.get_slice(stored).get_shape())


def _open(path: Path):  # noqa: ANN202 - safetensors' handle type is private
    if not path.is_file():
        raise CheckpointError(f"weight file `{path}` is missing", "re-download the model folder; a shard is absent")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"weight file `{path}` is unreadable ({exc})", "re-download this shard") from exc


def file_keys(path: Path) -> list[str]:
    with _open(path) as handle:
        return list(handle.keys())


def weight_files(folder: Path) -> dict[str, Path] | None:
    """key → file for a folder holding sharded (index) or single-file safetensors; None if it holds neither."""
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"`{index_path}` has no `weight_map`", "re-download the model folder")
        return {key: folder / name for key, name in weight_map.items()}
    single = folder / SINGLE_FILE
    if single.is_file():
        return {key: single for key in file_keys(single)}
    return None


def main_weight_source(model_dir: Path) -> WeightSource:
    files = weight_files(model_dir)
    if files is None:
        raise CheckpointError(
            f"`{model_dir}` holds no `{INDEX_FILE}` or `{SINGLE_FILE}`", "point --model at a Lyra release folder"
        )
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


def resolve_tower_dir(model_dir: Path, tower_path: str) -> Path | None:
    """The config's tower path (relative paths are relative to the model folder, as in the release)."""
    candidate = Path(tower_path).expanduser()
    for path in (candidate, model_dir / candidate) if candidate.is_absolute() else (model_dir / candidate,):
        if path.is_dir():
            return path
    return None


def add_tower_fallback(source: WeightSource, prefix: str, tower_dir: Path | None) -> None:
    """Tower weights missing from the main shards are read from the tower's own folder, when it has them."""
    if source.keys_with_prefix(prefix) or tower_dir is None:
        return
    files = weight_files(tower_dir)
    if files is None:
        return
    for stored_key, path in files.items():
        for folder_prefix in _TOWER_FOLDER_PREFIXES[prefix]:
            if stored_key.startswith(folder_prefix):
                source.add(prefix + stored_key[len(folder_prefix) :], path, stored_key)
                break
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
                yield key, handle.get_tensor(stored)


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


def load_config_and_source(model_dir: Path, config: LyraConfig) -> WeightSource:
    """The main shards plus tower-folder fallbacks, ready for `load_weights`."""
    source = main_weight_source(model_dir)
    if config.vision is not None:
        add_tower_fallback(source, VISION_PREFIX, resolve_tower_dir(model_dir, config.vision.tower))
    if config.speech is not None:
        add_tower_fallback(source, SPEECH_PREFIX, resolve_tower_dir(model_dir, config.speech.tower))
    return source

"""Where the towers, the image processor settings and the vocoder come from, decided without torch.

`config.json` names the towers by paths (`mm_vision_tower`, `mm_speech_tower`), and the authors' CLI
names the vocoder `model_zoo/audio/vocoder`. The authors' code opens these relative to the *working
directory* (docs/release-format.md#tower-folders); their README puts the model in `work_dirs/<name>/` and the
towers in `model_zoo/` at the root. A relative path is therefore looked up, in order:

1. the command-line flag (`--vision-tower`, `--speech-tower`, `--vocoder`), which replaces the path;
2. the working directory (the authors' rule);
3. the model folder (folders that carry their own `model_zoo/`, such as `--model tiny`);
4. the model folder's parents, nearest first (`work_dirs/X` finds `model_zoo/` two levels up from any
   working directory).

A tower's configuration is never guessed. It comes from the tower folder's `config.json`; without the
folder, from `vision_config` in the model's `config.json` (the ViT), or from a table of public encoders
matched on the exact shapes of the stored weights (head counts cannot be read off shapes, so nothing
else determines them). The image processor settings likewise come from the ViT folder's
`preprocessor_config.json`, or from the released Qwen2-VL values when the ViT is recognised as Qwen2-VL's.
Anything else is a `CheckpointError` naming the folder to provide and the flag. Each decision keeps a
sentence saying how it was made, printed by the run header and by `lyra info`.

Torch-free (stdlib only), so `lyra info` stays fast.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lyra_cli.engine.model.config import LyraConfig, read_json
from lyra_cli.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOWER_CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
VISION_PREFIX = "model.vision_tower.vision_tower."
SPEECH_PREFIX = "model.speech_tower.speech_tower."
# How tower weights are named in a tower's own folder (HF WhisperModel / Qwen2-VL ViT saves).
TOWER_FOLDER_PREFIXES = {
    SPEECH_PREFIX: ("model.encoder.", "encoder."),
    VISION_PREFIX: ("visual.", "model.visual.", ""),
}
# The authors' CLI default (`--vocoder-ckpt model_zoo/audio/vocoder/g_00500000`), and an older layout.
VOCODER_PATH = "model_zoo/audio/vocoder"
VOCODER_IN_MODEL = "vocoder"
VISION_FLAG, SPEECH_FLAG, VOCODER_FLAG = "--vision-tower", "--speech-tower", "--vocoder"
_HEADER_LENGTH_BYTES = 8  # safetensors: u64 little-endian length of the JSON header, then the header
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit

Shapes = Mapping[str, tuple[int, ...]]


# ---------------------------------------------------------------------------------------------------
# Known public encoders (the only source of a configuration besides a folder or `vision_config`)

WHISPER_POSITIONS = 1500  # encoder frames of a 30 s window, every Whisper size
LYRA_MEL_BINS = 128  # Lyra's front end (whisper-large-v3's); the older sizes use 80


@dataclass(frozen=True)
class KnownWhisper:
    """A public Whisper encoder (the openai/whisper-* config.json values). Several releases share one
    encoder (large-v3-turbo keeps large-v3's; large-v2 large-v1's), so an entry has several names."""

    names: tuple[str, ...]
    d_model: int
    layers: int
    heads: int
    ffn_dim: int
    mel_bins: int
    positions: int = WHISPER_POSITIONS

    def config(self) -> dict[str, Any]:
        """Keyword arguments of transformers' `WhisperConfig` for this encoder."""
        return {"num_mel_bins": self.mel_bins, "d_model": self.d_model, "encoder_layers": self.layers,
                "encoder_attention_heads": self.heads, "encoder_ffn_dim": self.ffn_dim,
                "max_source_positions": self.positions}  # fmt: skip

    def signature(self) -> tuple[int, ...]:
        return (self.d_model, self.mel_bins, self.ffn_dim, self.positions, self.layers)

    def name_for(self, requested: str) -> str:
        """The entry's name the config asked for (`…/whisper-large-v3-turbo`), else its first name."""
        base = Path(requested).name.lower()
        return next((n for n in self.names if n == base), self.names[0])


KNOWN_WHISPER_ENCODERS: tuple[KnownWhisper, ...] = (
    KnownWhisper(("whisper-tiny", "whisper-tiny.en"), 384, 4, 6, 1536, 80),
    KnownWhisper(("whisper-base", "whisper-base.en"), 512, 6, 8, 2048, 80),
    KnownWhisper(("whisper-small", "whisper-small.en"), 768, 12, 12, 3072, 80),
    KnownWhisper(("whisper-medium", "whisper-medium.en"), 1024, 24, 16, 4096, 80),
    KnownWhisper(("whisper-large", "whisper-large-v2"), 1280, 32, 20, 5120, 80),
    KnownWhisper(("whisper-large-v3", "whisper-large-v3-turbo"), 1280, 32, 20, 5120, LYRA_MEL_BINS),
)

# Qwen2-VL's released `preprocessor_config.json` (Qwen/Qwen2-VL-2B/7B-Instruct; the Lyra ViT folders
# carry the same): 4 to 16384 merged 28×28 patches per image, OpenAI-CLIP mean and std.
QWEN2VL_PREPROCESSOR: Mapping[str, Any] = {
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
}  # fmt: skip


@dataclass(frozen=True)
class KnownViT:
    """A public vision tower: its `vision_config` and the processor settings released with it."""

    name: str
    vision_config: Mapping[str, Any]
    preprocessor: Mapping[str, Any] = field(default_factory=lambda: dict(QWEN2VL_PREPROCESSOR))

    def signature(self) -> tuple[int, ...]:
        c = self.vision_config
        embed, merged = c["embed_dim"], c["embed_dim"] * c["spatial_merge_size"] ** 2
        patch = (embed, c["in_channels"], c["temporal_patch_size"], c["patch_size"], c["patch_size"])
        return (*patch, embed * c["mlp_ratio"], c["hidden_size"], merged, c["depth"])


def _qwen2vl_vit(hidden_size: int) -> dict[str, Any]:
    # Qwen2-VL-2B and -7B share one 675 M ViT; only the merger's output width (the LLM's) differs.
    return {"depth": 32, "embed_dim": 1280, "num_heads": 16, "mlp_ratio": 4, "in_channels": 3, "patch_size": 14,
            "spatial_merge_size": 2, "temporal_patch_size": 2, "hidden_size": hidden_size, "hidden_act": "quick_gelu"}  # fmt: skip


KNOWN_VITS: tuple[KnownViT, ...] = (
    KnownViT("Qwen2-VL-2B ViT", _qwen2vl_vit(1536)),
    KnownViT("Qwen2-VL-7B ViT", _qwen2vl_vit(3584)),
)


def _layer_count(shapes: Shapes, prefix: str) -> int:
    indices = {k[len(prefix) :].split(".", 1)[0] for k in shapes if k.startswith(prefix)}
    return len([i for i in indices if i.isdigit()])


def whisper_signature(shapes: Shapes) -> tuple[int, ...] | None:
    """(d_model, mel bins, ffn, positions, layers) of stored encoder weights (keys without prefix)."""
    try:
        d_model, mel_bins, _ = shapes["conv1.weight"]
        ffn_dim, _ = shapes["layers.0.fc1.weight"]
        positions, _ = shapes["embed_positions.weight"]
    except (KeyError, ValueError):
        return None
    return (d_model, mel_bins, ffn_dim, positions, _layer_count(shapes, "layers."))


def vit_signature(shapes: Shapes) -> tuple[int, ...] | None:
    try:
        patch = tuple(shapes["patch_embed.proj.weight"])
        mlp, _ = shapes["blocks.0.mlp.fc1.weight"]
        hidden, merged = shapes["merger.mlp.2.weight"]
    except (KeyError, ValueError):
        return None
    return (*patch, mlp, hidden, merged, _layer_count(shapes, "blocks."))


def recognise_whisper(shapes: Shapes, table: tuple[KnownWhisper, ...] | None = None) -> KnownWhisper | None:
    signature = whisper_signature(shapes)
    candidates = KNOWN_WHISPER_ENCODERS if table is None else table
    return next((known for known in candidates if signature is not None and known.signature() == signature), None)


def recognise_vit(shapes: Shapes, table: tuple[KnownViT, ...] | None = None) -> KnownViT | None:
    signature = vit_signature(shapes)
    candidates = KNOWN_VITS if table is None else table
    return next((known for known in candidates if signature is not None and known.signature() == signature), None)


# ---------------------------------------------------------------------------------------------------
# Weight shapes from safetensors headers (no tensor is read)


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file: key → {dtype, shape, data_offsets}, plus `__metadata__`."""
    try:
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(_HEADER_LENGTH_BYTES))
            if length > _MAX_HEADER_BYTES:
                raise ValueError(f"header of {length} bytes")
            header = json.loads(handle.read(length))
    except FileNotFoundError as exc:
        raise CheckpointError(f"weight file `{path}` is missing", "re-download the model folder; a shard is absent") from exc
    except IsADirectoryError as exc:
        raise CheckpointError(f"weight file `{path}` is a folder", "re-download the model folder; a shard is absent") from exc
    except (OSError, ValueError, struct.error) as exc:
        raise CheckpointError(f"weight file `{path}` is unreadable ({exc})", "re-download this shard") from exc
    header.pop("__metadata__", None)
    return header


def folder_weight_files(folder: Path) -> dict[str, Path] | None:
    """key → file of a folder's sharded (index) or single-file safetensors; None if it holds neither."""
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"`{index_path}` has no `weight_map`", "re-download the model folder")
        bad = [key for key, name in weight_map.items() if not isinstance(name, str) or not name]
        if bad:
            raise CheckpointError(f"`{index_path}` maps `{bad[0]}` to `{weight_map[bad[0]]}`, not a file name",
                                  "re-download the model folder")  # fmt: skip
        return {key: folder / name for key, name in weight_map.items()}
    single = folder / SINGLE_FILE
    if single.is_file():
        return {key: single for key in safetensors_header(single)}
    return None


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str


def folder_tensors(folder: Path) -> dict[str, TensorInfo]:
    """Every stored tensor's shape and dtype, read from the headers only ({} for a folder without weights)."""
    files = folder_weight_files(folder) or {}
    tensors: dict[str, TensorInfo] = {}
    for path in sorted(set(files.values())):
        for key, entry in safetensors_header(path).items():
            tensors[key] = TensorInfo(tuple(entry["shape"]), str(entry["dtype"]))
    return tensors


def tower_folder_keys(stored_key: str, prefix: str) -> str | None:
    """A tower folder's key in our naming (`prefix` + key), or None for keys the tower does not use."""
    for folder_prefix in TOWER_FOLDER_PREFIXES[prefix]:
        if stored_key.startswith(folder_prefix):
            return prefix + stored_key[len(folder_prefix) :]
    return None


# ---------------------------------------------------------------------------------------------------
# Locating folders


@dataclass(frozen=True)
class TowerOverrides:
    """Folders that replace the paths the model's files name (the command line's tower and vocoder flags);
    a `str` is taken as a path."""

    vision: Path | None = None
    speech: Path | None = None
    vocoder: Path | None = None

    def __post_init__(self) -> None:
        for name in ("vision", "speech", "vocoder"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))  # frozen: set once, here

    def check(self) -> None:
        """A flag that names no folder fails before anything loads."""
        for flag, path in ((VISION_FLAG, self.vision), (SPEECH_FLAG, self.speech), (VOCODER_FLAG, self.vocoder)):
            if path is not None and not path.is_dir():
                raise CheckpointError(f"{flag} `{path}` is not a folder", f"give {flag} the folder itself")


@dataclass(frozen=True)
class Located:
    """Where a path named by the model's files (or a flag) was found, and by which rule."""

    requested: str
    path: Path | None
    rule: str  # "--speech-tower", "working directory", "model folder", "parent `../..` of the model folder"
    flag: str

    @property
    def found(self) -> bool:
        return self.path is not None


def _candidates(requested: str, model_dir: Path, cwd: Path) -> list[tuple[Path, str]]:
    path = Path(requested).expanduser()
    if path.is_absolute():
        return [(path, "absolute path in config.json")]
    model = model_dir.resolve()
    found = [(cwd / path, "working directory"), (model / path, "model folder")]
    for level, parent in enumerate(model.parents, start=1):
        found.append((parent / path, f"parent `{'/'.join(['..'] * level)}` of the model folder"))
    return found


def locate(requested: str, model_dir: Path, override: Path | None, flag: str, *, cwd: Path | None = None,
           extra: tuple[tuple[Path, str], ...] = ()) -> Located:  # fmt: skip
    """Apply the rules of the module docstring; `extra` are further candidates tried after the model folder."""
    if override is not None:
        return Located(str(override), override if override.is_dir() else None, flag, flag)
    candidates = _candidates(requested, model_dir, cwd or Path.cwd())
    candidates[2:2] = list(extra)
    for path, rule in candidates:
        if path.is_dir():
            return Located(requested, path, rule, flag)
    where = "working directory, model folder and its parents" if not Path(requested).is_absolute() else "that path"
    return Located(requested, None, f"looked in the {where}", flag)


# ---------------------------------------------------------------------------------------------------
# Deciding each component


@dataclass(frozen=True)
class Resolved:
    """One component: its folder, the settings that determine it (None for the vocoder), how they were
    determined, and the problem that stops a load when nothing determines them."""

    component: str  # "vision tower", "speech tower", "image processor", "vocoder"
    located: Located
    settings: Mapping[str, Any] | None = None
    origin: str = ""
    weights: str = ""  # towers: "the model's shards" or the folder
    problem: CheckpointError | None = None
    recognised: str | None = None  # the known encoder the weights matched

    def line(self) -> str:
        head = f"`{self.located.path}` ({self.located.rule})" if self.located.found else ""
        parts = [p for p in (head, self.origin, f"weights from {self.weights}" if self.weights else "") if p]
        if self.problem is not None and self.component != "vocoder":  # the vocoder matters only for speech out
            parts.append(f"cannot load: {self.problem.message}")
        return f"{self.component}: " + "; ".join(parts)

    def require(self) -> Mapping[str, Any] | None:
        if self.problem is not None:
            raise self.problem
        return self.settings


@dataclass(frozen=True)
class ModelSources:
    vision: Resolved | None
    processor: Resolved | None
    speech: Resolved | None
    vocoder: Resolved

    def lines(self) -> list[str]:
        return [r.line() for r in (self.vision, self.processor, self.speech, self.vocoder) if r is not None]

    def to_dict(self) -> dict[str, Any]:
        def one(r: Resolved | None) -> dict[str, Any] | None:
            if r is None:
                return None
            return {"requested": r.located.requested, "path": str(r.located.path) if r.located.path else None,
                    "found_by": r.located.rule, "settings_from": r.origin or None, "weights_from": r.weights or None,
                    "recognised": r.recognised, "problem": r.problem.message if r.problem else None,
                    "hint": r.problem.hint if r.problem else None}  # fmt: skip

        return {"vision_tower": one(self.vision), "image_processor": one(self.processor),
                "speech_tower": one(self.speech), "vocoder": one(self.vocoder)}  # fmt: skip


def _missing(located: Located, file: str) -> str:
    if located.path is None:
        return f"folder `{located.requested}` not found"
    return f"`{located.path}` has no {file}"


def _provide_hint(located: Located) -> str:
    return f"put the folder at `{located.requested}` (working directory or model folder) or pass {located.flag} DIR"


def tower_folder_tensors(folder: Path | None, prefix: str) -> dict[str, TensorInfo]:
    """The tower's weights in its own folder, in our naming (`prefix` + key); {} when it holds none."""
    if folder is None:
        return {}
    mapped = {tower_folder_keys(k, prefix): t for k, t in folder_tensors(folder).items()}
    return {k: t for k, t in mapped.items() if k is not None}


def _tower_shapes(prefix: str, shards: Mapping[str, TensorInfo], located: Located) -> tuple[dict, str]:
    """The tower's stored shapes (keys without `prefix`) and where the loader reads them: the tower folder
    when it holds weights (the authors load the towers from there), else the model's shards."""
    tensors, weights = tower_folder_tensors(located.path, prefix), f"`{located.path}`"
    if not tensors:
        tensors = {k: t for k, t in shards.items() if k.startswith(prefix)}
        weights = "the model's shards"
    shapes = {k[len(prefix) :]: t.shape for k, t in tensors.items()}
    return shapes, weights if shapes else ""


def resolve_speech(requested: str, model_dir: Path, shards: Mapping[str, TensorInfo], override: Path | None,
                   cwd: Path | None = None) -> Resolved:  # fmt: skip
    located = locate(requested, model_dir, override, SPEECH_FLAG, cwd=cwd)
    shapes, weights = _tower_shapes(SPEECH_PREFIX, shards, located)
    name = "speech tower"
    if located.path is not None and (located.path / TOWER_CONFIG_FILE).is_file():
        settings = read_json(located.path / TOWER_CONFIG_FILE)
        return Resolved(name, located, settings, "config.json in its folder", weights)
    known = recognise_whisper(shapes)
    missing = _missing(located, TOWER_CONFIG_FILE)
    if known is None:
        what = "its weights match no known Whisper encoder" if shapes else "no speech tower weights in the shards"
        problem = CheckpointError(f"speech tower {missing} and {what}", _provide_hint(located))
        return Resolved(name, located, None, "", weights, problem)
    encoder = known.name_for(requested)
    origin = f"{encoder} encoder recognised from its weights; {missing}"
    problem = None
    if known.mel_bins != LYRA_MEL_BINS:
        problem = CheckpointError(
            f"the speech tower is a {encoder} encoder ({known.mel_bins} mel bins); "
            f"Lyra's front end computes {LYRA_MEL_BINS}",
            "Lyra needs a whisper-large-v3 / large-v3-turbo encoder (128 mel bins)",
        )
    return Resolved(name, located, known.config(), origin, weights, problem, encoder)


def resolve_vision(requested: str, model_dir: Path, shards: Mapping[str, TensorInfo], vision_config: Mapping[str, Any],
                   override: Path | None, cwd: Path | None = None) -> tuple[Resolved, Resolved]:  # fmt: skip
    """The ViT and the image processor settings (determined together: the processor follows the ViT)."""
    located = locate(requested, model_dir, override, VISION_FLAG, cwd=cwd)
    shapes, weights = _tower_shapes(VISION_PREFIX, shards, located)
    known = recognise_vit(shapes)
    recognised = f"recognised from its weights as the {known.name}" if known else ""
    folder = located.path
    missing = _missing(located, TOWER_CONFIG_FILE)
    if folder is not None and (folder / TOWER_CONFIG_FILE).is_file():
        raw = read_json(folder / TOWER_CONFIG_FILE)
        settings = dict(raw.get("vision_config") or raw)
        vit = Resolved("vision tower", located, settings, "config.json in its folder", weights)
    elif vision_config:
        origin = "; ".join(filter(None, ["vision_config in config.json", recognised, missing]))
        vit = Resolved("vision tower", located, dict(vision_config), origin, weights, recognised=known and known.name)
    elif known is not None:
        vit = Resolved("vision tower", located, dict(known.vision_config), f"{recognised}; {missing}", weights,
                       recognised=known.name)  # fmt: skip
    else:
        problem = CheckpointError(f"vision tower {missing}, the model's config.json has no `vision_config` and "
                                  "its weights match no known ViT", _provide_hint(located))  # fmt: skip
        vit = Resolved("vision tower", located, None, "", weights, problem)
    return vit, _resolve_processor(located, known)


def _resolve_processor(located: Located, known: KnownViT | None) -> Resolved:
    name = "image processor"
    if located.path is not None and (located.path / PREPROCESSOR_FILE).is_file():
        settings = read_json(located.path / PREPROCESSOR_FILE)
        return Resolved(name, located, settings, f"{PREPROCESSOR_FILE} in its folder")
    missing = _missing(located, PREPROCESSOR_FILE)
    if known is not None:
        released = f"the released {known.name.removesuffix(' ViT')} {PREPROCESSOR_FILE} values"
        released += " (ViT recognised from its weights)"
        return Resolved(name, located, dict(known.preprocessor), f"{released}; {missing}", recognised=known.name)
    problem = CheckpointError(f"image processor settings: vision tower {missing} and the ViT is not one lyra "
                              "recognises", _provide_hint(located))  # fmt: skip
    return Resolved(name, located, None, "", "", problem)


def resolve_vocoder(model_dir: Path, override: Path | None, cwd: Path | None = None) -> Resolved:
    extra = ((model_dir.resolve() / VOCODER_IN_MODEL, "model folder"),)
    located = locate(VOCODER_PATH, model_dir, override, VOCODER_FLAG, cwd=cwd, extra=extra)
    problem = None
    if not located.found:
        problem = CheckpointError(
            f"no unit vocoder: `{located.requested}` not found in the working directory, the model folder "
            "or its parents",
            "download the mHuBERT km1000 CodeHiFiGAN (g_00500000 + config.json) there, or pass --vocoder DIR",
        )
    origin = "" if located.found else f"`{VOCODER_PATH}` not found (needed only for --speak / --speech-out)"
    return Resolved("vocoder", located, None, origin, "", problem)


def resolve_sources(model_dir: Path, config: LyraConfig, overrides: TowerOverrides | None = None,
                    shards: Mapping[str, TensorInfo] | None = None, cwd: Path | None = None) -> ModelSources:  # fmt: skip
    """Every component's folder and settings; problems are kept in the result, not raised (see `require`)."""
    overrides = overrides or TowerOverrides()
    shards = folder_tensors(model_dir) if shards is None else shards
    vision = processor = speech = None
    if config.vision is not None:
        vision, processor = resolve_vision(config.vision.tower, model_dir, shards, config.vision.tower_config,
                                           overrides.vision, cwd)  # fmt: skip
    if config.speech is not None:
        speech = resolve_speech(config.speech.tower, model_dir, shards, overrides.speech, cwd)
    return ModelSources(vision, processor, speech, resolve_vocoder(model_dir, overrides.vocoder, cwd))

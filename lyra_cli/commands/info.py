"""`lyra info`: what a model folder holds, read from its files without loading any weights or torch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from lyra_cli.commands import common
from lyra_cli.engine.model.resolve import resolve_model
from lyra_cli.errors import UsageError

INFO_DEVICES = ("auto", "cuda", "cpu", "mps")
MERGED_KEY = "merged_adapter"  # adapters.MERGED_KEY (adapters.py imports torch; `info` must not)
SPEECH_GENERATOR_FILE = "speech_generator.safetensors"  # checkpoint.SPEECH_GENERATOR_FILE, same reason


FolderArgument = typer.Argument(None, help="Model folder (same as --model).")
VocoderOption = typer.Option(None, "--vocoder", help="Unit vocoder folder (g_00500000 + config.json).")
InfoDeviceOption = typer.Option(
    "auto", "--device", help="Memory figures for: cuda | cpu | mps (auto: a GPU; the compute dtype follows it)."
)
InfoDtypeOption = typer.Option("auto", "--dtype", help="Compute dtype of the figures: auto | bf16 | fp16 | fp32.")
JsonOption = typer.Option(False, "--json", help="Print the description as JSON.")


def info(
    folder: str | None = FolderArgument,
    model: str = common.ModelOption,
    vision_tower: Path | None = common.VisionTowerOption,
    speech_tower: Path | None = common.SpeechTowerOption,
    vocoder: Path | None = VocoderOption,
    device: str = InfoDeviceOption,
    dtype: str = InfoDtypeOption,
    json_out: bool = JsonOption,
) -> None:
    """Describe a model folder: config, weights, where each tower and the vocoder are found, memory needed."""
    from lyra_cli.console import write_answer

    if folder is not None and model not in (common.TINY, folder):
        raise UsageError(f"two model folders given: `{folder}` and --model `{model}`", "give one of them")
    compute = _compute_dtype(device, dtype)
    model_spec = folder if folder is not None else model
    described = describe(resolve_model(model_spec), common.tower_overrides(vision_tower, speech_tower, vocoder),
                         device, compute)  # fmt: skip
    write_answer(json.dumps(described, indent=2) + "\n" if json_out else render(described))


def _compute_dtype(device: str, dtype: str) -> str:
    from lyra_cli.engine.model.footprint import COMPUTE_BYTES, DEVICE_DTYPES

    if device not in INFO_DEVICES:
        raise UsageError(f"unknown --device `{device}`", f"choose one of: {', '.join(INFO_DEVICES)}")
    if dtype != "auto" and dtype not in COMPUTE_BYTES:
        raise UsageError(f"unknown --dtype `{dtype}`", f"choose one of: auto, {', '.join(COMPUTE_BYTES)}")
    return dtype if dtype != "auto" else DEVICE_DTYPES["cuda" if device == "auto" else device]


def describe(model_dir: Path, overrides: Any, device: str, compute: str) -> dict[str, Any]:
    from lyra_cli.engine.model import footprint
    from lyra_cli.engine.model.config import load_config
    from lyra_cli.engine.model.towers import folder_tensors, resolve_sources

    config = load_config(model_dir)
    shards = folder_tensors(model_dir)
    if not shards:
        from lyra_cli.errors import CheckpointError

        raise CheckpointError(f"`{model_dir}` holds no model.safetensors(.index.json)", "point at a Lyra release folder")
    sources = resolve_sources(model_dir, config, overrides, shards)
    adapters = footprint.adapter_tensors(model_dir)
    counts = footprint.count_parameters(footprint.loaded_tensors(shards, sources, config), adapters)
    text = config.text
    return {
        "folder": str(model_dir),
        "model_type": config.model_type,
        "llm": {"hidden": text.hidden_size, "layers": text.num_layers, "heads": text.num_heads,
                "kv_heads": text.num_kv_heads, "intermediate": text.intermediate_size, "vocab": text.vocab_size},
        "weights": {"files": sorted({p.name for p in _shard_files(model_dir)}), "tensors": len(shards),
                    "dtypes": sorted({t.dtype for t in shards.values()}), "parameters_loaded": counts.total},
        "sources": sources.to_dict(),
        "adapters": [name for name in footprint.ADAPTER_FOLDERS if (model_dir / name).is_dir()],
        "merged_adapter": config.raw.get(MERGED_KEY),  # `lyra train merge` folded it into the weights
        "extractor": "off" if not config.extractor.enabled else
                     f"every {config.extractor.compress_gap} layers keep {config.extractor.keep_rate:.0%}",
        "speech_generator": (model_dir / SPEECH_GENERATOR_FILE).is_file(),
        "memory": {"device": "cuda" if device == "auto" else device, "compute_dtype": compute,
                   "rows": [row.to_dict() for row in footprint.memory_table(counts, config, compute)]},
    }  # fmt: skip


def _shard_files(model_dir: Path) -> set[Path]:
    from lyra_cli.engine.model.towers import folder_weight_files

    return set((folder_weight_files(model_dir) or {}).values())


def _size(n: float) -> str:
    """Bytes in the largest binary unit that keeps at least one whole unit (GiB, as --max-memory takes)."""
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def render(d: dict[str, Any]) -> str:
    """The description as aligned text lines."""
    llm, weights, memory = d["llm"], d["weights"], d["memory"]
    rows = [
        ("folder", d["folder"]),
        ("model type", d["model_type"]),
        ("language model", (f"{llm['layers']} layers, hidden {llm['hidden']}, {llm['heads']} heads "
                            f"({llm['kv_heads']} KV), intermediate {llm['intermediate']}, vocab {llm['vocab']}")),
        ("weights", (f"{len(weights['files'])} file(s), {weights['tensors']} tensors ({', '.join(weights['dtypes'])}), "
                     f"{_count(weights['parameters_loaded'])} parameters loaded (adapters included)")),
    ]  # fmt: skip
    for key, label in (("vision_tower", "vision tower"), ("image_processor", "image processor"),
                       ("speech_tower", "speech tower"), ("vocoder", "vocoder")):  # fmt: skip
        source = d["sources"][key]
        if source is not None:
            rows.append((label, _source_text(source, show_problem=key != "vocoder")))
    rows += [
        ("adapters", ", ".join(d["adapters"]) or "none"),
        ("merged adapter", d["merged_adapter"] or "none"),
        ("extractor", d["extractor"]),
        ("speech generator", "present" if d["speech_generator"] else "absent (no spoken answers)"),
        ("memory", f"on {memory['device']}, compute {memory['compute_dtype']}: weights + KV cache per 1k tokens"),
    ]
    for row in memory["rows"]:
        kv = _size(row["kv_cache_bytes_per_1k_tokens"])
        rows.append((f"  {row['precision']}", f"{_size(row['weights_bytes'])} + {kv} per 1k tokens"))
    width = max(len(label) for label, _ in rows) + 2
    return "".join(f"{label:<{width}}{value}\n" for label, value in rows)


def _source_text(source: dict[str, Any], *, show_problem: bool) -> str:
    parts = []
    if source["path"]:
        parts.append(f"{source['path']} ({source['found_by']})")
    parts += [source[k] for k in ("settings_from",) if source[k]]
    if source["weights_from"]:
        parts.append(f"weights from {source['weights_from']}")
    if source["problem"] and show_problem:  # a missing vocoder only matters for spoken answers
        parts.append(f"PROBLEM: {source['problem']} — {source['hint']}")
    return "; ".join(parts)

"""`lyra info`: what a model folder holds, read from its files without loading any weights."""

from __future__ import annotations

import json

import typer

from lyra_cli.commands import common


def info(
    model: str = common.ModelOption,
    json_out: bool = typer.Option(False, "--json", help="Print the description as JSON."),
) -> None:
    """Describe a model folder: config, weight files, adapters, towers."""
    from lyra_cli.console import write_answer
    from lyra_cli.engine.adapters import ADAPTER_DIRS, MERGED_KEY
    from lyra_cli.engine.checkpoint import main_weight_source, resolve_tower_dir
    from lyra_cli.engine.config import load_config

    model_dir = common.model_dir_for(model)
    config = load_config(model_dir)
    source = main_weight_source(model_dir)
    files = sorted({path.name for path, _ in source.locations.values()})
    text = config.text
    described = {
        "folder": str(model_dir),
        "model_type": config.model_type,
        "llm": {"hidden": text.hidden_size, "layers": text.num_layers, "heads": text.num_heads,
                "kv_heads": text.num_kv_heads, "intermediate": text.intermediate_size, "vocab": text.vocab_size},
        "weight_files": files,
        "checkpoint_keys": len(source.locations),
        "vision_tower": _tower(config.vision.tower if config.vision else None, model_dir, resolve_tower_dir),
        "speech_tower": _tower(config.speech.tower if config.speech else None, model_dir, resolve_tower_dir),
        "adapters": [name for name in ADAPTER_DIRS.values() if (model_dir / name).is_dir()],
        "merged_adapter": config.raw.get(MERGED_KEY),  # `lyra train merge` folded it into the weights
        "extractor": "off" if not config.extractor.enabled else
                     f"every {config.extractor.compress_gap} layers keep {config.extractor.keep_rate:.0%}",
        "speech_generator": (model_dir / "speech_generator.safetensors").is_file(),
    }  # fmt: skip
    if json_out:
        write_answer(json.dumps(described, indent=2) + "\n")
        return
    for key, value in described.items():
        write_answer(f"{key:18} {value}\n")


def _tower(path: str | None, model_dir, resolve) -> str:  # noqa: ANN001
    if path is None:
        return "none"
    folder = resolve(model_dir, path)
    return f"{path} ({'folder present' if folder else 'no folder: weights from the shards'})"

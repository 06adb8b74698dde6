"""Which model folder a model name means: `tiny` (the cached random model, built on first use) or a path.

Light on purpose (no torch until the tiny model is asked for): commands resolve `--model` before any
heavy import, so a wrong path fails at once."""

from __future__ import annotations

from pathlib import Path

from lyra_cli.errors import CheckpointError, setting

TINY = "tiny"


def resolve_model(spec: str | Path) -> Path:
    """`tiny` → the cached tiny checkpoint (built on first use); a path → that folder, checked."""
    if spec == TINY:
        from lyra_cli.engine.model.tiny import tiny_model_dir

        return tiny_model_dir()
    path = Path(spec).expanduser()
    if not path.exists():
        raise CheckpointError(f"model folder `{spec}` does not exist",
                              f"give a Lyra release folder, or {setting('model')} tiny")  # fmt: skip
    if not path.is_dir():
        raise CheckpointError(f"`{spec}` is a file, not a model folder", "give the folder holding config.json")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"`{spec}` has no config.json", "give the folder of a Lyra release (e.g. Lyra_Base_9B)")
    return path

"""The engine internals the server reaches, in one place (everything else comes from `lyra_cli.engine`).

- The engine keeps the KV cache of its last prompt in `Engine._prefix` (a `PrefixCache`, reused only when a
  new prompt's embeddings and positions equal the cached ones). The server keeps one per client and swaps
  it in and out around each job (`worker.PrefixCaches`).
- An earlier turn of a request's history is an engine `Turn` with its answer already given.
- `extract` in a request is the `--extract BLOCKSxRATIO` spec, parsed as the CLI parses it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lyra_cli.engine import Engine


def set_prefix(engine: "Engine", cache: Any) -> None:
    engine._prefix = cache  # noqa: SLF001


def take_prefix(engine: "Engine") -> Any:
    """The engine's prefix cache, leaving it empty (no job ever starts on another client's cache)."""
    cache, engine._prefix = engine._prefix, None  # noqa: SLF001
    return cache


def extractor(engine: "Engine", spec: str | None) -> Any:
    """The request's `lyra.extract` for this model (None: the config's own, as `Engine.respond` picks)."""
    if spec is None:
        return None
    from lyra_cli.engine.extractor import parse_extract

    return parse_extract(spec, engine.loaded.config.text.num_layers)


def extracting(engine: "Engine", requested: Any) -> bool:
    """Whether an extractor runs for this request: its own, or the model config's (on in no release)."""
    return requested is not None or engine.loaded.config.extractor.enabled


def answered_turn(parts: list, answer: str) -> Any:
    """A turn of the request's history: the user's parts and the answer the client says was given."""
    from lyra_cli.engine.prompt import Turn

    return Turn(parts, answer)

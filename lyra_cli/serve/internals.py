"""The engine internals the server reaches, in one place (everything else comes from `lyra_cli.engine`).

- The engine keeps the KV cache of its last prompt in `Engine._prefix` (a `PrefixCache`, reused only when a
  new prompt's embeddings and positions equal the cached ones). The server keeps one per client and swaps
  it in and out around each job (`worker.PrefixCaches`).
- An earlier turn of a request's history is an engine `Turn` with its answer already given.
- `extract` in a request is the `--extract BLOCKSxRATIO` spec, parsed as the CLI parses it.
- A job follows its prefill chunk by chunk (to stop a cancelled one there): `Engine.respond`'s progress hook.
- Long recordings' speech tokens are cached in `lyra longspeech`'s speech-token cache.
- A prompt is measured (text tokens, media tokens) against the model's positions before it is prefilled.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
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


def respond(engine: "Engine", conversation: Any, parts: list, sampling: Any, *, extractor: Any, voice: Any,
            on_prefill_progress: Callable[[int, int], None]) -> Iterator[Any]:  # fmt: skip
    """`Engine.respond` with a hook called after each prefill chunk (it raises to stop a cancelled job)."""
    return engine.respond(conversation, parts, sampling, extractor=extractor, voice=voice,
                          on_prefill_progress=on_prefill_progress)  # fmt: skip


def speech_cache(root: Path | None) -> Any:
    """The speech-token cache under `root` (None: no cache)."""
    if root is None:
        return None
    from lyra_cli.audio.cache import SpeechTokenCache

    return SpeechTokenCache(root)


# chat-template tokens around a turn (`<|im_start|>user\n` … `<|im_end|>\n<|im_start|>assistant\n`), a bound
TEMPLATE_TOKENS_PER_TURN = 16


def context_tokens(engine: "Engine") -> int:
    """The model's positions: prompt and answer together must fit."""
    return engine.loaded.config.text.max_position_embeddings


def prompt_tokens(engine: "Engine", system: str, turns: list[tuple[list, str | None]], *,
                  media: bool = True) -> int:  # fmt: skip
    """About how many tokens the conversation's prompt takes (exact for text and media, the template bounded);
    `media` False counts only its text. Text is tokenized only when its bytes could exceed the positions
    (a token is at least one byte), so a normal prompt costs nothing here and a huge one is caught early."""
    from lyra_cli.engine import SpeechPart, TextPart, VisualPart
    from lyra_cli.engine.tokenizer import encode_chunk

    texts = [system] + [t for parts, answer in turns for t in [*(p.text for p in parts if isinstance(p, TextPart)),
                                                              answer or ""]]  # fmt: skip
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    if n_bytes <= context_tokens(engine):
        n_text = n_bytes
    else:
        n_text = sum(len(encode_chunk(engine.loaded.tokenizer, t)) for t in texts)
    n = n_text + TEMPLATE_TOKENS_PER_TURN * (len(turns) + 1)
    if media:
        for parts, _answer in turns:
            n += sum(_media_tokens(p) for p in parts if isinstance(p, VisualPart | SpeechPart))
    return n


def _media_tokens(part: Any) -> int:
    from lyra_cli.audio.features import TOKENS_PER_WINDOW
    from lyra_cli.engine import VisualPart

    if isinstance(part, VisualPart):
        return int(part.tokens.shape[0])
    return int(part.tokens.shape[0]) if part.tokens is not None else part.n_windows * TOKENS_PER_WINDOW

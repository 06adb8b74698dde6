"""The lyra library: model, loading, preprocessing, generation. Never prints; logs through `logging`.

    from lyra_cli.engine import Conversation, TextPart, load, read_media

    engine = load("tiny")                                   # or a Lyra release folder
    conversation = Conversation()                           # the official system prompt
    image = engine.encode(read_media("image", "examples/extreme_ironing.jpg"))
    done = engine.generate(conversation, [image, TextPart("What is unusual here?")])
    print(done.text)

Names are imported on first use, so `import lyra_cli.engine` (and `lyra --help`) loads no torch.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lyra_cli.engine.events import AudioChunk, Done, Event, Prefilled, Progress, TextDelta, TokenLogprob
    from lyra_cli.engine.generate import SamplingConfig
    from lyra_cli.engine.models import TINY, resolve_model
    from lyra_cli.engine.pipeline import Engine, read_media
    from lyra_cli.engine.prompt import DEFAULT_SYSTEM_PROMPT, Conversation, Part, SpeechPart, TextPart, VisualPart
    from lyra_cli.engine.voice import VoiceConfig
    from lyra_cli.errors import LyraError

# public name -> the module that defines it
_EXPORTS = {
    "Engine": "pipeline", "read_media": "pipeline",
    "Conversation": "prompt", "DEFAULT_SYSTEM_PROMPT": "prompt", "Part": "prompt", "TextPart": "prompt",
    "VisualPart": "prompt", "SpeechPart": "prompt",
    "AudioChunk": "events", "Done": "events", "Event": "events", "Prefilled": "events", "Progress": "events",
    "TextDelta": "events", "TokenLogprob": "events",
    "SamplingConfig": "generate", "VoiceConfig": "voice", "TINY": "models", "resolve_model": "models",
}  # fmt: skip

__all__ = [
    "DEFAULT_SYSTEM_PROMPT", "TINY", "AudioChunk", "Conversation", "Done", "Engine", "Event", "LyraError", "Part",
    "Prefilled", "Progress", "SamplingConfig", "SpeechPart", "TextDelta", "TextPart", "TokenLogprob", "VisualPart",
    "VoiceConfig", "load", "read_media", "resolve_model",
]  # fmt: skip


def __getattr__(name: str) -> Any:
    if name == "LyraError":
        from lyra_cli.errors import LyraError

        return LyraError
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def load(
    model: str | Path = "tiny",
    *,
    device: str = "auto",
    dtype: str = "auto",
    quantization: str = "none",
    device_map: str = "none",
    max_memory: str | None = None,
    vision_tower: str | Path | None = None,
    speech_tower: str | Path | None = None,
    vocoder: str | Path | None = None,
    voice: bool | VoiceConfig = False,
) -> Engine:
    """A ready engine: `model` is `tiny` (a small random model, built and cached on first use) or a folder in
    the Lyra release layout. `device` auto | cpu | cuda | mps, `dtype` auto | bf16 | fp16 | fp32, `quantization`
    none | 8bit | 4bit; towers and vocoder default to where the model's config points. With `voice`
    (True, or a `VoiceConfig`), `Engine.generate` also speaks: `AudioChunk` events before its `Done`.

    Raises `LyraError` (its `setting` names the argument at fault) before any weights load where it can."""
    from lyra_cli.engine.models import resolve_model
    from lyra_cli.engine.pipeline import Engine
    from lyra_cli.engine.runtime import RuntimeRequest, resolve_runtime
    from lyra_cli.engine.towers import TowerOverrides
    from lyra_cli.engine.voice import VoiceConfig, load_voice

    runtime = resolve_runtime(RuntimeRequest(device, dtype, quantization, device_map, max_memory))
    vision_tower, speech_tower, vocoder = (_path(p) for p in (vision_tower, speech_tower, vocoder))
    overrides = TowerOverrides(vision=vision_tower, speech=speech_tower, vocoder=vocoder)
    overrides.check()
    model_dir = resolve_model(model)  # settings first: `tiny` may take a while to build the first time
    engine = Engine.load(model_dir, runtime, overrides)
    if voice:
        config = voice if isinstance(voice, VoiceConfig) else VoiceConfig()
        engine.voice = load_voice(engine.loaded, vocoder, config)
    return engine


def _path(value: str | Path | None) -> Path | None:
    return Path(value) if value is not None else None

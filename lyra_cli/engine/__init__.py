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
    from lyra_cli.engine.model.config import SamplingConfig
    from lyra_cli.engine.model.resolve import TINY, resolve_model
    from lyra_cli.engine.model.runtime import DeviceMap
    from lyra_cli.engine.model.towers import TowerOverrides
    from lyra_cli.engine.run.events import AudioChunk, Done, Event, Prefilled, Progress, TextDelta, TokenLogprob
    from lyra_cli.engine.run.pipeline import Engine, read_media
    from lyra_cli.engine.run.prefill import Chunking
    from lyra_cli.engine.run.prompt import DEFAULT_SYSTEM_PROMPT, Conversation, Part, SpeechPart, TextPart, VisualPart
    from lyra_cli.engine.run.voice import VoiceConfig
    from lyra_cli.errors import LyraError

# public name -> the module that defines it (`model.*`: the network and its loading; `run.*`: the run time)
_EXPORTS = {
    "Engine": "run.pipeline", "read_media": "run.pipeline",
    "AudioChunk": "run.events", "Done": "run.events", "Event": "run.events", "Prefilled": "run.events",
    "Progress": "run.events", "TextDelta": "run.events", "TokenLogprob": "run.events",
    "Conversation": "run.prompt", "DEFAULT_SYSTEM_PROMPT": "run.prompt", "Part": "run.prompt", "TextPart": "run.prompt",
    "VisualPart": "run.prompt", "SpeechPart": "run.prompt",
    "Chunking": "run.prefill", "VoiceConfig": "run.voice",
    "SamplingConfig": "model.config", "DeviceMap": "model.runtime", "TowerOverrides": "model.towers",
    "TINY": "model.resolve", "resolve_model": "model.resolve",
}  # fmt: skip

__all__ = [
    "DEFAULT_SYSTEM_PROMPT", "TINY", "AudioChunk", "Chunking", "Conversation", "DeviceMap", "Done", "Engine", "Event",
    "LyraError", "Part", "Prefilled", "Progress", "SamplingConfig", "SpeechPart", "TextDelta", "TextPart",
    "TokenLogprob", "TowerOverrides", "VisualPart", "VoiceConfig", "load", "read_media", "resolve_model",
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
    device_map: DeviceMap | None = None,
    towers: TowerOverrides | None = None,
    voice: bool | VoiceConfig = False,
) -> Engine:
    """A ready engine: `model` is `tiny` (a small random model, built and cached on first use) or a folder in
    the Lyra release layout. `device` auto | cpu | cuda | mps, `dtype` auto | bf16 | fp16 | fp32, `quantization`
    none | 8bit | 4bit; `device_map=DeviceMap(max_memory=...)` spreads the model over the GPUs and the CPU;
    `towers=TowerOverrides(vision=..., speech=..., vocoder=...)` replaces the folders the model's config
    points to. With `voice` (True, or a `VoiceConfig`), `Engine.generate` also speaks: `AudioChunk` events
    before its `Done`.

    Raises `LyraError` (its `setting` names the argument at fault) before any weights load where it can."""
    from lyra_cli.engine.model.resolve import resolve_model
    from lyra_cli.engine.model.runtime import RuntimeRequest, resolve_runtime
    from lyra_cli.engine.model.towers import TowerOverrides
    from lyra_cli.engine.run.pipeline import Engine
    from lyra_cli.engine.run.voice import VoiceConfig, load_voice

    runtime = resolve_runtime(RuntimeRequest.of(device, dtype, quantization, device_map))
    towers = towers or TowerOverrides()
    towers.check()
    model_dir = resolve_model(model)  # settings first: `tiny` may take a while to build the first time
    engine = Engine.load(model_dir, runtime, towers)
    if voice:
        config = voice if isinstance(voice, VoiceConfig) else VoiceConfig()
        engine.voice = load_voice(engine.loaded, towers.vocoder, config)
    return engine

"""Hours of audio on one machine: streamed decoding, batched encoding, a disk cache of speech tokens.

The recording is decoded block by block, regrouped into 30 s windows, encoded `encode_batch`
windows at a time and projected at once, so the audio and encoder stage holds a bounded amount of
memory whatever the length; only the 300 tokens per window accumulate. The projected tokens are cached
on disk by audio content, model identity and every setting that changes them, so a second question
about the same recording skips decoding and encoding entirely.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lyra_cli.audio.features import TOKENS_PER_WINDOW
from lyra_cli.audio.frontend import AudioFrontEnd
from lyra_cli.audio.io import SAMPLE_RATE_HZ, require_speech
from lyra_cli.audio.windows import WINDOW_SECONDS, count_windows, iter_windows
from lyra_cli.engine.model.adapters import Adapter, route
from lyra_cli.engine.model.runtime import keep_large_buffers_off_the_heap
from lyra_cli.engine.model.speech_encoder import DEFAULT_ENCODE_BATCH
from lyra_cli.engine.run.events import Progress
from lyra_cli.engine.run.pipeline import encode_speech
from lyra_cli.engine.run.prompt import SpeechPart
from lyra_cli.engine.run.speech_cache import CacheKey, SpeechTokenCache, file_digest, model_fingerprint

log = logging.getLogger(__name__)

ProgressCallback = Callable[[Progress], None]


@dataclass(frozen=True)
class LongSpeechSettings:
    """Everything that changes the speech tokens of a recording (all of it goes into the cache key)."""

    front_end: AudioFrontEnd = AudioFrontEnd()  # channel and resampler; both streamed, exactly
    official_extra_window: bool = False
    max_audio_s: float | None = None
    encode_batch: int = DEFAULT_ENCODE_BATCH
    use_cache: bool = True

    def key_settings(self, adapter: Adapter, dtype: torch.dtype) -> dict[str, str | float | bool]:
        return {
            "adapter": adapter.value,
            "dtype": str(dtype),
            **self.front_end.key_settings(),
            "official_extra_window": self.official_extra_window,
            "max_audio_s": self.max_audio_s if self.max_audio_s is not None else "none",
        }


# Room the position check keeps for the chat template and a short question around the recording.
PROMPT_MARGIN_TOKENS = 64


def prompt_tokens(n_windows: int) -> int:
    """About how many prompt tokens a recording of `n_windows` windows makes in the long-speech layout."""
    return n_windows * TOKENS_PER_WINDOW + PROMPT_MARGIN_TOKENS


def windows_for(duration_s: float) -> int:
    """Windows of a recording this long (our windowing: `count_windows`)."""
    return count_windows(max(1, math.ceil(duration_s * SAMPLE_RATE_HZ)))


def longest_fitting_s(max_positions: int) -> int:
    """The longest recording (whole windows) whose prompt fits in `max_positions`."""
    return (max_positions - PROMPT_MARGIN_TOKENS) // TOKENS_PER_WINDOW * WINDOW_SECONDS


def _cut(blocks: Iterator[np.ndarray], max_samples: int | None) -> Iterator[np.ndarray]:
    """Stop the block stream after `max_samples` (the explicit `--max-audio` cut)."""
    remaining = max_samples
    for block in blocks:
        if remaining is not None:
            if remaining <= 0:
                return
            block = block[:remaining]
            remaining -= len(block)
        yield block


class RecordingEncoder:
    """Turns a recording into a `SpeechPart` of projected tokens, through the cache when allowed."""

    def __init__(self, engine, settings: LongSpeechSettings, cache: SpeechTokenCache | None) -> None:  # noqa: ANN001
        self.engine = engine
        self.settings = settings
        keep_large_buffers_off_the_heap()  # else the heap grows with every encoded batch
        self.cache = cache if settings.use_cache else None
        self._fingerprint: str | None = None

    def _key(self, digest: str, adapter: Adapter) -> CacheKey:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.engine.loaded.model_dir)
        dtype = self.engine.loaded.runtime.dtype
        return CacheKey(digest, self._fingerprint, self.settings.key_settings(adapter, dtype))

    def _lookup(self, digest: str, source: str) -> SpeechPart | None:
        assert self.cache is not None
        for adapter in (Adapter.LONG_SPEECH, Adapter.SPEECH):
            hit = self.cache.get(self._key(digest, adapter))
            n_windows = int(hit.meta["n_windows"]) if hit is not None else 0
            if hit is not None and route([n_windows]) is adapter:  # the adapter the clip's windows route to
                device = self.engine.model.model.embed_tokens.weight.device
                return SpeechPart(n_windows, float(hit.meta["duration_s"]), source, tokens=hit.tokens.to(device),
                                  adapter=adapter)  # fmt: skip
        return None

    def encode(self, path: str | Path, on_progress: ProgressCallback | None = None) -> tuple[SpeechPart, bool]:
        """(the recording's speech part, whether it came from the cache)."""
        digest = file_digest(Path(path)) if self.cache is not None else ""
        if self.cache is not None:
            cached = self._lookup(digest, str(path))
            if cached is not None:
                return cached, True
        part = self._encode_stream(path, on_progress)
        if self.cache is not None and part.adapter is not None and part.tokens is not None:
            meta = {"n_windows": part.n_windows, "duration_s": part.duration_s, "source": Path(path).name}
            self.cache.put(self._key(digest, part.adapter), part.tokens, meta)
        return part, False

    def _encode_stream(self, path: str | Path, on_progress: ProgressCallback | None) -> SpeechPart:
        stream = self.settings.front_end.open_stream(path)
        max_samples = None if self.settings.max_audio_s is None else int(self.settings.max_audio_s * SAMPLE_RATE_HZ)
        total_s = stream.duration_s
        if total_s is not None and self.settings.max_audio_s is not None:
            total_s = min(total_s, self.settings.max_audio_s)
        windows = iter_windows(_cut(iter(stream), max_samples), official_extra_window=self.settings.official_extra_window)
        peak = _Peak()

        def progress(done_s: float) -> None:
            if on_progress is not None:
                on_progress(Progress("encode", done_s, max(total_s or 0.0, done_s), "s"))

        tower = self.engine.model.model.speech_tower.speech_tower
        part = encode_speech(tower, self.engine.loaded.adapters, peak.track(windows), str(path),
                             batch_size=self.settings.encode_batch, keep_frames=False, on_batch=progress)  # fmt: skip
        require_speech(np.array([peak.value], dtype=np.float32), str(path))
        return part


class _Peak:
    """The loudest sample of a window stream, tracked as it passes (the silence check runs after encoding)."""

    def __init__(self) -> None:
        self.value = 0.0

    def track(self, windows: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        for window in windows:
            if len(window):
                self.value = max(self.value, float(np.abs(window).max()))
            yield window

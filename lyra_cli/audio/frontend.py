"""Which audio front end turns a recording into 16 kHz mono: ours (the default) or the authors' (`--official-audio`).

Ours averages the channels (no channel is thrown away) and resamples with soxr's HQ filter. The authors'
(`lyra/serve/cli.py`, the eval scripts and training alike) load with torchaudio, resample every channel with
`torchaudio.transforms.Resample(sr, 16000)` at its defaults, then keep channel 0 (`wav[0]`). Resampling is the
same linear filter on each channel, so taking channel 0 first and resampling it alone gives the same samples at
a fraction of the cost; that is the order used here. The module imports nothing heavy when loaded, so commands
may build a front end while parsing their options.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

    from lyra_cli.audio.io import AudioStream, ChannelMix, Resampler


@dataclass(frozen=True)
class AudioFrontEnd:
    """How a recording's channels become one (`channel`) and how it reaches 16 kHz (`resampler`)."""

    channel: ChannelMix = "mean"
    resampler: Resampler = "soxr"

    @classmethod
    def official(cls) -> AudioFrontEnd:
        """The authors' front end: channel 0, torchaudio's default windowed-sinc `Resample`."""
        return cls(channel="first", resampler="sinc")

    @classmethod
    def choose(cls, official_audio: bool) -> AudioFrontEnd:
        """The front end a command's `--official-audio` flag selects."""
        return cls.official() if official_audio else cls()

    @property
    def is_official(self) -> bool:
        return self == AudioFrontEnd.official()

    def key_settings(self) -> dict[str, str]:
        """Its part of a speech-token cache key: both choices change the samples, so both are in it."""
        return {"channel_mix": self.channel, "resampler": self.resampler}

    def describe(self) -> str:
        """One line for a run's header, e.g. `channel 0, sinc resampling (official)`."""
        channel = "channel 0" if self.channel == "first" else "channel mean"
        label = " (official)" if self.is_official else ""
        return f"{channel}, {self.resampler} resampling{label}"

    def load(self, path: str | Path) -> np.ndarray:
        """`load_audio` with this front end: float32 mono (n_samples,) at 16 kHz."""
        from lyra_cli.audio.io import load_audio

        return load_audio(path, channel_mix=self.channel, resampler=self.resampler)

    def open_stream(self, path: str | Path, *, block_seconds: float | None = None) -> AudioStream:
        """`open_audio_stream` with this front end (blocks of `block_seconds`, or its default)."""
        from lyra_cli.audio.io import STREAM_BLOCK_SECONDS, open_audio_stream

        seconds = STREAM_BLOCK_SECONDS if block_seconds is None else block_seconds
        return open_audio_stream(path, channel_mix=self.channel, resampler=self.resampler, block_seconds=seconds)

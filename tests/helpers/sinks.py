"""Sinks for tests: `MemorySink` (a caller-driven "device") and `NullSink` (audio goes nowhere).

Both follow `lyra_cli.audio.playback.AudioSink`; lyra itself needs neither (with `--speak` off it has no
sink at all), so they live here rather than in the package.
"""

from __future__ import annotations

import numpy as np

from lyra_cli.audio.io import SAMPLE_RATE_HZ
from lyra_cli.audio.playback import PlaybackBuffer


class NullSink:
    """Audio goes nowhere, nothing is ever playing (a capture loop with no speaker)."""

    playing = False
    played_s = 0.0

    def write(self, samples: np.ndarray) -> None:
        """Discard the samples: nothing is listening."""

    def stop(self) -> None:
        """Nothing plays, so nothing to stop."""

    def close(self, wait: bool = True) -> None:
        """Nothing to release."""


class MemorySink:
    """A sink whose "device" is the caller: `pull(n)` plays n samples, `audio` is everything played.

    The same queue as `SpeakerSink`, so `stop` drops exactly what a speaker would not have played.
    `close(wait=True)` plays out what is left, as a speaker does.
    """

    def __init__(self) -> None:
        self._buffer = PlaybackBuffer()
        self._played: list[np.ndarray] = []
        self.closed = False

    @property
    def playing(self) -> bool:
        return self._buffer.playing

    @property
    def played_s(self) -> float:
        return self._buffer.played_s

    @property
    def audio(self) -> np.ndarray:
        """Everything played so far, (n_samples,) float32 (silence from underflow not included)."""
        return np.concatenate(self._played) if self._played else np.zeros(0, np.float32)

    def write(self, samples: np.ndarray) -> None:
        if self.closed:
            raise RuntimeError("write to a closed MemorySink")
        self._buffer.write(samples)

    def pull(self, n_samples: int) -> np.ndarray:
        """What a device asking for `n_samples` gets: queued audio, then zeros."""
        out = np.empty(n_samples, np.float32)
        n = self._buffer.fill(out)
        self._played.append(out[:n].copy())
        return out

    def stop(self) -> None:
        self._buffer.stop()

    def close(self, wait: bool = True) -> None:
        if wait and not self.closed:
            self.pull(round(self._buffer.queued_s * SAMPLE_RATE_HZ))
        self._buffer.stop()
        self.closed = True

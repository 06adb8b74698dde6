"""A sound card made of files: ALSA's file plugin as microphone (reads a recording) and speaker.

PortAudio reads the ALSA configuration when it initialises, so the code under test runs in a
subprocess whose HOME holds this `.asoundrc`.
"""

from __future__ import annotations

import ctypes.util
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

from lyra_cli.audio.io import SAMPLE_RATE_HZ
from lyra_cli.audio.playback import float_to_pcm16

REPO = Path(__file__).resolve().parents[2]

_ASOUNDRC = """\
pcm.!default {{ type asym playback.pcm "lyra_speaker" capture.pcm "lyra_mic" }}
pcm.lyra_speaker {{ type plug slave {{ pcm "lyra_speaker_tap" format S16_LE rate 16000 channels 1 }} }}
pcm.lyra_speaker_tap {{ type file slave.pcm "lyra_null" file "/dev/null" format "raw" }}
pcm.lyra_mic {{ type plug slave {{ pcm "lyra_mic_tap" format S16_LE rate {mic_rate_hz} channels 1 }} }}
pcm.lyra_mic_tap {{ type file slave.pcm "lyra_null" file "/dev/null" infile "{infile}" format "raw" }}
pcm.lyra_null {{ type null }}
"""


def virtual_mic_env(tmp_path: Path, recording: np.ndarray, mic_rate_hz: int = SAMPLE_RATE_HZ) -> dict[str, str]:
    """Environment whose sound card's microphone "hears" `recording` (float32 at `mic_rate_hz`)."""
    home, infile = tmp_path / "home", tmp_path / "mic.raw"
    home.mkdir()
    float_to_pcm16(recording).astype("<i2").tofile(infile)
    (home / ".asoundrc").write_text(_ASOUNDRC.format(mic_rate_hz=mic_rate_hz, infile=infile))
    return {**os.environ, "HOME": str(home), "PYTHONPATH": str(REPO)}


def portaudio_missing() -> str | None:
    """Why the real sounddevice path cannot run here, or None. Checked without importing sounddevice:
    importing it initialises PortAudio in this process."""
    if importlib.util.find_spec("sounddevice") is None:
        return "needs the `sounddevice` package (pip install 'lyra-cli[mic]')"
    if ctypes.util.find_library("portaudio") is None:
        return "needs the PortAudio library (Debian package `libportaudio2`)"
    return None


needs_portaudio = pytest.mark.skipif(portaudio_missing() is not None, reason=str(portaudio_missing()))

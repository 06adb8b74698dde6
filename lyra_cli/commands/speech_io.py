"""The speech-output flags shared by `chat` and `listen`, loading their voice, and the latency line.

Where the audio goes (speaker, per-turn wav files) is `lyra_cli.audio.outputs.SpeechOutputs`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from lyra_cli.errors import UsageError

if TYPE_CHECKING:
    from lyra_cli.engine.model.loader import LoadedModel
    from lyra_cli.engine.run.voice import Voice

SpeakOption = typer.Option(False, "--speak", help="Play the answer through the speaker while it is generated.")
SpeechOutOption = typer.Option(
    None, "--speech-out", help="Write the spoken answer to this .wav (16 kHz mono); later turns add -2, -3…"
)
OutputDeviceOption = typer.Option(None, "--output-device", help="Speaker: device index or part of its name.")
ChunkUnitsOption = typer.Option(40, "--chunk-units", help="Units per vocoder call (smaller: earlier first audio).")
VocoderOption = typer.Option(
    None, "--vocoder",
    help="Unit vocoder folder (g_00500000 + config.json); default: model_zoo/audio/vocoder in the working directory, "
         "the model folder or its parents.",
)  # fmt: skip
CtcAlignedOption = typer.Option(
    False, "--ctc-aligned",
    help="Feed the speech generator each token's own state (as in training), not the authors' shifted states.",
)  # fmt: skip


def load_voice_for(loaded: "LoadedModel", vocoder: Path | None, chunk_units: int, aligned: bool) -> "Voice":
    from lyra_cli.engine.run.voice import VoiceConfig, load_voice

    if chunk_units < 1:
        raise UsageError(f"--chunk-units must be ≥ 1, got `{chunk_units}`", "the authors use 40")
    return load_voice(loaded, vocoder, VoiceConfig(chunk_units=chunk_units, aligned=aligned))


def latency_line(done) -> str:  # noqa: ANN001
    t = done.timings
    parts = [f"first token {t['first_token_s']:.2f}s"]
    if "first_audio_s" in t:
        parts += [f"first audio {t['first_audio_s']:.2f}s", f"{t['audio_s']:.1f}s of speech",
                  f"speech RTF {t['speech_rtf']:.2f}"]  # fmt: skip
    parts.append(f"{done.new_tokens} tokens at {done.tokens_per_s:.1f} tok/s")
    return "latency: " + ", ".join(parts)

"""Where spoken answers go: the speaker, a wav file per turn, or both. Shared by `chat` and `listen`.

The speaker is fed through a queue that its own audio thread drains, so playback never blocks
generation. Wav files are written atomically when a turn ends; an interrupted turn leaves nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from lyra_cli.errors import UsageError

if TYPE_CHECKING:
    import numpy as np

    from lyra_cli.engine.loader import LoadedModel
    from lyra_cli.engine.voice import Voice

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


def check_speech_out(path: Path | None, *, overwrite: bool = False) -> None:
    """Fail before any weights load when the wav cannot be written (or would replace a file lyra did not write)."""
    from lyra_cli.outputs import check_output_file, is_lyra_wav

    if path is None:
        return
    if path.suffix.lower() != ".wav":
        raise UsageError(f"--speech-out `{path}` must end in .wav", "e.g. --speech-out answer.wav")
    check_output_file(path, flag="--speech-out", overwrite=overwrite, is_ours=is_lyra_wav, create_parent=False)


def turn_path(base: Path, turn: int) -> Path:
    """`answer.wav` for the first turn, `answer-2.wav`, `answer-3.wav`… after it."""
    return base if turn == 1 else base.with_name(f"{base.stem}-{turn}{base.suffix}")


class SpeechOutputs:
    """Fans audio chunks out to the speaker and/or one wav file per turn."""

    def __init__(self, *, speak: bool, device: str | None, speech_out: Path | None, overwrite: bool = False) -> None:
        from lyra_cli.audio.playback import SpeakerSink, pick_device

        self.speaker = SpeakerSink(pick_device(device, "output")) if speak else None
        self.base = speech_out
        self.overwrite = overwrite
        self.writer = None
        self.turn = 0

    @property
    def enabled(self) -> bool:
        return self.speaker is not None or self.base is not None

    def begin_turn(self) -> None:
        from lyra_cli.audio.playback import WavWriter

        self.turn += 1
        if self.base is not None:
            path = turn_path(self.base, self.turn)
            if self.turn > 1:  # the first turn's file was checked before the model loaded
                check_speech_out(path, overwrite=self.overwrite)
            self.writer = WavWriter(path)

    def write(self, samples: "np.ndarray") -> None:
        if self.speaker is not None:
            self.speaker.write(samples)
        if self.writer is not None:
            self.writer.write(samples)

    def stop_playback(self) -> None:
        """Barge-in: silence the speaker now; the turn's file still gets what was generated."""
        if self.speaker is not None:
            self.speaker.stop()

    @property
    def playing(self) -> bool:
        return self.speaker is not None and self.speaker.playing

    def end_turn(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def abort_turn(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None

    def close(self, *, wait: bool = True) -> None:
        self.abort_turn()
        if self.speaker is not None:
            self.speaker.close(wait=wait)


def load_voice_for(loaded: "LoadedModel", vocoder: Path | None, chunk_units: int, aligned: bool) -> "Voice":
    from lyra_cli.engine.voice import VoiceConfig, load_voice

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

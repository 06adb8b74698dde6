"""Where spoken answers go: the speaker, a wav file per turn, or both. Shared by `chat`, `listen` and any
caller of `lyra_cli.engine.run.session`.

The speaker is fed through a queue that its own audio thread drains, so playback never blocks
generation. Wav files are written atomically when a turn ends; an interrupted turn leaves nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lyra_cli.errors import UsageError, setting

if TYPE_CHECKING:
    import numpy as np

    from lyra_cli.audio.playback import AudioSink, WavWriter

SPEECH_OUT = setting("speech_out")  # the command line shows `--speech-out`


def check_speech_out(path: Path | None, *, overwrite: bool = False) -> None:
    """Fail before any weights load when the wav cannot be written (or would replace a file lyra did not write)."""
    from lyra_cli.outputs import check_output_file, is_lyra_wav

    if path is None:
        return
    if path.suffix.lower() != ".wav":
        raise UsageError(f"{SPEECH_OUT} `{path}` must end in .wav", f"e.g. {SPEECH_OUT} answer.wav")
    check_output_file(path, flag=SPEECH_OUT, overwrite=overwrite, is_ours=is_lyra_wav, create_parent=False)


def turn_path(base: Path, turn: int) -> Path:
    """`answer.wav` for the first turn, `answer-2.wav`, `answer-3.wav`… after it."""
    return base if turn == 1 else base.with_name(f"{base.stem}-{turn}{base.suffix}")


class SpeechOutputs:
    """Fans audio chunks out to the speaker and/or one wav file per turn.

    `speak` opens the output `device` (index or part of its name, None: the default); `speech_out` is the
    first turn's wav, later turns add -2, -3… to its name."""

    def __init__(self, *, speak: bool, device: str | None, speech_out: Path | None, overwrite: bool = False) -> None:
        from lyra_cli.audio.playback import SpeakerSink, pick_device

        self.speaker: AudioSink | None = SpeakerSink(pick_device(device, "output")) if speak else None
        self.base = speech_out
        self.overwrite = overwrite
        self.writer: WavWriter | None = None
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

    def write(self, samples: np.ndarray) -> None:
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

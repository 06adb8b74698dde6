"""Speech out, streamed: LLM states → CTC units (incremental) → vocoder chunks, as the text is generated.

Each generated token's state yields its 25 frames of units at once (`UnitStream`), and the vocoder turns
every `chunk_units` new units into audio with enough context that the stream equals offline vocoding
(`VocoderStream`). The authors instead vocode after the whole answer (CLI) or re-run the generator on
the whole prefix at every step (their demo).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lyra_cli.engine.model.loader import LoadedModel
from lyra_cli.engine.model.speech_generator import SpeechGenerator, UnitStream, load_speech_generator
from lyra_cli.engine.model.towers import resolve_vocoder
from lyra_cli.engine.model.vocoder import UnitVocoder, VocoderStream, load_vocoder
from lyra_cli.engine.run.generate import Step
from lyra_cli.errors import CheckpointError

log = logging.getLogger(__name__)

DEFAULT_CHUNK_UNITS = 40
# The first chunk is vocoded sooner, so the answer starts sounding early; later chunks are larger and
# cheaper per unit. The stream equals offline vocoding whatever the chunk sizes.
FIRST_CHUNK_UNITS = 10
WARM_UP_STATES = 2
WARM_UP_UNITS = DEFAULT_CHUNK_UNITS  # the authors' demo default: ~0.8 s of audio per vocoder call


@dataclass(frozen=True)
class VoiceConfig:
    chunk_units: int = DEFAULT_CHUNK_UNITS
    # False: the authors' inputs — the state that *predicted* each token (the last prompt state, then
    # each step's); True: the state *of* each generated token, as the generator saw in training.
    aligned: bool = False


@dataclass
class Voice:
    generator: SpeechGenerator
    vocoder: UnitVocoder
    config: VoiceConfig

    @property
    def sample_rate_hz(self) -> int:
        return self.vocoder.sample_rate_hz

    def start(self) -> "VoiceTurn":
        return VoiceTurn(self)


class VoiceTurn:
    """The streaming state of one spoken answer (explicit, so a test can drive it step by step)."""

    def __init__(self, voice: Voice) -> None:
        self.voice = voice
        self.units = UnitStream(voice.generator)
        self.audio = VocoderStream(voice.vocoder, min(FIRST_CHUNK_UNITS, voice.config.chunk_units))
        self.all_units: list[int] = []
        self._skip_first = voice.config.aligned  # the last prompt state predicts, it is not a token's state

    def push(self, step: Step) -> np.ndarray:
        """One generation step → the new audio samples it completes (often none)."""
        if self._skip_first:
            self._skip_first = False
            return np.zeros(0, dtype=np.float32)
        weight = next(self.voice.generator.parameters())
        units = self.units.push(step.hidden.to(device=weight.device, dtype=weight.dtype))
        self.all_units += units
        samples = self.audio.push(units) if units else np.zeros(0, dtype=np.float32)
        if len(samples):
            self.audio.chunk_units = self.voice.config.chunk_units  # after the first chunk: the steady size
        return samples

    def finish(self) -> np.ndarray:
        return self.audio.flush()


def find_vocoder_dir(loaded: LoadedModel, explicit: Path | None) -> Path:
    """`--vocoder DIR`, else the folder the load found (model/towers.py: working directory, model folder, parents)."""
    resolved = loaded.sources.vocoder if explicit is None else resolve_vocoder(loaded.model_dir, explicit)
    if resolved.located.path is None:
        raise resolved.problem or CheckpointError(f"vocoder folder `{explicit}` does not exist",
                                                  "give the folder with g_00500000 + config.json")  # fmt: skip
    return resolved.located.path


def load_voice(loaded: LoadedModel, vocoder_dir: Path | None, config: VoiceConfig) -> Voice:
    """The speech generator (from `speech_generator.safetensors`) and the vocoder, on the model's device."""
    runtime = loaded.runtime
    generator = load_speech_generator(loaded.model_dir, loaded.config, device=runtime.device, dtype=runtime.dtype)
    if generator is None:
        raise CheckpointError(
            "this model has no speech generator (config.json sets no `speech_generator_type`)",
            "speech output needs a Lyra release with speech_generator.safetensors",
        )
    # The vocoder is small and its output is audio: fp32 everywhere avoids audible rounding.
    vocoder = load_vocoder(find_vocoder_dir(loaded, vocoder_dir), device=runtime.device, dtype=torch.float32)
    voice = Voice(generator, vocoder, config)
    warm_up(voice, loaded.config.text.hidden_size)
    return voice


@torch.inference_mode()
def warm_up(voice: Voice, llm_hidden: int) -> None:
    """Run both stages once at load time: first calls pay for kernel selection and allocation (about a
    second on CPU), which would otherwise delay the first answer's first audio."""
    weight = next(voice.generator.parameters())
    turn = voice.start()
    for _ in range(WARM_UP_STATES):
        turn.units.push(torch.zeros(llm_hidden, device=weight.device, dtype=weight.dtype))
    voice.vocoder(torch.arange(WARM_UP_UNITS, device=next(voice.vocoder.parameters()).device))

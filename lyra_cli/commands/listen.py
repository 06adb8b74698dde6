"""`lyra listen`: a spoken conversation. Speak, Lyra answers in text and speech; speak over it to interrupt.

The conversation loop (turns cut by the voice-activity detector, barge-in, cancellation) is the engine's
`lyra_cli.engine.run.session.SpokenSession`; this command parses and checks the flags, opens the source and
the outputs, and renders the session's events on the console.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from lyra_cli.audio.outputs import SpeechOutputs, check_speech_out
from lyra_cli.commands import common, speech_io
from lyra_cli.engine.model.resolve import resolve_model
from lyra_cli.engine.run.session import (
    Interrupted,
    SessionConfig,
    SessionEvent,
    SpokenSession,
    TurnAnswered,
    TurnJob,
)
from lyra_cli.errors import UsageError
from lyra_cli.inputs import require_input_file

if TYPE_CHECKING:
    from lyra_cli.engine.run.events import Done
    from lyra_cli.engine.run.generate import SamplingConfig
    from lyra_cli.engine.run.pipeline import Engine
    from lyra_cli.engine.run.prompt import Conversation
    from lyra_cli.engine.run.voice import Voice


class Listener(SpokenSession):
    """`lyra listen`'s session: the engine's `SpokenSession` with its events rendered by the command.

    `render_text(str)` gets the answer's text as it streams, `render_done(turn, done)` each finished answer,
    `note(str)` what the user should know on stderr (an interrupted answer)."""

    def __init__(
        self, *, engine: Engine, sampling: SamplingConfig, voice: Voice | None, outputs: SpeechOutputs,
        render_text: Callable[[str], None], render_done: Callable[[TurnJob, Done], None],
        note: Callable[[str], None], realtime: bool, max_turns: int | None = None,
        conversation: Conversation | None = None,
    ) -> None:  # fmt: skip
        super().__init__(engine, sampling, outputs, voice=voice, conversation=conversation,
                         config=SessionConfig(realtime=realtime, max_turns=max_turns), on_event=self._render)  # fmt: skip
        self.render_text = render_text
        self.render_done = render_done
        self.note = note

    def _render(self, event: SessionEvent) -> None:
        from lyra_cli.engine.run.events import TextDelta

        if isinstance(event, TextDelta):
            self.render_text(event.text)
        elif isinstance(event, TurnAnswered):
            self.render_done(event.turn, event.done)
        elif isinstance(event, Interrupted):
            self.note("(interrupted)")


def listen(
    mic: bool = typer.Option(False, "--mic", help="Listen to the microphone (the default without --input-file)."),
    input_file: Path | None = typer.Option(None, "--input-file", help="Feed this recording instead of a microphone."),
    realtime: bool = typer.Option(False, "--realtime", help="With --input-file: play it in at speaking speed."),
    official_audio: bool = typer.Option(
        False, "--official-audio", help="With --input-file: decode it with the authors' audio front end (channel 0, "
        "torchaudio's default windowed-sinc resampling) instead of the channel mean and soxr.",
    ),  # fmt: skip
    speak: bool | None = typer.Option(None, "--speak/--no-speak", help="Answer through the speaker (default: with --mic)."),
    speech_out: Path | None = speech_io.SpeechOutOption,
    overwrite: bool = common.OverwriteOption,
    list_devices_flag: bool = typer.Option(False, "--list-devices", help="List audio devices and exit."),
    input_device: str | None = typer.Option(None, "--input-device", help="Microphone: device index or part of its name."),
    output_device: str | None = speech_io.OutputDeviceOption,
    vad_threshold: float = typer.Option(0.5, "--vad-threshold", help="Speech probability that counts as speech."),
    end_silence: float = typer.Option(0.7, "--end-silence", help="Seconds of silence that end a turn."),
    min_speech: float = typer.Option(0.25, "--min-speech", help="Shorter sounds are not speech (coughs, clicks)."),
    max_turn: float = typer.Option(30.0, "--max-turn", help="A turn longer than this many seconds is cut."),
    max_turns: int | None = typer.Option(None, "--max-turns", help="Stop after answering this many turns."),
    stats: bool = typer.Option(False, "--stats", help="Print latency per turn: end of speech → first token / audio."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object per turn instead of streamed text."),
    system: str | None = typer.Option(None, "--system", help="System prompt (default: the official one)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No header or notes on stderr."),
    chunk_units: int = speech_io.ChunkUnitsOption,
    vocoder: Path | None = speech_io.VocoderOption,
    ctc_aligned: bool = speech_io.CtcAlignedOption,
    model: str = common.ModelOption,
    vision_tower: Path | None = common.VisionTowerOption,
    speech_tower: Path | None = common.SpeechTowerOption,
    device: str = common.DeviceOption,
    dtype: str = common.DtypeOption,
    load_8bit: bool = common.Load8bitOption,
    load_4bit: bool = common.Load4bitOption,
    device_map: str = common.DeviceMapOption,
    max_memory: str | None = common.MaxMemoryOption,
    temperature: float | None = common.TemperatureOption,
    top_p: float | None = common.TopPOption,
    top_k: int | None = common.TopKOption,
    repetition_penalty: float | None = common.RepetitionOption,
    max_new_tokens: int | None = common.MaxNewTokensOption,
    seed: int | None = common.SeedOption,
) -> None:
    """Talk with Lyra: spoken turns in, text and speech out, with barge-in."""
    if list_devices_flag:
        _print_devices()
        return
    if mic and input_file is not None:
        raise UsageError("--mic and --input-file exclude each other", "pick one source")
    if official_audio and input_file is None:
        raise UsageError("--official-audio needs --input-file (the microphone is always captured mono, soxr to 16 kHz)",
                         "add --input-file FILE, or drop --official-audio")  # fmt: skip
    if input_file is not None:  # a mistyped path fails here, before torch is imported
        require_input_file(input_file, "audio")
    vad = _vad_config(vad_threshold, min_speech, end_silence, max_turn)
    request = common.runtime_request(device, dtype, load_8bit, load_4bit, device_map, max_memory)
    sampling_flags = dict(temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
                          max_new_tokens=max_new_tokens, seed=seed)  # fmt: skip
    common.check_sampling_flags(sampling_flags)
    check_speech_out(speech_out, overwrite=overwrite)
    overrides = common.tower_overrides(vision_tower, speech_tower, vocoder)
    # fails here, before weights, without a microphone
    source = _source(input_file, input_device, realtime, official_audio)
    outputs = SpeechOutputs(speak=speak if speak is not None else input_file is None,
                                      device=output_device, speech_out=speech_out, overwrite=overwrite)  # fmt: skip
    listener = None
    try:
        listener = _listener(model, request, sampling_flags, system, outputs, vocoder, chunk_units, ctc_aligned,
                             json_out=json_out, stats=stats, quiet=quiet, realtime=input_file is None or realtime,
                             max_turns=max_turns, overrides=overrides, input_file=input_file)  # fmt: skip
        from lyra_cli.audio.vad import SileroVad, TurnDetector

        listener.run(source, TurnDetector(vad, SileroVad()))
    except KeyboardInterrupt:
        if listener is not None:
            listener.stop()
        raise
    finally:
        source.close()
        outputs.close(wait=listener is not None and not listener.cancelled)


def _vad_config(threshold: float, min_speech: float, end_silence: float, max_turn: float):  # noqa: ANN202
    from lyra_cli.audio.vad import VadConfig

    try:
        return VadConfig(threshold=threshold, min_speech_s=min_speech, end_of_turn_silence_s=end_silence,
                         max_turn_s=max_turn)  # fmt: skip
    except ValueError as exc:
        raise UsageError(f"bad voice-activity setting: {exc}", "see `lyra listen --help` for the ranges") from None


def _source(input_file: Path | None, input_device: str | None, realtime: bool, official_audio: bool):  # noqa: ANN202
    from lyra_cli.audio.frontend import AudioFrontEnd
    from lyra_cli.audio.mic import FileSource, MicSource
    from lyra_cli.audio.playback import pick_device

    if input_file is not None:
        return FileSource(input_file, realtime=realtime, front_end=AudioFrontEnd.choose(official_audio))
    return MicSource(pick_device(input_device, "input"))


def listening_line(input_file: Path | None) -> str:
    """What the session is doing, in the words of its source: nobody is asked to speak into a file."""
    if input_file is None:
        return "listening… speak, pause to let Lyra answer, speak over it to interrupt; Ctrl-C quits"
    return f"reading `{input_file}` as if spoken: each pause ends a turn and Lyra answers it; Ctrl-C quits"


def _print_devices() -> None:
    from lyra_cli.audio.playback import list_devices
    from lyra_cli.console import write_answer

    devices = list_devices()
    if not devices:
        write_answer("no audio devices found (use --input-file and --speech-out)\n")
    for dev in devices:
        marks = ("default in " if dev.is_default_input else "") + ("default out" if dev.is_default_output else "")
        write_answer(f"{dev.index:3d}  {dev.name}  (in {dev.max_input_channels}, out {dev.max_output_channels}, "
                     f"{dev.default_samplerate:.0f} Hz) {marks}\n")  # fmt: skip


def _listener(model: str, request, sampling_flags: dict, system: str | None, outputs, vocoder, chunk_units: int,  # noqa: ANN001
              ctc_aligned: bool, *, json_out: bool, stats: bool, quiet: bool, realtime: bool,
              max_turns: int | None, overrides, input_file: Path | None = None) -> Listener:  # noqa: ANN001  # fmt: skip
    from lyra_cli.console import info, write_answer
    from lyra_cli.engine.model.runtime import resolve_runtime
    from lyra_cli.engine.run.pipeline import Engine
    from lyra_cli.engine.run.prompt import Conversation

    engine = Engine.load(resolve_model(model), resolve_runtime(request), overrides)
    sampling = common.sampling_config(engine.loaded.sampling_defaults, **sampling_flags)
    voice = speech_io.load_voice_for(engine.loaded, vocoder, chunk_units, ctc_aligned) if outputs.enabled else None
    note = (lambda _: None) if quiet else info
    if not quiet:
        for line in common.header_lines(engine.loaded, model):
            info(line)
        info(listening_line(input_file))

    def render_done(job: TurnJob, done: Done) -> None:
        if json_out:
            write_answer(json.dumps(turn_record(job, done), ensure_ascii=False) + "\n")
        else:
            write_answer("\n")
        if stats:
            info(speech_io.latency_line(done).replace("first token", "end of speech → first token"))

    return Listener(engine=engine, sampling=sampling, voice=voice, outputs=outputs,
                    render_text=(lambda _: None) if json_out else write_answer, render_done=render_done, note=note,
                    realtime=realtime, max_turns=max_turns,
                    conversation=Conversation() if system is None else Conversation(system=system))  # fmt: skip


def turn_record(job: TurnJob, done: Done) -> dict:
    timings = {k: round(v, 4) for k, v in done.timings.items()}
    return {"turn": job.number, "user_speech_s": round(job.duration_s, 3), "answer": done.text,
            "adapter": done.adapter, "new_tokens": done.new_tokens, "speech_units": len(done.units),
            "latency": {"end_of_speech_to_first_token_s": timings.get("first_token_s"),
                        "end_of_speech_to_first_audio_s": timings.get("first_audio_s"),
                        "speech_rtf": timings.get("speech_rtf")},
            "timings": timings}  # fmt: skip

"""`lyra chat`: one-shot answers, or a multi-turn REPL on a terminal.

One-shot: the inputs go into one user turn in the order the flags appear on the command line
(`--image a.jpg --speech q.mp3` is the official image-then-speech layout). The answer streams to
stdout. With `--json`, one JSON object per turn is printed instead (answer, timings, token counts).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from lyra_cli.audio.frontend import AudioFrontEnd
from lyra_cli.audio.outputs import SpeechOutputs, check_speech_out
from lyra_cli.commands import common, speech_io
from lyra_cli.engine.model.resolve import resolve_model
from lyra_cli.errors import UsageError
from lyra_cli.inputs import require_input_file

if TYPE_CHECKING:
    from lyra_cli.engine.model.config import ExtractorConfig
    from lyra_cli.engine.model.towers import TowerOverrides
    from lyra_cli.engine.run.events import Done
    from lyra_cli.engine.run.generate import SamplingConfig
    from lyra_cli.engine.run.pipeline import Engine
    from lyra_cli.engine.run.prompt import Conversation
    from lyra_cli.engine.run.voice import Voice

MEDIA_FLAGS = {"--image": "image", "--video": "video", "--speech": "speech", "--text": "text"}
REPL_HELP = ("each line is a question · /image PATH, /video PATH: attach to the next question · /speech PATH: ask it "
             "now · /reset · /exit · Ctrl-C stops an answer")  # fmt: skip
# A second Ctrl-C this soon after one that stopped an answer ends the session (one press: the answer only).
DOUBLE_INTERRUPT_S = 1.0


@dataclass(frozen=True)
class InputItem:
    kind: str  # "image" | "video" | "speech" | "text"
    value: str


def order_inputs(argv: list[str], given: dict[str, list[str]]) -> list[InputItem]:
    """The inputs in command-line order. Typer groups repeated options per flag; argv keeps the order."""
    ordered: list[InputItem] = []
    for i, token in enumerate(argv):
        flag, _, inline = token.partition("=")
        if flag in MEDIA_FLAGS and (inline or i + 1 < len(argv)):
            ordered.append(InputItem(MEDIA_FLAGS[flag], inline or argv[i + 1]))
    expected = [InputItem(k, v) for k, values in given.items() for v in values]
    # fall back to a fixed order (visual, speech, text: the official one) when argv is not ours (tests, wrappers)
    if sorted(ordered, key=repr) != sorted(expected, key=repr):
        rank = {"image": 0, "video": 0, "speech": 1, "text": 2}
        return sorted(expected, key=lambda item: rank[item.kind])
    return ordered


def chat(
    image: list[Path] = typer.Option([], "--image", "-i", help="Image file (repeatable)."),
    video: list[Path] = typer.Option([], "--video", help="Video file: mp4, mov, webm, mkv (repeatable)."),
    speech: list[Path] = typer.Option([], "--speech", "-s", help="Speech audio: wav, flac, ogg, mp3, m4a… (repeatable)."),
    text: list[str] = typer.Option([], "--text", "-t", help="Question or instruction text (repeatable)."),
    system: str | None = typer.Option(None, "--system", help="System prompt (default: the official one)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object per turn instead of streaming text."),
    extract: str | None = typer.Option(
        None, "--extract", help="Latent multi-modality extractor: BLOCKSxRATIO, e.g. 4x0.7 (default: the config's)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No header or progress on stderr."),
    speak: bool = speech_io.SpeakOption,
    speech_out: Path | None = speech_io.SpeechOutOption,
    overwrite: bool = common.OverwriteOption,
    output_device: str | None = speech_io.OutputDeviceOption,
    chunk_units: int = speech_io.ChunkUnitsOption,
    vocoder: Path | None = speech_io.VocoderOption,
    ctc_aligned: bool = speech_io.CtcAlignedOption,
    stats: bool = typer.Option(False, "--stats", help="Print latency per turn (first token, first audio, RTF)."),
    official_audio: bool = common.OfficialAudioOption,
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
    logprobs: int | None = common.LogprobsOption,
) -> None:
    """Ask Lyra about images, video and speech."""
    items = order_inputs(common.ARGV, {"image": [str(p) for p in image], "video": [str(p) for p in video],
                                        "speech": [str(p) for p in speech], "text": text})  # fmt: skip
    for item in items:  # a mistyped path fails here, before torch is imported
        if item.kind != "text":
            require_input_file(item.value, item.kind)
    has_question = any(item.kind in ("text", "speech") for item in items)
    interactive = not has_question and sys.stdin.isatty()
    if not has_question and not interactive:
        piped = sys.stdin.read().strip() if not sys.stdin.isatty() else ""
        if not piped:
            raise UsageError("no question: give --text or --speech, or pipe text on stdin", "e.g. --text 'describe it'")
        items.append(InputItem("text", piped))
    request = common.runtime_request(device, dtype, load_8bit, load_4bit, device_map, max_memory)
    sampling_flags = dict(temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
                          max_new_tokens=max_new_tokens, seed=seed, logprobs=logprobs)  # fmt: skip
    common.check_sampling_flags(sampling_flags)

    from lyra_cli.engine.run.pipeline import read_media

    check_speech_out(speech_out, overwrite=overwrite)
    front_end = AudioFrontEnd.choose(official_audio)
    decoded = [(item, read_media(item.kind, item.value, front_end)) if item.kind != "text" else (item, None)
               for item in items]  # fmt: skip
    model_dir = resolve_model(model)
    overrides = common.tower_overrides(vision_tower, speech_tower, vocoder)
    extractor = common.extractor_for(extract, model_dir)
    outputs = SpeechOutputs(speak=speak, device=output_device, speech_out=speech_out, overwrite=overwrite)  # checks the device
    try:
        engine, sampling = _load(model, model_dir, request, quiet, sampling_flags, overrides)
        common.announce_front_end(front_end, quiet)
        voice = speech_io.load_voice_for(engine.loaded, vocoder, chunk_units, ctc_aligned) if outputs.enabled else None
        turn = TurnSettings(json_out=json_out, extractor=extractor, voice=voice, outputs=outputs, stats=stats,
                            front_end=front_end, quiet=quiet)  # fmt: skip
        conversation = _conversation(system)
        parts = _encode(engine, decoded)
        if interactive:
            run_repl(engine, conversation, sampling, _stdin_lines(), turn, pending=parts)
        else:
            _answer(engine, conversation, parts, sampling, turn)
    finally:
        outputs.close()


def _conversation(system: str | None) -> "Conversation":
    from lyra_cli.engine.run.prompt import Conversation

    return Conversation() if system is None else Conversation(system=system)


def _load(model: str, model_dir: Path, request, quiet: bool,  # noqa: ANN001
          sampling_flags: dict, overrides: "TowerOverrides") -> tuple["Engine", "SamplingConfig"]:  # fmt: skip
    from lyra_cli.console import info
    from lyra_cli.engine.model.runtime import resolve_runtime
    from lyra_cli.engine.run.pipeline import Engine

    runtime = resolve_runtime(request)
    engine = Engine.load(model_dir, runtime, overrides)
    sampling = common.sampling_config(engine.loaded.sampling_defaults, **sampling_flags)
    if not quiet:
        for line in common.header_lines(engine.loaded, model):
            info(line)
        info(f"decoding {'greedy' if sampling.greedy else f'sampling T={sampling.temperature}'}, "
             f"repetition penalty {sampling.repetition_penalty}, at most {sampling.max_new_tokens} new tokens")  # fmt: skip
    return engine, sampling


def _encode(engine: "Engine", decoded: list) -> list:  # noqa: ANN001
    from lyra_cli.engine.run.prompt import TextPart

    return [TextPart(item.value) if media is None else engine.encode(media) for item, media in decoded]


@dataclass
class TurnSettings:
    """How each turn is answered and rendered (the same for every turn of a session)."""

    json_out: bool = False
    extractor: "ExtractorConfig | None" = None
    voice: "Voice | None" = None
    outputs: SpeechOutputs | None = None
    stats: bool = False
    front_end: AudioFrontEnd = AudioFrontEnd()  # how speech files are decoded (`--official-audio`)
    quiet: bool = False


def _answer(engine: "Engine", conversation: "Conversation", parts: list, sampling: "SamplingConfig",
            turn: TurnSettings) -> "Done":  # fmt: skip
    from lyra_cli.console import info, logprob_table, write_answer
    from lyra_cli.engine.run.events import AudioChunk, TextDelta

    outputs = turn.outputs if turn.voice is not None else None
    if outputs is not None:
        outputs.begin_turn()

    def render(event: object) -> None:
        if isinstance(event, TextDelta) and not turn.json_out:
            write_answer(event.text)
        elif isinstance(event, AudioChunk) and outputs is not None:
            outputs.write(event.samples)

    try:  # an interrupted turn leaves the conversation at once (generate closes it)
        done = engine.generate(conversation, parts, sampling, on_event=render, extractor=turn.extractor,
                               voice=turn.voice)  # fmt: skip
    except BaseException:
        if outputs is not None:
            outputs.abort_turn()  # nothing half-written
        raise
    if _extractor_on(turn.extractor) and done.kept_tokens == done.prompt_tokens and not turn.quiet:
        info(common.NOTHING_DROPPED)
    if outputs is not None:
        outputs.end_turn()
    if turn.json_out:
        write_answer(json.dumps(turn_json(done, parts), ensure_ascii=False) + "\n")
    else:
        write_answer("\n")
        if done.logprobs is not None:
            logprob_table(done.logprobs)
    if turn.stats:
        info(speech_io.latency_line(done))
    return done


def _extractor_on(extractor: "ExtractorConfig | None") -> bool:
    return extractor is not None and extractor.enabled


def turn_json(done: "Done", parts: list) -> dict:
    return {
        "answer": done.text,
        "adapter": done.adapter,
        "prompt_tokens": done.prompt_tokens,
        "new_tokens": done.new_tokens,
        "stop_reason": done.stop_reason,
        "timings": {k: round(v, 4) for k, v in done.timings.items()},
        "tokens_per_s": round(done.tokens_per_s, 2),
        "kept_tokens": done.kept_tokens,
        "reused_tokens": done.reused_tokens,
        "speech_units": len(done.units),
        "evidence": done.evidence,
        "inputs": [_describe_part(p) for p in parts],
        **({"logprobs": [lp.to_json() for lp in done.logprobs]} if done.logprobs is not None else {}),
    }


def _describe_part(part) -> dict:  # noqa: ANN001
    from lyra_cli.engine.run.prompt import SpeechPart, TextPart

    if isinstance(part, TextPart):
        return {"kind": "text", "text": part.text}
    if isinstance(part, SpeechPart):
        return {"kind": "speech", "source": part.source, "seconds": round(part.duration_s, 3), "windows": part.n_windows}
    return {"kind": part.kind, "source": part.source, "tokens": int(part.tokens.shape[0])}


def _stdin_lines() -> Iterator[str]:
    from lyra_cli.console import ui

    while True:
        try:
            yield ui.input("[bold]you>[/bold] ")
        except EOFError:
            return


def run_repl(engine: "Engine", conversation: "Conversation", sampling: "SamplingConfig", lines: Iterable[str],
             turn: TurnSettings | None = None, *, pending: list | None = None) -> None:  # fmt: skip
    """The multi-turn loop: media commands queue parts for the next question; /reset clears the history."""
    from lyra_cli.console import error, info, write_answer
    from lyra_cli.engine.run.pipeline import read_media
    from lyra_cli.engine.run.prompt import TextPart
    from lyra_cli.errors import LyraError

    turn = turn or TurnSettings()
    queued = list(pending or [])
    info(REPL_HELP)
    stopped_at = None  # when Ctrl-C last stopped an answer
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        command, _, arg = line.partition(" ")
        try:
            if command in ("/exit", "/quit"):
                return
            if command == "/reset":
                conversation.reset()
                queued.clear()
                info("conversation cleared")
            elif command in ("/image", "/video", "/speech"):
                if not arg.strip():
                    raise UsageError(f"{command} needs a path", f"e.g. {command} examples/extreme_ironing.jpg")
                queued.append(engine.encode(read_media(command[1:], arg.strip(), turn.front_end)))
                if command == "/speech":  # speech is a question by itself (the official image+speech turn)
                    info(f"speech `{arg.strip()}` is the question: answering now")
                    parts, queued = queued, []
                    _answer(engine, conversation, parts, sampling, turn)
                else:
                    info(f"{command[1:]} `{arg.strip()}` added to the next question")
            elif command.startswith("/"):
                raise UsageError(f"unknown command `{command}`", REPL_HELP)
            else:
                parts, queued = [*queued, TextPart(line)], []
                _answer(engine, conversation, parts, sampling, turn)
        except LyraError as exc:  # a bad file or command ends the line, not the session
            error(*exc.render(common.flag_for))
        except KeyboardInterrupt:  # stops this answer; the turn is not in the history (respond drops it)
            now = time.monotonic()
            if stopped_at is not None and now - stopped_at < DOUBLE_INTERRUPT_S:
                raise
            stopped_at = now
            write_answer("\n")
            info("interrupted (the answer is not kept; Ctrl-C at the prompt ends the session)")

"""`lyra longspeech FILE --ask Q`: questions about hours of audio.

The recording is encoded once (streamed, in batches, with an audio-time progress bar) and its speech
tokens cached on disk; every question is then asked about it in its own turn, in the official
long-speech layout `<speech>\\n{question}`. Without `--ask` on a terminal, questions are read at a prompt.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from lyra_cli.commands import common
from lyra_cli.engine.model.resolve import resolve_model
from lyra_cli.errors import InputError, LyraError, UsageError
from lyra_cli.inputs import require_input_file

if TYPE_CHECKING:
    from lyra_cli.engine.model.config import ExtractorConfig

DEFAULT_CHUNK_TOKENS = 8192  # prefill activations are bounded by this many tokens at a time


def parse_duration(text: str) -> float:
    """`90`, `90s`, `45m`, `1:30`, `1:02:03` → seconds."""
    value = text.strip().lower()
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        if re.fullmatch(r"\d+(\.\d+)?[smh]", value):
            seconds = float(value[:-1]) * units[value[-1]]
        elif re.fullmatch(r"\d+(\.\d+)?", value):
            seconds = float(value)
        elif re.fullmatch(r"\d+(:\d{1,2}){1,2}(\.\d+)?", value):
            seconds = 0.0
            for part in value.split(":"):
                seconds = seconds * 60 + float(part)
        else:
            raise ValueError(value)
    except ValueError:
        raise UsageError(f"cannot read the duration `{text}`", "use seconds (`90`), `45m`, `1.5h` or `hh:mm:ss`") from None
    if seconds <= 0:
        raise UsageError(f"--max-audio must be positive, got `{text}`", "e.g. --max-audio 1:00:00")
    return seconds


def longspeech(
    file: Path = typer.Argument(..., help="Recording: wav, flac, ogg, mp3, m4a, or a video's sound track."),
    ask: list[str] = typer.Option([], "--ask", "-a", help="A question about the recording (repeatable)."),
    extract: str | None = typer.Option(
        None, "--extract", help="Latent multi-modality extractor: BLOCKSxRATIO, e.g. 4x0.7 (default: the config's)."
    ),
    show_evidence: bool = typer.Option(
        False, "--show-evidence", help="Print the time ranges the extractor kept at its last block."
    ),
    max_audio: str | None = typer.Option(None, "--max-audio", help="Use only the first part: `45m`, `1:30:00`…"),
    no_cache: bool = typer.Option(False, "--no-cache", help="Neither read nor write the speech-token cache."),
    encode_batch: int = typer.Option(8, "--encode-batch", help="30 s windows per encoder call (memory vs speed)."),
    chunk_tokens: int = typer.Option(DEFAULT_CHUNK_TOKENS, "--chunk-tokens", help="Prefill this many tokens at a time."),
    official_windows: bool = typer.Option(
        False, "--official-windows", help="Add the authors' extra silent window to audio of exactly k·30 s."
    ),
    official_audio: bool = common.OfficialAudioOption,
    system: str | None = typer.Option(None, "--system", help="System prompt (default: the official one)."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object per question instead of streamed text."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No header, progress or evidence on stderr."),
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
    """Ask questions about a long recording (minutes to hours)."""
    require_input_file(file, "audio")  # a mistyped path fails here, before torch is imported
    from lyra_cli.audio.frontend import AudioFrontEnd
    from lyra_cli.engine.model.config import load_config
    from lyra_cli.engine.run.longspeech import LongSpeechSettings, prompt_tokens, windows_for

    if encode_batch < 1 or chunk_tokens < 1:
        raise UsageError("--encode-batch and --chunk-tokens must be ≥ 1", "e.g. --encode-batch 8 --chunk-tokens 8192")
    max_audio_s = parse_duration(max_audio) if max_audio is not None else None
    request = common.runtime_request(device, dtype, load_8bit, load_4bit, device_map, max_memory)
    sampling_flags = dict(temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
                          max_new_tokens=max_new_tokens, seed=seed, logprobs=logprobs)  # fmt: skip
    common.check_sampling_flags(sampling_flags)
    front_end = AudioFrontEnd.choose(official_audio)
    stream = front_end.open_stream(file)  # validates the file before any weights load; only its length is used
    stream.close()
    if not no_cache:
        from lyra_cli.engine.run.speech_cache import default_cache_dir
        from lyra_cli.fileio import CACHE_DIR_ENV
        from lyra_cli.outputs import check_cache_dir

        check_cache_dir(default_cache_dir(), env=CACHE_DIR_ENV, can_do_without="--no-cache")
    model_dir = resolve_model(model)
    overrides = common.tower_overrides(vision_tower, speech_tower)
    config = load_config(model_dir)
    extractor = common.extractor_for(extract, model_dir)
    questions = _questions(ask)
    duration_s = stream.duration_s if max_audio_s is None else min(stream.duration_s or max_audio_s, max_audio_s)
    if duration_s is not None:
        check_length(prompt_tokens(windows_for(duration_s)), config.text.max_position_embeddings, extractor,
                     config.text.num_layers)

    engine, sampling = _load_engine(model, model_dir, request, quiet, sampling_flags, overrides)
    common.announce_front_end(front_end, quiet)
    settings = LongSpeechSettings(front_end=front_end, official_extra_window=official_windows,
                                  max_audio_s=max_audio_s, encode_batch=encode_batch, use_cache=not no_cache)  # fmt: skip
    part = _encode(engine, file, settings, quiet)
    check_length(prompt_tokens(part.n_windows), config.text.max_position_embeddings, extractor, config.text.num_layers)
    label = len(ask) > 1  # several answers on one stdout: each says which question it answers
    for number, question in enumerate(questions, start=1):
        _ask(engine, part, question, sampling, system=system, extractor=extractor, chunk_tokens=chunk_tokens,
             json_out=json_out, quiet=quiet, show_evidence=show_evidence, label=f"Q{number}" if label else None)  # fmt: skip


def check_length(n_tokens: int, max_positions: int, extractor: "ExtractorConfig | None", num_layers: int) -> None:
    """No silent truncation: beyond the trained position range the user decides what to do.

    Every way out the hint names runs as written on this model (`tests/test_newcomer.py` runs them)."""
    if n_tokens <= max_positions or (extractor is not None and extractor.enabled):
        return
    from lyra_cli.engine.run.extractor import suggested_extract
    from lyra_cli.engine.run.longspeech import longest_fitting_s
    from lyra_cli.timefmt import clock

    fits = f"--max-audio {clock(longest_fitting_s(max_positions))} to use only the beginning"
    spec = suggested_extract(num_layers)
    raise LyraError(
        f"this recording needs about {n_tokens:,} prompt tokens, beyond the model's {max_positions:,} positions",
        f"add --extract {spec} (drops unneeded speech tokens while reading), or {fits}" if spec else f"add {fits}",
    )


def _questions(ask: list[str]) -> Iterable[str]:
    if ask:
        return ask
    if not sys.stdin.isatty():
        piped = [line.strip() for line in sys.stdin.read().splitlines() if line.strip()]
        if not piped:
            raise UsageError("no question: give --ask, or pipe questions on stdin (one per line)",
                             "e.g. --ask 'summarize the recording'")  # fmt: skip
        return piped
    return _prompt_questions()


def _prompt_questions() -> Iterator[str]:
    from lyra_cli.console import ui

    while True:
        try:
            line = ui.input("[bold]ask>[/bold] ").strip()
        except EOFError:
            return
        if line in ("/exit", "/quit"):
            return
        if line:
            yield line


def _load_engine(model: str, model_dir: Path, request, quiet: bool, sampling_flags: dict, overrides):  # noqa: ANN001, ANN202
    from lyra_cli.console import info
    from lyra_cli.engine.model.runtime import resolve_runtime
    from lyra_cli.engine.run.pipeline import Engine

    engine = Engine.load(model_dir, resolve_runtime(request), overrides)
    sampling = common.sampling_config(engine.loaded.sampling_defaults, **sampling_flags)
    if not quiet:
        for line in common.header_lines(engine.loaded, model):
            info(line)
    return engine, sampling


def _encode(engine, file: Path, settings, quiet: bool):  # noqa: ANN001, ANN202
    import time

    from lyra_cli.audio.features import TOKENS_PER_WINDOW
    from lyra_cli.console import AudioProgress, info
    from lyra_cli.engine.run.longspeech import RecordingEncoder
    from lyra_cli.engine.run.speech_cache import SpeechTokenCache, default_cache_dir
    from lyra_cli.timefmt import clock

    if engine.model.model.speech_tower is None:
        raise InputError("this model has no speech tower", "use a Lyra checkpoint with `mm_speech_tower`")
    encoder = RecordingEncoder(engine, settings, SpeechTokenCache(default_cache_dir()))
    start = time.perf_counter()
    with AudioProgress("decode + encode", enabled=not quiet) as bar:
        part, cached = encoder.encode(file, on_progress=lambda p: bar.update(p.done, p.total))
    elapsed = time.perf_counter() - start
    if not quiet:
        origin = "from the cache" if cached else f"encoded at {part.duration_s / max(elapsed, 1e-9):.1f}× real time"
        info(f"{clock(part.duration_s)} of audio → {part.n_windows} window(s), {part.n_windows * TOKENS_PER_WINDOW:,} speech tokens, "
             f"{origin} ({elapsed:.1f}s)")  # fmt: skip
    return part


def _ask(engine, part, question: str, sampling, *, system, extractor, chunk_tokens, json_out, quiet,  # noqa: ANN001
         show_evidence, label: str | None = None) -> None:  # fmt: skip
    """One question: `label` (`Q2`) heads the answer on stdout when several questions share it."""
    from lyra_cli.console import PrefillProgress, info, logprob_table, write_answer
    from lyra_cli.engine.run.events import Prefilled, TextDelta
    from lyra_cli.engine.run.prefill import Chunking
    from lyra_cli.engine.run.prompt import Conversation, TextPart

    conversation = Conversation() if system is None else Conversation(system=system)
    prefilled = None
    if label is not None and not json_out:
        write_answer(f"{label}: {question}\n")

    def render(event: object) -> None:
        nonlocal prefilled
        if isinstance(event, Prefilled):
            prefilled = event
            if not quiet:  # before the answer streams, where it belongs in the terminal's order
                info(prefill_line(event, extractor))
        elif isinstance(event, TextDelta) and not json_out:
            write_answer(event.text)

    with PrefillProgress(enabled=not quiet) as bar:
        done = engine.generate(conversation, [part, TextPart(question)], sampling, on_event=render,
                               extractor=extractor, chunking=Chunking(chunk_tokens, bar.update))  # fmt: skip
    if prefilled is None and not quiet:  # no token was generated: the summary still comes
        info(prefill_line(Prefilled(done.prompt_tokens, done.kept_tokens, done.timings.get("prefill_s", 0.0)),
                          extractor))  # fmt: skip
    if json_out:
        record = {"question": question, "answer": done.text, "adapter": done.adapter,
                  "prompt_tokens": done.prompt_tokens, "new_tokens": done.new_tokens, "kept_tokens": done.kept_tokens,
                  "timings": {k: round(v, 4) for k, v in done.timings.items()}, "evidence": done.evidence}  # fmt: skip
        if done.logprobs is not None:
            record["logprobs"] = [lp.to_json() for lp in done.logprobs]
        if label is not None:
            record["label"] = label
        write_answer(json.dumps(record, ensure_ascii=False) + "\n")
    else:
        write_answer("\n")
        if done.logprobs is not None:
            logprob_table(done.logprobs)
    if show_evidence and not json_out:
        info("evidence: " + (done.evidence_text or _no_evidence(extractor)))


def _no_evidence(extractor) -> str:  # noqa: ANN001
    if extractor is not None and extractor.enabled:
        return "the extractor dropped nothing — every second was kept"
    return "the extractor is off (use --extract) — every second was kept"


def prefill_line(prefilled, extractor) -> str:  # noqa: ANN001
    """`prefill 36,035 tokens in 6.8s, 18,035 kept by the extractor` — or why an extractor kept them all."""
    line = f"prefill {prefilled.prompt_tokens:,} tokens in {prefilled.prefill_s:.1f}s"
    if prefilled.kept_tokens != prefilled.prompt_tokens:
        return line + f", {prefilled.kept_tokens:,} kept by the extractor"
    if extractor is not None and extractor.enabled:
        return line + f"; {common.NOTHING_DROPPED}"
    return line

"""`lyra eval`: the paper's benchmarks on the authors' data layout, resumable, shardable and scored.

    lyra eval docvqa-s --data data/Lyra_Eval -m Lyra_Base_9B [--mode speech|text] [--limit N] [--out run.jsonl]
    lyra eval docvqa-s --data data/Lyra_Eval --score-only run.jsonl        # no model: recompute the metrics
    lyra eval merge run.jsonl run.shard-0-of-2.jsonl run.shard-1-of-2.jsonl
    lyra eval needle --haystack talk.mp3 --needle fact.wav --question Q --answer A --lengths 5m,20m --out DIR

Predictions are appended to the `--out` JSONL file item by item, so a killed run resumes where it stopped.
A progress bar, and at the end a summary table, go to stderr; the summary as JSON goes to stdout.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import typer
from typer.core import TyperGroup

from lyra_cli.audio.frontend import AudioFrontEnd
from lyra_cli.commands import common
from lyra_cli.engine.eval.suites import SPEECH_MODE, SUITES, TEXT_MODE
from lyra_cli.engine.model.resolve import resolve_model
from lyra_cli.errors import UsageError
from lyra_cli.fileio import write_atomically

if TYPE_CHECKING:
    from lyra_cli.engine.eval.runner import Shard, Summary
    from lyra_cli.engine.eval.suites import Suite

JUDGE_KEY_ENV = "LYRA_JUDGE_API_KEY"
DEFAULT_OUT_DIR = Path("lyra-eval")
AUTO_SHARD = "auto"
SHARD_WAIT_S = 24 * 3600  # rank 0 waits this long for the other ranks before giving up on the merge
MMVET_EXPORT_SUFFIX = ".mmvet.json"
NEEDLE_JSON, NEEDLE_PNG = "needle.json", "needle.png"
OTHER_COMMANDS = ("merge", "needle")


class EvalGroup(TyperGroup):
    """An unknown suite gets our one-line error listing the valid ones (click's says only "no such command")."""

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        name = args[0] if args else ""
        if name and not name.startswith("-") and name not in self.commands:
            raise UsageError(f"unknown eval suite `{name}`", f"choose one of: {', '.join([*SUITES, *OTHER_COMMANDS])}")
        return super().resolve_command(ctx, args)


eval_app = typer.Typer(
    cls=EvalGroup,
    no_args_is_help=True,
    help="Run the paper's benchmarks (TextVQA^s, DocVQA^s, ChartQA^s, MM-Vet^s, LibriSpeech) and the speech "
    "needle-in-a-haystack test; score or merge prediction files.",
)


@dataclass
class EvalRequest:
    """Everything a suite command was given, validated in `evaluate` before any weights load."""

    suite: str
    data: Path
    mode: str
    limit: int | None
    out: Path | None
    resume: bool
    shard: str | None
    score_only: Path | None
    judge_url: str | None
    judge_model: str | None
    extract: str | None
    quiet: bool
    model: str
    device: str
    dtype: str
    load_8bit: bool
    load_4bit: bool
    sampling_flags: dict[str, Any]
    device_map: str = "none"
    max_memory: str | None = None
    per_item: Path | None = None
    front_end: AudioFrontEnd = AudioFrontEnd()  # `--official-audio`: the authors' channel 0 and sinc resampling
    towers: Any = None  # `TowerOverrides` from --vision-tower / --speech-tower (None: the model's own paths)
    overwrite: bool = False


DataOption = typer.Option(..., "--data", help="The authors' data/Lyra_Eval folder (or the suite's own folder).")
ModeOption = typer.Option(SPEECH_MODE, "--mode", help="speech: the question is spoken (S+I); text: written (T+I).")
LimitOption = typer.Option(None, "--limit", help="Only the first N questions of the data file.")
OutOption = typer.Option(None, "--out", "-o", help="Predictions JSONL (default lyra-eval/SUITE-MODE.jsonl).")
ResumeOption = typer.Option(True, "--resume/--no-resume", help="Continue an existing --out file (default).")
ShardOption = typer.Option(None, "--shard", help="i/n: every n-th question from i; `auto`: RANK of WORLD_SIZE.")
ScoreOnlyOption = typer.Option(None, "--score-only", help="Score this predictions file; load no model.")
PerItemOption = typer.Option(None, "--per-item", help="Also write each scored item's prediction, references and "
                             "scores to this JSONL file.")  # fmt: skip
JudgeUrlOption = typer.Option(None, "--judge-url", help=f"MM-Vet: OpenAI-compatible API root (key: ${JUDGE_KEY_ENV}).")
JudgeModelOption = typer.Option(None, "--judge-model", help="MM-Vet: the judge model, e.g. gpt-4-0613.")
ExtractOption = typer.Option(None, "--extract", help="Latent multi-modality extractor BLOCKSxRATIO, e.g. 4x0.7.")
QuietOption = typer.Option(False, "--quiet", "-q", help="No header, progress or table on stderr.")
EvalTemperatureOption = typer.Option(None, "--temperature", help="Default 0 (greedy), as the eval scripts.")
EvalMaxNewTokensOption = typer.Option(None, "--max-new-tokens", help="Default: the suite's (1024; 128 for ASR).")
EvalLogprobsOption = typer.Option(
    None, "--logprobs", help="Add each prediction's token log-probabilities and N alternatives (0..20) to its record "
    "(`logprobs`, as in `lyra chat --json`), for calibration; scoring ignores them."
)


def _suite_command(name: str) -> Callable[..., None]:
    def command(
        data: Path = DataOption,
        mode: str = ModeOption,
        limit: int | None = LimitOption,
        out: Path | None = OutOption,
        resume: bool = ResumeOption,
        shard: str | None = ShardOption,
        score_only: Path | None = ScoreOnlyOption,
        per_item: Path | None = PerItemOption,
        judge_url: str | None = JudgeUrlOption,
        judge_model: str | None = JudgeModelOption,
        extract: str | None = ExtractOption,
        quiet: bool = QuietOption,
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
        temperature: float | None = EvalTemperatureOption,
        top_p: float | None = common.TopPOption,
        top_k: int | None = common.TopKOption,
        repetition_penalty: float | None = common.RepetitionOption,
        max_new_tokens: int | None = EvalMaxNewTokensOption,
        seed: int | None = common.SeedOption,
        logprobs: int | None = EvalLogprobsOption,
        overwrite: bool = common.OverwriteOption,
    ) -> None:
        flags = dict(temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
                     max_new_tokens=max_new_tokens, seed=seed, logprobs=logprobs)  # fmt: skip
        evaluate(EvalRequest(name, data, mode, limit, out, resume, shard, score_only, judge_url, judge_model, extract,
                             quiet, model, device, dtype, load_8bit, load_4bit, flags, device_map, max_memory,
                             per_item=per_item, front_end=AudioFrontEnd.choose(official_audio),
                             towers=common.tower_overrides(vision_tower, speech_tower), overwrite=overwrite))  # fmt: skip

    return command


for _name, _suite in SUITES.items():
    _what = ("ask its questions by voice (--mode speech, S+I) or in writing (--mode text, T+I) and score the answers"
             if TEXT_MODE in _suite.layouts else "transcribe its recordings and score the word error rate")  # fmt: skip
    eval_app.command(_name, help=f"{_suite.title}: {_what}.")(_suite_command(_name))


# ---------------------------------------------------------------------------------------------------
# A suite


def evaluate(req: EvalRequest) -> None:
    """Validate everything (suite, mode, shard, judge, data) before any weights load, then score or run."""
    from lyra_cli.engine.eval.runner import PER_ITEM_FIELDS, score_predictions
    from lyra_cli.engine.eval.suites import check_mode, get_suite
    from lyra_cli.outputs import check_output_file, is_jsonl_with

    suite = get_suite(req.suite)
    check_mode(suite, req.mode)
    if req.limit is not None and req.limit < 1:
        raise UsageError(f"--limit must be ≥ 1, got `{req.limit}`", "e.g. --limit 100")
    shard, auto = _shard(req.shard)
    judge = _judge(suite, req)
    if req.per_item is not None:  # checked before any weights load or any scoring
        predictions = req.score_only or shard_path_for(req, shard, auto)
        if req.per_item.resolve() == predictions.resolve():
            raise UsageError(f"--per-item `{req.per_item}` is the predictions file", "give the scores another file")
        check_output_file(req.per_item, flag="--per-item", overwrite=req.overwrite, is_ours=is_jsonl_with(*PER_ITEM_FIELDS))
    if req.score_only is not None and suite.primary.kind == "judge":
        _check_outputs(suite, req, req.score_only, predictions_too=False)
    if req.score_only is None:
        _run_and_score(suite, req, shard, auto, judge)
        return
    summary = score_predictions(suite, req.data, req.score_only, limit=req.limit, shard=shard, mode=req.mode,
                                judge=judge, require_scores=True)  # fmt: skip
    _finish(suite, summary, req.score_only, quiet=req.quiet, per_item=req.per_item)


def _run_and_score(suite: "Suite", req: EvalRequest, shard: "Shard", auto: bool, judge: Any) -> None:
    from lyra_cli.engine.eval.runner import check_resumable, read_predictions
    from lyra_cli.engine.eval.suites import load_items, select

    out = shard_path_for(req, shard, auto)
    _check_outputs(suite, req, out)  # first: a bad --out costs nothing
    if auto and shard.count > 1 and shard.index == 0:
        _check_outputs(suite, req, base_out(req))  # rank 0 writes the merged file too
    all_items = load_items(suite, req.data)  # the data is read and checked before any weights load
    if auto:
        _pin_local_gpu()  # before anything touches CUDA
    model_dir, runtime, extractor, sampling = _setup(suite, req)
    settings = run_settings(req, model_dir, runtime, sampling)
    if req.resume:
        check_resumable(read_predictions(out), out, suite, req.mode, settings)
    engine = _load(model_dir, runtime, model=req.model, quiet=req.quiet, towers=req.towers)
    common.announce_front_end(req.front_end, req.quiet)
    items = select(all_items, limit=req.limit, shard=shard.pair)
    summary = _run(engine, suite, items, req, out, shard, sampling, extractor, settings)
    if auto and shard.count > 1 and shard.index == 0:  # rank 0 merges and scores the whole run
        out = _merge_ranks(req, shard, all_items)
    if (auto and shard.count > 1 and shard.index == 0) or judge is not None:
        resumed = summary.resumed
        summary = _score(suite, req, out, shard=None if auto else shard, judge=judge)
        summary.resumed = resumed
    _finish(suite, summary, out, quiet=req.quiet, per_item=req.per_item)


def _check_outputs(suite: "Suite", req: EvalRequest, predictions: Path, *, predictions_too: bool = True) -> None:
    """The predictions file (lyra's own, to continue, or new) and MM-Vet's grader export beside it."""
    from lyra_cli.outputs import check_output_file, is_json_with, is_predictions_file

    if predictions_too:
        check_output_file(predictions, flag="--out", overwrite=req.overwrite, is_ours=is_predictions_file)
    if suite.primary.kind == "judge":
        check_output_file(mmvet_export_path(predictions), flag="the MM-Vet export", overwrite=req.overwrite,
                          is_ours=is_json_with())  # fmt: skip


def _shard(spec: str | None) -> tuple["Shard", bool]:
    from lyra_cli.engine.eval.runner import SINGLE, parse_shard, shard_from_env

    if spec is None:
        return SINGLE, False
    if spec == AUTO_SHARD:
        return shard_from_env(os.environ), True
    return parse_shard(spec), False


def _judge(suite: "Suite", req: EvalRequest) -> Callable[[list[Any]], list[float]] | None:
    """MM-Vet's GPT judge, when asked for; the API key only from the environment (never a flag in shell history)."""
    if req.judge_url is None and req.judge_model is None:
        return None
    if suite.primary.kind != "judge":
        raise UsageError(f"--judge-url is for MM-Vet^s; {suite.title} is scored by `{suite.primary.name}`",
                         "drop --judge-url / --judge-model")  # fmt: skip
    if not req.judge_url or not req.judge_model:
        raise UsageError("the MM-Vet judge needs both --judge-url and --judge-model",
                         "e.g. --judge-url https://api.openai.com/v1 --judge-model gpt-4-0613")  # fmt: skip
    from lyra_cli.engine.eval.mmvet import judge_mmvet

    url, model, key = req.judge_url, req.judge_model, os.environ.get(JUDGE_KEY_ENV, "")
    return lambda records: judge_mmvet(records, base_url=url, api_key=key, model=model)


def _setup(suite: "Suite", req: EvalRequest) -> tuple[Path, Any, Any, Any]:
    """Model folder, runtime, extractor and decoding, all resolved without loading weights."""
    from lyra_cli.engine.model.runtime import resolve_runtime

    request = common.runtime_request(req.device, req.dtype, req.load_8bit, req.load_4bit, req.device_map, req.max_memory)
    common.check_sampling_flags(req.sampling_flags)
    model_dir = resolve_model(req.model)
    extractor = common.extractor_for(req.extract, model_dir)
    sampling = eval_sampling(model_dir, suite.max_new_tokens, req.sampling_flags)
    return model_dir, resolve_runtime(request), extractor, sampling


def eval_sampling(model_dir: Path, max_new_tokens: int, flags: dict[str, Any]) -> Any:
    """The checkpoint's generation_config (its repetition penalty applies, as in the authors' `generate`),
    greedy (`--temperature 0` in every eval script) and the suite's token budget, unless flags say otherwise."""
    from lyra_cli.engine.model.loader import read_generation_config
    from lyra_cli.engine.model.config import sampling_from_generation_config

    defaults = sampling_from_generation_config(read_generation_config(model_dir))
    eval_flags = {"temperature": 0.0, "max_new_tokens": max_new_tokens,
                  **{k: v for k, v in flags.items() if v is not None}}  # fmt: skip
    return common.sampling_config(defaults, **eval_flags)


def run_settings(req: EvalRequest, model_dir: Path, runtime: Any, sampling: Any) -> dict[str, Any]:
    """What must be equal for two runs' predictions to be resumed into, or merged with, each other."""
    return {
        "model": common.TINY if req.model == common.TINY else str(model_dir.resolve()),
        "dtype": runtime.dtype_name, "quantization": runtime.quantization, "extract": req.extract or "config",
        "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
        "repetition_penalty": sampling.repetition_penalty, "max_new_tokens": sampling.max_new_tokens,
        "seed": sampling.seed, **req.front_end.key_settings(),
        **({"logprobs": sampling.logprobs} if sampling.logprobs is not None else {}),
    }  # fmt: skip


def base_out(req: EvalRequest) -> Path:
    return req.out if req.out is not None else DEFAULT_OUT_DIR / f"{req.suite}-{req.mode}.jsonl"


def shard_path_for(req: EvalRequest, shard: "Shard", auto: bool) -> Path:
    """Where this process writes: --out as given, or lyra-eval/SUITE-MODE.jsonl; the shard goes into the name
    under a launcher (`auto`: --out is then the merged file rank 0 writes) and when sharding by hand without
    --out."""
    from lyra_cli.engine.eval.runner import shard_path

    base = base_out(req)
    named_by_us = auto or req.out is None
    return shard_path(base, shard) if named_by_us and shard.count > 1 else base


def _load(model_dir: Path, runtime: Any, *, model: str, quiet: bool, towers: Any = None) -> Any:
    from lyra_cli.console import info
    from lyra_cli.engine.model.towers import TowerOverrides
    from lyra_cli.engine.run.pipeline import Engine

    engine = Engine.load(model_dir, runtime, towers or TowerOverrides())
    # Each question is its own conversation; reusing the previous prompt's cache would save only the
    # system prompt, and would make an answer depend on which question came before it (shards, resumes).
    engine.reuse_prefix = False
    if not quiet:
        for line in common.header_lines(engine.loaded, model):
            info(line)
    return engine


def _pin_local_gpu() -> None:
    """Under torchrun / accelerate every rank sees every GPU: rank k computes on GPU LOCAL_RANK."""
    from lyra_cli.engine.eval.runner import LOCAL_RANK_ENV

    if LOCAL_RANK_ENV not in os.environ:
        return
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() > 1:
        torch.cuda.set_device(int(os.environ[LOCAL_RANK_ENV]) % torch.cuda.device_count())


def _run(engine: Any, suite: "Suite", items: list, req: EvalRequest, out: Path, shard: "Shard",  # noqa: ANN001
         sampling: Any, extractor: Any, settings: dict[str, Any]) -> "Summary":  # fmt: skip
    from lyra_cli.console import info
    from lyra_cli.engine.eval.runner import Answering, Output, run_suite

    if not req.quiet:
        info(f"{suite.title} --mode {req.mode} · {len(items)} question(s)"
             + (f" · shard {shard.label}" if shard.count > 1 else "") + f" · predictions → {out}")  # fmt: skip
    with ItemProgress(suite.title, enabled=not req.quiet) as bar:
        return run_suite(engine, suite, items, Answering(req.mode, sampling, extractor, req.front_end),
                         Output(out, req.resume, shard, settings), on_progress=bar.update)


def _merge_ranks(req: EvalRequest, shard: "Shard", items_all: list) -> Path:  # noqa: ANN001
    """Rank 0 of an `accelerate launch`/torchrun run: wait for every rank's file to be complete, then merge."""
    from lyra_cli.console import info
    from lyra_cli.engine.eval.runner import Shard, merge_predictions, shard_path, wait_for_shards
    from lyra_cli.engine.eval.suites import select

    base = base_out(req)
    expected = {}
    for index in range(shard.count):
        rank = Shard(index, shard.count)
        expected[shard_path(base, rank)] = {item.id for item in select(items_all, limit=req.limit, shard=rank.pair)}
    if not req.quiet:
        info(f"rank 0: waiting for the other {shard.count - 1} rank(s) to finish, then merging into {base}")
    wait_for_shards(expected, timeout_s=SHARD_WAIT_S)
    merge_predictions(list(expected), base)
    return base


def _score(suite: "Suite", req: EvalRequest, out: Path, *, shard: "Shard | None", judge: Any) -> "Summary":
    from lyra_cli.engine.eval.runner import SINGLE, score_predictions

    return score_predictions(suite, req.data, out, limit=req.limit, shard=shard or SINGLE, mode=req.mode, judge=judge)


def _finish(suite: "Suite", summary: "Summary", predictions: Path, *, quiet: bool,
            per_item: Path | None = None) -> None:  # fmt: skip
    """MM-Vet's export for the online grader; the per-item scores; the table on stderr; the JSON on stdout."""
    from lyra_cli.console import write_answer
    from lyra_cli.engine.eval.runner import write_per_item

    record = summary.to_json()
    if suite.primary.kind == "judge":
        record["mmvet_export"] = str(_export_mmvet(predictions))
    if per_item is not None:
        write_per_item(per_item, summary.per_item)
        record["per_item"] = str(per_item)
    if not quiet:
        render_summary(suite, record)
    write_answer(json.dumps(record, ensure_ascii=False) + "\n")


def _export_mmvet(predictions: Path) -> Path:
    from lyra_cli.engine.eval.mmvet import export_mmvet
    from lyra_cli.engine.eval.runner import keyed_predictions, prediction_text, read_predictions

    keyed, _ = keyed_predictions(read_predictions(predictions).records)
    answers = {i: prediction_text(r) or "" for i, r in keyed.items() if "skipped" not in r}
    target = mmvet_export_path(predictions)
    text = json.dumps(export_mmvet(answers), ensure_ascii=False, indent=1) + "\n"
    write_atomically(target, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return target


def mmvet_export_path(predictions: Path) -> Path:
    return predictions.with_name(predictions.stem + MMVET_EXPORT_SUFFIX)


def _png_tag() -> Any:
    """`Software: lyra` in the PNG: how a later run knows it may replace the file."""
    from PIL.PngImagePlugin import PngInfo

    from lyra_cli.outputs import LYRA_SOFTWARE_TAG

    info = PngInfo()
    info.add_text("Software", LYRA_SOFTWARE_TAG)
    return info


def render_summary(suite: "Suite", record: dict[str, Any]) -> None:
    from rich.table import Table

    from lyra_cli.console import ui

    table = Table(title=f"{suite.title} · --mode {record['mode']}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    score = record["score"]
    table.add_row(record["metric"], "—" if score is None else f"{score:.2f}")
    for name, value in record["metrics"].items():
        if name != record["metric"]:
            table.add_row(name, "—" if value is None else f"{value:.2f}")
    table.add_row("answered", str(record["count"]))
    skipped = record["skipped"]
    table.add_row("skipped", ", ".join(f"{reason}: {n}" for reason, n in skipped.items()) if skipped else "0")
    if record["missing"]:
        table.add_row("not answered", str(record["missing"]))
    rate = record["samples_per_s"]
    table.add_row("model time", f"{record['seconds']:.1f}s" + (f" · {rate:.2f} samples/s · "
                  f"{record['tokens_per_s']:.1f} tokens/s" if rate else ""))  # fmt: skip
    if record["paper"]:
        table.add_row("paper", ", ".join(f"{k} {v}" for k, v in record["paper"].items()))
    table.add_row("predictions", record["predictions"])
    if "mmvet_export" in record:
        table.add_row("grader export", record["mmvet_export"])
    if "per_item" in record:
        table.add_row("per-item scores", record["per_item"])
    for note in record["notes"]:
        table.add_row("note", note)
    ui.print(table)


class ItemProgress:
    """Questions done of the total, with ETA and the skip count, on stderr (nothing with --quiet)."""

    def __init__(self, label: str, *, enabled: bool) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        from lyra_cli.console import ui

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[skipped]}"),
                                  console=ui, disable=not enabled)  # fmt: skip
        self._task = self._progress.add_task(label, total=None, skipped="")
        self._skipped = 0

    def __enter__(self) -> "ItemProgress":
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def update(self, done: int, total: int, record: dict[str, Any]) -> None:
        self._skipped += "skipped" in record
        self._progress.update(self._task, completed=done, total=total,
                              skipped=f"skipped {self._skipped}" if self._skipped else "")  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# merge


@eval_app.command("merge", help="Merge shard prediction files into one (each id once, in data order).")
def merge(
    out: Path = typer.Argument(..., help="The merged predictions file to write."),
    shards: list[Path] = typer.Argument(..., help="The shard files, e.g. run.shard-0-of-2.jsonl run.shard-1-of-2.jsonl."),
    overwrite: bool = common.OverwriteOption,
) -> None:
    from lyra_cli.console import write_answer
    from lyra_cli.engine.eval.runner import merge_predictions
    from lyra_cli.outputs import check_output_file, is_predictions_file

    if out in shards:
        raise UsageError(f"`{out}` is both the output and a shard", "write the merge to a new file")
    check_output_file(out, flag="OUT", overwrite=overwrite, is_ours=is_predictions_file)
    report = merge_predictions(shards, out)
    write_answer(json.dumps({"out": str(report.out), "records": report.records, "files": report.files,
                             "duplicates": report.duplicates, "shards": report.shards}) + "\n")  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# needle


def parse_lengths(text: str) -> tuple[float, ...]:
    """`40s,70s`, `1m,5m,1.5h`, `90` (seconds) → seconds."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0, "": 1.0}
    lengths = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", part.lower())
        if match is None or float(match.group(1)) <= 0:
            raise UsageError(f"cannot read the length `{part.strip()}` in --lengths `{text}`",
                             "use positive durations, comma-separated: seconds (`90`), `40s`, `5m`, `1.5h`")  # fmt: skip
        lengths.append(float(match.group(1)) * units[match.group(2)])
    return tuple(lengths)


def parse_depths(text: str) -> tuple[float, ...]:
    """`0,0.5,1` or `0%,50%,100%` → fractions in [0, 1]."""
    depths = []
    for part in text.split(","):
        value = part.strip()
        try:
            depth = float(value[:-1]) / 100 if value.endswith("%") else float(value)
        except ValueError:
            depth = -1.0
        if not 0 <= depth <= 1:
            raise UsageError(f"cannot read the depth `{value}` in --depths `{text}`",
                             "use fractions 0..1 or percentages, e.g. --depths 0,0.5,1")  # fmt: skip
        depths.append(depth)
    return tuple(depths)


@eval_app.command("needle", help="Speech needle in a haystack: a spoken fact at chosen depths of long recordings.")
def needle(
    haystack: list[Path] = typer.Option(..., "--haystack", help="Recording(s) tiled to each length (repeatable)."),
    needle_file: Path = typer.Option(..., "--needle", help="The spoken fact to hide in the haystack."),
    question: str = typer.Option(..., "--question", help="What to ask about the fact."),
    answer: list[str] = typer.Option(..., "--answer", help="An expected answer (repeatable: any counts)."),
    lengths: str = typer.Option("1m,5m", "--lengths", help="Recording lengths, e.g. 1m,5m,20m."),
    depths: str = typer.Option("0,0.5,1", "--depths", help="Where the needle goes: fractions or percentages."),
    out: Path = typer.Option(Path("lyra-eval/needle"), "--out", "-o", help="Folder for needle.json and needle.png."),
    extract: str | None = ExtractOption,
    quiet: bool = QuietOption,
    model: str = common.ModelOption,
    vision_tower: Path | None = common.VisionTowerOption,
    speech_tower: Path | None = common.SpeechTowerOption,
    device: str = common.DeviceOption,
    dtype: str = common.DtypeOption,
    load_8bit: bool = common.Load8bitOption,
    load_4bit: bool = common.Load4bitOption,
    device_map: str = common.DeviceMapOption,
    max_memory: str | None = common.MaxMemoryOption,
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", help="Default 64: the answer is a short fact."),
    overwrite: bool = common.OverwriteOption,
) -> None:
    from lyra_cli.audio.io import load_audio, require_speech
    from lyra_cli.engine.eval.needle import NEEDLE_MAX_NEW_TOKENS, NeedleSpec
    from lyra_cli.engine.model.runtime import resolve_runtime

    spec = NeedleSpec(question, tuple(answer), parse_lengths(lengths), parse_depths(depths))
    request = common.runtime_request(device, dtype, load_8bit, load_4bit, device_map, max_memory)
    flags = {"max_new_tokens": NEEDLE_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens}
    common.check_sampling_flags(flags)
    _check_needle_out(out, overwrite)
    hay = [load_audio(path) for path in haystack]  # decoded and checked before any weights load
    fact = load_audio(needle_file)
    require_speech(fact, needle_file)
    _check_needle_fits(spec, fact)
    model_dir = resolve_model(model)
    towers = common.tower_overrides(vision_tower, speech_tower)
    extractor = common.extractor_for(extract, model_dir)
    _check_positions(model_dir, spec, extractor)
    runtime = resolve_runtime(request)
    sampling = eval_sampling(model_dir, NEEDLE_MAX_NEW_TOKENS, flags)
    engine = _load(model_dir, runtime, model=model, quiet=quiet, towers=towers)
    grid = _run_needle(engine, hay, fact, spec, sampling, extractor, extract, quiet)
    context = {"model": common.TINY if model == common.TINY else str(model_dir), "haystack": [str(p) for p in haystack],
               "needle": str(needle_file)}  # fmt: skip
    name = common.TINY if model == common.TINY else model_dir.name
    _write_needle(grid, out, context, title=f"Speech needle in a haystack · {name} · extractor {extract or 'off'}",
                  quiet=quiet)  # fmt: skip


def _check_needle_out(out: Path, overwrite: bool) -> None:
    from lyra_cli.outputs import check_output_dir, check_output_file, is_json_with, is_lyra_png

    check_output_dir(out, flag="--out")
    check_output_file(out / NEEDLE_JSON, flag="--out", overwrite=overwrite, is_ours=is_json_with("lengths_s", "scores"))
    check_output_file(out / NEEDLE_PNG, flag="--out", overwrite=overwrite, is_ours=is_lyra_png)


def _check_needle_fits(spec: Any, fact: Any) -> None:
    from lyra_cli.audio.io import SAMPLE_RATE_HZ
    from lyra_cli.engine.eval.needle import padded_needle

    needle_s = padded_needle(fact).size / SAMPLE_RATE_HZ
    too_short = [length for length in spec.lengths_s if length < needle_s]
    if too_short:
        raise UsageError(f"--lengths {', '.join(f'{x:g}s' for x in too_short)} cannot hold the {needle_s:.1f} s needle",
                         "give lengths longer than the needle (with its 0.5 s pauses)")  # fmt: skip


def _check_positions(model_dir: Path, spec: Any, extractor: Any) -> None:
    """No silent truncation: the longest recording must fit the model's positions, or the extractor be on."""
    from lyra_cli.engine.model.config import load_config
    from lyra_cli.engine.run.longspeech import prompt_tokens, windows_for

    max_positions = load_config(model_dir).text.max_position_embeddings
    longest = max(spec.lengths_s)
    if prompt_tokens(windows_for(longest)) > max_positions and not (extractor is not None and extractor.enabled):
        raise UsageError(f"a {longest / 60:.0f}-minute recording needs more than the model's {max_positions:,} "
                         "positions", "add --extract 4x0.7, or give shorter --lengths")  # fmt: skip


def _run_needle(engine: Any, hay: list, fact: Any, spec: Any, sampling: Any, extractor: Any,  # noqa: ANN001
                extract: str | None, quiet: bool) -> Any:  # fmt: skip
    from lyra_cli.engine.eval.needle import run_needle

    with ItemProgress("needle", enabled=not quiet) as bar:
        return run_needle(engine, hay, fact, spec, sampling=sampling, extractor=extractor, extract_label=extract,
                          on_cell=lambda done, total, cell: bar.update(done, total, {}))  # fmt: skip


def _write_needle(grid: Any, out: Path, context: dict[str, Any], *, title: str, quiet: bool) -> None:
    from lyra_cli.console import info, write_answer
    from lyra_cli.engine.eval.needle import draw_heatmap

    out.mkdir(parents=True, exist_ok=True)
    record = grid.to_json(**context)
    json_path, png_path = out / NEEDLE_JSON, out / NEEDLE_PNG
    write_atomically(json_path, lambda tmp: tmp.write_text(json.dumps(record, ensure_ascii=False, indent=1) + "\n"))
    write_atomically(png_path, lambda tmp: draw_heatmap(grid, title).save(tmp, format="PNG", pnginfo=_png_tag()))
    if not quiet:
        mean = record["mean_score"]
        info(f"needle found in {sum(c.score for c in grid.cells):g} of {len(grid.cells)} recordings (mean {mean:.2f})"
             f" · {json_path} · {png_path}")  # fmt: skip
    write_answer(json.dumps({**{k: record[k] for k in ("lengths_s", "depths", "scores", "kept_tokens", "seconds",
                                                         "mean_score", "extract")},
                             "json": str(json_path), "png": str(png_path)}) + "\n")  # fmt: skip


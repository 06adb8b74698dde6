"""`lyra train stage1|stage2|stage3|stage4`: the paper's four training stages, single process.

Reads the official JSON records, trains exactly the stage's parameters (projector / speech LoRA + projector
with LCMR / long-speech LoRA + projector / speech generator), checkpoints atomically every `--save-every`
steps (resumable exactly), and writes the result in the release layout, so `lyra chat --model` loads it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import typer

from lyra_cli.commands import common
from lyra_cli.engine.model.resolve import resolve_model
from lyra_cli.errors import UsageError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # as engine.train.loop.PRECISIONS, without importing torch for --help

CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
# What a stage leaves in --out besides checkpoints and metrics (engine.train.export; no torch import here).
RESULT_NAMES = ("mm_speech_projector.bin", "speech_lora", "long_speech_lora", "speech_generator.safetensors")


train_app = typer.Typer(
    help="Train one of the paper's four stages (output in the release layout), or merge a trained adapter "
    "into a full model folder.",
    no_args_is_help=True,
)

STAGE_HELP = {
    "stage1": "Stage 1: the speech projector on ASR data, on the plain LLM (no LoRA). Writes mm_speech_projector.bin.",
    "stage2": "Stage 2: the speech LoRA (r64/α16) and the projector, with the latent cross-modality regularizer. "
              "Writes speech_lora/.",
    "stage3": "Stage 3: the long-speech LoRA (r128/α256) and the projector, on recordings over 30 s. "
              "Writes long_speech_lora/.",
    "stage4": "Stage 4: the speech generator (CTC on tgt_unit), LLM frozen with the speech adapter on, as the "
              "authors' merged stage-2 model. Writes speech_generator.safetensors.",
}  # fmt: skip


def train_stage(
    ctx: typer.Context,
    data: Path = typer.Option(..., "--data", help="Training records: the official JSON list (or JSONL)."),
    out: Path = typer.Option(..., "--out", help="Output folder: checkpoints, metrics.jsonl and the result."),
    image_folder: Path | None = typer.Option(None, "--image-folder", help="Root of `image` paths (default: beside --data)."),
    speech_folder: Path | None = typer.Option(None, "--speech-folder", help="Root of speech paths (default: beside --data)."),
    config: Path | None = typer.Option(None, "--config", help="JSON/YAML file of stage settings (flags win)."),
    settings: list[str] = typer.Option([], "--set", metavar="KEY=VALUE",
                                       help="Any stage setting, e.g. --set lora_r=32 --set lcmr_weight=0.3 "
                                            "(repeatable; `--dry-run` lists them all)."),
    deepspeed: Path | None = typer.Option(
        None, "--deepspeed", envvar="ACCELERATE_DEEPSPEED_CONFIG_FILE",
        help="A DeepSpeed config (e.g. the authors' zero3.json): its batch size, accumulation, clipping and bf16 "
             "apply; training stays plain data parallel (ZeRO partitioning is not performed)."),
    steps: int | None = typer.Option(None, "--steps", help="Optimizer steps (default: the stage's epochs over the data)."),
    lr: float | None = typer.Option(None, "--lr", help="Peak learning rate (default: the stage's)."),
    batch_size: int | None = typer.Option(None, "--batch-size",
                                          help="Records per micro-batch on each process (default: the stage's)."),
    grad_accum: int | None = typer.Option(None, "--grad-accum", help="Micro-batches per optimizer step."),
    save_every: int = typer.Option(100, "--save-every", help="Checkpoint every N steps (and at the end)."),
    keep_last: int = typer.Option(3, "--keep-last", help="Checkpoints kept."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from the last checkpoint in --out."),
    strict: bool = typer.Option(False, "--strict", help="Fail on the first bad record instead of skipping it."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved settings and trainable parameters; train nothing."),
    extract: str | None = typer.Option(None, "--extract", metavar="BLOCKSxRATIO",
                                       help="Train with the latent multi-modality extractor, e.g. 4x0.7: drop "
                                            "multimodal tokens block by block (faster steps; off by default)."),
    precision: str = typer.Option("auto", "--precision", metavar="auto|fp32|bf16|fp16",
                                  help="Autocast of the forward passes. auto: bf16 (else fp16 with loss scaling) "
                                       "on CUDA, as the stages' bf16 setting asks; none on CPU. Trained weights "
                                       "are fp32 whatever --dtype."),
    seed: int = typer.Option(0, "--seed", help="Seed of the data order and of new LoRA weights."),
    tensorboard: bool | None = typer.Option(None, "--tensorboard/--no-tensorboard",
                                            help="Also log to OUT/tensorboard (default: when tensorboard is installed)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress on stderr."),
    model: str = common.ModelOption,
    vision_tower: Path | None = common.VisionTowerOption,
    speech_tower: Path | None = common.SpeechTowerOption,
    device: str = common.DeviceOption,
    dtype: str = common.DtypeOption,
    load_8bit: bool = common.Load8bitOption,
    load_4bit: bool = typer.Option(False, "--load-4bit",
                                   help="QLoRA: the frozen decoder in 4-bit NF4 (bitsandbytes), LoRA on top in full precision."),
    overwrite: bool = common.OverwriteOption,
) -> None:
    """Train one of Lyra's four stages (the subcommand's name) and write its result in the release layout."""
    from lyra_cli.engine.train.stages import resolve_stage, stage_from_file

    stage_name = str(ctx.info_name)
    from lyra_cli.engine.train.stages import deepspeed_overrides

    from_deepspeed, zero_stage = deepspeed_overrides(deepspeed) if deepspeed else ({}, None)
    flags = {"learning_rate": lr, "per_device_batch_size": batch_size, "grad_accumulation": grad_accum,
             "extract": extract}
    overrides = {**from_deepspeed, **_key_values(settings), **{k: v for k, v in flags.items() if v is not None}}
    stage = stage_from_file(config, stage_name, overrides) if config else resolve_stage(stage_name, overrides)
    if precision not in PRECISIONS:
        raise UsageError(f"unknown --precision `{precision}`", f"choose one of: {', '.join(PRECISIONS)}")
    if steps is not None and steps < 1 or save_every < 1:
        raise UsageError("--steps and --save-every must be ≥ 1", "e.g. --steps 1000 --save-every 100")
    if not dry_run:
        check_train_paths(data, out, overwrite=overwrite)
    from lyra_cli.engine.model.runtime import resolve_runtime
    from lyra_cli.engine.train.distributed import Distributed
    from lyra_cli.engine.train.loop import resolve_precision

    towers = common.tower_overrides(vision_tower, speech_tower)
    runtime = resolve_runtime(common.runtime_request(device, dtype, load_8bit, load_4bit))
    ranks = Distributed.from_env()  # one process, or one of `torchrun` / `accelerate launch`'s
    ranks.start(runtime.device.type)
    if zero_stage is not None and ranks.is_main and not quiet:
        from lyra_cli.console import info

        info(f"DeepSpeed config `{deepspeed}` read (ZeRO-{zero_stage}): its batch, accumulation, clipping and bf16 "
             "settings apply; training runs plain data parallel")  # fmt: skip
    try:
        _check_extract(stage, model)  # a usage error before the data or any weights are read
        records, problems = _records(data, image_folder, speech_folder, strict, stage, report=ranks.is_main)
        engine, generator, plan = _prepare(model, runtime, stage, seed, ranks, towers)
        if dry_run:
            if ranks.is_main:
                autocast = resolve_precision(precision, stage, runtime.device)
                _print(json.dumps({"stage": _settings(stage), "trainable_parameters": plan.count,
                                   "trainable_tensors": len(plan.names),
                                   "data": {"file": str(data), "usable_records": len(records),
                                            "skipped": dict(sorted(problems.counts.items()))},
                                   "precision": {"requested": precision, "device": str(runtime.device),
                                                 "compute": _compute(autocast, runtime.dtype)}}, indent=2))  # fmt: skip
        else:
            _run(engine, generator, plan, records, out=out, steps=steps, save_every=save_every,
                 keep_last=keep_last, resume=resume, seed=seed, quiet=quiet or not ranks.is_main,
                 precision=precision, ranks=ranks, tensorboard=tensorboard, strict=strict)  # fmt: skip
    except BaseException:
        ranks.stop(clean=False)
        raise
    ranks.stop()


def check_train_paths(data: Path, out: Path, *, overwrite: bool) -> None:
    """Before the model loads: the data file is a file, and --out a folder where lyra may write its run.

    Files lyra writes there (metrics.jsonl, the stage's result) may be replaced only in a folder that is a
    lyra run already (its metrics.jsonl, or its checkpoints/), or with --overwrite."""
    from lyra_cli.errors import InputError
    from lyra_cli.outputs import OVERWRITE_FLAG, OutputError, check_files_in, check_output_dir, is_jsonl_with

    if data.is_dir():
        raise InputError(f"--data `{data}` is a folder", "give the official JSON file itself, e.g. --data train.json")
    if not data.is_file():
        raise InputError(f"training data `{data}` does not exist", "give the official JSON file with --data")
    for folder in (out, out / CHECKPOINT_DIR, out / TENSORBOARD_DIR):
        check_output_dir(folder, flag="--out")
    check_files_in(out, [METRICS_FILE], flag="--out", overwrite=overwrite, is_ours=is_jsonl_with("step", "loss"))
    ours = (out / METRICS_FILE).is_file() or (out / CHECKPOINT_DIR).is_dir()
    clashes = [name for name in RESULT_NAMES if (out / name).exists()]
    if clashes and not ours and not overwrite:
        raise OutputError(f"--out `{out}` already holds `{clashes[0]}`, which this run did not write",
                          f"give a new folder, or add {OVERWRITE_FLAG} to replace it")  # fmt: skip


def _key_values(pairs: list[str]) -> dict[str, str]:
    values = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set `{pair}` is not KEY=VALUE", "e.g. --set warmup_ratio=0.1")
        values[key.strip()] = value.strip()
    return values


def _settings(stage: Any) -> dict:
    from dataclasses import asdict

    from lyra_cli.engine.train.stages import REFERENCE_ONLY

    settings = {k: (v.value if hasattr(v, "value") else v) for k, v in asdict(stage).items()}
    settings["reference_only"] = sorted(REFERENCE_ONLY)  # shown for comparison with the authors' runs
    return settings


def _print(text: str) -> None:
    from lyra_cli.console import write_answer

    write_answer(text + "\n")


def _prepare(model: str, runtime: Any, stage: Any, seed: int, ranks: Any, towers: Any) -> tuple[Any, Any, Any]:
    import torch

    from lyra_cli.engine.model.speech_generator import load_speech_generator
    from lyra_cli.engine.run.pipeline import Engine
    from lyra_cli.engine.train.stages import Trains, prepare_for_stage

    engine = Engine.load(resolve_model(model), runtime, towers)
    loaded = engine.loaded
    generator = None
    if stage.trains is Trains.SPEECH_GENERATOR:
        generator = load_speech_generator(loaded.model_dir, loaded.config, device=loaded.runtime.device,
                                          dtype=loaded.runtime.dtype)  # fmt: skip
    torch.manual_seed(seed)  # new LoRA weights are drawn from the global generator: the same on every rank
    plan = prepare_for_stage(engine.model, stage, generator, loaded.adapters)
    torch.manual_seed(seed + ranks.rank)  # each rank its own dropout draws (rank 0: as a single process)
    return engine, generator, plan


def _records(data: Path, image_folder: Path | None, speech_folder: Path | None, strict: bool, stage: Any, *,
             report: bool) -> tuple[list, Any]:  # fmt: skip
    """The usable records for `stage` and the skipped ones by reason, reported once; before any weights load."""
    from lyra_cli.console import info
    from lyra_cli.engine.model.adapters import Adapter
    from lyra_cli.engine.train.data import keep_with_units, parse_records, short_speech_count
    from lyra_cli.engine.train.stages import Trains
    from lyra_cli.errors import InputError

    if not data.is_file():
        raise InputError(f"training data `{data}` does not exist", "give the official JSON file with --data")
    root = data.parent
    records, problems = parse_records(data, image_folder=image_folder or root, speech_folder=speech_folder or root,
                                      strict=strict)  # fmt: skip
    if stage.trains is Trains.SPEECH_GENERATOR:
        records = keep_with_units(records, problems, strict=strict, path=data)
    if not records:
        raise InputError(f"`{data}` has no record {stage.name} can use (skipped: {problems.summary()})",
                         "check the paths against --image-folder/--speech-folder, or `lyra train "
                         f"{stage.name} --help` for the records it needs")  # fmt: skip
    if report:
        info(f"{len(records)} usable records; skipped: {problems.summary()}")
        short = short_speech_count(records) if stage.adapter is Adapter.LONG_SPEECH else 0
        if short:
            info(f"{short} of {len(records)} records have no `long_speech` recording: {stage.name} trains the "
                 "long-speech adapter, which is chosen only for clips over 30 s (the authors' stage-3 data is all "
                 "long speech)")  # fmt: skip
    return records, problems


def _check_extract(stage: Any, model: str) -> None:
    """`--extract` against the model's depth, read from its config (no weights)."""
    if stage.extract:
        from lyra_cli.engine.model.config import load_config
        from lyra_cli.engine.run.extractor import parse_extract

        parse_extract(stage.extract, load_config(resolve_model(model)).text.num_layers)


def _compute(autocast: Any, dtype: Any) -> str:
    """What the forward passes compute in: `autocast bfloat16`, or `float32 weights` (no autocast)."""
    return f"autocast {_dtype_name(autocast)}" if autocast else f"{_dtype_name(dtype)} weights"


def _run(engine: Any, generator: Any, plan: Any, records: list, *, out: Path, steps: int | None, save_every: int,
         keep_last: int, resume: bool, seed: int, quiet: bool, precision: str, ranks: Any,
         tensorboard: bool | None, strict: bool) -> None:  # fmt: skip
    from lyra_cli.console import info
    from lyra_cli.engine.train.data import TrainDataset, build_example, engine_media_encoder
    from lyra_cli.engine.train.loop import Trainer, TrainerSettings, resolve_precision, tensorboard_available
    from lyra_cli.errors import MissingDependencyError

    stage = plan.stage
    encode = engine_media_encoder(engine)
    dataset = TrainDataset(records, lambda r: build_example(r, engine.loaded.tokenizer, encode), seed=seed)
    per_step = stage.per_device_batch_size * stage.grad_accumulation * ranks.world_size
    total = steps or max(1, math.ceil(stage.epochs * len(records) / per_step))
    out.mkdir(parents=True, exist_ok=True)
    runtime = engine.loaded.runtime
    autocast = resolve_precision(precision, stage, runtime.device)
    if tensorboard and not tensorboard_available():
        raise MissingDependencyError("tensorboard", "--tensorboard", extra="train")
    use_tensorboard = tensorboard_available() if tensorboard is None else tensorboard
    settings = TrainerSettings(precision=autocast, distributed=ranks, strict=strict, log_path=out / METRICS_FILE,
                               tensorboard_dir=out / TENSORBOARD_DIR if use_tensorboard else None,
                               keep_last=keep_last)  # fmt: skip
    trainer = Trainer(engine.model, plan, dataset, total_steps=total, generator=generator, settings=settings)
    last = trainer.resume_latest(out / CHECKPOINT_DIR) if resume else None
    if last is not None:
        if ranks.is_main:
            info(f"resumed from `{last}` at step {trainer.step_count}")
    if not quiet:
        compute = _compute(autocast, runtime.dtype)
        extract = f", extractor {stage.extract}" if stage.extract else ""
        processes = f", {ranks.world_size} processes" if ranks.enabled else ""
        info(f"{stage.name}: {plan.count:,} trainable parameters, {total} steps, lr {stage.learning_rate}, "
             f"{compute} on {runtime.device}{processes}{extract}")
    try:
        _loop(trainer, total, out, save_every, quiet)
    finally:
        trainer.close()
    if trainer.too_long and ranks.is_main:
        info(f"{len(trainer.too_long)} record(s) skipped: longer than max_length {stage.max_length} "
             "(raise it with --set max_length=N)")
    if ranks.is_main:
        _export(engine, generator, stage, out)


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _loop(trainer: Any, total: int, out: Path, save_every: int, quiet: bool) -> None:
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from lyra_cli.console import ui

    columns = (TextColumn("step {task.completed}/{task.total}"), BarColumn(), TextColumn("{task.fields[stats]}"),
               TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, console=ui, disable=quiet) as bar:
        task = bar.add_task("train", total=total, completed=trainer.step_count, stats="")
        while trainer.step_count < total:
            record = trainer.step()
            stats = f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {record['tokens_per_s']:.0f} tok/s"
            bar.update(task, completed=trainer.step_count, stats=stats)
            if trainer.step_count % save_every == 0 or trainer.step_count == total:
                trainer.save_checkpoint(out / CHECKPOINT_DIR)


def _export(engine: Any, generator: Any, stage: Any, out: Path) -> None:
    from lyra_cli.console import info
    from lyra_cli.engine.train.export import export_adapter, export_projector, export_speech_generator
    from lyra_cli.engine.train.stages import Trains

    if stage.trains is Trains.PROJECTOR:
        path = export_projector(engine.model, out)
    elif stage.trains is Trains.SPEECH_GENERATOR:
        path = export_speech_generator(generator, out)
    else:
        path = export_adapter(engine.model, stage, out, base_model=str(engine.loaded.model_dir))
    info(f"wrote `{path}` (place it in a release folder for `lyra chat --model`)")


for _name, _help in STAGE_HELP.items():
    train_app.command(_name, help=_help)(train_stage)


@train_app.command(
    "merge",
    help="Merge a LoRA adapter and its speech projector into a full model folder without adapter folders (the "
    "authors' stage-4 starting point). Streams shard by shard; an interrupted merge leaves nothing behind.",
)
def merge(
    out: Path = typer.Option(..., "--out", help="New folder for the merged model (must not exist or be empty)."),
    adapter: str = typer.Option("speech", "--adapter", metavar="speech|long_speech", help="The adapter to merge."),
    adapter_folder: Path | None = typer.Option(
        None, "--adapter-folder",
        help="A trained adapter folder (e.g. OUT/speech_lora of `lyra train stage2`) instead of the model's own."),
    save_dtype: str | None = typer.Option(None, "--save-dtype", metavar="bf16|fp16|fp32",
                                          help="Store the weights in this dtype (default: as the model stores them)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress on stderr."),
    model: str = common.ModelOption,
) -> None:
    """`lyra train merge`: see the help above."""
    from lyra_cli.console import info
    from lyra_cli.engine.model.adapters import ADAPTER_NAMES, Adapter
    from lyra_cli.engine.train.merge import SAVE_DTYPES, merge_adapter
    from lyra_cli.outputs import check_output_dir

    if adapter not in ADAPTER_NAMES:
        raise UsageError(f"unknown adapter `{adapter}`", f"choose one of: {', '.join(sorted(ADAPTER_NAMES))}")
    if save_dtype is not None and save_dtype not in SAVE_DTYPES:
        raise UsageError(f"unknown --save-dtype `{save_dtype}`", f"choose one of: {', '.join(SAVE_DTYPES)}")
    model_dir = resolve_model(model)
    check_output_dir(out, flag="--out", size_bytes=_folder_bytes(model_dir))  # the merge is about its base's size
    progress = None if quiet else (lambda done, total: info(f"merged shard {done}/{total}"))
    report = merge_adapter(model_dir, Adapter(adapter), out, adapter_dir=adapter_folder,
                           save_dtype=save_dtype, on_progress=progress)  # fmt: skip
    dropped = f"; left out: {', '.join(report.dropped)}" if report.dropped else ""
    info(f"wrote `{report.out}`: {report.merged_layers} weight matrices merged, "
         f"{report.projector_tensors} projector tensors replaced{dropped}")  # fmt: skip


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())

"""The training loop: one example's loss per stage (docs/authors-behaviour.md#training-stages), and a single-process
`Trainer` with AdamW, warm-up + cosine schedule, gradient accumulation, JSONL logging and atomic,
exactly-resumable checkpoints.

    terms = train_step_terms(model, example, stage, project=trainable_projection(projector))
    loss, parts = combine(terms, stage), terms.parts()
    trainer = Trainer(model, plan, dataset, total_steps=100, generator=generator,
                      settings=TrainerSettings(log_path=out / "log.jsonl"))
    trainer.step()                       # one optimizer step (grad_accumulation examples)
    trainer.save_checkpoint(out / "checkpoints")
    trainer.load_checkpoint(latest_checkpoint(out / "checkpoints"))

A checkpoint folder `step-00000012/` holds `trainable.safetensors` (the plan's tensors by name),
`optimizer.pt` (optimizer + scheduler state dicts), `rng.pt` (torch, python `random`, numpy states) and
`trainer_state.json` (step, data position). The `.pt` files hold tensors and plain containers only, so
they load with `torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from lyra_cli.engine.model.config import ExtractorConfig
from lyra_cli.engine.model.network import N_ROPE_AXES
from lyra_cli.engine.run.extractor import context_mask, query_mask
from lyra_cli.engine.run.prompt import PromptInputs, SpeechPart
from lyra_cli.engine.train.data import IGNORE_INDEX, TrainDataset, TrainExample
from lyra_cli.engine.train.distributed import Distributed
from lyra_cli.engine.train.extractor_forward import ExtractedForward, forward_extracting
from lyra_cli.engine.train.lcmr import lcmr_loss
from lyra_cli.engine.train.stages import StageConfig, TrainablePlan, Trains, stage_extractor
from lyra_cli.errors import CheckpointError, InputError, UsageError, setting
from lyra_cli.fileio import write_atomically

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step-"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
STATE_FILE = "trainer_state.json"
LOSS_PARTS = ("ce", "lcmr", "ctc", "kept_tokens")  # what LossTerms.parts() may report besides the loss
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # also in commands/train.py, which must not import torch
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

Projection = Callable[[SpeechPart], Tensor]


# ---------------------------------------------------------------------------------------------- the loss


def trainable_projection(projector: nn.Module) -> Projection:
    """SpeechPart → (N·300, H) tokens through `projector`, with autograd (no inference_mode).

    A long recording keeps projected tokens only (no frames): those are returned as stored, so the
    projector gets no gradient from them."""

    def project(part: SpeechPart) -> Tensor:
        if part.frames is None:
            if part.tokens is None:
                raise InputError(f"`{part.source}` has neither frames nor tokens", "check the record's media file")
            return part.tokens.clone()
        weight = next(projector.parameters())
        frames = part.frames.to(device=weight.device, dtype=weight.dtype).clone()  # not an inference tensor
        return projector(frames).flatten(0, 1)

    return project


def _shifted_ce(model: nn.Module, hidden: Tensor, labels: Tensor, kept_index: Tensor) -> Tensor:
    """Mean next-token cross-entropy over the supervised positions.

    hidden (T', H) final states of the tokens at prompt indices kept_index (T',) (all T of them without
    the extractor), labels (T,). Row j predicts labels[kept_index[j] + 1] when that token is row j + 1 too;
    only those rows go through lm_head, so a long prompt never builds (T, vocab) logits."""
    labels = labels.to(hidden.device)
    kept_index = kept_index.to(hidden.device)
    follows = kept_index[1:] == kept_index[:-1] + 1  # (T'-1,) the next token survived every drop
    targets = labels[kept_index[1:]]
    rows = follows & (targets != IGNORE_INDEX)
    if not bool(rows.any()):
        return hidden.sum() * 0.0  # nothing supervised: a zero that still belongs to the graph
    logits = model.logits(hidden[:-1][rows])  # (n, V)
    return F.cross_entropy(logits.float(), targets[rows])


def generator_ctc_loss(generator: nn.Module, hidden: Tensor, units: list[int]) -> Tensor:
    """The official stage-4 CTC (docs/authors-behaviour.md#speech-generator): hidden (n, H) states at the supervised
    positions, upsampled ×25 (or to len(units) when longer), `ctc_loss(sum, blank, zero_infinity) / len(units)`."""
    n = hidden.shape[0]
    factor = generator.config.upsample_factor
    up_len = max(n * factor, len(units))
    if up_len == n * factor:
        logits = generator.forward_offline(hidden)
    else:  # the authors' uniform assignment: frame t ← state ⌊t / (up_len / n)⌋
        x = generator.input_proj(hidden.to(generator.input_proj.weight.dtype))
        index = (torch.arange(up_len, device=x.device) * n) // up_len
        x = x[index][None]
        positions = torch.arange(up_len, device=x.device)
        rope = generator.rotary(positions.expand(N_ROPE_AXES, 1, up_len), x.dtype)
        for layer in generator.layers:
            x = layer(x, rope, None)
        logits = generator.output_proj(x)[0]
    log_probs = F.log_softmax(logits.float(), dim=-1)[:, None]  # (T, 1, C)
    targets = torch.tensor([units], dtype=torch.long, device=log_probs.device)
    loss = F.ctc_loss(log_probs, targets, torch.tensor([up_len]), torch.tensor([len(units)]),
                      blank=generator.blank, reduction="sum", zero_infinity=True)  # fmt: skip
    return loss / len(units)


def backbone_forward(
    backbone: nn.Module, inputs: PromptInputs, labels: Tensor, extractor: ExtractorConfig | None
) -> ExtractedForward:
    """The decoder over a training prompt, dropping context tokens block by block with `extractor`.

    The extractor's queries are the text after the first media token that is not supervised (the
    authors' `text_labels`): the question, never the answer being learnt."""
    is_context = context_mask(inputs.kinds)
    is_query = query_mask(inputs.kinds) & (labels.to(inputs.kinds.device) == IGNORE_INDEX)
    return forward_extracting(backbone, inputs.embeds, inputs.positions, is_context=is_context,
                              is_query=is_query, extractor=extractor)  # fmt: skip


@dataclass
class LossTerms:
    """One example's loss terms, each a mean over that example (None where the stage or record has none)."""

    ce: Tensor | None = None  # next-token CE over its supervised targets
    lcmr: Tensor | None = None  # soft-DTW alignment of its speech to its transcript (not yet × λ)
    ctc: Tensor | None = None  # stage 4: the generator's CTC
    kept_tokens: int | None = None  # prompt tokens left after the extractor's last drop

    def parts(self) -> dict[str, float]:
        values = {"ce": self.ce, "lcmr": self.lcmr, "ctc": self.ctc}
        parts = {k: float(v.detach()) for k, v in values.items() if v is not None}
        if self.kept_tokens is not None:
            parts["kept_tokens"] = float(self.kept_tokens)
        return parts


@dataclass(frozen=True)
class TermWeights:
    """How much of a micro-batch's loss one example's terms are (1, 1, 1 for a batch of one)."""

    ce: float = 1.0
    lcmr: float = 1.0
    ctc: float = 1.0


def ce_targets(example: TrainExample) -> int:
    """Supervised next-token targets of `example` (its CE denominator; the extractor never drops them)."""
    return int((example.labels[1:] != IGNORE_INDEX).sum())


def _has_lcmr(example: TrainExample, stage: StageConfig) -> bool:
    return stage.lcmr and bool(example.asr_ids) and bool(example.speech_parts)


def batch_weights(batch: list[TrainExample], stage: StageConfig) -> list[TermWeights]:
    """Per-example weights that make a micro-batch processed one example at a time give the loss of the
    padded batch the authors' trainer builds: CE averaged over all the batch's supervised targets, LCMR over
    its examples with a transcript, CTC summed and divided by all the batch's target units
    (docs/authors-behaviour.md#speech-generator)."""
    n_targets = sum(ce_targets(e) for e in batch)
    n_lcmr = sum(_has_lcmr(e, stage) for e in batch)
    n_units = sum(len(e.tgt_units or ()) for e in batch)
    return [
        TermWeights(ce=ce_targets(e) / n_targets if n_targets else 0.0,
                    lcmr=1.0 / n_lcmr if n_lcmr else 0.0,
                    ctc=len(e.tgt_units or ()) / n_units if n_units else 0.0)
        for e in batch
    ]  # fmt: skip


def combine(terms: LossTerms, stage: StageConfig, weights: TermWeights = TermWeights()) -> Tensor:
    """The weighted loss: w·CE + λ·w·LCMR + ctc_weight·w·CTC over the terms present."""
    pieces = []
    if terms.ce is not None:
        pieces.append(weights.ce * terms.ce)
    if terms.lcmr is not None:
        pieces.append(stage.lcmr_weight * weights.lcmr * terms.lcmr)
    if terms.ctc is not None:
        pieces.append(stage.ctc_loss_weight * weights.ctc * terms.ctc)
    return torch.stack(pieces).sum()


def train_step_terms(
    model: nn.Module,
    example: TrainExample,
    stage: StageConfig,
    *,
    project: Projection | None = None,
    generator: nn.Module | None = None,
    extractor: ExtractorConfig | None = None,
) -> LossTerms:
    """One example's loss terms for `stage`.

    stage 1/3: shifted CE; stage 2: CE and LCMR(projected speech, embed(asr_ids)) when the record has a
    transcript; stage 4: the generator's CTC only, the LLM run under no_grad. With `extractor`, the decoder
    drops context tokens block by block (`forward_extracting`); answers are never dropped.
    `project` defaults to `trainable_projection(model.model.mm_speech_projector)`."""
    if project is None:
        project = trainable_projection(model.model.mm_speech_projector)
    backbone = model.model
    speech: list[Tensor] = []

    def project_speech(part: SpeechPart) -> Tensor:
        tokens = project(part)
        speech.append(tokens)
        return tokens

    labels = example.labels
    if stage.trains is Trains.SPEECH_GENERATOR:
        if generator is None:
            raise UsageError(f"{stage.name} needs the speech generator", "use a model folder with speech_generator.safetensors")
        if not example.tgt_units:
            raise InputError(f"record `{example.record.id}` has no tgt_unit for {stage.name}",
                             "stage 4 records need the speech units of the answer (`tgt_unit`)")  # fmt: skip
        with torch.no_grad():
            inputs = example.prompt_inputs(embed_ids=backbone.embed_tokens, project_speech=project_speech)
            out = backbone_forward(backbone, inputs, labels, extractor)
        hidden, kept_labels = out.hidden[0], labels.to(out.hidden.device)[out.kept_index]  # (T', H), (T',)
        states = hidden[kept_labels != IGNORE_INDEX]  # answers are never dropped: all of them are here
        return LossTerms(ctc=generator_ctc_loss(generator, states, example.tgt_units))
    inputs = example.prompt_inputs(embed_ids=backbone.embed_tokens, project_speech=project_speech)
    out = backbone_forward(backbone, inputs, labels, extractor)
    terms = LossTerms(ce=_shifted_ce(model, out.hidden[0], labels, out.kept_index),
                      kept_tokens=out.kept_index.numel() if out.drops else None)  # fmt: skip
    cfg = stage.lcmr_config()
    if cfg is not None and example.asr_ids and speech:
        text = backbone.embed_tokens(torch.tensor(example.asr_ids, device=inputs.embeds.device))
        with torch.autocast(inputs.embeds.device.type, enabled=False):  # soft-DTW's log-sum-exps stay exact
            terms.lcmr = lcmr_loss([torch.cat(speech).float()], [text.float()], cfg)
    return terms



# ---------------------------------------------------------------------------------------------- precision


def resolve_precision(choice: str, stage: StageConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of training's forward passes, or None (compute in the frozen weights' dtype).

    The trained parameters are fp32 whatever the model's dtype (`prepare_for_stage`). `auto` follows the
    stage's `bf16` setting (on in every official stage) where it pays: on CUDA, bf16 where the GPU has it,
    else fp16 (with loss scaling). On CPU `auto` adds nothing. `bf16`/`fp16` force autocast on any device."""
    if choice not in PRECISIONS:
        raise UsageError(f"unknown precision `{choice}`", f"choose one of: {', '.join(PRECISIONS)}")
    if choice == "fp32":
        return None
    if choice in AUTOCAST_DTYPES:
        return AUTOCAST_DTYPES[choice]
    if device.type != "cuda" or not stage.bf16:
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# ---------------------------------------------------------------------------------------------- schedule


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """HF's `get_{cosine,linear,constant}_schedule_with_warmup` multipliers."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return factor


# ---------------------------------------------------------------------------------------------- trainer


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):  # some filesystems cannot sync a directory; the rename still holds
            os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoint folders under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / STATE_FILE).is_file()]  # fmt: skip
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def latest_checkpoint(root: str | Path) -> Path | None:
    found = checkpoints(root)
    return found[-1] if found else None


NO_RESUME = setting("no_resume")  # the command line shows `--no-resume`
_DAMAGED_HINT = f"pass {NO_RESUME} to start over, or delete the damaged checkpoint folder"
_STATE_KEYS = ("step", "position", "stage", "total_steps", "seed", "names")


@dataclass(frozen=True)
class SavedCheckpoint:
    """A checkpoint folder read whole into memory (nothing applied yet)."""

    folder: Path
    state: dict[str, Any]
    tensors: dict[str, Tensor]
    optimizer: dict[str, Any]
    rng_ranks: list[dict[str, Any]]


def read_checkpoint(folder: str | Path) -> SavedCheckpoint:
    """Every file of a checkpoint, or a `CheckpointError` naming the one that is damaged, truncated or
    refuses to unpickle (`weights_only`: a planted file never runs code)."""
    from lyra_cli.engine.model.checkpoint import load_safetensors

    folder = Path(folder)
    state_path = folder / STATE_FILE
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"`{state_path}` is not a readable training state ({exc.__class__.__name__})",
                              _DAMAGED_HINT) from exc  # fmt: skip
    if not isinstance(state, dict) or any(key not in state for key in _STATE_KEYS):
        raise CheckpointError(f"`{state_path}` lacks {', '.join(_STATE_KEYS)}", _DAMAGED_HINT)
    tensors = load_safetensors(folder / TRAINABLE_FILE)
    optimizer = _load_pickle(folder / OPTIMIZER_FILE, ("optimizer", "scheduler"))
    ranks = _load_pickle(folder / RNG_FILE, ("ranks",))["ranks"]
    if not isinstance(ranks, list) or not ranks:
        raise CheckpointError(f"`{folder / RNG_FILE}` holds no random states", _DAMAGED_HINT)
    return SavedCheckpoint(folder, state, tensors, optimizer, ranks)


def _load_pickle(path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated zip, EOF, UnpicklingError (code it refuses to run), OSError
        raise CheckpointError(f"`{path}` is damaged or cannot be read safely ({exc.__class__.__name__})",
                              _DAMAGED_HINT) from exc  # fmt: skip
    if not isinstance(value, dict) or any(key not in value for key in keys):
        raise CheckpointError(f"`{path}` lacks {', '.join(keys)}", _DAMAGED_HINT)
    return value


def _rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gauss": float(cached)},
    }  # fmt: skip


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached_gauss"]))


def _summary_writer(folder: str | Path) -> Any:
    from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package (extra `train`)

    return SummaryWriter(log_dir=str(folder))


def tensorboard_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


@dataclass(frozen=True)
class TrainerSettings:
    """How a `Trainer` runs and what it writes besides the weights: the autocast `precision` (None: the
    weights' own), its `distributed` rank, `strict` (a record longer than max_length fails the run instead of
    being skipped), the JSON-lines metrics `log_path`, the `tensorboard_dir`, and the checkpoints kept
    (`keep_last`)."""

    precision: torch.dtype | None = None
    distributed: Distributed = Distributed()
    strict: bool = False
    log_path: str | Path | None = None
    tensorboard_dir: str | Path | None = None
    keep_last: int = 3


class Trainer:
    """Training of `plan.parameters` over `dataset`, one optimizer step per `step()`."""

    def __init__(
        self,
        model: nn.Module,
        plan: TrainablePlan,
        dataset: TrainDataset,
        *,
        total_steps: int,
        generator: nn.Module | None = None,
        project: Projection | None = None,
        settings: TrainerSettings = TrainerSettings(),
    ) -> None:
        precision, distributed = settings.precision, settings.distributed
        if total_steps < 1:
            raise UsageError("total_steps must be >= 1", "e.g. --steps 100")
        self.model, self.plan, self.dataset, self.generator = model, plan, dataset, generator
        self.stage = plan.stage
        if project is None and plan.projector is not None:
            project = trainable_projection(plan.projector)
        self.project = project
        self.extractor = stage_extractor(self.stage, model)
        self.total_steps = total_steps
        self.keep_last = max(1, settings.keep_last)
        self.max_grad_norm = self.stage.max_grad_norm or None  # 0: no clipping
        # the stage's setting (on in every official stage): activations recomputed layer by layer in backward
        model.model.gradient_checkpointing = self.stage.gradient_checkpointing
        self.log_path = Path(settings.log_path) if settings.log_path is not None else None
        self.names = plan.names
        params = [plan.parameters[n] for n in self.names]
        self.device_type = params[0].device.type
        if self.device_type == "cuda":  # the stages' tf32 setting: TF32 tensor cores for fp32 matmuls
            torch.backends.cuda.matmul.allow_tf32 = self.stage.tf32
            torch.backends.cudnn.allow_tf32 = self.stage.tf32
        self.precision = precision  # autocast dtype, None = the weights' own
        self.distributed = distributed
        self.strict = settings.strict
        self.too_long: set[str] = set()  # ids of records skipped for exceeding max_length
        tensorboard_dir = settings.tensorboard_dir
        self.tensorboard = _summary_writer(tensorboard_dir) if tensorboard_dir and distributed.is_main else None
        # fp16's narrow range needs loss scaling (skipped steps on overflow); bf16 and fp32 do not
        self.scaler = torch.amp.GradScaler(self.device_type) if precision == torch.float16 else None
        self.optimizer = torch.optim.AdamW(params, lr=self.stage.learning_rate, weight_decay=self.stage.weight_decay)
        self.warmup_steps = math.ceil(self.stage.warmup_ratio * total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(self.stage.lr_schedule, self.warmup_steps, total_steps)
        )
        self.step_count = 0  # optimizer steps done
        self.position = 0  # next dataset position (global: every rank's records count)

    @property
    def records_per_step(self) -> int:
        return self.stage.per_device_batch_size * self.stage.grad_accumulation * self.distributed.world_size

    def _train_mode(self) -> None:
        """Dropout where the trained parts live (decoder LoRA, projector, generator); towers stay in eval."""
        backbone = self.model.model
        backbone.layers.train()
        if backbone.mm_speech_projector is not None:
            backbone.mm_speech_projector.train()
        if self.generator is not None:
            self.generator.train()

    def _autocast(self) -> torch.autocast:
        dtype = self.precision or torch.float32
        return torch.autocast(self.device_type, dtype=dtype, enabled=self.precision is not None)

    def step(self) -> dict[str, Any]:
        """One optimizer step over `per_device_batch_size × grad_accumulation` examples per rank; returns
        (and logs) its record."""
        start = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.zero_grad(set_to_none=True)
        total, tokens, supervised, parts_sum = self.accumulate_gradients()
        params = [self.plan.parameters[n] for n in self.names]
        self.distributed.average_gradients(params)
        # every rank sends the same fixed list; a part no record of the step had is left out of the log
        sums = [parts_sum.get(k, 0.0) for k in LOSS_PARTS] + [float(k in parts_sum) for k in LOSS_PARTS]
        total, tokens, supervised, *sums = self.distributed.sum_floats([total, tokens, supervised, *sums],
                                                                      params[0].device)  # fmt: skip
        parts_sum = {k: v for k, v, seen in zip(LOSS_PARTS, sums, sums[len(LOSS_PARTS):]) if seen}
        grad_norm = self._update(params)
        self.position += self.records_per_step
        self.step_count += 1
        elapsed = time.perf_counter() - start
        n_batches = self.stage.grad_accumulation * self.distributed.world_size
        record = {
            "step": self.step_count,
            "loss": total / n_batches,  # the mean micro-batch loss, as the authors' trainer logs it
            **{k: v / n_batches for k, v in parts_sum.items()},
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": int(tokens),
            "supervised_tokens": int(supervised),
            "tokens_per_s": tokens / elapsed if elapsed > 0 else None,
            "position": self.position,
        }
        if self.scaler is not None:
            record["loss_scale"] = self.scaler.get_scale()
        self._log(record)
        return record

    def _update(self, params: list[nn.Parameter]) -> float | None:
        """Clip, step the optimizer (through the loss scaler in fp16) and the schedule; the gradient norm."""
        grad_norm = None
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip true gradients, not scaled ones
        if self.max_grad_norm is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skipped when a gradient overflowed; the scale then shrinks
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        return grad_norm

    def _log(self, record: dict[str, Any]) -> None:
        """Append the step's record to the JSONL log and TensorBoard (rank 0 only)."""
        if self.log_path is not None and self.distributed.is_main:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if key not in ("step", "position") and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(f"train/{key}", value, self.step_count)

    def accumulate_gradients(self) -> tuple[float, int, int, dict[str, float]]:
        """Backward passes over this rank's examples of the next step, without stepping.

        Each of the `grad_accumulation` micro-batches of `per_device_batch_size` examples is processed one
        example at a time (no padding), each weighted as its share of the padded batch's loss
        (`batch_weights`), then divided by the accumulation. Returns this rank's (sum of micro-batch losses,
        prompt tokens, supervised tokens, weighted parts)."""
        self._train_mode()
        batch_size, accumulation = self.stage.per_device_batch_size, self.stage.grad_accumulation
        world, rank = self.distributed.world_size, self.distributed.rank
        total, tokens, supervised = 0.0, 0, 0
        parts_sum: dict[str, float] = {}
        for m in range(accumulation):
            # global positions: rank r takes every world-th one of the step's records
            batch = [self.dataset.example_at(self.position + (m * batch_size + b) * world + rank)
                     for b in range(batch_size)]  # fmt: skip
            batch = [e for e in batch if self._fits(e)]
            for example, weights in zip(batch, batch_weights(batch, self.stage), strict=True):
                with self._autocast():
                    terms = train_step_terms(self.model, example, self.stage, project=self.project,
                                             generator=self.generator, extractor=self.extractor)  # fmt: skip
                loss = combine(terms, self.stage, weights)
                if loss.requires_grad:  # e.g. a text-only record in stage 1 reaches no trainable weight
                    scaled = loss / accumulation
                    (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
                total += float(loss.detach())
                tokens += example.n_tokens
                supervised += int((example.labels != IGNORE_INDEX).sum())
                for key, value in terms.parts().items():
                    share = 1.0 / batch_size if key == "kept_tokens" else getattr(weights, key)
                    parts_sum[key] = parts_sum.get(key, 0.0) + share * value
        return total, tokens, supervised, parts_sum

    def _fits(self, example: TrainExample) -> bool:
        """Whether `example` is within the stage's max_length; a longer one is skipped and counted (never
        truncated, never replaced), or fails the run with `strict`."""
        if example.n_tokens <= self.stage.max_length:
            return True
        message = (f"record `{example.record.id}` has {example.n_tokens} prompt tokens, over {self.stage.name}'s "
                   f"max_length {self.stage.max_length}")  # fmt: skip
        if self.strict:
            raise InputError(message, "raise max_length (--set max_length=N) or drop the record")
        if example.record.id not in self.too_long:
            log.warning("%s: skipped", message)
        self.too_long.add(example.record.id)
        return False

    def close(self) -> None:
        """Flush and close the TensorBoard log (the JSONL log is written through on every step)."""
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None

    # -- checkpoints -------------------------------------------------------------------------------

    def save_checkpoint(self, root: str | Path) -> Path:
        """Write `root/step-NNNNNNNN/` atomically (temp folder, fsync, os.replace); keep the last K.

        Distributed: every rank must call it (each rank's RNG state is gathered); rank 0 writes."""
        root = Path(root)
        final = root / f"{CHECKPOINT_PREFIX}{self.step_count:08d}"
        rng_states = self.distributed.gather(_rng_state())
        if self.distributed.is_main:
            assert rng_states is not None
            self._write_checkpoint(root, final, rng_states)
        self.distributed.barrier()  # no rank runs ahead of a checkpoint it might need to resume from
        return final

    def _write_checkpoint(self, root: Path, final: Path, rng_states: list[dict[str, Any]]) -> None:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".tmp-{final.name}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            tensors = {n: self.plan.parameters[n].detach().cpu().contiguous() for n in self.names}
            save_file(tensors, str(tmp / TRAINABLE_FILE))
            states = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
            if self.scaler is not None:
                states["scaler"] = self.scaler.state_dict()
            torch.save(states, tmp / OPTIMIZER_FILE)
            torch.save({"ranks": rng_states}, tmp / RNG_FILE)
            state = {"step": self.step_count, "position": self.position, "stage": self.stage.name,
                     "total_steps": self.total_steps, "seed": self.dataset.seed, "names": self.names,
                     "world_size": self.distributed.world_size}  # fmt: skip
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
            for name in (TRAINABLE_FILE, OPTIMIZER_FILE, RNG_FILE, STATE_FILE):
                _fsync_file(tmp / name)
            _fsync_dir(tmp)
            old = None
            if final.exists():  # re-saving the same step: move the old one aside first
                old = root / f".old-{final.name}-{os.getpid()}"
                os.replace(final, old)
            try:
                os.replace(tmp, final)
            except BaseException:
                if old is not None:
                    os.replace(old, final)
                raise
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            _fsync_dir(root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for stale in checkpoints(root)[: -self.keep_last]:
            shutil.rmtree(stale, ignore_errors=True)

    def load_checkpoint(self, folder: str | Path) -> None:
        """Restore parameters, optimizer, scheduler, RNG states, step and data position from `folder`."""
        self.apply_checkpoint(read_checkpoint(folder))

    def apply_checkpoint(self, saved: "SavedCheckpoint") -> None:
        """Restore a checkpoint read by `read_checkpoint`; every check runs before anything is changed."""
        folder, state = saved.folder, saved.state
        if state["stage"] != self.stage.name or state["names"] != self.names:
            raise UsageError(f"checkpoint `{folder}` is for {state['stage']} with other trainable tensors",
                             f"resume it with the same stage ({self.stage.name} now) and model")  # fmt: skip
        if state["seed"] != self.dataset.seed:  # another record order: the saved position would mean nothing
            raise UsageError(f"checkpoint `{folder}` was trained with --seed {state['seed']}, not {self.dataset.seed}",
                             f"resume with --seed {state['seed']}, or pass --no-resume to start over")  # fmt: skip
        self._check_tensors(saved)
        if state["total_steps"] != self.total_steps:
            log.warning("resuming a %d-step run as a %d-step run: the learning-rate schedule changes from here",
                        state["total_steps"], self.total_steps)  # fmt: skip
        with torch.no_grad():
            for name in self.names:
                param = self.plan.parameters[name]
                param.copy_(saved.tensors[name].to(device=param.device, dtype=param.dtype))
        try:
            self.optimizer.load_state_dict(saved.optimizer["optimizer"])
            self.scheduler.load_state_dict(saved.optimizer["scheduler"])
            if self.scaler is not None and "scaler" in saved.optimizer:
                self.scaler.load_state_dict(saved.optimizer["scaler"])
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise CheckpointError(f"`{folder / OPTIMIZER_FILE}` does not fit this run ({exc.__class__.__name__}: {exc})",
                                  f"pass {NO_RESUME} to start over, or delete this checkpoint folder") from exc  # fmt: skip
        ranks = saved.rng_ranks
        if len(ranks) != self.distributed.world_size:
            log.warning("checkpoint `%s` was written by %d process(es), resumed by %d: the data order is kept, "
                        "dropout draws differ from an uninterrupted run", folder, len(ranks),
                        self.distributed.world_size)  # fmt: skip
        _set_rng_state(ranks[self.distributed.rank % len(ranks)])
        self.step_count = int(state["step"])
        self.position = int(state["position"])
        if self.log_path is not None and self.distributed.is_main:
            trim_log(self.log_path, self.step_count)

    def _check_tensors(self, saved: "SavedCheckpoint") -> None:
        path = saved.folder / TRAINABLE_FILE
        for name in self.names:
            if name not in saved.tensors:
                raise CheckpointError(f"`{path}` has no tensor `{name}`", _DAMAGED_HINT)
            want = tuple(self.plan.parameters[name].shape)
            if tuple(saved.tensors[name].shape) != want:
                raise CheckpointError(f"`{path}`: `{name}` has shape {tuple(saved.tensors[name].shape)}, not {want}",
                                      _DAMAGED_HINT)  # fmt: skip

    def resume_latest(self, root: str | Path) -> Path | None:
        """Restore the newest checkpoint under `root` that reads whole; None when there is none.

        A damaged one (truncated, unreadable, refusing to unpickle) is skipped with a warning naming its
        file, and the previous one is used; when none is usable the error names the newest's damage."""
        first_damage = None
        for folder in reversed(checkpoints(root)):
            try:
                saved = read_checkpoint(folder)
            except CheckpointError as exc:
                log.warning("%s: falling back to the previous checkpoint", exc.message)
                first_damage = first_damage or exc
                continue
            self.apply_checkpoint(saved)
            return folder
        if first_damage is not None:
            raise CheckpointError(f"no checkpoint in `{root}` can be resumed; the newest: {first_damage.message}",
                                  _DAMAGED_HINT)  # fmt: skip
        return None


def trim_log(path: Path, step: int) -> None:
    """Drop the metrics of steps after `step` (and a line torn by a kill) from a JSONL log, in place.

    A run killed after its last checkpoint logged steps that the resumed run computes and logs again; without
    this, `metrics.jsonl` would hold those steps twice."""
    if not path.is_file():
        return
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step:
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        log.info("metrics: %d line(s) after step %d dropped from `%s` (they are logged again)", dropped, step, path)
        write_atomically(path, lambda temp: temp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8"))

"""The training loop: one example's loss per stage (official-lyra.md §9.1, §4, §6.1), and a single-process
`Trainer` with AdamW, warm-up + cosine schedule, gradient accumulation, JSONL logging and atomic,
exactly-resumable checkpoints.

    loss, parts = train_step_loss(model, example, stage, project=trainable_projection(projector))
    trainer = Trainer(model, plan, dataset, total_steps=100, generator=generator, log_path=out / "log.jsonl")
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
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lyra_cli.engine.llm import N_ROPE_AXES
from lyra_cli.engine.prompt import SpeechPart
from lyra_cli.engine.train.data import IGNORE_INDEX, TrainDataset, TrainExample
from lyra_cli.engine.train.lcmr import lcmr_loss
from lyra_cli.engine.train.stages import StageConfig, TrainablePlan, Trains
from lyra_cli.errors import InputError, UsageError

CHECKPOINT_PREFIX = "step-"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
STATE_FILE = "trainer_state.json"
MAX_GRAD_NORM = 1.0  # HF Trainer default, which the authors' scripts keep

Projection = Callable[[SpeechPart], Tensor]


# ---------------------------------------------------------------------------------------------- the loss


def trainable_projection(projector: nn.Module, *, long_adapter: str = "long_speech") -> Projection:
    """SpeechPart → (N·300, H) tokens through `projector`, with autograd (no inference_mode).

    A long recording keeps projected tokens only (no frames): those are returned as stored, so the
    projector gets no gradient from them."""

    def project(part: SpeechPart) -> Tensor:
        if part.frames is None:
            if not part.tokens:
                raise InputError(f"`{part.source}` has neither frames nor tokens")
            return part.tokens.get(long_adapter, next(iter(part.tokens.values()))).clone()
        weight = next(projector.parameters())
        frames = part.frames.to(device=weight.device, dtype=weight.dtype).clone()  # not an inference tensor
        return projector(frames).flatten(0, 1)

    return project


def _shifted_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy over supervised positions; logits (T, V), labels (T,)."""
    return F.cross_entropy(logits[:-1].float(), labels[1:].to(logits.device), ignore_index=IGNORE_INDEX)


def generator_ctc_loss(generator: nn.Module, hidden: Tensor, units: list[int]) -> Tensor:
    """The official stage-4 CTC (§6.1): hidden (n, H) states at the supervised positions, upsampled ×25
    (or to len(units) when longer), `ctc_loss(sum, blank, zero_infinity) / len(units)`."""
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


def train_step_loss(
    model: nn.Module,
    example: TrainExample,
    stage: StageConfig,
    *,
    project: Projection | None = None,
    generator: nn.Module | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """One example's training loss for `stage` and its parts (floats) for logging.

    stage 1/3: shifted CE; stage 2: CE + λ·LCMR(projected speech, embed(asr_ids)) when the record has a
    transcript; stage 4: the generator's CTC only, the LLM run under no_grad.
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
            raise UsageError(f"{stage.name} needs the speech generator")
        if not example.tgt_units:
            raise InputError(f"record `{example.record.id}` has no tgt_unit for {stage.name}")
        with torch.no_grad():
            inputs = example.prompt_inputs(embed_ids=backbone.embed_tokens, project_speech=project_speech)
            hidden = backbone(inputs.embeds, inputs.positions, None)[0]  # (T, H) after the final norm
        states = hidden[labels.to(hidden.device) != IGNORE_INDEX]
        ctc = generator_ctc_loss(generator, states, example.tgt_units)
        loss = stage.ctc_loss_weight * ctc
        return loss, {"ctc": float(ctc.detach())}
    inputs = example.prompt_inputs(embed_ids=backbone.embed_tokens, project_speech=project_speech)
    hidden = backbone(inputs.embeds, inputs.positions, None)
    ce = _shifted_ce(model.logits(hidden)[0], labels)
    parts = {"ce": float(ce.detach())}
    loss = ce
    cfg = stage.lcmr_config()
    if cfg is not None and example.asr_ids and speech:
        text = backbone.embed_tokens(torch.tensor(example.asr_ids, device=inputs.embeds.device))
        align = lcmr_loss([torch.cat(speech)], [text], cfg)
        loss = loss + cfg.weight * align
        parts["lcmr"] = float(align.detach())
    return loss, parts


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


class Trainer:
    """Single-process training of `plan.parameters` over `dataset`, one optimizer step per `step()`."""

    def __init__(
        self,
        model: nn.Module,
        plan: TrainablePlan,
        dataset: TrainDataset,
        *,
        total_steps: int,
        generator: nn.Module | None = None,
        project: Projection | None = None,
        log_path: str | Path | None = None,
        keep_last: int = 3,
        max_grad_norm: float | None = MAX_GRAD_NORM,
    ) -> None:
        if total_steps < 1:
            raise UsageError("total_steps must be >= 1")
        self.model, self.plan, self.dataset, self.generator = model, plan, dataset, generator
        self.stage = plan.stage
        self.project = project
        self.total_steps = total_steps
        self.keep_last = max(1, keep_last)
        self.max_grad_norm = max_grad_norm
        # the stage's setting (on in every official stage): activations recomputed layer by layer in backward
        model.model.gradient_checkpointing = self.stage.gradient_checkpointing
        self.log_path = Path(log_path) if log_path is not None else None
        self.names = plan.names
        params = [plan.parameters[n] for n in self.names]
        self.optimizer = torch.optim.AdamW(params, lr=self.stage.learning_rate, weight_decay=self.stage.weight_decay)
        self.warmup_steps = math.ceil(self.stage.warmup_ratio * total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(self.stage.lr_schedule, self.warmup_steps, total_steps)
        )
        self.step_count = 0  # optimizer steps done
        self.position = 0  # next dataset position

    def _train_mode(self) -> None:
        """Dropout where the trained parts live (decoder LoRA, projector, generator); towers stay in eval."""
        backbone = self.model.model
        backbone.layers.train()
        if backbone.mm_speech_projector is not None:
            backbone.mm_speech_projector.train()
        if self.generator is not None:
            self.generator.train()

    def step(self) -> dict[str, Any]:
        """One optimizer step over `grad_accumulation` examples; returns (and logs) its record."""
        self._train_mode()
        start = time.perf_counter()
        accumulation = self.stage.grad_accumulation
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.zero_grad(set_to_none=True)
        total, tokens, supervised = 0.0, 0, 0
        parts_sum: dict[str, float] = {}
        examples = self.dataset.iter_from(self.position, stop=self.position + accumulation)
        for _, example in examples:
            loss, parts = train_step_loss(self.model, example, self.stage, project=self.project,
                                          generator=self.generator)  # fmt: skip
            if loss.requires_grad:  # e.g. a text-only record in stage 1 reaches no trainable weight
                (loss / accumulation).backward()
            total += float(loss.detach())
            tokens += example.n_tokens
            supervised += int((example.labels != IGNORE_INDEX).sum())
            for key, value in parts.items():
                parts_sum[key] = parts_sum.get(key, 0.0) + value
        params = [self.plan.parameters[n] for n in self.names]
        grad_norm = None
        if self.max_grad_norm is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.position += accumulation
        self.step_count += 1
        elapsed = time.perf_counter() - start
        record = {
            "step": self.step_count,
            "loss": total / accumulation,
            **{k: v / accumulation for k, v in parts_sum.items()},
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": tokens,
            "supervised_tokens": supervised,
            "tokens_per_s": tokens / elapsed if elapsed > 0 else None,
            "position": self.position,
        }
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        return record

    # -- checkpoints -------------------------------------------------------------------------------

    def save_checkpoint(self, root: str | Path) -> Path:
        """Write `root/step-NNNNNNNN/` atomically (temp folder, fsync, os.replace); keep the last K."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"{CHECKPOINT_PREFIX}{self.step_count:08d}"
        tmp = root / f".tmp-{final.name}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            tensors = {n: self.plan.parameters[n].detach().cpu().contiguous() for n in self.names}
            save_file(tensors, str(tmp / TRAINABLE_FILE))
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                       tmp / OPTIMIZER_FILE)  # fmt: skip
            torch.save(_rng_state(), tmp / RNG_FILE)
            state = {"step": self.step_count, "position": self.position, "stage": self.stage.name,
                     "total_steps": self.total_steps, "seed": self.dataset.seed, "names": self.names}  # fmt: skip
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
        return final

    def load_checkpoint(self, folder: str | Path) -> None:
        """Restore parameters, optimizer, scheduler, RNG states, step and data position from `folder`."""
        folder = Path(folder)
        try:
            state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"`{folder}` is not a training checkpoint ({exc})") from exc
        if state["stage"] != self.stage.name or state["names"] != self.names:
            raise UsageError(f"checkpoint `{folder}` is for {state['stage']} with other trainable tensors",
                             f"resume it with the same stage ({self.stage.name} now) and model")  # fmt: skip
        tensors = load_file(str(folder / TRAINABLE_FILE))
        with torch.no_grad():
            for name in self.names:
                param = self.plan.parameters[name]
                param.copy_(tensors[name].to(device=param.device, dtype=param.dtype))
        opt = torch.load(folder / OPTIMIZER_FILE, weights_only=True)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])
        _set_rng_state(torch.load(folder / RNG_FILE, weights_only=True))
        self.step_count = int(state["step"])
        self.position = int(state["position"])

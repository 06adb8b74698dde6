"""The training loop: every stage's loss falls when overfitting, resume is exact, checkpoints are atomic."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers.synthetic import write_synthetic_set

from lyra_cli.engine.model.loader import LoadedModel, load_model
from lyra_cli.engine.model.runtime import RuntimeRequest, resolve_runtime
from lyra_cli.engine.model.speech_generator import load_speech_generator
from lyra_cli.engine.run.pipeline import Engine
from lyra_cli.engine.train.data import TrainDataset, build_example, engine_media_encoder, parse_records
from lyra_cli.engine.train.loop import (
    Trainer,
    TrainerSettings,
    checkpoints,
    combine,
    latest_checkpoint,
    resolve_precision,
    train_step_terms,
)
from lyra_cli.engine.train.stages import prepare_for_stage, resolve_stage, stage_extractor
from lyra_cli.errors import UsageError

CPU = resolve_runtime(RuntimeRequest(device="cpu", dtype="fp32"))


@pytest.fixture(scope="module")
def synthetic(real: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_set(tmp_path_factory.mktemp("synth"), real, n_records=11, seed=5)


@pytest.fixture(scope="module")
def records(synthetic: Path) -> dict:
    parsed, _ = parse_records(synthetic, image_folder=synthetic.parent, speech_folder=synthetic.parent)
    return {r.id: r for r in parsed}


@pytest.fixture(scope="module")
def examples(tiny_dir: Path, records: dict) -> dict:
    """Examples built once (media encoded by a frozen engine); they carry frames, not projected tokens."""
    engine = Engine(load_model(tiny_dir, CPU))
    encode = engine_media_encoder(engine)
    chosen = ("asr_0", "mm_1", "unit_4", "unit_9", "long_10")
    return {i: build_example(records[i], engine.loaded.tokenizer, encode) for i in chosen}


def _setup(tiny_dir: Path, examples: dict, stage_name: str, ids: tuple[str, ...], runtime=CPU, **overrides):  # noqa: ANN001, ANN202
    torch.manual_seed(0)  # a fresh LoRA adapter's A is drawn from the global RNG
    loaded: LoadedModel = load_model(tiny_dir, runtime)
    generator = None
    if stage_name == "stage4":
        generator = load_speech_generator(loaded.model_dir, loaded.config, device="cpu", dtype=torch.float32)
    stage = resolve_stage(stage_name, {"warmup_ratio": 0.0, "per_device_batch_size": 1, **overrides})
    plan = prepare_for_stage(loaded.model, stage, generator, loaded.adapters)
    by_record = {examples[i].record.id: examples[i] for i in ids}
    dataset = TrainDataset([examples[i].record for i in ids], lambda r: by_record[r.id], seed=1)
    return loaded, generator, plan, dataset


@pytest.mark.parametrize(
    ("stage_name", "ids", "lr", "steps", "extract"),
    [
        ("stage1", ("asr_0",), 1e-2, 8, ""),
        pytest.param("stage2", ("asr_0",), 2e-3, 6, "", marks=pytest.mark.slow),  # see the docstring
        ("stage2", ("asr_0", "mm_1"), 2e-3, 6, "2x0.5"),  # with the extractor dropping tokens
        ("stage3", ("long_10",), 2e-3, 6, ""),
        ("stage4", ("unit_4", "unit_9"), 2e-3, 6, ""),
    ],
)
def test_loss_falls_when_overfitting(tiny_dir: Path, examples: dict, tmp_path: Path, stage_name: str,
                                     ids: tuple[str, ...], lr: float, steps: int, extract: str) -> None:  # fmt: skip
    """Every stage learns a few records. Stage 2 runs by default with the extractor (its transcribed record
    still checks LCMR); the `slow` variant adds stage 2 without the extractor on that record alone."""
    loaded, generator, plan, dataset = _setup(tiny_dir, examples, stage_name, ids, learning_rate=lr,
                                              lr_schedule="constant", extract=extract)  # fmt: skip
    model = loaded.model
    stage = plan.stage
    extractor = stage_extractor(stage, model)

    def full_loss() -> float:
        with torch.no_grad():
            return sum(float(combine(train_step_terms(model, examples[i], stage, generator=generator,
                                                      extractor=extractor), stage)) for i in ids)  # fmt: skip

    before = full_loss()
    if stage_name == "stage2":  # LCMR is active on the transcribed record
        parts = train_step_terms(model, examples["asr_0"], stage).parts()
        assert parts["lcmr"] > 0 and "ce" in parts
    if stage_name == "stage4":
        parts = train_step_terms(model, examples["unit_4"], stage, generator=generator).parts()
        assert set(parts) == {"ctc"}
    if extract:  # the image+speech record really loses tokens
        parts = train_step_terms(model, examples["mm_1"], stage, extractor=extractor).parts()
        assert parts["kept_tokens"] < examples["mm_1"].n_tokens
    trainer = Trainer(model, plan, dataset, total_steps=steps, generator=generator,
                      settings=TrainerSettings(log_path=tmp_path / "log.jsonl"))
    for _ in range(steps):
        trainer.step()
    after = full_loss()
    assert after < 0.95 * before, (before, after)
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, steps + 1))
    assert all({"loss", "lr", "tokens", "tokens_per_s"} <= set(r) for r in logged)


def test_resume_continues_exactly(tiny_dir: Path, examples: dict, tmp_path: Path) -> None:
    ids, n, m = ("asr_0", "unit_4", "unit_9"), 2, 2
    overrides = {"learning_rate": 1e-3, "warmup_ratio": 0.3, "grad_accumulation": 2}  # LoRA dropout on: RNG matters

    loaded, _, plan, dataset = _setup(tiny_dir, examples, "stage2", ids, **overrides)
    whole = Trainer(loaded.model, plan, dataset, total_steps=n + m)
    reference = [whole.step()["loss"] for _ in range(n + m)]

    loaded, _, plan, dataset = _setup(tiny_dir, examples, "stage2", ids, **overrides)
    first = Trainer(loaded.model, plan, dataset, total_steps=n + m)
    head = [first.step()["loss"] for _ in range(n)]
    folder = first.save_checkpoint(tmp_path / "ckpt")
    torch.manual_seed(1234)  # disturb every RNG the resumed run must restore
    torch.rand(7)

    loaded, _, plan, dataset = _setup(tiny_dir, examples, "stage2", ids, **overrides)
    resumed = Trainer(loaded.model, plan, dataset, total_steps=n + m)
    resumed.load_checkpoint(folder)
    assert (resumed.step_count, resumed.position) == (n, 2 * n)
    tail = [resumed.step()["loss"] for _ in range(m)]
    assert head + tail == reference  # bit-exact in fp32 on CPU
    for name in plan.names:  # and the weights end where the uninterrupted run's do
        torch.testing.assert_close(plan.parameters[name], whole.plan.parameters[name], rtol=0, atol=1e-6)
    # the optimizer file is tensors and plain containers only
    torch.load(folder / "optimizer.pt", weights_only=True)
    torch.load(folder / "rng.pt", weights_only=True)


def test_interrupted_checkpoint_write_keeps_the_last_good_one(
    tiny_dir: Path, examples: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded, _, plan, dataset = _setup(tiny_dir, examples, "stage1", ("asr_0",), learning_rate=1e-3)
    trainer = Trainer(loaded.model, plan, dataset, total_steps=4, settings=TrainerSettings(keep_last=2))
    root = tmp_path / "ckpt"
    trainer.step()
    good = trainer.save_checkpoint(root)
    saved = {n: p.detach().clone() for n, p in plan.parameters.items()}
    trainer.step()

    def broken(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise OSError("disk went away")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="disk went away"):
        trainer.save_checkpoint(root)
    monkeypatch.undo()
    assert checkpoints(root) == [good] and latest_checkpoint(root) == good
    assert sorted(p.name for p in root.iterdir()) == [good.name]  # no temp folder left behind
    trainer.load_checkpoint(good)
    assert trainer.step_count == 1 and trainer.position == 1
    for name, value in saved.items():
        assert torch.equal(plan.parameters[name], value)
    # keep_last prunes older complete checkpoints
    for _ in range(3):
        trainer.step()
        trainer.save_checkpoint(root)
    assert [p.name for p in checkpoints(root)] == ["step-00000003", "step-00000004"]


def test_gradient_checkpointing_gives_the_same_gradients(tiny_dir: Path, examples: dict) -> None:
    """Recomputing activations in backward changes memory, never the gradients."""
    grads = {}
    for checkpointing in (False, True):
        loaded, _, plan, _ = _setup(tiny_dir, examples, "stage2", ("asr_0",), lora_dropout=0.0)
        loaded.model.model.gradient_checkpointing = checkpointing
        loaded.model.model.layers.train()
        loss = combine(train_step_terms(loaded.model, examples["asr_0"], plan.stage), plan.stage)
        loss.backward()
        grads[checkpointing] = {n: p.grad.clone() for n, p in plan.parameters.items() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) == len(plan.parameters)
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, atol=1e-6, rtol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------- precision


def test_precision_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    stage, cpu, cuda = resolve_stage("stage2"), torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("auto", stage, cpu) is None  # CPU: the frozen weights' dtype
    assert resolve_precision("fp32", stage, cuda) is None
    assert resolve_precision("bf16", stage, cpu) is torch.bfloat16  # forced: any device
    assert resolve_precision("fp16", stage, cpu) is torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_precision("auto", stage, cuda) is torch.bfloat16
    assert resolve_precision("auto", resolve_stage("stage2", {"bf16": False}), cuda) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)  # e.g. a V100: fp16 + loss scaling
    assert resolve_precision("auto", stage, cuda) is torch.float16
    with pytest.raises(UsageError, match="precision"):
        resolve_precision("fp8", stage, cpu)


@pytest.mark.parametrize(("stage_name", "ids"), [("stage1", ("asr_0",)), ("stage2", ("asr_0",)),
                                                 ("stage4", ("unit_4",))])  # fmt: skip
def test_16_bit_models_train_fp32_master_weights(tiny_dir: Path, examples: dict, stage_name: str,
                                                 ids: tuple[str, ...]) -> None:  # fmt: skip
    """A bf16 model (`--dtype bf16`, the CUDA default) keeps its frozen weights in bf16 and trains fp32 copies
    of what it trains, so AdamW's small updates are not rounded away."""
    runtime = resolve_runtime(RuntimeRequest(device="cpu", dtype="bf16"))
    loaded, generator, plan, dataset = _setup(tiny_dir, examples, stage_name, ids, runtime=runtime,
                                              learning_rate=2e-3, lr_schedule="constant")  # fmt: skip
    assert loaded.model.model.layers[0].mlp.up_proj.get_base_layer().weight.dtype == torch.bfloat16  # frozen
    assert {p.dtype for p in plan.parameters.values()} == {torch.float32}
    trainer = Trainer(loaded.model, plan, dataset, total_steps=6, generator=generator)
    losses = [trainer.step()["loss"] for _ in range(6)]
    assert losses[-1] < 0.95 * losses[0]
    assert {p.dtype for p in plan.parameters.values()} == {torch.float32}


def test_bf16_autocast_trains_in_16_bits_with_fp32_weights(tiny_dir: Path, examples: dict) -> None:
    loaded, _, plan, dataset = _setup(tiny_dir, examples, "stage2", ("asr_0",), learning_rate=2e-3,
                                      lr_schedule="constant")  # fmt: skip
    losses = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        trainer = Trainer(loaded.model, plan, dataset, total_steps=6, settings=TrainerSettings(precision=dtype))
        with trainer._autocast(), torch.no_grad():
            losses[name] = float(combine(train_step_terms(loaded.model, examples["asr_0"], plan.stage), plan.stage))
    assert losses["bf16"] != losses["fp32"]  # the forward really ran in bf16 ...
    assert abs(losses["bf16"] - losses["fp32"]) < 0.05 * losses["fp32"]  # ... and is close to fp32
    records = [trainer.step() for _ in range(6)]
    assert records[-1]["loss"] < 0.95 * records[0]["loss"]
    assert all(p.dtype == torch.float32 for p in plan.parameters.values())  # master weights stay fp32


def test_fp16_uses_loss_scaling_and_resumes_it(tiny_dir: Path, examples: dict, tmp_path: Path) -> None:
    loaded, _, plan, dataset = _setup(tiny_dir, examples, "stage1", ("asr_0",), learning_rate=1e-3)
    trainer = Trainer(loaded.model, plan, dataset, total_steps=4, settings=TrainerSettings(precision=torch.float16))
    record = trainer.step()
    assert record["loss_scale"] > 1 and record["loss"] == record["loss"]  # scaled, and not NaN
    trainer.scaler.update(1024.0)  # a scale the fresh scaler would not have
    folder = trainer.save_checkpoint(tmp_path / "ckpt")
    loaded, _, plan, dataset = _setup(tiny_dir, examples, "stage1", ("asr_0",), learning_rate=1e-3)
    resumed = Trainer(loaded.model, plan, dataset, total_steps=4, settings=TrainerSettings(precision=torch.float16))
    resumed.load_checkpoint(folder)
    assert resumed.scaler.get_scale() == 1024.0


def test_qlora_trains_lora_on_a_frozen_4bit_base(tiny_dir: Path, examples: dict) -> None:
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    runtime = resolve_runtime(RuntimeRequest(device="cpu", dtype="fp32", quantization="4bit"))
    loaded, _, plan, dataset = _setup(tiny_dir, examples, "stage2", ("asr_0",), runtime=runtime,
                                      learning_rate=2e-3, lr_schedule="constant")  # fmt: skip
    base = loaded.model.model.layers[0].self_attn.q_proj.get_base_layer()
    assert isinstance(base, bnb.nn.Linear4bit) and base.weight.dtype == torch.uint8
    assert not base.weight.requires_grad and all(p.dtype == torch.float32 for p in plan.parameters.values())
    packed = base.weight.detach().clone()
    full = _setup(tiny_dir, examples, "stage2", ("asr_0",))[2]
    assert (plan.count, plan.frozen_count) == (full.count, full.frozen_count)  # 4-bit weights counted unpacked
    trainer = Trainer(loaded.model, plan, dataset, total_steps=6)
    losses = [trainer.step()["loss"] for _ in range(6)]
    assert losses[-1] < 0.95 * losses[0]
    assert torch.equal(base.weight, packed)  # the 4-bit base never changes


def test_a_micro_batch_is_the_padded_batchs_loss(tiny_dir: Path, examples: dict) -> None:
    """Examples processed one at a time with `batch_weights` give the gradient of the authors' padded batch:
    CE averaged over all the batch's targets, LCMR over the examples with a transcript."""
    ids = ("asr_0", "mm_1")
    loaded, _, plan, dataset = _setup(tiny_dir, examples, "stage2", ids, per_device_batch_size=2, lora_dropout=0.0)
    trainer = Trainer(loaded.model, plan, dataset, total_steps=1)
    trainer.optimizer.zero_grad(set_to_none=True)
    total, _, _, parts = trainer.accumulate_gradients()
    ours = {n: p.grad.clone() for n, p in plan.parameters.items()}

    trainer.optimizer.zero_grad(set_to_none=True)
    batch = [dataset.example_at(0), dataset.example_at(1)]
    terms = [train_step_terms(loaded.model, e, plan.stage) for e in batch]
    n = [int((e.labels[1:] != -100).sum()) for e in batch]  # supervised targets, counted here independently
    with_transcript = [t.lcmr for t in terms if t.lcmr is not None]
    assert len(with_transcript) == 2 and n[0] != n[1]  # unequal lengths: a plain mean of means would differ
    reference = (terms[0].ce * n[0] + terms[1].ce * n[1]) / sum(n) + plan.stage.lcmr_weight * torch.stack(with_transcript).mean()
    reference.backward()
    assert total == pytest.approx(float(reference.detach()), rel=1e-5)
    assert parts["ce"] == pytest.approx(float(((terms[0].ce * n[0] + terms[1].ce * n[1]) / sum(n)).detach()), rel=1e-5)
    for name, param in plan.parameters.items():
        torch.testing.assert_close(ours[name], param.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_resume_refuses_another_seed(tiny_dir: Path, examples: dict, tmp_path: Path) -> None:
    loaded, _, plan, dataset = _setup(tiny_dir, examples, "stage1", ("asr_0",), learning_rate=1e-3)
    trainer = Trainer(loaded.model, plan, dataset, total_steps=2)
    trainer.step()
    folder = trainer.save_checkpoint(tmp_path / "ckpt")
    other = TrainDataset(dataset.records, dataset.make_example, seed=dataset.seed + 1)
    with pytest.raises(UsageError, match="--seed"):
        Trainer(loaded.model, plan, other, total_steps=2).load_checkpoint(folder)

"""Training stages (docs/authors-behaviour.md#training-stages): exact trainable sets, the adapter layout
(docs/release-format.md#adapters), and that an exported adapter is what the loader (and so `lyra chat --model`)
picks up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lyra_cli.engine.model.adapters import Adapter, activate
from lyra_cli.engine.model.loader import LoadedModel, load_model
from lyra_cli.engine.model.runtime import RuntimeRequest, resolve_runtime
from lyra_cli.engine.model.speech_generator import load_speech_generator
from lyra_cli.engine.train.export import export_adapter, export_projector, export_speech_generator
from lyra_cli.engine.train.stages import (
    STAGES,
    Trains,
    describe,
    prepare_for_stage,
    resolve_stage,
    stage_from_file,
)
from lyra_cli.errors import UsageError

CPU = resolve_runtime(RuntimeRequest(device="cpu", dtype="fp32"))
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
PROJECTOR = {f"model.mm_speech_projector.linear{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}
NEVER_TRAINED = ("model.embed_tokens.", "model.norm.", "lm_head.", "model.vision_tower.", "model.speech_tower.")


def _load(folder: Path) -> LoadedModel:
    return load_model(folder, CPU)


def _generator(loaded: LoadedModel) -> torch.nn.Module:
    generator = load_speech_generator(loaded.model_dir, loaded.config, device="cpu", dtype=torch.float32)
    assert generator is not None
    return generator


# ---------------------------------------------------------------------------------------------- expected sets


def _module_shapes(loaded: LoadedModel) -> dict[str, tuple[int, int]]:
    """(in, out) of every LoRA target, from the config alone."""
    t = loaded.config.text
    q_out, kv_out = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    shapes = {"q_proj": (t.hidden_size, q_out), "k_proj": (t.hidden_size, kv_out), "v_proj": (t.hidden_size, kv_out),
              "o_proj": (q_out, t.hidden_size), "gate_proj": (t.hidden_size, t.intermediate_size),
              "up_proj": (t.hidden_size, t.intermediate_size), "down_proj": (t.intermediate_size, t.hidden_size)}  # fmt: skip
    return shapes


def _lora_names(n_layers: int, adapter: str) -> set[str]:
    modules = [f"self_attn.{m}" for m in ATTN] + [f"mlp.{m}" for m in MLP]
    return {f"model.layers.{i}.{m}.lora_{ab}.{adapter}.weight" for i in range(n_layers) for m in modules for ab in "AB"}


def _projector_count(loaded: LoadedModel) -> int:
    s, h = loaded.config.speech, loaded.config.text.hidden_size
    d_in = s.ds_rate * s.encoder_hidden_size
    return (d_in + 1) * s.projector_hidden + (s.projector_hidden + 1) * h


def _lora_count(loaded: LoadedModel, r: int) -> int:
    per_layer = sum(r * (d_in + d_out) for d_in, d_out in _module_shapes(loaded).values())
    return loaded.config.text.num_layers * per_layer


def _generator_count(loaded: LoadedModel) -> int:
    g, h = loaded.config.speech_generator, loaded.config.text.hidden_size
    d, ffn, units = g.hidden_size, g.intermediate_size, g.unit_vocab_size + 1
    layer = 3 * (d * d + d) + d * d + 3 * d * ffn + 2 * d  # q/k/v with bias, o without, SwiGLU, two RMSNorms
    return (h * d + d) + g.num_layers * layer + (d * units + units)


@pytest.fixture(scope="module")
def loaded(tiny_dir: Path) -> LoadedModel:
    return _load(tiny_dir)


def _trainable(*modules: torch.nn.Module, prefixes: tuple[str, ...] = ("",)) -> set[str]:
    return {p + n for m, p in zip(modules, prefixes) for n, q in m.named_parameters() if q.requires_grad}


# ---------------------------------------------------------------------------------------------- registry


def test_the_registry_holds_the_papers_settings() -> None:
    s1, s2, s3, s4 = (STAGES[f"stage{i}"] for i in range(1, 5))
    stage1 = (s1.trains, s1.learning_rate, s1.epochs, s1.global_batch(), s1.max_length)
    assert stage1 == (Trains.PROJECTOR, 1e-3, 1, 256, 2048)
    assert (s2.adapter, s2.lora_r, s2.lora_alpha, s2.learning_rate, s2.global_batch(), s2.max_length) == (
        Adapter.SPEECH, 64, 16.0, 2e-4, 128, 8192)  # fmt: skip
    assert s2.lcmr and (s2.lcmr_weight, s2.lcmr_temperature, s2.lcmr_gamma) == (0.5, 0.06, 0.1)
    assert s2.lcmr_config() is not None and s3.lcmr_config() is None
    assert (s3.adapter, s3.lora_r, s3.lora_alpha, s3.learning_rate, s3.epochs, s3.global_batch(), s3.max_length) == (
        Adapter.LONG_SPEECH, 128, 256.0, 1e-4, 3, 32, 131072)  # fmt: skip
    assert (s4.trains, s4.learning_rate, s4.warmup_ratio, s4.epochs, s4.global_batch(), s4.max_length) == (
        Trains.SPEECH_GENERATOR, 2e-4, 0.09, 3, 32, 16384)  # fmt: skip
    for s in (s1, s2, s3):
        assert s.warmup_ratio == 0.03
    for s in STAGES.values():
        assert (s.weight_decay, s.lr_schedule, s.grad_accumulation, s.lora_dropout, s.bf16, s.gradient_checkpointing) == (
            0.0, "cosine", 1, 0.05, True, True)  # fmt: skip


def test_resolve_stage_applies_and_checks_overrides(tmp_path: Path) -> None:
    stage = resolve_stage("stage2", {"learning_rate": "1e-5", "lora-r": 8, "lcmr": False, "grad_accumulation": 4})
    assert (stage.learning_rate, stage.lora_r, stage.lcmr, stage.grad_accumulation) == (1e-5, 8, False, 4)
    with pytest.raises(UsageError) as err:
        resolve_stage("stage5", {})
    assert "`stage5`" in err.value.message and "stage1, stage2, stage3, stage4" in err.value.hint
    with pytest.raises(UsageError, match="unknown setting `lr`"):
        resolve_stage("stage1", {"lr": 1e-3})
    with pytest.raises(UsageError, match="unknown setting `adapter`"):
        resolve_stage("stage2", {"adapter": "long_speech"})  # what a stage trains is fixed
    with pytest.raises(UsageError, match="`epochs` must be a int"):
        resolve_stage("stage1", {"epochs": 1.5})
    with pytest.raises(UsageError, match="learning_rate must be > 0"):
        resolve_stage("stage1", {"learning_rate": 0})
    (tmp_path / "s.json").write_text(json.dumps({"stage": "stage3", "epochs": 2, "max_length": 4096}))
    assert (stage_from_file(tmp_path / "s.json", overrides={"epochs": 5}).epochs) == 5
    assert stage_from_file(tmp_path / "s.json").max_length == 4096
    pytest.importorskip("yaml")
    (tmp_path / "s.yaml").write_text("stage: stage1\nlearning_rate: 5.0e-4\n")
    assert stage_from_file(tmp_path / "s.yaml").learning_rate == 5e-4


# ---------------------------------------------------------------------------------------------- trainable sets


@pytest.mark.parametrize("name", ["stage1", "stage2", "stage3", "stage4"])
def test_each_stage_trains_exactly_its_part(tiny_dir: Path, name: str) -> None:
    loaded = _load(tiny_dir)  # fresh: preparing a stage injects adapters
    generator = _generator(loaded)
    stage = resolve_stage(name, {})
    plan = prepare_for_stage(loaded.model, stage, generator)
    trainable = _trainable(loaded.model, generator, prefixes=("", "speech_generator."))
    n_layers = loaded.config.text.num_layers
    if stage.trains is Trains.SPEECH_GENERATOR:
        expected = {"speech_generator." + n for n, _ in generator.named_parameters()}
        assert len(expected) == 2 + 2 + len(generator.layers) * (3 * 2 + 1 + 3 + 2)  # the generator's own layers
        count = _generator_count(loaded)
    elif stage.trains is Trains.PROJECTOR:
        expected, count = PROJECTOR, _projector_count(loaded)
    else:
        expected = PROJECTOR | _lora_names(n_layers, stage.adapter.value)
        count = _projector_count(loaded) + _lora_count(loaded, stage.lora_r)
    assert trainable == expected
    assert plan.names == sorted(expected)
    assert plan.count == count
    llm_side = [n for n in trainable if not n.startswith("speech_generator.")]
    assert not any(n.startswith(NEVER_TRAINED) or "layernorm" in n for n in llm_side)
    assert f"{count:,}" in describe(plan)


def test_lora_stage_starts_from_a_fresh_adapter_that_changes_nothing(tiny_dir: Path) -> None:
    loaded = _load(tiny_dir)  # ships a trained `speech` adapter with r 8: training must not start from it
    ids = torch.arange(5, 17)[None]
    embeds = loaded.model.model.embed_tokens(ids)
    positions = torch.arange(ids.shape[1]).expand(3, 1, -1)
    plain = loaded.model.logits(loaded.model.model(embeds, positions, None))
    prepare_for_stage(loaded.model, resolve_stage("stage2", {}), None)
    q = loaded.model.model.layers[0].self_attn.q_proj
    assert q.lora_A["speech"].weight.shape[0] == 64 and q.active_adapters == ["speech"] and not q.disable_adapters
    fresh = loaded.model.logits(loaded.model.model(embeds, positions, None))
    torch.testing.assert_close(fresh, plain, rtol=0, atol=0)  # lora_B starts at zero


def test_stage1_starts_from_the_plain_llm(tiny_dir: Path) -> None:
    loaded = _load(tiny_dir)
    activate(loaded.model, loaded.adapters, Adapter.SPEECH)  # e.g. left on by an earlier speech request
    with_adapter = _logits(loaded)
    plan = prepare_for_stage(loaded.model, resolve_stage("stage1", {}), None, loaded.adapters)
    assert plan.projector is loaded.model.model.mm_speech_projector and loaded.adapters.active is Adapter.NONE
    stage1 = _logits(loaded)
    activate(loaded.model, loaded.adapters, Adapter.NONE)
    torch.testing.assert_close(stage1, _logits(loaded), rtol=0, atol=0)
    assert not torch.allclose(stage1, with_adapter)


def test_stage4_starts_from_the_speech_adapter_and_its_projector(tiny_dir: Path) -> None:
    """The authors' stage 4 runs the stage-2 model with speech_lora merged: here, the adapter switched on."""
    loaded = _load(tiny_dir)
    plan = prepare_for_stage(loaded.model, resolve_stage("stage4", {}), _generator(loaded), loaded.adapters)
    assert loaded.adapters.active is Adapter.SPEECH
    assert plan.projector is loaded.adapters.projector(Adapter.SPEECH)
    assert plan.projector is not loaded.model.model.mm_speech_projector
    stage4 = _logits(loaded)
    activate(loaded.model, loaded.adapters, Adapter.NONE)
    assert not torch.allclose(stage4, _logits(loaded))


def test_stage4_needs_a_generator(loaded: LoadedModel) -> None:
    with pytest.raises(UsageError, match="speech generator"):
        prepare_for_stage(loaded.model, resolve_stage("stage4", {}), None)


# ---------------------------------------------------------------------------------------------- exports


def _perturb_(params: dict[str, torch.nn.Parameter], seed: int) -> None:
    """Random bf16-representable values, as if trained: the bf16 export then loses nothing."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params.values():
            p.copy_((torch.randn(p.shape, generator=gen) * 0.05).to(torch.bfloat16).float())


def _logits(loaded: LoadedModel) -> torch.Tensor:
    ids = torch.arange(5, 17)[None]
    positions = torch.arange(ids.shape[1]).expand(3, 1, -1)
    return loaded.model.logits(loaded.model.model(loaded.model.model.embed_tokens(ids), positions, None))


def test_exported_adapter_is_what_the_loader_uses(tiny_dir: Path, tiny_copy: Path) -> None:
    trained = _load(tiny_dir)
    stage = resolve_stage("stage2", {"lora_r": 16})
    plan = prepare_for_stage(trained.model, stage, None)
    _perturb_(plan.parameters, seed=1)
    folder = export_adapter(trained.model, stage, tiny_copy)
    assert folder == tiny_copy / "speech_lora"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "r", "lora_alpha", "lora_dropout", "bias", "task_type")} == {
        "peft_type": "LORA", "r": 16, "lora_alpha": 16.0, "lora_dropout": 0.05, "bias": "none", "task_type": "CAUSAL_LM"}  # fmt: skip
    assert sorted(config["target_modules"]) == sorted(ATTN + MLP)
    assert (folder / "config.json").is_file()
    lora = load_file(str(folder / "adapter_model.safetensors"))
    n_layers = trained.config.text.num_layers
    assert set(lora) == {"base_model.model." + n.replace(".speech.", ".") for n in _lora_names(n_layers, "speech")}
    assert {v.dtype for v in lora.values()} == {torch.bfloat16}
    projector = torch.load(folder / "non_lora_trainables.bin", weights_only=True)
    assert set(projector) == {"model." + n for n in PROJECTOR}
    assert {v.dtype for v in projector.values()} == {torch.bfloat16}

    served = _load(tiny_copy)  # what `lyra chat --model tiny_copy` does
    params = dict(served.model.named_parameters())
    for key, tensor in lora.items():
        torch.testing.assert_close(params[key.removeprefix("base_model.model.").replace(".weight", ".speech.weight")],
                                   tensor.float(), rtol=0, atol=0)  # fmt: skip
    served_projector = served.adapters.projector(Adapter.SPEECH).state_dict()
    for key, tensor in projector.items():
        short = key.removeprefix("model.model.mm_speech_projector.")
        torch.testing.assert_close(served_projector[short], tensor.float())
        torch.testing.assert_close(plan.parameters[key.removeprefix("model.")].detach(), tensor.float())

    shipped = _load(tiny_dir)
    activate(shipped.model, shipped.adapters, Adapter.SPEECH)
    activate(served.model, served.adapters, Adapter.SPEECH)
    after = _logits(served)
    assert (after - _logits(shipped)).abs().max() > 1e-3  # the new adapter replaced the shipped one
    torch.testing.assert_close(after, _logits(trained), rtol=1e-5, atol=1e-5)  # and acts as it did in training


def test_export_replaces_the_whole_folder(tiny_copy: Path) -> None:
    (tiny_copy / "long_speech_lora" / "trainer_state.json").write_text("{}")
    trained = _load(tiny_copy)
    stage = resolve_stage("stage3", {})
    prepare_for_stage(trained.model, stage, None)
    folder = export_adapter(trained.model, stage, tiny_copy)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["adapter_config.json", "adapter_model.safetensors", "non_lora_trainables.bin", "config.json", "lyra_stage.json"])  # fmt: skip
    assert not [p for p in tiny_copy.iterdir() if p.name.startswith(".")]  # no staging leftovers
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 128


def test_stage1_projector_export(loaded: LoadedModel, tmp_path: Path) -> None:
    path = export_projector(loaded.model, tmp_path)
    assert path == tmp_path / "mm_speech_projector.bin"
    state = torch.load(path, weights_only=True)
    assert set(state) == PROJECTOR
    for key, tensor in state.items():
        assert tensor.dtype == torch.bfloat16
        expected = loaded.model.model.mm_speech_projector.state_dict()[key.removeprefix("model.mm_speech_projector.")]
        torch.testing.assert_close(tensor, expected.to(torch.bfloat16))


def test_stage4_export_loads_as_the_speech_generator(loaded: LoadedModel, tiny_copy: Path) -> None:
    generator = _generator(loaded)
    plan = prepare_for_stage(loaded.model, resolve_stage("stage4", {}), generator)
    _perturb_(plan.parameters, seed=2)
    path = export_speech_generator(generator, tiny_copy)
    assert path == tiny_copy / "speech_generator.safetensors"
    assert all(k.startswith("speech_generator.") for k in load_file(str(path)))
    reloaded = load_speech_generator(tiny_copy, loaded.config, device="cpu", dtype=torch.float32)
    assert reloaded is not None
    for (name, a), (_, b) in zip(generator.state_dict().items(), reloaded.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert not any(p.requires_grad for p in loaded.model.parameters())


def test_lora_export_refuses_other_stages(loaded: LoadedModel, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="trains no LoRA"):
        export_adapter(loaded.model, resolve_stage("stage1", {}), tmp_path)

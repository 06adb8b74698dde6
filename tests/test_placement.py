"""Placement: which device each part of the model lives on (`--device-map auto`, 8/4-bit staging).

Planning is pure arithmetic over the meta model's sizes and per-device budgets, so it is tested here on
CPU with budgets for GPUs this machine does not have. Running a model spread over several devices needs
those devices (benchmarks/RESULTS.md records the GPU checks).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lyra_cli.engine.model import checkpoint as ckpt
from lyra_cli.engine.model.config import load_config
from lyra_cli.engine.model.footprint import in_quantized_linear
from lyra_cli.engine.model.loader import _staging_device_for, load_model
from lyra_cli.engine.model.network import LyraForCausalLM
from lyra_cli.engine.model.placement import (
    Placement,
    module_sizes,
    parse_max_memory,
    placement_unit,
    plan_placement,
)
from lyra_cli.engine.model.runtime import Runtime, RuntimeRequest, resolve_runtime
from lyra_cli.errors import RuntimeSetupError, UsageError

GPU0, GPU1, CPU = torch.device("cuda", 0), torch.device("cuda", 1), torch.device("cpu")
BIG = 1 << 40


@pytest.fixture(scope="module")
def meta_model(tiny_dir: Path) -> tuple[LyraForCausalLM, int]:
    """The tiny model's module tree on the meta device (no weights), and its decoder depth."""
    from lyra_cli.engine.model.loader import _build_towers
    from lyra_cli.engine.model.towers import resolve_sources

    config = load_config(tiny_dir)
    sources = resolve_sources(tiny_dir, config)
    source = ckpt.load_config_and_source(tiny_dir, config, sources)
    vit, whisper = _build_towers(sources, source)
    model = ckpt.build_empty(lambda: LyraForCausalLM(config, vit, whisper))
    model.tie_weights()
    return model, config.text.num_layers


def test_parse_max_memory() -> None:
    assert parse_max_memory("0=20GiB, 1=512MiB,cpu=8GB") == {"cuda:0": 20 << 30, "cuda:1": 512 << 20, "cpu": 8 * 10**9}
    assert parse_max_memory("cpu=1.5GiB") == {"cpu": int(1.5 * (1 << 30))}


@pytest.mark.parametrize("spec", ["", "gpu0=1GiB", "0:1GiB", "0=lots", "0=12XB", "cpu="])
def test_parse_max_memory_refuses_what_it_cannot_read(spec: str) -> None:
    with pytest.raises(UsageError):
        parse_max_memory(spec)


def test_module_sizes_count_every_weight_once(meta_model) -> None:
    model, n_layers = meta_model
    sizes = module_sizes(model, torch.bfloat16)
    unique = {id(p): p for p in model.parameters()}.values()
    assert sum(sizes.values()) == sum(p.numel() for p in unique) * 2
    assert set(sizes) == {"", "model.norm", *(f"model.layers.{i}" for i in range(n_layers))} | (
        set() if model.config.text.tie_word_embeddings else {"lm_head"}
    )


def test_quantized_layers_are_planned_at_their_packed_size(meta_model) -> None:
    model, _ = meta_model
    full, int8, nf4 = (module_sizes(model, torch.bfloat16, q)["model.layers.0"] for q in ("none", "8bit", "4bit"))
    assert nf4 < int8 < full
    linears = sum(p.numel() for n, p in model.model.layers[0].named_parameters() if n.endswith("_proj.weight"))
    assert full - int8 == linears  # 2 bytes -> 1 byte per linear weight; norms and biases unchanged


def test_plan_fills_devices_in_order_and_never_goes_back(meta_model) -> None:
    model, n_layers = meta_model
    sizes = module_sizes(model, torch.bfloat16)
    layer = sizes["model.layers.0"]
    budgets = [(GPU0, sizes[""] + layer), (GPU1, layer), (CPU, BIG)]
    placement = plan_placement(sizes, n_layers, budgets)
    assert placement.main == GPU0 and placement.spread
    layer_devices = [placement.device_for(f"model.layers.{i}.mlp.up_proj.weight") for i in range(n_layers)]
    assert layer_devices == [GPU0, GPU1] + [CPU] * (n_layers - 2)
    assert placement.device_for("model.norm.weight") == CPU
    assert placement.device_for("model.embed_tokens.weight") == GPU0
    assert placement.device_for("model.speech_tower.speech_tower.conv1.weight") == GPU0
    assert "cuda:0 inputs + layer 0" in placement.describe() and "cuda:1 layer 1" in placement.describe()


def test_a_tied_lm_head_stays_with_the_embeddings(meta_model) -> None:
    model, n_layers = meta_model
    sizes = module_sizes(model, torch.bfloat16)
    budgets = [(GPU0, sizes[""]), (CPU, BIG)]
    placement = plan_placement(sizes, n_layers, budgets, tied_lm_head=True)
    assert placement.device_for("model.layers.0") == CPU
    assert placement.device_for("lm_head.weight") == GPU0
    untied = plan_placement(sizes, n_layers, budgets, tied_lm_head=False)
    assert untied.device_for("lm_head.weight") == CPU


def test_everything_fits_on_one_gpu_means_no_spread(meta_model) -> None:
    model, n_layers = meta_model
    placement = plan_placement(module_sizes(model, torch.bfloat16), n_layers, [(GPU0, BIG), (CPU, BIG)])
    assert not placement.spread and placement.describe() == f"cuda:0 inputs + layers 0–{n_layers - 1} + lm_head"


def test_a_model_too_big_for_every_device_is_refused_with_the_options(meta_model) -> None:
    model, n_layers = meta_model
    sizes = module_sizes(model, torch.bfloat16)
    with pytest.raises(RuntimeSetupError, match="needs .* GiB") as info:
        plan_placement(sizes, n_layers, [(GPU0, sizes[""]), (CPU, sizes["model.layers.0"])])
    assert "--load-4bit" in (info.value.hint or "")
    with pytest.raises(RuntimeSetupError, match="embeddings and towers"):
        plan_placement(sizes, n_layers, [(GPU0, 1), (CPU, BIG)])


def test_placement_unit() -> None:
    assert placement_unit("model.layers.12.self_attn.q_proj.lora_A.speech.weight") == "model.layers.12"
    assert placement_unit("model.norm.weight") == "model.norm"
    assert placement_unit("lm_head.weight") == "lm_head"
    assert placement_unit("model.vision_tower.vision_tower.merger.mlp.0.weight") == ""


def test_quantized_linears_are_staged_on_the_cpu() -> None:
    """With 8/4-bit the decoder's linear weights are read onto the CPU and quantized onto their device layer
    by layer, so the GPU never holds them in full precision; everything else goes straight to its device."""
    placement = Placement(GPU0, {"model.layers.1": GPU1})
    runtime = Runtime(GPU0, torch.bfloat16, "4bit")
    device_for = _staging_device_for(runtime, placement)
    assert device_for("model.layers.1.self_attn.q_proj.weight") == CPU
    assert device_for("model.layers.1.self_attn.q_proj.bias") == CPU
    assert device_for("model.layers.1.input_layernorm.weight") == GPU1
    assert device_for("model.embed_tokens.weight") == GPU0
    assert _staging_device_for(Runtime(GPU0, torch.bfloat16, "none"), placement)("model.layers.1.mlp.up_proj.weight") == GPU1
    assert not in_quantized_linear("model.vision_tower.vision_tower.blocks.0.attn.proj.weight")


def test_device_map_auto_without_a_gpu_keeps_everything_on_the_cpu(tiny_dir: Path) -> None:
    runtime = resolve_runtime(RuntimeRequest(device="auto", dtype="fp32", device_map="auto"))
    if runtime.device.type == "cuda":
        pytest.skip("a GPU is visible")
    loaded = load_model(tiny_dir, runtime)
    assert not loaded.placement.spread
    assert {p.device.type for p in loaded.model.parameters()} == {"cpu"}
    assert any("device map auto" in reason and "no GPU" in reason for reason in runtime.reasons)


@pytest.mark.parametrize(
    "request_",
    [
        RuntimeRequest(device="cpu", device_map="auto"),
        RuntimeRequest(max_memory="0=1GiB"),
        RuntimeRequest(device_map="auto", max_memory="zero=1GiB"),
        RuntimeRequest(device_map="balanced"),
    ],
    ids=["map-with-cpu", "memory-without-map", "bad-memory", "unknown-map"],
)
def test_device_map_usage_errors(request_: RuntimeRequest) -> None:
    with pytest.raises(UsageError):
        request_.validate()


def test_max_memory_naming_a_gpu_that_is_not_there_is_refused() -> None:
    from lyra_cli.engine.model.placement import auto_budgets

    with pytest.raises(RuntimeSetupError, match="cuda:7"):
        auto_budgets({"cuda:7": 1 << 30, "cpu": 1 << 30})

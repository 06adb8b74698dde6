"""Loading the release layout: every key accounted for, broken folders named precisely."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lyra_cli.engine.model.checkpoint import SPEECH_PREFIX, main_weight_source
from lyra_cli.engine.model.loader import load_model
from lyra_cli.engine.model.runtime import RuntimeRequest, resolve_runtime
from lyra_cli.errors import CheckpointError

CPU = resolve_runtime(RuntimeRequest(device="cpu", dtype="fp32"))


def _index(folder: Path) -> dict:
    return json.loads((folder / "model.safetensors.index.json").read_text())


def test_tiny_layout_matches_the_release(tiny_dir: Path) -> None:
    names = {p.name for p in tiny_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
            "speech_lora", "long_speech_lora", "model_zoo"} <= names  # fmt: skip
    for adapter in ("speech_lora", "long_speech_lora"):
        files = {p.name for p in (tiny_dir / adapter).iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", "non_lora_trainables.bin", "config.json"} <= files
    keys = set(_index(tiny_dir)["weight_map"])
    assert "model.layers.0.self_attn.q_proj.bias" in keys
    assert "model.vision_tower.vision_tower.merger.mlp.0.weight" in keys
    assert "model.speech_tower.speech_tower.layers.0.self_attn.k_proj.weight" in keys
    assert "model.mm_speech_projector.linear1.weight" in keys and "lm_head.weight" in keys


def test_every_checkpoint_key_is_loaded(tiny_dir: Path) -> None:
    loaded = load_model(tiny_dir, CPU)
    keys = set(_index(tiny_dir)["weight_map"])
    params = {n.replace(".base_layer", "") for n, _ in loaded.model.named_parameters() if "lora_" not in n}
    assert params == keys and loaded.unused_keys == []
    stored = load_file(str(tiny_dir / _index(tiny_dir)["weight_map"]["model.norm.weight"]))["model.norm.weight"]
    assert torch.equal(loaded.model.model.norm.weight, stored.float())


def test_removed_key_is_named(tiny_copy: Path) -> None:
    index = _index(tiny_copy)
    shard = tiny_copy / index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    state = load_file(str(shard))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(shard))
    del index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    (tiny_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(tiny_copy, CPU)


def test_removed_shard_is_named(tiny_copy: Path) -> None:
    shard = sorted(tiny_copy.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        main_weight_source(tiny_copy)


def test_shape_mismatch_is_an_error(tiny_copy: Path) -> None:
    config = json.loads((tiny_copy / "config.json").read_text())
    config["intermediate_size"] = 96
    (tiny_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="shape"):
        load_model(tiny_copy, CPU)


def test_tower_weights_fall_back_to_the_tower_folder(tiny_copy: Path) -> None:
    """Released checkpoints may keep the Whisper weights only in model_zoo/audio/<whisper>."""
    reference = load_model(tiny_copy, CPU).model.model.speech_tower.speech_tower.conv1.weight.clone()
    index = _index(tiny_copy)
    tower_shard = tiny_copy / index["weight_map"][SPEECH_PREFIX + "conv1.weight"]
    state = load_file(str(tower_shard))
    whisper = {"model.encoder." + k[len(SPEECH_PREFIX):]: v for k, v in state.items() if k.startswith(SPEECH_PREFIX)}
    rest = {k: v for k, v in state.items() if not k.startswith(SPEECH_PREFIX)}
    config = json.loads((tiny_copy / "config.json").read_text())
    save_file(whisper, str(tiny_copy / config["mm_speech_tower"] / "model.safetensors"))
    save_file(rest, str(tower_shard))
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not k.startswith(SPEECH_PREFIX)}
    (tiny_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    loaded = load_model(tiny_copy, CPU)
    assert torch.equal(loaded.model.model.speech_tower.speech_tower.conv1.weight, reference)


def test_not_a_lyra_config(tiny_copy: Path) -> None:
    config = json.loads((tiny_copy / "config.json").read_text())
    config["model_type"] = "llama"
    (tiny_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="llama"):
        load_model(tiny_copy, CPU)


@pytest.mark.parametrize("name,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_every_weight_is_loaded_in_the_requested_dtype(tiny_dir: Path, name: str, dtype: torch.dtype) -> None:
    loaded = load_model(tiny_dir, resolve_runtime(RuntimeRequest(device="cpu", dtype=name)))
    wrong = [n for n, p in loaded.model.named_parameters() if p.is_floating_point() and p.dtype != dtype]
    assert wrong == []

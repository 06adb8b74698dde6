"""benchmarks/release_shapes.py: release-shaped random checkpoints (names, shapes, sizes, layout, loadable)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lyra_cli.engine.model.footprint import NF4_BYTES, NF4_OVERHEAD_BYTES, is_quantized_weight
from lyra_cli.engine.model.towers import safetensors_header

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # the benchmarks live beside the package, not in it
    sys.path.insert(0, str(REPO))

from benchmarks.release_scale import lyra_info_memory, predicted_gib  # noqa: E402
from benchmarks.release_shapes import (  # noqa: E402
    RELEASE_VOCAB,
    SPECS,
    _numel,
    lora_shapes,
    main_shapes,
    meta_model,
    release_config,
    shard_plan,
    write_release,
)

IDS = {"<|endoftext|>": 1, "<|im_end|>": 2}
MB = 10**6


def _bytes(shapes: dict) -> int:
    return sum(2 * _numel(s) for s in shapes.values())


def test_mini_shards_match_the_release_listing() -> None:
    # docs/release-format.md#folder-layout: model-00001-of-00002 (5 GB) + model-00002-of-00002 (728 MB),
    # no lm_head (tied)
    spec = SPECS["mini"]
    model = meta_model(spec, release_config(spec, IDS))
    shapes = main_shapes(model, spec.tie_embeddings)
    shards = shard_plan(shapes)
    assert len(shards) == 2
    assert 4_990 * MB < _bytes(shards[0]) <= 5_000 * MB
    assert round(_bytes(shards[1]) / MB) == 728
    assert "lm_head.weight" not in shapes
    assert shapes["model.embed_tokens.weight"] == (RELEASE_VOCAB, 1536)
    assert shapes["model.mm_speech_projector.linear1.weight"] == (2048, 6400)
    assert shapes["model.speech_tower.speech_tower.conv1.weight"] == (1280, 128, 3)
    assert shapes["model.vision_tower.vision_tower.merger.mlp.2.weight"] == (1536, 5120)


def test_base_adapter_and_projector_sizes_match_the_release() -> None:
    # docs/release-format.md#adapters: Base speech_lora adapter_model.safetensors 323 MB (r = 64),
    # non_lora_trainables.bin 40.9 MB
    spec = SPECS["base"]
    model = meta_model(spec, release_config(spec, IDS))
    rank, _ = spec.lora[next(iter(spec.lora))]
    assert round(_bytes(lora_shapes(model.model.layers, rank)) / MB) == 323
    projector = {k: tuple(p.shape) for k, p in model.model.mm_speech_projector.named_parameters()}
    assert round(_bytes(projector) / MB, 1) == 40.9
    assert "lm_head.weight" in main_shapes(model, spec.tie_embeddings)  # Qwen2-VL-7B does not tie


@pytest.fixture(scope="module")
def smoke_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("release")
    write_release(root, "smoke")
    return root


def test_smoke_release_has_the_authors_layout(smoke_root: Path) -> None:
    spec = SPECS["smoke"]
    model_dir = smoke_root / "work_dirs" / spec.name
    for name in ("config.json", "generation_config.json", "model.safetensors.index.json",
                 "speech_generator.safetensors", "speech_lora/adapter_model.safetensors",
                 "long_speech_lora/non_lora_trainables.bin", "long_speech_lora/adapter_config.json"):  # fmt: skip
        assert (model_dir / name).is_file(), name
    for folder in (spec.vision_dir, spec.speech_dir):
        assert {"config.json", "preprocessor_config.json", "model.safetensors"} <= {
            p.name for p in (smoke_root / folder).iterdir()
        }
    assert {"config.json", "g_00500000"} <= {p.name for p in (smoke_root / "model_zoo/audio/vocoder").iterdir()}
    projector = torch.load(model_dir / "speech_lora/non_lora_trainables.bin", weights_only=True)
    assert projector and all(k.startswith("model.model.mm_speech_projector.") for k in projector)
    assert all(v.dtype == torch.bfloat16 for v in projector.values())


def test_tower_folders_hold_the_main_shards_tensors(smoke_root: Path) -> None:
    model_dir = smoke_root / "work_dirs" / SPECS["smoke"].name
    shard = next(model_dir.glob("model-*.safetensors"))
    tower = smoke_root / SPECS["smoke"].speech_dir / "model.safetensors"
    with safe_open(str(shard), "pt") as main, safe_open(str(tower), "pt") as folder:
        key = "model.speech_tower.speech_tower.layers.0.fc1.weight"
        assert torch.equal(main.get_tensor(key), folder.get_tensor("model.encoder.layers.0.fc1.weight"))
        assert main.get_tensor(key).std() > 0


def test_smoke_release_loads_and_answers_an_image_and_speech_question(smoke_root: Path, real: Path) -> None:
    from lyra_cli.engine.model.runtime import RuntimeRequest, resolve_runtime
    from lyra_cli.engine.run.generate import SamplingConfig
    from lyra_cli.engine.run.pipeline import Engine, read_media
    from lyra_cli.engine.run.prompt import Conversation

    model_dir = smoke_root / "work_dirs" / SPECS["smoke"].name
    assert not (model_dir / "model_zoo").exists()  # the towers resolve from the model folder's parents
    engine = Engine.load(model_dir, resolve_runtime(RuntimeRequest(device="cpu")))
    assert engine.loaded.unused_keys == []
    engine.loaded.end_ids = set()
    parts = [engine.encode(read_media("image", real / "extreme_ironing.jpg")),
             engine.encode(read_media("speech", real / "extreme_ironing.mp3"))]  # fmt: skip
    done = list(engine.respond(Conversation(), parts, SamplingConfig(max_new_tokens=3)))[-1]
    assert done.new_tokens == 3 and done.adapter == "speech"


def _parameters(path: Path) -> dict[str, int]:
    return {key: _numel(entry["shape"]) for key, entry in safetensors_header(path).items()}


def test_lyra_info_predicts_the_stored_weights_at_each_precision(smoke_root: Path) -> None:
    """The benchmark's prediction is `lyra info --json` run from the root: bf16 is 2 bytes per stored
    parameter (shards + LoRA), 8-bit 1 byte per decoder linear weight + a 4-byte scale per row, 4-bit NF4."""
    model_dir = smoke_root / "work_dirs" / SPECS["smoke"].name
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    shards: dict[str, int] = {}
    for name in sorted(set(index["weight_map"].values())):
        shards |= _parameters(model_dir / name)
    assert 2 * sum(shards.values()) == index["metadata"]["total_size"]  # all bf16
    lora = sum(sum(_parameters(model_dir / f / "adapter_model.safetensors").values())
               for f in ("speech_lora", "long_speech_lora"))  # fmt: skip
    quantized = {k: n for k, n in shards.items() if is_quantized_weight(k)}
    rows = sum(safetensors_header(model_dir / index["weight_map"][k])[k]["shape"][0] for k in quantized)
    rest = sum(shards.values()) + lora - sum(quantized.values())

    info = lyra_info_memory(smoke_root, model_dir, "cpu")
    assert info["sources"]["vision_tower"] == str(smoke_root / SPECS["smoke"].vision_dir)
    assert info["parameters_loaded"] == sum(shards.values()) + lora
    weights = {precision: row["weights_bytes"] for precision, row in info["rows"].items()}
    assert weights["bf16"] == 2 * (sum(shards.values()) + lora)
    assert weights["8-bit"] == 2 * rest + sum(quantized.values()) + 4 * rows
    assert weights["4-bit"] == round(2 * rest + sum(quantized.values()) * (NF4_BYTES + NF4_OVERHEAD_BYTES))
    config = json.loads((model_dir / "config.json").read_text())
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    kv = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * 1000 * 2  # K and V, bf16
    assert predicted_gib(info, "4bit")["total_gib"] * (1 << 30) == weights["4-bit"] + kv

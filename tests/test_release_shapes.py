"""benchmarks/release_shapes.py: release-shaped random checkpoints (names, shapes, sizes, layout, loadable)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # the benchmarks live beside the package, not in it
    sys.path.insert(0, str(REPO))

from benchmarks.release_scale import ensure_zoo_visible, predict_memory  # noqa: E402
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
    from lyra_cli.engine.generate import SamplingConfig
    from lyra_cli.engine.pipeline import Engine, read_media
    from lyra_cli.engine.prompt import Conversation
    from lyra_cli.engine.runtime import RuntimeRequest, resolve_runtime

    model_dir = smoke_root / "work_dirs" / SPECS["smoke"].name
    ensure_zoo_visible(smoke_root, model_dir)
    engine = Engine.load(model_dir, resolve_runtime(RuntimeRequest(device="cpu")))
    assert engine.loaded.unused_keys == []
    engine.loaded.end_ids = set()
    parts = [engine.encode(read_media("image", real / "extreme_ironing.jpg")),
             engine.encode(read_media("speech", real / "extreme_ironing.mp3"))]  # fmt: skip
    done = list(engine.respond(Conversation(), parts, SamplingConfig(max_new_tokens=3)))[-1]
    assert done.new_tokens == 3 and done.adapter == "speech"


def test_predicted_memory_counts_the_files_and_shrinks_with_quantization(smoke_root: Path) -> None:
    model_dir = smoke_root / "work_dirs" / SPECS["smoke"].name
    stored = json.loads((model_dir / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    bf16 = predict_memory(model_dir, "none")
    assert bf16["weights_gib"] * (1 << 30) == pytest.approx(stored)  # all bf16: the shards' tensor bytes
    assert predict_memory(model_dir, "8bit")["weights_gib"] < bf16["weights_gib"]
    assert predict_memory(model_dir, "4bit")["weights_gib"] < predict_memory(model_dir, "8bit")["weights_gib"]

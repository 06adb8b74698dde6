"""Towers, image processor settings and the vocoder are found as the authors' code finds them (towers.py).

Contracts: a checkpoint laid out as the authors' README lays it out (the model in `work_dirs/<name>/`, the
towers and the vocoder only in `model_zoo/` at the root) gives the same logits, units and waveform as the
towers-inside layout, from the root and from any other working directory; the flags override; the
working directory comes before the model folder; without a tower folder the load either recognises a
known encoder from the weights' exact shapes (and says so) or stops naming the folder and the flag —
never a different answer.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import init_empty_weights
from transformers import Qwen2VLVisionConfig, WhisperConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import (
    Qwen2VisionTransformerPretrainedModel,
)
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from lyra_cli.audio.io import load_audio
from lyra_cli.commands.common import header_lines
from lyra_cli.engine.model import footprint, towers
from lyra_cli.engine.model.config import load_config
from lyra_cli.engine.model.runtime import RuntimeRequest, resolve_runtime
from lyra_cli.engine.model.tiny import SPEECH_TOWER_DIR, VISION_TOWER_DIR
from lyra_cli.engine.model.towers import (
    KnownViT,
    KnownWhisper,
    TowerOverrides,
    resolve_sources,
)
from lyra_cli.engine.model.vision import load_image
from lyra_cli.engine.run.events import AudioChunk
from lyra_cli.engine.run.generate import SamplingConfig
from lyra_cli.engine.run.pipeline import DecodedImage, DecodedSpeech, Engine
from lyra_cli.engine.run.prompt import Conversation, TextPart, Turn
from lyra_cli.engine.run.voice import VoiceConfig, load_voice
from lyra_cli.errors import CheckpointError
from lyra_cli.main import run

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
IMAGE, SPEECH = EXAMPLES / "extreme_ironing.jpg", EXAMPLES / "extreme_ironing.mp3"
CPU = resolve_runtime(RuntimeRequest(device="cpu", dtype="fp32"))
ANSWER = SamplingConfig(max_new_tokens=8)
MODEL_NAME = "Lyra_Tiny"


def authors_layout(tiny_dir: Path, root: Path) -> Path:
    """The README's layout: the model in ROOT/work_dirs/Lyra_Tiny/, its towers and vocoder only in ROOT/model_zoo/."""
    model = root / "work_dirs" / MODEL_NAME
    shutil.copytree(tiny_dir, model)
    shutil.move(model / "model_zoo", root / "model_zoo")
    return model


@dataclass
class Answer:
    logits: torch.Tensor  # next-token logits after an image + speech + text prompt
    text: str
    units: list[int] | None = None  # the spoken answer (with `speak`)
    audio: np.ndarray | None = None


def answer(engine: Engine, *, speak: bool = True) -> Answer:
    """Both towers and the processor in the prompt, then the answer, spoken (generator and vocoder) or not."""
    parts = [engine.encode(DecodedImage(load_image(IMAGE), IMAGE.name)),
             engine.encode(DecodedSpeech(load_audio(SPEECH), SPEECH.name)), TextPart("what is unusual here?")]  # fmt: skip
    inputs, _ = engine.prepare(Conversation(turns=[Turn(list(parts))]))
    logits = engine.model.logits(engine.model.model(inputs.embeds, inputs.positions, None)[:, -1])[0]
    voice = load_voice(engine.loaded, None, VoiceConfig()) if speak else None
    events = list(engine.respond(Conversation(), parts, ANSWER, voice=voice))
    if not speak:
        return Answer(logits, events[-1].text)
    audio = np.concatenate([e.samples for e in events if isinstance(e, AudioChunk)])
    return Answer(logits, events[-1].text, events[-1].units, audio)


def assert_same(a: Answer, b: Answer) -> None:
    assert torch.equal(a.logits, b.logits)
    assert a.text == b.text
    if a.units is not None and b.units is not None:
        assert a.units == b.units and np.array_equal(a.audio, b.audio)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def reference(tiny_dir: Path) -> Answer:
    """The towers-inside layout (`--model tiny`)."""
    result = answer(Engine.load(tiny_dir, CPU))
    assert result.units and len(result.audio) > 0  # type: ignore[arg-type]  # a real spoken answer is compared
    return result


def test_authors_layout_answers_the_same_from_the_root_and_elsewhere(
    tiny_dir: Path, tmp_path: Path, reference: Answer, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = authors_layout(tiny_dir, tmp_path / "root")
    for cwd, rule in ((tmp_path / "root", "working directory"), (tmp_path / "elsewhere", "parent `../..`")):
        cwd.mkdir(exist_ok=True)
        monkeypatch.chdir(cwd)
        engine = Engine.load(model, CPU)
        assert_same(answer(engine), reference)
        header = "\n".join(header_lines(engine.loaded, str(model)))
        for component in ("vision tower", "image processor", "speech tower", "vocoder"):
            line = next(x for x in header.splitlines() if x.startswith(component))
            assert rule in line and str(tmp_path / "root" / "model_zoo") in line, line


def test_the_working_directory_comes_before_the_model_folder(
    tiny_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The authors' rule: a `model_zoo/` in the working directory wins over the model folder's own."""
    cwd = tmp_path / "cwd"
    shutil.copytree(tiny_copy / SPEECH_TOWER_DIR, cwd / SPEECH_TOWER_DIR)
    _set_heads(cwd / SPEECH_TOWER_DIR, 2)
    monkeypatch.chdir(cwd)
    speech = resolve_sources(tiny_copy, load_config(tiny_copy)).speech
    assert speech is not None and speech.located.path == Path.cwd() / SPEECH_TOWER_DIR
    assert speech.located.rule == "working directory"
    loaded = Engine.load(tiny_copy, CPU).loaded
    assert loaded.model.model.speech_tower.speech_tower.config.encoder_attention_heads == 2


def test_flags_override_every_rule(tiny_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    whisper, vit, vocoder = tmp_path / "w", tmp_path / "v", tmp_path / "voc"
    shutil.copytree(tiny_copy / SPEECH_TOWER_DIR, whisper)
    shutil.copytree(tiny_copy / VISION_TOWER_DIR, vit)
    shutil.copytree(tiny_copy / towers.VOCODER_PATH, vocoder)
    _set_heads(whisper, 2)
    monkeypatch.chdir(tmp_path)
    overrides = TowerOverrides(vision=vit, speech=whisper, vocoder=vocoder)
    loaded = Engine.load(tiny_copy, CPU, overrides).loaded
    assert loaded.model.model.speech_tower.speech_tower.config.encoder_attention_heads == 2
    lines = loaded.sources.lines()
    for flag, folder in (("--vision-tower", vit), ("--speech-tower", whisper), ("--vocoder", vocoder)):
        assert any(f"`{folder}` ({flag})" in line for line in lines), lines
    with pytest.raises(CheckpointError, match="--speech-tower"):
        Engine.load(tiny_copy, CPU, TowerOverrides(speech=tmp_path / "nowhere"))


def test_tower_weights_come_from_the_tower_folder_when_it_has_them(tiny_copy: Path) -> None:
    """The authors load the towers from their folders and drop the copies in the shards."""
    from safetensors.torch import load_file, save_file

    index = json.loads((tiny_copy / "model.safetensors.index.json").read_text())["weight_map"]
    shard = load_file(str(tiny_copy / index[towers.SPEECH_PREFIX + "conv1.weight"]))
    folder_weights = {"model.encoder." + k[len(towers.SPEECH_PREFIX):]: v * 2  # different from the shards' copy
                      for k, v in shard.items() if k.startswith(towers.SPEECH_PREFIX)}  # fmt: skip
    save_file(folder_weights, str(tiny_copy / SPEECH_TOWER_DIR / "model.safetensors"))
    loaded = Engine.load(tiny_copy, CPU).loaded
    conv1 = loaded.model.model.speech_tower.speech_tower.conv1.weight
    assert torch.equal(conv1, folder_weights["model.encoder.conv1.weight"].float())
    assert f"weights from `{tiny_copy / SPEECH_TOWER_DIR}`" in loaded.sources.speech.line()  # type: ignore[union-attr]
    assert loaded.unused_keys == []  # the shards' copies are dropped, not reported as unused


def _set_heads(whisper_dir: Path, heads: int) -> None:
    path = whisper_dir / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "encoder_attention_heads": heads}))


# -- without a tower folder: recognised, or a clear error --------------------------------------------------

# The tiny towers' shapes, as a table entry: only for these tests (no public encoder is this small).
TINY_WHISPER = KnownWhisper(("whisper-tiny-128",), d_model=64, layers=2, heads=1, ffn_dim=128, mel_bins=128)


def _tiny_vit(model_dir: Path) -> KnownViT:
    processor = json.loads((model_dir / VISION_TOWER_DIR / towers.PREPROCESSOR_FILE).read_text())
    return KnownViT("tiny ViT", load_config(model_dir).vision.tower_config, processor)  # type: ignore[union-attr]


def test_a_removed_whisper_folder_is_an_error_naming_the_folder_and_flag(tiny_copy: Path) -> None:
    shutil.rmtree(tiny_copy / SPEECH_TOWER_DIR)
    with pytest.raises(CheckpointError) as error:
        Engine.load(tiny_copy, CPU)
    assert SPEECH_TOWER_DIR in error.value.message and "no known Whisper encoder" in error.value.message
    assert "--speech-tower" in (error.value.hint or "")


def test_a_removed_whisper_folder_is_recognised_from_the_weights(
    tiny_copy: Path, reference: Answer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(towers, "KNOWN_WHISPER_ENCODERS", (*towers.KNOWN_WHISPER_ENCODERS, TINY_WHISPER))
    shutil.rmtree(tiny_copy / SPEECH_TOWER_DIR)
    engine = Engine.load(tiny_copy, CPU)
    assert_same(answer(engine, speak=False), reference)
    line = next(x for x in header_lines(engine.loaded, str(tiny_copy)) if x.startswith("speech tower"))
    assert "whisper-tiny-128 encoder recognised from its weights" in line
    assert f"folder `{SPEECH_TOWER_DIR}` not found" in line


def test_a_removed_vit_folder_needs_a_recognised_vit_for_its_processor(
    tiny_copy: Path, reference: Answer, monkeypatch: pytest.MonkeyPatch
) -> None:
    known = _tiny_vit(tiny_copy)
    shutil.rmtree(tiny_copy / VISION_TOWER_DIR)
    with pytest.raises(CheckpointError) as error:  # vision_config fixes the ViT, nothing fixes the processor
        Engine.load(tiny_copy, CPU)
    assert "image processor" in error.value.message and VISION_TOWER_DIR in error.value.message
    assert "--vision-tower" in (error.value.hint or "")
    monkeypatch.setattr(towers, "KNOWN_VITS", (*towers.KNOWN_VITS, known))
    engine = Engine.load(tiny_copy, CPU)
    assert_same(answer(engine, speak=False), reference)
    lines = engine.loaded.sources.lines()
    assert any(x.startswith("vision tower") and "vision_config in config.json" in x for x in lines), lines
    assert any(x.startswith("image processor") and "recognised" in x for x in lines), lines


def test_a_removed_vit_folder_without_vision_config_is_an_error(tiny_copy: Path) -> None:
    shutil.rmtree(tiny_copy / VISION_TOWER_DIR)
    config = json.loads((tiny_copy / "config.json").read_text())
    del config["vision_config"]
    (tiny_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="no `vision_config`"):
        Engine.load(tiny_copy, CPU)


def _meta_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in module.named_parameters()}


@pytest.mark.parametrize("known", towers.KNOWN_WHISPER_ENCODERS, ids=lambda k: k.names[0])
def test_every_known_whisper_is_recognised_from_transformers_shapes(known: KnownWhisper) -> None:
    """The shapes transformers gives an encoder of the entry's config (on the meta device: no memory)."""
    with init_empty_weights():
        encoder = WhisperEncoder(WhisperConfig(**known.config()))
    assert towers.recognise_whisper(_meta_shapes(encoder)) == known
    fewer_layers = {k: s for k, s in _meta_shapes(encoder).items() if not k.startswith(f"layers.{known.layers - 1}.")}
    assert towers.recognise_whisper(fewer_layers) is None  # the layer count is part of the match


@pytest.mark.parametrize("known", towers.KNOWN_VITS, ids=lambda k: k.name)
def test_every_known_vit_is_recognised_from_transformers_shapes(known: KnownViT) -> None:
    with init_empty_weights():
        vit = Qwen2VisionTransformerPretrainedModel(Qwen2VLVisionConfig(**known.vision_config))
    assert towers.recognise_vit(_meta_shapes(vit)) == known


def test_public_whisper_facts() -> None:
    """large-v3 and large-v3-turbo share one encoder with 128 mel bins; the older sizes have 80 (unusable)."""
    v3 = towers.recognise_whisper({"conv1.weight": (1280, 128, 3), "layers.0.fc1.weight": (5120, 1280),
                                   "embed_positions.weight": (1500, 1280),
                                   **{f"layers.{i}.fc2.weight": (1280, 5120) for i in range(32)}})  # fmt: skip
    assert v3 is not None and v3.heads == 20 and v3.name_for("model_zoo/audio/whisper-large-v3-turbo") == "whisper-large-v3-turbo"
    shapes = {"conv1.weight": (1024, 80, 3), "layers.0.fc1.weight": (4096, 1024), "embed_positions.weight": (1500, 1024),
              **{f"layers.{i}.fc2.weight": (1024, 4096) for i in range(24)}}  # fmt: skip
    shards = {towers.SPEECH_PREFIX + k: towers.TensorInfo(s, "BF16") for k, s in shapes.items()}
    resolved = towers.resolve_speech("model_zoo/audio/whisper-medium", Path("/nonexistent"), shards, None)
    assert resolved.recognised == "whisper-medium" and resolved.problem is not None
    assert "80 mel bins" in resolved.problem.message


# -- the vocoder --------------------------------------------------------------------------------------------


def test_a_missing_vocoder_names_the_place_and_flag(tiny_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.rmtree(tiny_copy / towers.VOCODER_PATH)
    monkeypatch.chdir(tmp_path)
    engine = Engine.load(tiny_copy, CPU)  # only spoken answers need it
    with pytest.raises(CheckpointError) as error:
        load_voice(engine.loaded, None, VoiceConfig())
    assert towers.VOCODER_PATH in error.value.message and "--vocoder" in (error.value.hint or "")


# -- lyra info ----------------------------------------------------------------------------------------------


def test_info_reads_the_authors_layout_without_torch(tiny_dir: Path, tmp_path: Path) -> None:
    model = authors_layout(tiny_dir, tmp_path)
    code = ("import sys, json; from lyra_cli.main import run; rc = run(['info', 'work_dirs/Lyra_Tiny', '--json']); "
            "print('TORCH', 'torch' in sys.modules, rc, file=sys.stderr)")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True)
    assert "TORCH False 0" in result.stderr
    described = json.loads(result.stdout)
    for key in ("vision_tower", "image_processor", "speech_tower", "vocoder"):
        source = described["sources"][key]
        assert source["found_by"] == "working directory" and source["problem"] is None, source
        assert Path(source["path"]).resolve().is_relative_to((tmp_path / "model_zoo").resolve())
    assert described["folder"] == "work_dirs/Lyra_Tiny" and model.is_dir()


def test_info_memory_counts_every_loaded_parameter(tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["info", str(tiny_dir), "--json", "--device", "cuda"]) == 0
    memory = json.loads(capsys.readouterr().out)["memory"]
    loaded = Engine.load(tiny_dir, CPU).loaded
    params = sum(p.numel() for p in loaded.model.parameters())
    rows = {row["precision"]: row for row in memory["rows"]}
    assert memory["compute_dtype"] == "bf16" and rows["bf16"]["weights_bytes"] == 2 * params
    assert rows["4-bit"]["weights_bytes"] < rows["8-bit"]["weights_bytes"] < rows["bf16"]["weights_bytes"]
    # KV cache: 2 (k, v) × layers × KV heads × head width × 1000 tokens × 2 bytes (bf16)
    text = loaded.config.text
    kv_per_1k = 2 * text.num_layers * text.num_kv_heads * text.head_dim * 1000 * 2
    assert (text.num_layers, text.num_kv_heads, text.head_dim) == (4, 2, 16)  # the tiny model: 512,000 bytes
    assert {row["kv_cache_bytes_per_1k_tokens"] for row in memory["rows"]} == {kv_per_1k}


def test_info_knows_the_adapter_folders_the_loader_reads() -> None:
    from lyra_cli.engine.model.adapters import ADAPTER_DIRS

    assert footprint.ADAPTER_FOLDERS == tuple(ADAPTER_DIRS.values())


def test_info_text_is_readable_and_shows_problems(tiny_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.rmtree(tiny_copy / SPEECH_TOWER_DIR)
    assert run(["info", "--model", str(tiny_copy)]) == 0
    out = capsys.readouterr().out
    speech = next(line for line in out.splitlines() if line.startswith("speech tower"))
    assert "no known Whisper encoder" in speech and "--speech-tower" in speech
    assert "{" not in out and "Resolved(" not in out  # text, not Python reprs
    assert any(line.strip().startswith("4-bit") and "per 1k tokens" in line for line in out.splitlines())

"""`lyra train merge`: an adapter folded into a full model folder answers as the adapter did."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lyra_cli.engine.model.adapters import ADAPTER_WEIGHTS_FILE, Adapter, activate
from lyra_cli.engine.model.loader import LoadedModel, load_model
from lyra_cli.engine.model.runtime import RuntimeRequest, resolve_runtime
from lyra_cli.engine.train.merge import merge_adapter
from lyra_cli.errors import CheckpointError
from lyra_cli.main import run

CPU = resolve_runtime(RuntimeRequest(device="cpu", dtype="fp32"))


def _logits(loaded: LoadedModel) -> torch.Tensor:
    ids = torch.arange(5, 17)[None]
    positions = torch.arange(ids.shape[1]).expand(3, 1, -1)
    with torch.no_grad():
        return loaded.model.logits(loaded.model.model(loaded.model.model.embed_tokens(ids), positions, None))


@pytest.fixture(scope="module")
def merged_fp32(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("merge") / "merged"
    report = merge_adapter(tiny_dir, Adapter.SPEECH, out, save_dtype="fp32")
    n_layers = json.loads((tiny_dir / "config.json").read_text())["num_hidden_layers"]
    assert report.merged_layers == 7 * n_layers and report.projector_tensors == 4
    assert report.dropped == ("speech_lora", "long_speech_lora")
    return out


def test_merged_weights_equal_the_adapter_switched_on(tiny_dir: Path, merged_fp32: Path) -> None:
    base = load_model(tiny_dir, CPU)
    activate(base.model, base.adapters, Adapter.SPEECH)
    merged = load_model(merged_fp32, CPU)
    assert merged.adapters.available == () and merged.adapters.merged is Adapter.SPEECH
    torch.testing.assert_close(_logits(merged), _logits(base), atol=2e-5, rtol=1e-5)
    for name, value in base.adapters.projector(Adapter.SPEECH).state_dict().items():
        torch.testing.assert_close(merged.model.model.mm_speech_projector.state_dict()[name], value, atol=0, rtol=0)
    activate(base.model, base.adapters, Adapter.NONE)
    assert not torch.allclose(_logits(merged), _logits(base))  # the merge really changed the weights


def test_merged_model_routes_speech_without_a_warning(merged_fp32: Path, caplog: pytest.LogCaptureFixture) -> None:
    merged = load_model(merged_fp32, CPU)
    with caplog.at_level(logging.WARNING):
        assert activate(merged.model, merged.adapters, Adapter.SPEECH) is Adapter.NONE
        activate(merged.model, merged.adapters, Adapter.LONG_SPEECH)  # not merged: still worth a warning
    assert [r.getMessage() for r in caplog.records if r.name == "lyra_cli.engine.model.adapters"] == [
        "the long_speech adapter is not in this model folder; using the plain LLM"
    ]


def test_cli_merge_answers_speech_like_the_adapter(tiny_dir: Path, tmp_path: Path, real: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    out = tmp_path / "merged"
    assert run(["train", "merge", "--model", str(tiny_dir), "--out", str(out), "--save-dtype", "fp32"]) == 0
    n_layers = json.loads((tiny_dir / "config.json").read_text())["num_hidden_layers"]
    assert f"{7 * n_layers} weight matrices merged, 4 projector tensors replaced" in capsys.readouterr().err
    question = ["chat", "--speech", str(real / "Hi.mp3"), "--text", "What was said?", "--json", "-q",
                "--max-new-tokens", "8", "--dtype", "fp32"]  # fmt: skip
    answers = {}
    for name, folder in (("adapter", tiny_dir), ("merged", out)):
        assert run([*question, "--model", str(folder)]) == 0
        answers[name] = json.loads(capsys.readouterr().out)
    assert answers["adapter"]["adapter"] == "speech"
    assert answers["merged"]["answer"] == answers["adapter"]["answer"]


def test_info_names_the_merged_adapter(merged_fp32: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["info", "--model", str(merged_fp32), "--json"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["adapters"] == [] and described["merged_adapter"] == "speech"


def test_default_keeps_the_stored_dtype(tiny_dir: Path, tmp_path: Path) -> None:
    out = merge_adapter(tiny_dir, Adapter.LONG_SPEECH, tmp_path / "m").out
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard = load_file(str(out / sorted(set(index["weight_map"].values()))[0]))
    assert {t.dtype for t in shard.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["merged_adapter"] == "long_speech"
    assert (out / "tokenizer.json").is_file() and (out / "speech_generator.safetensors").is_file()


def test_an_adapter_that_does_not_fit_leaves_nothing(tiny_copy: Path, tmp_path: Path) -> None:
    weights = tiny_copy / "speech_lora" / ADAPTER_WEIGHTS_FILE
    state = load_file(str(weights))
    key = next(k for k in state if k.endswith("lora_A.weight"))
    state[key.replace("layers.0.", "layers.99.")] = state[key].clone()
    state[key.replace("layers.0.", "layers.99.").replace("lora_A", "lora_B")] = state[key.replace("lora_A", "lora_B")].clone()
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match="layers.99"):
        merge_adapter(tiny_copy, Adapter.SPEECH, tmp_path / "m")
    assert list(tmp_path.iterdir()) == [tiny_copy]  # no output, no staging folder


def test_refuses_a_non_empty_output(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert run(["train", "merge", "--model", str(tiny_dir), "--out", str(tmp_path / "busy")]) == 1
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["notes.txt"]
    assert run(["train", "merge", "--model", str(tiny_dir), "--out", str(tmp_path / "x"), "--adapter", "vision"]) == 2

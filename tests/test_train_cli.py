"""`lyra train` end to end on the tiny model: dry run, a stage-2 run that `lyra chat` picks up, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers.synthetic import write_synthetic_set
from lyra_cli.main import run


@pytest.fixture(scope="module")
def train_json(real: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_set(tmp_path_factory.mktemp("synth"), real, n_records=6, seed=3)


def test_dry_run_prints_the_exact_trainable_count(tiny_dir: Path, train_json: Path, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    assert run(["train", "stage1", "--data", str(train_json), "--out", str(tmp_path), "--dry-run"]) == 0
    described = json.loads(capsys.readouterr().out)
    # stage 1 trains the projector only: linear1 (5·64 → 2048) and linear2 (2048 → 64), with biases
    assert described["trainable_parameters"] == 320 * 2048 + 2048 + 2048 * 64 + 64
    assert described["stage"]["learning_rate"] == 1e-3 and not list(tmp_path.iterdir())


def test_stage2_output_loads_in_chat_and_changes_its_answer(tiny_dir: Path, train_json: Path, tmp_path: Path,
                                                            real: Path, capsys) -> None:  # noqa: ANN001  # fmt: skip
    out = tmp_path / "run"
    args = ["train", "stage2", "--data", str(train_json), "--out", str(out), "--lr", "0.05"]  # no -q: it hides the notes
    assert run([*args, "--steps", "2"]) == 0
    assert run([*args, "--steps", "4"]) == 0  # resumes at step 2 from the checkpoint, continues to 4
    err = capsys.readouterr().err
    assert "resumed from" in err and "step 2" in err
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert _tensorboard_losses(out / "tensorboard") == pytest.approx({m["step"]: m["loss"] for m in metrics})
    trained = tmp_path / "model"
    shutil.copytree(tiny_dir, trained)
    shutil.rmtree(trained / "speech_lora")
    shutil.copytree(out / "speech_lora", trained / "speech_lora")
    question = ["chat", "--speech", str(real / "Hi.mp3"), "--text", "What was said?", "--json", "-q",
                "--max-new-tokens", "8"]  # fmt: skip
    answers = {}
    for name, folder in (("base", tiny_dir), ("trained", trained)):
        assert run([*question, "--model", str(folder)]) == 0
        answers[name] = json.loads(capsys.readouterr().out)
    assert answers["trained"]["adapter"] == "speech"
    assert answers["trained"]["answer"] != answers["base"]["answer"]


def _tensorboard_losses(folder: Path) -> dict[int, float]:
    """step -> train/loss from every event file in `folder` (one per run: the resumed run adds a second)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    losses = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag == "train/loss":
                    losses[event.step] = float(tensor_util.make_ndarray(value.tensor))
    return losses


def test_bad_records_are_counted_and_strict_fails(tiny_dir: Path, real: Path, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    data = write_synthetic_set(tmp_path / "bad", real, n_records=3, seed=1, with_bad=True)
    assert run(["train", "stage1", "--data", str(data), "--out", str(tmp_path / "o"), "--steps", "1"]) == 0
    assert "skipped:" in capsys.readouterr().err
    assert run(["train", "stage1", "--data", str(data), "--out", str(tmp_path / "o2"), "--strict"]) == 1
    assert capsys.readouterr().err.startswith("error: record")


def test_unknown_stage_is_a_usage_error(capsys, tmp_path: Path) -> None:  # noqa: ANN001
    assert run(["train", "stage9", "--data", "x.json", "--out", str(tmp_path)]) == 2
    assert "No such command" in capsys.readouterr().err


def test_a_deepspeed_config_sets_what_it_fixes(tiny_dir: Path, train_json: Path, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    authors = {"zero_optimization": {"stage": 3, "overlap_comm": True}, "bf16": {"enabled": "auto"},
               "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}  # fmt: skip
    (tmp_path / "zero3.json").write_text(json.dumps(authors))
    args = ["train", "stage2", "--data", str(train_json), "--out", str(tmp_path / "o"), "--dry-run"]
    assert run([*args, "--deepspeed", str(tmp_path / "zero3.json")]) == 0
    settings = json.loads(capsys.readouterr().out)["stage"]
    assert (settings["per_device_batch_size"], settings["grad_accumulation"], settings["zero_stage"]) == (4, 1, 3)
    fixed = {**authors, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 8,
             "gradient_clipping": 0.5, "bf16": {"enabled": False}}  # fmt: skip
    (tmp_path / "fixed.json").write_text(json.dumps(fixed))
    assert run([*args, "--deepspeed", str(tmp_path / "fixed.json"), "--grad-accum", "3"]) == 0  # flags win
    settings = json.loads(capsys.readouterr().out)["stage"]
    assert (settings["per_device_batch_size"], settings["grad_accumulation"]) == (2, 3)
    assert settings["max_grad_norm"] == 0.5 and settings["bf16"] is False
    (tmp_path / "broken.json").write_text("{")
    assert run([*args, "--deepspeed", str(tmp_path / "broken.json")]) == 1


def test_any_setting_is_a_flag(tiny_dir: Path, train_json: Path, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    args = ["train", "stage2", "--data", str(train_json), "--out", str(tmp_path / "o"), "--dry-run"]
    assert run([*args, "--set", "lora_r=8", "--set", "lcmr_weight=0.25", "--set", "lr_schedule=linear"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert (described["stage"]["lora_r"], described["stage"]["lcmr_weight"]) == (8, 0.25)
    assert described["stage"]["lr_schedule"] == "linear"
    assert set(described["stage"]["reference_only"]) == {"reference_devices", "zero_stage", "group_by_modality_length"}
    assert run([*args, "--set", "lora_r"]) == 2
    assert run([*args, "--set", "nonsense=1"]) == 2
    assert run([*args, "--set", "optimizer=sgd"]) == 2  # only the authors' AdamW is implemented


def test_records_over_max_length_are_skipped_and_counted(tiny_dir: Path, train_json: Path, tmp_path: Path,
                                                         capsys) -> None:  # noqa: ANN001  # fmt: skip
    args = ["train", "stage2", "--data", str(train_json), "--steps", "1", "--batch-size", "6",
            "--set", "max_length=400"]  # fmt: skip
    assert run([*args, "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert "skipped: longer than max_length 400" in err
    assert run([*args, "--out", str(tmp_path / "o2"), "--strict"]) == 1
    assert "over stage2's max_length 400" in capsys.readouterr().err

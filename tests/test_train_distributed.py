"""Data-parallel training: two processes started by `torchrun` (gloo on CPU) take the same steps as one
process accumulating both ranks' records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers.synthetic import write_synthetic_set
from lyra_cli.main import run

REPO = Path(__file__).resolve().parents[1]
STEPS = 2
# no dropout: with it, rank 1 draws other masks than a single process would for the same record
SETTINGS = {"lora_dropout": 0.0, "warmup_ratio": 0.0, "learning_rate": 0.02, "per_device_batch_size": 1}


@pytest.fixture(scope="module")
def train_json(real: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_set(tmp_path_factory.mktemp("synth"), real, n_records=6, seed=3)


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_ranks_equal_one_process_accumulating_their_records(tiny_dir: Path, train_json: Path,
                                                                tmp_path: Path) -> None:  # fmt: skip
    config = tmp_path / "stage.json"
    config.write_text(json.dumps(SETTINGS))
    common = ["train", "stage2", "--model", str(tiny_dir), "--data", str(train_json), "--config", str(config),
              "--steps", str(STEPS), "--device", "cpu", "--dtype", "fp32", "-q"]  # fmt: skip
    parallel = tmp_path / "parallel"
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "lyra_cli", *common, "--out", str(parallel)],
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert launched.returncode == 0, launched.stderr[-3000:]
    single = tmp_path / "single"
    assert run([*common, "--out", str(single), "--grad-accum", "2"]) == 0

    assert len(_losses(parallel)) == STEPS  # rank 0 alone logs
    torch.testing.assert_close(torch.tensor(_losses(parallel)), torch.tensor(_losses(single)), rtol=1e-5, atol=1e-6)
    ours = load_file(str(parallel / "speech_lora" / "adapter_model.safetensors"))
    theirs = load_file(str(single / "speech_lora" / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys()
    changed = 0
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key].float(), value.float(), rtol=0, atol=1e-2 * value.float().abs().max() + 1e-6)
        changed += int(value.float().abs().max() > 0)
    assert changed  # training moved lora_B off zero
    checkpoint = parallel / "checkpoints" / f"step-{STEPS:08d}"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["world_size"] == 2
    assert len(torch.load(checkpoint / "rng.pt", weights_only=True)["ranks"]) == 2

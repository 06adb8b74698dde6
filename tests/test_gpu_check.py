"""benchmarks/gpu_check.py: one JSON with every stage, failures recorded, the CPU smoke mode runnable."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # the benchmarks live beside the package, not in it
    sys.path.insert(0, str(REPO))

from benchmarks import gpu_check  # noqa: E402
from benchmarks.gpu_check import STAGE_NAMES, Stage, run_check  # noqa: E402


def test_every_stage_is_in_the_report_even_when_time_runs_out(tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    report = run_check(out=out, root=tmp_path / "root", smoke=True, only=["decoder", "extractor"], deadline_s=0)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    stages = report["stages"]
    assert list(stages) == list(STAGE_NAMES)
    assert {stages[n]["status"] for n in ("decoder", "extractor")} == {"timeout"}
    assert {stages[n]["status"] for n in STAGE_NAMES if n not in ("decoder", "extractor")} == {"skipped"}
    assert report["device"]["mode"] == "cpu-smoke" and "loadavg" in report["device"]


def test_a_failing_stage_is_recorded_and_the_next_still_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A stage whose module does not exist, then one that succeeds fast (the check itself, with nothing to do).
    broken = Stage("broken", 60, (), (), "benchmarks.no_such_benchmark")
    quick = Stage("quick", 60, (), ("--only", "decoder", "--deadline-s", "0"), "benchmarks.gpu_check")
    monkeypatch.setattr(gpu_check, "STAGES", (broken, quick))
    report = run_check(out=tmp_path / "check.json", root=tmp_path / "root", smoke=True, only=["broken", "quick"])
    assert report["stages"]["broken"]["status"] == "failed"
    assert "no_such_benchmark" in report["stages"]["broken"]["error"]
    assert report["stages"]["quick"]["status"] == "ok"
    assert report["stages"]["quick"]["result"]["stages"]["decoder"]["status"] == "timeout"


@pytest.mark.slow
def test_cpu_smoke_runs_every_stage(tmp_path: Path) -> None:
    report = run_check(out=tmp_path / "check.json", root=tmp_path / "root", smoke=True, only=list(STAGE_NAMES))
    stages = report["stages"]
    assert {n: s["status"] for n, s in stages.items()} == {n: "ok" for n in STAGE_NAMES}
    mini = {r["precision"]: r for r in stages["release_mini"]["result"]["rows"]}
    assert set(mini) == {"bf16", "8bit", "4bit"}
    for row in mini.values():
        assert row["load_s"] > 0 and row["question"]["tokens_per_s"] > 0
        assert row["spoken_question"]["first_audio_s"] is not None
        assert row["audio_stage"]["x_real_time"] > 0 and row["predicted_by_lyra_info"]["total_gib"] > 0
    assert stages["longspeech_60"]["result"]["rows"][0]["first"]["windows"] == 2
    assert stages["decoder"]["result"] and stages["extractor"]["result"]

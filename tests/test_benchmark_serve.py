"""benchmarks/serve.py runs end to end on the tiny model: one request per mode, its JSON complete and every
server answer the in-process one, word for word."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # two model loads (the server's and this one's): about 20 s
@pytest.mark.usefixtures("real")
def test_the_serve_benchmark_runs_and_agrees_with_the_engine(tiny_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    out = tmp_path / "serve.json"
    cmd = [sys.executable, "-m", "benchmarks.serve", "--model", str(tiny_dir), "--clients", "1,2", "--requests", "1",
           "--warmup", "0", "--max-tokens", "8", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert [(row["mode"], row["clients"], row["requests"]) for row in report["rows"]] == [
        ("in-process", 1, 1), ("server (openai SDK)", 1, 1), ("server (plain HTTP)", 1, 1), ("server (openai SDK)", 2, 2)
    ]  # fmt: skip
    assert report["answers_identical"] == {"server (openai SDK)": [True], "server (plain HTTP)": [True]}
    for runs in report["runs"].values():
        (run,) = runs
        assert 0 < run["ttft_s"] <= run["total_s"] and 0 < run["first_audio_s"] <= run["total_s"]
        assert run["completion_tokens"] == 8 and run["audio_s"] > 0 and run["text"]
    for overhead in report["overhead_ms"].values():
        assert set(overhead) == {"ttft_s_ms", "first_audio_s_ms", "total_s_ms"}
    assert "server overhead per request" in proc.stdout

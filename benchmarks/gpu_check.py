"""Every measurement that only a GPU shows, in one run (under 8 minutes on one H100), into one JSON.

    benchmarks/gpu_check.sh --out gpu_check.json                  # on the GPU machine
    benchmarks/gpu_check.sh --cpu-smoke --out /tmp/smoke.json     # every stage at toy sizes on CPU

Stages (each a subprocess of an existing benchmark, bounded by its own timeout and by the run's deadline;
a stage that fails or times out is recorded with its error and the rest still run):

    release_mini    release-shaped Lyra_Mini_3B (random weights, written under --root): bf16, 8-bit, 4-bit —
                    load time, memory (CUDA allocated; `lyra info`'s prediction), first token, tokens/s of an
                    image + speech question, first audio of the spoken answer, 5-minute audio stage
                    (release_scale.py)
    extractor       LMME against plain prefill at Lyra-Base's decoder dimensions, 16k and 32k tokens
                    (extractor.py)
    longspeech_60   60 minutes of audio on the Mini checkpoint with --extract 4x0.7 (longspeech.py)
    decoder         our decoder loop against transformers' Qwen2-VL (decoder.py)
    release_base    as release_mini for Lyra_Base_9B (~22 GB written first): last, with the time left

`--cpu-smoke` runs the same stages and the same code paths on CPU with the `smoke` release shape and toy
dimensions (1.6 CPU-minutes; 6 minutes on a busy 2-core machine); tests/test_gpu_check.py runs it. The JSON holds every stage:
{"status": ok | failed | timeout | skipped, "seconds", "result" (the benchmark's own JSON) or "error"}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEADLINE_S = 470  # the whole run, under the 8 minutes the check is allowed
# The CPU smoke run has no time budget to keep, only hangs to stop, on a machine that may be shared.
SMOKE_STAGE_TIMEOUT_S = 600
SMOKE_DEADLINE_S = 3600
ERROR_LINES = 5


@dataclass(frozen=True)
class Stage:
    name: str
    timeout_s: int
    gpu_args: tuple[str, ...]
    smoke_args: tuple[str, ...]
    module: str
    needs_root: bool = False  # runs against the release checkpoint under --root


BASE_DECODER = ("--layers", "28", "--hidden", "3584", "--heads", "28", "--kv-heads", "4", "--intermediate", "18944")
STAGES = (
    Stage("release_mini", 150, ("--size", "mini", "--device", "cuda", "--voice"),
          ("--size", "smoke", "--device", "cpu", "--voice", "--quick", "--minutes", "0.5"),
          "benchmarks.release_scale", needs_root=True),
    Stage("extractor", 70, ("--device", "cuda", "--dtype", "bfloat16", *BASE_DECODER, "--lengths", "16384,32768",
                            "--repeats", "2", "--decode-tokens", "16"),
          ("--device", "cpu", "--layers", "4", "--hidden", "64", "--heads", "4", "--kv-heads", "2", "--intermediate",
           "128", "--lengths", "256,512", "--repeats", "1", "--decode-tokens", "2"),
          "benchmarks.extractor"),
    Stage("longspeech_60", 90, ("--device", "cuda", "--minutes", "60", "--extract", "4x0.7"),
          ("--device", "cpu", "--minutes", "1", "--extract", "2x0.5"),
          "benchmarks.longspeech", needs_root=True),
    Stage("decoder", 40, ("--device", "cuda", "--repeats", "3"),
          ("--device", "cpu", "--layers", "1", "--hidden", "64", "--prompt-tokens", "64", "--new-tokens", "4",
           "--repeats", "1"),
          "benchmarks.decoder"),
    Stage("release_base", 200, ("--size", "base", "--device", "cuda", "--voice"),
          ("--size", "smoke", "--device", "cpu", "--precisions", "bf16", "--quick", "--minutes", "0.5"),
          "benchmarks.release_scale", needs_root=True),
)  # fmt: skip
STAGE_NAMES = tuple(s.name for s in STAGES)


def _stage_command(stage: Stage, smoke: bool, root: Path, out: Path) -> list[str]:
    args = list(stage.smoke_args if smoke else stage.gpu_args)
    if stage.needs_root:
        size = "smoke" if smoke else "mini"
        if stage.module == "benchmarks.release_scale":
            args += ["--root", str(root)]
        else:  # the long-speech run uses the Mini checkpoint that release_mini wrote (or writes it itself)
            from benchmarks.release_shapes import SPECS

            args += ["--model", str(root / "work_dirs" / SPECS[size].name)]
    return [sys.executable, "-m", stage.module, *args, "--out", str(out)]


def _prepare_longspeech(root: Path, smoke: bool) -> None:
    """The Mini (smoke) checkpoint must exist; its `model_zoo/` towers resolve from the model folder's parents."""
    from benchmarks.release_shapes import write_release

    write_release(root, "smoke" if smoke else "mini")


def run_stage(stage: Stage, *, smoke: bool, root: Path, workdir: Path, timeout_s: float) -> dict[str, Any]:
    """One stage in a subprocess: its JSON on success, else what went wrong; never raises."""
    out = workdir / f"{stage.name}.json"
    start = time.perf_counter()
    record: dict[str, Any] = {"module": stage.module, "timeout_s": round(timeout_s, 1)}
    if timeout_s <= 0:
        return record | {"status": "timeout", "seconds": 0.0, "error": "no time left before the run's deadline"}
    try:
        if stage.module == "benchmarks.longspeech":
            _prepare_longspeech(root, smoke)
        cmd = _stage_command(stage, smoke, root, out)
        record["command"] = " ".join(cmd[1:])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run(cmd, cwd=root if stage.needs_root else REPO, env=env, capture_output=True, text=True,
                              timeout=max(1.0, timeout_s - (time.perf_counter() - start)))  # fmt: skip
    except subprocess.TimeoutExpired:
        return record | {"status": "timeout", "seconds": time.perf_counter() - start,
                         "error": f"stopped after {timeout_s:.0f} s"}  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - a broken stage is recorded, the others still run
        return record | {"status": "failed", "seconds": time.perf_counter() - start, "error": f"{type(exc).__name__}: {exc}"}
    record["seconds"] = time.perf_counter() - start
    record["stdout_tail"] = proc.stdout.strip().splitlines()[-12:]
    if proc.returncode != 0 or not out.is_file():
        tail = proc.stderr.strip().splitlines()[-ERROR_LINES:]
        return record | {"status": "failed", "error": "\n".join(tail) or f"exit {proc.returncode}"}
    result = json.loads(out.read_text())
    failed_rows = [r for r in result.get("rows", []) if isinstance(r, dict) and "error" in r]
    status = "failed" if failed_rows else "ok"
    return record | {"status": status, "result": result} | ({"error": failed_rows[0]["error"]} if failed_rows else {})


def device_info(smoke: bool) -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                            "mode": "cpu-smoke" if smoke else "gpu", "loadavg": os.getloadavg()}  # fmt: skip
    try:
        query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
        info["gpus"] = subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
    except (OSError, subprocess.TimeoutExpired):
        info["gpus"] = []
    return info


def run_check(*, out: Path, root: Path, smoke: bool, only: list[str], timeout_scale: float = 1.0,
              deadline_s: float | None = None) -> dict[str, Any]:  # fmt: skip
    """Run the selected stages in order within `deadline_s`; returns (and writes to `out`) the report."""
    start = time.perf_counter()
    deadline_s = deadline_s if deadline_s is not None else SMOKE_DEADLINE_S if smoke else DEADLINE_S
    report: dict[str, Any] = {"device": device_info(smoke), "root": str(root), "stages": {}}
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lyra-gpu-check-") as tmp:
        for stage in STAGES:
            if stage.name not in only:
                report["stages"][stage.name] = {"status": "skipped", "module": stage.module}
                continue
            left = deadline_s - (time.perf_counter() - start)
            timeout = min((SMOKE_STAGE_TIMEOUT_S if smoke else stage.timeout_s) * timeout_scale, left)
            report["stages"][stage.name] = run_stage(stage, smoke=smoke, root=root, workdir=Path(tmp), timeout_s=timeout)
            print(f"{stage.name}: {report['stages'][stage.name]['status']} "
                  f"({report['stages'][stage.name].get('seconds', 0):.0f} s)", flush=True)  # fmt: skip
    report["total_s"] = time.perf_counter() - start
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gpu_check.json")
    parser.add_argument("--root", type=Path, default=None,
                        help="local disk folder for the release-shaped checkpoints (default: a folder in /tmp)")  # fmt: skip
    parser.add_argument("--cpu-smoke", action="store_true", help="every stage at toy sizes on CPU")
    parser.add_argument("--only", nargs="+", choices=STAGE_NAMES, default=list(STAGE_NAMES))
    parser.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every stage's timeout")
    parser.add_argument("--deadline-s", type=float, default=None,
                        help=f"the whole run's limit (default {DEADLINE_S} s; --cpu-smoke {SMOKE_DEADLINE_S} s)")  # fmt: skip
    args = parser.parse_args()
    default_root = Path(tempfile.gettempdir()) / ("lyra-smoke-release" if args.cpu_smoke else "lyra-release")
    report = run_check(out=args.out, root=(args.root or default_root).resolve(), smoke=args.cpu_smoke,
                       only=args.only, timeout_scale=args.timeout_scale, deadline_s=args.deadline_s)  # fmt: skip
    failed = [n for n, s in report["stages"].items() if s["status"] not in ("ok", "skipped")]
    print(f"wrote {args.out} ({report['total_s']:.0f} s){'; not ok: ' + ', '.join(failed) if failed else ''}")


if __name__ == "__main__":
    main()

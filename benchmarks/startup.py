"""Time to answer for commands that must not wait for torch: bad input paths and `lyra info`.

Each row runs `python -m lyra_cli.main ...` in a fresh process --repeats times and reports the median and
the worst wall time to exit, with the exit code it must have (1 for a bad input, 0 for info and --help).
The first row is the bare interpreter, the floor under every other row. Targets (issue 11): an input
error in under 1.5 s, `lyra info` in under 2 s.

    python -m benchmarks.startup                  # ~20 s
    python -m benchmarks.startup --repeats 10 --out benchmarks/results/startup.json

Prints a table and writes JSON (default benchmarks/results/startup.json), with the load average, since a
shared machine's numbers are only as good as its idle cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
INPUT_ERROR_TARGET_S = 1.5
INFO_TARGET_S = 2.0


def _time_runs(argv: list[str], expected_rc: int, repeats: int, env: dict[str, str]) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO)
        times.append(time.perf_counter() - start)
        if done.returncode != expected_rc:
            raise SystemExit(f"{' '.join(argv[2:])}: exit {done.returncode}, expected {expected_rc}\n{done.stderr}")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "startup.json")
    args = parser.parse_args()

    from lyra_cli.engine.model.tiny import tiny_model_dir  # built (or found in the cache) before any timing

    tiny = tiny_model_dir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    lyra = [sys.executable, "-m", "lyra_cli.main"]
    with tempfile.TemporaryDirectory() as tmp:
        missing, folder = Path(tmp) / "missing.mp3", Path(tmp) / "photos"
        folder.mkdir()
        rows_spec = [
            ("python (interpreter only)", [sys.executable, "-c", "pass"], 0, None),
            ("lyra --help", [*lyra, "--help"], 0, None),
            ("chat --speech missing.mp3", [*lyra, "chat", "--speech", str(missing), "--text", "hi"], 1,
             INPUT_ERROR_TARGET_S),
            ("chat --image folder/", [*lyra, "chat", "--image", str(folder), "--text", "hi"], 1, INPUT_ERROR_TARGET_S),
            ("longspeech missing.mp3", [*lyra, "longspeech", str(missing), "--ask", "hi"], 1, INPUT_ERROR_TARGET_S),
            ("info --model <tiny>", [*lyra, "info", "--model", str(tiny)], 0, INFO_TARGET_S),
        ]  # fmt: skip
        rows = []
        for name, argv, rc, target in rows_spec:
            times = _time_runs(argv, rc, args.repeats, env)
            rows.append({"command": name, "median_s": statistics.median(times), "max_s": max(times),
                         "target_s": target, "exit_code": rc})  # fmt: skip

    print(f"{'command':<28} {'median s':>9} {'max s':>7} {'target s':>9}")
    for row in rows:
        target = f"{row['target_s']:.1f}" if row["target_s"] else "-"
        print(f"{row['command']:<28} {row['median_s']:>9.2f} {row['max_s']:>7.2f} {target:>9}")
    machine = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
               "load_average": os.getloadavg(), "repeats": args.repeats}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out} (load average {machine['load_average'][0]:.1f} on {machine['cpus']} cores)")


if __name__ == "__main__":
    main()

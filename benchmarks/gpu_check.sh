#!/usr/bin/env bash
# One GPU check: every measurement only a GPU shows, in under 8 minutes on one H100, into one JSON.
#   benchmarks/gpu_check.sh --out gpu_check.json [--root /local/disk/dir]   # needs ~32 GB free disk
#   benchmarks/gpu_check.sh --cpu-smoke --out /tmp/smoke.json               # the same stages, toy sizes, CPU
# Stages and their timeouts: benchmarks/gpu_check.py. Run from anywhere; uses .venv/bin/python when present.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$repo/.venv/bin/python}"
[ -x "$python" ] || python="$(command -v python3)"
cd "$repo"
PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" exec "$python" -m benchmarks.gpu_check "$@"

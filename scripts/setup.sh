#!/usr/bin/env bash
# Set up lyra in ./.venv: torch first (an existing torch is kept), then lyra with its extras, with
# torch pinned so no dependency swaps it for another build. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
extras=${LYRA_EXTRAS:-quant,mic,eval,train,serve,test}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # 2.13.0 is the version this project is tested with; on CPU-only machines pip picks the CPU build.
  .venv/bin/python -m pip install -q "torch==${LYRA_TORCH_VERSION:-2.13.0}"
fi
torch_version=$(.venv/bin/python -W ignore -c "import torch; print(torch.__version__.split('+')[0])")
echo "torch==${torch_version}" > .venv/constraints.txt
.venv/bin/python -m pip install -q -c .venv/constraints.txt -e ".[${extras}]"
case ",${extras}," in
  *,eval,*) .venv/bin/python -m pip install -q --no-deps openai-whisper ;;  # its deps would pull triton
esac
echo "lyra is set up in .venv (torch ${torch_version}); run .venv/bin/lyra --help" >&2

#!/usr/bin/env bash
# GPU check (benchmarks/gpu_check.py): ViT-B-16 training step, loader, peak memory, prediction and
# fp32 device-vs-CPU agreement on one GPU, in under 8 minutes. Writes gpu_check.json and gpu_check.md
# into OUT_DIR; extra arguments go to the script (e.g. --workers 8, --parts ab).
#   benchmarks/gpu_check.sh OUT_DIR [gpu_check.py options]
# PYTHON overrides the interpreter (default: the project's .venv/bin/python).
set -euo pipefail
if [[ $# -lt 1 || $1 == -* ]]; then
  echo "usage: benchmarks/gpu_check.sh OUT_DIR [gpu_check.py options]" >&2
  exit 2
fi
out=$1
shift
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-$root/.venv/bin/python}
cd "$root"
# Every part writes its results when it finishes, so the limit never loses what was measured.
PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 \
  timeout --signal=INT --kill-after=20 470 "$python" benchmarks/gpu_check.py --device cuda --out "$out" "$@"

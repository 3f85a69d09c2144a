#!/usr/bin/env bash
# One-shot GPU check of bkdattr, at most 8 minutes on one GPU, nothing downloaded.
#   bash benchmarks/gpu_check.sh [--out FILE] [--work DIR] [--skip STEP]   # on a CUDA machine
#   bash benchmarks/gpu_check.sh --dry-run [--out FILE]                    # the same steps on the CPU, tiny model
# Steps and the JSON it writes: benchmarks/gpu_check.py. Exit status 0 when every step passed (or was skipped).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY="python3"; fi
fi
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# every step has its own limit (470 s in all on a GPU); this is the backstop for the whole check
exec timeout -k 10 480 "$PY" "$ROOT/benchmarks/gpu_check.py" "$@"

#!/usr/bin/env bash
# The prepared device check (benchmarks/gpu_check.py says what each stage measures).
#   on a GPU machine:  bash benchmarks/gpu_check.sh --out "$OUT"      (one command, about 8 minutes)
#   here, on the CPU:  bash benchmarks/gpu_check.sh --cpu-dry-run --out /tmp/gpu_check
# A machine with no package index gets the missing packages as wheels in .whl/ (benchmarks/gpu_wheels.sh
# downloads them here); they are installed into /tmp/site, beside the machine's own torch.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
if ! "$PY" -c "import deepspeed, performer_pytorch, zarr, anndata" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
for a in "$@"; do [ "$a" = "--cpu-dry-run" ] && export DS_ACCELERATOR=cpu; done
exec "$PY" -m benchmarks.gpu_check "$@"

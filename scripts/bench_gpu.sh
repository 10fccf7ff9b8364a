#!/usr/bin/env bash
# The benchmark on a GPU machine, in one command (run from anywhere; it works in the repository root):
#
#   scripts/bench_gpu.sh [more scripts.bench options, e.g. --quick or --concurrency 1,32]
#
# It runs `python -m scripts.bench --device cuda` with the modes hf_generate, hf_generate_batch and engine on the
# random-weight Mistral-7B v0.2-shaped model in NF4 (the service mode needs Redis and the project's dependencies,
# which such a machine lacks). The machine is expected to have torch, transformers and triton but not
# bitsandbytes: wheels in .whl/ (for example from slim_bnb_wheel.sh) are installed into /tmp/site.
# Without bitsandbytes the model stays bf16 (the JSON says so).
#
# Environment: PYTHON (default python3); OUT: a folder for bench-gpu.json and bench-gpu.log (default: the JSON
# goes to bench-results/, the log to stdout only).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! "$PY" -c "import bitsandbytes" 2>/dev/null; then
    echo "bench_gpu: bitsandbytes is not importable (no .whl/*.whl?): the model will be bf16, not NF4" >&2
fi
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench_gpu: torch sees no CUDA device')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

export PYTHONUNBUFFERED=1
args=(--device cuda --modes hf_generate,hf_generate_batch,engine)
log=/dev/null
if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT"
    args+=(--out "$OUT/bench-gpu.json")
    log="$OUT/bench-gpu.log"
fi
set -o pipefail
"$PY" -m scripts.bench "${args[@]}" "$@" 2>&1 | tee "$log"

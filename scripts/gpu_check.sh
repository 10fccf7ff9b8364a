#!/usr/bin/env bash
# The GPU check in one command, re-runnable: the random-weight Mistral-7B v0.2 in NF4, our engine's greedy tokens
# against generate(), every CUDA-graph bucket captured, and the benchmark sweep (engine_process, the whole service
# and engine at concurrency 1..256, greedy and the docs' default sampling), in at most BUDGET_S seconds (8 minutes).
#
#   scripts/gpu_check.sh [more scripts.gpu_check options]    # on a GPU machine
#   scripts/gpu_check.sh --tiny                               # here, on the CPU: tiny7b, concurrency 1,8
#   MODEL=tiny7b DEVICE=cpu scripts/gpu_check.sh              # the same
#
# On a GPU machine lent through the device tool: run scripts/gpu_pack.sh here first, then
#   run(command="scripts/gpu_check.sh", carry=[".gpu_carry"], timeout_s=540)
# What the machine lacks comes from .gpu_carry/ (no network there): the wheels in .gpu_carry/whl are installed
# into /tmp/site (as scripts/bench_gpu.sh does) when this interpreter lacks bitsandbytes or the service's
# dependencies, and .gpu_carry/redis/bin/redis-server (else a redis-server on PATH) serves a private Redis on a
# free port for the service mode.
#
# Writes under $OUT (default bench-results/gpu-check/): gpu-check.log (all of the output), gpu-check.json,
# gpu-check.md (the checks and the sweep as tables), bench.json (the benchmark's JSON), service-worker.log and
# service-api.log. Exit status: scripts.gpu_check's (0 all passed, 1 a check failed, 3 the budget stopped the
# sweep), or 2 when the set-up failed.
#
# Environment: PYTHON (default .venv/bin/python where it exists, else python3), MODEL (mistral7b, tiny7b), DEVICE
# (auto, cpu, cuda), BUDGET_S (default 480), OUT, SITE (default /tmp/site).
set -uo pipefail
START=$(date +%s)
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
[[ -z "${PYTHON:-}" && -x .venv/bin/python ]] && PY=.venv/bin/python
BUDGET_S=${BUDGET_S:-480}
OUT=${OUT:-bench-results/gpu-check}
SITE=${SITE:-/tmp/site}
CARRY=.gpu_carry
args=()
for arg in "$@"; do
    if [[ "$arg" == --tiny ]]; then MODEL=tiny7b; DEVICE=cpu; else args+=("$arg"); fi
done
[[ -n "${MODEL:-}" ]] && args+=(--model "$MODEL")
[[ -n "${DEVICE:-}" ]] && args+=(--device "$DEVICE")

mkdir -p "$OUT"
: >"$OUT/gpu-check.log"
exec > >(tee -a "$OUT/gpu-check.log") 2>&1
say() { echo "gpu_check.sh: $*"; }
export PYTHONUNBUFFERED=1

# --- 1. Python packages: the carried wheels, where this interpreter lacks any of them
needs="import bitsandbytes, flask, celery, kombu, gevent, gunicorn, redis, pydantic_settings, mistral_common, openai"
if ! "$PY" -c "$needs" 2>/dev/null; then
    if compgen -G "$CARRY/whl/*.whl" >/dev/null; then
        say "installing $(ls "$CARRY"/whl/*.whl | wc -l) carried wheels into $SITE"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            "$CARRY"/whl/*.whl || say "WARNING: installing the wheels failed"
        export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
        export PATH=$SITE/bin:$PATH
    else
        say "WARNING: this interpreter lacks some of bitsandbytes and the service's dependencies, and there are no" \
            "wheels in $CARRY/whl (run scripts/gpu_pack.sh where PyPI is reachable, and carry $CARRY)"
    fi
    "$PY" -c "$needs" || say "WARNING: still missing (above): the NF4 check or the service rows will fail"
fi

# --- 2. a private Redis on a free port (its own data folder), stopped when this script ends
run_dir=$(mktemp -d /tmp/gpu-check.XXXXXX)
redis_pid=
cleanup() {
    if [[ -n "$redis_pid" ]] && kill -0 "$redis_pid" 2>/dev/null; then
        kill "$redis_pid"
        wait "$redis_pid" 2>/dev/null
    fi
    rm -rf "$run_dir"
}
trap cleanup EXIT
mkdir -p "$run_dir/bin"
if [[ -x "$CARRY/redis/bin/redis-server" ]]; then
    # On PATH through a wrapper: the carried libraries for redis-server alone.
    printf '#!/bin/sh\nLD_LIBRARY_PATH=%s${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} exec %s "$@"\n' \
        "$ROOT/$CARRY/redis/lib" "$ROOT/$CARRY/redis/bin/redis-server" >"$run_dir/bin/redis-server"
    chmod +x "$run_dir/bin/redis-server"
    export PATH=$run_dir/bin:$PATH
fi
if command -v redis-server >/dev/null 2>&1; then
    port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --daemonize no --dir "$run_dir" \
        --logfile "$run_dir/redis.log" &
    redis_pid=$!
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port" && printf 'PING\r\n' >&3 && read -r -t 1 reply <&3 \
            && [[ "$reply" == +PONG* ]]) 2>/dev/null; then
            break
        fi
        sleep 0.1
    done
    export REDIS_URL=redis://127.0.0.1:$port/0 TEST_REDIS_URL=redis://127.0.0.1:$port/0
    say "redis: $(redis-server --version | cut -d' ' -f1-3) on port $port (pid $redis_pid)"
else
    say "WARNING: no redis-server (none carried in $CARRY/redis, none on PATH): the service rows will fail"
fi

# --- 3. the machine
command -v nvidia-smi >/dev/null 2>&1 && { nvidia-smi || true; }
"$PY" - <<'PY' || { say "the interpreter cannot import torch"; exit 2; }
import importlib.metadata as m, platform, torch
names = ("transformers", "bitsandbytes", "triton", "accelerate", "celery", "flask", "gunicorn", "redis", "openai")
def version(name):
    try:
        return m.version(name)
    except m.PackageNotFoundError:
        return None
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda} "
      f"(available: {torch.cuda.is_available()}), " + ", ".join(f"{n} {version(n)}" for n in names))
PY

# --- 4. the check, in what is left of the budget
left=$((BUDGET_S - ($(date +%s) - START)))
say "set-up took $(($(date +%s) - START)) s; $left s left for scripts.gpu_check"
"$PY" -m scripts.gpu_check --out "$OUT" --budget-s "$left" ${args[@]+"${args[@]}"}
rc=$?
say "exit $rc after $(($(date +%s) - START)) s; reports in $OUT"
exit $rc

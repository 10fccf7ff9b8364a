# llm-queue developer tasks (GNU make, bash).
#
#   make install      venv + dependencies (torch first: CUDA build where nvidia-smi works, else CPU)
#   make redis        make sure a Redis answers at REDIS_URL (starts the project's own if none)
#   make run          Redis + API (gunicorn, PORT) + WORKERS Celery workers in the foreground
#   make test         Redis + pytest (REDIS_URL=TEST_REDIS_URL)
#   make bench        scripts/bench/ (engine, service and HF baselines; see README)
#   make bench-shared-prefix  the prefix cache's benchmark (make bench BENCH_ARGS=--shared-prefix)
#   make bench-redis  Redis CPU per job and per token, and the workers one Redis carries
#   make fairness     one key's TTFT while another key floods the queue (FAIRNESS_ARGS='--scenario batch': a batch)
#   make gpu-check    scripts/gpu_check.sh: the GPU check (here, without a GPU: its rehearsal on tiny7b)
#   make worker       one more worker (e.g. on another machine, same REDIS_URL)
#   make api          one more API server on PORT (e.g. behind a load balancer)
#   make redis-stop   stop the Redis servers that scripts/ensure_redis.sh started (.run/redis)
#   make clean        redis-stop, then remove the venv and .run/
#
# Variables: VENV PORT WORKERS PYTHON TORCH TORCH_CPU_VERSION TORCH_CPU_PIP_ARGS TEST_REDIS_URL
#            PYTEST_ARGS BENCH_ARGS GPU_CHECK_ARGS, e.g. `make run PORT=9000 WORKERS=2`.

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.ONESHELL:
.DEFAULT_GOAL := help

VENV ?= .venv
PY = $(VENV)/bin/python
PORT ?= 8000
WORKERS ?= 1
# Interpreter that creates the venv (>= 3.11).
PYTHON ?= python3

# torch: auto (CUDA build where `nvidia-smi -L` works, else the CPU one), cuda or cpu.
TORCH ?= auto
# The CPU build. On this project's machines a CPU wheel of this version lies on local disk, and
# pip prefers it (2.13.0+cpu sorts above PyPI's 2.13.0). Elsewhere PyPI's Linux wheel of the same
# version is a CUDA build: to get a CPU-only one there, pass PyTorch's CPU wheel index, e.g.
#   make install TORCH_CPU_PIP_ARGS='--index-url <PyTorch CPU wheel index URL>'
TORCH_CPU_VERSION ?= 2.13.0
TORCH_CPU_PIP_ARGS ?=

# Tests use their own db number; scripts/ensure_redis.sh --fallback-port may swap the port for a
# private Redis if something else holds this one.
TEST_REDIS_URL ?= redis://127.0.0.1:6379/15
PYTEST_ARGS ?=
BENCH_ARGS ?=
GPU_CHECK_ARGS ?=

STAMP = $(VENV)/.installed

.PHONY: help venv install redis redis-stop run worker api test bench bench-shared-prefix bench-redis fairness gpu-check clean browser-deps

help:
	@sed -n '3,15p' Makefile | sed 's/^# \{0,1\}//'

# --- Install -----------------------------------------------------------------------------------

venv install: $(STAMP)

$(PY):
	@if ! '$(PYTHON)' -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
	    echo "install: $(PYTHON) is older than Python 3.11; pass PYTHON=python3.11 (or newer)" >&2
	    exit 1
	fi
	echo "install: creating the virtualenv $(VENV)"
	'$(PYTHON)' -m venv '$(VENV)'

# Re-runs only when pyproject.toml changes (or the venv is new): `make install` is instant after.
$(STAMP): pyproject.toml | $(PY)
	@flavor='$(TORCH)'
	if [[ "$$flavor" == auto ]]; then
	    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
	        flavor=cuda
	    else
	        flavor=cpu
	    fi
	fi
	'$(PY)' -m pip install --quiet --upgrade pip
	# torch FIRST and pinned, so that resolving the project's `torch>=2.4` later installs nothing.
	if [[ "$$flavor" == cuda ]]; then
	    echo "install: CUDA found: torch from PyPI (a CUDA build), then the project with [test]"
	    '$(PY)' -m pip install torch
	elif [[ "$$flavor" == cpu ]]; then
	    echo "install: no CUDA: torch==$(TORCH_CPU_VERSION) (CPU build), then the project with [test]"
	    '$(PY)' -m pip install 'torch==$(TORCH_CPU_VERSION)' $(TORCH_CPU_PIP_ARGS)
	else
	    echo "install: TORCH must be auto, cuda or cpu, not '$$flavor'" >&2
	    exit 1
	fi
	'$(PY)' -m pip install -e ".[test]"
	'$(PY)' -c 'import torch; print("install: torch", torch.__version__, "CUDA" if torch.cuda.is_available() else "(no CUDA)")'
	touch '$@'

# --- Redis -------------------------------------------------------------------------------------

redis:
	@scripts/ensure_redis.sh

redis-stop:
	@shopt -s nullglob
	for pidfile in .run/redis/*/redis.pid; do
	    pid=$$(cat "$$pidfile"); port=$$(basename "$$(dirname "$$pidfile")")
	    if kill -0 "$$pid" 2>/dev/null && grep -q redis "/proc/$$pid/comm" 2>/dev/null; then
	        echo "redis: stopping the project's redis-server on port $$port (pid $$pid)"
	        kill -TERM "$$pid"    # SIGTERM: Redis flushes its AOF and saves, then exits
	        for _ in $$(seq 100); do kill -0 "$$pid" 2>/dev/null || break; sleep 0.1; done
	    fi
	done

# --- Run ---------------------------------------------------------------------------------------

# honcho: `-p PORT` gives the first Procfile entry (web) exactly PORT; `-c worker=N` starts N
# workers (worker.1, worker.2, ...). Ctrl-C: honcho SIGTERMs every process, SIGKILLs after 5 s.
# The Redis that ensure_redis.sh may have started keeps running (make redis-stop).
run: install
	@if ! [[ '$(WORKERS)' =~ ^[0-9]+$$ && '$(PORT)' =~ ^[0-9]+$$ ]]; then
	    echo "run: PORT and WORKERS must be numbers (PORT=$(PORT) WORKERS=$(WORKERS))" >&2
	    exit 1
	fi
	url=$$(scripts/ensure_redis.sh --print-url)
	export REDIS_URL="$$url" PORT='$(PORT)' WORKERS='$(WORKERS)' VENV='$(VENV)'
	echo "run: API on port $(PORT), $(WORKERS) worker process(es); Ctrl-C stops them"
	exec '$(VENV)/bin/honcho' start -f Procfile -p '$(PORT)' -c 'web=1,worker=$(WORKERS)'

# One more worker (for instance on a second machine: REDIS_URL=redis://<redis host>:6379/0 make worker).
worker: install
	@exec '$(PY)' -m workers

# One more API server (for instance behind a load balancer: PORT=8001 make api).
api: install
	@exec '$(VENV)/bin/gunicorn' -c config/gunicorn.py --worker-class gevent --workers 2 --worker-connections 1000 \
	    --bind 0.0.0.0:$(PORT) --timeout 60 --graceful-timeout 30 --keep-alive 30 --no-control-socket 'app:create_app()'

# --- Test --------------------------------------------------------------------------------------

# Headless Chromium for tests/browser (Debian's package; `playwright install` is never used).
browser-deps:
	@command -v chromium >/dev/null 2>&1 || { sudo -n true 2>/dev/null && SUDO=sudo || SUDO=; \
	    echo "browser-deps: installing Debian's chromium for the browser tests"; \
	    $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium; }

test: install browser-deps
	@url=$$(REDIS_URL='$(TEST_REDIS_URL)' scripts/ensure_redis.sh --print-url --fallback-port)
	# tests/conftest.py reads TEST_REDIS_URL first: both name the Redis actually answering.
	TEST_REDIS_URL="$$url" REDIS_URL="$$url" '$(PY)' -m pytest $(PYTEST_ARGS)

# --- Bench -------------------------------------------------------------------------------------

bench: install
	@'$(PY)' -m scripts.bench $(BENCH_ARGS)

# What the service costs Redis and how many workers one Redis carries (README, "Scaling Redis"): the service's
# greedy rows at 32 concurrent streams of 128 tokens, then of 8, and Redis's CPU (REDIS_URL's, the whole server)
# fit to per job and per token, per round.
bench-redis: install
	@'$(PY)' -m scripts.bench --modes service --concurrency 32 --service-sampling '' --service-sdk-sampling '' \
		--num-prompts 64 $(BENCH_ARGS)

# 64 requests sharing a 1,024-token prefix, the engine and the service, prefix cache off and on.
bench-shared-prefix: install
	@'$(PY)' -m scripts.bench --shared-prefix $(BENCH_ARGS)

# Fairness (scripts/fairness.py): key B's streamed TTFT alone, then while key A's 500 background jobs wait
# (fair dispatch); FAIRNESS_ARGS='--scenario batch': interactive TTFT with and without a 2,000-request batch.
fairness: install
	@'$(PY)' -m scripts.fairness $(FAIRNESS_ARGS)

# The GPU check (scripts/gpu_check.sh; README, "On a GPU machine"): on the GPU where nvidia-smi finds one, else its
# rehearsal on the CPU (--tiny: tiny7b, concurrency 1 and 8). A lent GPU machine runs the script itself, with the
# folder scripts/gpu_pack.sh fills.
gpu-check: install
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then tiny=; else tiny=--tiny; fi
	PYTHON='$(PY)' scripts/gpu_check.sh $$tiny $(GPU_CHECK_ARGS)

# --- Clean -------------------------------------------------------------------------------------

clean: redis-stop
	@if [[ -z '$(VENV)' || '$(VENV)' == / ]]; then echo "clean: refusing VENV='$(VENV)'" >&2; exit 1; fi
	rm -rf -- '$(VENV)' .run

#!/usr/bin/env bash
# Fill .gpu_carry/ (ignored by git) with what a GPU machine lacks for scripts/gpu_check.sh. Run it HERE, on a
# machine that reaches PyPI, before a GPU run; it is quick when nothing changed (it starts afresh each time).
#
#   scripts/gpu_pack.sh
#
# Then, on the GPU machine (the device tool: the working tree travels, plus the carried ignored paths):
#
#   run(command="scripts/gpu_check.sh", carry=[".gpu_carry"], timeout_s=540)
#
# carry: [".gpu_carry"], that one path (it holds everything below). What it holds:
#   .gpu_carry/whl/    wheels for CPython 3.12 on x86-64 (the GPU machine's python3): bitsandbytes, slimmed to its
#                      CUDA 13.0 and CPU libraries as ../shared/gpu/slim_bnb_wheel.sh does, and the service's
#                      dependencies that the GPU image lacks (flask, celery, gunicorn, gevent, redis, pydantic,
#                      mistral-common, openai, ... and what they need), at the versions of this checkout's .venv
#   .gpu_carry/redis/  bin/redis-server (this machine's Debian build) and lib/, the shared libraries it links
#                      except glibc's and the C++ runtime's (a stock image may lack jemalloc, lzf, ...)
#   .gpu_carry/MANIFEST.txt  what was packed, and the sizes
#
# Environment: PYTHON (the interpreter whose installed versions are pinned; default .venv/bin/python),
# BNB_VERSION (default: the .venv's bitsandbytes, else 0.50.2), SHARED (default ../shared beside the checkout).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-.venv/bin/python}
SHARED=${SHARED:-$ROOT/../shared}
CARRY=.gpu_carry
LIMIT_MIB=50

# What the GPU image ('cuda', nvidia-h200) already holds (/work/.library/device/KINDS.md, read there 2026-11-17):
# not carried, so that its own versions (torch's neighbours) stay in force.
GPU_IMAGE_HAS="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers
flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py
markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind
narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging
pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham
simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel
wrapt xarray xxhash yarl zipp"
# Carried although the image has a version: pydantic needs a recent one, and a newer one breaks nothing.
ALWAYS_CARRY="typing-extensions"
# The service's and the benchmark's own imports that the image lacks (pyproject.toml's dependencies, less torch,
# transformers, accelerate, numba, prometheus-client and honcho; openai for the benchmark's SDK rows and
# scripts/stack.py); pip resolves what they need.
TOP="flask gunicorn gevent celery kombu redis hiredis pydantic pydantic-settings mistral-common openai typing-extensions"
PLATFORMS=(--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_31_x86_64
           --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64 --platform manylinux1_x86_64)

say() { echo "gpu_pack: $*" >&2; }
[[ -x "$PY" ]] || { say "no interpreter at $PY (make install, or PYTHON=...)"; exit 1; }
rm -rf "$CARRY"
mkdir -p "$CARRY/whl" "$CARRY/redis/bin" "$CARRY/redis/lib"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# --- 1. bitsandbytes, slimmed
bnb_version=${BNB_VERSION:-$("$PY" -c 'import importlib.metadata as m; print(m.version("bitsandbytes"))' 2>/dev/null \
                            || echo 0.50.2)}
if [[ -x "$SHARED/gpu/slim_bnb_wheel.sh" ]] && "$SHARED/gpu/slim_bnb_wheel.sh" "$bnb_version" "$tmp/bnb" >/dev/null; then
    mv "$tmp"/bnb/bitsandbytes-*.whl "$CARRY/whl/"
    say "bitsandbytes $bnb_version: downloaded and slimmed by $SHARED/gpu/slim_bnb_wheel.sh"
else
    # No download: a wheel rebuilt from this .venv's installed bitsandbytes (a py3-none wheel: its files, as RECORD
    # lists them), keeping the same two libraries as the slim script.
    say "bitsandbytes: no download; repacking the one installed in $PY's environment"
    "$PY" - "$CARRY/whl" <<'PY'
import base64, hashlib, importlib.metadata as m, os, sys, zipfile
dist = m.distribution("bitsandbytes")
keep = lambda p: not p.endswith(".pyc") and "__pycache__" not in p and not (
    os.path.basename(p).startswith("libbitsandbytes_")
    and os.path.basename(p) not in ("libbitsandbytes_cuda130.so", "libbitsandbytes_cpu.so"))
files = [f for f in dist.files if keep(str(f)) and not str(f).startswith("..") and not str(f).endswith("/RECORD")]
info = next(str(f).split("/")[0] for f in dist.files if ".dist-info/" in str(f))
wheel_tags = dist.read_text("WHEEL") or ""
tag = next((line.split(":", 1)[1].strip() for line in wheel_tags.splitlines() if line.startswith("Tag:")),
           "py3-none-manylinux_2_24_x86_64")
out = os.path.join(sys.argv[1], f"bitsandbytes-{dist.version}-{tag}.whl")
rows = []
with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
    for f in files:
        data = f.locate().read_bytes()
        z.writestr(str(f), data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        rows.append(f"{f},sha256={digest},{len(data)}")
    rows.append(f"{info}/RECORD,,")
    z.writestr(f"{info}/RECORD", "\n".join(rows) + "\n")
print(out)
PY
fi

# --- 2. the service's dependencies, for CPython 3.12
pins=$("$PY" - $TOP <<'PY'
import importlib.metadata as m, sys
out = []
for name in sys.argv[1:]:
    try:
        out.append(f"{name}=={m.version(name)}")
    except m.PackageNotFoundError:
        out.append(name)
print(" ".join(out))
PY
)
say "resolving for CPython 3.12: $pins"
# shellcheck disable=SC2086
"$PY" -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 \
    --abi none "${PLATFORMS[@]}" -d "$tmp/deps" $pins 2>"$tmp/pip.err" \
    || { grep -v "Location 'file:" "$tmp/pip.err" >&2; exit 1; }
grep -v "Location 'file:" "$tmp/pip.err" >&2 || true  # (this machine's local index folders: noise)
"$PY" - "$tmp/deps" "$CARRY/whl" "$GPU_IMAGE_HAS" "$ALWAYS_CARRY" <<'PY'
import os, re, shutil, sys
src, dest, has, always = sys.argv[1], sys.argv[2], set(sys.argv[3].split()), set(sys.argv[4].split())
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
seen = {}
for wheel in sorted(os.listdir(src)):
    name = norm(wheel.split("-")[0])
    if name in seen:
        raise SystemExit(f"gpu_pack: two versions of {name}: {seen[name]} and {wheel}")
    seen[name] = wheel
    if name in has and name not in always:
        continue
    shutil.copy(os.path.join(src, wheel), dest)
skipped = sorted(n for n in seen if n in has and n not in always)
print(f"gpu_pack: skipped (the GPU image has them): {' '.join(skipped)}", file=sys.stderr)
PY

# --- 3. a Redis server: this machine's Debian build and the libraries it links (not glibc's, not libstdc++/libgcc)
if ! command -v redis-server >/dev/null 2>&1; then
    say "no redis-server here: installing Debian's"
    SUDO=; [[ $(id -u) -ne 0 ]] && SUDO=sudo
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq redis-server >/dev/null
fi
server=$(readlink -f "$(command -v redis-server)")
cp "$server" "$CARRY/redis/bin/redis-server"
ldd "$server" | awk '/=> \// {print $3}' | while read -r lib; do
    case "$(basename "$lib")" in
        libc.so.*|libm.so.*|libpthread.so.*|libdl.so.*|librt.so.*|ld-linux*|libstdc++.so.*|libgcc_s.so.*) ;;
        *) cp -L "$lib" "$CARRY/redis/lib/" ;;
    esac
done
LD_LIBRARY_PATH="$CARRY/redis/lib" "$CARRY/redis/bin/redis-server" --version >/dev/null

# --- the manifest, the size
{
    echo "# .gpu_carry, packed $(date -u +%Y-%m-%dT%H:%M:%SZ) by scripts/gpu_pack.sh; carry: [\".gpu_carry\"]"
    (cd "$CARRY" && find . -type f ! -name MANIFEST.txt -printf '%s\t%p\n' | sort -k2 |
        awk -F'\t' '{printf "%9.1f KiB  %s\n", $1 / 1024, $2}')
    "$CARRY/redis/bin/redis-server" --version 2>/dev/null || LD_LIBRARY_PATH="$CARRY/redis/lib" \
        "$CARRY/redis/bin/redis-server" --version
} >"$CARRY/MANIFEST.txt"
cat "$CARRY/MANIFEST.txt"
total=$(du -sk "$CARRY" | cut -f1)
say "$CARRY: $(awk -v k="$total" 'BEGIN {printf "%.1f", k / 1024}') MiB ($(ls "$CARRY/whl" | wc -l) wheels; redis-server and \
$(ls "$CARRY/redis/lib" | wc -l) libraries)"
if (( total > LIMIT_MIB * 1024 )); then
    say "over $LIMIT_MIB MiB: the device run carries at most 64 MiB with the working tree"
    exit 1
fi

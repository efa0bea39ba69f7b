#!/usr/bin/env bash
# The GPU build of convoy, done from nothing and checked on a machine without a GPU.
#
# Usage: bash launch/check_gpu_build.sh [--rebuild]
#
# Not part of launch/test.sh: it downloads several GB (TensorFlow's CUDA wheel and its nvidia-*
# libraries, a CUDA compiler) and compiles Horovod with NCCL (10 to 20 minutes on 2 cores).
# Everything goes under CONVOY_GPU_CHECK_DIR (default .gpu-check/ in the repository, git-ignored):
#   venv/            a fresh venv: tensorflow[and-cuda]==2.21.0 with its CUDA libraries pinned to
#                    the versions its wheel was built for (launch/gpu_versions.env), and convoy
#   cuda-13.2.86/    the CUDA compiler from NVIDIA's pip wheels; cuda-home/ is a toolkit layout
#                    of symlinks into it (CMake's FindCUDAToolkit wants lib/libcudart.so)
#   horovod-wheels/  install_horovod.sh's wheel cache for this venv (--rebuild empties it)
#   logs/            the full output of every step
# Steps: install; check the TensorFlow is the CUDA build of the pinned versions; build Horovod
# with NCCL through launch/install_horovod.sh, exactly as the image does; import it and require
# `[X] NCCL` and `[X] TensorFlow` from `horovodrun --check-build`; compile Horovod's GPU host
# sources against the CUDA 12.5 headers TensorFlow was built with; run convoy's CPU test subset
# on this TensorFlow (which includes lowering every built-in model's replica step for the GPU).
# Idempotent: a second run reuses the venv, the compiler and the built wheel, and checks again.
# Prints one line on stdout at the end, `gpu-build-check: ok — ...` (exit 0) or
# `gpu-build-check: FAILED — ...` (exit 1); progress goes to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
# shellcheck source=launch/gpu_versions.env
. launch/gpu_versions.env

WORK=${CONVOY_GPU_CHECK_DIR:-$REPO/.gpu-check}
LOGS=$WORK/logs
VENV=$WORK/venv
PY=$VENV/bin/python
start_s=$SECONDS
mkdir -p "$LOGS"

log() { echo "check_gpu_build: $*" >&2; }
fail() {
  echo "gpu-build-check: FAILED — $* (after $((SECONDS - start_s)) s; logs in $LOGS)"
  exit 1
}
step() { # step NAME CMD...: runs CMD with its output in logs/NAME.log; fails with its tail.
  local name=$1
  shift
  log "$name ..."
  if ! "$@" >"$LOGS/$name.log" 2>&1; then
    tail -n 25 "$LOGS/$name.log" >&2
    fail "$name (see $LOGS/$name.log)"
  fi
}

rebuild=0
case "${1:-}" in
  --rebuild) rebuild=1 ;;
  "") ;;
  *) echo "usage: bash launch/check_gpu_build.sh [--rebuild]" >&2; exit 2 ;;
esac

# --- 1. The venv: TensorFlow's CUDA wheel with the CUDA libraries it was built for ------------------
[[ -x $PY ]] || step venv python3 -m venv "$VENV"
tr ' ' '\n' <<<"$TF_CUDA_PIP_PINS" >"$WORK/cuda-pins.txt"
install_key=$(cat setup.py "$WORK/cuda-pins.txt" | sha256sum | cut -c1-16)
if [[ ! -f $VENV/.convoy-gpu-install-$install_key ]]; then
  # convoy itself (editable, as launch/setup_env.sh installs it) with the gpu extra, and the test
  # runner; the constraints pin every nvidia-* wheel that tensorflow[and-cuda] asks for.
  step pip-install "$PY" -m pip install --quiet --disable-pip-version-check \
    -c "$WORK/cuda-pins.txt" -e ".[gpu]" "pytest>=8" "pytest-timeout>=2.3"
  touch "$VENV/.convoy-gpu-install-$install_key"
fi

# What TensorFlow says about itself, and what pip installed, against gpu_versions.env.
step tensorflow-facts env TF_CPP_MIN_LOG_LEVEL=3 "$PY" - "$TF_VERSION" "$CUDA_VERSION" \
  "$CUDNN_VERSION" "$NCCL_VERSION" "$CUDART_VERSION" <<'EOF'
import sys
from importlib.metadata import version
import tensorflow as tf
tf_version, cuda, cudnn, nccl, cudart = sys.argv[1:]
info = tf.sysconfig.get_build_info()
print("tensorflow", tf.__version__, "build info", dict(info))
checks = {
    "tensorflow version": (tf.__version__, tf_version),
    "tf.test.is_built_with_cuda()": (tf.test.is_built_with_cuda(), True),
    "build_info cuda_version": (info.get("cuda_version"), cuda),
    "build_info cudnn_version (major)": (info.get("cudnn_version"), cudnn.split(".")[0]),
    "nvidia-cudnn-cu12": (version("nvidia-cudnn-cu12"), cudnn),
    "nvidia-nccl-cu12": (version("nvidia-nccl-cu12"), nccl),
    "nvidia-cuda-runtime-cu12": (version("nvidia-cuda-runtime-cu12"), cudart),
}
bad = {k: v for k, v in checks.items() if v[0] != v[1]}
for k, (got, want) in checks.items():
    print(f"{k}: {got} (want {want})")
sys.exit(f"unexpected: {bad}" if bad else 0)
EOF

# --- 2. A CUDA compiler ----------------------------------------------------------------------------
CUDA_PKGS=$WORK/cuda-$CHECK_NVCC_VERSION
CUDA_HOME_DIR=$WORK/cuda-home
NVCC_TOP=$CUDA_PKGS/nvidia/cu13
if ! "$NVCC_TOP/bin/nvcc" --version 2>/dev/null | grep -q "V$CHECK_NVCC_VERSION"; then
  rm -rf "$CUDA_PKGS"
  # shellcheck disable=SC2086 # the pins are a word list
  step cuda-compiler "$PY" -m pip install --quiet --disable-pip-version-check --no-deps \
    --target "$CUDA_PKGS" $CHECK_CUDA_PIP_PINS
fi
# A toolkit layout: nvcc finds its tools, headers and libraries relative to itself (TOP=bin/..),
# and CMake's FindCUDAToolkit wants an unversioned libcudart.so, which the wheel does not ship.
rm -rf "$CUDA_HOME_DIR"
mkdir -p "$CUDA_HOME_DIR/lib"
for d in bin include nvvm; do ln -s "$NVCC_TOP/$d" "$CUDA_HOME_DIR/$d"; done
for f in "$NVCC_TOP"/lib/*; do ln -s "$f" "$CUDA_HOME_DIR/lib/"; done
ln -s libcudart.so.13 "$CUDA_HOME_DIR/lib/libcudart.so"
ln -s lib "$CUDA_HOME_DIR/lib64"
"$CUDA_HOME_DIR/bin/nvcc" --version | grep -q "V$CHECK_NVCC_VERSION" \
  || fail "nvcc in $CUDA_HOME_DIR is not $CHECK_NVCC_VERSION"

# --- 3. Horovod with NCCL, by the script the image uses ---------------------------------------------
export HOROVOD_CUDA_HOME=$CUDA_HOME_DIR
export CONVOY_HOROVOD_WHEEL_CACHE=$WORK/horovod-wheels
if ((rebuild)); then
  rm -rf "$CONVOY_HOROVOD_WHEEL_CACHE" "$VENV/share/convoy/horovod-build.stamp"
fi
step install-horovod nice -n 10 bash launch/install_horovod.sh "$PY"
built=$(sed -n 's/^install_horovod: built in \([0-9]*\) s.*/\1/p' "$LOGS/install-horovod.log")
if [[ -n $built ]]; then
  echo "$built $(date -u +%Y-%m-%dT%H:%MZ)" >"$WORK/horovod-build-seconds"
  build_note="horovod built in $built s"
elif [[ -f $WORK/horovod-build-seconds ]]; then
  read -r built built_at <"$WORK/horovod-build-seconds"
  build_note="horovod built in $built s ($built_at; wheel reused now)"
else
  build_note="horovod wheel reused (build time not recorded)"
fi

step check-build env TF_CPP_MIN_LOG_LEVEL=2 "$VENV/bin/horovodrun" --check-build
for want in NCCL TensorFlow Gloo; do
  grep -Eq "\[X\] $want\b" "$LOGS/check-build.log" || fail "horovodrun --check-build: no [X] $want"
done
step import-horovod env TF_CPP_MIN_LOG_LEVEL=3 "$PY" - <<'EOF'
import glob, os, subprocess, sys
import horovod, horovod.tensorflow as hvd
print("horovod", horovod.__version__, "nccl_built", hvd.nccl_built(), "gloo", hvd.gloo_built())
assert hvd.nccl_built(), "hvd.nccl_built() is false"
hvd.init()  # size 1 without horovodrun
assert (hvd.rank(), hvd.size()) == (0, 1)
(lib,) = glob.glob(os.path.join(os.path.dirname(hvd.__file__), "mpi_lib*.so"))
undefined = subprocess.run(["nm", "-D", "--undefined-only", lib], capture_output=True, text=True, check=True).stdout
missing = [line for line in undefined.splitlines() if "stream_executor" in line]
print(lib, "stream_executor symbols it needs:", missing)
sys.exit(f"op library needs StreamExecutor symbols TensorFlow lacks: {missing}" if missing else 0)
EOF

# --- 4. Horovod's GPU host sources against the CUDA 12.5 headers TensorFlow was built with ----------
# The build above compiled them against the CUDA 13.2 toolkit's headers. These translation units
# are the ones that meet TensorFlow's headers or the CUDA runtime API (the GPU paths of the op
# kernels, the XLA ops, the CUDA/NCCL operations); each is compiled again, syntax only, with the
# build's defines and the headers of nvidia-cuda-runtime-cu12 / -nvcc-cu12 12.5.82 and NCCL.
SRC=$WORK/src/horovod-$HOROVOD_VERSION
if [[ ! -f $SRC/horovod/tensorflow/mpi_ops.cc ]]; then
  mkdir -p "$WORK/src"
  step horovod-sdist "$PY" -m pip download --quiet --disable-pip-version-check --no-deps \
    --no-binary :all: -d "$WORK/src" "horovod==$HOROVOD_VERSION"
  tar -xzf "$WORK/src/horovod-$HOROVOD_VERSION.tar.gz" -C "$WORK/src"
fi
CCCL12=$WORK/cuda12-cccl
if [[ ! -d $CCCL12/nvidia/cuda_cccl/include/nv ]]; then
  rm -rf "$CCCL12"
  step cuda12-cccl "$PY" -m pip install --quiet --disable-pip-version-check --no-deps \
    --target "$CCCL12" "$CHECK_CUDA12_CCCL_PIN"
fi
mapfile -t site < <("$PY" -c 'import nvidia.cuda_runtime as r, nvidia.cuda_nvcc as n, nvidia.nccl as c, tensorflow as tf
for m in (r, n, c): print(list(m.__path__)[0] + "/include")
print(tf.sysconfig.get_include())' 2>/dev/null)
cudart_code=$(sed -n 's/^#define CUDART_VERSION *\([0-9]*\).*/\1/p' "${site[0]}/cuda_runtime_api.h")
IFS=. read -r cu_major cu_minor _ <<<"$CUDART_VERSION"
[[ $cudart_code == $((cu_major * 1000 + cu_minor * 10)) ]] \
  || fail "CUDA runtime headers say CUDART_VERSION $cudart_code, not $CUDART_VERSION"
host_flags=(
  -fsyntax-only -w -std=c++17 -pthread -fPIC -D_GLIBCXX_USE_CXX11_ABI=1 -DEIGEN_MAX_ALIGN_BYTES=64
  -DEIGEN_MPL2_ONLY=1 -DHAVE_CUDA=1 -DHAVE_GPU=1 -DHAVE_NCCL=1 -DHAVE_GLOO=1
  -DHOROVOD_GPU_ALLREDUCE=78 -DHOROVOD_GPU_ALLGATHER=78 -DHOROVOD_GPU_BROADCAST=78
  -DHOROVOD_GPU_ALLTOALL=78 -DHOROVOD_GPU_REDUCESCATTER=78 -DTENSORFLOW_VERSION=2021000000
  -I"$SRC/third_party/HTTPRequest/include" -I"$SRC/third_party/lbfgs/include"
  -I"$SRC/third_party/gloo" -I"$SRC/third_party/flatbuffers/include"
)
for d in "$SRC"/third_party/boost/*/include; do host_flags+=(-I"$d"); done
# TensorFlow's include directory last, as in the build (-I before -isystem; CUDA 12.5 first).
host_flags+=(-isystem "${site[0]}" -isystem "${site[1]}" -isystem "$CCCL12/nvidia/cuda_cccl/include"
  -isystem "${site[2]}" -I"${site[3]}")
export CPLUS_INCLUDE_PATH=$VENV/share/convoy/xla-compat-include
host_sources=(horovod/tensorflow/mpi_ops.cc horovod/tensorflow/xla_mpi_ops.cc
  horovod/common/ops/cuda_operations.cc horovod/common/ops/gpu_operations.cc
  horovod/common/ops/nccl_operations.cc)
for src in "${host_sources[@]}"; do
  step "cuda12-headers-$(basename "$src" .cc)" nice -n 10 g++ "${host_flags[@]}" "$SRC/$src"
done

# --- 5. convoy's CPU tests on this TensorFlow ----------------------------------------------------------
# The CUDA wheel runs on the CPU too. The tests start their subprocesses with sys.executable, so
# trainer runs and horovodrun ranks use this venv; HOROVOD_CUDA_HOME (exported above) keeps the
# install script's re-check on this build key. tests/test_xla_gpu_lowering.py lowers every
# built-in model's replica step for the GPU here (for the CPU on the CPU wheel, as launch/test.sh).
subset=(tests/test_xla_gpu_lowering.py tests/test_trainer_units.py tests/test_datasets_pipeline.py
  tests/test_replicas.py tests/test_launch_horovod.py tests/test_fp16.py tests/test_gpu_build_recipe.py
  tests/cuda_build)
log "CPU test subset: ${subset[*]} ..."
if ! nice -n 10 "$PY" -m pytest -v -p no:cacheprovider -rfE "${subset[@]}" >"$LOGS/cpu-tests.log" 2>&1; then
  tail -n 30 "$LOGS/cpu-tests.log" >&2
  fail "CPU test subset: $(tail -n 1 "$LOGS/cpu-tests.log")"
fi
tests_line=$(grep -Eo '[0-9]+ passed[^=]*' "$LOGS/cpu-tests.log" | tail -n 1 | sed 's/ in [0-9.]*s.*//; s/ *$//')
lowered=$(grep -c 'test_xla_gpu_lowering.py::test_replica_step_lowers.* PASSED' "$LOGS/cpu-tests.log" || true)
[[ $lowered -gt 0 ]] || fail "XLA GPU lowering: no test_replica_step_lowers case passed (see $LOGS/cpu-tests.log)"

# The architectures are logged only when the script builds; a reused wheel has the recorded ones.
archs=$(sed -n 's/.*CUDA archs \([0-9,]*\).*/\1/p' "$LOGS/install-horovod.log" | tail -n 1)
if [[ -n $archs ]]; then echo "$archs" >"$WORK/horovod-build-archs"; fi
[[ -n $archs || ! -f $WORK/horovod-build-archs ]] || archs=$(cat "$WORK/horovod-build-archs")
echo "gpu-build-check: ok — tensorflow $TF_VERSION (CUDA build, cuda $CUDA_VERSION, cudnn $CUDNN_VERSION), nccl $NCCL_VERSION; horovod $HOROVOD_VERSION [X] NCCL [X] TensorFlow (nvcc $CHECK_NVCC_VERSION, archs ${archs:-?}); GPU host sources vs CUDA $CUDART_VERSION headers: ${#host_sources[@]} compiled; XLA GPU lowering (HLO): ${lowered} model/precision steps; ${build_note}; CPU subset: ${tests_line:-?}; total $((SECONDS - start_s)) s"

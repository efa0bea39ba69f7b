#!/usr/bin/env bash
# Build and install Horovod 0.28.1 against the TensorFlow already installed for PYTHON.
#
# Usage: bash launch/install_horovod.sh [PYTHON]      (default: the python on PATH)
#
# Why this script exists: Horovod 0.28.1 is the newest release and ships only as an sdist, so it is
# compiled against the installed TensorFlow's headers and libtensorflow_framework. That only works
# with three workarounds (see BUILD.md): Debian's highwayhash/farmhash headers, a forwarding header
# for an XLA include that moved, and --no-build-isolation so the build sees the real TensorFlow.
#
# Idempotent: a stamp file records what the installed build was compiled against (Horovod version,
# TensorFlow version, Python version, GPU/MPI flavour). If it matches and `import horovod.tensorflow`
# works, nothing is installed. Built wheels are kept in a cache keyed by the same stamp, so a fresh
# venv with the same TensorFlow installs in seconds, and a TensorFlow upgrade always rebuilds.
# It always ends with `horovodrun --check-build` and exits non-zero if TensorFlow support is missing.
#
# Environment knobs (all optional):
#   CONVOY_HOROVOD_WHEEL_CACHE  where built wheels are kept (default ~/.cache/convoy/horovod-wheels)
#   HOROVOD_NCCL_HOME / _INCLUDE / _LIB / _LINK   passed through to Horovod's CMake for CUDA builds
set -euo pipefail

readonly HOROVOD_VERSION=0.28.1

log() { echo "install_horovod: $*" >&2; }
die() { echo "install_horovod: ERROR: $*" >&2; exit 1; }
# A command failing under set -e outside die() still says where, instead of exiting silently.
trap 'echo "install_horovod: ERROR: line $LINENO failed: $BASH_COMMAND" >&2' ERR

start_s=$SECONDS

PYTHON_ARG=${1:-python}
PYTHON=$(command -v "$PYTHON_ARG") || die "no python interpreter '$PYTHON_ARG' on PATH"

# --- What are we building against? -------------------------------------------------------------
# Everything that decides the binary's ABI comes from the target interpreter, not from this shell.
# TF_CPP_MIN_LOG_LEVEL silences TensorFlow's import banner so only our fields reach stdout.
facts=$(TF_CPP_MIN_LOG_LEVEL=3 "$PYTHON" - <<'EOF'
import sys, sysconfig
try:
    import tensorflow as tf
except Exception as e:  # noqa: BLE001 - any import failure means the same thing here
    print(f"ERROR tensorflow is not importable: {e}")
    sys.exit(0)
print(sys.prefix)
print(f"{sys.version_info.major}.{sys.version_info.minor}")
print(tf.__version__)
print(int(tf.test.is_built_with_cuda()))
print(sysconfig.get_paths()["include"])
print(sysconfig.get_path("scripts"))
print(tf.sysconfig.get_include())
# The GPU architectures TensorFlow itself ships kernels for (sm_60 ... compute_90 for 2.21).
ccs = tf.sysconfig.get_build_info().get("cuda_compute_capabilities", [])
print(",".join(sorted({c.split("_")[1] for c in ccs}, key=int)))
EOF
) || die "could not run $PYTHON"
[[ $facts == ERROR* ]] && die "${facts#ERROR } (install tensorflow first, e.g. pip install -e '.[cpu]')"
# The last fact is empty on the CPU wheel, and $(...) drops its line: that read then fails.
{ read -r PREFIX; read -r PY_VERSION; read -r TF_VERSION; read -r TF_CUDA; read -r PY_INCLUDE; read -r SCRIPTS_DIR; read -r TF_INCLUDE; read -r TF_CUDA_CCS || true; } <<<"$facts"
[[ -n $SCRIPTS_DIR ]] || die "could not query $PYTHON (got: $facts)"

# NCCL only when TensorFlow itself is a CUDA build: a machine can have nvcc/libcudart installed
# while TensorFlow is the CPU wheel, and Horovod's NCCL ops would then never be used.
GPU_OPS=none
[[ $TF_CUDA == 1 ]] && GPU_OPS=NCCL

# The CUDA compiler for a CUDA build: $HOROVOD_CUDA_HOME/bin/nvcc (a toolkit, or one assembled
# from NVIDIA's pip wheels by launch/check_gpu_build.sh), else nvcc on PATH, else /usr/local/cuda.
# Horovod's CMake compiles its .cu kernels with it and its C++ against that toolkit's headers.
# Its release goes into the build key: the wheel links that toolkit's static CUDA runtime.
NVCC=
NVCC_VERSION=
if [[ $GPU_OPS == NCCL ]]; then
  if [[ -n ${HOROVOD_CUDA_HOME:-} ]]; then
    NVCC=$HOROVOD_CUDA_HOME/bin/nvcc
  else
    NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
  fi
  [[ -x $NVCC ]] || die "TensorFlow is a CUDA build, so Horovod is built with NCCL, which needs nvcc: none at $NVCC (install a CUDA toolkit, or set HOROVOD_CUDA_HOME; BUILD.md, \"CUDA images\")"
  NVCC_VERSION=$("$NVCC" --version | sed -n 's/.*release \([0-9][0-9.]*\),.*/\1/p')
  [[ -n $NVCC_VERSION ]] || die "could not read the CUDA release from '$NVCC --version'"
  GPU_OPS_KEY="NCCL-cuda$NVCC_VERSION"
else
  GPU_OPS_KEY=none
fi

# MPI is optional: Gloo covers horovodrun, but a Kubeflow MPIJob launches through mpirun, which
# needs Horovod's MPI controller. Build it in whenever an MPI compiler wrapper is installed.
WITH_MPI=0
if command -v mpicxx >/dev/null 2>&1 || command -v mpicc >/dev/null 2>&1; then WITH_MPI=1; fi

BUILD_KEY="horovod-${HOROVOD_VERSION}_tf-${TF_VERSION}_py-${PY_VERSION}_gpu-${GPU_OPS_KEY}_mpi-${WITH_MPI}"
STATE_DIR="$PREFIX/share/convoy"
STAMP="$STATE_DIR/horovod-build.stamp"
WHEEL_DIR="${CONVOY_HOROVOD_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/convoy/horovod-wheels}/$BUILD_KEY"
log "python $PYTHON ($PY_VERSION, prefix $PREFIX), TensorFlow $TF_VERSION, cuda=$TF_CUDA${NVCC:+, nvcc $NVCC ($NVCC_VERSION)}"
log "build key $BUILD_KEY"

check_build() {
  # The horovodrun installed for PYTHON (not whichever is first on PATH); --check-build imports
  # each framework binding, so a broken TensorFlow op library shows up as an unchecked box.
  local out
  out=$(TF_CPP_MIN_LOG_LEVEL=2 "$SCRIPTS_DIR/horovodrun" --check-build 2>&1) || die "horovodrun --check-build failed:
$out"
  echo "$out"
  grep -Eq '\[X\] TensorFlow' <<<"$out" \
    || die "Horovod is installed but TensorFlow support is MISSING (see check-build above)"
  grep -Eq '\[X\] Gloo' <<<"$out" || die "Horovod is installed but Gloo support is MISSING"
  if [[ $GPU_OPS == NCCL ]]; then
    grep -Eq '\[X\] NCCL' <<<"$out" \
      || die "TensorFlow is a CUDA build but Horovod's NCCL support is MISSING (see check-build above)"
  fi
}

installed_build_ok() {
  [[ -f $STAMP && $(cat "$STAMP") == "$BUILD_KEY" ]] || return 1
  # The stamp alone is not proof: the package may have been removed or replaced since.
  TF_CPP_MIN_LOG_LEVEL=3 "$PYTHON" - "$HOROVOD_VERSION" <<'EOF' >/dev/null 2>&1
import sys
import cloudpickle, psutil, yaml, packaging  # runtime deps of horovodrun
import horovod, horovod.tensorflow
assert horovod.__version__ == sys.argv[1], horovod.__version__
EOF
}

if installed_build_ok; then
  log "Horovod $HOROVOD_VERSION already built for this TensorFlow; nothing to install"
  check_build
  log "done in $((SECONDS - start_s)) s"
  exit 0
fi

# --- System packages ---------------------------------------------------------------------------
# TensorFlow's public headers (tsl/platform/fingerprint.h, xla/printer.h) include farmhash.h and
# highwayhash/*, which the TensorFlow wheel does not ship. Compilers and Python.h only if missing.
apt_pkgs=()
for pkg in libhighwayhash-dev libfarmhash-dev; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || apt_pkgs+=("$pkg")
done
command -v cmake >/dev/null 2>&1 || apt_pkgs+=(cmake)
command -v g++ >/dev/null 2>&1 || apt_pkgs+=(g++)
command -v make >/dev/null 2>&1 || apt_pkgs+=(make)
[[ -f $PY_INCLUDE/Python.h ]] || apt_pkgs+=("python${PY_VERSION}-dev")
if ((${#apt_pkgs[@]})); then
  command -v apt-get >/dev/null 2>&1 || die "need ${apt_pkgs[*]} but apt-get is not available"
  log "installing Debian packages: ${apt_pkgs[*]}"
  # Fresh images start with empty package lists, so update once, and only when installing.
  SUDO=(); ((EUID == 0)) || SUDO=(sudo)
  "${SUDO[@]}" apt-get update -qq
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${apt_pkgs[@]}"
fi
[[ -f $PY_INCLUDE/Python.h ]] || die "Python.h not found in $PY_INCLUDE even after installing headers"

# --- Forwarding header -------------------------------------------------------------------------
# horovod/tensorflow/xla_mpi_ops.cc includes tensorflow/compiler/xla/client/xla_builder.h, which
# newer TensorFlow ships as xla/hlo/builder/xla_builder.h. A header at the old path keeps the
# unmodified sdist compiling. Its GPU part (the XLA custom-call ops, compiled only with CUDA) also
# spells absl::StatusOr as xla::StatusOr, an alias XLA has since removed, so the header defines
# it again. It lives under the prefix so it survives for rebuilds.
COMPAT_INCLUDE="$STATE_DIR/xla-compat-include"
mkdir -p "$COMPAT_INCLUDE/tensorflow/compiler/xla/client"
cat >"$COMPAT_INCLUDE/tensorflow/compiler/xla/client/xla_builder.h" <<'EOF'
// Written by convoy's launch/install_horovod.sh for Horovod 0.28.1 against TensorFlow 2.21.
#include "xla/hlo/builder/xla_builder.h"
#include "absl/status/statusor.h"
namespace xla {
template <typename T>
using StatusOr = absl::StatusOr<T>;
}  // namespace xla
EOF
export CPLUS_INCLUDE_PATH="$COMPAT_INCLUDE${CPLUS_INCLUDE_PATH:+:$CPLUS_INCLUDE_PATH}"

# --- Python-side dependencies -------------------------------------------------------------------
# Horovod itself is installed with --no-deps (its metadata would otherwise pull `tensorflow`, a
# second TensorFlow next to tensorflow-cpu), so its runtime deps are named here; cffi is needed
# only by the PyTorch binding we disable. --no-build-isolation builds with the environment's own
# setuptools and wheel, which Python 3.12+ venvs no longer contain.
"$PYTHON" -m pip install --quiet cloudpickle psutil pyyaml packaging setuptools wheel

# --- Build flags -------------------------------------------------------------------------------
export HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1
export HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1
if ((WITH_MPI)); then
  export HOROVOD_WITH_MPI=1; unset HOROVOD_WITHOUT_MPI
else
  export HOROVOD_WITHOUT_MPI=1; unset HOROVOD_WITH_MPI
fi
if [[ $GPU_OPS == NCCL ]]; then
  export HOROVOD_GPU_OPERATIONS=NCCL
  [[ -n ${HOROVOD_CUDA_HOME:-} ]] && export HOROVOD_CUDA_HOME
  # Kernels for the architectures TensorFlow ships kernels for, as far as this nvcc still
  # compiles them (CUDA 13 dropped everything before sm_75); the newest also as PTX. Horovod's
  # default is every architecture nvcc knows, which multiplies the kernel compile time.
  if [[ -z ${HOROVOD_BUILD_CUDA_CC_LIST:-} ]]; then
    nvcc_ccs=" $("$NVCC" --list-gpu-arch 2>/dev/null | sed -n 's/^compute_\([0-9]*\)$/\1/p' | tr '\n' ' ')"
    ccs=()
    for cc in ${TF_CUDA_CCS//,/ }; do [[ $nvcc_ccs == *" $cc "* ]] && ccs+=("$cc"); done
    ((${#ccs[@]})) || die "nvcc $NVCC_VERSION compiles none of TensorFlow's GPU architectures ($TF_CUDA_CCS)"
    HOROVOD_BUILD_CUDA_CC_LIST=$(IFS=,; echo "${ccs[*]}")
  fi
  export HOROVOD_BUILD_CUDA_CC_LIST
  cmake_defs=()  # extra -D options for Horovod's CMake configure step (see the wrapper below)
  # TensorFlow's CUDA wheels bring NCCL as the nvidia-nccl-cu12 pip package, which ships only
  # libnccl.so.2. Horovod's FindNCCL wants libnccl.so (or the static lib), so unless the caller
  # points at an NCCL already, build a tiny NCCL home of symlinks and link NCCL dynamically. The
  # op library finds libnccl.so.2 through its runpath: the package's lib directory relative to the
  # library itself ($ORIGIN, so a cached wheel works in any venv), then the home's (the image also
  # registers the package's lib directory with ldconfig).
  if [[ -z ${HOROVOD_NCCL_HOME:-}${HOROVOD_NCCL_INCLUDE:-}${HOROVOD_NCCL_LIB:-} ]]; then
    nccl_pkg=$("$PYTHON" -c 'import nvidia.nccl; print(list(nvidia.nccl.__path__)[0])' 2>/dev/null || true)
    if [[ -n $nccl_pkg && -f $nccl_pkg/include/nccl.h ]]; then
      nccl_home="$STATE_DIR/nccl-home"
      mkdir -p "$nccl_home/lib"
      ln -sfn "$nccl_pkg/include" "$nccl_home/include"
      ln -sf "$nccl_pkg/lib/libnccl.so.2" "$nccl_home/lib/libnccl.so"
      ln -sf "$nccl_pkg/lib/libnccl.so.2" "$nccl_home/lib/libnccl.so.2"
      export HOROVOD_NCCL_HOME="$nccl_home" HOROVOD_NCCL_INCLUDE="$nccl_home/include"
      export HOROVOD_NCCL_LIB="$nccl_home/lib" HOROVOD_NCCL_LINK=SHARED
      # shellcheck disable=SC2016 # $ORIGIN is for the dynamic loader, not for the shell
      cmake_defs+=('-DCMAKE_BUILD_RPATH=$ORIGIN/../../nvidia/nccl/lib')
    fi
  fi
  # Horovod 0.28.1's TensorFlow GPU ops get an op's CUDA stream from
  # stream_executor::gpu::AsGpuStreamValue(Stream*), which mpi_ops.cc only declares. TensorFlow
  # 2.21's StreamExecutor no longer has that function (no header declares it, no library exports
  # it), so the op library would compile and then fail to load with an undefined symbol. It is
  # defined here the way StreamExecutor now hands out the handle, compiled against the installed
  # TensorFlow's headers, and linked into Horovod's shared libraries through CMAKE_SHARED_LINKER_FLAGS
  # (LDFLAGS would also reach CMake's compiler checks, whose test programs cannot link it).
  if ! grep -rqs AsGpuStreamValue "$TF_INCLUDE/xla/stream_executor" \
    "$TF_INCLUDE/tensorflow/compiler/xla/stream_executor"; then
    shim_dir="$STATE_DIR/stream-compat"
    mkdir -p "$shim_dir"
    cat >"$shim_dir/as_gpu_stream_value.cc" <<'EOF'
// Written by convoy's launch/install_horovod.sh: the function Horovod 0.28.1 declares and
// TensorFlow 2.21 no longer has (see the script). CUDA's cudaStream_t is CUstream_st*.
#include "xla/stream_executor/stream.h"
struct CUstream_st;
namespace stream_executor {
namespace gpu {
CUstream_st* AsGpuStreamValue(Stream* stream) {
  return static_cast<CUstream_st*>(stream->platform_specific_handle().stream);
}
}  // namespace gpu
}  // namespace stream_executor
EOF
    mapfile -t tf_cflags < <("$PYTHON" -c 'import tensorflow as tf; print("\n".join(tf.sysconfig.get_compile_flags()))' 2>/dev/null)
    # -DNDEBUG drops the DCHECKs of inline TensorFlow code, which would need absl symbols.
    g++ -O2 -DNDEBUG -w -fPIC "${tf_cflags[@]}" -c "$shim_dir/as_gpu_stream_value.cc" -o "$shim_dir/as_gpu_stream_value.o" \
      || die "could not compile the AsGpuStreamValue shim against TensorFlow $TF_VERSION's headers"
    cmake_defs+=("-DCMAKE_SHARED_LINKER_FLAGS=$shim_dir/as_gpu_stream_value.o")
    log "TensorFlow $TF_VERSION has no stream_executor::gpu::AsGpuStreamValue: linking $shim_dir/as_gpu_stream_value.o"
  fi
  # Horovod's setup.py runs "$HOROVOD_CMAKE" (default cmake) to configure and to build; a wrapper
  # adds the options above to the configure call only.
  if ((${#cmake_defs[@]})); then
    real_cmake=$(command -v "${HOROVOD_CMAKE:-cmake}") || die "cmake not found"
    mkdir -p "$STATE_DIR/cmake-wrapper"
    {
      echo '#!/usr/bin/env bash'
      echo "# Written by convoy's launch/install_horovod.sh: configure with the options it needs."
      # shellcheck disable=SC2016 # the wrapper's own "$@" and $1
      echo 'case "${1:-}" in'
      printf '  -*|"") exec %q "$@" ;;\n' "$real_cmake"
      printf '  *) exec %q "$@"%s ;;\n' "$real_cmake" "$(printf ' %q' "${cmake_defs[@]}")"
      echo 'esac'
    } >"$STATE_DIR/cmake-wrapper/cmake"
    chmod +x "$STATE_DIR/cmake-wrapper/cmake"
    export HOROVOD_CMAKE="$STATE_DIR/cmake-wrapper/cmake"
  fi
  log "CUDA TensorFlow: HOROVOD_GPU_OPERATIONS=NCCL, nvcc $NVCC_VERSION, CUDA archs $HOROVOD_BUILD_CUDA_CC_LIST (NCCL home: ${HOROVOD_NCCL_HOME:-system default})"
else
  unset HOROVOD_GPU_OPERATIONS
fi
# Horovod's setup.py passes -j8 to make unless MAKEFLAGS is set; each translation unit pulls in
# TensorFlow's headers and needs ~1 GB of RAM, so match the core count instead of oversubscribing.
export MAKEFLAGS="${MAKEFLAGS:--j$(nproc)}"

# --- Build (or reuse a wheel built for exactly this key) and install ----------------------------
# pip's own wheel cache is keyed by the sdist, not by the TensorFlow it was compiled against, so
# after a TensorFlow upgrade it would happily reinstall a wheel linked against the old one. Hence
# --no-cache-dir for the build and our own cache keyed by BUILD_KEY.
shopt -s nullglob
wheels=("$WHEEL_DIR"/horovod-"$HOROVOD_VERSION"-*.whl)
if ((${#wheels[@]} == 0)); then
  log "building Horovod $HOROVOD_VERSION from source (about 9 minutes on 2 cores)"
  build_s=$SECONDS
  tmp_wheels=$(mktemp -d)
  trap 'rm -rf "$tmp_wheels"' EXIT
  # --no-build-isolation: the build must import the installed TensorFlow for its headers and ABI.
  "$PYTHON" -m pip wheel --no-build-isolation --no-deps --no-cache-dir \
    --wheel-dir "$tmp_wheels" "horovod==$HOROVOD_VERSION"
  mkdir -p "$WHEEL_DIR"
  mv "$tmp_wheels"/horovod-"$HOROVOD_VERSION"-*.whl "$WHEEL_DIR"/
  wheels=("$WHEEL_DIR"/horovod-"$HOROVOD_VERSION"-*.whl)
  ((${#wheels[@]} == 1)) || die "expected one built wheel in $WHEEL_DIR, found ${#wheels[@]}"
  log "built in $((SECONDS - build_s)) s: ${wheels[0]}"
else
  log "reusing wheel built for this key: ${wheels[0]}"
fi
rm -f "$STAMP"  # a half-finished install must never look complete
"$PYTHON" -m pip install --no-deps --force-reinstall --quiet "${wheels[0]}"

TF_CPP_MIN_LOG_LEVEL=3 "$PYTHON" -c 'import horovod.tensorflow' \
  || die "Horovod installed but 'import horovod.tensorflow' fails (wheel built for another TensorFlow?)"
check_build
mkdir -p "$STATE_DIR"
echo "$BUILD_KEY" >"$STAMP"
log "Horovod $HOROVOD_VERSION installed in $((SECONDS - start_s)) s"

#!/usr/bin/env bash
# Build the pybind11 module l2l_tf._kernels with the CUDA kernels (no setup.py, no TensorFlow) into a temporary
# directory, show the compiler's resource report and the SASS instruction mix of the kernels, then run
# tools/gpu_check.py (correctness vs the CPU kernels, timing vs the memory floor, JAX and torch.compile).
#
#   bash tools/gpu_check.sh [gpu_check.py options]     e.g. --no-frameworks, --sizes 1e6, --no-timing
# Environment: PYTHON (python3), NVCC (nvcc on PATH, else /usr/local/cuda/bin/nvcc), GPU_ARCH (e.g. 90a; default:
# from nvidia-smi), OUT (if set: gpu_check.json, build.log and sass.txt are written there).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
if [[ -z "${CUDA_HOME:-}" ]]; then
  if [[ -d /usr/local/cuda/lib64 ]]; then CUDA_HOME=/usr/local/cuda; else CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$NVCC")")"); fi
fi
CUDART="-lcudart_static -ldl -lrt -lpthread"
for d in "$CUDA_HOME/lib64" "$CUDA_HOME/targets/x86_64-linux/lib" "$CUDA_HOME/lib"; do
  if [[ -f "$d/libcudart_static.a" ]]; then CUDART="-L$d $CUDART"; break; fi
  if [[ -f "$d/libcudart.so" ]]; then CUDART="-L$d -Wl,-rpath,$d -lcudart"; break; fi
done
if [[ -z "${GPU_ARCH:-}" ]]; then
  cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .' || true)
  case "$cc" in
    90) GPU_ARCH=90a ;;
    "") GPU_ARCH=90a ;;
    *) GPU_ARCH=$cc ;;
  esac
fi
BUILD=$(mktemp -d /tmp/l2l_gpu_check.XXXXXX)
LOGDIR=${OUT:-$BUILD}
EXT=$($PY -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
PYINC=$($PY -m pybind11 --includes)
CXXFLAGS="-O3 -march=native -std=c++17 -fPIC -Icsrc"
echo "== build: nvcc $("$NVCC" --version | tail -1), arch sm_${GPU_ARCH}, python $($PY -c 'import sys; print(sys.version.split()[0])'), into $BUILD"
t0=$(date +%s)
"$NVCC" -c -O3 -std=c++17 --expt-relaxed-constexpr -Xcompiler -fPIC \
  -gencode=arch=compute_${GPU_ARCH},code=sm_${GPU_ARCH} -Xptxas -v -Icsrc \
  csrc/lstm_step_cuda.cu -o "$BUILD/lstm_step_cuda.o" >"$BUILD/nvcc.log" 2>&1 & p1=$!
g++ $CXXFLAGS -DL2L_WITH_CUDA $PYINC -c csrc/pybind_module.cc -o "$BUILD/pybind_module.o" & p2=$!
g++ $CXXFLAGS $PYINC -DL2L_WITH_CUDA -c csrc/pybind_cuda.cc -o "$BUILD/pybind_cuda.o" & p3=$!
g++ $CXXFLAGS -c csrc/lstm_step_cpu.cc -o "$BUILD/lstm_step_cpu.o" & p4=$!
fail=0
wait $p1 || { echo "nvcc FAILED:"; cat "$BUILD/nvcc.log"; fail=1; }
wait $p2 || fail=1
wait $p3 || fail=1
wait $p4 || fail=1
[[ $fail == 0 ]] || { echo "build failed"; exit 1; }
g++ -shared -o "$BUILD/_kernels$EXT" "$BUILD/pybind_module.o" "$BUILD/pybind_cuda.o" "$BUILD/lstm_step_cpu.o" \
  "$BUILD/lstm_step_cuda.o" $CUDART
echo "build: $(( $(date +%s) - t0 )) s"
[[ "$LOGDIR" != "$BUILD" ]] && cp "$BUILD/nvcc.log" "$LOGDIR/build.log"

# SASS of the CUDA object (the Python side prints, per kernel: registers/spills from the ptxas report and the
# counts of HMMA = tensor-core mma, LDGSTS = cp.async, MUFU, LDL/STL = local memory).
CUOBJDUMP=$(command -v cuobjdump || echo "$CUDA_HOME/bin/cuobjdump")
if [[ -x "$CUOBJDUMP" ]]; then
  "$CUOBJDUMP" -sass "$BUILD/lstm_step_cuda.o" >"$BUILD/sass.txt" 2>/dev/null || true
  [[ "$LOGDIR" != "$BUILD" ]] && gzip -c "$BUILD/sass.txt" >"$LOGDIR/sass.txt.gz"
else
  echo "(no cuobjdump: SASS check skipped)"
fi

nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,clocks.mem,driver_version --format=csv 2>/dev/null || true
PYTHONUNBUFFERED=1 $PY tools/gpu_check.py --module-dir "$BUILD" "$@"

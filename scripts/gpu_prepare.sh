#!/usr/bin/env bash
# Prepare .gpu_carry/ (git-ignored through .git/info/exclude) for scripts/gpu_check.sh, here on
# the CPU machine. The GPU machine has Python 3.12 with a CUDA 13 PyTorch, transformers and
# nvidia-cuda-runtime, no network and no apache-tvm, so it gets:
#   .gpu_carry/wheels/       apache-tvm-ffi (the version installed here) for CPython 3.12
#   .gpu_carry/tvm_runtime/  libtvm_runtime.so + libtvm_runtime_cuda.so copied from this apache-tvm
#                            wheel, and VERSION (its release); found through
#                            LONGFORMER_TVM_RUNTIME_DIR, which gpu_check.sh exports
#   .gpu_carry/candidates/   offline-tuning candidate libraries for sm_90 (CANDIDATES=0 skips)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
CARRY=.gpu_carry
mkdir -p "$CARRY/wheels" "$CARRY/tvm_runtime" .git/info
grep -qx "/$CARRY/" .git/info/exclude 2>/dev/null || echo "/$CARRY/" >> .git/info/exclude

ffi=$("$PY" -c "import importlib.metadata as m; print(m.version('apache-tvm-ffi'))")
tvm=$("$PY" -c "import importlib.metadata as m; print(m.version('apache-tvm'))")
rm -f "$CARRY"/wheels/apache_tvm_ffi-*.whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$CARRY/wheels" "apache-tvm-ffi==$ffi"

lib=$("$PY" -c "from longformer_tvm import backend_info; print(backend_info()['cuda']['runtime_dir'])")
cp "$lib/libtvm_runtime.so" "$lib/libtvm_runtime_cuda.so" "$CARRY/tvm_runtime/"
echo "$tvm" > "$CARRY/tvm_runtime/VERSION"

if [ "${CANDIDATES:-1}" = 1 ] && [ ! -f "$CARRY/candidates/candidates.json" ]; then
    "$PY" -m tvm_kernels.cuda.tune offline-build --arch sm_90 --dtype float32,float16 \
        --out "$CARRY/candidates"
fi
du -sh "$CARRY"/*
echo "ready: run scripts/gpu_check.sh on the GPU machine with $CARRY carried"

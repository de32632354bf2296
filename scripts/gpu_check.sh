#!/usr/bin/env bash
# The whole GPU check in one call, on a machine with an NVIDIA GPU (sm_80/86/89/90 or newer):
#
#   bash scripts/gpu_prepare.sh            # first, on the CPU machine (fills .gpu_carry/)
#   bash scripts/gpu_check.sh              # then on the GPU machine, repo root, .gpu_carry carried
#
# It needs there: python3 with a CUDA 13 PyTorch (the nvidia-cuda-runtime wheel that comes with
# it supplies libcudart.so.13), transformers and pytest; no network, no apache-tvm. It installs the
# carried tvm-ffi wheel into /tmp/lftvm-site, points LONGFORMER_TVM_RUNTIME_DIR at the carried TVM
# runtime libraries, then:
#   1. env.txt              GPU, driver, and which CUDA library the loader picks (backend_info)
#   2. selfcheck.txt        build_kernels.py selfcheck: every library x product x dtype against the
#                           float64 reference, and the timing table (non-zero exit on mismatch)
#   3. test_cuda.txt        pytest -m cuda tests/test_cuda.py (streams, second GPU, autocast, ...)
#   4. cuda_bench.json,     QK/PV/attention at B=1 N=4096 H=12 D=64 w=256 in fp32 and fp16 beside
#      RESULTS_cuda.md      transformers' sliding chunks, dense SDPA and FlexAttention, plus the
#                           copy bandwidth; RESULTS_cuda.md is a section for benchmarks/RESULTS.md
#   5. candidate_timings.json  offline-tuning candidates timed (when .gpu_carry/candidates exists);
#                           back here: python -m tvm_kernels.cuda.tune offline-collect FILE
# Results go to $OUT (the device tool's folder), else ./gpu_out. Exit status: non-zero if the
# selfcheck or the tests failed. Step time limits add up to 570 s, inside the device tool's 600 s
# per call (run it with timeout_s=600); every file in $OUT is written as its step ends.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/gpu_out}
CARRY=${CARRY:-.gpu_carry}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if ! ls "$CARRY"/wheels/apache_tvm_ffi-*.whl >/dev/null 2>&1 || [ ! -f "$CARRY/tvm_runtime/libtvm_runtime_cuda.so" ]; then
    echo "missing $CARRY/: run scripts/gpu_prepare.sh on the CPU machine and carry $CARRY" | tee "$OUT/summary.txt"
    exit 2
fi
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/lftvm-site "$CARRY"/wheels/*.whl || { echo "pip install of the carried wheel failed"; exit 2; }
CARRY=$(cd "$CARRY" && pwd)
export PYTHONPATH="/tmp/lftvm-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export LONGFORMER_TVM_RUNTIME_DIR="$CARRY/tvm_runtime"
export LONGFORMER_TVM_LOG_LEVEL=INFO

{
    date -u
    nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv || true
    "$PY" - <<'EOF'
import json, torch, longformer_tvm as lt
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())
x = torch.randn(1, 64, 2, 16, device="cuda")
lt.sliding_window_qk(x, x, 4)
print(json.dumps(lt.backend_info()["cuda"], indent=1))
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

timeout 240 "$PY" build_kernels.py selfcheck > "$OUT/selfcheck.txt" 2>&1
rc_self=$?
cat "$OUT/selfcheck.txt"

timeout 150 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py -rs > "$OUT/test_cuda.txt" 2>&1
rc_test=$?
tail -25 "$OUT/test_cuda.txt"

timeout 120 "$PY" -m benchmarks.cuda_bench --dtypes float32,float16 --json "$OUT/cuda_bench.json" \
    --markdown "$OUT/RESULTS_cuda.md" 2>&1 | tail -30
rc_bench=${PIPESTATUS[0]}

rc_cand=0
if [ -f "$CARRY/candidates/candidates.json" ]; then
    timeout 60 "$PY" -m benchmarks.cuda_candidates "$CARRY/candidates" \
        --json "$OUT/candidate_timings.json" 2>&1 | tail -60
    rc_cand=${PIPESTATUS[0]}
fi

# every CUDA library (3 dtypes x 3 products) must have been checked here, not skipped
cuda_ok=$(grep -c '^cuda/.* ok$' "$OUT/selfcheck.txt")
rc_cuda=0; [ "$cuda_ok" -ge 9 ] || rc_cuda=1
echo "selfcheck=$rc_self cuda_products_ok=$cuda_ok/9 tests=$rc_test bench=$rc_bench candidates=$rc_cand" \
    | tee "$OUT/summary.txt"
[ "$rc_self" = 0 ] && [ "$rc_cuda" = 0 ] && [ "$rc_test" = 0 ]

#!/usr/bin/env bash
# On a host with a CUDA GPU: build beluga_native with the GPU copy path, run the tests that
# need the GPU (the pool's GPU copies and vLLM's CUDA KV layout through the pool), then the
# GPU section of the transfer benchmark. Uses the python3 on PATH (or $PYTHON), which needs
# torch with CUDA, pybind11, numpy and pytest; no vLLM.
#
#   scripts/gpu_check.sh [OUT_DIR]      (make gpu-check)
#
# OUT_DIR (default bench/out) receives gpu_tests.log and pool_transfer_cuda.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${1:-bench/out}
mkdir -p "$OUT"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda, "device", torch.cuda.get_device_name())'
df -h /dev/shm | tail -1

BELUGA_BUILD_CUDA=1 "$PY" setup.py -q build_ext --inplace 2>&1 | grep -v -i "deprecat" || true
"$PY" -c 'import kvpool; assert kvpool.cuda_built() and kvpool.cuda_device_count() > 0, \
"beluga_native has no GPU path or sees no device"; print("beluga_native: CUDA path built,",
kvpool.cuda_device_count(), "device(s)")'

rc=0
"$PY" -m pytest -q -p no:cacheprovider -o addopts="-ra" \
    tests/kvpool tests/engine/test_kv_layout.py 2>&1 | tee "$OUT/gpu_tests.log" || rc=$?
"$PY" bench/pool_transfer.py --cuda-only --json "$OUT/pool_transfer_cuda.json" || rc=$?
exit $rc

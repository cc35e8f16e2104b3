#!/usr/bin/env bash
# The GPU checks as one command, for a lent GPU machine (the `device` tool: one H200, a few minutes).
# Prepare the wheels here first (bash bench/gpu_wheels.sh), then call the tool with
#     command: bash bench/gpu_run.sh      carry: [".whl"]      timeout_s: 540
# It installs the carried wheels over the machine's own Python (torch with CUDA is already there),
# prints the GPU, and runs bench/bench_gpu_qlora.py on the Baichuan2-7B shape: the model's chunked
# loss, a full-logits loss, RoleBench-shaped padded batches against --packing rows, and train.py's
# DeepSpeed engine. Logs and JSON go to $OUT (to bench-gpu-out/ when run by hand).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench-gpu-out}
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl ||
    { echo "error: installing the wheels in .whl failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu.txt"
timeout 480 python3 bench/bench_gpu_qlora.py --compare_full_logits --compare_packing 14 --deepspeed \
  --json_out "$out/gpu_qlora.json" 2>&1 | tee "$out/gpu_qlora.log"
timeout 240 python3 bench/bench_gpu_serve.py --json_out "$out/gpu_serve.json" 2>&1 | tee "$out/gpu_serve.log"

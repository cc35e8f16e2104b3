#!/usr/bin/env bash
# The GPU checks as one command, for a lent GPU machine (the `device` tool: one H200, a few minutes).
# Prepare the wheels here first (bash bench/gpu_wheels.sh), then call the tool with
#     command: bash bench/gpu_run.sh      carry: [".whl"]      timeout_s: 540
# It installs the carried wheels over the machine's own Python (torch with CUDA is already there),
# prints the GPU, and runs bench/bench_gpu_qlora.py on the Baichuan2-7B shape in 4-bit twice. In bf16
# (train.py's choice there): the model's chunked loss, a full-logits loss, RoleBench-shaped padded batches
# against --packing rows, each in a plain loop and through train.py's DeepSpeed engine and steps, then a
# save, restore and resume. In fp16, as on GPUs without bf16: the engine with its dynamic loss scale, packed
# against padded, and the resume. Then bench/bench_gpu_serve.py: 7B inference peak memory at 16, 8 and 4 bit. Logs and JSON go to $OUT (to bench-gpu-out/ when run by hand).
# On a machine without CUDA, `GPU_RUN_DEVICE=cpu bash bench/gpu_run.sh` runs the same on the --tiny config.
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
where=()
[ "${GPU_RUN_DEVICE:-cuda}" = cpu ] && where=(--device cpu --tiny --steps 2 --warmup 1)
timeout 250 python3 bench/bench_gpu_qlora.py "${where[@]}" --compare_full_logits --compare_packing 14 --deepspeed \
  --check_resume --json_out "$out/gpu_qlora.json" 2>&1 | tee "$out/gpu_qlora.log"
auto=${PIPESTATUS[0]}
timeout 140 python3 bench/bench_gpu_qlora.py "${where[@]}" --dtype fp16 --deepspeed --deepspeed_only --compare_packing 14 \
  --check_resume --json_out "$out/gpu_qlora_fp16.json" 2>&1 | tee "$out/gpu_qlora_fp16.log"
fp16=${PIPESTATUS[0]}
serve_where=()
[ "${GPU_RUN_DEVICE:-cuda}" = cpu ] && serve_where=(--device cpu --tiny)
timeout 130 python3 bench/bench_gpu_serve.py "${serve_where[@]}" --json_out "$out/gpu_serve.json" 2>&1 | tee "$out/gpu_serve.log"
serve=${PIPESTATUS[0]}
echo "exit status: run in train.py's dtype $auto, run in fp16 $fp16, inference at 16/8/4 bit $serve"
[ "$auto" = 0 ] && [ "$fp16" = 0 ] && [ "$serve" = 0 ]

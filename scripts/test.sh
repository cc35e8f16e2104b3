#!/usr/bin/env bash
# Set up a fresh Debian machine for the tests (Chromium and CJK fonts for the browser tests,
# numactl for the deepspeed launcher, the pinned Python packages), then run the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null || ! fc-list 2>/dev/null | grep -qi "wenquanyi zen hei" || ! command -v numactl >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq chromium fonts-wqy-zenhei numactl >/dev/null
fi
python3 -m pip install -q -r requirements.txt
# One OpenMP thread per process: the tests run tiny models, often two processes at once, and on
# 2 cores more threads only contend (the suite took 8:13 with 2 threads, 7:30 with one).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python3 -m pytest -q "$@"

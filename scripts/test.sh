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
# Two test workers of one OpenMP thread each: the tests run tiny models, so threads inside one
# process gain little, and two tests at once use both cores (the suite took 11:00 in one process
# on a 2-core AMD EPYC, 6:42 in two workers). loadgroup hands a file's tests that share a
# module-scoped fixture (a training run, a server) to one worker, so that it is built once, and the
# other tests one at a time; tests/conftest.py groups them and puts the long files first, in the
# order that --no-loadscope-reorder keeps (xdist would otherwise order the groups by their size).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python3 -m pytest -q -n 2 --dist loadgroup --no-loadscope-reorder "$@"

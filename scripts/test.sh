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
python3 -m pytest -q "$@"

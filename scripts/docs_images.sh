#!/usr/bin/env bash
# Regenerate every picture under docs/img/ from a quickstart run: the chat page mid-conversation
# (Playwright in the Debian chromium, as tests/test_web_demo.py runs it), the training curves and
# evaluate.py's chart. Needs the packages, chromium and fonts-wqy-zenhei that scripts/test.sh installs.
# DOCS_IMAGES_OUT sets the run folder (default runs/docs-images); DOCS_IMAGES_REUSE=1 keeps a
# quickstart run already there instead of training again.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${DOCS_IMAGES_OUT:-runs/docs-images}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

if [ -z "${DOCS_IMAGES_REUSE:-}" ] || [ ! -d "$out/merged" ]; then
    QUICKSTART_SKIP_INSTALL=1 QUICKSTART_OUT="$out" bash scripts/quickstart.sh
fi
# a tiny evaluation: 4 questions per split, short greedy answers, and the run's training curves
rm -rf "$out/eval"
python3 evaluate.py --data_dir data/sample --limit 4 --max_new_tokens 32 --no_baseline \
    --model quickstart="$out/merged" --plot_run "$out/lora" --out_dir "$out/eval"
python3 scripts/docs_images.py --model_path "$out/merged" \
    --chart "$out/eval/results.png" --curves "$out/eval/training_curves.png" --img_dir docs/img

#!/usr/bin/env bash
# Run here, where pip reaches the package index: put into .whl/ (git-ignored) the Python 3.12 x86-64
# wheels that the lent GPU machine lacks or has in other versions: this project's pins of bitsandbytes,
# deepspeed, transformers and peft, and deepspeed's pydantic and hjson. About 63 MB, under the 64 MiB
# that may travel with the working tree. Then run bench/gpu_run.sh there (see that file).
set -euo pipefail
cd "$(dirname "$0")/.."
pin() { grep -i "^$1==" requirements.txt; }
rm -rf .whl
mkdir .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl "$(pin bitsandbytes)" "$(pin transformers)" "$(pin peft)" hjson
# pydantic pins its compiled core exactly: let pip resolve that pair (and their small needs)
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl pydantic
# deepspeed is published as a source archive only; without DS_BUILD_* its wheel is pure Python
python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl "$(pin deepspeed)"
ls -l .whl
du -sh .whl

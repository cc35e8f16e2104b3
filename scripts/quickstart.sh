#!/usr/bin/env bash
# The whole pipeline on the embedded tiny default, on the CPU, in a few minutes:
# sample data -> tiny random-init Baichuan2 -> QLoRA training -> merge -> one in-character reply.
# The same steps run on RoleBench and Baichuan2-7B-Chat by changing paths and flags (README.md).
# The tiny model starts from random weights and trains for a minute, so its reply is noise in
# the role-play chat format, not yet 孙悟空's voice: this run checks the pipeline, not the model.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -r requirements.txt
out=runs/quickstart
rm -rf "$out"
mkdir -p "$out"

python3 data_helper.py --data_dir data/sample --train_out "$out/train.jsonl" --test_out "$out/test.jsonl"
python3 -m baichuan.tiny --out "$out/tiny" --corpus "$out/train.jsonl"
python3 train.py --model_name_or_path "$out/tiny" \
    --train_path "$out/train.jsonl" --test_path "$out/test.jsonl" --output_dir "$out/lora" \
    --max_len 384 --max_src_len 64 --per_device_train_batch_size 8 --learning_rate 5e-3 \
    --num_train_epochs 3 --show_loss_step 8
adapter=$(ls -d "$out"/lora/epoch-* | sort -t- -k4 -n | tail -n 1)
python3 merge_params.py --ori_model_dir "$out/tiny" --model_dir "$adapter" --save_model_dir "$out/merged" --device -1
python3 predict.py --model_path "$out/merged" --role 孙悟空 --greedy --max_new_tokens 40 "大圣，你最喜欢吃什么？"

#!/usr/bin/env bash
# The whole pipeline on a tiny Baichuan2, on the CPU, in about two minutes once the packages are in:
# sample data -> tiny Baichuan2 that has read the sample texts -> QLoRA training -> merge -> one reply.
# Real Baichuan2 is a language model before LoRA shapes it; a random-init one is not, and a minute
# of LoRA on it only learns noise. So the tiny base first gets a short full-parameter pretraining on
# the sample texts (baichuan.tiny --pretrain_steps), and the QLoRA step then teaches it the chat
# layout and which voice goes with which system prompt: the last line is 孙悟空 answering in his
# own voice, learnt from data/sample. Everything is seeded: the same machine gives the same reply.
# The same steps run on RoleBench and Baichuan2-7B-Chat by changing paths and flags (README.md).
# QUICKSTART_SKIP_INSTALL=1 skips the pip install; QUICKSTART_OUT sets the output folder.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${QUICKSTART_SKIP_INSTALL:-}" ] || python3 -m pip install -q -r requirements.txt
out=${QUICKSTART_OUT:-runs/quickstart}
# One thread: the tiny model's matrices are too small for a second one to pay (on a busy 2-core
# machine it made each step 2-4x slower), and one thread computes the same numbers everywhere.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
pretrain_steps=300
epochs=5
start=$SECONDS
rm -rf "$out"
mkdir -p "$out"

python3 data_helper.py --data_dir data/sample --train_out "$out/train.jsonl" --test_out "$out/test.jsonl"
python3 -m baichuan.tiny --out "$out/tiny" --corpus "$out/train.jsonl" --pretrain_steps "$pretrain_steps"
python3 train.py --model_name_or_path "$out/tiny" \
    --train_path "$out/train.jsonl" --test_path "$out/test.jsonl" --output_dir "$out/lora" \
    --max_len 384 --max_src_len 64 --per_device_train_batch_size 8 --learning_rate 5e-3 \
    --num_train_epochs "$epochs" --show_loss_step 15
adapter=$(ls -d "$out"/lora/epoch-* | sort -t- -k4 -n | tail -n 1)
python3 merge_params.py --ori_model_dir "$out/tiny" --model_dir "$adapter" --save_model_dir "$out/merged" --device -1
echo "trained: a tiny Baichuan2 (64 wide, 2 layers), $pretrain_steps full-parameter steps on the sample texts," \
     "then QLoRA for $epochs epochs on the $(wc -l < "$out/train.jsonl") samples of 孙悟空, 张飞 and 李白" \
     "in data/sample, $((SECONDS - start)) s in all. 孙悟空, asked 大圣，你最喜欢吃什么？, answers:"
python3 predict.py --model_path "$out/merged" --role 孙悟空 --greedy --max_new_tokens 40 "大圣，你最喜欢吃什么？"

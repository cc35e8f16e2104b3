"""Samples per second of QLoRA training steps with and without `--packing` (shared-prompt rows).

    python bench/bench_packing.py [--samples 192] [--reps 3]

Builds a tiny Baichuan2 with the real 125,696-token vocabulary (../shared/baichuan2, else a
corpus-trained one), loads it through utils.models.load_for_training with train.py's defaults
(utils.training.config: NF4 base, LoRA r=8 on every linear layer but lm_head) and gradient
checkpointing, and times forward + backward + AdamW over the same samples
(RoleBench-zh train via data_helper.py when ../shared/rolebench exists, else data/sample), once as
length-grouped batches of 4 samples and once as packed rows of 4, interleaved over `--reps` rounds.
"""

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), "shared")


def prepare(workdir: str) -> tuple[str, str]:
    model_dir, data = os.path.join(workdir, "model"), os.path.join(workdir, "train.jsonl")
    rolebench = os.path.join(SHARED, "rolebench")
    data_dir = rolebench if os.path.isdir(rolebench) else os.path.join(ROOT, "data", "sample")
    run = lambda *args: subprocess.run([sys.executable, *args], cwd=ROOT, check=True, capture_output=True)  # noqa: E731
    run("data_helper.py", "--data_dir", data_dir, "--train_out", data, "--test_out", os.path.join(workdir, "t.jsonl"))
    tokenizer = os.path.join(SHARED, "baichuan2", "tokenizer.model")
    source = ["--tokenizer", tokenizer] if os.path.isfile(tokenizer) else ["--corpus", data]
    run("-m", "baichuan.tiny", "--out", model_dir, *source, "--hidden_size", "256", "--num_layers", "4",
        "--num_heads", "4", "--intermediate_size", "688")  # fmt: skip
    return model_dir, data


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=192, help="training samples timed in each pass")
    parser.add_argument("--reps", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--batch", type=int, default=4, help="samples (plain) or packed rows per step")
    parser.add_argument("--max_len", type=int, default=512, help="row length")
    cli = parser.parse_args()

    from baichuan.generation_utils import chat_token_ids
    from transformers import GenerationConfig
    from utils.cli import quiet_third_party
    from utils.data import PackedDataset, RolePlayDataset, collate, length_grouped_batches, read_files
    from utils.models import load_for_training, load_tokenizer
    from utils.training.config import DataConfig, LoraConfig, ModelConfig

    quiet_third_party()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as workdir:
        model_dir, data = prepare(workdir)
        tokenizer = load_tokenizer(model_dir)
        user_id, assistant_id = chat_token_ids(GenerationConfig.from_pretrained(model_dir))
        data_config = DataConfig(max_len=cli.max_len)
        dataset = RolePlayDataset(read_files(data), tokenizer, user_id, assistant_id, data_config.max_len,
                                  data_config.max_src_len)
        dataset.examples = random.Random(0).sample(dataset.examples, min(cli.samples, len(dataset.examples)))
        model_config = ModelConfig(model_name_or_path=model_dir, gradient_checkpointing=True)
        model = load_for_training(model_config, LoraConfig(), torch.device("cpu"), torch.float32)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        lengths = dataset.lengths()
        plain = [[dataset[i] for i in b] for b in length_grouped_batches(lengths, cli.batch, 0, 0)]
        packed_rows = PackedDataset(dataset, cli.max_len).rows
        packed = [packed_rows[i : i + cli.batch] for i in range(0, len(packed_rows), cli.batch)]
        sides = {"plain batches": plain, "--packing": packed}
        counted = {name: sum(len(b) for b in batches) for name, batches in sides.items()}
        counted["--packing"] = sum(len(row["samples"]) for row in packed_rows)
        times = {name: [] for name in sides}
        tokens = {}
        for _ in range(cli.reps):
            for name, batches in sides.items():
                start, processed = time.perf_counter(), 0
                for batch in batches:
                    inputs = collate(batch, tokenizer.pad_token_id)
                    processed += int((inputs["attention_mask"] != 0).sum())
                    model(**inputs).loss.backward()
                    optimizer.step()
                    optimizer.zero_grad()
                times[name].append(time.perf_counter() - start)
                tokens[name] = processed

    base = sorted(times["plain batches"])[len(times["plain batches"]) // 2]
    print(f"{len(dataset.examples)} samples, {lengths and sum(lengths) / len(lengths):.0f} tokens each on average")
    print(f"| side | steps | tokens computed | seconds (median of {cli.reps}) | samples/s | x plain |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, batches in sides.items():
        median = sorted(times[name])[len(times[name]) // 2]
        print(f"| {name} | {len(batches)} | {tokens[name]} | {median:.1f} | {counted[name] / median:.1f} | {base / median:.2f} |")


if __name__ == "__main__":
    main()

"""How far the book's per-micro-batch mean is from train.py's token weighting, on RoleBench-zh.

    python bench/bench_token_weights.py      # needs ../shared/rolebench and ../shared/baichuan2/tokenizer.model

The book's loop divides each micro-batch's summed loss by that micro-batch's labelled tokens, and
DeepSpeed then averages the micro-batches of a step. A labelled token of a micro-batch holding n of
the step's N labelled tokens (over `accumulation` micro-batches) then weighs N / (accumulation x n)
times what it weighs in the step's per-token mean, which train.py now takes (as the HF Trainer
does since 4.46). This prints how spread those weights are over one epoch of train.py's batches
(length-grouped, seed 1234) for the README's two settings: batch 2 x 8 accumulation steps, and
--packing with batch 1 x 2. No model is run: only the data, tokenised and batched as train.py does.
"""

import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
sys.path.insert(0, ROOT)

SETTINGS = (("batch 2 x 8 accumulation", 2, 8, False), ("--packing, batch 1 x 2 accumulation", 1, 2, True))


def weights(dataset, batch: int, accumulation: int) -> tuple[list[float], list[float], list[int]]:
    """(each labelled token's book weight / token weight, each step's largest/smallest micro-batch count,
    the labelled tokens of every micro-batch) over one epoch."""
    from utils.data import collate, length_grouped_batches
    from utils.training.steps import labelled_tokens

    batches = length_grouped_batches(dataset.lengths(), batch, seed=1234, epoch=0)
    counts = [labelled_tokens(collate([dataset[i] for i in indices], 0)) for indices in batches]
    per_token, spread = [], []
    for start in range(0, len(counts) - accumulation + 1, accumulation):
        step = counts[start : start + accumulation]
        spread.append(max(step) / min(step))
        for n in step:
            per_token += [sum(step) / (accumulation * n)] * n
    return per_token, spread, counts


def main() -> None:
    from baichuan import BaichuanTokenizer
    from utils.data import PackedDataset, RolePlayDataset, read_files

    tokenizer = BaichuanTokenizer(vocab_file=os.path.join(SHARED, "baichuan2", "tokenizer.model"))
    with tempfile.TemporaryDirectory() as tmp:
        train = os.path.join(tmp, "train.jsonl")
        subprocess.run([sys.executable, "data_helper.py", "--data_dir", os.path.join(SHARED, "rolebench"),
                        "--train_out", train, "--test_out", os.path.join(tmp, "test.jsonl")],
                       cwd=ROOT, check=True, capture_output=True)  # fmt: skip
        samples = RolePlayDataset(read_files(train), tokenizer, 195, 196, max_len=512, max_src_len=256)
    print(f"RoleBench-zh train: {len(samples)} samples, max_len 512\n")
    print("| setting | labelled tokens per micro-batch: min / median / max | largest / smallest micro-batch of a step: "
          "median / max | tokens weighted x0.8 or less / x1.25 or more | weight range |")
    print("| --- | --- | --- | --- | --- |")
    for name, batch, accumulation, packing in SETTINGS:
        dataset = PackedDataset(samples, 512) if packing else samples
        per_token, spread, counts = weights(dataset, batch, accumulation)
        low = sum(w <= 0.8 for w in per_token) / len(per_token)
        high = sum(w >= 1.25 for w in per_token) / len(per_token)
        print(f"| {name} | {min(counts)} / {statistics.median(counts):.0f} / {max(counts)} | "
              f"{statistics.median(spread):.2f} / {max(spread):.2f} | {100 * low:.1f}% / {100 * high:.1f}% | "
              f"{min(per_token):.2f} - {max(per_token):.2f} |")


if __name__ == "__main__":
    main()

"""train.py --stage dpo against TRL's DPOTrainer + PEFT, QLoRA on the CPU, side by side in one run.

    python bench/bench_dpo.py                              # the configuration recorded in bench/README.md
    python bench/bench_dpo.py --rounds 1 --steps 6 --warmup 2   # a quick look

Three sides train the same model (a small Baichuan2 with the real 125,696-token vocabulary, the
shape bench_train.py uses, written by `python -m baichuan.tiny`), on the same pairs, with the same
LoRA (rank 8, alpha 30, every linear layer but lm_head, dropout off as DPOTrainer's default), the
same sigmoid (DPO) loss, beta, learning rate, gradient checkpointing, 4-bit NF4 base, and steps:

  * ours:     `python train.py --stage dpo ...` itself, as a user runs it: each pair as two rows
              (prompt + chosen, prompt + rejected); the reference computed once before the first
              step (its time is given apart, and counted in the "with reference" column);
  * packing:  the same with `--pref_packing`: pairs of one role in a row after one copy of their
              system prompt, each reply its own segment (a batch counts rows: --packing_batch);
  * trl:      `trl.DPOTrainer(model, peft_config=LoraConfig(...))` with its defaults otherwise:
              prompt + chosen and prompt + rejected as two rows, the reference (the adapter switched
              off) run in every step. It is given our token ids as they are (its own tokenisation
              is skipped), so that every side trains on the same tokens.

The head's rows are scaled to unit norm when the model is written: Baichuan2's NormHead normalises
them in every forward, but TRL's fused log-probability head multiplies by lm_head.weight as a plain
linear layer; with unit rows all sides compute the same function.

Pairs: RoleBench-zh's train split through data_helper.py; the chosen reply is a sample's own, the
rejected one the reply of the next sample whose role differs (an answer out of character). Each run
is a fresh subprocess with OMP_NUM_THREADS=1; peak RSS is the kernel's (ru_maxrss of the whole
process). Sides interleave over --rounds (ABC, CBA, ...) and the table gives the median. Tokens are
a pair's two sequences as TRL runs them (its prompt twice), so tokens/s compares the same work;
pairs/s is what to compare. pairs/CPU-s divides by the process's user + system time over the same
steps instead of the wall time, which other jobs on a shared machine disturb far less.
"""

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
sys.path.insert(0, ROOT)

SIDES = ("ours", "packing", "trl")
STEP_LINE = re.compile(r"^step=(\d+) loss=([0-9.]+) lr=\S+ tokens/s=([0-9.]+) samples/s=([0-9.]+)")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run, warm-up included")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    parser.add_argument("--batch", type=int, default=4, help="pairs per step of ours and trl")
    parser.add_argument("--packing_batch", type=int, default=2, help="rows per step of the packing side")
    parser.add_argument("--pairs", type=int, default=120, help="pairs in the training file")
    parser.add_argument("--max_len", type=int, default=512, help="--max_len (trl: max_length) of every side")
    parser.add_argument("--beta", type=float, default=0.1, help="DPO's beta")
    parser.add_argument("--lr", type=float, default=1e-4, help="learning rate")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved runs of each side")
    parser.add_argument("--sides", default=",".join(SIDES), help="comma-separated subset of " + ",".join(SIDES))
    parser.add_argument("--tokenizer", default=os.path.join(SHARED, "baichuan2", "tokenizer.model"),
                        help="Baichuan2 tokenizer.model (the real vocabulary); if missing, one is trained on "
                             "data/sample")
    parser.add_argument("--rolebench_dir", default=os.path.join(SHARED, "rolebench"),
                        help="RoleBench-zh files for data_helper.py; if missing, data/sample is used")
    parser.add_argument("--workdir", help="keep the model, data and logs here (default: a temporary directory)")
    parser.add_argument("--child", choices=["trl"], help=argparse.SUPPRESS)
    parser.add_argument("--model_dir", help=argparse.SUPPRESS)
    parser.add_argument("--pairs_path", help=argparse.SUPPRESS)
    parser.add_argument("--child_out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.sides = [s for s in args.sides.split(",") if s]
    if set(args.sides) - set(SIDES) or not args.sides:
        parser.error(f"--sides: choose from {','.join(SIDES)}")
    if not 0 < args.warmup < args.steps:
        parser.error("--warmup must be at least 1 and smaller than --steps")
    return args


# ---------------------------------------------------------------------------------- setup


def prepare(args) -> list[str]:
    """The model (head rows at unit norm) and the pairs file in args.workdir; notes on what was used."""
    from safetensors.torch import load_file, save_file

    notes = []
    args.model_dir = os.path.join(args.workdir, "tiny")
    size = ["--hidden_size", "256", "--num_layers", "4", "--num_heads", "4", "--intermediate_size", "688"]
    if os.path.isfile(args.tokenizer):
        source = ["--tokenizer", args.tokenizer]
        notes.append(f"tokenizer: {args.tokenizer} (the real Baichuan2 vocabulary)")
    else:
        source = ["--corpus", os.path.join(ROOT, "data", "sample", "rolebench-zh_general_train.jsonl"),
                  "--vocab_size", "1200"]
        notes.append(f"WARNING: {args.tokenizer} is missing: a 1,200-piece tokenizer trained on data/sample")
    subprocess.run([sys.executable, "-m", "baichuan.tiny", "--out", args.model_dir, *source, *size], cwd=ROOT,
                   check=True, capture_output=True)
    weights = os.path.join(args.model_dir, "model.safetensors")
    tensors = load_file(weights)
    head = tensors["lm_head.weight"]
    tensors["lm_head.weight"] = (head / head.float().norm(dim=-1, keepdim=True)).to(head.dtype)
    save_file(tensors, weights, metadata={"format": "pt"})

    samples = os.path.join(args.workdir, "samples.jsonl")
    cmd = [sys.executable, "data_helper.py", "--train_out", samples, "--test_out", os.path.join(args.workdir, "t.jsonl")]
    if os.path.isfile(os.path.join(args.rolebench_dir, "rolebench-zh_general_train.jsonl")):
        cmd += ["--data_dir", args.rolebench_dir]
        notes.append(f"data: RoleBench-zh train split from {args.rolebench_dir} via data_helper.py")
    else:
        notes.append("data: data/sample via data_helper.py (RoleBench-zh not found)")
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    with open(samples, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    pairs = []
    for i, row in enumerate(rows):
        other = next((r for r in rows[i + 1:] + rows[:i] if r.get("role") != row.get("role")), None)
        if other is not None and other["output"].strip() != row["output"].strip():
            pairs.append({"role": row.get("role"), "instruction": row["instruction"], "input": row["input"],
                          "chosen": row["output"], "rejected": other["output"]})
        if len(pairs) == args.pairs:
            break
    args.pairs_path = os.path.join(args.workdir, "pairs.jsonl")
    with open(args.pairs_path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)
    notes.append(f"pairs: {len(pairs)}")
    return notes


def encoded_pairs(args):
    """The pairs as train.py encodes them (utils.pairs.PairDataset), and the tokenizer."""
    from transformers import GenerationConfig

    from utils.models import load_tokenizer
    from utils.pairs import PairDataset, read_pairs

    tokenizer = load_tokenizer(args.model_dir)
    generation_config = GenerationConfig.from_pretrained(args.model_dir)
    return PairDataset(read_pairs(args.pairs_path), tokenizer, generation_config, args.max_len), tokenizer


def pair_tokens(pair) -> int:
    return 2 * len(pair["prompt"]) + len(pair["chosen"]) + len(pair["rejected"])


def our_steps(args, packing: bool) -> list[tuple[int, int]]:
    """(pairs, tokens) of each step train.py takes (its Schedule over its training set)."""
    from utils.pairs import PackedPairs
    from utils.training.config import OptimConfig
    from utils.training.schedule import Schedule

    pairs, _ = encoded_pairs(args)
    train_set = PackedPairs(pairs, args.max_len) if packing else pairs
    optim = OptimConfig(per_device_train_batch_size=args.packing_batch if packing else args.batch)
    schedule = Schedule(train_set.lengths(), optim, 1, 0, args.pairs_path)
    steps = []
    for _, _, micro_batches in schedule.steps({"global_step": 0, "epoch": 0, "step_in_epoch": 0}):
        items = [train_set[i] for micro in micro_batches for i in micro]
        members = [p for item in items for p in (item["pairs"] if "prefix" in item else [item])]
        steps.append((len(members), sum(pair_tokens(p) for p in members)))
    return steps


# ---------------------------------------------------------------------------------- sides


def child_env():
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                TOKENIZERS_PARALLELISM="false")


def wait_rusage(proc):
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage


def run_ours(args, log_path: str, packing: bool, steps: list) -> dict:
    """train.py --stage dpo as a user runs it; each step's time is its pairs / the samples/s it logged,
    and its CPU time the process's between the log lines of the first and last timed steps."""
    import psutil
    out_dir = os.path.join(args.workdir, "out-packing" if packing else "out")
    subprocess.run(["rm", "-rf", out_dir], check=True)
    argv = [sys.executable, "train.py", "--stage", "dpo", "--pref_loss", "sigmoid", "--pref_beta", str(args.beta),
            "--model_name_or_path", args.model_dir, "--train_path", args.pairs_path, "--output_dir", out_dir,
            "--max_len", str(args.max_len), "--learning_rate", str(args.lr), "--max_steps", str(args.steps),
            "--show_loss_step", "1", "--gradient_checkpointing", "--lora_dim", "8", "--lora_alpha", "30",
            "--per_device_train_batch_size", str(args.packing_batch if packing else args.batch)]
    argv += ["--pref_packing"] if packing else []
    rates, losses, cpu, reference, loaded = {}, {}, {}, (None, None), None
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=child_env())
        handle = psutil.Process(proc.pid)

        def now():
            times = handle.cpu_times()
            return time.perf_counter(), times.user + times.system

        for line in proc.stdout:
            log.write(line)
            line = line.strip("\r\n").split("\r")[-1]
            if line.startswith("loaded "):
                loaded = now()
            elif line.startswith("reference log-probabilities") and loaded:
                reference = tuple(b - a for a, b in zip(loaded, now(), strict=True))
            match = STEP_LINE.match(line)
            if match:
                step = int(match[1])
                rates[step], losses[step], cpu[step] = float(match[4]), float(match[2]), now()[1]
        code, usage = wait_rusage(proc)
    if code != 0 or len(rates) < args.steps:
        raise SystemExit(f"train.py failed ({code}); see {log_path}")
    timed = range(args.warmup, args.steps)
    seconds = sum(steps[i][0] / rates[i + 1] for i in timed)
    return {"pairs": sum(steps[i][0] for i in timed), "tokens": sum(steps[i][1] for i in timed),
            "seconds": seconds, "cpu_seconds": cpu[args.steps] - cpu[args.warmup], "reference_seconds": reference[0],
            "reference_cpu_seconds": reference[1],
            "maxrss_mib": usage.ru_maxrss / 1024, "losses": [losses[s] for s in sorted(losses)][:3]}


def trl_child(args) -> None:
    """One DPOTrainer run; writes its step marks and counts as JSON to --child_out."""
    import logging
    import warnings

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    import psutil
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from utils.models import keep_4bit_layout, load_base_model

    pairs, tokenizer = encoded_pairs(args)
    dataset = Dataset.from_list([{"prompt_ids": list(p["prompt"]), "chosen_ids": list(p["chosen"]),
                                  "rejected_ids": list(p["rejected"])} for p in pairs])

    class TokenizedDPOTrainer(DPOTrainer):
        # the pairs are already our token ids: TRL's text preparation (prompt extraction, chat
        # template, tokenisation) has nothing to do
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    model = load_base_model(args.model_dir, torch.device("cpu"), torch.float32, quantization_bit=4, log=None)
    keep_4bit_layout(model)  # bitsandbytes' CPU repacking after a no-grad forward breaks LoRA gradients
    model.lm_head.bias = None  # read by TRL's fused head; NormHead has none (rows at unit norm: prepare)
    marks, seen, process = [], [], psutil.Process()

    class Timer(TrainerCallback):
        def on_step_end(self, targs, state, control, **kwargs):
            cpu = process.cpu_times()
            marks.append((state.global_step, time.perf_counter(), cpu.user + cpu.system))

    class Counting:
        """The trainer's collator, counting each batch's tokens (a pair's two sequences)."""

        def __init__(self, inner):
            self.inner = inner

        def __call__(self, examples):
            seen.append(sum(2 * len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"])
                            for e in examples))
            return self.inner(examples)

    config = DPOConfig(output_dir=os.path.join(args.workdir, "trl-out"), per_device_train_batch_size=args.batch,
                       max_steps=args.steps, learning_rate=args.lr, beta=args.beta, loss_type=["sigmoid"],
                       max_length=args.max_len, gradient_checkpointing=True, bf16=False, use_cpu=True,
                       report_to=[], logging_steps=1, save_strategy="no", disable_tqdm=True, seed=1234,
                       dataloader_num_workers=0)
    # no task_type: PeftModelForCausalLM adds output_attentions, output_hidden_states and return_dict to
    # every call, which TRL's fused head hands on to BaichuanModel, whose forward takes none of them
    lora = LoraConfig(r=8, lora_alpha=30, lora_dropout=0.0, target_modules="all-linear")
    trainer = TokenizedDPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                                  peft_config=lora, callbacks=[Timer()])
    trainer.data_collator = Counting(trainer.data_collator)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry][:3]
    with open(args.child_out, "w") as f:
        json.dump({"marks": marks, "seen": seen, "losses": losses}, f)


def run_trl(args, log_path: str) -> dict:
    out = os.path.join(args.workdir, "trl-result.json")
    argv = [sys.executable, os.path.abspath(__file__), "--child", "trl", "--child_out", out, "--workdir", args.workdir,
            "--model_dir", args.model_dir, "--pairs_path", args.pairs_path, "--steps", str(args.steps),
            "--batch", str(args.batch), "--max_len", str(args.max_len), "--lr", str(args.lr), "--beta", str(args.beta)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=child_env())
        code, usage = wait_rusage(proc)
    if code != 0:
        raise SystemExit(f"the trl run failed ({code}); see {log_path}")
    with open(out) as f:
        result = json.load(f)
    marks = {step: (wall, cpu) for step, wall, cpu in result["marks"]}
    w, n = args.warmup, args.steps
    return {"pairs": args.batch * (n - w), "tokens": sum(result["seen"][w:n]), "seconds": marks[n][0] - marks[w][0],
            "cpu_seconds": marks[n][1] - marks[w][1], "reference_seconds": 0.0, "reference_cpu_seconds": 0.0, "maxrss_mib": usage.ru_maxrss / 1024, "losses": result["losses"]}


# ---------------------------------------------------------------------------------- main


def machine() -> str:
    import psutil

    model = "?"
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.startswith("Model name"):
            model = line.split(":", 1)[1].strip()
    return f"{model}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM"


def main() -> None:
    args = parse_args()
    if args.child == "trl":
        trl_child(args)
        return
    import trl

    args.workdir = args.workdir or tempfile.mkdtemp(prefix="bench-dpo-")
    os.makedirs(args.workdir, exist_ok=True)
    notes = prepare(args)
    n_pairs = len(encoded_pairs(args)[0])
    steps = {side: our_steps(args, side == "packing") for side in ("ours", "packing") if side in args.sides}
    print(f"bench_dpo: {machine()}; trl {trl.__version__}; {datetime.date.today()}; " + "; ".join(notes), flush=True)
    results = {side: [] for side in args.sides}
    for r in range(args.rounds):
        for side in args.sides if r % 2 == 0 else args.sides[::-1]:
            log = os.path.join(args.workdir, f"{side}-round{r + 1}.log")
            res = run_trl(args, log) if side == "trl" else run_ours(args, log, side == "packing", steps[side])
            res["pairs_s"] = res["pairs"] / res["seconds"]
            res["pairs_cpu_s"] = res["pairs"] / res["cpu_seconds"]
            # one epoch's pairs per CPU-second with the reference pass spread over the pairs it computed
            res["pairs_cpu_s_with_reference"] = 1 / (1 / res["pairs_cpu_s"] + res["reference_cpu_seconds"] / n_pairs)
            results[side].append(res)
            print(f"round {r + 1} {side:8s} {res['pairs_s']:6.2f} pairs/s  {res['pairs_cpu_s']:6.2f} pairs/CPU-s  "
                  f"{res['tokens'] / res['seconds']:8.1f} tokens/s  reference pass {res['reference_seconds']:5.1f} s "
                  f"({res['reference_cpu_seconds']:5.1f} CPU-s)  peak RSS {res['maxrss_mib']:6.0f} MiB  "
                  f"first losses {res['losses']}  load {os.getloadavg()[0]:.1f}", flush=True)

    def median(side, key):
        return statistics.median(r[key] for r in results[side])

    print(f"\n{n_pairs} pairs, {args.steps} steps ({args.warmup} of warm-up not timed), batch {args.batch} pairs "
          f"(packing: {args.packing_batch} rows), max_len {args.max_len}, median of {args.rounds} rounds\n")
    print("| side | pairs/s | x trl | pairs/CPU-s | x trl | pairs/CPU-s with the reference pass (1 epoch) | x trl "
          "| tokens/s | peak RSS MiB | x trl | first losses |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for side, runs in results.items():
        cells = []
        for key in ("pairs_s", "pairs_cpu_s", "pairs_cpu_s_with_reference"):
            value = median(side, key)
            cells += [f"{value:.2f}", f"{value / median('trl', 'pairs_s' if key == 'pairs_s' else 'pairs_cpu_s'):.2f}"
                      if "trl" in results else "-"]
        rss = median(side, "maxrss_mib")
        rss_ratio = f"{rss / median('trl', 'maxrss_mib'):.2f}" if "trl" in results else "-"
        tokens = statistics.median(r["tokens"] / r["seconds"] for r in runs)
        losses = ", ".join(f"{v:.4f}" for v in runs[0]["losses"])
        print(f"| {side} | {' | '.join(cells)} | {tokens:.0f} | {rss:.0f} | {rss_ratio} | {losses} |")
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}; logs in {args.workdir}")


if __name__ == "__main__":
    main()

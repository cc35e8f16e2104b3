"""train.py against the plain Hugging Face route (Trainer + PEFT LoRA), QLoRA on the CPU.

    python bench/bench_train.py                       # the configuration recorded in bench/README.md
    python bench/bench_train.py --rounds 1 --steps 12 --warmup 2 --sides ours,hf    # a quick look
    python bench/bench_train.py --no_gradient_checkpointing

Both sides train the same model (a small Baichuan2 with the real 125,696-token vocabulary,
written to a temporary directory by `python -m baichuan.tiny`), on the same samples (RoleBench-zh
through data_helper.py, encoded by utils.RolePlayDataset), with the same batch, max_len, LoRA
(rank 8, alpha 30, dropout 0.1, every linear layer but lm_head), learning rate, AdamW settings,
gradient clipping and gradient checkpointing setting, on a 4-bit NF4 (double-quantised)
bitsandbytes base, for the same number of optimizer steps:

  * ours:    `python train.py ...` itself, as a user runs it (DeepSpeed ZeRO-2, length-grouped
             batches, chunked loss at the labelled positions); its own `tokens/s` log lines give
             the speed (logged every step; the steps after the warm-up are pooled);
  * hf:      transformers `Trainer` + `peft.get_peft_model`, after `prepare_model_for_kbit_training`
             as the PEFT docs do, `DataCollatorForSeq2Seq` padding to the longest row in the batch,
             Trainer's default random sampler (no length grouping); timed between the ends of the
             same steps by a TrainerCallback;
  * packing: `python train.py ... --packing --per_device_train_batch_size 1` (several samples of one
             role per row after a single copy of their system prompt, attention kept per sample);
  * hf_full: the hf side with the loss of a standard transformers model instead of ours: all
             (b, s, vocab) logits, upcast to fp32, shifted, F.cross_entropy (what transformers'
             ForCausalLMLoss does), to show what the model's chunked loss is worth.

Each run is a fresh subprocess with OMP_NUM_THREADS=1 (`--threads`); its peak RSS is the
kernel's (os.wait4's ru_maxrss for the whole process: imports, tokenisation, model, training).
The sides run one after another, interleaved over `--rounds` (ABCD, then DCBA, ...), so that the
noise of a shared machine falls on all of them; the table gives the median over rounds and each
round's ratio to hf. Tokens are the samples' tokens (padding excluded, and a prompt that packing
stores once per row counted for each of its samples, as train.py's tokens/s does); tokens/CPU-s divides by the
process's user + system time over the same steps, which other processes on the machine disturb
far less than wall time (with one thread per run there is no OpenMP spinning to inflate it).
Also printed: the share of padding in the timed batches and over a whole epoch for Trainer's
random sampler, our length-grouped batches and --packing, and the share of real tokens that
carry a label (the loss over the 125,696-token vocabulary is paid per labelled position, so a
side whose timed batches hold more of them does more work per token).
"""

import argparse
import datetime
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
sys.path.insert(0, ROOT)

STEP_LINE = re.compile(r"^step=(\d+) loss=([0-9.naninf]+) lr=\S+ tokens/s=([0-9.]+) samples/s=")
SIDES = ("ours", "hf", "packing", "hf_full")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=44, help="optimizer steps per run, warm-up included")
    parser.add_argument("--warmup", type=int, default=4, help="first steps left out of the timing")
    parser.add_argument("--batch", type=int, default=4, help="per-device train batch")
    parser.add_argument(
        "--packing_batch",
        type=int,
        default=1,
        help="rows per step of the packing side. A row holds about 7 RoleBench samples after one copy of their "
        "role's prompt, so 1 row is more samples than the others' batch of 4 and fewer positions (512 against "
        "about 880 padded)",
    )
    parser.add_argument("--max_len", type=int, default=512, help="--max_len of both sides")
    parser.add_argument("--max_src_len", type=int, default=256, help="--max_src_len of both sides")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved runs of each side")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="OMP_NUM_THREADS of every run (0: torch's default). 1 by default: on a shared machine, several "
        "processes with 2 OpenMP threads each on 2 cores stall at every parallel region, which swamps the "
        "difference being measured",
    )
    parser.add_argument("--sides", default=",".join(SIDES), help="comma-separated subset of " + ",".join(SIDES))
    parser.add_argument(
        "--no_gradient_checkpointing",
        action="store_true",
        help="both sides without gradient checkpointing (default: on for both, as in the README's real run "
        "and prepare_model_for_kbit_training's default)",
    )
    parser.add_argument("--hidden_size", type=int, default=256, help="tiny model width")
    parser.add_argument("--num_layers", type=int, default=4, help="tiny model layers")
    parser.add_argument("--num_heads", type=int, default=4, help="tiny model heads")
    parser.add_argument("--intermediate_size", type=int, default=688, help="tiny model MLP width")
    parser.add_argument("--tokenizer", default=os.path.join(SHARED, "baichuan2", "tokenizer.model"),
                        help="Baichuan2 tokenizer.model (real 125,696 vocabulary); if missing, one is trained on the "
                             "sample data")
    parser.add_argument("--rolebench_dir", default=os.path.join(SHARED, "rolebench"),
                        help="RoleBench-zh files for data_helper.py; if missing, data/sample is used")
    parser.add_argument("--model_dir", help="use this model directory instead of making a tiny one")
    parser.add_argument("--train_path", help="use this train jsonl instead of running data_helper.py")
    parser.add_argument("--workdir", help="keep the model, data and logs here (default: a temporary directory)")
    parser.add_argument("--json_out", help="also write the results as JSON to this file")
    parser.add_argument("--child", choices=["hf", "hf_full"], help=argparse.SUPPRESS)
    parser.add_argument("--child_out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.sides = [s for s in args.sides.split(",") if s]
    unknown = set(args.sides) - set(SIDES)
    if unknown or not args.sides:
        parser.error(f"--sides: choose from {','.join(SIDES)}")
    if not 0 < args.warmup < args.steps:
        parser.error("--warmup must be at least 1 and smaller than --steps")
    return args


# ---------------------------------------------------------------------------------- shared


def load_dataset(model_dir, train_path, max_len, max_src_len):
    """The samples exactly as train.py encodes them (RolePlayDataset)."""
    from transformers import GenerationConfig

    from baichuan.generation_utils import chat_token_ids
    from utils.data import RolePlayDataset, read_files
    from utils.models import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    user_id, assistant_id = chat_token_ids(GenerationConfig.from_pretrained(model_dir))
    return RolePlayDataset(read_files(train_path), tokenizer, user_id, assistant_id, max_len, max_src_len)


def padding_share(batches, lengths) -> tuple[int, int]:
    """(real tokens, positions) of batches padded to their longest row."""
    tokens = sum(lengths[i] for b in batches for i in b)
    positions = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return tokens, positions


def row_stats(dataset) -> dict[str, list[int]]:
    """Per row: samples, their tokens (a packed row's shared prompt counted once per sample, as
    train.py's tokens/s counts them), tokens computed, and positions with a loss (label != -100,
    shifted)."""
    from utils.data import samples_of

    rows = [samples_of(dataset[i]) for i in range(len(dataset))]
    labelled = lambda e: sum(1 for x in e["labels"][1:] if x != -100)  # noqa: E731
    return {
        "samples": [len(r) for r in rows],
        "tokens": [sum(len(e["input_ids"]) for e in r) for r in rows],
        "computed": dataset.lengths(),
        "labelled": [sum(labelled(e) for e in r) for r in rows],
    }


def batch_counts(batch, stats) -> dict[str, int]:
    """The row_stats sums of one batch, and its positions padded to its longest row."""
    counts = {key: sum(values[i] for i in batch) for key, values in stats.items()}
    counts["positions"] = padding_share([batch], stats["computed"])[1]
    return counts


def random_batches(n, batch, seed):
    """Batches of a random sampler, as Trainer's default (RandomSampler, drop_last=False)."""
    import torch

    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [order[i : i + batch] for i in range(0, n, batch)]


# ---------------------------------------------------------------------------------- hf child


def hf_rows(args) -> list[dict]:
    """The same samples as train.py's (utils.data.encode_sample), kept as the Python lists it returns,
    the way a list-of-dicts dataset for the Trainer holds them (train.py stores int32 arrays)."""
    from transformers import GenerationConfig

    from baichuan.generation_utils import chat_token_ids
    from utils.data import encode_sample, read_samples
    from utils.models import load_tokenizer

    tokenizer = load_tokenizer(args.model_dir)
    user_id, assistant_id = chat_token_ids(GenerationConfig.from_pretrained(args.model_dir))
    rows = []
    for sample in read_samples(args.train_path):
        ids, labels, _ = encode_sample(tokenizer, sample, user_id, assistant_id, args.max_len, args.max_src_len)
        if ids is not None:
            rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return rows, tokenizer


def hf_model(args):
    """The base in NF4 (loaded as train.py loads it), prepared and wrapped the way the PEFT docs do it."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from utils.models import load_base_model

    # what train.py computes in on the CPU (utils.models.pick_device_dtype), in NF4 with double quantisation
    model = load_base_model(args.model_dir, torch.device("cpu"), torch.float32, quantization_bit=4)
    model.config.use_cache = False
    # freeze, upcast, and (by default) turn on gradient checkpointing
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=not args.no_gradient_checkpointing)
    lora = LoraConfig(r=8, lora_alpha=30, lora_dropout=0.1, target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def hf_training_args(args):
    """The Trainer's settings as close to train.py's as it has them."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=os.path.join(args.workdir, "hf-out"), per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1, max_steps=args.steps, learning_rate=args.lr, weight_decay=0.1,
        adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0, lr_scheduler_type="cosine",
        warmup_steps=0.1, optim="adamw_torch", seed=1234, use_cpu=True, bf16=False, fp16=False,
        logging_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0,
    )


def counting_trainer(full_logits: bool, seen: list):
    """A Trainer that records (real tokens, positions, labelled positions, rows) of every micro-batch,
    and with `full_logits` computes an ordinary model's loss: every position's logits in fp32."""
    import torch
    from transformers import Trainer

    class CountingTrainer(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            mask = inputs["attention_mask"]
            seen.append((int(mask.sum()), mask.numel(), int((inputs["labels"][:, 1:] != -100).sum()), len(mask)))
            return super().training_step(model, inputs, num_items_in_batch)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if not full_logits:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            logits = outputs.logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
            return (loss, outputs) if return_outputs else loss

    return CountingTrainer


def hf_child(args) -> None:
    """One run of the plain Hugging Face route; writes its measurements as JSON to --child_out."""
    import logging
    import warnings

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    import psutil
    import torch
    from transformers import DataCollatorForSeq2Seq, TrainerCallback

    rows, tokenizer = hf_rows(args)
    model = hf_model(args)
    marks, seen = [], []  # (step, wall, cpu, rss) at every optimizer step's end; micro-batch counts
    process = psutil.Process()

    class Timer(TrainerCallback):
        def on_step_end(self, targs, state, control, **kwargs):
            cpu = process.cpu_times()
            marks.append((state.global_step, time.perf_counter(), cpu.user + cpu.system, process.memory_info().rss))

    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    trainer = counting_trainer(args.child == "hf_full", seen)(
        model=model, args=hf_training_args(args), train_dataset=rows, data_collator=collator, callbacks=[Timer()])
    trainer.train()
    result = {"marks": marks, "seen": seen, "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
              "gc_kwargs": getattr(model.base_model.model, "_gradient_checkpointing_kwargs", None),
              "passes_num_items_in_batch": trainer.model_accepts_loss_kwargs, "torch_threads": torch.get_num_threads()}
    with open(args.child_out, "w") as f:
        json.dump(result, f)


# ---------------------------------------------------------------------------------- runs


def wait_rusage(proc):
    """Exit status and rusage of this one child (ru_maxrss: its own peak RSS in KiB)."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage


def run_hf(args, log_path, side: str) -> dict:
    out = os.path.join(args.workdir, "hf-result.json")
    argv = [sys.executable, os.path.abspath(__file__), "--child", side, "--child_out", out]
    argv += ["--model_dir", args.model_dir, "--train_path", args.train_path, "--workdir", args.workdir]
    argv += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch)]
    argv += ["--max_len", str(args.max_len), "--max_src_len", str(args.max_src_len), "--lr", str(args.lr)]
    if args.no_gradient_checkpointing:
        argv.append("--no_gradient_checkpointing")
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=child_env(args.threads))
        code, usage = wait_rusage(proc)
    wall_total = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"the {side} run failed ({code}); see {log_path}:\n" + tail(log_path))
    with open(out) as f:
        result = json.load(f)
    marks = {step: (wall, cpu, rss) for step, wall, cpu, rss in result["marks"]}
    seen = result["seen"]
    w, n = args.warmup, args.steps
    tokens = sum(c[0] for c in seen[w:n])
    return {
        "tokens": tokens,
        "computed": tokens,
        "samples": sum(c[3] for c in seen[w:n]),
        "positions": sum(c[1] for c in seen[w:n]),
        "max_labelled": max(c[2] for c in seen[:n]),
        "labelled": sum(c[2] for c in seen[w:n]),
        "wall": marks[n][0] - marks[w][0],
        "cpu": marks[n][1] - marks[w][1],
        "maxrss_mib": usage.ru_maxrss / 1024,
        "rss_at_warmup_mib": marks[w][2] / 2**20,
        "process_wall": wall_total,
        "gc_kwargs": result["gc_kwargs"],
        "passes_num_items_in_batch": result["passes_num_items_in_batch"],
        "torch_threads": result["torch_threads"],
    }


def run_train_py(args, log_path, packing: bool, steps: list[dict]) -> dict:
    """Run train.py as a user would; time the steps after the warm-up from its own log lines."""
    import psutil

    out_dir = os.path.join(args.workdir, "train-out" + ("-packing" if packing else ""))
    shutil.rmtree(out_dir, ignore_errors=True)
    argv = [sys.executable, "train.py", "--model_name_or_path", args.model_dir, "--train_path", args.train_path]
    argv += ["--output_dir", out_dir, "--max_len", str(args.max_len), "--max_src_len", str(args.max_src_len)]
    batch = args.packing_batch if packing else args.batch
    argv += ["--per_device_train_batch_size", str(batch), "--learning_rate", str(args.lr)]
    argv += ["--max_steps", str(args.steps), "--show_loss_step", "1"]
    if not args.no_gradient_checkpointing:
        argv.append("--gradient_checkpointing")
    if packing:
        argv.append("--packing")
    rates, marks = {}, {}
    start = time.perf_counter()
    with open(log_path, "w") as log, open(log_path + ".stderr", "w") as err:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True, env=child_env(args.threads))
        handle = psutil.Process(proc.pid)
        for line in proc.stdout:
            log.write(line)
            match = STEP_LINE.match(line)
            if match:
                cpu = handle.cpu_times()
                step = int(match[1])
                rates[step] = float(match[3])
                marks[step] = (time.perf_counter(), cpu.user + cpu.system, handle.memory_info().rss)
        code, usage = wait_rusage(proc)
    wall_total = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"train.py failed ({code}); see {log_path}:\n" + tail(log_path + ".stderr"))
    w, n = args.warmup, args.steps
    missing = [s for s in range(1, n + 1) if s not in rates]
    if missing:
        raise SystemExit(f"train.py logged no tokens/s for steps {missing[:5]}...; see {log_path}")
    # Its own window times: tokens of the step / the tokens/s it logged for that step.
    timed = steps[w:n]
    result = {key: sum(step[key] for step in timed) for key in ("tokens", "computed", "samples", "positions", "labelled")}
    return {
        **result,
        "max_labelled": max(step["labelled"] for step in steps[:n]),
        "wall": sum(step["tokens"] / rates[s] for s, step in enumerate(timed, w + 1)),
        "wall_observed": marks[n][0] - marks[w][0],  # the same steps timed from here, as a check
        "cpu": marks[n][1] - marks[w][1],
        "maxrss_mib": usage.ru_maxrss / 1024,
        "rss_at_warmup_mib": marks[w][2] / 2**20,
        "process_wall": wall_total,
    }


def child_env(threads: int):
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def tail(path, n=3000):
    with open(path, errors="replace") as f:
        return f.read()[-n:]


# ---------------------------------------------------------------------------------- setup


def prepare(args) -> list[str]:
    """Model and data in args.workdir; returns notes on what was used."""
    notes = []
    if not args.model_dir:
        args.model_dir = os.path.join(args.workdir, "tiny")
        size = [
            "--hidden_size", str(args.hidden_size), "--num_layers", str(args.num_layers),
            "--num_heads", str(args.num_heads), "--intermediate_size", str(args.intermediate_size),
        ]  # fmt: skip
        if os.path.isfile(args.tokenizer):
            source = ["--tokenizer", args.tokenizer]
            notes.append(f"tokenizer: {args.tokenizer} (the real Baichuan2 vocabulary)")
        else:
            corpus = os.path.join(ROOT, "data", "sample", "rolebench-zh_general_train.jsonl")
            source = ["--corpus", corpus, "--vocab_size", "1200"]
            notes.append(
                f"WARNING: {args.tokenizer} is missing; a small tokenizer was trained on {corpus}, so the vocabulary "
                "(and the cost of the output head) is far smaller than Baichuan2's 125,696"
            )
        subprocess.run(
            [sys.executable, "-m", "baichuan.tiny", "--out", args.model_dir, *source, *size],
            cwd=ROOT, check=True, capture_output=True,
        )  # fmt: skip
    if not args.train_path:
        args.train_path = os.path.join(args.workdir, "train.jsonl")
        cmd = [sys.executable, "data_helper.py", "--train_out", args.train_path]
        cmd += ["--test_out", os.path.join(args.workdir, "test.jsonl")]
        if os.path.isfile(os.path.join(args.rolebench_dir, "rolebench-zh_general_train.jsonl")):
            cmd += ["--data_dir", args.rolebench_dir]
            notes.append(f"data: RoleBench-zh train split from {args.rolebench_dir} via data_helper.py")
        else:
            notes.append("data: data/sample via data_helper.py (RoleBench-zh not found)")
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    return notes


def machine() -> str:
    model = platform.processor() or "?"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        pass
    import psutil

    return f"{model}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM"


# ---------------------------------------------------------------------------------- main


def run_rounds(args, steps_by_side: dict) -> dict:
    """Every side once a round, the order flipped every round; the measurements per side."""
    results = {side: [] for side in args.sides}
    for r in range(args.rounds):
        for side in args.sides if r % 2 == 0 else args.sides[::-1]:
            log = os.path.join(args.workdir, f"{side}-round{r + 1}.log")
            if side in ("hf", "hf_full"):
                res = run_hf(args, log, side)
            else:
                res = run_train_py(args, log, side == "packing", steps_by_side[side == "packing"])
            res.update(tok_s=res["tokens"] / res["wall"], tok_cpu_s=res["tokens"] / res["cpu"],
                       samples_s=res["samples"] / res["wall"])
            results[side].append(res)
            print(f"round {r + 1} {side:8s} {res['tok_s']:8.1f} tokens/s  {res['tok_cpu_s']:8.1f} tokens/CPU-s  "
                  f"{res['samples_s']:6.2f} samples/s  peak RSS {res['maxrss_mib']:7.0f} MiB  "
                  f"pad {1 - res['computed'] / res['positions']:.1%}  (process {res['process_wall']:.0f} s)", flush=True)
    return results


def print_header(args, notes, config, stats, packed_stats) -> None:
    import torch

    lengths, labelled, packed_lengths = stats["computed"], stats["labelled"], packed_stats["computed"]
    print(f"# bench_train  {datetime.date.today()}  {machine()}  torch {torch.__version__}", flush=True)
    for note in notes:
        print(f"# {note}")
    print(f"# model: {config['hidden_size']} wide, {config['num_hidden_layers']} layers, vocab {config['vocab_size']:,}; "
          f"{len(lengths):,} samples (mean {statistics.mean(lengths):.0f}, max {max(lengths)} tokens, "
          f"{statistics.mean(labelled):.0f} of them labelled on average), "
          f"{len(packed_lengths):,} packed rows ({len(lengths) / len(packed_lengths):.1f} samples a row); "
          f"batch {args.batch} samples, {args.packing_batch} rows with --packing; max_len {args.max_len}, "
          f"{args.steps} steps of which the first {args.warmup} untimed; gradient checkpointing "
          f"{'off' if args.no_gradient_checkpointing else 'on'} on both sides; "
          f"{'OMP_NUM_THREADS=' + str(args.threads) if args.threads else 'torch default threads'}", flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        hf_child(args)
        return
    from utils.data import PackedDataset, length_grouped_batches

    keep = bool(args.workdir)
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="bench-train-")
    os.makedirs(args.workdir, exist_ok=True)
    try:
        notes = prepare(args)
        config = json.load(open(os.path.join(args.model_dir, "config.json")))
        dataset = load_dataset(args.model_dir, args.train_path, args.max_len, args.max_src_len)
        stats = row_stats(dataset)
        packed_stats = row_stats(PackedDataset(dataset, args.max_len))  # the same samples, tokenised once

        # The batches train.py will take (epoch 0, seed 1234, one process), step by step.
        def steps_of(stats, batch):
            batches = length_grouped_batches(stats["computed"], batch, 1234, 0)
            return [batch_counts(b, stats) for b in batches[: args.steps]], batches

        ours_steps, ours_epoch = steps_of(stats, args.batch)
        packed_steps, packed_epoch = steps_of(packed_stats, args.packing_batch)
        if len(packed_steps) < args.steps:
            raise SystemExit(f"--packing_batch {args.packing_batch}: only {len(packed_steps)} steps in an epoch")
        lengths, packed_lengths = stats["computed"], packed_stats["computed"]
        waste = {
            "hf (random batches)": statistics.mean(
                1 - t / p for t, p in (padding_share(random_batches(len(lengths), args.batch, s), lengths) for s in range(5))),
            "ours (length-grouped)": 1 - (lambda t, p: t / p)(*padding_share(ours_epoch, lengths)),
            "packing": 1 - (lambda t, p: t / p)(*padding_share(packed_epoch, packed_lengths)),
        }
        print_header(args, notes, config, stats, packed_stats)
        results = run_rounds(args, {False: ours_steps, True: packed_steps})
        report(args, results, waste)
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump({"results": results, "padding_epoch": waste, "notes": notes}, f, indent=1)
    finally:
        if keep:
            print(f"# logs, model and data kept in {args.workdir}")
        else:
            shutil.rmtree(args.workdir, ignore_errors=True)


def report(args, results, waste) -> None:
    med = lambda side, key: statistics.median(r[key] for r in results[side])  # noqa: E731
    print()
    print(
        "| side | tokens/s (wall) | x hf | tokens/CPU-s | x hf | samples/s | x hf | peak RSS MiB | x hf "
        "| pad share (timed steps) | tokens computed / sample tokens | labelled share of sample tokens "
        "| most labelled positions in a batch |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for side in args.sides:
        cells = [side]
        for key, fmt in (("tok_s", "{:.1f}"), ("tok_cpu_s", "{:.1f}"), ("samples_s", "{:.2f}"), ("maxrss_mib", "{:.0f}")):
            cells.append(fmt.format(med(side, key)))
            if "hf" in results:
                ratios = [a[key] / b[key] for a, b in zip(results[side], results["hf"])]
                cells.append(f"{statistics.median(ratios):.2f} (" + ", ".join(f"{x:.2f}" for x in ratios) + ")")
            else:
                cells.append("-")
        total = lambda key: sum(r[key] for r in results[side])  # noqa: E731
        cells.append(f"{1 - total('computed') / total('positions'):.1%}")
        cells.append(f"{total('computed') / total('tokens'):.2f}")
        cells.append(f"{total('labelled') / total('tokens'):.1%}")
        cells.append(str(max(r["max_labelled"] for r in results[side])))
        print("| " + " | ".join(cells) + " |")
    print()
    print("Ratios: median over rounds (each round's ratio to the hf run of the same round in parentheses).")
    print()
    print("| batches | padding share over one epoch |")
    print("| --- | ---: |")
    for name, share in waste.items():
        print(f"| {name} | {share:.1%} |")
    for side in ("ours", "packing"):
        if side not in results or "hf" not in results:
            continue
        speed = statistics.median(a["tok_s"] / b["tok_s"] for a, b in zip(results[side], results["hf"]))
        memory = statistics.median(a["maxrss_mib"] / b["maxrss_mib"] for a, b in zip(results[side], results["hf"]))
        verdict = "met" if speed >= 1.5 and memory <= 1.0 else "MISSED"
        print(f"goal ({side} >= 1.5x hf tokens/s at <= its peak memory): {verdict} ({speed:.2f}x, memory {memory:.2f}x)")


if __name__ == "__main__":
    main()

"""BaichuanForCausalLM against transformers' LlamaForCausalLM (SDPA) with the same weights, on CPU.

    python bench/bench_model.py                 # the configuration recorded in bench/README.md
    python bench/bench_model.py --reps 3 --seq 128

A small model with the real 125,696-token vocabulary, so that the output head and the loss
dominate as they do in fine-tuning. Measured, with the two models' repetitions interleaved
(median reported):

  * train step: forward + backward of the loss with labels, the first half of every row -100
    like prompt tokens;
  * greedy generation: new tokens per second, KV cache on;
  * peak memory of one train step, each model in a fresh subprocess: the rise of the peak RSS
    (VmHWM, reset through /proc/self/clear_refs) over the RSS before the step, with the
    parameter gradients already allocated, so it counts activations, logits, loss and the
    transient gradients; the same for the decoder stack alone is subtracted to show the part
    taken by the output head and the loss.

Before timing, both models are checked to give the same loss and the same generated tokens.
"""

import argparse
import copy
import ctypes
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
from transformers import GenerationConfig, LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from baichuan import BaichuanConfig, BaichuanForCausalLM  # noqa: E402
from baichuan.convert_llama import llama_config, to_llama  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=125696, help="vocabulary size (Baichuan2's by default)")
    parser.add_argument("--hidden", type=int, default=256, help="model width")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--intermediate", type=int, default=688, help="MLP width")
    parser.add_argument("--batch", type=int, default=2, help="rows per train step")
    parser.add_argument("--seq", type=int, default=256, help="tokens per row in a train step")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens for generation (one row)")
    parser.add_argument("--new_tokens", type=int, default=32, help="tokens generated greedily")
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions of each measurement per model")
    parser.add_argument("--memory_reps", type=int, default=2, help="fresh subprocesses per model for the memory")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--memory_child", choices=["baichuan", "llama", "backbone"], help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def baichuan_config(args) -> BaichuanConfig:
    return BaichuanConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        max_position_embeddings=4096,
        position_embedding="rope",
    )


def train_batch(args, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, args.vocab, (args.batch, args.seq), generator=generator)
    labels = ids.clone()
    labels[:, : args.seq // 2] = -100  # the prompt half
    return ids, labels


def train_step(model, ids, labels) -> float:
    loss = model(input_ids=ids, labels=labels, use_cache=False).loss
    loss.backward()
    return loss.item()


def backbone_step(model, ids, labels) -> float:
    """The decoder stack alone with a cheap stand-in loss: the part of a train step that is not
    the output head and the cross-entropy, to subtract from the memory measurements."""
    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
    loss = hidden[labels != -100].float().pow(2).mean()
    loss.backward()
    return loss.item()


def generation_config(args) -> GenerationConfig:
    return GenerationConfig(
        max_new_tokens=args.new_tokens,
        do_sample=False,
        eos_token_id=None,  # always args.new_tokens tokens (min_new_tokens would add a vocab-wide isin per step)
        pad_token_id=0,
        bos_token_id=1,
    )


def generate(model, prompt, config):
    with torch.no_grad():
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config)


def timed(fn) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of fn(); the latter is less disturbed by other
    processes on a shared machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


# --------------------------------------------------------------------------------------------
# peak memory, in a fresh process per measurement


def proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_child(args) -> None:
    torch.manual_seed(0)
    config = baichuan_config(args)
    if args.memory_child == "llama":
        model = LlamaForCausalLM(llama_config(config, torch.float32))
    else:
        model = BaichuanForCausalLM(config)
    step = backbone_step if args.memory_child == "backbone" else train_step
    model.train()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    ids, labels = train_batch(args)
    step(model, ids[:1, :16], labels[:1, :16])  # one-time initialisation outside the measurement
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = proc_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    step(model, ids, labels)
    peak = proc_status_kib("VmHWM")
    print(json.dumps({"peak_rise_mib": (peak - before) / 1024}))


def measure_memory(args, variant: str) -> float:
    argv = [sys.executable, os.path.abspath(__file__), "--memory_child", variant]
    for name in ("vocab", "hidden", "layers", "heads", "intermediate", "batch", "seq", "threads"):
        argv += [f"--{name}", str(getattr(args, name))]
    proc = subprocess.run(argv, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_rise_mib"]


# --------------------------------------------------------------------------------------------


def time_interleaved(models, args, ids, labels, prompt, gen_config):
    """Train-step and generation times of each model, the order flipped every rep."""
    step_times = {name: [] for name in models}
    gen_times = {name: [] for name in models}
    for rep in range(args.reps):
        order = list(models) if rep % 2 == 0 else list(reversed(models))
        for name in order:
            model = models[name].train()
            model.zero_grad(set_to_none=False)
            step_times[name].append(timed(lambda: train_step(model, ids, labels)))
        for name in order:
            model = models[name].eval()
            gen_times[name].append(timed(lambda: generate(model, prompt, gen_config)))
    return step_times, gen_times


def print_report(args, loss, step_times, gen_times, memory) -> None:
    def summary(times, pick):
        return {name: pick(w for w, _ in t) for name, t in times.items()}

    step, step_best = summary(step_times, statistics.median), summary(step_times, min)
    gen, gen_best = summary(gen_times, statistics.median), summary(gen_times, min)
    peak = {name: statistics.median(m) for name, m in memory.items()}
    head = {name: peak[name] - peak["backbone"] for name in ("baichuan", "llama")}
    logits_mib = args.batch * args.seq * args.vocab * 4 / 2**20
    print(f"config: vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers, {args.heads} heads, "
          f"intermediate {args.intermediate}; train batch {args.batch} x {args.seq} (half labelled); "
          f"generation 1 x {args.prompt} + {args.new_tokens} greedy; {args.reps} interleaved reps; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}")
    print(f"loss (both models): {loss:.4f}; full fp32 logits of the batch: {logits_mib:.0f} MiB\n")
    print(f"| {'measure':<40} | {'Baichuan':>9} | {'Llama':>9} | {'ratio':>6} |")
    print(f"|{'-' * 42}|{'-' * 11}|{'-' * 11}|{'-' * 8}|")
    tokens = args.new_tokens
    rows = [  # (label, Baichuan, Llama, format, ratio = Baichuan speed / Llama speed, or memory ratio)
        ("train step, s, median", step["baichuan"], step["llama"], "{:.3f}", step["llama"] / step["baichuan"]),
        ("train step, s, best", step_best["baichuan"], step_best["llama"], "{:.3f}",
         step_best["llama"] / step_best["baichuan"]),
        ("greedy generation, tokens/s, median", tokens / gen["baichuan"], tokens / gen["llama"], "{:.1f}",
         gen["llama"] / gen["baichuan"]),
        ("greedy generation, tokens/s, best", tokens / gen_best["baichuan"], tokens / gen_best["llama"], "{:.1f}",
         gen_best["llama"] / gen_best["baichuan"]),
        ("train step peak memory rise, MiB", peak["baichuan"], peak["llama"], "{:.0f}", peak["baichuan"] / peak["llama"]),
        ("  of which output head + loss, MiB", head["baichuan"], head["llama"], "{:.0f}", head["baichuan"] / head["llama"]),
    ]
    for label, ours, theirs, fmt, ratio in rows:
        print(f"| {label:<40} | {fmt.format(ours):>9} | {fmt.format(theirs):>9} | {ratio:>6.2f} |")
    print(f"\nratio: Baichuan speed / Llama speed for times (goal >= 0.95), Baichuan / Llama for memory. "
          f"Head + loss memory vs the full fp32 logits ({logits_mib:.0f} MiB): Baichuan "
          f"{head['baichuan'] / logits_mib:.2f}x, Llama {head['llama'] / logits_mib:.2f}x; "
          f"decoder stack alone: {peak['backbone']:.0f} MiB")
    for what, values in (("train step times, wall s", {k: [round(w, 3) for w, _ in v] for k, v in step_times.items()}),
                         ("generation times, wall s", {k: [round(w, 3) for w, _ in v] for k, v in gen_times.items()}),
                         ("memory rises, MiB", {k: [round(m) for m in v] for k, v in memory.items()})):
        print(f"raw {what}: {json.dumps(values)}")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args)
        return

    torch.manual_seed(0)
    baichuan = BaichuanForCausalLM(baichuan_config(args)).train()
    llama = to_llama(copy.deepcopy(baichuan)).train()  # its own weights: both sides train
    models = {"baichuan": baichuan, "llama": llama}
    ids, labels = train_batch(args)
    prompt = torch.randint(3, args.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    gen_config = generation_config(args)

    # Same function, so the timings compare like with like.
    losses = {name: train_step(model, ids, labels) for name, model in models.items()}
    if abs(losses["baichuan"] - losses["llama"]) > 1e-4:
        raise SystemExit(f"the models disagree: losses {losses}")
    outputs = {name: generate(model.eval(), prompt, gen_config) for name, model in models.items()}
    if not torch.equal(outputs["baichuan"], outputs["llama"]):
        raise SystemExit("the models disagree: greedy outputs differ")

    step_times, gen_times = time_interleaved(models, args, ids, labels, prompt, gen_config)
    memory = {name: [] for name in ("baichuan", "llama", "backbone")}
    for _ in range(args.memory_reps):  # interleaved, like the timings
        for name, values in memory.items():
            values.append(measure_memory(args, name))
    print_report(args, losses["baichuan"], step_times, gen_times, memory)


if __name__ == "__main__":
    main()

"""Peak memory of serving Baichuan2-7B (random weights) at 16, 8 and 4 bits, through the loader that
web_demo.py, predict.py and evaluate.py use (`utils.models.load_for_inference --quantization_bit`).

    python bench/bench_gpu_serve.py                          # one CUDA GPU; the 7B shape
    python bench/bench_gpu_serve.py --device cpu --tiny      # the same code on a small config, on the CPU

No download: a checkpoint with `BaichuanConfig()` (Baichuan2-7B: 32 layers, 4096 wide, 125,696
tokens) and random bf16 weights is written to a temporary directory first (about 15 GB for 7B;
`--model_dir` reuses one), with a small sentencepiece tokenizer trained on data/sample (the
benchmark feeds token ids, so the tokenizer only has to load). Then each precision runs in a
fresh process, so that no allocation of one counts in another: load the model (16: bf16 on a GPU,
fp32 on the CPU; 8: bitsandbytes int8; 4: NF4 with double quantisation, bf16 compute), then one
greedy generation of `--new_tokens` tokens after a `--prompt_len`-token prompt, the KV cache on.

Printed per precision: the weights' size, peak `torch.cuda.max_memory_allocated` and
`max_memory_reserved` (on the CPU: the peak RSS and its rise over the process before loading),
generation tokens/s, and each figure as a ratio of the 16-bit one. The CUDA context (a few hundred
MB) comes on top of the reserved figure in nvidia-smi. Goal: <= 6 GB for 4-bit 7B inference
(Baichuan2's README gives 5.1 GB).

Without a CUDA device it stops with an error (exit status 2) unless `--device cpu` is given.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

GIB = 2**30
GOAL_4BIT_GIB = 6.0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (cpu only to exercise the code)")
    parser.add_argument("--tiny", action="store_true", help="a small config with the real vocabulary instead of 7B")
    parser.add_argument("--bits", default="16,8,4", help="comma-separated precisions to measure (default: %(default)s)")
    parser.add_argument("--prompt_len", type=int, default=1024, help="prompt tokens (default: %(default)s)")
    parser.add_argument("--new_tokens", type=int, default=128, help="tokens generated (default: %(default)s)")
    parser.add_argument("--model_dir", help="a checkpoint this script wrote before, to skip writing one")
    parser.add_argument("--json_out", help="also write the results as JSON to this file")
    parser.add_argument("--measure", type=int, choices=(4, 8, 16), help="internal: measure this one precision "
                        "of --model_dir in this process and print its figures as JSON (the parent runs it)")
    args = parser.parse_args(argv)
    try:
        args.bits = [int(b) for b in args.bits.split(",")]
    except ValueError:
        parser.error(f"--bits: expected a comma-separated list of 16, 8 and 4, got {args.bits!r}")
    if not set(args.bits) <= {16, 8, 4} or args.prompt_len < 1 or args.new_tokens < 1:
        parser.error("--bits takes 16, 8 and 4; --prompt_len and --new_tokens must be at least 1")
    if args.measure and not args.model_dir:
        parser.error("--measure needs --model_dir")
    return args


def write_checkpoint(out_dir: str, tiny: bool, device: str) -> None:
    """Random bf16 weights of the 7B shape (or a small one), made on `device`, saved as safetensors."""
    import torch
    from transformers import GenerationConfig

    from baichuan import BaichuanConfig, BaichuanForCausalLM, BaichuanTokenizer
    from baichuan.tiny import ASSISTANT_TOKEN, USER_TOKEN, train_sentencepiece

    small = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = BaichuanConfig(**(small if tiny else {}))
    with torch.device(device):
        model = BaichuanForCausalLM._from_config(config, dtype=torch.bfloat16)
    with tempfile.TemporaryDirectory() as scratch:
        corpus = os.path.join(scratch, "corpus.txt")
        with open(corpus, "w", encoding="utf-8") as out:
            for name in sorted(os.listdir(os.path.join(ROOT, "data", "sample"))):
                with open(os.path.join(ROOT, "data", "sample", name), encoding="utf-8") as f:
                    out.write(f.read())
        vocab = os.path.join(scratch, "tokenizer.model")
        with open(vocab, "wb") as f:
            f.write(train_sentencepiece(corpus, 1200))
        tokenizer = BaichuanTokenizer(vocab_file=vocab, model_max_length=config.model_max_length)
    user, assistant = tokenizer.convert_tokens_to_ids([USER_TOKEN, ASSISTANT_TOKEN])
    model.generation_config = GenerationConfig(pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                               user_token_id=user, assistant_token_id=assistant)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def current_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def measure(model_dir: str, bits: int, device_name: str, prompt_len: int, new_tokens: int) -> dict:
    """Load at `bits` and generate once; the figures of this process."""
    import torch

    from utils.cli import quiet_third_party

    quiet_third_party()
    from utils.models import load_for_inference, pick_device_dtype

    device, _ = pick_device_dtype(device_name)
    cuda, before = device.type == "cuda", current_rss()
    model, _ = load_for_inference(model_dir, device=device_name, quantization_bit=None if bits == 16 else bits)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    loaded = torch.cuda.memory_allocated(device) if cuda else current_rss() - before
    ids = torch.randint(3, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(inputs=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False)
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    result = {"bits": bits, "weights_gib": weights / GIB, "loaded_gib": loaded / GIB,
              "generated": out.shape[1] - prompt_len, "tokens_per_s": (out.shape[1] - prompt_len) / seconds}
    if cuda:
        result.update(peak_allocated_gib=torch.cuda.max_memory_allocated(device) / GIB,
                      peak_reserved_gib=torch.cuda.max_memory_reserved(device) / GIB)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        result.update(peak_rss_gib=peak / GIB, peak_rise_gib=(peak - before) / GIB)
    return result


def run_one(args, model_dir: str, bits: int) -> dict:
    """`measure` in a fresh process; its last stdout line is the JSON."""
    command = [sys.executable, os.path.abspath(__file__), "--device", args.device, "--model_dir", model_dir,
               "--measure", str(bits), "--prompt_len", str(args.prompt_len), "--new_tokens", str(args.new_tokens)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"{bits}-bit run failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(results: list[dict], cuda: bool) -> None:
    peak = "peak_allocated_gib" if cuda else "peak_rise_gib"
    columns = ["weights_gib", "loaded_gib", peak, "peak_reserved_gib" if cuda else "peak_rss_gib", "tokens_per_s"]
    print("bits 16 = unquantised: bf16 on a GPU, fp32 on the CPU; ratios are to it")
    print("| bits | " + " | ".join(columns) + " |\n|---:|" + "---:|" * len(columns))
    base = next((r for r in results if r["bits"] == 16), None)
    for r in results:
        cells = [f"{r[c]:.2f}" + (f" ({r[c] / base[c]:.2f}x)" if base and base[c] else "") for c in columns]
        print(f"| {r['bits']} | " + " | ".join(cells) + " |")
    four = next((r for r in results if r["bits"] == 4), None)
    if cuda and four:
        verdict = "met" if four["peak_reserved_gib"] <= GOAL_4BIT_GIB else "missed"
        print(f"goal <= {GOAL_4BIT_GIB:g} GiB reserved for 4-bit inference: {verdict} "
              f"({four['peak_reserved_gib']:.2f} GiB)")


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {args.device} needs a CUDA GPU, and torch {torch.__version__} sees none; to only "
              f"exercise the code here, run: python bench/bench_gpu_serve.py --device cpu --tiny", file=sys.stderr)
        return 2
    if args.measure:
        print(json.dumps(measure(args.model_dir, args.measure, args.device, args.prompt_len, args.new_tokens)))
        return 0
    cuda = args.device.startswith("cuda")
    where = torch.cuda.get_device_name(args.device) if cuda else "CPU (code path check only: no GPU memory figures)"
    print(f"device: {where}; {'tiny config' if args.tiny else 'Baichuan2-7B shape'}, prompt {args.prompt_len} + "
          f"{args.new_tokens} generated tokens, greedy", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = args.model_dir or os.path.join(scratch, "model")
        if not args.model_dir:
            write_checkpoint(model_dir, args.tiny, args.device)
        results = [run_one(args, model_dir, bits) for bits in args.bits]
    report(results, cuda)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"device": where, "tiny": args.tiny, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

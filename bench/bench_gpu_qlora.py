"""Peak GPU memory and speed of QLoRA on the real Baichuan2-7B architecture, random weights.

    python bench/bench_gpu_qlora.py                          # one CUDA GPU; meant to take 1-2 minutes on an H200 (not yet run on one)
    python bench/bench_gpu_qlora.py --compare_full_logits    # plus the same steps with a plain full-logits loss
    python bench/bench_gpu_qlora.py --compare_full_logits --deepspeed   # plus train.py's DeepSpeed engine
    python bench/bench_gpu_qlora.py --dtype fp16 --deepspeed_only --check_resume   # train.py's route in fp16, and a resume
    python bench/bench_gpu_qlora.py --device cpu --tiny      # the same code on a small config, on the CPU

No download: the model is built from `BaichuanConfig()` (Baichuan2-7B: 32 layers, 4096 wide,
125,696 tokens) on the meta device, then every linear layer but lm_head becomes a bitsandbytes
`Linear4bit` whose random bf16 weight is drawn on the GPU and quantised there (NF4, double
quantisation) one layer at a time, so no full-precision copy of the model ever exists.
Embeddings, norms and lm_head get random bf16 weights directly on the GPU, quantised with the
BitsAndBytesConfig train.py loads with (utils.models.quantization_config). Then `utils.models.add_lora`,
what `load_for_training` does after loading, makes it train.py's: frozen, gradient checkpointing,
and LoRA with train.py's defaults (utils.training.config: r=8, alpha 30, dropout 0.1, every linear
layer but lm_head).

Then QLoRA steps (batch 2 x 512 tokens, the first 128 of each row labelled -100 like a prompt;
AdamW on the LoRA weights, betas 0.9/0.95, bf16 autocast) with the model's own loss, computed
at the labelled positions in chunks. Printed: the GPU, parameter counts and dtypes, peak
`torch.cuda.max_memory_allocated` / `max_memory_reserved` over the steps (the model included)
and tokens/s after the warm-up. With `--compare_full_logits`, the same steps are run again
with the loss a plain training loop would compute: full (b, s, vocab) logits from the model,
then F.cross_entropy on their fp32 copy. With `--compare_packing N`, N random samples shaped like
RoleBench-zh's (one 150-token role prompt, a short question and reply) are trained on as one padded
batch and as train.py's --packing rows (utils.pack_examples and collate), and samples/s compared.
With `--deepspeed`, the same steps once more through
the DeepSpeed engine train.py builds (ds_config.json, 'auto' values filled by
utils.training.deepspeed_config; torch AdamW instead of a compiled FusedAdam), which adds ZeRO-2's
gradient bucket buffers; their size is printed. The engine takes train.py's own steps
(utils.training.steps.start_step and train_step: token-weighted, as train.py). With `--check_resume`,
it then writes a checkpoint with utils.training.checkpoints.Checkpointer (size and seconds printed),
takes 2 more steps, restores the checkpoint into the engine with utils.training.checkpoints.resume
(adapter, optimizer, scheduler, RNG and, in fp16, the dynamic loss scale) and takes the same 2 steps
again: their losses must agree.
`--dtype fp16` trains in fp16 as train.py does on GPUs without bf16 (T4, V100), with DeepSpeed's
dynamic loss scale; `--deepspeed_only` skips the plain-loop phases. Goal: <= 8 GB peak for the
chunked loss (the book measured 13 GB).

Without a CUDA device it stops with an error (exit status 2) unless `--device cpu` is given.
"""

import argparse
import json
import os
import resource
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

GIB = 2**30


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (cpu only to exercise the code)")
    parser.add_argument("--tiny", action="store_true", help="a small config with the real vocabulary instead of 7B")
    parser.add_argument("--batch", type=int, default=2, help="rows per step")
    parser.add_argument("--max_len", type=int, default=512, help="tokens per row (no padding)")
    parser.add_argument("--prompt_len", type=int, default=128, help="leading tokens of each row labelled -100")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps before them")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    parser.add_argument("--lora_dim", type=int, default=None, help="LoRA rank (default: train.py's)")
    parser.add_argument(
        "--no_gradient_checkpointing", action="store_true", help="train without gradient checkpointing"
    )
    parser.add_argument("--compare_full_logits", action="store_true", help="also measure a plain full-logits loss")
    parser.add_argument(
        "--deepspeed",
        action="store_true",
        help="also run the steps through the DeepSpeed engine train.py builds from ds_config.json (ZeRO-2 buckets)",
    )
    parser.add_argument("--deepspeed_only", action="store_true", help="with --deepspeed: skip the plain-loop phases")
    parser.add_argument(
        "--check_resume",
        action="store_true",
        help="with --deepspeed: save a checkpoint, take 2 steps, restore it, take them again, compare the losses",
    )
    parser.add_argument(
        "--dtype",
        choices=["auto", "bf16", "fp16"],
        default="auto",
        help="compute dtype: auto is train.py's choice (bf16 where the GPU has it, else fp16; fp32 on the CPU)",
    )
    parser.add_argument(
        "--compare_packing",
        type=int,
        default=0,
        metavar="N",
        help="also train on N RoleBench-shaped samples a step (one 150-token role prompt, a 5-30 token question, "
        "a 10-50 token reply), once as a padded batch and once as --packing rows, and compare samples/s",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and tokens")
    parser.add_argument("--json_out", help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.max_len < 2 or not 0 <= args.prompt_len < args.max_len - 1:
        parser.error("need --batch >= 1 and 0 <= --prompt_len < --max_len - 1")
    if args.steps < 1 or args.warmup < 0:
        parser.error("need --steps >= 1 and --warmup >= 0")
    if (args.deepspeed_only or args.check_resume) and not args.deepspeed:
        parser.error("--deepspeed_only and --check_resume need --deepspeed")
    return args


def model_config(tiny: bool):
    from baichuan import BaichuanConfig

    if tiny:
        return BaichuanConfig(
            hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4, use_cache=False
        )
    return BaichuanConfig(use_cache=False)  # Baichuan2-7B


# ------------------------------------------------------------------------------------ building


def build_4bit(config, device: torch.device, dtype: torch.dtype, quantization, seed: int):
    """Baichuan2 with random weights: linear layers (lm_head excepted) quantised to 4 bits one by
    one on `device`, everything else in `dtype` there. Follows `quantization`, a BitsAndBytesConfig."""
    import bitsandbytes as bnb

    from baichuan import BaichuanForCausalLM

    if not quantization.load_in_4bit:
        raise ValueError("this benchmark builds 4-bit models only")
    with torch.device("meta"):
        model = BaichuanForCausalLM(config)
    generator = torch.Generator(device=device).manual_seed(seed)
    std = config.initializer_range

    def random(*shape):
        return torch.empty(shape, device=device, dtype=dtype).normal_(0.0, std, generator=generator)

    compute_dtype = quantization.bnb_4bit_compute_dtype or dtype
    storage = getattr(quantization, "bnb_4bit_quant_storage", None) or torch.uint8
    if isinstance(storage, str):
        storage = getattr(torch, storage)
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            full_name = f"{parent_name}.{name}" if parent_name else name
            if not isinstance(child, nn.Linear) or full_name.endswith("lm_head"):
                continue
            layer = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=compute_dtype,
                compress_statistics=quantization.bnb_4bit_use_double_quant,
                quant_type=quantization.bnb_4bit_quant_type,
                quant_storage=storage,
                device="meta",
            )
            weight = random(child.out_features, child.in_features)
            layer.weight = bnb.nn.Params4bit(
                weight,
                requires_grad=False,
                compress_statistics=quantization.bnb_4bit_use_double_quant,
                quant_type=quantization.bnb_4bit_quant_type,
                quant_storage=storage,
                module=layer,
            ).to(device)  # quantised here, on `device`
            del weight
            if child.bias is not None:
                layer.bias = nn.Parameter(torch.zeros(child.out_features, device=device, dtype=dtype))
            setattr(parent, name, layer)
    fill_the_rest(model, random, device, dtype)
    model.is_loaded_in_4bit = True  # what from_pretrained sets; PEFT then wraps Linear4bit layers
    return model


def fill_the_rest(model, random, device: torch.device, dtype: torch.dtype) -> None:
    """Give what build_4bit left on the meta device (embeddings, norms, lm_head) weights on `device`:
    ones for norms, `random(*shape)` for the others."""
    for module_name, module in model.named_modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if not param.is_meta:
                continue
            if "norm" in name or "norm" in module_name.rsplit(".", 1)[-1]:
                value = torch.ones(param.shape, device=device, dtype=dtype)
            else:
                value = random(*param.shape)
            setattr(module, name, nn.Parameter(value, requires_grad=False))
    left = [name for name, p in model.named_parameters() if p.is_meta] + [
        name for name, b in model.named_buffers() if b.is_meta
    ]
    if left:
        raise RuntimeError(f"left on the meta device: {left[:5]}")


def build_like_train_py(config, args, device, dtype):
    """(the model as `utils.models.load_for_training` makes it, from build_4bit's random weights;
    the TrainConfig of this run: train.py's defaults, with this benchmark's batch, lr and LoRA rank)."""
    from utils.models import add_lora, quantization_config
    from utils.training.config import LoraConfig, ModelConfig, OptimConfig, TrainConfig

    train_config = TrainConfig(
        model=ModelConfig(model_name_or_path="random-weights",
                          gradient_checkpointing=not args.no_gradient_checkpointing),
        lora=LoraConfig(lora_dim=args.lora_dim) if args.lora_dim else LoraConfig(),
        optim=OptimConfig(per_device_train_batch_size=args.batch, learning_rate=args.lr),
    )
    quantization = quantization_config(train_config.model.quantization_bit, dtype)
    model = build_4bit(config, device, dtype, quantization, args.seed)
    return add_lora(model, train_config.model.gradient_checkpointing, train_config.lora), train_config


# ------------------------------------------------------------------------------------ measuring


def dtype_summary(model) -> dict:
    """Bytes per kind of weight and dtype: 4-bit packed, LoRA (trainable), embeddings, norms, lm_head."""
    out = {}
    for name, p in model.named_parameters():
        if p.__class__.__name__ == "Params4bit":
            kind = "4bit"
        elif p.requires_grad:
            kind = "lora"
        elif "lm_head" in name:
            kind = "lm_head"
        elif "embed_tokens" in name:
            kind = "embed_tokens"
        else:
            kind = "norms"
        key = f"{kind}:{str(p.dtype).replace('torch.', '')}"
        out[key] = out.get(key, 0) + p.numel() * p.element_size()
    return out


def full_logits_loss(model, batch):
    """The loss of a plain training loop: all (b, s, vocab) logits, then F.cross_entropy in fp32."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits.float()
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=-100
    )


def plain_step(model, optimizer, batch, dtype, full_logits=False):
    """One optimizer step of a plain loop: bf16 autocast (none in fp32), AdamW, clipping at 1.0."""
    with torch.autocast(batch["input_ids"].device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = full_logits_loss(model, batch) if full_logits else model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def deepspeed_engine(model, train_config, dtype, total_steps):
    """The DeepSpeed engine train.py makes: ds_config.json with its 'auto' values filled in."""
    from utils.training.deepspeed_config import fill_ds_config, read_ds_config, start_engine
    from utils.training.distributed import setup_distributed

    setup_distributed(train_config.distributed.local_rank)  # one process, as a bare `python train.py` makes
    config = read_ds_config(os.path.join(ROOT, "ds_config.json"))
    config = fill_ds_config(config, train_config.optim, world_size=1, dtype=dtype, total_steps=total_steps)
    return start_engine(model, config), config


def watch_zero_buckets(engine, seen: dict) -> None:
    """Record in seen["bucket_bytes"] the largest size of ZeRO-2's gradient bucket buffers. They
    are allocated at every backward (reduce_bucket_size elements each, two with overlap_comm)
    and released before it returns, so they are read right after DeepSpeed sets them up."""
    optimizer = engine.optimizer
    setup = getattr(optimizer, "setup_buckets", None)
    if setup is None:
        return

    def setup_and_measure(*a, **kw):
        out = setup(*a, **kw)
        buckets = getattr(optimizer, "ipg_buckets", None) or {}
        size = sum(t.numel() * t.element_size() for b in buckets.values() for t in getattr(b, "buffer", []))
        seen["bucket_bytes"] = max(seen.get("bucket_bytes", 0), size)
        return out

    optimizer.setup_buckets = setup_and_measure


def deepspeed_step(engine, batch):
    """One step as train.py's loop takes it (no autocast: the engine holds the model in bf16 or fp16)."""
    from utils.training.steps import start_step, train_step

    step_tokens, _ = start_step([batch], batch["input_ids"].device)
    return train_step(engine, [batch], step_tokens, batch["input_ids"].device) / step_tokens


def check_resume(engine, model, batch, workdir: str) -> dict:
    """Save, take 2 steps, restore, take the same 2 steps: how far apart their losses are."""
    from utils.training.checkpoints import (Checkpointer, load_adapter_weights, optimizer_state, read_trainer_state,
                                            resume)

    step = engine.global_steps
    checkpointer = Checkpointer(workdir, engine, model, None, {}, steps_per_epoch=step, limit=None,
                                state={"global_step": 0}, resumed_from=None)
    started = time.perf_counter()
    path = checkpointer.save(global_step=step, epoch=0, step_in_epoch=step)
    save_s = time.perf_counter() - started
    size = sum(os.path.getsize(os.path.join(path, name)) for name in os.listdir(path))

    def two_steps():
        losses = [deepspeed_step(engine, batch).item() for _ in range(2)]
        return losses, optimizer_state(engine)[1].get("loss_scaler")

    first = two_steps()
    load_adapter_weights(model, path)
    resume(engine, path, read_trainer_state(path, world_size=1, steps_per_epoch=step), accumulation=1)
    second = two_steps()
    return {"checkpoint_mib": size / 2**20, "save_s": save_s, "losses": first[0], "resumed_losses": second[0],
            "max_loss_difference": max(abs(a - b) for a, b in zip(first[0], second[0])),
            "loss_scaler": first[1], "resumed_loss_scaler": second[1]}


def run_steps(step, batch, device, steps, warmup) -> dict:
    """Time `step()` after `warmup` untimed calls; peak memory over all of them."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()
    losses, start = [], None
    for i in range(warmup + steps):
        if i == warmup:
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
        losses.append(step().item())  # .item() also waits for the GPU
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    tokens = int((batch["attention_mask"] != 0).sum()) * steps  # packed rows mark their shared prompt -1
    result = {
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "tokens_per_s": tokens / seconds,
        "step_s": seconds / steps,
    }
    if cuda:
        result["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
    else:
        result["peak_rss_gib"] = peak_rss_bytes() / GIB
    return result


def roleplay_batches(config, samples: int, max_len: int, seed: int) -> tuple[dict, dict]:
    """`samples` random samples shaped like RoleBench-zh role-play ones, as train.py lays them out:
    the same padded batch, and the same samples packed behind one copy of their role prompt."""
    import random

    from utils.data import collate, pack_examples

    user, assistant = 195, 196  # Baichuan2-Chat's <reserved_106> and <reserved_107>
    rng = random.Random(seed)
    words = lambda n: [rng.randrange(3, config.vocab_size) for _ in range(n)]  # noqa: E731
    prompt = words(150)
    examples = []
    for _ in range(samples):
        question, reply = words(rng.randint(5, 30)), words(rng.randint(10, 50)) + [config.eos_token_id]
        ids = prompt + [user] + question + [assistant] + reply
        examples.append({"input_ids": ids, "labels": [-100] * (len(ids) - len(reply)) + reply, "prefix_len": len(prompt)})
    rows = pack_examples(examples, max_len)
    return collate(examples, config.pad_token_id), collate(rows, config.pad_token_id)


def reset_peak_rss() -> None:
    """Linux: make VmHWM (the peak RSS) restart from the current RSS; elsewhere nothing."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    """VmHWM since the last reset_peak_rss (Linux), else the process's peak RSS."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def device_error(args) -> str | None:
    """Why the benchmark cannot run on --device, or None."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return (f"--device {args.device} needs a CUDA GPU, and torch {torch.__version__} sees none "
                f"(torch.cuda.is_available() is False). This benchmark measures GPU memory; to only exercise "
                f"its code on this machine, run: python bench/bench_gpu_qlora.py --device cpu --tiny")
    if device.type not in ("cuda", "cpu"):
        return f"unsupported device {args.device!r}: use cuda, cuda:N or cpu"
    if args.deepspeed and device.type == "cuda" and (device.index or 0) != int(os.environ.get("LOCAL_RANK", 0)):
        return "--deepspeed runs on cuda:LOCAL_RANK (cuda:0); select the GPU with CUDA_VISIBLE_DEVICES"
    return None


def setup_device(args):
    """(device, compute dtype, a description of the machine), printed with the library versions."""
    import bitsandbytes
    import peft
    import transformers

    from utils.models import pick_device_dtype

    device, dtype = pick_device_dtype(args.device)  # train.py's choice: bf16 (fp16 without it) on GPUs, fp32 on CPUs
    if args.dtype != "auto":
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        name = torch.cuda.get_device_name(device)
        total = torch.cuda.get_device_properties(device).total_memory / GIB
        where = f"{name} ({total:.0f} GiB), CUDA {torch.version.cuda}"
    else:
        where = "CPU (code path check only: no GPU memory figures)"
    print(
        f"device: {where}; torch {torch.__version__}, transformers {transformers.__version__}, "
        f"peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}; compute dtype {dtype}",
        flush=True,
    )
    return device, dtype, where


def describe_model(model, train_config, args, dtype) -> None:
    from utils.training.sizes import print_trainable_parameters

    print_trainable_parameters(model)
    summary = dtype_summary(model)
    print("weights: " + ", ".join(f"{k} {v / GIB:.3f} GiB" for k, v in sorted(summary.items())))
    wanted = str(dtype).replace("torch.", "")
    bad = [k for k in summary if k.split(":")[0] in ("embed_tokens", "norms", "lm_head") and k.split(":")[1] != wanted]
    if bad:
        print(f"warning: expected embeddings, norms and lm_head in {dtype}: {bad}")
    print(
        f"LoRA: r={train_config.lora.lora_dim}, alpha={train_config.lora.lora_alpha}, "
        f"dropout={train_config.lora.lora_dropout}, "
        f"gradient checkpointing {'on' if train_config.model.gradient_checkpointing else 'off'}; "
        f"batch {args.batch} x {args.max_len}, {args.warmup} warm-up + {args.steps} timed steps",
        flush=True,
    )


def random_batch(config, args, device) -> dict:
    """--batch rows of --max_len random tokens, the first --prompt_len of each unlabelled."""
    generator = torch.Generator().manual_seed(args.seed + 1)
    input_ids = torch.randint(3, config.vocab_size, (args.batch, args.max_len), generator=generator)
    labels = input_ids.clone()
    labels[:, : args.prompt_len] = -100
    return {"input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids).to(device),
            "labels": labels.to(device)}  # fmt: skip


def main(argv=None) -> int:
    args = parse_args(argv)
    error = device_error(args)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from utils.cli import quiet_third_party

    quiet_third_party()
    device, dtype, where = setup_device(args)
    config = model_config(args.tiny)
    print(
        f"model: {'tiny' if args.tiny else 'Baichuan2-7B'} shape, {config.num_hidden_layers} layers, "
        f"{config.hidden_size} wide, MLP {config.intermediate_size}, vocab {config.vocab_size:,}; random weights",
        flush=True,
    )
    results = {"device": where, "config": "tiny" if args.tiny else "Baichuan2-7B", "batch": args.batch,
               "max_len": args.max_len}  # fmt: skip

    started = time.perf_counter()
    model, train_config = build_like_train_py(config, args, device, dtype)
    print(f"built, quantised and wrapped in {time.perf_counter() - started:.1f} s", flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        results["model_gib"] = torch.cuda.memory_allocated(device) / GIB
        print(f"model on the GPU: {results['model_gib']:.2f} GiB allocated "
              f"(peak while building {torch.cuda.max_memory_allocated(device) / GIB:.2f} GiB)")  # fmt: skip
    describe_model(model, train_config, args, dtype)
    results.update(lora_dim=train_config.lora.lora_dim,
                   gradient_checkpointing=train_config.model.gradient_checkpointing)

    batch = random_batch(config, args, device)
    layouts = {}
    if args.compare_packing:
        plain, packed = roleplay_batches(config, args.compare_packing, args.max_len, args.seed + 2)
        layouts = {"padded": {k: v.to(device) for k, v in plain.items()},
                   "packed": {k: v.to(device) for k, v in packed.items()}}  # fmt: skip
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not args.deepspeed_only:
        optimizer = torch.optim.AdamW(trainable, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
        plain_phases(results, model, optimizer, batch, layouts, dtype, device, args)
        del optimizer
    if args.deepspeed:  # last: the engine casts the LoRA weights to the compute dtype
        model.zero_grad(set_to_none=True)
        try:
            deepspeed_phases(results, model, train_config, batch, layouts, dtype, device, args)
        except Exception as error:  # report what was measured before, and this failure
            import traceback

            traceback.print_exc()
            results["deepspeed_error"] = f"{type(error).__name__}: {error}"
            print(f"\nthe --deepspeed phase failed: {results['deepspeed_error']}", flush=True)
    report(results, args, device, trainable)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def plain_phases(results, model, optimizer, batch, layouts, dtype, device, args) -> None:
    """The plain AdamW loop: the model's chunked loss, a full-logits loss, padded against packed rows."""
    results["chunked"] = run_steps(
        lambda: plain_step(model, optimizer, batch, dtype), batch, device, args.steps, args.warmup
    )
    if args.compare_full_logits:
        results["full_logits"] = run_steps(
            lambda: plain_step(model, optimizer, batch, dtype, full_logits=True), batch, device, args.steps, args.warmup
        )
    for name, layout in layouts.items():
        results[name] = run_steps(
            lambda layout=layout: plain_step(model, optimizer, layout, dtype), layout, device, args.steps, args.warmup
        )
        results[name]["shape"] = list(layout["input_ids"].shape)
        results[name]["samples_per_s"] = args.compare_packing / results[name]["step_s"]


def deepspeed_phases(results, model, train_config, batch, layouts, dtype, device, args) -> None:
    """train.py's route: its DeepSpeed engine and its steps, on the batch and the packing layouts;
    then, with --check_resume, a save and restore."""
    import tempfile

    phases = 1 + len(layouts)
    engine, ds_config = deepspeed_engine(model, train_config, dtype, phases * (args.warmup + args.steps) + 4)
    seen = {}
    watch_zero_buckets(engine, seen)
    results["deepspeed"] = run_steps(lambda: deepspeed_step(engine, batch), batch, device, args.steps, args.warmup)
    results["deepspeed"]["zero_bucket_gib"] = seen.get("bucket_bytes", 0) / GIB
    results["deepspeed_zero"] = ds_config.get("zero_optimization", {})
    for name, layout in layouts.items():
        results[f"deepspeed_{name}"] = run_steps(
            lambda layout=layout: deepspeed_step(engine, layout), layout, device, args.steps, args.warmup
        )
        results[f"deepspeed_{name}"]["shape"] = list(layout["input_ids"].shape)
        results[f"deepspeed_{name}"]["samples_per_s"] = args.compare_packing / results[f"deepspeed_{name}"]["step_s"]
    if args.check_resume:
        with tempfile.TemporaryDirectory() as workdir:
            results["resume"] = check_resume(engine, model, batch, workdir)


def report(results, args, device, trainable) -> None:
    print()
    print("| loss | peak allocated GiB | peak reserved GiB | tokens/s | s/step | loss first -> last |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    rows = (
        ("chunked", "model's chunked loss, plain AdamW loop"),
        ("full_logits", "full logits + F.cross_entropy, plain AdamW loop"),
        ("deepspeed", "model's chunked loss, train.py's DeepSpeed engine (ds_config.json)"),
    )
    for name, label in rows:
        r = results.get(name)
        if r is None:
            continue
        if device.type == "cuda":
            mem = f"{r['peak_allocated_gib']:.2f} | {r['peak_reserved_gib']:.2f}"
        else:
            mem = f"(CPU: peak RSS {r['peak_rss_gib']:.2f}) | -"
        print(
            f"| {label} | {mem} | {r['tokens_per_s']:.0f} | {r['step_s']:.3f} | "
            f"{r['loss_first']:.3f} -> {r['loss_last']:.3f} |"
        )
    for prefix, route in (("", "plain AdamW loop"), ("deepspeed_", "train.py's DeepSpeed engine and steps")):
        if f"{prefix}padded" not in results:
            continue
        print(f"\n{args.compare_packing} RoleBench-shaped samples a step, model's chunked loss, {route}:\n")
        print("| layout | rows x positions | peak memory GiB | samples/s | x padded | s/step |")
        print("| --- | --- | ---: | ---: | ---: | ---: |")
        for name in ("padded", "packed"):
            r = results[prefix + name]
            mem = r["peak_allocated_gib"] if device.type == "cuda" else r["peak_rss_gib"]
            speedup = r["samples_per_s"] / results[prefix + "padded"]["samples_per_s"]
            print(f"| {name} | {r['shape'][0]} x {r['shape'][1]} | {mem:.2f} | {r['samples_per_s']:.1f} | "
                  f"{speedup:.2f} | {r['step_s']:.3f} |")
    if "resume" in results:
        r = results["resume"]
        print(f"\nresume: checkpoint {r['checkpoint_mib']:.1f} MiB written in {r['save_s']:.1f} s; 2 steps after it "
              f"{r['losses']}, after restoring it {r['resumed_losses']} (largest difference "
              f"{r['max_loss_difference']:.2e}); loss scale {r['loss_scaler']} -> {r['resumed_loss_scaler']}")
    if "deepspeed" in results:
        zero = results["deepspeed_zero"]
        print(
            f"\nDeepSpeed ZeRO-{zero.get('stage')} gradient buckets: {results['deepspeed']['zero_bucket_gib']:.2f} GiB "
            f"(reduce_bucket_size {zero.get('reduce_bucket_size')}, overlap_comm {zero.get('overlap_comm')}) "
            f"for {sum(p.numel() for p in trainable):,} trainable weights"
        )
    if device.type == "cuda" and not args.tiny:
        for name in ("chunked", "deepspeed"):
            if name in results:
                peak = results[name]["peak_allocated_gib"] * GIB / 1e9
                verdict = "met" if peak <= 8 else "MISSED"
                print(f"goal (<= 8 GB peak allocated; the book measured 13 GB), {name}: {verdict} ({peak:.2f} GB)")


if __name__ == "__main__":
    sys.exit(main())

"""What train.py needs beside its loop: the process group, the DeepSpeed config, parameter counts,
the memory estimate, the test-set evaluation, and checkpoints that resume exactly.

A checkpoint `output_dir/epoch-E-step-S/` holds the adapter (safetensors), the tokenizer,
`train_args.json`, the prompt record (`roleplay.json`, utils.prompts), each rank's optimizer
partition and RNG state (`optimizer-rankR.safetensors` + `.json`), and `trainer_state.json`,
written last: a directory without it is incomplete and never resumed from.
"""

import contextlib
import io
import json
import math
import os
import re
import shutil
import socket
import time

import torch
import torch.distributed as dist

from utils import TMP_PREFIX, UserError, fix_permissions, read_json, write_json

# ---------------------------------------------------------------- processes


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def print_rank_0(*args, **kwargs) -> None:
    if is_main_process():
        print(*args, **kwargs, flush=True)


def setup_distributed(local_rank_arg: int):
    """(rank, world size, device, dtype); starts the process group (gloo on the CPU)."""
    import deepspeed

    from utils.models import pick_device_dtype

    # A bare `python train.py` has no launcher; deepspeed.initialize would then look for MPI.
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            free_port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK=str(max(local_rank_arg, 0)), MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port))
    local_rank = int(os.environ.get("LOCAL_RANK", max(local_rank_arg, 0)))
    device, dtype = pick_device_dtype(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # on the CPU DeepSpeed prints "... built successfully" for its shared-memory op, every run
    with contextlib.redirect_stdout(io.StringIO()):
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    from deepspeed.utils import logger

    logger.setLevel("ERROR")
    return dist.get_rank(), dist.get_world_size(), device, dtype


def stall_point(name: str) -> None:
    """Crash-safety tests stop the run here and SIGKILL it.

    Setting ROLEPLAY_STALL_AT=NAME[:N] parks the process at the Nth time (default 1st) it
    reaches the point NAME ("step", "eval" or "save"), after printing a line to say so.
    """
    wanted = os.environ.get("ROLEPLAY_STALL_AT")
    if not wanted:
        return
    point, _, nth = wanted.partition(":")
    if point != name:
        return
    stall_point.seen[name] = stall_point.seen.get(name, 0) + 1
    if stall_point.seen[name] == int(nth or 1):
        print(f"stalled at {name}", flush=True)
        time.sleep(3600)


stall_point.seen = {}


# ---------------------------------------------------------------- the DeepSpeed config


def read_ds_config(path: str) -> dict:
    config = read_json(path, "DeepSpeed config")
    if not isinstance(config, dict):
        raise UserError(f"{path}: must hold a JSON object")
    return config


def fill_ds_config(config: dict, args, world_size: int, dtype, total_steps: int) -> dict:
    """The DeepSpeed config with its "auto" values taken from the arguments. The values that do
    not depend on them (betas, eps, clipping, the cosine floor) are written in ds_config.json."""

    def fill(section: dict, values: dict):
        for key, value in values.items():
            if section.get(key) == "auto":
                section[key] = value

    config = json.loads(json.dumps(config))
    batch, accumulation = args.per_device_train_batch_size, args.gradient_accumulation_steps
    fill(config, {"train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": accumulation,
                  "train_batch_size": batch * world_size * accumulation})
    fill(config.get("optimizer", {}).get("params", {}), {"lr": args.learning_rate, "weight_decay": args.weight_decay})
    warmup = math.ceil(args.warmup_ratio * total_steps)
    fill(config.get("scheduler", {}).get("params", {}),
         {"total_num_steps": total_steps, "warmup_num_steps": warmup,
          "warmup_min_lr": 0.1 * args.learning_rate, "warmup_max_lr": args.learning_rate})
    for key, wanted in (("bf16", dtype == torch.bfloat16), ("fp16", dtype == torch.float16)):
        section = config.setdefault(key, {"enabled": False})
        if section.get("enabled") == "auto":
            section["enabled"] = wanted
        if section["enabled"] and not wanted:
            raise UserError(f"{args.ds_file}: {key} is enabled, but this machine computes in {dtype}")
    left = [key for key, value in _flatten(config) if value == "auto"]
    if left:
        raise UserError(f"{args.ds_file}: no value for {', '.join(left)} (\"auto\" is filled only for the batch "
                        "sizes, lr, weight_decay, the schedule's steps and bf16/fp16)")
    return config


def _flatten(config: dict, prefix: str = ""):
    for key, value in config.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


# ---------------------------------------------------------------- sizes


def parameter_counts(model, assume_4bit: bool = False) -> tuple[int, int, int]:
    """(trainable, stored total, full total) parameter counts.

    A 4-bit weight is stored packed two to a byte, so its tensor has half as many elements.
    The stored total counts those elements, which is what PEFT printed when the book was
    written (35,782,656 trainable = 0.8314% for Baichuan2-7B with LoRA rank 16); the full total
    counts every weight once, as PEFT does now. `assume_4bit` treats the frozen weights of
    linear layers (lm_head excepted) as 4-bit, for a skeleton built on the meta device.
    """
    trainable = stored = full = 0
    packed = set()
    if assume_4bit:
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
                packed.add(id(module.weight))
    for param in model.parameters():
        n = param.numel()
        if param.__class__.__name__ == "Params4bit":
            stored += n
            full += n * 2 * param.element_size()
        elif id(param) in packed and not param.requires_grad:
            stored += n // 2
            full += n
        else:
            stored += n
            full += n
        if param.requires_grad:
            trainable += n
    return trainable, stored, full


def print_trainable_parameters(model, assume_4bit: bool = False) -> None:
    trainable, stored, full = parameter_counts(model, assume_4bit)
    print_rank_0(
        f"trainable params: {trainable:,} || all params: {stored:,} || trainable%: {100 * trainable / stored:.4f}"
        f"  (counting each 4-bit weight once: {full:,} params, {100 * trainable / full:.4f}%)"
    )


def nf4_bits_per_weight() -> float:
    """Bits a weight takes in bitsandbytes' NF4 with double quantisation, scales included, measured
    by quantising a small tensor the way the 4-bit base is quantised (about 4.127)."""
    import bitsandbytes as bnb

    weight = torch.randn(256, 1024)
    packed, state = bnb.functional.quantize_4bit(weight, compress_statistics=True, quant_type="nf4")
    stored = [packed, state.absmax, state.state2.absmax]
    return 8 * sum(t.numel() * t.element_size() for t in stored) / weight.numel()


def memory_estimate(model, config, args, ds_config: dict) -> dict[str, float]:
    """Bytes per GPU, by part, of training `model` (a LoRA skeleton on the meta device)."""
    from baichuan.modeling_baichuan import LOSS_CHUNK_ELEMENTS

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head") and not m.weight.requires_grad)
    other = sum(p.numel() for p in model.parameters() if not p.requires_grad) - linear
    bits = nf4_bits_per_weight() if args.quantization_bit == 4 else 16
    b, s, h, i = args.per_device_train_batch_size, args.max_len, config.hidden_size, config.intermediate_size
    layer_acts = b * s * (10 * h + 4 * i) * 2  # bf16 inputs kept for backward in one layer
    if args.gradient_checkpointing:
        acts = config.num_hidden_layers * b * s * h * 2 + layer_acts
    else:
        acts = config.num_hidden_layers * layer_acts
    zero = ds_config.get("zero_optimization", {})
    return {
        "weights": linear * bits / 8 + other * 2,
        "LoRA + optimizer": trainable * (2 + 2 + 4 + 8),  # bf16 weight and grad, fp32 master, Adam moments
        "activations": acts,
        # the chunked loss: a chunk of fp32 logits (turned into its softmax in place) and its bf16 gradient
        "loss": LOSS_CHUNK_ELEMENTS * (4 + 2),
        # ZeRO-2's gradient buckets, in bf16 (sizes in elements; DeepSpeed's defaults are 5e8)
        "DeepSpeed buckets": 2 * (zero.get("reduce_bucket_size", 5e8) + zero.get("allgather_bucket_size", 5e8)),
    }


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model, loader, device) -> tuple[float, float]:
    """Token-weighted mean loss over the whole test set (all ranks), and its perplexity."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of losses, labelled tokens)
    for batch in loader:
        stall_point("eval")
        batch = {k: v.to(device) for k, v in batch.items()}
        count = (batch["labels"][:, 1:] != -100).sum()
        loss = model(**batch).loss
        totals += torch.stack([loss.double() * count, count.double()])
    if dist.is_initialized():
        dist.all_reduce(totals)
    model.train()
    mean = (totals[0] / totals[1].clamp_min(1)).item()
    return mean, math.exp(min(mean, 50.0))


# ---------------------------------------------------------------- checkpoints


CHECKPOINT_NAME = re.compile(r"^epoch-(\d+)-step-(\d+)$")


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints in output_dir, oldest first. Half-written ones (still under
    their temporary name, or without trainer_state.json) are never listed."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT_NAME.match(name)
        if match and os.path.isfile(os.path.join(output_dir, name, "trainer_state.json")):
            found.append((int(match[2]), int(match[1]), name))
    return [os.path.join(output_dir, name) for _, _, name in sorted(found)]


def optimizer_state(engine) -> tuple[dict, dict]:
    """This rank's optimizer state as (tensors, json-able rest): the torch optimizer under
    ZeRO (which only sees this rank's partition) and ZeRO's fp32 master partition."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    state = inner.state_dict()
    tensors, scalars = {}, {}
    for pid, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"state.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    for i, master in enumerate(getattr(engine.optimizer, "single_partition_of_fp32_groups", [])):
        tensors[f"master.{i}"] = master.detach().cpu().contiguous()
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def load_optimizer_state(engine, tensors: dict, rest: dict) -> None:
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    state = {}
    for name, value in tensors.items():
        if name.startswith("state."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for name, value in rest["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    inner.load_state_dict({"state": state, "param_groups": rest["param_groups"]})
    for i, master in enumerate(getattr(engine.optimizer, "single_partition_of_fp32_groups", [])):
        master.data.copy_(tensors[f"master.{i}"])
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])


def save_checkpoint(output_dir: str, engine, model, tokenizer, files: dict, trainer_state: dict) -> str:
    """Write epoch-E-step-S under a temporary name, then rename it into place.

    Each rank writes its optimizer partition; rank 0 writes the adapter, tokenizer, the json
    `files` (name -> object: the arguments, the prompt record), and trainer_state.json last.
    """
    from safetensors.torch import save_file

    name = f"epoch-{trainer_state['epoch'] + 1}-step-{trainer_state['global_step']}"
    final = os.path.join(output_dir, name)
    tmp = os.path.join(output_dir, TMP_PREFIX + name)
    if is_main_process():
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    tensors, rest = optimizer_state(engine)
    save_file(tensors, os.path.join(tmp, f"optimizer-rank{dist.get_rank()}.safetensors"))
    write_json(os.path.join(tmp, f"optimizer-rank{dist.get_rank()}.json"), rest)
    dist.barrier()
    if is_main_process():
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for file_name, obj in files.items():
            write_json(os.path.join(tmp, file_name), obj)
        stall_point("save")
        write_json(os.path.join(tmp, "trainer_state.json"), trainer_state)
        fix_permissions(tmp)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    dist.barrier()
    return final


def load_adapter_weights(model, checkpoint: str) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(os.path.join(checkpoint, "adapter_model.safetensors")))


def resume(engine, checkpoint: str, world_size: int, accumulation: int) -> dict:
    """Load optimizer, scheduler and RNG state; the adapter weights were loaded before."""
    from safetensors.torch import load_file

    state = read_json(os.path.join(checkpoint, "trainer_state.json"), "trainer state")
    if state["world_size"] != world_size:
        raise UserError(f"{checkpoint} was written by {state['world_size']} processes; resume with as many")
    rank = dist.get_rank()
    rest = read_json(os.path.join(checkpoint, f"optimizer-rank{rank}.json"), "optimizer state")
    load_optimizer_state(engine, load_file(os.path.join(checkpoint, f"optimizer-rank{rank}.safetensors")), rest)
    if engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(state["scheduler"])
    engine.global_steps = state["global_step"]
    engine.micro_steps = state["global_step"] * accumulation
    return state

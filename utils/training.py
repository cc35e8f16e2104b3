"""What train.py needs beside its loop: the process group, the DeepSpeed config, parameter counts,
the memory estimate, one token-weighted optimizer step and its throughput, the test-set
evaluation, and checkpoints that resume exactly, with the newest few and the best kept.

A checkpoint `output_dir/epoch-E-step-S/` holds the adapter (safetensors), the tokenizer,
`train_args.json`, the prompt record (`roleplay.json`, utils.prompts), each rank's optimizer
partition, RNG and (fp16) loss-scale state (`optimizer-rankR.safetensors` + `.json`), and
`trainer_state.json`, written last: a directory without it is incomplete and never resumed from.
The time it was saved at orders the checkpoints: "latest" is the one written last.
`output_dir/best` links to the checkpoint with the lowest test loss.
"""

import contextlib
import io
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import time

import torch
import torch.distributed as dist

from utils import TMP_PREFIX, UserError, fix_permissions, read_json, write_json
from utils.signals import NAMES, STOP, stall_point

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

    def object_at(key: str) -> dict:
        value, parts = config, key.split(".")
        for depth, part in enumerate(parts, 1):
            value = value.get(part, {})
            if not isinstance(value, dict):
                raise UserError(f"{args.ds_file}: {'.'.join(parts[:depth])} must be a JSON object, "
                                f"got {json.dumps(value)}")
        return value

    config = json.loads(json.dumps(config))
    batch, accumulation = args.per_device_train_batch_size, args.gradient_accumulation_steps
    fill(config, {"train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": accumulation,
                  "train_batch_size": batch * world_size * accumulation})
    fill(object_at("optimizer.params"), {"lr": args.learning_rate, "weight_decay": args.weight_decay})
    # at least 1: DeepSpeed's WarmupCosineLR refuses 0 warm-up steps (and warms up over 2 at the least)
    warmup = max(1, math.ceil(args.warmup_ratio * total_steps))
    fill(object_at("scheduler.params"),
         {"total_num_steps": total_steps, "warmup_num_steps": warmup,
          "warmup_min_lr": 0.1 * args.learning_rate, "warmup_max_lr": args.learning_rate})
    for key, wanted in (("bf16", dtype == torch.bfloat16), ("fp16", dtype == torch.float16)):
        config.setdefault(key, {"enabled": False})
        section = object_at(key)
        if section.get("enabled") == "auto":
            section["enabled"] = wanted
        if section.get("enabled") and not wanted:
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


# ---------------------------------------------------------------- one optimizer step


def labelled_tokens(batch: dict) -> int:
    """The positions the model's loss counts: those whose next token is labelled."""
    return int((batch["labels"][:, 1:] != -100).sum())


def start_step(micro_batches: list[dict], device) -> tuple[int, int | None]:
    """(labelled tokens of the whole step, over its micro-batches and all ranks; the signal that
    asked the run to stop, or None), agreed by all ranks in one all_reduce at the step boundary,
    so that the count is known before the first backward and every rank stops at the same step."""
    counts = torch.tensor([sum(labelled_tokens(b) for b in micro_batches), STOP.first == signal.SIGINT,
                           STOP.first == signal.SIGTERM], dtype=torch.float64, device=device)
    dist.all_reduce(counts)
    tokens, interrupted, terminated = counts.tolist()
    return int(tokens), signal.SIGINT if interrupted else signal.SIGTERM if terminated else None


def train_step(engine, micro_batches: list[dict], step_tokens: int, device) -> torch.Tensor:
    """One optimizer step over this rank's micro-batches; returns the sum of their token losses.

    The step's gradient is that of (sum of the labelled-token losses over all its micro-batches and
    ranks) / step_tokens, as in the HF Trainer since 4.46: each micro-batch's loss is divided by the
    step's count (num_items_in_batch), not by its own, so a micro-batch weighs by its tokens.
    DeepSpeed would also divide by the accumulation steps (turned off: scale_wrt_gas=False), and
    ZeRO averages the ranks' gradients where the sum is wanted (undone: x world size).
    """
    world_size = dist.get_world_size()
    total = torch.zeros((), dtype=torch.float64, device=device)
    for batch in micro_batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = engine(**batch, num_items_in_batch=step_tokens).loss
        engine.backward(loss * world_size, scale_wrt_gas=False)
        stall_point("step")
        engine.step()
        total += loss.detach().double() * step_tokens
    return total


class Throughput:
    """The per-token training loss, samples/s and tokens/s over the steps since the last report,
    timed over the training steps alone: evaluation and saving between them do not count.

    Tokens are the samples' own (utils.data.sample_counts): padding excluded, and a shared prompt
    counted once per sample that uses it, so the figure means the same with and without --packing.
    """

    def __init__(self, device):
        self.device = device
        self.totals = torch.zeros(3, dtype=torch.float64, device=device)  # (loss sum, samples, tokens)
        self.labelled = 0  # over all ranks already
        self.seconds = 0.0
        self.started = None

    def start(self) -> None:
        self.started = time.perf_counter()

    def stop(self, loss_sum: torch.Tensor, step_tokens: int, samples: int, tokens: int) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the next step's all_reduce would wait for it anyway
        self.seconds += time.perf_counter() - self.started
        self.totals += torch.stack([loss_sum, loss_sum.new_tensor(samples), loss_sum.new_tensor(tokens)])
        self.labelled += step_tokens

    def report(self) -> tuple[float, float, float]:
        """(mean loss per labelled token, samples/s, tokens/s), over all ranks; then starts anew."""
        dist.all_reduce(self.totals)
        loss_sum, samples, tokens = self.totals.tolist()
        result = loss_sum / max(self.labelled, 1), samples / self.seconds, tokens / self.seconds
        self.totals.zero_()
        self.labelled, self.seconds = 0, 0.0
        return result


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model, loader, device) -> tuple[float, float]:
    """Token-weighted mean loss over the whole test set (all ranks), and its perplexity. Rank 0
    shows a progress bar of its share (on the 7B model a pass takes minutes)."""
    from tqdm import tqdm

    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of losses, labelled tokens)
    for batch in tqdm(loader, desc="eval", leave=False, dynamic_ncols=True, disable=not is_main_process()):
        stall_point("eval")
        batch = {k: v.to(device) for k, v in batch.items()}
        count = labelled_tokens(batch)
        loss = model(**batch).loss
        totals[0] += loss.double() * count
        totals[1] += count
    if dist.is_initialized():
        dist.all_reduce(totals)
    model.train()
    mean = (totals[0] / totals[1].clamp_min(1)).item()
    return mean, math.exp(min(mean, 50.0))


# ---------------------------------------------------------------- checkpoints


CHECKPOINT_NAME = re.compile(r"^epoch-(\d+)-step-(\d+)$")
BEST = "best"  # a symlink in output_dir to the checkpoint with the lowest eval loss


def checkpoint_name(epoch: int, global_step: int) -> str:
    return f"epoch-{epoch + 1}-step-{global_step}"


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints in output_dir, in the order they were written (by step where that
    was not recorded), so the last is the newest of the run that resumed last, even when an
    abandoned run had gone further. Half-written ones (still under their temporary name, or
    without trainer_state.json) are never listed."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT_NAME.match(name)
        state_path = os.path.join(output_dir, name, "trainer_state.json")
        if match and os.path.isfile(state_path):
            try:
                state = read_json(state_path, "trainer state")
            except UserError:  # ordered by step; resuming from it says what is wrong
                state = None
            saved_at = state.get("saved_at") if isinstance(state, dict) else None
            saved_at = saved_at if isinstance(saved_at, (int, float)) else 0
            found.append((saved_at, int(match[2]), int(match[1]), name))
    return [os.path.join(output_dir, entry[-1]) for entry in sorted(found)]


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
    rest = {"param_groups": state["param_groups"], "scalars": scalars, "skipped_steps": engine.skipped_steps}
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if getattr(scaler, "dynamic", False):  # fp16: where the dynamic loss scale stands
        rest["loss_scaler"] = {key: getattr(scaler, key) for key in LOSS_SCALER_STATE}
    return tensors, rest


# What DeepSpeed's DynamicLossScaler changes as it goes (its other fields come from the config)
LOSS_SCALER_STATE = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


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
    engine.skipped_steps = rest.get("skipped_steps", 0)
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if getattr(scaler, "dynamic", False):  # a bf16 checkpoint resumed in fp16 keeps the initial scale
        for key, value in rest.get("loss_scaler", {}).items():
            setattr(scaler, key, value)


def save_checkpoint(output_dir: str, engine, model, tokenizer, files: dict, trainer_state: dict) -> str:
    """Write epoch-E-step-S under a temporary name, then rename it into place.

    Each rank writes its optimizer partition; rank 0 writes the adapter, the tokenizer (unless None:
    bench_gpu_qlora.py's random-weight model has none), the json `files` (name -> object: the
    arguments, the prompt record), and trainer_state.json last, with the time it was saved at.
    """
    from safetensors.torch import save_file

    trainer_state = {**trainer_state, "saved_at": time.time()}
    name = checkpoint_name(trainer_state["epoch"], trainer_state["global_step"])
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
        if tokenizer is not None:
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


def keep_checkpoints(output_dir: str, saved: str, best: str | None, limit: int | None) -> list[str]:
    """Point `output_dir/best` at the checkpoint named `best`, and keep the `limit` complete
    checkpoints written last plus that one and `saved`, the one just written (all of them without
    a limit); returns the names deleted.

    Only complete checkpoints are candidates, so one being written (still under its temporary
    name) is never touched. Those of an abandoned run that went further than the one resumed
    from were written before `saved`, and go first. A checkpoint is renamed to a temporary name
    before it is deleted, so a crash halfway never leaves a partial directory that still looks
    complete.
    """
    if best is not None:
        link = os.path.join(output_dir, TMP_PREFIX + BEST)
        with contextlib.suppress(FileNotFoundError):
            os.remove(link)
        os.symlink(best, link)  # relative: the run directory can be moved
        os.replace(link, os.path.join(output_dir, BEST))
    complete = list_checkpoints(output_dir)
    if limit is None:
        return []
    kept = {*complete[-limit:], os.path.join(output_dir, saved)}
    if best is not None:
        kept.add(os.path.join(output_dir, best))
    deleted = []
    for path in complete:
        if path not in kept:
            doomed = os.path.join(output_dir, TMP_PREFIX + "deleting-" + os.path.basename(path))
            shutil.rmtree(doomed, ignore_errors=True)
            os.replace(path, doomed)
            shutil.rmtree(doomed)
            deleted.append(os.path.basename(path))
    return deleted


TRAINER_STATE_KEYS = ("global_step", "epoch", "step_in_epoch", "world_size", "scheduler", "steps_per_epoch")


def read_trainer_state(checkpoint: str, keys=TRAINER_STATE_KEYS) -> dict:
    path = os.path.join(checkpoint, "trainer_state.json")
    state = read_json(path, "trainer state")
    if not isinstance(state, dict):
        raise UserError(f"{path}: must hold a JSON object")
    missing = [key for key in keys if key not in state]
    if missing:
        raise UserError(f"{path}: no {', '.join(missing)}; not a checkpoint written by train.py")
    return state


def check_resumable(state: dict, checkpoint: str, world_size: int, steps_per_epoch: int | None = None) -> None:
    """Refuse a checkpoint written by another number of processes (each rank loads its own optimizer
    partition) or, when given, with another number of steps per epoch (the data order would differ)."""
    written, now = [], []
    if state["world_size"] != world_size:
        written.append(f"{state['world_size']} processes")
        now.append(f"{world_size}")
    if steps_per_epoch is not None and state["steps_per_epoch"] != steps_per_epoch:
        written.append(f"{state['steps_per_epoch']} optimizer steps per epoch")
        now.append(f"{steps_per_epoch}")
    if written:
        raise UserError(f"{checkpoint} was written with {' and '.join(written)}, now {' and '.join(now)}; "
                        "resume with the same processes, batch size, accumulation and data")


def resume_command(world_size: int) -> str:
    """The command that started this process, as a shell line, with --resume_from_checkpoint
    latest; under a launcher, the launcher's command for this many processes on one machine."""
    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip or arg.startswith(("--local_rank=", "--resume_from_checkpoint=")):
            skip = False
            continue
        skip = arg in ("--local_rank", "--resume_from_checkpoint")
        if not skip:
            args.append(arg)
    args += ["--resume_from_checkpoint", "latest"]
    if "TORCHELASTIC_RUN_ID" in os.environ:
        launcher = ["torchrun", "--nproc_per_node", os.environ.get("LOCAL_WORLD_SIZE", str(world_size))]
    elif any(arg.startswith("--local_rank") for arg in sys.argv[1:]):
        launcher = ["deepspeed", "--num_gpus", str(world_size)]
    else:  # the interpreter as it was called, with its options
        launcher = sys.orig_argv[: len(sys.orig_argv) - len(sys.argv)]
    return shlex.join(launcher + [sys.argv[0]] + args)


def stop_message(signum: int, checkpoint: str, world_size: int) -> str:
    return (f"stopped by {NAMES[signum]}: the checkpoint {checkpoint} is complete; resume with: "
            f"{resume_command(world_size)}")


def load_adapter_weights(model, checkpoint: str) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from utils.models import LOAD_ERRORS, cannot_load

    try:
        set_peft_model_state_dict(model, load_file(os.path.join(checkpoint, "adapter_model.safetensors")))
    except LOAD_ERRORS as error:
        raise cannot_load(checkpoint, error) from None


def resume(engine, checkpoint: str, world_size: int, accumulation: int) -> dict:
    """Load optimizer, scheduler and RNG state; the adapter weights were loaded before."""
    from safetensors.torch import load_file

    from utils.models import LOAD_ERRORS, first_line

    # all that resume() itself needs: tests/engine_checks.py and the GPU bench write no steps_per_epoch
    state = read_trainer_state(checkpoint, ("global_step", "world_size", "scheduler"))
    check_resumable(state, checkpoint, world_size)
    rank = dist.get_rank()
    rest = read_json(os.path.join(checkpoint, f"optimizer-rank{rank}.json"), "optimizer state")
    tensors_path = os.path.join(checkpoint, f"optimizer-rank{rank}.safetensors")
    try:
        tensors = load_file(tensors_path)
    except LOAD_ERRORS as error:
        raise UserError(f"{tensors_path}: cannot load the optimizer state ({first_line(error)})") from None
    load_optimizer_state(engine, tensors, rest)
    if engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(state["scheduler"])
    engine.global_steps = state["global_step"]
    engine.micro_steps = state["global_step"] * accumulation
    return state

"""Checkpoints that resume exactly, with the newest few and the best kept.

A checkpoint `output_dir/epoch-E-step-S/` holds the adapter (safetensors), the tokenizer,
`train_args.json`, the prompt record (`roleplay.json`, utils.prompts), each rank's optimizer
partition, RNG and (fp16) loss-scale state (`optimizer-rankR.safetensors` + `.json`), and
`trainer_state.json`, written last: a directory without it is incomplete and never resumed from.
The time it was saved at orders the checkpoints: "latest" is the one written last.
`output_dir/best` links to the checkpoint with the lowest test loss.
"""

import contextlib
import os
import re
import shlex
import shutil
import sys
import time

import torch
import torch.distributed as dist

from utils import TMP_PREFIX, UserError, fix_permissions, read_json, write_json
from utils.signals import NAMES, stall_point
from utils.training.distributed import is_main_process

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

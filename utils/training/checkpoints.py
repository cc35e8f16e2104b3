"""Checkpoints that resume exactly, with the newest few and the best kept.

A checkpoint `output_dir/epoch-E-step-S/` holds the adapter (safetensors), the tokenizer,
`train_args.json`, the prompt record (`roleplay.json`, utils.prompts), each rank's optimizer
partition, RNG and (fp16) loss-scale state (`optimizer-rankR.safetensors` + `.json`),
`trainer_state.json`, and `manifest.json`, written last, of every file and its size
(utils.training.manifest): a directory without a manifest that holds is never trusted.
It is written under a temporary name of this run's own and renamed into place when complete;
a save that fails (a full disk) stops every rank in one line and leaves no temporary folder.
The time it was saved at orders the checkpoints: "latest" is the one written last.
`output_dir/best` links to the checkpoint with the lowest test loss. With --save_on_each_node
every node keeps a full copy on its own disk (utils.training.storage).
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

from utils.cli import UserError
from utils.files import TMP_PREFIX, fix_permissions, read_json, write_json
from utils.signals import NAMES, stall_point
from utils.training.manifest import (TRAINER_STATE, checkpoint_name, partition_name, scan_checkpoints,
                                     trainer_state_problem, write_manifest)
from utils.training.distributed import is_main_process
from utils.training.storage import Storage, agree

BEST = "best"  # a symlink in output_dir to the checkpoint with the lowest eval loss


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints in output_dir, in the order they were written (utils.training.manifest)."""
    return scan_checkpoints(output_dir)[0]


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


def checkpoint_step(name: str) -> int:
    return int(name.rsplit("-", 1)[1])


def save_problem(path: str, error: Exception) -> str:
    """One line for an OS error while saving into `path`: the file written and the reason
    (safetensors wraps the OS's; a copy's error names its source first, its destination second)."""
    reason = getattr(error, "strerror", None)
    if not reason:
        found = re.search(r"I/O error: (.+?) \(os error \d+\)", str(error))
        reason = found[1] if found else str(error).strip().splitlines()[0]
    names = [str(name) for name in (getattr(error, "filename2", None), getattr(error, "filename", None)) if name]
    return f"cannot save a checkpoint: {next((n for n in names if n.startswith(path)), path)}: {reason}"


class SaveFailed(Exception):
    """A save problem already put in words."""


def save_checkpoint(output_dir: str, engine, model, tokenizer, files: dict, trainer_state: dict,
                    storage: Storage | None = None) -> str:
    """Write epoch-E-step-S under a temporary name, then rename it into place; in every copy of
    `storage` (the default: one folder that every rank shares, written by rank 0).

    Each rank writes its optimizer partition into its copy; the copy's writer writes the adapter,
    the tokenizer (unless None: bench_gpu_qlora.py's random-weight model has none), the json
    `files` (name -> object: the arguments, the prompt record), trainer_state.json with the time
    it was saved at, and the manifest last. An OS error on any rank (a full disk) removes every
    copy's temporary folder and stops every rank with one line naming the path.
    """
    storage = storage or Storage.one_folder(output_dir)
    trainer_state = {**trainer_state, "saved_at": time.time()}
    name = checkpoint_name(trainer_state["epoch"], trainer_state["global_step"])
    final, tmp = os.path.join(output_dir, name), storage.temporary(name)

    def make_folder():
        if storage.is_writer:
            os.makedirs(tmp)

    def finish():
        if storage.is_writer:
            write_copy(tmp, model, tokenizer, files, trainer_state)
            publish(tmp, final, storage)

    for work in (make_folder, lambda: write_partition(engine, tmp), finish):
        agreed_step(work, tmp, storage)
    return final


def agreed_step(work, tmp: str, storage: Storage) -> None:
    """Run `work`, then agree with every rank on whether all went well; on a problem anywhere, the
    writer removes `tmp` and every rank stops with the one line."""
    from safetensors import SafetensorError

    problem = None
    try:
        work()
    except SaveFailed as error:
        problem = str(error)
    except (OSError, SafetensorError) as error:
        problem = save_problem(tmp, error)
    try:
        agree(problem)
    except UserError:
        if storage.is_writer:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_partition(engine, tmp: str) -> None:
    """This rank's optimizer partition and the rest of its state, into `tmp`."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    rank = dist.get_rank()
    tensors, rest = optimizer_state(engine)
    path = os.path.join(tmp, partition_name(rank))
    try:
        save_file(tensors, path)
    except SafetensorError as error:  # it names a temporary file of its own
        raise SaveFailed(save_problem(path, error)) from None
    write_json(os.path.join(tmp, partition_name(rank, ".json")), rest)


def write_copy(tmp: str, model, tokenizer, files: dict, trainer_state: dict) -> None:
    """The writer's files of a copy: the adapter, the tokenizer, the json `files` and trainer_state.json."""
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    for file_name, obj in files.items():
        write_json(os.path.join(tmp, file_name), obj)
    write_json(os.path.join(tmp, TRAINER_STATE), trainer_state)


def publish(tmp: str, final: str, storage: Storage) -> None:
    """Seal a written copy: the manifest last of its files, the permissions, then the rename into place."""
    stall_point("save")
    write_manifest(tmp, storage.ranks, dist.get_world_size())
    fix_permissions(tmp)
    replace_directory(tmp, final)


def replace_directory(tmp: str, final: str) -> None:
    """Rename `tmp` to `final`; an existing `final` (the same step, saved again after resuming from
    an older checkpoint) is moved aside first and deleted after, never left half-deleted."""
    old = None
    if os.path.exists(final):
        old = os.path.join(os.path.dirname(final), TMP_PREFIX + "deleting-" + os.path.basename(tmp))
        os.replace(final, old)
    os.replace(tmp, final)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def keep_checkpoints(output_dir: str, saved: str, best: str | None, limit: int | None) -> list[str]:
    """Point `output_dir/best` at the checkpoint named `best`, and keep the `limit` complete
    checkpoints written last plus that one and `saved`, the one just written (all of them without
    a limit); returns the names deleted.

    Damaged checkpoints (utils.training.manifest) go first. One being written (still under its
    temporary name) is never touched. Those of an abandoned run that went further than the one resumed
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
    if limit is None:
        return []
    complete, damaged = scan_checkpoints(output_dir)
    kept = {*complete[-limit:], os.path.join(output_dir, saved)}
    if best is not None:
        kept.add(os.path.join(output_dir, best))
    deleted = []
    # damaged ones are never kept, nor trusted; oldest first, by step
    for path in [os.path.join(output_dir, name) for name in sorted(damaged, key=checkpoint_step)] + complete:
        if path not in kept:
            doomed = os.path.join(output_dir, TMP_PREFIX + "deleting-" + os.path.basename(path))
            shutil.rmtree(doomed, ignore_errors=True)
            os.replace(path, doomed)
            shutil.rmtree(doomed)
            deleted.append(os.path.basename(path))
    return deleted


def read_trainer_state(checkpoint: str, world_size: int, steps_per_epoch: int | None = None) -> dict:
    """The trainer state of a checkpoint to resume from, read once and checked: a JSON object with
    the keys and types train.py writes (utils.training.manifest.trainer_state_problem), the step of the folder's name (utils.training.manifest),
    written by as many processes as now and, when given, with as many steps per epoch (else the data
    order would differ). Each rank loads its own optimizer partition, hence the first."""
    path = os.path.join(checkpoint, TRAINER_STATE)
    state = read_json(path, "trainer state")
    problem = trainer_state_problem(state, os.path.basename(os.path.realpath(checkpoint)))
    if problem:
        raise UserError(f"{path}: {problem}")
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
    return state


def resume_command(world_size: int) -> str:
    """The command that started this process, as a shell line, with --resume_from_checkpoint
    latest; under a launcher, the launcher's command for this many processes on one machine, or
    under torchrun on several, its command with R for each node's --node_rank."""
    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip or arg.startswith(("--local_rank=", "--resume_from_checkpoint=")):
            skip = False
            continue
        skip = arg in ("--local_rank", "--resume_from_checkpoint")
        if not skip:
            args.append(arg)
    args += ["--resume_from_checkpoint", "latest"]
    nodes = os.environ.get("GROUP_WORLD_SIZE", "1")
    if "TORCHELASTIC_RUN_ID" in os.environ and nodes != "1":  # each node runs it with its own --node_rank
        launcher = ["torchrun", "--nnodes", nodes, "--node_rank", "R", "--nproc_per_node",
                    os.environ.get("LOCAL_WORLD_SIZE", "1"), "--master_addr", os.environ.get("MASTER_ADDR", "?"),
                    "--master_port", os.environ.get("MASTER_PORT", "?")]
    elif "TORCHELASTIC_RUN_ID" in os.environ:
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


def resume(engine, checkpoint: str, state: dict, accumulation: int) -> None:
    """Load this rank's optimizer and RNG state, and the scheduler's position of `state` (the
    checkpoint's trainer state, read_trainer_state's); the adapter weights were loaded before."""
    from safetensors.torch import load_file

    from utils.models import LOAD_ERRORS, first_line

    rank = dist.get_rank()
    rest = read_json(os.path.join(checkpoint, partition_name(rank, ".json")), "optimizer state")
    tensors_path = os.path.join(checkpoint, partition_name(rank))
    try:
        tensors = load_file(tensors_path)
    except LOAD_ERRORS as error:
        raise UserError(f"{tensors_path}: cannot load the optimizer state ({first_line(error)})") from None
    load_optimizer_state(engine, tensors, rest)
    if engine.lr_scheduler is not None:
        if not isinstance(state["scheduler"], dict):
            raise UserError(f"{os.path.join(checkpoint, TRAINER_STATE)}: no scheduler state, but the DeepSpeed "
                            "config has a scheduler; resume with the config the checkpoint was written with")
        engine.lr_scheduler.load_state_dict(state["scheduler"])
    engine.global_steps = state["global_step"]
    engine.micro_steps = state["global_step"] * accumulation


class Checkpointer:
    """Writes the checkpoints of one run (save_checkpoint), points `best` at the one with the lowest
    test loss, keeps the `limit` written last (keep_checkpoints), and remembers the last one written
    (at start, the one resumed from), so that a stop right after it writes no other."""

    def __init__(self, output_dir: str, engine, model, tokenizer, files: dict, steps_per_epoch: int,
                 limit: int | None, state: dict, resumed_from: str | None, log=print, storage: Storage | None = None):
        """`files`: the JSON files every checkpoint carries (name -> object); `state`: the trainer
        state started from, whose best checkpoint stays the best to beat; `log`: where rank 0 says
        what was saved and deleted; `storage`: where the copies go (utils.training.storage's check;
        by default one folder that every rank shares)."""
        self.output_dir, self.storage = output_dir, storage or Storage.one_folder(output_dir)
        self.engine, self.model, self.tokenizer = engine, model, tokenizer
        self.files, self.steps_per_epoch, self.limit, self.log = files, steps_per_epoch, limit, log
        self.best = {key: state.get(key) for key in ("best_model_checkpoint", "best_metric")}
        self.last, self.last_step = resumed_from, state["global_step"] if resumed_from else None

    def save(self, global_step: int, epoch: int, step_in_epoch: int, eval_loss: float | None = None,
             ppl: float | None = None) -> str:
        """Write the checkpoint after `step_in_epoch` steps of `epoch` (from 0), with the test loss
        and perplexity when evaluated; returns its path."""
        name = checkpoint_name(epoch, global_step)
        if eval_loss is not None and (self.best["best_metric"] is None or eval_loss < self.best["best_metric"]):
            self.best.update(best_model_checkpoint=name, best_metric=eval_loss)
        scheduler = self.engine.lr_scheduler
        trainer_state = {"global_step": global_step, "epoch": epoch, "step_in_epoch": step_in_epoch,
                         "steps_per_epoch": self.steps_per_epoch, "world_size": dist.get_world_size(),
                         "scheduler": scheduler.state_dict() if scheduler is not None else None,
                         "eval_loss": eval_loss, "ppl": ppl, **self.best}
        started = time.perf_counter()
        path = save_checkpoint(self.output_dir, self.engine, self.model, self.tokenizer, self.files, trainer_state,
                               self.storage)
        if self.storage.is_writer:  # on each copy: every node sees the same steps and the same best
            deleted = keep_checkpoints(self.output_dir, name, self.best["best_model_checkpoint"], self.limit)
        if is_main_process():
            self.log(f"saved {path} in {time.perf_counter() - started:.1f} s"
                     + (f"; deleted {', '.join(deleted)}" if deleted else ""))
        self.last, self.last_step = path, global_step
        return path

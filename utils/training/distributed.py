"""The process group of a training run (gloo on the CPU, NCCL on GPUs) and the rank helpers."""

import atexit
import contextlib
import io
import os
import socket

import torch
import torch.distributed as dist


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def print_rank_0(*args, **kwargs) -> None:
    if is_main_process():
        print(*args, **kwargs, flush=True)


def end_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


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
    # ended at exit, however the run ends: a process group left to the interpreter's teardown has its
    # threads killed mid-flight now and then ("terminate called without an active exception" after
    # a run's one-line error)
    atexit.register(end_distributed)
    from deepspeed.utils import logger

    logger.setLevel("ERROR")
    return dist.get_rank(), dist.get_world_size(), device, dtype

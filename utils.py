"""Shared pieces of the pipeline: errors, rank-0 printing, device choice, model loading,
the role-play dataset and collator, LoRA helpers, evaluation and atomic checkpoint saving."""

import json
import os
import sys

import torch
import torch.distributed as dist


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


def exit_on_user_error(main):
    """Run `main()`; a UserError becomes `error: ...` on stderr and exit status 1."""
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


# ---------------------------------------------------------------- distributed helpers


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def print_rank_0(*args, **kwargs) -> None:
    if is_main_process():
        print(*args, **kwargs, flush=True)


# ---------------------------------------------------------------- device and dtype


def pick_device_dtype(device: str | int | None = None) -> tuple[torch.device, torch.dtype]:
    """The one place where device and dtype are decided.

    `device` is None/"auto" (CUDA if present, else CPU), "cpu", "cuda", "cuda:N", or an int
    (-1 = CPU, N = cuda:N, as merge_params.py's `--device`). GPUs get bf16 where supported,
    else fp16; the CPU gets fp32, since half-precision matmuls there are slow or missing.
    """
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif isinstance(device, int) or (isinstance(device, str) and device.lstrip("-").isdigit()):
        device = "cpu" if int(device) < 0 else f"cuda:{int(device)}"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {device} was asked for, but CUDA is not available")
        return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type != "cpu":
        raise UserError(f"unsupported device {device}: use cpu or cuda[:N]")
    return device, torch.float32


# ---------------------------------------------------------------- loading


def check_model_dir(path: str, what: str = "model") -> None:
    """A local path must hold a config.json; anything else is taken as a hub id."""
    looks_local = os.path.isabs(path) or path.startswith((".", "~")) or os.path.exists(path) or path.count("/") != 1
    if looks_local and not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"{what} directory {path!r} has no config.json")


def load_tokenizer(path: str, trust_remote_code: bool = False):
    import baichuan  # noqa: F401  (registers the Auto classes)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def load_for_inference(
    model_path: str,
    adapter_path: str | None = None,
    device: str | int | None = None,
    trust_remote_code: bool = False,
):
    """Model and tokenizer ready to generate: a merged directory, or a base plus a LoRA adapter.

    The tokenizer comes from the adapter directory when it carries one (checkpoints do), else
    from the model directory.
    """
    import baichuan  # noqa: F401
    from transformers import AutoModelForCausalLM

    check_model_dir(model_path)
    if adapter_path is not None and not os.path.isfile(os.path.join(adapter_path, "adapter_config.json")):
        raise UserError(f"adapter directory {adapter_path!r} has no adapter_config.json")
    device, dtype = pick_device_dtype(device)
    has_tokenizer = adapter_path is not None and os.path.isfile(os.path.join(adapter_path, "tokenizer_config.json"))
    tokenizer = load_tokenizer(adapter_path if has_tokenizer else model_path, trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, trust_remote_code=trust_remote_code)
    if adapter_path is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_path)
    model.to(device).eval()
    return model, tokenizer

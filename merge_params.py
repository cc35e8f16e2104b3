"""Fold a LoRA adapter into its base model and save a plain model directory.

On a GPU (bf16, or fp16 where bf16 is missing):
    python merge_params.py --ori_model_dir baichuan-inc/Baichuan2-7B-Chat \\
        --model_dir runs/roleplay/epoch-1-step-501 --save_model_dir runs/roleplay-merged --device 0
On the CPU (fp32):
    python merge_params.py ...same flags... --device -1
As a plain Llama checkpoint, for vLLM, llama.cpp and Ollama (Baichuan2-7B only):
    python merge_params.py ...same flags... --format llama

Only one merge at a time writes a destination: a second into the same --save_model_dir stops
at once, naming the first (a lock file `.NAME.lock` beside it while the merge runs). A checkpoint of train.py is
merged only when complete: its manifest lists every file at its size (one node's copy will do
after --save_on_each_node).

The base is never loaded in 4-bit: rounding the merged weights back to 4 bits would throw most of
the adapter away. The result holds safetensors shards, the tokenizer, the generation config, the
model code files and the adapter's prompt record (roleplay.json), and is written under a
temporary name that is renamed into place when complete. The head is stored L2-normalised,
which leaves the logits unchanged (NormHead normalises at use, and unit rows stay unit rows)
and lets tools that skip the normalisation get it right.

`--format llama` writes a `LlamaForCausalLM` instead (q/k/v split out of W_pack, the head
normalised, a tokenizers-backed tokenizer with the chat template): it loads without remote
code and converts with llama.cpp's `convert_hf_to_gguf.py`. Baichuan2-13B (ALiBi) has no
Llama form and is refused.
"""

import argparse
import os

from utils.cli import HelpFormatter, UserError, exit_on_problems, exit_on_user_error
from utils.files import read_json


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--ori_model_dir", required=True, help="the base model the adapter was trained on")
    parser.add_argument("--model_dir", required=True, help="the adapter: a checkpoint directory written by train.py")
    parser.add_argument("--save_model_dir", required=True, help="where to write the merged model (must not exist)")
    parser.add_argument("--device", default="-1", help="-1 for the CPU, N for cuda:N, or 'auto'")
    parser.add_argument("--max_shard_size", default="2GB", help="largest safetensors shard")
    parser.add_argument("--format", choices=["baichuan", "llama"], default="baichuan",
                        help="baichuan: our model code travels along; llama: a plain LlamaForCausalLM for vLLM, "
                             "llama.cpp and Ollama, rotary (7B) models only")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="let transformers run code from the model directory")
    return parser.parse_args(argv)


def validate_args(args) -> list[str]:
    from utils.models import check_model_dir, pick_device_dtype

    problems = []
    try:
        check_model_dir(args.ori_model_dir, "base model")
    except UserError as error:
        problems.append(f"--ori_model_dir: {error}")
    else:
        problems += check_not_quantized(args.ori_model_dir)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not os.path.isfile(os.path.join(args.model_dir, name)):
            problems.append(f"--model_dir: {args.model_dir!r} has no {name}")
            break
    else:
        problems += check_checkpoint(args.model_dir)
    if os.path.exists(args.save_model_dir):
        problems.append(f"--save_model_dir: {args.save_model_dir!r} already exists")
    try:
        pick_device_dtype(args.device)
    except UserError as error:
        problems.append(f"--device: {error}")
    return problems


def check_checkpoint(model_dir: str) -> list[str]:
    """A checkpoint of train.py (it has a trainer state or a manifest) must be complete and undamaged;
    another adapter folder (PEFT's own save_pretrained) has neither and is taken as it is."""
    from utils.training.manifest import MANIFEST, TRAINER_STATE, checkpoint_problem

    if not any(os.path.exists(os.path.join(model_dir, name)) for name in (MANIFEST, TRAINER_STATE)):
        return []
    problem = checkpoint_problem(model_dir)
    return [f"--model_dir: {model_dir!r} is not a complete checkpoint: {problem}"] if problem else []


def lock_destination(save_model_dir: str):
    """Hold the lock of the merge into `save_model_dir` (a file beside it), and check again, now that
    no other merge can be writing it, that it does not exist."""
    from utils.lock import OutputLock

    final = os.path.abspath(save_model_dir)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    lock = OutputLock(os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.lock"),
                      f"--save_model_dir {save_model_dir!r}", "merge_params.py").acquire()
    if os.path.exists(final):
        raise UserError(f"--save_model_dir: {save_model_dir!r} already exists")
    return lock


def check_not_quantized(model_dir: str) -> list[str]:
    """A local base's config.json must be a JSON object that declares no 4/8-bit quantization."""
    config_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_path):
        return []  # a hub id
    try:
        config = read_json(config_path, "model config")
    except UserError as error:
        return [f"--ori_model_dir: {error}"]
    if not isinstance(config, dict):
        return [f"--ori_model_dir: {config_path}: must hold a JSON object"]
    quantization = config.get("quantization_config") or {}
    if isinstance(quantization, dict) and (quantization.get("load_in_4bit") or quantization.get("load_in_8bit")):
        return [(f"--ori_model_dir: {model_dir!r} is a quantized model; merge into the original bf16/fp16 "
                 "weights, since rounding the merged weights back to 4/8 bits loses the adapter")]
    return []


def adapter_error(args, error: BaseException) -> UserError:
    """A shape mismatch says which weight does not fit; anything else is a corrupt adapter."""
    from utils.models import cannot_load

    lines = str(error).strip().splitlines()
    detail = next((line.strip() for line in lines if "size mismatch" in line), None)
    if detail is None:
        return cannot_load(args.ori_model_dir, error, args.model_dir)
    return UserError(f"adapter {args.model_dir!r} does not fit base {args.ori_model_dir!r}: {detail}")


def main():
    args = parse_args()
    exit_on_problems(validate_args(args))

    from utils.cli import quiet_third_party
    from utils.files import atomic_directory

    quiet_third_party()
    lock_destination(args.save_model_dir)  # held until the process exits
    from peft import PeftModel
    from transformers import AutoConfig

    import baichuan  # noqa: F401
    from baichuan.convert_llama import check_convertible, normalize_head_, save_as_llama
    from utils.models import LOAD_ERRORS, load_base_model, load_tokenizer_for, pick_device_dtype
    from utils.prompts import read_record, write_record

    if args.format == "llama":  # before minutes of loading weights
        try:
            check_convertible(AutoConfig.from_pretrained(args.ori_model_dir, trust_remote_code=args.trust_remote_code))
        except (OSError, ValueError) as error:
            raise UserError(f"--format llama: {error}") from None
    device, dtype = pick_device_dtype(args.device)
    base = load_base_model(args.ori_model_dir, device, dtype, trust_remote_code=args.trust_remote_code)
    try:
        model = PeftModel.from_pretrained(base, args.model_dir)
    except LOAD_ERRORS as error:
        raise adapter_error(args, error) from None
    merged = model.merge_and_unload()
    tokenizer = load_tokenizer_for(args.ori_model_dir, args.model_dir, args.trust_remote_code)
    record = read_record(args.model_dir)

    with atomic_directory(args.save_model_dir) as tmp:
        if args.format == "llama":
            save_as_llama(merged, tokenizer, tmp, max_shard_size=args.max_shard_size)
        else:
            normalize_head_(merged)
            merged.save_pretrained(tmp, safe_serialization=True, max_shard_size=args.max_shard_size)
            tokenizer.save_pretrained(tmp)
        if record is not None:
            write_record(tmp, record)
    print(f"saved the merged model ({args.format} format) to {args.save_model_dir}", flush=True)


if __name__ == "__main__":
    exit_on_user_error(main)

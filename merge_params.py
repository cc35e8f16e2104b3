"""Fold a LoRA adapter into its base model and save a plain model directory.

    python merge_params.py --ori_model_dir baichuan-inc/Baichuan2-7B-Chat \
        --model_dir runs/roleplay/epoch-1-step-500 --save_model_dir runs/roleplay-merged --device 0
    python merge_params.py ... --device -1        # on the CPU (fp32)
    python merge_params.py ... --format llama     # a plain Llama checkpoint (Baichuan2-7B only)

The base is loaded in bf16/fp16 on a GPU (fp32 on the CPU), never in 4-bit: rounding the merged
weights back to 4 bits would throw most of the adapter away. The result holds safetensors
shards, the tokenizer, the generation config and the model code files, and is written under a
temporary name that is renamed into place when complete. The head is stored L2-normalised,
which leaves the logits unchanged (NormHead normalises at use, and unit rows stay unit rows).

`--format llama` writes a `LlamaForCausalLM` instead (q/k/v split out of W_pack, the head
normalised, a tokenizers-backed tokenizer with the chat template): it loads without remote
code and converts with llama.cpp's `convert_hf_to_gguf.py`. Baichuan2-13B (ALiBi) has no
Llama form and is refused.
"""

import argparse
import json
import os
import shutil

from utils import (
    UserError,
    check_model_dir,
    exit_on_user_error,
    load_tokenizer_for,
    pick_device_dtype,
    print_rank_0,
    quiet_third_party,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ori_model_dir", required=True, help="the base model the adapter was trained on")
    parser.add_argument("--model_dir", required=True, help="the adapter: a checkpoint directory written by train.py")
    parser.add_argument("--save_model_dir", required=True, help="where to write the merged model (must not exist)")
    parser.add_argument("--device", default="-1", help="-1 for the CPU, N for cuda:N, or 'auto'")
    parser.add_argument("--max_shard_size", default="2GB", help="largest safetensors shard")
    parser.add_argument(
        "--format",
        choices=["baichuan", "llama"],
        default="baichuan",
        help="baichuan: our model code travels along (load with trust_remote_code); llama: a plain "
        "LlamaForCausalLM for vLLM / llama.cpp / Ollama, rotary (7B) models only (default: %(default)s)",
    )
    parser.add_argument(
        "--trust_remote_code", action="store_true", help="let transformers run code from the model directory"
    )
    return parser.parse_args(argv)


def validate_args(args) -> list[str]:
    problems = []
    try:
        check_model_dir(args.ori_model_dir, "base model")
    except UserError as error:
        problems.append(f"--ori_model_dir: {error}")
    else:
        config_path = os.path.join(args.ori_model_dir, "config.json")
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                quantization = json.load(f).get("quantization_config") or {}
            if quantization.get("load_in_4bit") or quantization.get("load_in_8bit"):
                problems.append(
                    f"--ori_model_dir: {args.ori_model_dir!r} is a quantized model; merge into the original "
                    "bf16/fp16 weights, since rounding the merged weights back to 4/8 bits loses the adapter"
                )
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not os.path.isfile(os.path.join(args.model_dir, name)):
            problems.append(f"--model_dir: {args.model_dir!r} has no {name}")
            break
    if os.path.exists(args.save_model_dir):
        problems.append(f"--save_model_dir: {args.save_model_dir!r} already exists")
    try:
        pick_device_dtype(args.device)
    except UserError as error:
        problems.append(f"--device: {error}")
    return problems


def main():
    quiet_third_party()
    args = parse_args()
    problems = validate_args(args)
    if problems:
        raise UserError("\nerror: ".join(problems))

    import baichuan  # noqa: F401
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    from baichuan.convert_llama import check_convertible, normalize_head_, save_as_llama

    if args.format == "llama":  # before minutes of loading weights
        try:
            check_convertible(AutoConfig.from_pretrained(args.ori_model_dir, trust_remote_code=args.trust_remote_code))
        except ValueError as error:
            raise UserError(f"--format llama: {error}") from None
    device, dtype = pick_device_dtype(args.device)
    print_rank_0(f"loading {args.ori_model_dir} in {dtype} on {device}")
    base = AutoModelForCausalLM.from_pretrained(
        args.ori_model_dir, dtype=dtype, device_map={"": device}, trust_remote_code=args.trust_remote_code
    )
    try:
        model = PeftModel.from_pretrained(base, args.model_dir)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        detail = next((line.strip() for line in first if "size mismatch" in line), first[0] if first else "")
        raise UserError(f"adapter {args.model_dir!r} does not fit base {args.ori_model_dir!r}: {detail}") from None
    merged = model.merge_and_unload()

    tokenizer = load_tokenizer_for(args.ori_model_dir, args.model_dir, args.trust_remote_code)
    parent = os.path.dirname(os.path.abspath(args.save_model_dir))
    tmp = os.path.join(parent, f".tmp-{os.path.basename(os.path.abspath(args.save_model_dir))}")
    shutil.rmtree(tmp, ignore_errors=True)
    if args.format == "llama":
        save_as_llama(merged, tokenizer, tmp, max_shard_size=args.max_shard_size)
    else:
        normalize_head_(merged)
        merged.save_pretrained(tmp, safe_serialization=True, max_shard_size=args.max_shard_size)
        tokenizer.save_pretrained(tmp)
    # safetensors 0.8 creates its files 0600; give every file the permissions the umask allows
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(tmp):
        os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
    os.replace(tmp, args.save_model_dir)
    print_rank_0(f"saved the merged model ({args.format} format) to {args.save_model_dir}")


if __name__ == "__main__":
    exit_on_user_error(main)

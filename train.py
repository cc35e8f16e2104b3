"""QLoRA fine-tuning of Baichuan2 on role-play samples, under DeepSpeed.

One GPU (or the CPU, where the tests run; a single process needs no launcher):
    python train.py --model_name_or_path baichuan-inc/Baichuan2-7B-Chat \
        --train_path data/train.jsonl --test_path data/test.jsonl --output_dir runs/roleplay \
        --max_len 512 --per_device_train_batch_size 2 --gradient_accumulation_steps 4 --gradient_checkpointing
Several GPUs:
    deepspeed --num_gpus 2 train.py ...same flags...
    CUDA_VISIBLE_DEVICES=0,1 deepspeed train.py ...same flags...
    torchrun --nproc_per_node 2 train.py ...same flags...
Resume after a stop (the newest complete checkpoint, or a given one):
    python train.py ...same flags... --resume_from_checkpoint latest
Check the size of a run without weights or data:
    python train.py --model_name_or_path DIR_WITH_CONFIG_JSON --dry_run --lora_dim 16

The model loads in 4-bit NF4 with double quantisation, LoRA goes on every linear layer but
lm_head, and only the reply (and eos) of each sample is trained on. Every `--save_model_step`
optimizer steps and at each epoch's end, the test loss is computed and a self-contained
checkpoint `output_dir/epoch-E-step-S/` is written: adapter, tokenizer, the resolved arguments,
the prompt template, and the state needed to resume exactly.
"""

import argparse
import json
import math
import os
import random
import shutil
import socket
import time

import torch
import torch.distributed as dist

from utils import (
    TMP_PREFIX,
    UserError,
    check_model_dir,
    collate,
    evaluate,
    exit_on_user_error,
    find_all_linear_names,
    is_main_process,
    length_grouped_batches,
    list_checkpoints,
    PackedDataset,
    pick_device_dtype,
    print_rank_0,
    print_trainable_parameters,
    quiet_deepspeed,
    quiet_third_party,
    sample_counts,
    RolePlayDataset,
    stall_point,
    write_json,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--train_path", help="training samples, jsonl from data_helper.py")
    data.add_argument("--test_path", help="test samples, jsonl from data_helper.py (no evaluation if omitted)")
    data.add_argument("--max_len", type=int, default=1024, help="most tokens in one sample (prompt + reply + eos)")
    data.add_argument("--max_src_len", type=int, default=256, help="most tokens of the question; longer ones are cut")
    data.add_argument("--is_skip", action="store_true", help="drop samples that had to be cut instead of keeping them")
    data.add_argument(
        "--packing",
        action="store_true",
        help="pack samples of one role into max_len rows that hold its system prompt once; each sample "
        "attends to the prompt and itself only. A batch then counts rows: on RoleBench a 512-token row holds "
        "about 7 samples, so lower the batch size or the accumulation steps to keep the samples per step",
    )
    model = parser.add_argument_group("model")
    model.add_argument("--model_name_or_path", help="base model: a local directory or a hub id")
    model.add_argument(
        "--quantization_bit", type=int, choices=[4, 16], default=4, help="4: QLoRA on an NF4 base; 16: plain LoRA"
    )
    model.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations to save memory")
    model.add_argument(
        "--trust_remote_code", action="store_true", help="let transformers run code from the model directory"
    )
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--lora_dim", type=int, default=8, help="LoRA rank (the inner width of each low-rank update)")
    lora.add_argument("--lora_alpha", type=float, default=30, help="LoRA scale numerator (scale = alpha / rank)")
    lora.add_argument("--lora_dropout", type=float, default=0.1, help="dropout on the LoRA input")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--per_device_train_batch_size", type=int, default=16, help="micro-batch per process")
    optim.add_argument("--per_device_eval_batch_size", type=int, default=None, help="defaults to the train batch")
    optim.add_argument("--learning_rate", type=float, default=1e-3, help="peak learning rate")
    optim.add_argument("--weight_decay", type=float, default=0.1, help="AdamW weight decay on the LoRA weights")
    optim.add_argument("--num_train_epochs", type=int, default=1, help="passes over the training set")
    optim.add_argument("--max_steps", type=int, default=-1, help="stop after this many optimizer steps (-1: no limit)")
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    optim.add_argument("--warmup_ratio", type=float, default=0.1, help="share of the steps spent warming up")
    optim.add_argument("--seed", type=int, default=1234, help="seed of the data order, LoRA init and dropout")
    dist_group = parser.add_argument_group("distributed")
    dist_group.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    dist_group.add_argument("--ds_file", default="ds_config.json", help="DeepSpeed config; 'auto' values are filled in")
    out = parser.add_argument_group("logging and checkpoints")
    out.add_argument("--output_dir", help="where checkpoints and TensorBoard logs go")
    out.add_argument("--show_loss_step", type=int, default=10, help="log the loss every this many optimizer steps")
    out.add_argument(
        "--save_model_step", type=int, default=None, help="evaluate and save every this many steps (and at epoch end)"
    )
    out.add_argument(
        "--resume_from_checkpoint", help="a checkpoint directory, or 'latest' for the newest complete one in output_dir"
    )
    out.add_argument("--dry_run", action="store_true", help="print parameter counts and a memory estimate, then stop")
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def validate_args(args) -> list[str]:
    """Every problem with the arguments, so that all of them are reported at once."""
    problems = []
    if not args.model_name_or_path:
        problems.append("--model_name_or_path is required")
    else:
        try:
            check_model_dir(args.model_name_or_path)
        except UserError as error:
            problems.append(f"--model_name_or_path: {error}")
    for name in ("max_len", "max_src_len", "per_device_train_batch_size", "num_train_epochs", "lora_dim"):
        if getattr(args, name) < 1:
            problems.append(f"--{name} must be at least 1")
    for name in ("gradient_accumulation_steps", "show_loss_step"):
        if getattr(args, name) < 1:
            problems.append(f"--{name} must be at least 1")
    if args.max_src_len >= args.max_len:
        problems.append(f"--max_src_len ({args.max_src_len}) must be smaller than --max_len ({args.max_len})")
    if args.per_device_eval_batch_size is not None and args.per_device_eval_batch_size < 1:
        problems.append("--per_device_eval_batch_size must be at least 1")
    if args.save_model_step is not None and args.save_model_step < 1:
        problems.append("--save_model_step must be at least 1")
    if not args.learning_rate > 0:
        problems.append("--learning_rate must be positive")
    if args.weight_decay < 0:
        problems.append("--weight_decay must not be negative")
    if not 0 <= args.warmup_ratio < 1:
        problems.append("--warmup_ratio must be in [0, 1)")
    if not 0 <= args.lora_dropout < 1:
        problems.append("--lora_dropout must be in [0, 1)")
    if args.dry_run:
        return problems
    if not args.train_path:
        problems.append("--train_path is required")
    elif not os.path.isfile(args.train_path):
        problems.append(f"--train_path: {args.train_path!r} does not exist")
    if args.test_path and not os.path.isfile(args.test_path):
        problems.append(f"--test_path: {args.test_path!r} does not exist")
    try:
        _, dtype = pick_device_dtype()
        fill_ds_config(read_ds_config(args.ds_file), args, 1, dtype, total_steps=1)
    except UserError as error:
        problems.append(f"--ds_file: {error}")
    if not args.output_dir:
        problems.append("--output_dir is required")
    else:
        problems += check_output_dir(args.output_dir, args.resume_from_checkpoint)
    return problems


def check_output_dir(output_dir: str, resume: str | None) -> list[str]:
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        return [f"--output_dir: {output_dir!r} is a file"]
    if not os.path.isdir(output_dir):
        return [f"--resume_from_checkpoint latest: {output_dir!r} does not exist"] if resume == "latest" else []
    ours = [n for n in os.listdir(output_dir) if n == "tensorboard" or n.startswith(("epoch-", TMP_PREFIX))]
    foreign = sorted(set(os.listdir(output_dir)) - set(ours))
    if foreign:
        return [f"--output_dir: {output_dir!r} holds files that are not this project's checkpoints ({foreign[0]})"]
    checkpoints = list_checkpoints(output_dir)
    if resume == "latest" and not checkpoints:
        return [f"--resume_from_checkpoint latest: no complete checkpoint in {output_dir!r}"]
    if resume and resume != "latest" and not os.path.isfile(os.path.join(resume, "trainer_state.json")):
        return [f"--resume_from_checkpoint: {resume!r} is not a complete checkpoint"]
    if checkpoints and not resume:
        return [f"--output_dir: {output_dir!r} already holds checkpoints; pass --resume_from_checkpoint latest"]
    return []


def read_ds_config(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except OSError as error:
        raise UserError(f"cannot read {path!r} ({error.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path!r} is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path!r} must hold a JSON object")
    return config


def fill_ds_config(config: dict, args, world_size: int, dtype, total_steps: int) -> dict:
    """Replace the 'auto' values of the DeepSpeed config with ones derived from the arguments."""

    def fill(section: dict, values: dict):
        for key, value in values.items():
            if section.get(key, "auto") == "auto":
                section[key] = value

    config = json.loads(json.dumps(config))
    fill(
        config,
        {
            "train_micro_batch_size_per_gpu": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "train_batch_size": args.per_device_train_batch_size * world_size * args.gradient_accumulation_steps,
            "gradient_clipping": 1.0,
        },
    )
    optimizer = config.setdefault("optimizer", {"type": "AdamW"}).setdefault("params", {})
    fill(optimizer, {"lr": args.learning_rate, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": args.weight_decay})
    # torch's AdamW: DeepSpeed's FusedAdam would first be compiled (over a minute on the CPU, and
    # nvcc needed on a GPU), for no gain on a few million LoRA weights.
    optimizer["torch_adam"] = True
    warmup = math.ceil(args.warmup_ratio * total_steps)
    scheduler = config.get("scheduler")
    if scheduler:
        params = scheduler.setdefault("params", {})
        if scheduler.get("type") == "WarmupCosineLR":
            fill(params, {"total_num_steps": total_steps, "warmup_num_steps": warmup, "cos_min_ratio": 0.1})
        else:
            fill(
                params,
                {
                    "total_num_steps": total_steps,
                    "warmup_num_steps": warmup,
                    "warmup_min_lr": 0.1 * args.learning_rate,
                    "warmup_max_lr": args.learning_rate,
                },
            )
    for key, wanted in (("bf16", dtype == torch.bfloat16), ("fp16", dtype == torch.float16)):
        section = config.setdefault(key, {"enabled": False})
        if section.get("enabled") == "auto":
            section["enabled"] = wanted
        if section["enabled"] and not wanted:
            raise UserError(f"{args.ds_file}: {key} is enabled, but this machine computes in {dtype}")
    config.setdefault("steps_per_print", 10**9)
    return config


def setup_distributed(args):
    """Rank, world size and device; starts the process group (gloo on the CPU)."""
    import deepspeed

    # A bare `python train.py` has no launcher; deepspeed.initialize would then look for MPI.
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            free_port = s.getsockname()[1]
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK=str(max(args.local_rank, 0)), MASTER_ADDR="127.0.0.1"
        )
        os.environ.setdefault("MASTER_PORT", str(free_port))
    local_rank = int(os.environ.get("LOCAL_RANK", max(args.local_rank, 0)))
    device, dtype = pick_device_dtype(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device, dtype


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def load_model(args, device, dtype):
    """The base model (4-bit NF4 unless --quantization_bit 16), frozen, with LoRA on top."""
    import baichuan  # noqa: F401
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = None
    if args.quantization_bit == 4:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    model = AutoModelForCausalLM.from_pretrained(
        args.model_name_or_path,
        dtype=dtype,
        quantization_config=quantization,
        device_map={"": device},
        trust_remote_code=args.trust_remote_code,
    )
    for module in model.modules():
        # bitsandbytes repacks 4-bit weights for fast CPU inference after any no-grad eval-mode
        # forward, and the LoRA gradients are wrong from then on: keep the training layout.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    model.requires_grad_(False)
    model.config.use_cache = False
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(
        r=args.lora_dim,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=find_all_linear_names(model),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def dry_run(args) -> None:
    """Parameter counts and a rough per-GPU memory estimate, from the config alone."""
    import baichuan  # noqa: F401
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=args.trust_remote_code)
    model.requires_grad_(False)
    lora = LoraConfig(r=args.lora_dim, lora_alpha=args.lora_alpha, target_modules=find_all_linear_names(model))
    model = get_peft_model(model, lora)
    four_bit = args.quantization_bit == 4
    print_trainable_parameters(model, assume_4bit=four_bit)

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    linear = sum(
        m.weight.numel()
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head") and not m.weight.requires_grad
    )
    other = sum(p.numel() for p in model.parameters() if not p.requires_grad) - linear
    # NF4 with double quantisation: 4 bits per weight plus about 0.127 bits of scales.
    weights = linear * (0.5 + 0.127 / 8 if four_bit else 2) + other * 2
    lora_state = trainable * (2 + 2 + 4 + 8)  # bf16 weight and grad, fp32 master, Adam moments
    b, s, h, i = args.per_device_train_batch_size, args.max_len, config.hidden_size, config.intermediate_size
    layer_acts = b * s * (10 * h + 4 * i) * 2  # bf16 inputs kept for backward in one layer
    if args.gradient_checkpointing:
        acts = config.num_hidden_layers * b * s * h * 2 + layer_acts
    else:
        acts = config.num_hidden_layers * layer_acts
    loss_chunk = 3 * (2**25) * 4  # chunked loss: one fp32 logits chunk, its softmax and grad
    buckets = 2 * 5e7 * 2  # ZeRO-2's two gradient buckets of ds_config.json's size, in bf16
    total = weights + lora_state + acts + loss_chunk + buckets
    gib = 2**30
    print(
        f"estimated GPU memory per device: {total / gib:.1f} GiB "
        f"(weights {weights / gib:.1f}, LoRA + optimizer {lora_state / gib:.2f}, "
        f"activations {acts / gib:.1f}, loss {loss_chunk / gib:.1f}, DeepSpeed buckets {buckets / gib:.1f}; "
        f"batch {b} x {s}, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'})"
    )


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


def save_checkpoint(args, engine, model, tokenizer, prompt: dict, trainer_state: dict) -> str:
    """Write epoch-E-step-S under a temporary name, then rename it into place.

    Each rank writes its optimizer partition; rank 0 writes the adapter, tokenizer, arguments,
    prompt template, and trainer_state.json last: a directory without it is incomplete.
    """
    from safetensors.torch import save_file

    name = f"epoch-{trainer_state['epoch'] + 1}-step-{trainer_state['global_step']}"
    final = os.path.join(args.output_dir, name)
    tmp = os.path.join(args.output_dir, TMP_PREFIX + name)
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
        write_json(os.path.join(tmp, "train_args.json"), vars(args))
        write_json(os.path.join(tmp, "prompt_template.json"), prompt)
        stall_point("save")
        write_json(os.path.join(tmp, "trainer_state.json"), trainer_state)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    dist.barrier()
    return final


def resume(args, engine, checkpoint: str, world_size: int) -> dict:
    """Load optimizer, scheduler and RNG state; the adapter weights were loaded before."""
    from safetensors.torch import load_file

    with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as f:
        state = json.load(f)
    if state["world_size"] != world_size:
        raise UserError(f"{checkpoint} was written by {state['world_size']} processes; resume with as many")
    rank = dist.get_rank()
    with open(os.path.join(checkpoint, f"optimizer-rank{rank}.json"), encoding="utf-8") as f:
        rest = json.load(f)
    load_optimizer_state(engine, load_file(os.path.join(checkpoint, f"optimizer-rank{rank}.safetensors")), rest)
    if engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(state["scheduler"])
    engine.global_steps = state["global_step"]
    engine.micro_steps = state["global_step"] * args.gradient_accumulation_steps
    return state


def load_data(args, tokenizer, user_id: int, assistant_id: int, rank: int, world_size: int):
    """The training rows (packed with --packing) and this rank's share of the test set, batched
    by length so that evaluation pads little."""

    def load(path):
        return RolePlayDataset(
            path, tokenizer, user_id, assistant_id, args.max_len, args.max_src_len, skip_truncated=args.is_skip
        )

    train_set = load(args.train_path)
    print_rank_0(f"train: {len(train_set)} samples ({train_set.truncated} cut to fit, {train_set.dropped} dropped)")
    if args.packing:
        train_set = PackedDataset(train_set, args.max_len)
        print_rank_0(f"packed into {len(train_set)} rows of at most {args.max_len} tokens")
    test_batches = []
    if args.test_path:
        test_set = load(args.test_path)
        mine = sorted(range(rank, len(test_set), world_size), key=lambda i: len(test_set[i]["input_ids"]))
        size = args.per_device_eval_batch_size
        test_batches = [
            collate([test_set[i] for i in mine[j : j + size]], tokenizer.pad_token_id) for j in range(0, len(mine), size)
        ]
    return train_set, test_batches


def main():
    quiet_third_party()
    args = parse_args()
    problems = validate_args(args)
    if problems:
        raise UserError("\nerror: ".join(problems))
    if args.dry_run:
        dry_run(args)
        return
    if args.per_device_eval_batch_size is None:
        args.per_device_eval_batch_size = args.per_device_train_batch_size
    if args.resume_from_checkpoint == "latest":
        args.resume_from_checkpoint = list_checkpoints(args.output_dir)[-1]

    # ---- setup
    import deepspeed
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm
    from transformers import GenerationConfig

    from baichuan.generation_utils import chat_template, chat_token_ids
    from utils import load_tokenizer

    rank, world_size, device, dtype = setup_distributed(args)
    quiet_deepspeed()
    seed_everything(args.seed)
    print_rank_0(f"world size {world_size}, device {device}, dtype {dtype}")

    # ---- data
    tokenizer = load_tokenizer(args.model_name_or_path, args.trust_remote_code)
    generation_config = GenerationConfig.from_pretrained(args.model_name_or_path)
    user_id, assistant_id = chat_token_ids(generation_config)
    tokenizer.chat_template = chat_template(tokenizer, generation_config)
    train_set, test_batches = load_data(args, tokenizer, user_id, assistant_id, rank, world_size)
    lengths = train_set.lengths()
    gas = args.gradient_accumulation_steps
    micro_per_epoch = len(length_grouped_batches(lengths, args.per_device_train_batch_size, args.seed, 0, world_size))
    steps_per_epoch = micro_per_epoch // gas
    if steps_per_epoch == 0:
        raise UserError(
            f"{args.train_path}: {len(train_set)} rows make no full optimizer step "
            f"(batch {args.per_device_train_batch_size} x {world_size} processes x {gas} accumulation)"
        )
    total_steps = steps_per_epoch * args.num_train_epochs
    if args.max_steps > 0:
        total_steps = min(total_steps, args.max_steps)

    # ---- model
    model = load_model(args, device, dtype)
    if args.resume_from_checkpoint:
        weights = load_file(os.path.join(args.resume_from_checkpoint, "adapter_model.safetensors"))
        set_peft_model_state_dict(model, weights)
    if rank == 0:
        print_trainable_parameters(model)

    # ---- optimizer
    ds_config = fill_ds_config(read_ds_config(args.ds_file), args, world_size, dtype, total_steps)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config
    )
    # DeepSpeed's schedulers start before iteration 0 (at lr 0) and the engine advances them after
    # each optimizer step, so the first two steps would both run at lr 0. Start them at iteration 0,
    # as transformers' schedulers do; a resumed run then loads the saved position over it.
    if scheduler is not None and getattr(scheduler, "last_batch_iteration", None) == -1:
        scheduler.step()
    state = {"global_step": 0, "epoch": 0, "step_in_epoch": 0}
    if args.resume_from_checkpoint:
        state = resume(args, engine, args.resume_from_checkpoint, world_size)
        print_rank_0(f"resumed from {args.resume_from_checkpoint} at step {state['global_step']}")
    prompt = {
        "user_token_id": user_id,
        "assistant_token_id": assistant_id,
        "chat_template": tokenizer.chat_template,
        "layout": "system + <user> + question + <assistant> + reply + eos; loss on reply + eos",
    }

    writer = SummaryWriter(os.path.join(args.output_dir, "tensorboard")) if rank == 0 else None

    def checkpoint(epoch, step_in_epoch):
        eval_loss, ppl = evaluate(engine, test_batches, device) if test_batches else (None, None)
        if eval_loss is not None:
            print_rank_0(f"eval step={global_step} loss={eval_loss:.8f} ppl={ppl:.4f}")
            if writer:
                writer.add_scalar("ppl", ppl, global_step)
                writer.add_scalar("eval_loss", eval_loss, global_step)
        trainer_state = {
            "global_step": global_step,
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "steps_per_epoch": steps_per_epoch,
            "world_size": world_size,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "eval_loss": eval_loss,
            "ppl": ppl,
        }
        path = save_checkpoint(args, engine, model, tokenizer, prompt, trainer_state)
        print_rank_0(f"saved {path}")

    # ---- loop
    global_step = state["global_step"]
    progress = tqdm(total=total_steps, initial=global_step, disable=rank != 0, dynamic_ncols=True)
    # (loss sum, micro-batches, samples, their tokens); a shared prompt counts once per sample that
    # uses it, so tokens/s means the same with and without --packing
    window = torch.zeros(4, dtype=torch.float64, device=device)
    window_start = time.perf_counter()
    engine.train()
    start_epoch, skip = state["epoch"], state["step_in_epoch"] * gas
    if state["step_in_epoch"] == steps_per_epoch:
        start_epoch, skip = start_epoch + 1, 0
    for epoch in range(start_epoch, args.num_train_epochs):
        batches = length_grouped_batches(lengths, args.per_device_train_batch_size, args.seed, epoch, world_size, rank)
        batches = batches[: steps_per_epoch * gas]
        for micro, indices in enumerate(batches):
            if epoch == start_epoch and micro < skip:
                continue
            items = [train_set[i] for i in indices]
            batch = {k: v.to(device) for k, v in collate(items, tokenizer.pad_token_id).items()}
            loss = engine(**batch).loss
            engine.backward(loss)
            stall_point("step")
            lr = engine.get_lr()[0]  # the rate this step uses
            engine.step()
            samples, tokens = sample_counts(items)
            counts = torch.tensor([1.0, samples, tokens], dtype=torch.float64, device=device)
            window += torch.cat([loss.detach().double()[None], counts])
            if (micro + 1) % gas:
                continue
            global_step += 1
            progress.update(1)
            if global_step % args.show_loss_step == 0:
                dist.all_reduce(window)
                seconds = time.perf_counter() - window_start
                mean_loss = (window[0] / window[1]).item()
                samples_per_s, tokens_per_s = window[2].item() / seconds, window[3].item() / seconds
                progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}")
                if rank == 0:
                    progress.write(f"step={global_step} loss={mean_loss:.8f} lr={lr:.6e} tokens/s={tokens_per_s:.1f} "
                                   f"samples/s={samples_per_s:.2f}")
                if writer:
                    writer.add_scalar("train_loss", mean_loss, global_step)
                    writer.add_scalar("lr", lr, global_step)
                    writer.add_scalar("tokens_per_s", tokens_per_s, global_step)
                    writer.add_scalar("samples_per_s", samples_per_s, global_step)
                window.zero_()
                window_start = time.perf_counter()
            done = global_step >= total_steps
            if done or (micro + 1) == len(batches) or (args.save_model_step and global_step % args.save_model_step == 0):
                checkpoint(epoch, (micro + 1) // gas)
            if done:
                break
        if global_step >= total_steps:
            break
    progress.close()
    if writer:
        writer.close()
    dist.barrier()


if __name__ == "__main__":
    exit_on_user_error(main)

"""QLoRA fine-tuning of Baichuan2 on role-play samples, under DeepSpeed.

One GPU (or the CPU, where the tests run; a single process needs no launcher):
    python train.py --model_name_or_path baichuan-inc/Baichuan2-7B-Chat \\
        --train_path data/train.jsonl --test_path data/test.jsonl --output_dir runs/roleplay \\
        --max_len 512 --max_src_len 256 --per_device_train_batch_size 2 --gradient_accumulation_steps 8 \\
        --learning_rate 1e-3 --num_train_epochs 1 --lora_dim 16 --gradient_checkpointing --save_model_step 200
Several GPUs:
    deepspeed --num_gpus 2 train.py ...same flags...
    CUDA_VISIBLE_DEVICES=0,1 deepspeed train.py ...same flags...
    torchrun --nproc_per_node 2 train.py ...same flags...
Resume after a crash or a stop (the complete checkpoint written last, or a given one), with the
same processes, batch size, accumulation and data:
    python train.py ...same flags... --resume_from_checkpoint latest
Stop: Ctrl-C (SIGINT) or SIGTERM finishes the optimizer step, saves a checkpoint and prints the
command that resumes; a second Ctrl-C stops at once, without saving.
The size of a run, from a config.json alone (no weights, no data):
    python train.py --model_name_or_path DIR_WITH_CONFIG_JSON --dry_run --lora_dim 16

Several files, and multi-turn conversations (OpenAI `messages` or ShareGPT `conversations` rows,
beside data_helper.py's single-turn rows; utils/data.py):
    python train.py ...same flags... --train_path data/train.jsonl my_chats.jsonl

The model loads in 4-bit NF4 with double quantisation, LoRA goes on every linear layer but
lm_head, and only the replies and their ends are trained on (every reply of a conversation). Every `--save_model_step` optimizer steps
and at each epoch's end, the test loss is computed and a self-contained checkpoint
`output_dir/epoch-E-step-S/` is written: adapter, tokenizer, the resolved arguments, the prompt
record (roleplay.json: the roles and exact system prompts trained on), and the state needed to
resume exactly (utils.training). `output_dir/best` links to the one with the lowest test loss;
`--save_total_limit` deletes all but the few written last and that one.

An optimizer step's gradient is that of the summed loss of its labelled tokens, over all its
micro-batches and processes, divided by their number: micro-batches weigh by their tokens.
"""

import argparse
import os
import sys
import time

from utils import HelpFormatter, TMP_PREFIX, UserError, exit_on_problems, exit_on_user_error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--train_path", nargs="+", metavar="FILE",
                      help="training samples, one or more jsonl files: data_helper.py's, or rows of "
                           "instruction/input/output, OpenAI messages or ShareGPT conversations, mixed (required)")
    data.add_argument("--test_path", nargs="+", metavar="FILE",
                      help="test samples, the same shapes (no evaluation if omitted)")
    data.add_argument("--prompts_file", help="data_helper.py's prompts.json, recorded in the checkpoints "
                                             "(default: prompts.json beside the first --train_path, when there)")
    data.add_argument("--max_len", type=int, default=1024,
                      help="most tokens in one sample (prompt + reply + eos); of a longer conversation the system "
                           "prompt and the newest whole rounds that fit are kept")
    data.add_argument("--max_src_len", type=int, default=256,
                      help="most tokens of a question (each user turn); longer ones are cut")
    data.add_argument("--is_skip", action="store_true", help="drop samples that had to be cut instead of keeping them")
    data.add_argument(
        "--packing", action="store_true",
        help="pack samples of one role into max_len rows that hold its system prompt once; each sample "
        "attends to the prompt and itself only. A batch then counts rows: on RoleBench a 512-token row holds "
        "about 7 samples, so lower the batch size or the accumulation steps to keep the samples per step")
    model = parser.add_argument_group("model")
    model.add_argument("--model_name_or_path", help="base model: a local directory or a hub id (required)")
    model.add_argument("--quantization_bit", type=int, choices=[4, 16], default=4,
                       help="4: QLoRA on an NF4 base; 16: plain LoRA")
    model.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations to save memory")
    model.add_argument("--trust_remote_code", action="store_true",
                       help="let transformers run code from the model directory")
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--lora_dim", type=int, default=8, help="LoRA rank (the inner width of each low-rank update)")
    lora.add_argument("--lora_alpha", type=float, default=30, help="LoRA scale numerator (scale = alpha / rank)")
    lora.add_argument("--lora_dropout", type=float, default=0.1, help="dropout on the LoRA input")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--per_device_train_batch_size", type=int, default=16, help="micro-batch per process")
    optim.add_argument("--per_device_eval_batch_size", type=int, default=None,
                       help="test micro-batch per process (default: the train batch)")
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
    out.add_argument("--output_dir", help="where checkpoints and TensorBoard logs go (required)")
    out.add_argument("--show_loss_step", type=int, default=10, help="log the loss every this many optimizer steps")
    out.add_argument("--save_model_step", type=int, default=None,
                     help="evaluate and save every this many steps (default: at each epoch's end only)")
    out.add_argument("--save_total_limit", type=int, default=None,
                     help="keep only the N checkpoints written last, plus the best by test loss (default: keep all)")
    out.add_argument("--save_on_each_node", action="store_true",
                     help="several machines whose --output_dir is not one shared folder: each node keeps a full copy "
                          "of every checkpoint on its own disk (its own ranks' optimizer partitions), and resumes "
                          "from it; without it, such a run stops at start-up")
    out.add_argument("--resume_from_checkpoint",
                     help="a checkpoint directory, or 'latest' for the complete one written last in output_dir")
    out.add_argument("--dry_run", action="store_true",
                     help="print parameter counts and a memory estimate, then stop (needs only the model's config)")
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def validate_args(args) -> list[str]:
    """Every problem with the arguments, so that all of them are reported at once."""
    from utils.models import check_model_dir

    problems = []
    if not args.model_name_or_path:
        problems.append("--model_name_or_path is required")
    else:
        try:
            check_model_dir(args.model_name_or_path)
        except UserError as error:
            problems.append(f"--model_name_or_path: {error}")
    for name in ("max_len", "max_src_len", "per_device_train_batch_size", "num_train_epochs", "lora_dim",
                 "gradient_accumulation_steps", "show_loss_step", "per_device_eval_batch_size", "save_model_step",
                 "save_total_limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            problems.append(f"--{name} must be at least 1, got {value}")
    if args.max_src_len >= args.max_len:
        problems.append(f"--max_src_len ({args.max_src_len}) must be smaller than --max_len ({args.max_len})")
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
    for flag, paths in (("--train_path", args.train_path), ("--test_path", args.test_path),
                        ("--prompts_file", [args.prompts_file] if args.prompts_file else None)):
        problems += [f"{flag}: {path!r} does not exist" for path in paths or [] if not os.path.isfile(path)]
    problems += check_ds_file(args)
    if not args.output_dir:
        problems.append("--output_dir is required")
    else:
        problems += check_output_dir(args.output_dir, args.resume_from_checkpoint)
    return problems


def check_ds_file(args) -> list[str]:
    import torch

    from utils.training.deepspeed_config import fill_ds_config, read_ds_config

    dtype = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else (
        torch.float16 if torch.cuda.is_available() else torch.float32)
    try:
        fill_ds_config(read_ds_config(args.ds_file), args, 1, dtype, total_steps=1)
    except UserError as error:
        return [f"--ds_file: {error}"]
    return []


def check_output_dir(output_dir: str, resume: str | None) -> list[str]:
    """What this process sees of --output_dir (with --save_on_each_node, its own node's copy)."""
    from utils.lock import LOCK_FILE, check_not_locked
    from utils.training.checkpoints import BEST
    from utils.training.manifest import checkpoint_problem, scan_checkpoints

    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        return [f"--output_dir: {output_dir!r} is a file"]
    if not os.path.isdir(output_dir):
        return [f"--resume_from_checkpoint latest: {output_dir!r} does not exist"] if resume == "latest" else []
    locked = check_not_locked(os.path.join(output_dir, LOCK_FILE), f"--output_dir {output_dir!r}")
    if locked:
        return [locked]
    ours = [n for n in os.listdir(output_dir)
            if n in ("tensorboard", BEST, LOCK_FILE) or n.startswith(("epoch-", TMP_PREFIX))]
    foreign = sorted(set(os.listdir(output_dir)) - set(ours))
    if foreign:
        return [f"--output_dir: {output_dir!r} holds files that are not this project's checkpoints ({foreign[0]})"]
    checkpoints, damaged = scan_checkpoints(output_dir)
    if resume == "latest" and not checkpoints:
        return [f"--resume_from_checkpoint latest: no complete checkpoint in {output_dir!r}"
                + (f" ({len(damaged)} damaged or incomplete: {', '.join(sorted(damaged))})" if damaged else "")]
    problem = checkpoint_problem(resume) if resume and resume != "latest" else None
    if problem:
        return [f"--resume_from_checkpoint: {resume!r} is not a complete checkpoint: {problem}"]
    if (checkpoints or damaged) and not resume:
        return [f"--output_dir: {output_dir!r} already holds checkpoints; pass --resume_from_checkpoint latest"]
    return []


def dry_run(args) -> None:
    """Parameter counts and a rough per-GPU memory estimate, from the config alone."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    import baichuan  # noqa: F401
    from utils.training.deepspeed_config import read_ds_config
    from utils.training.sizes import memory_estimate, print_trainable_parameters

    config = AutoConfig.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=args.trust_remote_code)
    model = get_peft_model(model, LoraConfig(r=args.lora_dim, lora_alpha=args.lora_alpha, target_modules="all-linear"))
    print_trainable_parameters(model, assume_4bit=args.quantization_bit == 4)
    parts = memory_estimate(model, config, args, read_ds_config(args.ds_file))
    gib = 2**30
    print(f"estimated GPU memory per device: {sum(parts.values()) / gib:.1f} GiB ("
          + ", ".join(f"{name} {size / gib:.2f}" for name, size in parts.items())
          + f"; batch {args.per_device_train_batch_size} x {args.max_len}, "
          f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'})")


def load_data(args, rows: dict, tokenizer, user_id: int, assistant_id: int, rank: int, world_size: int):
    """The training samples (packed with --packing), and this rank's share of the test set in batches
    sorted by length, so that evaluation pads little. `rows`: the rows of --train_path and --test_path."""
    from utils.data import PackedDataset, RolePlayDataset, collate
    from utils.training.distributed import print_rank_0

    def load(split):
        return RolePlayDataset(rows[split], tokenizer, user_id, assistant_id, args.max_len, args.max_src_len,
                               skip_truncated=args.is_skip, source=", ".join(getattr(args, f"{split}_path")))

    train_set = load("train")
    roles = train_set.roles
    print_rank_0(f"train: {len(train_set)} samples ({train_set.summary()})")
    if args.packing:
        train_set = PackedDataset(train_set, args.max_len)
        print_rank_0(f"packed into {len(train_set)} rows of at most {args.max_len} tokens")
    test_batches = []
    if args.test_path:
        test_set = load("test")
        mine = sorted(range(rank, len(test_set), world_size), key=lambda i: len(test_set[i]["input_ids"]))
        size = args.per_device_eval_batch_size
        test_batches = [collate([test_set[i] for i in mine[j : j + size]], tokenizer.pad_token_id)
                        for j in range(0, len(mine), size)]
    return train_set, roles, test_batches


def prompt_record(args, roles, tokenizer, user_id, assistant_id) -> dict:
    """What the checkpoints record of the prompts: the roles trained on, with their exact system
    prompts (from the samples), and the template of data_helper.py's prompts.json when there."""
    from utils import read_json
    from utils.prompts import PROMPTS_FILE, SYSTEM_TEMPLATE, make_record
    from utils.training.distributed import print_rank_0

    path = args.prompts_file or os.path.join(os.path.dirname(os.path.abspath(args.train_path[0])), PROMPTS_FILE)
    template = SYSTEM_TEMPLATE
    if os.path.isfile(path):
        template = read_json(path, "prompts file").get("system_template", SYSTEM_TEMPLATE)
        print_rank_0(f"prompt record: {len(roles)} roles from {', '.join(args.train_path)}, the template of {path}")
    return make_record(roles, template, user_id, assistant_id, tokenizer.chat_template)


def count_steps(args, train_set, world_size: int) -> tuple[int, int]:
    """(optimizer steps per epoch, steps of the whole run)."""
    from utils.data import length_grouped_batches

    gas = args.gradient_accumulation_steps
    batches = length_grouped_batches(train_set.lengths(), args.per_device_train_batch_size, args.seed, 0, world_size)
    steps_per_epoch = len(batches) // gas
    if steps_per_epoch == 0:
        raise UserError(f"{', '.join(args.train_path)}: {len(train_set)} rows make no full optimizer step "
                        f"(batch {args.per_device_train_batch_size} x {world_size} processes x {gas} accumulation)")
    total_steps = steps_per_epoch * args.num_train_epochs
    return steps_per_epoch, min(total_steps, args.max_steps) if args.max_steps > 0 else total_steps


def run_is_complete(args, state: dict, steps_per_epoch: int, total_steps: int) -> bool:
    """Whether the checkpoint resumed from already ends the run (then say so)."""
    from utils.training.distributed import print_rank_0

    last_epoch_done = state["epoch"] + 1 >= args.num_train_epochs and state["step_in_epoch"] == steps_per_epoch
    if state["global_step"] < total_steps and not last_epoch_done:
        return False
    print_rank_0(f"the run is complete: {args.resume_from_checkpoint} is at step {state['global_step']} of "
                 f"{total_steps} (epoch {state['epoch'] + 1} of {args.num_train_epochs}); nothing to train")
    return True


def training_steps(args, train_set, state: dict, steps_per_epoch: int, world_size: int, rank: int):
    """Yield (epoch, step in epoch, this rank's micro-batches of items) for every step left,
    in the order an uninterrupted run takes them."""
    from utils.data import length_grouped_batches

    gas, lengths = args.gradient_accumulation_steps, train_set.lengths()
    start_epoch, start_step = state["epoch"], state["step_in_epoch"]
    if start_step == steps_per_epoch:
        start_epoch, start_step = start_epoch + 1, 0
    for epoch in range(start_epoch, args.num_train_epochs):
        batches = length_grouped_batches(lengths, args.per_device_train_batch_size, args.seed, epoch, world_size, rank)
        for step in range(start_step if epoch == start_epoch else 0, steps_per_epoch):
            yield epoch, step, [[train_set[i] for i in indices] for indices in batches[step * gas : (step + 1) * gas]]


def log_window(window, global_step: int, lr: float, progress, writer) -> None:
    loss, samples_per_s, tokens_per_s = window.report()
    progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}")
    if progress.disable:
        return
    progress.write(f"step={global_step} loss={loss:.8f} lr={lr:.6e} tokens/s={tokens_per_s:.1f} "
                   f"samples/s={samples_per_s:.2f}")
    for name, value in (("train_loss", loss), ("lr", lr), ("tokens_per_s", tokens_per_s),
                        ("samples_per_s", samples_per_s)):
        writer.add_scalar(name, value, global_step)


def main():
    from utils.signals import STOP

    args = parse_args()
    STOP.install()  # before torch starts threads (utils.signals)
    exit_on_problems(validate_args(args))

    from utils import quiet_third_party

    quiet_third_party()
    if args.dry_run:
        dry_run(args)
        return
    from utils.data import read_files

    # a bad line is reported now, not after the minutes of set-up below
    rows = {"train": read_files(args.train_path), "test": read_files(args.test_path or [])}
    args.per_device_eval_batch_size = args.per_device_eval_batch_size or args.per_device_train_batch_size

    # ---- setup
    import deepspeed
    import torch.distributed as dist
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm
    from transformers import GenerationConfig, set_seed

    from baichuan.generation_utils import chat_template, chat_token_ids
    from utils.data import collate, sample_counts
    from utils.models import load_for_training, load_tokenizer
    from utils.prompts import RECORD_FILE
    from utils.training.checkpoints import (check_resumable, checkpoint_name, keep_checkpoints,
                                            load_adapter_weights, read_trainer_state, resume, save_checkpoint,
                                            stop_message)
    from utils.training.deepspeed_config import fill_ds_config, read_ds_config
    from utils.training.distributed import print_rank_0, setup_distributed
    from utils.training.sizes import print_trainable_parameters
    from utils.training.steps import Throughput, evaluate, start_step, train_step
    from utils.training.storage import Storage

    rank, world_size, device, dtype = setup_distributed(args.local_rank)
    set_seed(args.seed)
    print_rank_0(f"world size {world_size}, device {device}, dtype {dtype}")
    # where the checkpoints go: a shared folder, or with --save_on_each_node each node's disk; locked
    storage = Storage.check(args.output_dir, args.save_on_each_node, log=print_rank_0)
    args.resume_from_checkpoint = storage.checkpoint_to_resume(args.resume_from_checkpoint, log=print_rank_0)

    # ---- data
    tokenizer = load_tokenizer(args.model_name_or_path, args.trust_remote_code)
    generation_config = GenerationConfig.from_pretrained(args.model_name_or_path)
    user_id, assistant_id = chat_token_ids(generation_config)
    tokenizer.chat_template = chat_template(tokenizer, generation_config)
    train_set, roles, test_batches = load_data(args, rows, tokenizer, user_id, assistant_id, rank, world_size)
    record = prompt_record(args, roles, tokenizer, user_id, assistant_id)
    steps_per_epoch, total_steps = count_steps(args, train_set, world_size)
    state = {"global_step": 0, "epoch": 0, "step_in_epoch": 0}
    if args.resume_from_checkpoint:
        state = read_trainer_state(args.resume_from_checkpoint)
        check_resumable(state, args.resume_from_checkpoint, world_size, steps_per_epoch)
        if run_is_complete(args, state, steps_per_epoch, total_steps):
            return

    # ---- model
    model = load_for_training(args, device, dtype)
    if args.resume_from_checkpoint:
        load_adapter_weights(model, args.resume_from_checkpoint)
    if rank == 0:
        print_trainable_parameters(model)

    # ---- optimizer
    ds_config = fill_ds_config(read_ds_config(args.ds_file), args, world_size, dtype, total_steps)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config)
    # DeepSpeed's schedulers start before iteration 0 (at lr 0) and the engine advances them after
    # each optimizer step, so the first two steps would both run at lr 0. Start them at iteration 0,
    # as transformers' schedulers do; a resumed run then loads the saved position over it.
    if scheduler is not None and getattr(scheduler, "last_batch_iteration", None) == -1:
        scheduler.step()
    if args.resume_from_checkpoint:
        state = resume(engine, args.resume_from_checkpoint, world_size, args.gradient_accumulation_steps)
        print_rank_0(f"resumed from {args.resume_from_checkpoint} at step {state['global_step']}")
    best = {key: state.get(key) for key in ("best_model_checkpoint", "best_metric")}
    writer = SummaryWriter(os.path.join(args.output_dir, "tensorboard")) if rank == 0 else None
    progress = tqdm(total=total_steps, initial=state["global_step"], disable=rank != 0, dynamic_ncols=True,
                    mininterval=0, miniters=1)  # every step updates the rate, so unpause() drops only the pauses

    def checkpoint(global_step, epoch, step_in_epoch, with_eval=True):
        """Evaluate (not when stopping: on the 7B model that takes minutes), save, keep the best."""
        name, eval_loss, ppl = checkpoint_name(epoch, global_step), None, None
        if test_batches and with_eval:
            started = time.perf_counter()
            eval_loss, ppl = evaluate(engine, test_batches, device)
            seconds = time.perf_counter() - started
            if rank == 0:
                progress.write(f"eval step={global_step} loss={eval_loss:.8f} ppl={ppl:.4f} seconds={seconds:.1f}")
            if writer:
                for tag, value in (("ppl", ppl), ("eval_loss", eval_loss), ("eval_seconds", seconds)):
                    writer.add_scalar(tag, value, global_step)
            if best["best_metric"] is None or eval_loss < best["best_metric"]:
                best.update(best_model_checkpoint=name, best_metric=eval_loss)
        trainer_state = {"global_step": global_step, "epoch": epoch, "step_in_epoch": step_in_epoch,
                         "steps_per_epoch": steps_per_epoch, "world_size": world_size,
                         "scheduler": scheduler.state_dict() if scheduler is not None else None,
                         "eval_loss": eval_loss, "ppl": ppl, **best}
        files = {"train_args.json": vars(args), RECORD_FILE: record}
        started = time.perf_counter()
        path = save_checkpoint(args.output_dir, engine, model, tokenizer, files, trainer_state, storage)
        if storage.is_writer:  # on each copy: every node sees the same steps and the same best
            deleted = keep_checkpoints(args.output_dir, name, best["best_model_checkpoint"], args.save_total_limit)
        if rank == 0:
            progress.write(f"saved {path} in {time.perf_counter() - started:.1f} s"
                           + (f"; deleted {', '.join(deleted)}" if deleted else ""))
        return path

    # ---- loop
    global_step, stopped_by = state["global_step"], None
    saved, saved_step = args.resume_from_checkpoint, state["global_step"] if args.resume_from_checkpoint else None
    window = Throughput(device)
    engine.train()
    STOP.armed = True
    for epoch, step_in_epoch, step in training_steps(args, train_set, state, steps_per_epoch, world_size, rank):
        window.start()
        micro_batches = [collate(items, tokenizer.pad_token_id) for items in step]
        step_tokens, stopped_by = start_step(micro_batches, device)
        if stopped_by:
            break
        lr = engine.get_lr()[0]  # the rate this step uses
        loss_sum = train_step(engine, micro_batches, step_tokens, device)
        window.stop(loss_sum, step_tokens, *sample_counts([item for items in step for item in items]))
        global_step += 1
        progress.update(1)
        if global_step % args.show_loss_step == 0:
            log_window(window, global_step, lr, progress, writer)
        done = global_step >= total_steps
        if done or step_in_epoch + 1 == steps_per_epoch or (args.save_model_step and global_step % args.save_model_step == 0):
            saved, saved_step = checkpoint(global_step, epoch, step_in_epoch + 1), global_step
            progress.unpause()  # the bar's rate and ETA leave out evaluation and saving
        if done:
            break
    if stopped_by and saved_step != global_step:
        saved = checkpoint(global_step, epoch, step_in_epoch, with_eval=False)
    STOP.armed = False

    # ---- save (the checkpoints were written in the loop)
    progress.close()
    if writer:
        writer.close()
    dist.barrier()
    if stopped_by:
        print_rank_0(stop_message(stopped_by, saved, world_size), file=sys.stderr)
        raise SystemExit(128 + stopped_by)


if __name__ == "__main__":
    exit_on_user_error(main)

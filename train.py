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
Several machines (on each, the same command; --output_dir on a filesystem every node mounts, or
--save_on_each_node for a full copy of each checkpoint on every node's own disk):
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST0:29500 \\
        --rdzv_id JOB train.py ...same flags...
    deepspeed --hostfile hostfile --master_addr HOST0 train.py ...same flags...   (ssh + pdsh to each host)
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
lm_head, and only the replies and their ends are trained on (every reply of a conversation). Every
`--save_model_step` optimizer steps and at each epoch's end, the test loss is computed and a
self-contained checkpoint `output_dir/epoch-E-step-S/` is written: adapter, tokenizer, the resolved
config (train_args.json), the prompt record (roleplay.json: the roles and exact system prompts
trained on), and the state needed to resume exactly (utils.training.checkpoints). `output_dir/best`
links to the one with the lowest test loss; `--save_total_limit` deletes all but the few written
last and that one. Only a checkpoint whose manifest.json (written last) lists its files at their
sizes is resumed from, and a run locks --output_dir (utils.training.storage). The flags are the fields of utils.training.config.TrainConfig, printed at start.

An optimizer step's gradient is that of the summed loss of its labelled tokens, over all its
micro-batches and processes, divided by their number: micro-batches weigh by their tokens.

Preference tuning, after SFT (pairs: rows with "chosen" and "rejected" replies, utils/pairs.py),
from a merged SFT model, or on from an SFT adapter, which is then the reference:
    python train.py --stage dpo --model_name_or_path runs/merged --train_path pairs.jsonl \\
        --output_dir runs/dpo --pref_loss sigmoid --pref_beta 0.1 --pref_packing ...same flags...
    python train.py --stage dpo --model_name_or_path BASE --adapter runs/roleplay/best ...
The losses are DPO's (sigmoid), IPO's, ORPO's and SimPO's (utils/preference.py); a step's loss is
the mean over its pairs; the metrics are TRL's (rewards/margins, rewards/accuracies, ...). The
reference's log-probabilities are computed once, before the first step, and cached in
output_dir/reference_logps.safetensors (utils.training.preference_steps).
"""

import argparse
import os
import sys
import time

from utils.cli import HelpFormatter, exit_on_problems, exit_on_user_error
from utils.training.config import (PREF_LOSSES, DataConfig, DistributedConfig, LoraConfig, ModelConfig, OptimConfig,
                                   OutputConfig, PreferenceConfig, TrainConfig, output_dir_problems)


def build_parser() -> argparse.ArgumentParser:
    """The flags, named as TrainConfig's fields; their defaults are the fields' (utils.training.config)."""
    D, M, L = DataConfig, ModelConfig, LoraConfig
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--train_path", nargs="+", metavar="FILE",
                      help="training samples, one or more jsonl files: data_helper.py's, or rows of "
                           "instruction/input/output, OpenAI messages or ShareGPT conversations, mixed (required)")
    data.add_argument("--test_path", nargs="+", metavar="FILE",
                      help="test samples, the same shapes (no evaluation if omitted)")
    data.add_argument("--prompts_file", help="data_helper.py's prompts.json, recorded in the checkpoints "
                                             "(default: prompts.json beside the first --train_path, when there)")
    data.add_argument("--max_len", type=int, default=D.max_len,
                      help="most tokens in one sample (prompt + reply + eos); of a longer conversation the system "
                           "prompt and the newest whole rounds that fit are kept")
    data.add_argument("--max_src_len", type=int, default=D.max_src_len,
                      help="most tokens of a question (each user turn); longer ones are cut "
                           "(default: a quarter of --max_len, 256 for its default)")
    data.add_argument("--max_line_bytes", type=int, default=D.max_line_bytes,
                      help="longest line of a data file, in bytes: a longer one is refused with its file and line "
                           "before any model loads (it would be read, tokenised and trained on whole)")
    data.add_argument("--is_skip", action="store_true", help="drop samples that had to be cut instead of keeping them")
    data.add_argument(
        "--packing", action="store_true",
        help="pack samples of one role into max_len rows that hold its system prompt once; each sample "
        "attends to the prompt and itself only. A batch then counts rows: on RoleBench a 512-token row holds "
        "about 7 samples, so lower the batch size or the accumulation steps to keep the samples per step")
    model = parser.add_argument_group("model")
    model.add_argument("--model_name_or_path", help="base model: a local directory or a hub id (required)")
    model.add_argument("--quantization_bit", type=int, choices=[4, 16], default=M.quantization_bit,
                       help="4: QLoRA on an NF4 base; 16: plain LoRA")
    model.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations to save memory")
    model.add_argument("--trust_remote_code", action="store_true",
                       help="let transformers run code from the model directory")
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--lora_dim", type=int, default=L.lora_dim,
                      help="LoRA rank (the inner width of each low-rank update)")
    lora.add_argument("--lora_alpha", type=float, default=L.lora_alpha,
                      help="LoRA scale numerator (scale = alpha / rank)")
    lora.add_argument("--lora_dropout", type=float, default=L.lora_dropout, help="dropout on the LoRA input")
    add_preference_flags(parser)
    return add_run_flags(parser)


def add_preference_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of the preference stage (utils.training.preference_steps)."""
    P = PreferenceConfig
    pref = parser.add_argument_group("preference tuning (--stage dpo)")
    pref.add_argument("--stage", choices=["sft", "dpo"], default=P.stage,
                      help="sft: learn the replies of --train_path's samples; dpo: prefer the chosen reply to the "
                           "rejected one in --train_path's pairs (rows with 'chosen' and 'rejected'; utils/pairs.py)")
    pref.add_argument("--pref_loss", choices=PREF_LOSSES, default=P.pref_loss,
                      help="sigmoid: DPO; ipo: IPO; orpo: ORPO (the chosen reply's NLL + odds ratio, no reference); "
                           "simpo: SimPO (length-normalised, with a margin, no reference)")
    pref.add_argument("--pref_beta", type=float, default=P.pref_beta,
                      help="beta: how far from the reference (sigmoid, ipo: IPO's tau), the odds-ratio weight (orpo), "
                           "the reward scale (simpo: its paper uses 2 to 2.5)")
    pref.add_argument("--simpo_gamma", type=float, default=P.simpo_gamma, help="SimPO's target reward margin")
    pref.add_argument("--pref_packing", action="store_true",
                      help="pack pairs into --max_len rows: one pair's prompt once, or several pairs of one role with "
                           "its system prompt once; each reply attends to the shared head and itself only. A batch "
                           "then counts rows")
    pref.add_argument("--adapter", metavar="DIR",
                      help="train on from this SFT adapter (the reference is then the adapter as given; default: a "
                           "new adapter on --model_name_or_path, e.g. a merged SFT model)")


def add_run_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of the optimisation, the processes, logging and checkpoints."""
    O, S, R = OptimConfig, DistributedConfig, OutputConfig
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--per_device_train_batch_size", type=int, default=O.per_device_train_batch_size,
                       help="micro-batch per process")
    optim.add_argument("--per_device_eval_batch_size", type=int, default=O.per_device_eval_batch_size,
                       help="test micro-batch per process (default: the train batch)")
    optim.add_argument("--learning_rate", type=float, default=O.learning_rate, help="peak learning rate")
    optim.add_argument("--weight_decay", type=float, default=O.weight_decay,
                       help="AdamW weight decay on the LoRA weights")
    optim.add_argument("--num_train_epochs", type=int, default=O.num_train_epochs, help="passes over the training set")
    optim.add_argument("--max_steps", type=int, default=O.max_steps,
                       help="stop after this many optimizer steps (-1: no limit)")
    optim.add_argument("--gradient_accumulation_steps", type=int, default=O.gradient_accumulation_steps,
                       help="micro-batches per optimizer step")
    optim.add_argument("--warmup_ratio", type=float, default=O.warmup_ratio, help="share of the steps spent warming up")
    optim.add_argument("--seed", type=int, default=O.seed, help="seed of the data order, LoRA init and dropout")
    dist_group = parser.add_argument_group("distributed")
    dist_group.add_argument("--local_rank", type=int, default=S.local_rank, help="set by the deepspeed launcher")
    dist_group.add_argument("--ds_file", default=S.ds_file, help="DeepSpeed config; 'auto' values are filled in")
    out = parser.add_argument_group("logging and checkpoints")
    out.add_argument("--output_dir", help="where checkpoints and TensorBoard logs go (required)")
    out.add_argument("--show_loss_step", type=int, default=R.show_loss_step,
                     help="log the loss every this many optimizer steps")
    out.add_argument("--save_model_step", type=int, default=R.save_model_step,
                     help="evaluate and save every this many steps (default: at each epoch's end only)")
    out.add_argument("--save_total_limit", type=int, default=R.save_total_limit,
                     help="keep only the N checkpoints written last, plus the best by test loss (default: keep all)")
    out.add_argument("--save_on_each_node", action="store_true",
                     help="several machines whose --output_dir is not one shared folder: each node keeps a full copy "
                          "of every checkpoint on its own disk (with its own ranks' optimizer partitions) and resumes "
                          "from it; without it such a run stops at start-up")
    out.add_argument("--resume_from_checkpoint",
                     help="a checkpoint directory, or 'latest' for the complete one written last in output_dir")
    out.add_argument("--dry_run", action="store_true",
                     help="print parameter counts and a memory estimate, then stop (needs only the model's config)")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def dry_run(config: TrainConfig) -> None:
    """Parameter counts and a rough per-GPU memory estimate, from the model's config alone."""
    import torch
    from peft import LoraConfig as PeftLoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    import baichuan  # noqa: F401
    from utils.training.deepspeed_config import read_ds_config
    from utils.training.sizes import memory_estimate, print_trainable_parameters

    model_config = AutoConfig.from_pretrained(config.model.model_name_or_path,
                                              trust_remote_code=config.model.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=config.model.trust_remote_code)
    model = get_peft_model(model, PeftLoraConfig(r=config.lora.lora_dim, lora_alpha=config.lora.lora_alpha,
                                                 target_modules="all-linear"))
    print_trainable_parameters(model, assume_4bit=config.model.quantization_bit == 4)
    parts = memory_estimate(model, model_config, config, read_ds_config(config.distributed.ds_file))
    gib = 2**30
    print(f"estimated GPU memory per device: {sum(parts.values()) / gib:.1f} GiB ("
          + ", ".join(f"{name} {size / gib:.2f}" for name, size in parts.items())
          + f"; batch {config.optim.per_device_train_batch_size} x {config.data.max_len}, "
          f"gradient checkpointing {'on' if config.model.gradient_checkpointing else 'off'})")


def chat_tokenizer(model: ModelConfig):
    """(the tokenizer with the chat template, the user token id, the assistant token id)."""
    from transformers import GenerationConfig

    from baichuan.generation_utils import chat_template, chat_token_ids
    from utils.models import load_tokenizer

    tokenizer = load_tokenizer(model.model_name_or_path, model.trust_remote_code)
    generation_config = GenerationConfig.from_pretrained(model.model_name_or_path)
    tokenizer.chat_template = chat_template(tokenizer, generation_config)
    return tokenizer, *chat_token_ids(generation_config)


def load_data(config: TrainConfig, rows: dict, tokenizer, user_id: int, assistant_id: int, rank: int,
              world_size: int):
    """The training samples (packed with --packing), and this rank's share of the test set in batches
    sorted by length, so that evaluation pads little. `rows`: the rows of --train_path and --test_path."""
    from utils.data import PackedDataset, RolePlayDataset, collate
    from utils.training.distributed import print_rank_0

    data = config.data

    def load(split):
        return RolePlayDataset(rows[split], tokenizer, user_id, assistant_id, data.max_len, data.max_src_len,
                               skip_truncated=data.is_skip, source=", ".join(getattr(data, f"{split}_path")))

    train_set = load("train")
    roles = train_set.roles
    print_rank_0(f"train: {len(train_set)} samples ({train_set.summary()})")
    if data.packing:
        train_set = PackedDataset(train_set, data.max_len)
        print_rank_0(f"packed into {len(train_set)} rows of at most {data.max_len} tokens")
    test_batches = []
    if data.test_path:
        test_set = load("test")
        mine = sorted(range(rank, len(test_set), world_size), key=lambda i: len(test_set[i]["input_ids"]))
        size = config.optim.per_device_eval_batch_size
        test_batches = [collate([test_set[i] for i in mine[j : j + size]], tokenizer.pad_token_id)
                        for j in range(0, len(mine), size)]
    return train_set, roles, test_batches


def prompt_record(data: DataConfig, roles, tokenizer, user_id, assistant_id) -> dict:
    """What the checkpoints record of the prompts: the roles trained on, with their exact system
    prompts (from the samples), and the template, prompt style, contexts and user name of
    data_helper.py's prompts.json when there."""
    from utils.files import read_json
    from utils.prompts import PROMPTS_FILE, SYSTEM_TEMPLATE, make_record
    from utils.training.distributed import print_rank_0

    path = data.prompts_file or os.path.join(os.path.dirname(os.path.abspath(data.train_path[0])), PROMPTS_FILE)
    side_file = read_json(path, "prompts file") if os.path.isfile(path) else {}
    if side_file:
        print_rank_0(f"prompt record: {len(roles)} roles from {', '.join(data.train_path)}, the template, prompt "
                     f"style and contexts of {path}")
    # the contexts (lorebooks, notes) that data_helper.py applied, so that serving applies the same,
    # and the cards' alternate greetings, for the page to offer
    return make_record(roles, side_file.get("system_template", SYSTEM_TEMPLATE), user_id, assistant_id,
                       tokenizer.chat_template, side_file.get("prompt_style", "project"), side_file.get("contexts"),
                       side_file.get("alternate_greetings"), side_file.get("user_name"))


def log_window(window, global_step: int, lr: float, progress, writer, metrics: dict) -> None:
    """`metrics`: the stage's own (the preference stage's are TRL's: rewards/margins, ...)."""
    loss, samples_per_s, tokens_per_s = window.report()
    shown = {name.split("/")[-1]: f"{metrics[name]:.3f}" for name in ("rewards/margins", "rewards/accuracies")
             if name in metrics}
    progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}", **shown)
    if progress.disable:
        return
    progress.write(f"step={global_step} loss={loss:.8f} lr={lr:.6e} tokens/s={tokens_per_s:.1f} "
                   f"samples/s={samples_per_s:.2f}" + "".join(f" {name}={value:.6f}" for name, value in metrics.items()))
    for name, value in (("train_loss", loss), ("lr", lr), ("tokens_per_s", tokens_per_s),
                        ("samples_per_s", samples_per_s), *metrics.items()):
        writer.add_scalar(name, value, global_step)


def evaluate_and_log(stage, engine, test_batches, device, global_step: int, progress, writer):
    """The test loss and perplexity (None without a test set; perplexity None for pairs), and the
    stage's test metrics, written to the log and TensorBoard by rank 0."""
    if not test_batches:
        return None, None
    started = time.perf_counter()
    eval_loss, ppl = stage.evaluate(engine, test_batches, device)
    seconds = time.perf_counter() - started
    if writer:
        shown = {"ppl": ppl} if ppl is not None else stage.eval_metrics
        progress.write(f"eval step={global_step} loss={eval_loss:.8f} "
                       + "".join(f"{name}={value:.4f} " for name, value in shown.items()) + f"seconds={seconds:.1f}")
        for tag, value in (*shown.items(), ("eval_loss", eval_loss), ("eval_seconds", seconds)):
            writer.add_scalar(tag, value, global_step)
    return eval_loss, ppl


def fit(config: TrainConfig, engine, train_set, test_batches, schedule, state: dict, checkpointer, stage,
        device) -> int | None:
    """Train every step of `schedule` after `state`; evaluate and save every --save_model_step steps,
    at each epoch's end and at the last step. `stage`: the step functions of the samples or of the
    pairs (utils.training.steps.SftStage, utils.training.preference_steps.PreferenceStage). Returns
    the signal that stopped the run early (its checkpoint written), or None."""
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    from utils.signals import STOP
    from utils.training.distributed import is_main_process

    main_process = is_main_process()
    writer = SummaryWriter(os.path.join(config.output.output_dir, "tensorboard")) if main_process else None
    # every step updates the rate, so that unpause() drops only the pauses for evaluating and saving
    progress = tqdm(total=schedule.total_steps, initial=state["global_step"], disable=not main_process,
                    dynamic_ncols=True, mininterval=0, miniters=1)
    engine.train()
    STOP.armed = True
    try:
        return fit_steps(config, engine, train_set, test_batches, schedule, state, checkpointer, stage, device,
                         progress, writer)
    finally:  # the bar ends its line: an error (a failed save) is then a line of its own
        STOP.armed = False
        progress.close()
        if writer:
            writer.close()


def fit_steps(config: TrainConfig, engine, train_set, test_batches, schedule, state: dict, checkpointer, stage,
              device, progress, writer) -> int | None:
    """fit's loop: the steps, their logging, evaluation and checkpoints."""
    from utils.training.steps import Throughput

    global_step, stopped_by, every, window = state["global_step"], None, config.output.save_model_step, \
        Throughput(device)
    for epoch, step_in_epoch, indices in schedule.steps(state):
        window.start()
        items = [[train_set[i] for i in micro] for micro in indices]
        micro_batches = [stage.collate(micro) for micro in items]
        step_tokens, stopped_by = stage.start(micro_batches, device)
        if stopped_by:
            break
        lr = engine.get_lr()[0]  # the rate this step uses
        loss_sum = stage.train(engine, micro_batches, step_tokens, device)
        window.stop(loss_sum, step_tokens, *stage.counts([item for micro in items for item in micro]))
        global_step += 1
        progress.update(1)
        if global_step % config.output.show_loss_step == 0:
            log_window(window, global_step, lr, progress, writer, stage.metrics())
        done = global_step >= schedule.total_steps
        if done or schedule.ends_epoch(step_in_epoch) or (every and global_step % every == 0):
            eval_loss, ppl = evaluate_and_log(stage, engine, test_batches, device, global_step, progress, writer)
            checkpointer.save(global_step, epoch, step_in_epoch + 1, eval_loss, ppl)
            progress.unpause()  # the bar's rate and ETA leave out evaluation and saving
        if done:
            break
    if stopped_by and checkpointer.last_step != global_step:
        checkpointer.save(global_step, epoch, step_in_epoch)  # no evaluation: on the 7B model it takes minutes
    return stopped_by


def read_rows(data: DataConfig, dpo: bool) -> dict[str, list[dict]]:
    """The train and test rows (samples, or with --stage dpo pairs), each file checked line by line."""
    from utils.data import read_files
    from utils.pairs import read_pairs

    read = read_pairs if dpo else read_files
    return {split: read(paths, data.max_line_bytes) for split, paths in (("train", data.train_path),
                                                                          ("test", data.test_path))}


def preference_model(config: TrainConfig, pairs, test_pairs, pad_id: int, device, dtype, rank: int, world_size: int):
    """--stage dpo's model and its step functions; the reference log-probabilities are those of the
    starting point, so they are computed before a checkpoint's weights are loaded."""
    from utils.training.preference_steps import PreferenceStage, reference_tables, start_model

    model = start_model(config, device, dtype)
    reference = reference_tables(config, model, pairs, test_pairs, pad_id, device, rank, world_size)
    return model, PreferenceStage(config.preference, reference, test_pairs, pad_id,
                                  config.optim.per_device_eval_batch_size, device, rank, world_size)


def main():
    from utils.signals import STOP

    args = parse_args()
    STOP.install()  # before torch starts threads (utils.signals)
    config = TrainConfig.from_args(args)
    exit_on_problems(config.problems())

    from utils.cli import quiet_third_party

    quiet_third_party()
    if config.output.dry_run:
        dry_run(config)
        return
    dpo = config.preference.stage == "dpo"
    rows = read_rows(config.data, dpo)  # a bad line is reported now, not after the minutes of set-up below

    import torch.distributed as dist
    from tqdm import tqdm
    from transformers import set_seed

    from utils.models import load_for_training
    from utils.prompts import RECORD_FILE
    from utils.training.checkpoints import Checkpointer, load_adapter_weights, read_trainer_state, resume, stop_message
    from utils.training.deepspeed_config import fill_ds_config, read_ds_config, start_engine
    from utils.training.distributed import print_rank_0, setup_distributed
    from utils.training.preference_steps import load_pairs
    from utils.training.schedule import Schedule
    from utils.training.sizes import print_trainable_parameters
    from utils.training.steps import SftStage
    from utils.training.storage import Storage

    # setup: processes, data, the state resumed from, the model and its engine
    rank, world_size, device, dtype = setup_distributed(config.distributed.local_rank)
    set_seed(config.optim.seed)
    print_rank_0(f"world size {world_size}, device {device}, dtype {dtype}\n{config}")
    # where the checkpoints go: one shared folder, or with --save_on_each_node each node's disk; locked
    storage = Storage.check(config.output.output_dir, config.output.save_on_each_node, log=print_rank_0,
                            folder_problems=lambda: output_dir_problems(config.output.output_dir,
                                                                        config.output.resume_from_checkpoint, True))
    resume_from = storage.checkpoint_to_resume(config.output.resume_from_checkpoint, log=print_rank_0)
    tokenizer, user_id, assistant_id = chat_tokenizer(config.model)
    if dpo:
        pairs, train_set, test_pairs, roles = load_pairs(config, rows, tokenizer)
    else:
        train_set, roles, test_batches = load_data(config, rows, tokenizer, user_id, assistant_id, rank, world_size)
    record = prompt_record(config.data, roles, tokenizer, user_id, assistant_id)
    schedule = Schedule(train_set.lengths(), config.optim, world_size, rank, ", ".join(config.data.train_path))
    state = {"global_step": 0, "epoch": 0, "step_in_epoch": 0}
    if resume_from:
        state = read_trainer_state(resume_from, world_size, schedule.steps_per_epoch)
        if schedule.is_complete(state):
            print_rank_0(f"the run is complete: {resume_from} is at step {state['global_step']} of "
                         f"{schedule.total_steps} (epoch {state['epoch'] + 1} of {config.optim.num_train_epochs}); "
                         "nothing to train")
            return
    if dpo:
        model, stage = preference_model(config, pairs, test_pairs, tokenizer.pad_token_id, device, dtype, rank,
                                        world_size)
        test_batches = stage.test_batches
    else:
        model = load_for_training(config.model, config.lora, device, dtype, log=print_rank_0)
        stage = SftStage(tokenizer.pad_token_id)
    if resume_from:
        load_adapter_weights(model, resume_from)
    print_trainable_parameters(model)
    ds_config = fill_ds_config(read_ds_config(config.distributed.ds_file), config.optim, world_size, dtype,
                               schedule.total_steps, source=config.distributed.ds_file)
    engine = start_engine(model, ds_config)
    if resume_from:
        resume(engine, resume_from, state, config.optim.gradient_accumulation_steps)
        print_rank_0(f"resumed from {resume_from} at step {state['global_step']}")
    # every checkpoint records the config it was trained with, the checkpoint resumed from included
    files = {"train_args.json": {**config.flat(), "resume_from_checkpoint": resume_from}, RECORD_FILE: record}
    checkpointer = Checkpointer(config.output.output_dir, engine, model, tokenizer, files, schedule.steps_per_epoch,
                                config.output.save_total_limit, state, resume_from, log=tqdm.write, storage=storage)

    stopped_by = fit(config, engine, train_set, test_batches, schedule, state, checkpointer, stage, device)

    # the checkpoints were saved by fit; a stop says how to go on
    dist.barrier()
    if stopped_by:
        print_rank_0(stop_message(stopped_by, checkpointer.last, world_size), file=sys.stderr)
        raise SystemExit(128 + stopped_by)


if __name__ == "__main__":
    exit_on_user_error(main)

"""Checks of train.py's DeepSpeed steps that need a process group, run by test_train.py as a
subprocess (one process), or under torchrun (two):

    python tests/engine_checks.py MODEL_DIR OUT_DIR step_gradient fp16_resume
    python -m torch.distributed.run --nproc_per_node 2 tests/engine_checks.py MODEL_DIR OUT_DIR step_gradient

step_gradient: one optimizer step of utils.training.steps.train_step, 2 accumulation steps on every rank,
micro-batches of very different label counts, through ZeRO-2 as ds_config.json sets it, with plain
SGD at lr 1 so that the weights move by exactly the step's gradient. Writes, per rank, how far that
move is from the gradient of the whole step taken as one batch in one process (token-weighted), and
from the per-micro-batch mean the book's loop took.

fp16_resume: an fp16 engine with a dynamic loss scale (started high, so that it overflows and moves)
trains 3 steps, is saved by utils.training.checkpoints.Checkpointer, trains 3 more; a fresh engine
resumed from the checkpoint by utils.training.checkpoints.resume trains the same 3. Writes both
sides' losses and loss scaler states.
"""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator  # noqa: E402

# (rows, labelled tokens per row) of each rank's two micro-batches; 32 tokens a row
LABELS = {0: [(2, [2, 3]), (2, [31, 29])], 1: [(2, [25, 30]), (2, [1, 4])]}
ROW_LEN = 32


def micro_batch(rank: int, micro: int) -> dict:
    generator = torch.Generator().manual_seed(100 * rank + micro)
    rows, labelled = LABELS[rank % 2][micro]
    input_ids = torch.randint(3, 1000, (rows, ROW_LEN), generator=generator)
    labels = torch.full_like(input_ids, -100)
    for r, n in enumerate(labelled):  # the last n positions are labelled, as a reply is
        labels[r, ROW_LEN - n :] = input_ids[r, ROW_LEN - n :]
    return {"input_ids": input_ids, "labels": labels, "attention_mask": torch.ones_like(input_ids)}


def train_config(model_dir: str, **lora):
    """train.py's config of 2 accumulation steps of 2 rows each."""
    from utils.training.config import LoraConfig, ModelConfig, OptimConfig, TrainConfig

    return TrainConfig(model=ModelConfig(model_name_or_path=model_dir), lora=LoraConfig(**lora),
                       optim=OptimConfig(per_device_train_batch_size=2, gradient_accumulation_steps=2))


def lora_weights(model) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def step_gradient(model_dir: str, out_dir: str, rank: int, world_size: int, device) -> None:
    import deepspeed

    from utils.models import load_for_training
    from utils.training.deepspeed_config import fill_ds_config, read_ds_config
    from utils.training.steps import start_step, train_step

    dtype = torch.float32
    config = train_config(model_dir, lora_dropout=0.0)
    torch.manual_seed(0)  # the same LoRA weights on every rank
    model = load_for_training(config.model, config.lora, device, dtype)
    for name, weight in lora_weights(model).items():
        if "lora_B" in name:  # as after some training: PEFT starts B at zero, which zeroes A's gradient
            weight.data.normal_(0.0, 0.05)
    batches = {(r, m): micro_batch(r, m) for r in range(world_size) for m in range(2)}

    def grads(losses):
        model.zero_grad()
        sum(losses).backward()
        return {n: w.grad.clone() for n, w in lora_weights(model).items()}

    whole = {k: torch.cat([b[k] for b in batches.values()]) for k in ("input_ids", "labels", "attention_mask")}
    reference_loss = model(**whole).loss
    reference = grads([reference_loss])
    book = grads([model(**b).loss / len(batches) for b in batches.values()])
    model.zero_grad(set_to_none=True)

    ds_config = fill_ds_config(read_ds_config(os.path.join(ROOT, "ds_config.json")), config.optim, world_size, dtype, 1)
    del ds_config["optimizer"], ds_config["scheduler"]
    ds_config.update(gradient_clipping=0.0, zero_allow_untested_optimizer=True)
    sgd = torch.optim.SGD(list(lora_weights(model).values()), lr=1.0)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=sgd, config=ds_config)
    before = {n: w.detach().clone() for n, w in lora_weights(model).items()}
    mine = [batches[rank, 0], batches[rank, 1]]
    step_tokens, _ = start_step(mine, device)
    loss_sum = train_step(engine, mine, step_tokens, device)
    torch.distributed.all_reduce(loss_sum)
    moved = {n: before[n] - w.detach() for n, w in lora_weights(model).items()}

    def distance(target):
        diff = sum(float((moved[n] - target[n]).pow(2).sum()) for n in target) ** 0.5
        return diff / sum(float(target[n].pow(2).sum()) for n in target) ** 0.5

    result = {"world_size": world_size, "step_tokens": step_tokens, "error": distance(reference),
              "book_error": distance(book), "loss": float(loss_sum) / step_tokens,
              "reference_loss": reference_loss.item()}
    with open(os.path.join(out_dir, f"step_gradient-rank{rank}.json"), "w") as f:
        json.dump(result, f)


class CPUWithHalf(CPU_Accelerator):
    """DeepSpeed's CPU accelerator refuses fp16 unless oneDNN reports native fp16 (AVX512-FP16 or
    AMX-FP16); torch computes fp16 on any CPU, only slower, and the loss-scale bookkeeping under
    test does not depend on how the CPU multiplies."""

    def is_fp16_supported(self):
        return True


def fp16_resume(model_dir: str, out_dir: str, rank: int, world_size: int, device) -> None:
    from deepspeed.accelerator import get_accelerator, set_accelerator

    from utils.models import load_for_training, load_tokenizer
    from utils.training.checkpoints import (Checkpointer, load_adapter_weights, optimizer_state, read_trainer_state,
                                            resume)
    from utils.training.deepspeed_config import fill_ds_config, read_ds_config, start_engine
    from utils.training.steps import start_step, train_step

    dtype = torch.float16
    config = train_config(model_dir)
    ds_config = fill_ds_config(read_ds_config(os.path.join(ROOT, "ds_config.json")), config.optim, world_size, dtype, 6)
    # high and quick to move: the first steps overflow and halve it, later ones double it again
    ds_config["fp16"].update(initial_scale_power=17, loss_scale_window=2, hysteresis=1)
    if device.type == "cpu" and not get_accelerator().is_fp16_supported():
        set_accelerator(CPUWithHalf())

    def engine_for(checkpoint=None):
        torch.manual_seed(0)
        model = load_for_training(config.model, config.lora, device, dtype)
        if checkpoint:
            load_adapter_weights(model, checkpoint)
        return start_engine(model, ds_config), model  # the engine train.py starts

    def steps(engine, numbers):
        losses, scalers = [], []
        for step in numbers:
            batch = [micro_batch(0, step % 2), micro_batch(1, step % 2)]
            step_tokens, _ = start_step(batch, device)
            losses.append(float(train_step(engine, batch, step_tokens, device)) / step_tokens)
            scalers.append(optimizer_state(engine)[1]["loss_scaler"])
        return losses, scalers

    engine, model = engine_for()
    initial = optimizer_state(engine)[1]["loss_scaler"]
    steps(engine, range(3))
    checkpointer = Checkpointer(out_dir, engine, model, load_tokenizer(model_dir), {}, steps_per_epoch=6, limit=None,
                                state={"global_step": 0}, resumed_from=None)
    checkpoint = checkpointer.save(global_step=3, epoch=0, step_in_epoch=3)
    saved = optimizer_state(engine)[1]["loss_scaler"]
    uninterrupted = steps(engine, range(3, 6))
    resumed_engine, _ = engine_for(checkpoint)
    state = read_trainer_state(checkpoint, world_size, steps_per_epoch=6)
    resume(resumed_engine, checkpoint, state, config.optim.gradient_accumulation_steps)
    resumed = steps(resumed_engine, range(3, 6))
    with open(os.path.join(out_dir, "fp16_resume.json"), "w") as f:
        json.dump({"initial": initial, "saved": saved, "uninterrupted": uninterrupted, "resumed": resumed,
                   "skipped_steps": [engine.skipped_steps, resumed_engine.skipped_steps]}, f)


if __name__ == "__main__":
    from utils.cli import quiet_third_party

    quiet_third_party()
    from utils.training.distributed import setup_distributed

    rank, world_size, device, _ = setup_distributed(-1)
    for check in sys.argv[3:]:
        {"step_gradient": step_gradient, "fp16_resume": fp16_resume}[check](sys.argv[1], sys.argv[2], rank,
                                                                             world_size, device)

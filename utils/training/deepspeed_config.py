"""The DeepSpeed config (ds_config.json read as a JSON object, its "auto" values filled in from the
training config), and the engine train.py builds from it."""

import json
import math

import torch

from utils.cli import UserError
from utils.files import read_json


def read_ds_config(path: str) -> dict:
    config = read_json(path, "DeepSpeed config")
    if not isinstance(config, dict):
        raise UserError(f"{path}: must hold a JSON object")
    return config


def fill_ds_config(config: dict, optim, world_size: int, dtype, total_steps: int,
                   source: str = "ds_config.json") -> dict:
    """The DeepSpeed config with its "auto" values taken from `optim` (an OptimConfig); `source`
    names the file in errors. The values that do not depend on the training config (betas, eps,
    clipping, the cosine floor) are written in ds_config.json."""

    def fill(section: dict, values: dict):
        for key, value in values.items():
            if section.get(key) == "auto":
                section[key] = value

    def object_at(key: str) -> dict:
        value, parts = config, key.split(".")
        for depth, part in enumerate(parts, 1):
            value = value.get(part, {})
            if not isinstance(value, dict):
                raise UserError(f"{source}: {'.'.join(parts[:depth])} must be a JSON object, "
                                f"got {json.dumps(value)}")
        return value

    config = json.loads(json.dumps(config))
    batch, accumulation = optim.per_device_train_batch_size, optim.gradient_accumulation_steps
    fill(config, {"train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": accumulation,
                  "train_batch_size": batch * world_size * accumulation})
    fill(object_at("optimizer.params"), {"lr": optim.learning_rate, "weight_decay": optim.weight_decay})
    # at least 1: DeepSpeed's WarmupCosineLR refuses 0 warm-up steps (and warms up over 2 at the least)
    warmup = max(1, math.ceil(optim.warmup_ratio * total_steps))
    fill(object_at("scheduler.params"),
         {"total_num_steps": total_steps, "warmup_num_steps": warmup,
          "warmup_min_lr": 0.1 * optim.learning_rate, "warmup_max_lr": optim.learning_rate})
    for key, wanted in (("bf16", dtype == torch.bfloat16), ("fp16", dtype == torch.float16)):
        config.setdefault(key, {"enabled": False})
        section = object_at(key)
        if section.get("enabled") == "auto":
            section["enabled"] = wanted
        if section.get("enabled") and not wanted:
            raise UserError(f"{source}: {key} is enabled, but this machine computes in {dtype}")
    left = [key for key, value in _flatten(config) if value == "auto"]
    if left:
        raise UserError(f"{source}: no value for {', '.join(left)} (\"auto\" is filled only for the batch "
                        "sizes, lr, weight_decay, the schedule's steps and bf16/fp16)")
    return config


def _flatten(config: dict, prefix: str = ""):
    for key, value in config.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


def start_engine(model, ds_config: dict):
    """The DeepSpeed engine over `model`'s trainable (LoRA) weights, its schedule at the first step."""
    import deepspeed

    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config)
    # DeepSpeed's schedulers start before iteration 0 (at lr 0) and the engine advances them after
    # each optimizer step, so the first two steps would both run at lr 0. Start them at iteration 0,
    # as transformers' schedulers do; a resumed run then loads the saved position over it.
    if scheduler is not None and getattr(scheduler, "last_batch_iteration", None) == -1:
        scheduler.step()
    return engine

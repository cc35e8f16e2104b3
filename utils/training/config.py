"""The training config: what train.py's flags set, typed, in sections, built once and checked in one place.

    config = TrainConfig.from_args(build_parser().parse_args())
    exit_on_problems(config.problems())
    print(config)

Each field is named as its flag (`max_len` is `--max_len`), and its default here is the flag's
default: train.py's parser takes them from these classes. The benches and the tests build the
sections they need directly, e.g. `LoraConfig(lora_dim=16)`. The config is frozen; values that
follow another one when not given are filled in as it is built (`__post_init__`).
"""

import dataclasses
import os
from dataclasses import dataclass, field, fields

from utils.cli import UserError
from utils.files import MAX_LINE_BYTES, TMP_PREFIX


def _fill(obj, name: str, value) -> None:
    object.__setattr__(obj, name, value)  # the documented way to set a field of a frozen dataclass


@dataclass(frozen=True)
class DataConfig:
    train_path: tuple[str, ...] = ()
    test_path: tuple[str, ...] = ()
    prompts_file: str | None = None
    max_len: int = 1024
    # A question's share of a sample: a quarter of it unless given, so --max_len alone is always
    # consistent, and the default --max_len 1024 keeps the long-standing 256.
    max_src_len: int | None = None
    is_skip: bool = False
    packing: bool = False
    max_line_bytes: int = MAX_LINE_BYTES

    def __post_init__(self):
        _fill(self, "train_path", tuple(self.train_path or ()))
        _fill(self, "test_path", tuple(self.test_path or ()))
        if self.max_src_len is None:
            _fill(self, "max_src_len", max(1, self.max_len // 4))


@dataclass(frozen=True)
class ModelConfig:
    model_name_or_path: str | None = None
    quantization_bit: int = 4
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False


@dataclass(frozen=True)
class LoraConfig:
    lora_dim: int = 8
    lora_alpha: float = 30.0
    lora_dropout: float = 0.1


@dataclass(frozen=True)
class OptimConfig:
    per_device_train_batch_size: int = 16
    per_device_eval_batch_size: int | None = None  # the train batch unless given
    learning_rate: float = 1e-3
    weight_decay: float = 0.1
    num_train_epochs: int = 1
    max_steps: int = -1
    gradient_accumulation_steps: int = 1
    warmup_ratio: float = 0.1
    seed: int = 1234

    def __post_init__(self):
        if self.per_device_eval_batch_size is None:
            _fill(self, "per_device_eval_batch_size", self.per_device_train_batch_size)


@dataclass(frozen=True)
class DistributedConfig:
    local_rank: int = -1
    ds_file: str = "ds_config.json"


@dataclass(frozen=True)
class OutputConfig:
    output_dir: str | None = None
    show_loss_step: int = 10
    save_model_step: int | None = None
    save_total_limit: int | None = None
    save_on_each_node: bool = False
    resume_from_checkpoint: str | None = None
    dry_run: bool = False


PREF_LOSSES = ("sigmoid", "ipo", "orpo", "simpo")  # utils.preference defines them
REFERENCE_FILE = "reference_logps.safetensors"  # in output_dir: the cached reference (utils.training.preference_steps)


@dataclass(frozen=True)
class PreferenceConfig:
    """The preference stage (--stage dpo; utils.preference): pairs instead of samples."""
    stage: str = "sft"
    pref_loss: str = "sigmoid"
    pref_beta: float = 0.1
    simpo_gamma: float = 0.5
    pref_packing: bool = False
    adapter: str | None = None

    def problems(self, data: DataConfig) -> list[str]:
        if self.stage != "dpo":
            given = [flag for flag, value in (("--pref_packing", self.pref_packing), ("--adapter", self.adapter))
                     if value]
            return [f"{flag} is for --stage dpo" for flag in given]
        problems = [] if self.pref_beta > 0 else [f"--pref_beta must be positive, got {self.pref_beta}"]
        if data.packing:
            problems.append("--packing packs samples; with --stage dpo use --pref_packing")
        if self.adapter and not os.path.isfile(os.path.join(self.adapter, "adapter_config.json")):
            problems.append(f"--adapter: {self.adapter!r} has no adapter_config.json")
        return problems


# Flags that must be at least 1 when given (None: not given)
AT_LEAST_ONE = ("max_src_len", "per_device_train_batch_size", "num_train_epochs", "lora_dim",
                "gradient_accumulation_steps", "show_loss_step", "save_model_step", "save_total_limit")


@dataclass(frozen=True)
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)

    @classmethod
    def from_args(cls, args) -> "TrainConfig":
        """The config of an argparse Namespace (or any object) whose attributes are named as the fields."""
        return cls(**{section.name: section.type(**{f.name: getattr(args, f.name) for f in fields(section.type)})
                      for section in fields(cls)})

    def flat(self) -> dict:
        """Every field by its flag's name, as checkpoints record it (train_args.json)."""
        return {key: list(value) if isinstance(value, tuple) else value
                for section in fields(self) for key, value in dataclasses.asdict(getattr(self, section.name)).items()}

    def __str__(self) -> str:
        """One line per section: `lora: lora_dim=8, lora_alpha=30.0, lora_dropout=0.1`."""
        lines = []
        for section in fields(self):
            values = dataclasses.asdict(getattr(self, section.name)).items()
            lines.append(f"{section.name}: " + ", ".join(
                f"{key}={' '.join(value) if isinstance(value, tuple) else value}" for key, value in values))
        return "\n".join(lines)

    def problems(self) -> list[str]:
        """Every problem with the config, so that all of them are reported at once: values, then the
        files it names (a model directory, the data, the DeepSpeed config, the output directory)."""
        problems = self._value_problems() + self.preference.problems(self.data)
        if not self.model.model_name_or_path:
            problems.append("--model_name_or_path is required")
        else:
            problems += _model_problems(self.model.model_name_or_path)
        if self.output.dry_run:
            return problems
        data = self.data
        if not data.train_path:
            problems.append("--train_path is required")
        for flag, paths in (("--train_path", data.train_path), ("--test_path", data.test_path),
                            ("--prompts_file", [data.prompts_file] if data.prompts_file else [])):
            problems += [f"{flag}: {path!r} does not exist" for path in paths if not os.path.isfile(path)]
        problems += _ds_file_problems(self)
        if not self.output.output_dir:
            problems.append("--output_dir is required")
        else:
            problems += output_dir_problems(self.output.output_dir, self.output.resume_from_checkpoint)
        return problems

    def _value_problems(self) -> list[str]:
        values = self.flat()
        problems = [f"--{name} must be at least 1, got {values[name]}"
                    for name in AT_LEAST_ONE if values[name] is not None and values[name] < 1]
        optim, data = self.optim, self.data
        # the eval batch follows the train batch unless given: a bad train batch is reported once
        eval_batch = optim.per_device_eval_batch_size
        if eval_batch < 1 and eval_batch != optim.per_device_train_batch_size:
            problems.append(f"--per_device_eval_batch_size must be at least 1, got {eval_batch}")
        if data.max_line_bytes < 1:
            problems.append(f"--max_line_bytes must be at least 1, got {data.max_line_bytes}")
        if data.max_len < 2:  # a question token and a reply token
            problems.append(f"--max_len must be at least 2, got {data.max_len}")
        elif data.max_src_len >= data.max_len:
            problems.append(f"--max_src_len ({data.max_src_len}) must be smaller than --max_len ({data.max_len})")
        if not optim.learning_rate > 0:
            problems.append("--learning_rate must be positive")
        if optim.weight_decay < 0:
            problems.append("--weight_decay must not be negative")
        if not 0 <= optim.warmup_ratio < 1:
            problems.append("--warmup_ratio must be in [0, 1)")
        if not 0 <= self.lora.lora_dropout < 1:
            problems.append("--lora_dropout must be in [0, 1)")
        return problems


def _model_problems(path: str) -> list[str]:
    from utils.models import check_model_dir

    try:
        check_model_dir(path)
    except UserError as error:
        return [f"--model_name_or_path: {error}"]
    return []


def _ds_file_problems(config: TrainConfig) -> list[str]:
    """A DeepSpeed config that cannot be filled in for this machine is found now, not after the model loads."""
    import torch

    from utils.training.deepspeed_config import fill_ds_config, read_ds_config

    cuda = torch.cuda.is_available()
    dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else torch.float32
    try:
        fill_ds_config(read_ds_config(config.distributed.ds_file), config.optim, 1, dtype, total_steps=1,
                       source=config.distributed.ds_file)
    except UserError as error:
        return [f"--ds_file: {error}"]
    return []


def output_dir_problems(output_dir: str, resume: str | None, after_start: bool = False) -> list[str]:
    """What this process sees of --output_dir (with --save_on_each_node, its own node's copy).

    Across several machines each node may see another folder, and a node that stopped here alone
    would leave the others waiting for it: there these checks wait until every process has started
    (`after_start`, utils.training.storage), when the run holds the lock and the checkpoint to resume
    from is agreed on every node."""
    from utils.lock import LOCK_FILE, check_not_locked
    from utils.training.checkpoints import BEST
    from utils.training.manifest import checkpoint_problem, scan_checkpoints
    from utils.training.storage import several_nodes

    if several_nodes() and not after_start:
        return []
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        return [f"--output_dir: {output_dir!r} is a file"]
    if not os.path.isdir(output_dir):
        return [f"--resume_from_checkpoint latest: {output_dir!r} does not exist"] if resume == "latest" else []
    locked = None if after_start else check_not_locked(os.path.join(output_dir, LOCK_FILE), f"--output_dir {output_dir!r}")
    if locked:  # before what the run holding it has written there
        return [locked]
    foreign = sorted(n for n in os.listdir(output_dir)
                     if n not in ("tensorboard", BEST, LOCK_FILE, REFERENCE_FILE)
                     and not n.startswith(("epoch-", TMP_PREFIX, "." + REFERENCE_FILE)))
    if foreign:
        return [f"--output_dir: {output_dir!r} holds files that are not this project's checkpoints ({foreign[0]})"]
    checkpoints, damaged = scan_checkpoints(output_dir)
    if (checkpoints or damaged) and not resume:
        return [f"--output_dir: {output_dir!r} already holds checkpoints; pass --resume_from_checkpoint latest"]
    if after_start:
        return []
    if resume == "latest" and not checkpoints:
        return [f"--resume_from_checkpoint latest: no complete checkpoint in {output_dir!r}"
                + (" (" + "; ".join(f"{name}: {why}" for name, why in sorted(damaged.items())) + ")" if damaged else "")]
    problem = checkpoint_problem(resume) if resume and resume != "latest" else None
    if problem:
        return [f"--resume_from_checkpoint: {resume!r} is not a complete checkpoint: {problem}"]
    return []

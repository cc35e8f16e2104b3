"""Shared pieces of the pipeline: errors, rank-0 printing, device choice, model loading,
the role-play dataset and collator, LoRA helpers, evaluation and atomic checkpoint saving."""

import json
import logging
import math
import os
import re
import sys
import time
import warnings
from array import array

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


def quiet_third_party() -> None:
    """Silence start-up notes of dependencies that say nothing actionable to a user of these
    scripts: bitsandbytes' missing optional CPU kernels, DeepSpeed's "no GPU, using the CPU"
    and its learning-rate query before the first step, and PEFT's use of a renamed
    transformers property. Call it before those packages are imported."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def quiet_deepspeed() -> None:
    from deepspeed.utils import logger

    logger.setLevel(logging.ERROR)


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


def load_tokenizer_for(model_path: str, adapter_path: str | None, trust_remote_code: bool = False):
    """The tokenizer of an adapter directory when it carries one (checkpoints do), else the model's."""
    has_own = adapter_path is not None and os.path.isfile(os.path.join(adapter_path, "tokenizer_config.json"))
    return load_tokenizer(adapter_path if has_own else model_path, trust_remote_code)


def load_for_inference(
    model_path: str,
    adapter_path: str | None = None,
    device: str | int | None = None,
    trust_remote_code: bool = False,
):
    """Model and tokenizer ready to generate: a merged directory, or a base plus a LoRA adapter.

    A checkpoint that cannot be loaded (missing weights, a corrupt adapter config, an adapter
    made for another base) is a one-line UserError.
    """
    import baichuan  # noqa: F401
    from transformers import AutoModelForCausalLM

    check_model_dir(model_path)
    if adapter_path is not None and not os.path.isfile(os.path.join(adapter_path, "adapter_config.json")):
        raise UserError(f"adapter directory {adapter_path!r} has no adapter_config.json")
    device, dtype = pick_device_dtype(device)
    try:
        tokenizer = load_tokenizer_for(model_path, adapter_path, trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, trust_remote_code=trust_remote_code)
        if adapter_path is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter_path)
    except (OSError, ValueError, RuntimeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        adapter = f" with adapter {adapter_path!r}" if adapter_path else ""
        raise UserError(f"cannot load the model from {model_path!r}{adapter}: {first_line}") from None
    model.to(device).eval()
    return model, tokenizer


# ---------------------------------------------------------------- fault points for crash tests


def stall_point(name: str) -> None:
    """Crash-safety tests stop the run here and SIGKILL it.

    Setting ROLEPLAY_STALL_AT=NAME[:N] parks the process at the Nth time (default 1st) it
    reaches the point NAME ("step", "eval" or "save"), after printing a line to say so.
    """
    wanted = os.environ.get("ROLEPLAY_STALL_AT")
    if not wanted:
        return
    point, _, nth = wanted.partition(":")
    if point != name:
        return
    stall_point.seen[name] = stall_point.seen.get(name, 0) + 1
    if stall_point.seen[name] == int(nth or 1):
        print(f"stalled at {name}", flush=True)
        time.sleep(3600)


stall_point.seen = {}


# ---------------------------------------------------------------- role-play samples


def read_samples(path: str) -> list[dict]:
    """Rows of data_helper.py's jsonl output; a bad row is a UserError naming file and line."""
    if not os.path.isfile(path):
        raise UserError(f"data file {path!r} does not exist")
    rows = []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{path}:{line_no}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{path}:{line_no}: not valid JSON ({error.msg})") from None
            for field in ("instruction", "input", "output"):
                if not isinstance(row.get(field) if isinstance(row, dict) else None, str):
                    raise UserError(f"{path}:{line_no}: field {field!r} is missing or not a string")
            rows.append(row)
    return rows


def encode_sample(tokenizer, row: dict, user_id: int, assistant_id: int, max_len: int, max_src_len: int):
    """input_ids and labels of one sample, and whether anything was cut.

    Layout: system + <user> + question + <assistant> + reply + eos. Only the reply and eos are
    trained on; everything else is labelled -100.
    """
    system = tokenizer.encode(row["instruction"], add_special_tokens=False)
    question = tokenizer.encode(row["input"], add_special_tokens=False)
    reply = tokenizer.encode(row["output"], add_special_tokens=False)
    truncated = len(question) > max_src_len
    question = question[:max_src_len]
    prompt = system + [user_id] + question + [assistant_id]
    room = max_len - len(prompt) - 1  # one place for eos
    if room < 1:
        return None, None, True
    truncated = truncated or len(reply) > room
    reply = reply[:room] + [tokenizer.eos_token_id]
    return prompt + reply, [-100] * len(prompt) + reply, truncated


class RolePlayDataset(torch.utils.data.Dataset):
    """Tokenised samples. With `skip_truncated`, samples that did not fit are dropped;
    samples whose prompt alone fills max_len are always dropped."""

    def __init__(self, path, tokenizer, user_id, assistant_id, max_len, max_src_len, skip_truncated=False):
        self.examples, self.dropped, self.truncated = [], 0, 0
        system_len = {}  # system prompt -> its token count; a role's samples share one prompt
        for row in read_samples(path):
            input_ids, labels, truncated = encode_sample(tokenizer, row, user_id, assistant_id, max_len, max_src_len)
            if input_ids is None or (truncated and skip_truncated):
                self.dropped += 1
                continue
            self.truncated += truncated
            if row["instruction"] not in system_len:
                system_len[row["instruction"]] = len(tokenizer.encode(row["instruction"], add_special_tokens=False))
            # int32 arrays take 4 bytes a token where a list takes 8 and an int object 28 or more:
            # about 12 MiB instead of 80 for RoleBench's 8,020 samples, in every rank
            prefix_len = system_len[row["instruction"]]
            self.examples.append({"input_ids": array("i", input_ids), "labels": array("i", labels), "prefix_len": prefix_len})
        if not self.examples:
            raise UserError(f"{path}: no sample left after filtering ({self.dropped} dropped as too long)")

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, index):
        return self.examples[index]

    def lengths(self) -> list[int]:
        return [len(e["input_ids"]) for e in self.examples]


def pack_examples(examples: list[dict], max_len: int) -> list[dict]:
    """Rows of at most max_len tokens: samples that share a system prompt, with the prompt
    stored once at the head of the row and each sample's own tokens after it (first fit,
    longest first). Every sample sees the prompt and itself, so it gets the same logits as
    alone; on RoleBench the prompt is most of a sample, so this computes far fewer tokens.
    Deterministic: the rows depend only on the samples."""
    groups: dict[tuple, list[int]] = {}
    for i, example in enumerate(examples):
        groups.setdefault(tuple(example["input_ids"][: example.get("prefix_len", 0)]), []).append(i)
    rows = []
    for prefix, members in groups.items():
        own = {i: len(examples[i]["input_ids"]) - len(prefix) for i in members}
        first_row = len(rows)
        for i in sorted(members, key=lambda i: (-own[i], i)):
            for row in rows[first_row:]:
                if row["room"] >= own[i]:
                    row["samples"].append(examples[i])
                    row["room"] -= own[i]
                    break
            else:
                rows.append({"prefix": list(prefix), "samples": [examples[i]], "room": max_len - len(prefix) - own[i]})
    return [{"prefix": row["prefix"], "samples": row["samples"]} for row in rows]


class PackedDataset(torch.utils.data.Dataset):
    def __init__(self, dataset: RolePlayDataset, max_len: int):
        self.rows = pack_examples(dataset.examples, max_len)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]

    def lengths(self) -> list[int]:
        return [len(row["prefix"]) + sum(len(e["input_ids"]) - len(row["prefix"]) for e in row["samples"]) for row in self.rows]


def samples_of(item: dict) -> list[dict]:
    """The samples in one batch item: a packed row's, or the item itself."""
    return item["samples"] if "prefix" in item else [item]


def sample_counts(batch: list) -> tuple[int, int]:
    """(samples, their tokens) in a batch of samples or packed rows; a packed row's shared
    prompt counts once per sample, as each sample alone would have it."""
    samples = [e for item in batch for e in samples_of(item)]
    return len(samples), sum(len(e["input_ids"]) for e in samples)


def collate(batch: list, pad_id: int) -> dict:
    """Right-pad a batch to its longest row.

    An item is one sample or a packed row (`pack_examples`). In a packed row the attention mask
    marks the shared prompt -1 and numbers the samples 1, 2, 3, ..., so that each sample sees
    the prompt and itself only, and position ids continue from the prompt in every sample.
    """
    rows = []
    for item in batch:
        prefix = item.get("prefix", [])
        rows.append((prefix, [(e["input_ids"][len(prefix) :], e["labels"][len(prefix) :]) for e in samples_of(item)]))
    width = max(len(prefix) + sum(len(ids) for ids, _ in parts) for prefix, parts in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (prefix, parts) in enumerate(rows):
        p = len(prefix)
        input_ids[r, :p] = torch.tensor(prefix, dtype=torch.long)
        attention_mask[r, :p] = -1
        position_ids[r, :p] = torch.arange(p)
        start = p
        for segment, (ids, row_labels) in enumerate(parts, 1):
            n = len(ids)
            input_ids[r, start : start + n] = torch.tensor(ids)
            labels[r, start : start + n] = torch.tensor(row_labels)
            attention_mask[r, start : start + n] = segment
            position_ids[r, start : start + n] = torch.arange(p, p + n)
            start += n
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "position_ids": position_ids}


def length_grouped_batches(lengths, batch_size, seed, epoch, world_size=1, rank=0, group=50):
    """This rank's batches (lists of indices) for one epoch.

    Indices are shuffled with (seed, epoch), cut into groups of `group` batches, sorted by
    length inside each group so that a batch holds rows of similar length (little padding),
    and the batches are shuffled again. Every rank gets the same number of batches; the
    few left over at the end are dropped.
    """
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    span = batch_size * group
    batches = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: -lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    per_rank = len(batches) // world_size
    return batches[rank * per_rank : (rank + 1) * per_rank]


# ---------------------------------------------------------------- LoRA helpers


def find_all_linear_names(model) -> list[str]:
    """Names (last component) of the linear layers to put LoRA on: all but lm_head."""
    import bitsandbytes as bnb

    names = set()
    for full_name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, bnb.nn.Linear4bit)) and not full_name.endswith("lm_head"):
            names.add(full_name.rsplit(".", 1)[-1])
    return sorted(names)


def parameter_counts(model, assume_4bit: bool = False) -> tuple[int, int, int]:
    """(trainable, stored total, full total) parameter counts.

    A 4-bit weight is stored packed two to a byte, so its tensor has half as many elements.
    The stored total counts those elements, which is what PEFT printed when the book was
    written (35,782,656 trainable = 0.8314% for Baichuan2-7B with LoRA rank 16); the full total
    counts every weight once, as PEFT does now. `assume_4bit` treats the frozen weights of
    linear layers (lm_head excepted) as 4-bit, for a skeleton built on the meta device.
    """
    trainable = stored = full = 0
    packed = set()
    if assume_4bit:
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
                packed.add(id(module.weight))
    for param in model.parameters():
        n = param.numel()
        if param.__class__.__name__ == "Params4bit":
            stored += n
            full += n * 2 * param.element_size()
        elif id(param) in packed and not param.requires_grad:
            stored += n // 2
            full += n
        else:
            stored += n
            full += n
        if param.requires_grad:
            trainable += n
    return trainable, stored, full


def print_trainable_parameters(model, assume_4bit: bool = False) -> None:
    trainable, stored, full = parameter_counts(model, assume_4bit)
    print_rank_0(
        f"trainable params: {trainable:,} || all params: {stored:,} || trainable%: {100 * trainable / stored:.4f}"
        f"  (counting each 4-bit weight once: {full:,} params, {100 * trainable / full:.4f}%)"
    )


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model, loader, device) -> tuple[float, float]:
    """Token-weighted mean loss over the whole test set (all ranks), and its perplexity."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of losses, labelled tokens)
    for batch in loader:
        stall_point("eval")
        batch = {k: v.to(device) for k, v in batch.items()}
        count = (batch["labels"][:, 1:] != -100).sum()
        loss = model(**batch).loss
        totals += torch.stack([loss.double() * count, count.double()])
    if dist.is_initialized():
        dist.all_reduce(totals)
    model.train()
    mean = (totals[0] / totals[1].clamp_min(1)).item()
    return mean, math.exp(min(mean, 50.0))


# ---------------------------------------------------------------- checkpoints


CHECKPOINT_NAME = re.compile(r"^epoch-(\d+)-step-(\d+)$")
TMP_PREFIX = ".tmp-"


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints in output_dir, oldest first. Half-written ones (still under
    their temporary name, or without trainer_state.json) are never listed."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT_NAME.match(name)
        if match and os.path.isfile(os.path.join(output_dir, name, "trainer_state.json")):
            found.append((int(match[2]), int(match[1]), name))
    return [os.path.join(output_dir, name) for _, _, name in sorted(found)]


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
    os.replace(tmp, path)

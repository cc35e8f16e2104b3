"""Training samples: reading data_helper.py's rows, laying them out as Baichuan2-Chat token ids,
packing rows that share a system prompt, and batching them by length.

Layout of a sample (utils.prompts.LAYOUT): system + <user> + question + <assistant> + reply + eos.
Only the reply and its eos are trained on; everything else is labelled -100.
"""

from array import array

import torch

from utils import UserError, read_jsonl
from utils.prompts import Role

def read_samples(path: str) -> list[dict]:
    """Rows of data_helper.py's jsonl output; a bad row is a UserError naming file and line."""
    rows = []
    for line_no, row in read_jsonl(path):
        for field in ("instruction", "input", "output"):
            if not isinstance(row.get(field) if isinstance(row, dict) else None, str):
                raise UserError(f"{path}:{line_no}: field {field!r} is missing or not a string")
        rows.append(row)
    if not rows:
        raise UserError(f"{path}: no sample in the file")
    return rows


def roles_of(rows: list[dict]) -> dict[str, Role]:
    """The roles that rows name (field "role"), each with the system prompt of its first row and its
    greeting; these are what a checkpoint records as trained on."""
    roles = {}
    for row in rows:
        name = row.get("role")
        if isinstance(name, str) and name and name not in roles:
            roles[name] = Role(name, row["instruction"], row.get("greeting"))
    return roles


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
    """Tokenised samples, and the roles they play (`roles`). With `skip_truncated`, samples that
    did not fit are dropped; samples whose prompt alone fills max_len are always dropped."""

    def __init__(self, path, tokenizer, user_id, assistant_id, max_len, max_src_len, skip_truncated=False):
        self.examples, self.dropped, self.truncated = [], 0, 0
        system_len = {}  # system prompt -> its token count; a role's samples share one prompt
        rows = read_samples(path)
        self.roles = roles_of(rows)
        for row in rows:
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


def length_grouped_batches(lengths, batch_size, seed, epoch, world_size=1, rank=0) -> list[list[int]]:
    """This rank's batches (lists of indices) for one epoch, seeded by (seed, epoch).

    transformers' length grouping orders the indices (shuffled, then sorted by length inside
    mega-batches of 50 batches, the longest batch first); the order is cut into steps of
    `batch_size` x `world_size` and each rank takes its slice of every step, so the ranks of one
    step get rows of similar length. An incomplete last step is dropped, so all ranks get the
    same number of batches.
    """
    from transformers.trainer_pt_utils import get_length_grouped_indices

    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    step = batch_size * world_size
    order = get_length_grouped_indices(lengths, step, generator=generator)
    first = rank * batch_size
    return [order[start + first : start + first + batch_size] for start in range(0, len(order) - step + 1, step)]

"""Training samples: reading rows of single-turn samples and of conversations, laying them out
as Baichuan2-Chat token ids, packing rows that share a system prompt, and batching them by length.

A row of a jsonl file is one of three shapes, and one file may mix them:
    {"instruction": system prompt, "input": question, "output": reply}       (data_helper.py's)
    {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}  (OpenAI)
    {"conversations": [{"from": "human"|"gpt", "value": ...}, ...], "system": ...}  (ShareGPT)
plus, optionally, "role" (the character's name), "greeting" (its first_mes) and "base_system" (its
prompt without the lorebook entries and group note that this row's prompt holds), which the
checkpoints record. A system message may only come first. A message may carry "train": false
(context only: a greeting, a turn not to learn) and a "name" (a group scene's speaker).

The token layout and its labels are baichuan.generation_utils's (encode_conversation), the same
code that lays out a chat for serving; this module reads rows, drops or counts what does not fit,
and packs and batches.
"""

from array import array

import torch

from utils.cli import UserError
from utils.files import MAX_LINE_BYTES, read_jsonl
from utils.prompts import Role, name_problem
from utils.scenes import is_scene

# ShareGPT's "from" values, and the OpenAI roles they stand for
SPEAKERS = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _turns(items, field: str, speaker_key: str, text_key: str, names: dict, scene: bool) -> list[dict]:
    if not isinstance(items, list) or not items:
        raise ValueError(f"field {field!r} must be a non-empty list")
    messages = []
    for i, item in enumerate(items):
        where = f"{field}[{i}]"
        if not isinstance(item, dict):
            raise ValueError(f"{where} must be an object")
        speaker, text = item.get(speaker_key), item.get(text_key)
        if not isinstance(speaker, str) or speaker not in names:
            tools = " (tool calls are not trained on)" if speaker in ("tool", "function", "function_call", "observation") else ""
            raise ValueError(f"{where}.{speaker_key} must be one of {', '.join(names)}, got {speaker!r}{tools}")
        if not isinstance(text, str):
            raise ValueError(f"{where}.{text_key} must be a string")
        role = names[speaker]
        if role == "system" and i:
            raise ValueError(f"{where}: a system message may only come first")
        if role != "system" and not text.strip():
            raise ValueError(f"{where}.{text_key} is empty")
        message = {"role": role, "content": text}
        for key, kind, what in (("name", str, "a string"), ("train", bool, "true or false")):
            if item.get(key) is not None:
                if not isinstance(item[key], kind):
                    raise ValueError(f"{where}.{key} must be {what}")
                message[key] = item[key]
        if message.get("name") is not None and name_problem(message["name"]):
            raise ValueError(f"{where}.name {message['name']!r} is empty or contains a control or bidi character")
        messages.append(message)
    if not scene and is_scene(messages):
        raise ValueError(f"field {field!r}: a group scene (assistant turns of several names): data_helper.py "
                         f"--dialogues trains each character from its own seat")
    for i in range(1, len(messages)):
        previous, message = messages[i - 1], messages[i]
        if message["role"] == previous["role"] and not (scene and message.get("name") != previous.get("name")):
            # a reply followed by a reply would never learn to end
            raise ValueError(f"{field}[{i}]: a second {message['role']} message in a row (merge them, or put the "
                             f"other speaker between)")
    return messages


def row_messages(row, scene: bool = False) -> list[dict]:
    """The conversation of a row of any of the three shapes, checked: an optional system message,
    then user and assistant messages, each with its optional "name" and "train" (false: context,
    not trained on). A problem is a ValueError naming the field. A group scene (assistant turns of
    several names, which may follow each other) is read only with `scene`: training takes one
    character's seat of it (utils.scenes)."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    for field in ("role", "greeting", "base_system"):
        if row.get(field) is not None and not isinstance(row[field], str):
            raise ValueError(f"field {field!r} must be a string")
    shapes = [field for field in ("messages", "conversations", "instruction", "input", "output") if field in row]
    if len(shapes) > 1 and shapes[0] in ("messages", "conversations"):  # one of them would be dropped unseen
        raise ValueError(f"a row of two shapes: fields {shapes[0]!r} and {shapes[1]!r} (keep one: messages, "
                         f"conversations, or instruction/input/output)")
    if "messages" in row:
        roles = {r: r for r in ("system", "user", "assistant")}
        messages = _turns(row["messages"], "messages", "role", "content", roles, scene)
    elif "conversations" in row:
        messages = _turns(row["conversations"], "conversations", "from", "value", SPEAKERS, scene)
        system = row.get("system")
        if system is not None:
            if not isinstance(system, str):
                raise ValueError("field 'system' must be a string")
            if messages[0]["role"] == "system":
                raise ValueError("a system prompt both in field 'system' and in conversations[0]")
            messages.insert(0, {"role": "system", "content": system})
    else:
        for field in ("instruction", "input", "output"):
            if not isinstance(row.get(field), str):
                raise ValueError(f"field {field!r} is missing or not a string (nor is there 'messages' or "
                                 f"'conversations')")
        messages = [{"role": "system", "content": row["instruction"]}, {"role": "user", "content": row["input"]},
                    {"role": "assistant", "content": row["output"]}]
    return [m for m in messages if m["role"] != "system" or m["content"]]


def system_of(messages: list[dict]) -> str:
    return messages[0]["content"] if messages and messages[0]["role"] == "system" else ""


class Samples(list):
    """Rows as read_samples returns them, a plain list to every reader, that also keeps the
    messages each row was checked into, so that the dataset and roles_of do not parse a row again
    (row_messages ran three times a row). The rows themselves are left as read: they are what
    other code and the files on disk know."""

    def __init__(self, checked=()):
        checked = list(checked)
        super().__init__(row for row, _ in checked)
        # keyed by id and holding the row itself, so a key cannot be reused by another object
        self._checked = {id(row): (row, messages) for row, messages in checked}

    def messages_of(self, row) -> list[dict]:
        """The row's messages as checked when read; a row not read here (or a list edited since) is
        parsed again."""
        kept = self._checked.get(id(row))
        return kept[1] if kept is not None and kept[0] is row else row_messages(row)

    def extend_checked(self, other: "Samples") -> None:
        self.extend(other)
        self._checked.update(other._checked)


def messages_of(rows, row) -> list[dict]:
    """The messages of a row of `rows`: those kept by read_samples, or parsed now."""
    return rows.messages_of(row) if isinstance(rows, Samples) else row_messages(row)


def read_samples(path: str, max_line_bytes: int = MAX_LINE_BYTES) -> Samples:
    """Rows of a jsonl file of samples and conversations; a bad row, or a line longer than
    `max_line_bytes`, is a UserError naming file and line (an unbounded line was read, tokenised
    and trained whole: 100 MB took 10.8 GB)."""
    checked = []
    for line_no, row in read_jsonl(path, max_line_bytes):
        try:
            checked.append((row, row_messages(row)))
        except ValueError as error:
            raise UserError(f"{path}:{line_no}: {error}") from None
    if not checked:
        raise UserError(f"{path}: no sample in the file")
    return Samples(checked)


def roles_of(rows: list[dict]) -> dict[str, Role]:
    """The roles that rows name (field "role"), each with the system prompt of its first row (its
    "base_system" when the row's prompt also holds lorebook entries or a group note) and its
    greeting; these are what a checkpoint records as trained on."""
    roles = {}
    for row in rows:
        name = row.get("role")
        if isinstance(name, str) and name and name not in roles:
            system = row.get("base_system") or system_of(messages_of(rows, row))
            roles[name] = Role(name, system, row.get("greeting"))
    return roles


def encode_sample(tokenizer, row: dict, user_id: int, assistant_id: int, max_len: int, max_src_len: int):
    """input_ids, labels and whether anything was cut, of a row of any shape
    (baichuan.generation_utils.encode_conversation)."""
    # imported here: it loads transformers, which data_helper.py's row checks do not need
    from baichuan.generation_utils import encode_conversation

    return encode_conversation(tokenizer, row_messages(row), user_id, assistant_id, max_len, max_src_len)


def read_files(paths, max_line_bytes: int = MAX_LINE_BYTES) -> Samples:
    """The rows of one or more sample files, in order, each file checked as read_samples does."""
    rows = Samples()
    for path in [paths] if isinstance(paths, str) else paths:
        rows.extend_checked(read_samples(path, max_line_bytes))
    return rows


class RolePlayDataset(torch.utils.data.Dataset):
    """Tokenised samples (rows from read_files, `source` naming their files in messages), and the
    roles they play (`roles`). With `skip_truncated`, samples that did not fit are dropped; samples
    whose prompt alone fills max_len (`too_long`) and conversations without a reply (`no_reply`) are
    always dropped."""

    def __init__(self, rows, tokenizer, user_id, assistant_id, max_len, max_src_len, skip_truncated=False,
                 source="the samples"):
        from baichuan.generation_utils import encode_conversation, encode_text

        self.examples, self.truncated, self.too_long, self.no_reply, self.conversations = [], 0, 0, 0, 0
        system_len = {}  # system prompt -> its token count; a role's samples share one prompt
        self.roles = roles_of(rows)
        for row in rows:
            messages = messages_of(rows, row)
            input_ids, labels, truncated = encode_conversation(tokenizer, messages, user_id, assistant_id, max_len,
                                                               max_src_len)
            if input_ids is None and not truncated:
                self.no_reply += 1
                continue
            if input_ids is None or (truncated and skip_truncated):
                self.too_long += 1
                continue
            self.truncated += truncated
            self.conversations += sum(m["role"] == "assistant" for m in messages) > 1
            system = system_of(messages)
            if system not in system_len:
                system_len[system] = len(encode_text(tokenizer, system)) if system else 0
            # int32 arrays take 4 bytes a token where a list takes 8 and an int object 28 or more:
            # about 12 MiB instead of 80 for RoleBench's 8,020 samples, in every rank
            self.examples.append({"input_ids": array("i", input_ids), "labels": array("i", labels),
                                  "prefix_len": system_len[system]})
        if not self.examples:
            raise UserError(f"{source}: no sample left after filtering ({self.summary()})")

    @property
    def dropped(self) -> int:
        return self.too_long + self.no_reply

    def summary(self) -> str:
        return (f"{self.conversations} of several turns; {self.truncated} cut to fit, {self.dropped} dropped: "
                f"{self.too_long} too long, {self.no_reply} without a reply")

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

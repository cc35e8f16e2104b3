"""Preference pairs: reading and checking rows of a prompt with a chosen and a rejected reply,
laying them out as Baichuan2-Chat token ids, and batching them, one sequence a reply or packed.

A row is any of utils/data.py's shapes without its last reply, plus the two replies:
    {"instruction": system prompt, "input": question, "chosen": reply, "rejected": reply}
    {"messages": [..., {"role": "user", ...}], "chosen": reply, "rejected": reply}
    {"conversations": [..., {"from": "human", ...}], "system": ..., "chosen": reply, "rejected": reply}
with "role" and "greeting" as there. A reply is a string, or, as in TRL's conversational rows, a
list of messages ending with the assistant's reply; the messages before it are more of the prompt
(with no "messages", "conversations" or "input", all of it: TRL's implicit prompt) and must be the
same in both replies. The prompt ends with the user's turn that both replies answer.

Layout: the prompt is baichuan.generation_utils.build_chat_input's, the same for both replies, and
each reply is encode_reply's (its text, then eos, all labelled). Too long a pair keeps the system
prompt and the newest whole rounds that leave room for the longer reply; a reply is cut to half
of max_len.

Packing (`PackedPairs`): a row holds whole pairs, its shared tokens once at its head (attention
mask -1, utils.data.collate's layout) and each reply as a segment that attends to the head and
itself only, never to the other reply. A row with one pair shares its whole prompt but the final
<assistant> token; a row with several pairs of one role shares the role's system prompt, and each
segment carries its own history. The shared head ends before a token labelled -100 (the <assistant>
or <user> that opens a segment), so that every reply token is predicted inside its own segment.
"""

from array import array

import torch

from utils.cli import UserError
from utils.files import MAX_LINE_BYTES, read_jsonl
from utils.data import collate, row_messages, roles_of, system_of

REPLY_FIELDS = ("chosen", "rejected")


def _reply(row: dict, field: str) -> tuple[list, str]:
    """(the messages before the reply, the reply's text) of field "chosen" or "rejected"."""
    value = row.get(field)
    if isinstance(value, str):
        history, text = [], value
    elif (isinstance(value, list) and value and all(isinstance(m, dict) for m in value)
          and value[-1].get("role") == "assistant"):
        history, text = value[:-1], value[-1].get("content")
    else:
        raise ValueError(f"field {field!r} must be the reply: a string, or a list of messages ending with the "
                         f"assistant's")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"field {field!r}: the reply is empty")
    return history, text


def pair_of(row) -> tuple[list[dict], str, str]:
    """(prompt messages, chosen reply, rejected reply) of a pairs row, checked; a problem is a
    ValueError naming the field."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    if "output" in row and not any(field in row for field in REPLY_FIELDS):
        raise ValueError("a training sample, not a pair: fields 'chosen' and 'rejected' are missing")
    (chosen_history, chosen), (rejected_history, rejected) = (_reply(row, field) for field in REPLY_FIELDS)
    if chosen_history != rejected_history:
        raise ValueError("'chosen' and 'rejected' do not share their history: the messages before the replies differ")
    if chosen.strip() == rejected.strip():
        raise ValueError("'chosen' and 'rejected' are the same reply")
    prompt = {field: row[field] for field in ("role", "greeting") if field in row}
    if "messages" in row or "conversations" in row:
        messages = row_messages(row)
    elif "instruction" in row or "input" in row:
        # row_messages reads this shape with its reply; the reply is left out again
        messages = row_messages({**prompt, "instruction": row.get("instruction", ""), "input": row.get("input"),
                                 "output": ""})[:-1]
    else:
        messages = []
    messages = row_messages({**prompt, "messages": messages + chosen_history}) if chosen_history else messages
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("the prompt must end with the user's turn that both replies answer")
    return messages, chosen, rejected


def read_pairs(paths, max_line_bytes: int = MAX_LINE_BYTES) -> list[dict]:
    """The rows of one or more pairs files, checked; a bad row, or a line longer than
    `max_line_bytes`, is a UserError naming file and line."""
    rows = []
    for path in [paths] if isinstance(paths, str) else paths:
        count = 0
        for line_no, row in read_jsonl(path, max_line_bytes):
            try:
                pair_of(row)
            except ValueError as error:
                raise UserError(f"{path}:{line_no}: {error}") from None
            rows.append(row)
            count += 1
        if not count:
            raise UserError(f"{path}: no pair in the file")
    return rows


def encode_pair(tokenizer, messages: list[dict], chosen: str, rejected: str, generation_config, max_len: int):
    """{"prompt", "chosen", "rejected": token ids} of a pair (module docstring), or None when the
    system prompt leaves no room for the replies."""
    from baichuan.generation_utils import build_chat_input, encode_reply

    try:
        replies = []
        for reply in (chosen, rejected):
            ids, labels = encode_reply(tokenizer, messages, reply, generation_config, max_len)
            replies.append(ids[len(ids) - sum(label != -100 for label in labels):])
        prompt = build_chat_input(tokenizer, messages, generation_config, max_len, max(map(len, replies)))
    except ValueError:  # the system prompt alone fills max_len
        return None
    return {"prompt": prompt, "chosen": replies[0], "rejected": replies[1]}


class PairDataset(torch.utils.data.Dataset):
    """Encoded pairs of checked rows (read_pairs), with the roles they play (`roles`); pairs whose
    system prompt fills max_len are dropped (`too_long`). An item is {"index", "prompt", "chosen",
    "rejected", "system_len"}, the ids as int32 arrays."""

    def __init__(self, rows, tokenizer, generation_config, max_len: int, source="the pairs"):
        from baichuan.generation_utils import encode_text

        self.examples, self.too_long = [], 0
        self.roles = roles_of([{"role": row.get("role"), "greeting": row.get("greeting"), "messages": pair_of(row)[0]}
                               for row in rows if isinstance(row.get("role"), str)])
        system_len = {}
        for row in rows:
            messages, chosen, rejected = pair_of(row)
            pair = encode_pair(tokenizer, messages, chosen, rejected, generation_config, max_len)
            if pair is None:
                self.too_long += 1
                continue
            system = system_of(messages)
            if system not in system_len:
                system_len[system] = len(encode_text(tokenizer, system)) if system else 0
            self.examples.append({"index": len(self.examples), "system_len": system_len[system],
                                  **{key: array("i", ids) for key, ids in pair.items()}})
        if not self.examples:
            raise UserError(f"{source}: no pair left: the system prompts fill max_len={max_len}")

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, index):
        return self.examples[index]

    def lengths(self) -> list[int]:
        """The width each pair pads its batch to (its longer sequence)."""
        return [len(e["prompt"]) + max(len(e["chosen"]), len(e["rejected"])) for e in self.examples]


def _own_tokens(pair: dict, shared: int) -> int:
    """Tokens of a pair's two segments after a shared head of `shared` tokens."""
    return 2 * (len(pair["prompt"]) - shared) + len(pair["chosen"]) + len(pair["rejected"])


def pack_pairs(pairs: list[dict], max_len: int) -> list[dict]:
    """Rows {"prefix": shared ids, "pairs": [pair, ...]} of at most max_len tokens (first fit, the
    largest pairs first, within each system prompt). Deterministic: the rows depend only on the pairs."""
    groups: dict[tuple, list[dict]] = {}
    for pair in pairs:
        groups.setdefault(tuple(pair["prompt"][: pair["system_len"]]), []).append(pair)
    rows = []
    for system, members in groups.items():
        first_row = len(rows)
        for pair in sorted(members, key=lambda p: (-_own_tokens(p, len(system)), p["index"])):
            own = _own_tokens(pair, len(system))
            for row in rows[first_row:]:
                if row["room"] >= own:
                    row["pairs"].append(pair)
                    row["room"] -= own
                    break
            else:
                rows.append({"prefix": list(system), "pairs": [pair], "room": max_len - len(system) - own})
    for row in rows:
        if len(row["pairs"]) == 1:  # the whole prompt but its final <assistant> (module docstring)
            row["prefix"] = list(row["pairs"][0]["prompt"][:-1])
    return [{"prefix": row["prefix"], "pairs": row["pairs"]} for row in rows]


class PackedPairs(torch.utils.data.Dataset):
    def __init__(self, dataset: PairDataset, max_len: int):
        self.rows = pack_pairs(dataset.examples, max_len)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]

    def lengths(self) -> list[int]:
        return [len(row["prefix"]) + sum(_own_tokens(p, len(row["prefix"])) for p in row["pairs"]) for row in self.rows]


def pairs_of(item: dict) -> list[dict]:
    """The pairs in one batch item: a packed row's, or the item itself."""
    return item["pairs"] if "prefix" in item else [item]


def pair_counts(batch: list) -> tuple[int, int]:
    """(pairs, their tokens) in a batch of pairs or packed rows; a pair's tokens are those of its two
    sequences unpacked (the prompt twice), so that tokens/s means the same with and without packing."""
    pairs = [p for item in batch for p in pairs_of(item)]
    return len(pairs), sum(2 * len(p["prompt"]) + len(p["chosen"]) + len(p["rejected"]) for p in pairs)


def _sequence(pair: dict, reply: str) -> dict:
    ids = list(pair["prompt"]) + list(pair[reply])
    return {"input_ids": ids, "labels": [-100] * len(pair["prompt"]) + list(pair[reply])}


def collate_pairs(batch: list, pad_id: int) -> dict:
    """utils.data.collate's tensors for a batch of pairs (each as two rows: prompt + chosen, prompt +
    rejected) or of packed rows, plus
        pair_index      (n,) the dataset index of each of the batch's n pairs,
        sequence_ids    (b, s) at each labelled position, which sequence it belongs to: i for the
                        chosen reply of pair i, n + i for its rejected one; -1 elsewhere.
    The order is TRL's: all chosen replies, then all rejected ones."""
    pairs = [p for item in batch for p in pairs_of(item)]
    n = len(pairs)
    if all("prefix" in item for item in batch):
        items, segment_sequences, i = [], [], 0
        for item in batch:
            samples, sequences = [], []
            for pair in item["pairs"]:
                samples += [_sequence(pair, "chosen"), _sequence(pair, "rejected")]
                sequences += [i, n + i]
                i += 1
            items.append({"prefix": item["prefix"], "samples": samples})
            segment_sequences.append(sequences)
    elif not any("prefix" in item for item in batch):
        items = [_sequence(pair, "chosen") for pair in pairs] + [_sequence(pair, "rejected") for pair in pairs]
        segment_sequences = [[i] for i in range(2 * n)]
    else:
        raise ValueError("a batch mixes packed rows and single pairs")
    out = collate(items, pad_id)
    width = max(map(len, segment_sequences))
    lookup = torch.tensor([s + [-1] * (width - len(s)) for s in segment_sequences])  # (b, segments)
    segment = out["attention_mask"].clamp_min(1) - 1  # a segment's index in its row; the head's never labelled
    sequence_ids = lookup.gather(1, segment)
    out["sequence_ids"] = sequence_ids.masked_fill(out["labels"] == -100, -1)
    out["pair_index"] = torch.tensor([p["index"] for p in pairs])
    return out

"""Multi-turn training samples (utils.data): the three row shapes, the token layout pinned to
build_chat_input / apply_chat_template and to Baichuan2's own fine-tune labelling, truncation to
the newest whole rounds, and shared-prompt packing of conversations."""

import json

import pytest
import torch
from transformers import GenerationConfig

from baichuan import BaichuanForCausalLM, BaichuanTokenizer
from baichuan.generation_utils import build_chat_input, chat_template, encode_conversation
from conftest import REAL_TOKENIZER, requires_real_tokenizer
from helpers import assert_packing_is_exact
from utils.cli import UserError
from utils.data import (PackedDataset, RolePlayDataset, encode_sample, read_files, read_samples, roles_of,
                        row_messages)

SYSTEM = "你现在要扮演张飞。请始终以张飞的口吻说话。"
DIALOGUE = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "将军，你的兵器是什么？"},
    {"role": "assistant", "content": "丈八蛇矛！俺老张使了半辈子。"},
    {"role": "user", "content": "那你最爱喝什么酒？"},
    {"role": "assistant", "content": "烈的！越烈越好，喝个痛快！"},
    {"role": "user", "content": "你怕过谁吗？"},
    {"role": "assistant", "content": "俺燕人张翼德，天不怕地不怕！"},
]
GREETING_FIRST = [DIALOGUE[0], {"role": "assistant", "content": "来者何人？报上名来！"}, *DIALOGUE[1:5]]


@pytest.fixture(scope="module", params=["tiny", pytest.param("real", marks=requires_real_tokenizer)])
def tokenizer(request, tiny_model_dir):
    if request.param == "real":
        return BaichuanTokenizer(vocab_file=str(REAL_TOKENIZER))
    return BaichuanTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def chat_ids(tiny_model_dir):
    config = GenerationConfig.from_pretrained(tiny_model_dir)
    return config, config.user_token_id, config.assistant_token_id


def official_labels(tokenizer, messages, user_id, assistant_id):
    """Baichuan2's fine-tune script (fine-tune/fine-tune.py, preprocessing), rewritten: a user turn
    is labelled eos + -100 for its text, an assistant turn -100 + its tokens, eos closes the sample;
    except that the first user turn's eos label, which would teach eos right after the system
    prompt, is masked."""
    ids, labels = [], []
    system = messages[0]["content"] if messages[0]["role"] == "system" else ""
    if system:
        ids += tokenizer.encode(system, add_special_tokens=False)
        labels += [-100] * len(ids)
    for i, message in enumerate(m for m in messages if m["role"] != "system"):
        text = tokenizer.encode(message["content"], add_special_tokens=False)
        if message["role"] == "user":
            ids += [user_id] + text
            labels += [tokenizer.eos_token_id if i else -100] + [-100] * len(text)
        else:
            ids += [assistant_id] + text
            labels += [-100] + text
    return ids + [tokenizer.eos_token_id], labels + [tokenizer.eos_token_id]


@pytest.mark.parametrize("messages", [DIALOGUE, DIALOGUE[:3], DIALOGUE[1:], GREETING_FIRST],
                         ids=["three-rounds", "single-turn", "no-system", "greeting-first"])
def test_input_ids_are_the_chat_layout_and_labels_the_official_ones(tokenizer, chat_ids, messages):
    config, user_id, assistant_id = chat_ids
    ids, labels, cut = encode_conversation(tokenizer, messages, user_id, assistant_id, 4096, 1024)
    assert not cut
    # the input is exactly what a chat front end sends for this history, then eos
    assert ids[:-1] == build_chat_input(tokenizer, messages, config, 100_000, 1)
    tokenizer.chat_template = chat_template(tokenizer, config)  # the real tokenizer file has none
    assert ids[:-1] == tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert ids[-1] == tokenizer.eos_token_id
    assert (ids, labels) == official_labels(tokenizer, messages, user_id, assistant_id)


def test_labelled_positions_are_each_reply_and_its_end(tokenizer, chat_ids):
    _, user_id, assistant_id = chat_ids
    eos = tokenizer.eos_token_id
    ids, labels, _ = encode_conversation(tokenizer, DIALOGUE, user_id, assistant_id, 4096, 1024)
    expected, position = set(), len(tokenizer.encode(SYSTEM, add_special_tokens=False))
    for message in DIALOGUE[1:]:
        text = tokenizer.encode(message["content"], add_special_tokens=False)
        if message["role"] == "assistant":
            expected |= set(range(position + 1, position + 1 + len(text)))
            expected.add(position + 1 + len(text))  # what follows the reply: <user> (its label eos), or eos
        position += 1 + len(text)
    assert {i for i, label in enumerate(labels) if label != -100} == expected
    ends = sorted(i for i, label in enumerate(labels) if label == eos)
    assert len(ends) == 3 and [ids[i] for i in ends] == [user_id, user_id, eos]  # no eos inside the history
    assert all(labels[i] == ids[i] for i in expected - set(ends))


def test_single_turn_rows_are_one_round_conversations(tokenizer, chat_ids):
    _, user_id, assistant_id = chat_ids
    row = {"instruction": SYSTEM, "input": "你好", "output": "俺老张来也！", "role": "张飞"}
    as_messages = {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "你好"},
                                {"role": "assistant", "content": "俺老张来也！"}]}
    as_sharegpt = {"system": SYSTEM, "conversations": [{"from": "human", "value": "你好"},
                                                       {"from": "gpt", "value": "俺老张来也！"}]}
    encoded = {json.dumps(encode_sample(tokenizer, r, user_id, assistant_id, 256, 64)) for r in
               (row, as_messages, as_sharegpt)}
    assert len(encoded) == 1


def test_long_conversations_keep_the_system_prompt_and_the_newest_whole_rounds(tokenizer, chat_ids):
    _, user_id, assistant_id = chat_ids
    full, _, _ = encode_conversation(tokenizer, DIALOGUE, user_id, assistant_id, 4096, 1024)
    system = len(tokenizer.encode(SYSTEM, add_special_tokens=False))
    last_two, _, _ = encode_conversation(tokenizer, [DIALOGUE[0], *DIALOGUE[3:]], user_id, assistant_id, 4096, 1024)
    last_one, last_one_labels, _ = encode_conversation(tokenizer, [DIALOGUE[0], *DIALOGUE[5:]], user_id,
                                                       assistant_id, 4096, 1024)
    for max_len, expected in ((len(full), full), (len(full) - 1, last_two), (len(last_two), last_two),
                              (len(last_two) - 1, last_one), (len(last_one), last_one)):
        ids, labels, cut = encode_conversation(tokenizer, DIALOGUE, user_id, assistant_id, max_len, 1024)
        assert ids == expected and cut == (expected != full), max_len
        assert labels[system] == -100  # the first kept user turn after the system prompt: no eos label
    # the newest round alone too long: its reply is cut, eos kept; with no room for a reply, dropped
    ids, labels, cut = encode_conversation(tokenizer, DIALOGUE, user_id, assistant_id, len(last_one) - 3, 1024)
    assert cut and ids == last_one[:-4] + [tokenizer.eos_token_id] and labels[-1] == tokenizer.eos_token_id
    prompt = len(last_one) - len(tokenizer.encode(DIALOGUE[6]["content"], add_special_tokens=False)) - 1
    assert encode_conversation(tokenizer, DIALOGUE, user_id, assistant_id, prompt + 1, 1024) == (None, None, True)
    ids, labels, _ = encode_conversation(tokenizer, DIALOGUE, user_id, assistant_id, prompt + 2, 1024)
    assert ids == last_one[: prompt + 1] + [tokenizer.eos_token_id] and labels == last_one_labels[: prompt + 1] + [
        tokenizer.eos_token_id]


def test_messages_after_the_last_reply_are_left_out_and_no_reply_is_dropped(tokenizer, chat_ids):
    _, user_id, assistant_id = chat_ids
    trailing = encode_conversation(tokenizer, DIALOGUE + [{"role": "user", "content": "还有吗？"}], user_id,
                                   assistant_id, 4096, 1024)
    assert trailing == encode_conversation(tokenizer, DIALOGUE, user_id, assistant_id, 4096, 1024)
    assert encode_conversation(tokenizer, DIALOGUE[:2], user_id, assistant_id, 4096, 1024) == (None, None, False)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_mixed_files_and_what_is_dropped_is_counted(tmp_path, tiny_model_dir, chat_ids):
    _, user_id, assistant_id = chat_ids
    tokenizer = BaichuanTokenizer.from_pretrained(tiny_model_dir)
    first = write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": SYSTEM, "input": "你好", "output": "俺老张来也！", "role": "张飞"},
        {"messages": DIALOGUE, "role": "张飞"},
        {"messages": DIALOGUE[:2]},  # no reply: dropped
    ])
    second = write_jsonl(tmp_path / "b.jsonl", [
        {"system": "你是嫦娥。", "role": "嫦娥", "greeting": "广寒宫好冷清。",
         "conversations": [{"from": "human", "value": "冷吗？"}, {"from": "gpt", "value": "冷呀。"},
                           {"from": "human", "value": "想家吗？"}, {"from": "gpt", "value": "想。"}]},
    ])
    dataset = RolePlayDataset(read_files([str(first), str(second)]), tokenizer, user_id, assistant_id, 512, 64)
    assert len(dataset) == 3 and (dataset.no_reply, dataset.too_long, dataset.conversations) == (1, 0, 2)
    assert {name: (role.system, role.greeting) for name, role in dataset.roles.items()} == {
        "张飞": (SYSTEM, None), "嫦娥": ("你是嫦娥。", "广寒宫好冷清。")}
    assert [e["prefix_len"] for e in dataset.examples] == [len(tokenizer.encode(s, add_special_tokens=False))
                                                          for s in (SYSTEM, SYSTEM, "你是嫦娥。")]
    assert roles_of(read_samples(str(second)))["嫦娥"].greeting == "广寒宫好冷清。"


def test_each_row_is_parsed_once_and_the_rows_stay_as_read(tmp_path, tiny_model_dir, chat_ids, monkeypatch):
    import utils.data

    _, user_id, assistant_id = chat_ids
    tokenizer = BaichuanTokenizer.from_pretrained(tiny_model_dir)
    written = [{"messages": DIALOGUE, "role": "张飞"}, {"instruction": SYSTEM, "input": "你好", "output": "来也！"}]
    path = write_jsonl(tmp_path / "a.jsonl", written)
    parsed = []
    monkeypatch.setattr(utils.data, "row_messages", lambda row: parsed.append(row) or row_messages(row))
    rows = read_files([str(path), str(path)])
    assert rows == written * 2 and len(parsed) == 4  # the rows as on disk, parsed once each while read
    dataset = RolePlayDataset(rows, tokenizer, user_id, assistant_id, 512, 64)
    assert len(parsed) == 4
    # a plain list (or a row put in since) is parsed again, and gives the same examples
    again = RolePlayDataset(list(rows), tokenizer, user_id, assistant_id, 512, 64)
    # 4 rows, and roles_of's look at 张飞's first row for its prompt
    assert len(parsed) == 9 and again.examples == dataset.examples and again.roles == dataset.roles
    rows[0] = {"messages": [*DIALOGUE[:3], DIALOGUE[2]]}
    with pytest.raises(ValueError, match="a second assistant message in a row"):
        RolePlayDataset(rows, tokenizer, user_id, assistant_id, 512, 64)


@pytest.mark.parametrize(("row", "message"), [
    ({"messages": []}, "field 'messages' must be a non-empty list"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role must be one of system, user, assistant, got 'tool' (tool calls"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content must be a string"),
    ({"messages": [{"role": "user", "content": " "}]}, "messages[0].content is empty"),
    ({"messages": [DIALOGUE[1], DIALOGUE[0]]}, "messages[1]: a system message may only come first"),
    ({"conversations": [{"from": "function_call", "value": "{}"}]}, "conversations[0].from must be one of"),
    ({"conversations": [{"from": "system", "value": "a"}, {"from": "human", "value": "b"}], "system": "c"},
     "a system prompt both in field 'system' and in conversations[0]"),
    ({"conversations": [{"from": "human", "value": "b"}], "system": 1}, "field 'system' must be a string"),
    ({"messages": DIALOGUE, "role": 7}, "field 'role' must be a string"),
    ({"messages": [{"role": ["user"], "content": "x"}]}, "messages[0].role must be one of system, user, assistant, got ['user']"),
    ({"messages": [*DIALOGUE[:3], DIALOGUE[2]]}, "messages[3]: a second assistant message in a row"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "user", "value": "b"}]},
     "conversations[1]: a second user message in a row"),
    ({"instruction": "a", "input": "b"}, "field 'output' is missing"),
])  # fmt: skip
def test_bad_rows_are_one_line_errors_naming_file_and_line(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "a", "input": "b", "output": "c"}, row])
    with pytest.raises(UserError) as error:
        read_samples(str(path))
    assert str(error.value).startswith(f"{path}:2: ") and message in str(error.value)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError):
        row_messages(row)


def test_an_integer_past_pythons_digit_limit_is_a_one_line_error(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_text('{"instruction": "a", "input": "b", "output": "c", "n": ' + "1" * 5000 + "}\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"big\.jsonl:1: not valid JSON \(Exceeds the limit"):
        read_samples(str(path))


def test_packed_conversations_give_the_same_loss_and_gradients(tiny_model_dir, chat_ids):
    """Conversations and single-turn samples of one role packed behind one copy of the system
    prompt train exactly as each alone: same loss, same gradients."""
    _, user_id, assistant_id = chat_ids
    tokenizer = BaichuanTokenizer.from_pretrained(tiny_model_dir)
    rows = [DIALOGUE, GREETING_FIRST, DIALOGUE[:3], [{"role": "system", "content": "你是嫦娥。"}, *DIALOGUE[1:5]]]
    examples = []
    for messages in rows:
        ids, labels, _ = encode_conversation(tokenizer, messages, user_id, assistant_id, 512, 64)
        examples.append({"input_ids": ids, "labels": labels,
                         "prefix_len": len(tokenizer.encode(messages[0]["content"], add_special_tokens=False))})
    packed = PackedDataset(type("D", (), {"examples": examples})(), 512).rows
    assert [len(row["samples"]) for row in packed] == [3, 1]

    torch.manual_seed(0)
    model = BaichuanForCausalLM.from_pretrained(tiny_model_dir)
    assert_packing_is_exact(model, examples, packed, tokenizer.pad_token_id)

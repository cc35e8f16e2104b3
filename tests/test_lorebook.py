"""Lorebooks (utils.lorebook): SillyTavern's activation (keys, selective logic, case, whole words,
constant/disable, scan depth, order and budget), the positions, the bounds on untrusted books; the
masked turn ("train": false) in the layout's labels and in packing; and train = serve: a row that
data_helper.py wrote encodes to the ids that build_chat_input gives after Context.apply on the same
conversation."""

import json
import subprocess
import sys

import pytest
from transformers import GenerationConfig

from baichuan import BaichuanTokenizer
from baichuan.generation_utils import build_chat_input, encode_conversation, encode_text
from conftest import REPO_ROOT
from utils.cli import UserError
from utils.cards import read_card
from utils.data import RolePlayDataset, pack_examples, row_messages
from utils.lorebook import (AFTER, AN_TOP, AND_ALL, AND_ANY, AT_DEPTH, BEFORE, MAX_ENTRIES, NOT_ALL, NOT_ANY, OUTLET,
                            Context, DepthNote, Entry, Lorebook, fire, parse_book, read_lorebook)

USER = [{"role": "user", "content": "俺听说 Golden Cudgel 重得很"}]


def book(*entries, **kw) -> Lorebook:
    return Lorebook("b.json", tuple(entries), **kw)


def fired(entries, messages, **kw) -> list[str]:
    return [e.uid for _, e in fire([book(*entries, **kw)], messages, "你", "孙悟空")]


@pytest.mark.parametrize("logic, secondary, fires", [
    (AND_ANY, ("重", "轻"), True), (AND_ANY, ("轻",), False),
    (NOT_ALL, ("重", "轻"), True), (NOT_ALL, ("重",), False),
    (NOT_ANY, ("轻", "短"), True), (NOT_ANY, ("轻", "重"), False),
    (AND_ALL, ("重", "听说"), True), (AND_ALL, ("重", "轻"), False),
])
def test_selective_logic_is_sillytaverns(logic, secondary, fires):
    entry = Entry("1", ("cudgel",), "金箍棒重一万三千五百斤。", secondary=secondary, logic=logic)
    assert fired([entry], USER) == (["1"] if fires else [])


def test_case_whole_words_constant_and_scan_depth():
    assert fired([Entry("a", ("cudgel",), "x")], USER) == ["a"]  # case ignored by default
    assert fired([Entry("a", ("cudgel",), "x", case_sensitive=True)], USER) == []
    assert fired([Entry("a", ("Cudgel",), "x", case_sensitive=True)], USER) == ["a"]
    assert fired([Entry("a", ("cudg",), "x", whole_words=True)], USER) == []  # part of a word
    assert fired([Entry("a", ("cudg",), "x")], USER) == ["a"]
    # JavaScript's \W is ASCII: a Chinese key beside Chinese text is a whole word, as in ST
    assert fired([Entry("a", ("听说",), "x", whole_words=True)], USER) == ["a"]
    assert fired([Entry("a", ("golden cudgel",), "x", whole_words=True)], USER) == ["a"]  # several words: substring
    assert fired([Entry("c", (), "always", constant=True)], []) == ["c"]
    old = [*USER, {"role": "assistant", "content": "嗯"}, {"role": "user", "content": "还有呢"}]
    assert fired([Entry("a", ("cudgel",), "x")], old) == []  # the default scan depth is 2
    assert fired([Entry("a", ("cudgel",), "x")], old, scan_depth=3) == ["a"]
    assert fired([Entry("a", ("cudgel",), "x", scan_depth=3)], old) == ["a"]
    assert fired([Entry("a", ("孙悟空",), "x")], [{"role": "assistant", "content": "嗯"}]) == ["a"]  # names scanned


def test_order_and_budget():
    entries = [Entry("low", (), "一" * 10, constant=True, order=1), Entry("high", (), "二" * 10, constant=True, order=9),
               Entry("mid", (), "三" * 10, constant=True, order=5)]
    assert fired(entries, []) == ["low", "mid", "high"]  # inserted lowest order first
    assert fired(entries, [], budget=25) == ["mid", "high"]  # taken highest first while they fit
    assert fired(entries, [], budget=9) == []


def test_positions_fold_into_the_conversation():
    entries = (Entry("b", (), "前情", constant=True, position=BEFORE),
               Entry("a", (), "后记", constant=True, position=AFTER),
               Entry("d", (), "深处", constant=True, position=AT_DEPTH, depth=2, order=1),
               Entry("n", (), "作者注", constant=True, position=AN_TOP, order=2))
    context = Context("孙悟空", "你", (book(*entries),), DepthNote("{{char}}说话带“俺”", 0), "{{original}}记住：你是{{char}}")
    messages = [{"role": "system", "content": "设定"}, {"role": "user", "content": "一"},
                {"role": "assistant", "content": "二"}, {"role": "user", "content": "三"},
                {"role": "assistant", "content": "四"}, {"role": "user", "content": "五"}]
    out, lore = context.apply(messages)
    # five turns: depth 4 (the Author's Note) falls after "一", depth 2 after "三", depth 0 at the end,
    # and the post-history instructions ({{original}}: no global one) after it
    assert out == [{"role": "system", "content": "前情\n设定\n后记"},
                   {"role": "user", "content": "一\n\n作者注"}, {"role": "assistant", "content": "二"},
                   {"role": "user", "content": "三\n\n深处"}, {"role": "assistant", "content": "四"},
                   {"role": "user", "content": "五\n\n孙悟空说话带“俺”\n\n记住：你是孙悟空"}]
    # lowest order first; of equal orders the later entry first, as ST's insertion leaves them
    assert lore == ["b.json#d", "b.json#n", "b.json#a", "b.json#b"]


def test_at_depth_folding_is_semi_strict():
    context = Context("孙悟空", "你", (book(Entry("d", (), "注", constant=True, position=AT_DEPTH, depth=1)),))
    out, _ = context.apply([{"role": "user", "content": "一"}, {"role": "assistant", "content": "二"},
                            {"role": "user", "content": "三"}])
    assert out[2] == {"role": "user", "content": "注\n\n三"}  # after an assistant turn: before the next user turn
    out, _ = context.apply([{"role": "assistant", "content": "欢迎"}])
    # depth 1 of one message, no user turn beside it: a user turn of its own, before it
    assert out == [{"role": "user", "content": "注"}, {"role": "assistant", "content": "欢迎"}]
    out, _ = Context("x", "你", (book(Entry("d", (), "注", constant=True, position=AT_DEPTH, depth=0)),)).apply(
        [{"role": "assistant", "content": "欢迎"}])
    assert out == [{"role": "assistant", "content": "欢迎"}, {"role": "user", "content": "注"}]


def write(tmp_path, value, name="wi.json"):
    path = tmp_path / name
    path.write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8")
    return str(path)


def test_world_info_and_character_book_shapes(tmp_path):
    wi = read_lorebook(write(tmp_path, {"entries": {
        "0": {"uid": 7, "key": ["棒"], "keysecondary": ["重"], "selective": True, "selectiveLogic": 2,
              "content": "c", "order": 3, "position": 4, "depth": 1, "caseSensitive": True, "matchWholeWords": True},
        "1": {"uid": 8, "key": ["x"], "content": "off", "disable": True},
        "2": {"uid": 9, "key": ["x"], "content": "outlet", "position": OUTLET},
        "3": {"uid": 10, "key": ["x"], "content": "never", "useProbability": True, "probability": 0}}}))
    assert wi.entries == (Entry("7", ("棒",), "c", ("重",), NOT_ANY, False, 3, AT_DEPTH, 1, True, True),)
    card = parse_book({"scan_depth": 5, "token_budget": 300, "entries": [
        {"id": 1, "keys": ["a"], "secondary_keys": ["b"], "selective": False, "content": "c", "insertion_order": 4,
         "position": "after_char", "enabled": True},
        {"id": 2, "keys": ["a"], "content": "d", "position": "before_char", "extensions": {"position": 4, "depth": 2}},
        {"id": 3, "keys": ["a"], "content": "e", "enabled": False}]}, "card.json")
    assert (card.scan_depth, card.budget) == (5, 300)
    assert card.entries == (Entry("1", ("a",), "c", (), AND_ANY, False, 4, AFTER),
                            Entry("2", ("a",), "d", position=AT_DEPTH, depth=2))


@pytest.mark.parametrize("value, message", [
    ({"entries": {"0": {"key": ["/(a+)+$/i"], "content": "x"}}}, "entries['0'].key: the regular-expression key"),
    ({"entries": {"0": {"key": ["a"], "content": 5}}}, "entries['0'].content must be a string"),
    ({"entries": {"0": {"key": ["a"], "content": "x", "selectiveLogic": 4}}}, "entries['0'].selectiveLogic must be"),
    ({"entries": {"0": {"key": ["a"], "content": "x", "position": 9}}}, "entries['0'].position must be"),
    ({"entries": {"0": {"key": "a" * 10 + ",b" * 100, "content": "x"}}}, "more than 100"),
    ({"entries": {str(i): {"key": ["a"], "content": "x"} for i in range(MAX_ENTRIES + 1)}}, "more than the 2,000"),
    ({"entries": {str(i): {"key": ["a"], "content": "x" * 400_000} for i in range(6)}},
     "entries['4']: the lorebook's keys and content pass 2,000,000"),
    ({"no": "entries"}, "is not a lorebook"),
])
def test_bad_lorebooks_are_one_line_naming_file_and_entry(tmp_path, value, message):
    path = write(tmp_path, value)
    with pytest.raises(UserError) as error:
        read_lorebook(path)
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value) and "\n" not in str(error.value)


def test_data_helper_refuses_a_bad_lorebook_and_writes_nothing(tmp_path):
    bad = write(tmp_path, {"entries": {"3": {"key": ["/x/"], "content": "y"}}})
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run([sys.executable, "data_helper.py", "--roles", "孙悟空", "--lorebook", bad,
                           "--train_out", str(out / "t.jsonl"), "--test_out", str(out / "e.jsonl")],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith(f"error: {bad}: entries['3'].key: the regular-expression key '/x/' is refused")
    assert list(out.iterdir()) == []


# ---------------------------------------------------------------- masked turns, and train = serve


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    config = GenerationConfig.from_pretrained(tiny_model_dir)
    return BaichuanTokenizer.from_pretrained(tiny_model_dir), config


def test_a_masked_turn_is_context_not_loss_also_packed(tiny):
    tokenizer, config = tiny
    user, assistant, eos = config.user_token_id, config.assistant_token_id, tokenizer.eos_token_id
    greeting = {"role": "assistant", "content": "俺老孙来也！", "train": False}
    turns = [{"role": "user", "content": "大圣好"}, {"role": "assistant", "content": "好好好"}]
    masked = row_messages({"messages": [{"role": "system", "content": "设定"}, greeting, *turns]})
    ids, labels, _ = encode_conversation(tokenizer, masked, user, assistant, 256, 64)
    plain_ids, plain_labels, _ = encode_conversation(tokenizer, [*masked[:1], {**greeting, "train": True}, *turns],
                                                     user, assistant, 256, 64)
    assert ids == plain_ids  # the same context
    # the greeting and its end are unlabelled; the reply is labelled as before
    greeting_span = slice(ids.index(assistant), ids.index(user) + 1)
    assert set(labels[greeting_span]) == {-100} and set(plain_labels[greeting_span]) != {-100}
    assert labels[greeting_span.stop:] == plain_labels[greeting_span.stop:]
    assert [x for x in labels if x != -100] == [*encode_text(tokenizer, "好好好"), eos]  # the reply and its end only
    # only masked replies: nothing to train on
    assert encode_conversation(tokenizer, masked[:2], user, assistant, 256, 64) == (None, None, False)
    rows = [{"messages": masked}, {"messages": [masked[0], *turns]}]
    dataset = RolePlayDataset(rows, tokenizer, user, assistant, 256, 64)
    (packed,) = pack_examples(dataset.examples, 256)
    assert [list(s["labels"]) for s in packed["samples"]] == [list(e["labels"]) for e in dataset.examples]
    assert list(dataset.examples[0]["labels"]) == labels


def test_train_ids_equal_serve_ids_after_context_apply(tiny, tmp_path):
    """data_helper.py fires a card's lorebook and a World Info file on a dialogue and writes the row;
    the row's training ids, up to its last reply, are build_chat_input's after Context.apply on the
    same conversation: the function serving will call."""
    tokenizer, config = tiny
    card = {"spec": "chara_card_v2", "data": {
        "name": "孙悟空", "description": "齐天大圣", "first_mes": "俺老孙来也！",
        "mes_example": "<START>\n{{user}}: 你的金箍棒多重？\n{{char}}: 一万三千五百斤！\n{{user}}: 师父呢？\n{{char}}: 在前面化斋。",
        "post_history_instructions": "{{original}}只用短句。",
        "extensions": {"depth_prompt": {"prompt": "（{{char}}爱吃桃）", "depth": 1, "role": "system"}},
        "character_book": {"entries": [{"id": 1, "keys": ["师父"], "content": "唐僧是{{char}}的师父。",
                                        "position": "after_char"}]}}}
    card_path = write(tmp_path, card, "card.json")
    wi = write(tmp_path, {"entries": {"0": {"uid": 0, "key": ["金箍棒"], "content": "金箍棒是定海神针。", "position": 0,
                                            "scanDepth": 4}}})
    subprocess.run([sys.executable, "data_helper.py", "--card", card_path, "--lorebook", wi, "--test_ratio", "0",
                    "--train_out", str(tmp_path / "t.jsonl"), "--test_out", str(tmp_path / "e.jsonl")],
                   cwd=REPO_ROOT, check=True, capture_output=True, timeout=120)
    rows = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text(encoding="utf-8").splitlines()]
    # a row per reply: the notes and entries served before each differ
    first, row = sorted(rows, key=lambda r: len(r["messages"]))
    assert first["lore"] == [f"{wi}#0"] and first["messages"][-1]["content"] == "一万三千五百斤！"
    assert row["messages"][-3] == {"role": "assistant", "content": "一万三千五百斤！", "train": False}
    assert row["lore"] == [f"{wi}#0", f"{card_path}#1"]
    assert row["messages"][0]["content"].startswith("金箍棒是定海神针。\n") and row["messages"][0]["content"].endswith(
        "\n唐僧是孙悟空的师父。")
    assert row["messages"][1] == {"role": "assistant", "content": "俺老孙来也！", "train": False}
    assert row["messages"][-2]["content"] == "（孙悟空爱吃桃）\n\n师父呢？\n\n只用短句。"

    # serving: the role's prompt and the live conversation, through the same Context
    from utils.prompts import card_role

    parsed = read_card(card_path)
    role = card_role(parsed)
    conversation = [{"role": "system", "content": role.system}, *role.opening(),
                    {"role": "user", "content": "你的金箍棒多重？"}, {"role": "assistant", "content": "一万三千五百斤！"},
                    {"role": "user", "content": "师父呢？"}]
    served, _ = parsed.context(books=(read_lorebook(wi),)).apply(conversation)
    prompt = build_chat_input(tokenizer, served, config, 4096, 64)
    ids, labels, _ = encode_conversation(tokenizer, row_messages(row), config.user_token_id,
                                         config.assistant_token_id, 4096, 4096)
    assert ids[: len(prompt)] == prompt
    assert tokenizer.decode(ids[len(prompt):-1]) == "在前面化斋。"


def test_a_context_travels_as_json_and_fires_the_same(tmp_path):
    """data_helper.py's prompts.json carries each character's context; read back, it is the same
    context, so serving can fire what training fired."""
    card = {"spec": "chara_card_v2", "data": {
        "name": "孙悟空", "description": "齐天大圣", "mes_example": "<START>\n{{user}}: 师父呢？\n{{char}}: 化斋去了。",
        "post_history_instructions": "短句。", "extensions": {"depth_prompt": {"prompt": "爱吃桃", "depth": 2}},
        "character_book": {"scan_depth": 3, "entries": [
            {"id": 1, "keys": ["师父"], "secondary_keys": ["妖"], "content": "唐僧", "insertion_order": 7,
             "extensions": {"selectiveLogic": 2, "match_whole_words": True}}]}}}
    card_path = write(tmp_path, card, "card.json")
    subprocess.run([sys.executable, "data_helper.py", "--card", card_path, "--lorebook",
                    str(REPO_ROOT / "data" / "sample" / "world_info.json"), "--test_ratio", "0",
                    "--train_out", str(tmp_path / "t.jsonl"), "--test_out", str(tmp_path / "e.jsonl")],
                   cwd=REPO_ROOT, check=True, capture_output=True, timeout=120)
    side = json.loads((tmp_path / "prompts.json").read_text(encoding="utf-8"))
    context = Context.from_json(side["contexts"]["孙悟空"], str(tmp_path / "prompts.json"))
    world = read_lorebook(str(REPO_ROOT / "data" / "sample" / "world_info.json"))
    assert context == read_card(card_path).context(books=(world,))
    with pytest.raises(UserError, match="prompts.json: not a prompt context"):
        Context.from_json({"lorebooks": []}, "prompts.json")

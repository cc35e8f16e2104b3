"""Character cards as roles (utils/cards.py) and data_helper.py's --card / --dialogues.

The cards are made here: JSON V1 and V2, PNGs written with Pillow (the card in a `chara` tEXt
chunk, as Pillow writes it before the image data, and after it, as SillyTavern writes it), a V3
`ccv3` chunk, and each kind of bad card. Their text is this project's own.
"""

import base64
import io
import json
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from conftest import REPO_ROOT, assert_normal_permissions
from utils.cli import UserError
from utils.cards import MAX_TEXT_BYTES, card_dialogues, png_card_texts, read_card, read_cards
from utils.prompts import build_system_prompt, roles_from_file

V1 = {
    "name": "阿绣",
    "description": "{{char}}是江南小镇绣坊里的绣娘，一双巧手，绣花鸟虫鱼样样精。",
    "personality": "温柔爱笑，说话慢条斯理，口头禅是“慢慢来”。",
    "scenario": "{{user}}推门走进{{char}}的绣坊。",
    "first_mes": "客官请进，{{user}}想绣点什么？",
    "mes_example": "<START>\n{{user}}: 绣一幅要多久？\n{{char}}: 慢慢来，好针脚急不得。\n{{user}}: 那你累吗？\n"
                   "{{char}}: 累呀，\n可绣成了就欢喜。\n<START>\n{{char}}：今天的丝线是新染的。\n"
                   "{{user}}：真好看。\n<BOT>: 是吧，慢慢来，我教<USER>。\n<START>\n{{user}}: 只有我说话\n",
}
V2 = {"spec": "chara_card_v2", "spec_version": "2.0",
      "data": {**V1, "system_prompt": "{{original}}\n{{char}}只用短句回答。", "post_history_instructions": "",
               "alternate_greetings": ["哟，又来啦？"], "tags": ["江南"], "creator": "tests",
               "character_version": "1", "extensions": {},
               "character_book": {"entries": [{"keys": ["苏绣"], "content": "苏绣以针法细密著称。"}]}}}
SYSTEM = build_system_prompt("阿绣", "阿绣是江南小镇绣坊里的绣娘，一双巧手，绣花鸟虫鱼样样精。\n"
                                     "性格：温柔爱笑，说话慢条斯理，口头禅是“慢慢来”。\n场景：你推门走进阿绣的绣坊。")
GREETING = "客官请进，你想绣点什么？"
DIALOGUES = [
    [{"role": "user", "content": "绣一幅要多久？"}, {"role": "assistant", "content": "慢慢来，好针脚急不得。"},
     {"role": "user", "content": "那你累吗？"}, {"role": "assistant", "content": "累呀，\n可绣成了就欢喜。"}],
    [{"role": "assistant", "content": "今天的丝线是新染的。"}, {"role": "user", "content": "真好看。"},
     {"role": "assistant", "content": "是吧，慢慢来，我教你。"}],
]  # the third block has no line of the character's: no sample


def b64(card) -> str:
    return base64.b64encode(json.dumps(card, ensure_ascii=False).encode()).decode()


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def pillow_png(path, texts=(), size=(8, 8)) -> Path:
    """A PNG written by Pillow; `texts` are (keyword, text, how) with how tEXt, zTXt or iTXt."""
    info = PngImagePlugin.PngInfo()
    for keyword, text, how in texts:
        if how == "iTXt":
            info.add_itxt(keyword, text, zip=True)
        else:
            info.add_text(keyword, text, zip=how == "zTXt")
    Image.new("RGB", size, (200, 60, 60)).save(path, pnginfo=info)
    return Path(path)


def tavern_png(path, card, keyword=b"chara") -> Path:
    """As SillyTavern writes a card: a tEXt chunk just before IEND, after the image data."""
    plain = io.BytesIO()
    Image.new("RGB", (8, 8), (60, 60, 200)).save(plain, format="PNG")
    data = plain.getvalue()
    Path(path).write_bytes(data[:-12] + chunk(b"tEXt", keyword + b"\0" + b64(card).encode()) + data[-12:])
    return Path(path)


def hand_png(path, *chunks, width=8, height=8) -> Path:
    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    idat = chunk(b"IDAT", zlib.compress(b"\0" * 25))
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + ihdr + idat + b"".join(chunks) + chunk(b"IEND", b""))
    return Path(path)


def write_json(path, value) -> Path:
    Path(path).write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8")
    return Path(path)


@pytest.fixture
def card_files(tmp_path):
    folder = tmp_path / "cards"
    folder.mkdir()
    return {
        "v1-json": write_json(folder / "v1.json", V1),
        "v2-json": write_json(tmp_path / "v2.json", V2),
        "png-pillow": pillow_png(tmp_path / "pillow.png", [("chara", b64(V2), "tEXt")]),
        "png-sillytavern": tavern_png(tmp_path / "tavern.png", V2),
        "folder": folder,
    }


# ---------------------------------------------------------------- cards as roles


@pytest.mark.parametrize("kind", ["v1-json", "v2-json", "png-pillow", "png-sillytavern", "folder"])
def test_a_card_becomes_a_role_with_its_prompt_greeting_and_dialogues(card_files, kind, capsys):
    roles = roles_from_file(str(card_files[kind]))
    notes = capsys.readouterr().err.splitlines()
    if kind.startswith(("v2", "png")):  # what is not trained on is said in one line
        assert notes == [f"note: {card_files[kind]}: not trained on: alternate_greetings (1; the page offers them)"]
    else:
        assert notes == []
    assert list(roles) == ["阿绣"]
    role = roles["阿绣"]
    assert (role.system, role.greeting) == (SYSTEM, GREETING)
    assert role.opening() == [{"role": "assistant", "content": GREETING}]
    (card,) = read_cards([str(card_files[kind])])
    assert card_dialogues(card) == DIALOGUES


def test_the_cards_own_system_prompt_when_asked(card_files):
    role = roles_from_file(str(card_files["v2-json"]), card_system_prompt=True)["阿绣"]
    assert role.system == SYSTEM + "\n阿绣只用短句回答。"
    template = "扮演{role}。{description}"
    assert roles_from_file(str(card_files["v1-json"]), template)["阿绣"].system.startswith("扮演阿绣。阿绣是江南")
    assert roles_from_file(str(card_files["v1-json"]), template, card_system_prompt=True)["阿绣"].system.startswith(
        "扮演阿绣")  # a V1 card has no system_prompt: the built one stays


def test_v3_chunk_is_preferred_to_chara(tmp_path):
    v3 = {"spec": "chara_card_v3", "spec_version": "3.0", "data": {**V1, "name": "阿绣三"}}
    path = hand_png(tmp_path / "both.png", chunk(b"tEXt", b"chara\0" + b64(V2).encode()),
                    chunk(b"tEXt", b"ccv3\0" + b64(v3).encode()))
    assert read_card(str(path)).name == "阿绣三"


@pytest.mark.parametrize("how", ["tEXt", "zTXt", "iTXt"])
def test_png_text_chunks_read_as_pillow_reads_them(tmp_path, how):
    path = pillow_png(tmp_path / "card.png", [("Comment", "不是角色卡", "tEXt"), ("chara", b64(V2), how)])
    with Image.open(path) as image:
        image.load()
        expected = image.text["chara"]
    assert png_card_texts(path.read_bytes(), str(path)) == {"chara": expected}
    assert read_card(str(path)).name == "阿绣"


# ---------------------------------------------------------------- bad cards


def bad_cards(tmp_path) -> dict:
    """name -> (card file, words its one-line error must hold)."""
    good_png = pillow_png(tmp_path / "good.png", [("chara", b64(V2), "tEXt")]).read_bytes()
    no_name = {**V2, "data": {**V2["data"], "name": "  "}}
    big = tmp_path / "huge.json"
    with open(big, "wb") as f:
        f.truncate(21 * 2**20)  # sparse: the size is refused before a byte is read
    return {
        "bad-base64": (hand_png(tmp_path / "b64.png", chunk(b"tEXt", b"chara\0not base64!")), "not valid base64"),
        "bad-json-file": ((tmp_path / "bad.json"), "not valid JSON"),
        "bad-json-in-png": (hand_png(tmp_path / "j.png", chunk(b"tEXt", b"chara\0" + base64.b64encode(b"{oops"))),
                            "the 'chara' chunk is not valid JSON"),
        "no-name": (write_json(tmp_path / "noname.json", no_name), "has no name (field data.name)"),
        "png-without-card": (pillow_png(tmp_path / "plain.png", [("Comment", "hello", "tEXt")]),
                             "a PNG without a character card"),
        "oversized": (big, "more than the 20,971,520"),
        "truncated": (tmp_path / "cut.png", "truncated PNG"),
        "damaged": (tmp_path / "damaged.png", "fails its CRC check"),
        "zlib-bomb": (pillow_png(tmp_path / "bomb.png", [("chara", "A" * (MAX_TEXT_BYTES + 10), "zTXt")]),
                      "inflates past 8,388,608 bytes (a decompression bomb)"),
        "itxt-bomb": (pillow_png(tmp_path / "ibomb.png", [("chara", "A" * (MAX_TEXT_BYTES + 10), "iTXt")]),
                      "a decompression bomb"),
        "pixel-bomb": (hand_png(tmp_path / "pixels.png", chunk(b"tEXt", b"chara\0" + b64(V2).encode()),
                                width=20000, height=20000), "20000 x 20000 pixels"),
        "wrong-type": (write_json(tmp_path / "type.json", {**V1, "description": ["列表"]}),
                       "field description must be a string"),
        "not-a-card": (write_json(tmp_path / "roles.json", {"阿绣": "绣娘"}), "not a character card"),
        "bad-depth": (write_json(tmp_path / "depth.json", {**V2, "data": {**V2["data"], "extensions": {
            "depth_prompt": {"prompt": "爱吃桃", "depth": "深"}}}}), "depth_prompt.depth must be a whole number"),
        "huge-integer": (write_bytes(tmp_path / "int.json", b'{"name": "x", "n": ' + b"1" * 5000 + b"}"),
                         "not valid JSON (Exceeds the limit"),
    }, good_png


def write_bytes(path, data: bytes):
    path.write_bytes(data)
    return path


def run_helper(*args):
    return subprocess.run([sys.executable, "data_helper.py", *map(str, args)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)


def test_one_speakers_lines_in_a_row_are_one_turn(tmp_path):
    """Two replies in a row would leave the first one never followed by its end token."""
    card = read_card(str(write_json(tmp_path / "c.json", {**V1, "mes_example": "<START>\n{{user}}: 你好\n"
                                                                 "{{char}}: 客官好。\n{{char}}: 请坐。"})))
    assert card_dialogues(card) == [[{"role": "user", "content": "你好"},
                                     {"role": "assistant", "content": "客官好。\n请坐。"}]]


def test_data_helper_output_problems_are_reported_before_writing(tmp_path):
    card = write_json(tmp_path / "card.json", V1)
    roles = write_json(tmp_path / "roles.json", {"孙悟空": "齐天大圣。"})
    greeting_only = write_json(tmp_path / "greet.json", {**V1, "mes_example": ""})
    cases = [
        (["--card", card, "--train_out", tmp_path / "prompts.json", "--test_out", tmp_path / "t.jsonl"],
         "must be three different files"),
        (["--card", card, "--train_out", tmp_path / "a.jsonl", "--test_out", tmp_path / "b.jsonl",
          "--dialogues", tmp_path / "prompts.json"], "dialogues file not found"),
        (["--roles", "孙悟空", "--roles_file", roles, "--data_dir", REPO_ROOT / "data" / "sample",
          "--train_out", roles, "--test_out", tmp_path / "b.jsonl"], f"{roles}: output would overwrite an input"),
        (["--card", greeting_only, "--train_out", tmp_path / "a.jsonl", "--test_out", tmp_path / "b.jsonl"],
         "no training sample for 阿绣"),
    ]
    for args, words in cases:
        result = run_helper(*args)
        assert result.returncode in (1, 2) and "Traceback" not in result.stderr, result.stderr
        assert words in result.stderr.splitlines()[-1], (words, result.stderr)
    assert json.loads(roles.read_text(encoding="utf-8")) == {"孙悟空": "齐天大圣。"}
    assert not (tmp_path / "a.jsonl").exists() and not (tmp_path / "prompts.json").exists()
    # every card that gives no prompt, at once
    blank = [write_json(tmp_path / f"blank{i}.json", {"name": f"无名{i}", "first_mes": "嗯。"}) for i in (1, 2)]
    result = run_helper("--card", blank[0], "--card", blank[1], "--train_out", tmp_path / "a.jsonl",
                        "--test_out", tmp_path / "b.jsonl")
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and len(lines) == 2, result.stderr
    assert all(line.startswith(f"error: {path}: the card has no description") for line, path in zip(lines, blank))


def test_roles_file_card_takes_the_user_name(tmp_path):
    card = write_json(tmp_path / "card.json", V1)
    assert "老王推门走进阿绣的绣坊" in roles_from_file(str(card), user_name="老王")["阿绣"].system
    assert "你推门走进阿绣的绣坊" in roles_from_file(str(card))["阿绣"].system


def test_each_bad_card_is_a_one_line_error_naming_the_file(tmp_path):
    cases, good_png = bad_cards(tmp_path)
    (tmp_path / "bad.json").write_text('{"name": "阿绣", "first_mes": ', encoding="utf-8")
    (tmp_path / "cut.png").write_bytes(good_png[: len(good_png) // 2])
    damaged = bytearray(good_png)
    damaged[len(good_png) // 2] ^= 0xFF  # inside a chunk: its CRC no longer matches
    (tmp_path / "damaged.png").write_bytes(bytes(damaged))
    out = tmp_path / "out"
    out.mkdir()
    for name, (path, words) in cases.items():
        with pytest.raises(UserError) as error:
            read_cards([str(path)])
        message = str(error.value)
        assert message.startswith(f"{path}:") and words in message and "\n" not in message, (name, message)
    # through data_helper.py, every bad card at once: one line each, exit 2, nothing written
    result = run_helper(*[arg for path, _ in cases.values() for arg in ("--card", path)],
                        "--train_out", out / "train.jsonl", "--test_out", out / "test.jsonl")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == len(cases), lines
    for line, (path, words) in zip(lines, cases.values()):
        assert line.startswith(f"error: {path}:") and words in line, line
    assert os.listdir(out) == []


def test_the_same_character_twice_and_an_empty_folder_are_errors(card_files, tmp_path):
    with pytest.raises(UserError, match="the character '阿绣' is already given by"):
        read_cards([str(card_files["v1-json"]), str(card_files["png-sillytavern"])])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="a folder without character cards"):
        roles_from_file(str(empty))


# ---------------------------------------------------------------- data_helper.py --card / --dialogues


def test_data_helper_builds_from_cards_dialogues_and_rolebench(card_files, tmp_path):
    own = tmp_path / "chats.jsonl"
    rows = [
        {"role": "阿绣", "messages": [{"role": "system", "content": "旧的提示"}, {"role": "user", "content": "在吗？"},
                                     {"role": "assistant", "content": "在呢，慢慢来。"}]},
        {"role": "阿绣", "system": "另一个", "conversations": [{"from": "human", "value": "教我绣花"},
                                                             {"from": "gpt", "value": "先穿针。"},
                                                             {"from": "human", "value": "然后呢？"},
                                                             {"from": "gpt", "value": "慢慢来，一针一线。"}]},
        {"role": "张飞", "messages": [{"role": "user", "content": "喝酒吗？"}, {"role": "assistant", "content": "喝！"}]},
        {"role": "阿绣", "messages": [{"role": "user", "content": "没人回答"}]},
    ]  # fmt: skip
    own.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows * 5), encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    args = ["--card", card_files["png-sillytavern"], "--dialogues", own, "--roles", "张飞", "--test_ratio", "0.25",
            "--train_out", out / "train.jsonl", "--test_out", out / "test.jsonl"]
    result = run_helper(*args)
    assert result.returncode == 0, result.stderr
    notes = result.stderr.splitlines()
    assert len(notes) == 3 and "alternate_greetings" in notes[0] and "10 dialogues had a system prompt of their own" in notes[1]
    assert "5 dialogues without a reply" in notes[2]
    table = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()[1:4]}
    # 张飞: 30 + 7 RoleBench questions (37 + 10 samples) and 5 dialogues, 1 of them (round(5 x 0.25)) for test;
    # 阿绣: 2 card dialogues + 10 own, 3 for test
    # 阿绣's card has a lorebook: each reply of its conversations is a sample of its own (19 in all), and a
    # conversation's samples stay in one split
    assert table == {"张飞": ["34", "41", "9", "11"], "阿绣": ["9", "13", "3", "6"], "total": ["43", "54", "12", "17"]}
    train = [json.loads(line) for line in (out / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    test = [json.loads(line) for line in (out / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    xiu = [s for s in train + test if s["role"] == "阿绣"]
    assert len(xiu) == 19 and all(s["messages"][0] == {"role": "system", "content": SYSTEM} for s in xiu)
    assert all(s["greeting"] == GREETING for s in xiu)
    # a dialogue that starts with the user opens with the greeting, as context only
    greeting = {"role": "assistant", "content": GREETING, "train": False}
    expected = [[greeting, *d] if d[0]["role"] == "user" else d for d in DIALOGUES]
    # its last reply's sample: the replies before it are context there (each has a sample of its own)
    expected = [[{**m, "train": False} if m["role"] == "assistant" else m for m in d[:-1]] + d[-1:] for d in expected]
    assert all(dialogue in [s["messages"][1:] for s in xiu] for dialogue in expected)
    zhang = [s for s in train + test if s["role"] == "张飞" and "messages" in s]
    assert len(zhang) == 5 and zhang[0]["messages"][0]["content"].startswith("你现在要扮演张飞")
    assert_normal_permissions(out)
    # seeded: the same command gives the same files, another seed another split
    before = (out / "train.jsonl").read_bytes()
    assert run_helper(*args).returncode == 0 and (out / "train.jsonl").read_bytes() == before
    assert run_helper(*args, "--seed", "7").returncode == 0 and (out / "train.jsonl").read_bytes() != before


def test_dialogues_need_a_character_they_can_belong_to(card_files, tmp_path):
    own = tmp_path / "chats.jsonl"
    own.write_text(json.dumps({"messages": [{"role": "user", "content": "在吗？"},
                                            {"role": "assistant", "content": "在。"}]}) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    outputs = ["--train_out", out / "train.jsonl", "--test_out", out / "test.jsonl"]
    result = run_helper("--dialogues", own, *outputs)
    assert result.returncode == 2 and "--dialogues: no character to train them for" in result.stderr
    result = run_helper("--dialogues", own, "--card", card_files["v1-json"], "--roles", "张飞", *outputs)
    assert result.returncode == 1 and result.stderr.strip() == (
        f"error: {own}:1: no \"role\" field to say whose dialogue it is (张飞, 阿绣)")
    assert os.listdir(out) == []
    # one character: the dialogue is its own
    result = run_helper("--dialogues", own, "--card", card_files["v1-json"], "--test_ratio", "0", *outputs)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["role"] for r in rows] == ["阿绣"] * 3 and rows[-1]["messages"][0]["content"] == SYSTEM
    assert (out / "test.jsonl").read_text() == "" and "no test samples" in result.stderr


# ---------------------------------------------------------------- training on them


@pytest.mark.parametrize("packing", [False, True], ids=["plain", "packing"])
def test_training_on_instruction_rows_cards_and_sharegpt(card_files, tmp_path, tiny_model_dir, packing):
    """train.py on data_helper.py's mix of RoleBench rows and card dialogues, plus a file of raw
    ShareGPT rows: the loss falls, and the checkpoint records each character's prompt and greeting."""
    data = tmp_path / "data"
    data.mkdir()
    result = run_helper("--card", card_files["png-sillytavern"], "--roles", "张飞", "--test_ratio", "0",
                        "--train_out", data / "train.jsonl", "--test_out", data / "test.jsonl")
    assert result.returncode == 0, result.stderr
    sharegpt = data / "sharegpt.jsonl"
    row = {"role": "嫦娥", "greeting": "广寒宫里好冷清。", "system": "你是嫦娥，住在月宫。",
           "conversations": [{"from": "human", "value": "冷吗？"}, {"from": "gpt", "value": "冷呀，桂花也不开。"},
                             {"from": "human", "value": "想家吗？"}, {"from": "gpt", "value": "想，天天望着人间。"}]}
    sharegpt.write_text((json.dumps(row, ensure_ascii=False) + "\n") * 6, encoding="utf-8")
    shapes = {"instruction" in r and "instruction" or next(iter(r.keys() & {"messages", "conversations"}))
              for path in (data / "train.jsonl", sharegpt) for r in map(json.loads, path.read_text().splitlines())}
    assert shapes == {"instruction", "messages", "conversations"}
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "train.py", "--model_name_or_path", str(tiny_model_dir), "--train_path",
         str(data / "train.jsonl"), str(sharegpt), "--output_dir", str(out), "--max_len", "512", "--max_src_len", "64",
         "--per_device_train_batch_size", "2" if packing else "8", "--learning_rate", "5e-3", "--show_loss_step", "1",
         "--num_train_epochs", "4", "--max_steps", "8", *(["--packing"] if packing else [])],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    # 阿绣's lorebook gives each reply of a dialogue a row of its own
    assert "train: 47 samples (9 of several turns; 0 cut to fit, 0 dropped" in output
    losses = [float(x) for x in re.findall(r"^step=\d+ loss=([0-9.]+)", output, re.M)]
    assert len(losses) == 8 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2, losses
    (last,) = [p for p in out.iterdir() if p.name.endswith("-step-8")]
    record = json.loads((last / "roleplay.json").read_text(encoding="utf-8"))
    assert record["roles"]["阿绣"] == {"system": SYSTEM, "greeting": GREETING, "alternate_greetings": ["哟，又来啦？"]}
    assert record["roles"]["嫦娥"] == {"system": "你是嫦娥，住在月宫。", "greeting": "广寒宫里好冷清。"}
    assert record["roles"]["张飞"]["system"].startswith("你现在要扮演张飞")

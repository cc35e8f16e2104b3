"""Issue 17's data cases, replayed: role and card names that carry control or bidi characters (8),
card parsing that was quadratic or inflated every copy of a chunk (9), an unbounded line in a
training or dialogue file (10), a row of two shapes (11), and weights written 0600 (16). Each
test fails on the code before its fix; the timing bounds are 10-50x above what the fixed code
takes here and far below what the old code took (figures in the comments, this machine)."""

import base64
import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from conftest import REPO_ROOT, SAMPLE_DIR
from helpers import assert_one_line_error
from utils.cli import UserError

# what a name could do where it is printed: forge an `error:` line, move the cursor back over a
# line, clear the screen, cut a C string, reverse the text after it, or open a bidi isolate
UNSAFE_NAMES = ["孙悟空\nerror: fake", "孙悟空\rerror: fake", "\x1b[2J孙悟空", "孙\x00悟空", "孙悟空\u202eexe.txt",
                "孙\u2066悟空", "孙\u2028悟空", "孙\x7f悟空", "孙\u200f悟空"]


def run(*args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def card(name="阿绣", mes_example="") -> dict:
    return {"name": name, "description": "江南绣娘。", "first_mes": "客官请进。", "mes_example": mes_example}


def png_with(path: Path, *chunks) -> Path:
    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0))
    idat = chunk(b"IDAT", zlib.compress(b"\0" * 25))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + ihdr + idat + b"".join(chunks) + chunk(b"IEND", b""))
    return path


def chara(value: dict) -> bytes:
    return chunk(b"tEXt", b"chara\0" + base64.b64encode(json.dumps(value, ensure_ascii=False).encode()))


def assert_name_not_printed_raw(proc):
    """The error line escapes the name: none of its control or bidi characters reach the terminal."""
    assert not any(char in proc.stderr for char in "\x1b\x00\x7f\u202e\u2066\u2028\u200f\r")
    assert "error: fake" not in proc.stderr.replace("\\nerror: fake", "").replace("\\rerror: fake", "")


# ---------------------------------------------------------------- 8: names


@pytest.mark.parametrize("name", UNSAFE_NAMES, ids=ascii)
def test_role_names_with_control_or_bidi_characters_are_refused(tmp_path, name):
    from utils.prompts import read_record, roles_from_file

    roles = tmp_path / "roles.json"
    roles.write_text(json.dumps({name: "齐天大圣。"}, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(UserError, match=r"roles.json: role name .* contains U\+[0-9A-F]{4}"):
        roles_from_file(str(roles))
    cards = tmp_path / "cards"
    cards.mkdir()
    (cards / "a.json").write_text(json.dumps(card(name), ensure_ascii=False), encoding="utf-8")
    for path in (cards / "a.json", png_with(tmp_path / "a.png", chara(card(name)))):
        with pytest.raises(UserError, match=r"the character's name .* contains U\+[0-9A-F]{4}"):
            roles_from_file(str(path))
    with pytest.raises(UserError, match=r"a.json: the character's name"):
        roles_from_file(str(cards))
    # a model's prompt record is read by the page and the API: its names are checked the same way
    record = {"format": 1, "roles": {name: {"system": "你是孙悟空。", "greeting": None}}}
    (tmp_path / "roleplay.json").write_text(json.dumps(record, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(UserError, match=r"roleplay.json: role name .* contains"):
        read_record(str(tmp_path))


def test_names_of_other_scripts_and_joiners_still_pass(tmp_path):
    from utils.prompts import roles_from_file

    names = ["孙悟空", "Zoë", "محمد", "نیما\u200cجان", "👩\u200d🔬 学者", "Sun Wukong"]  # ZWNJ and ZWJ are letters' glue
    roles = tmp_path / "roles.json"
    roles.write_text(json.dumps({n: "一个角色。" for n in names}, ensure_ascii=False), encoding="utf-8")
    assert list(roles_from_file(str(roles))) == names


def test_data_helper_reports_a_forged_name_as_one_escaped_line(tmp_path):
    roles = tmp_path / "roles.json"
    roles.write_text(json.dumps({"孙悟空\nerror: fake\x1b[2J": "齐天大圣。"}, ensure_ascii=False), encoding="utf-8")
    proc = run("data_helper.py", "--roles_file", roles, "--roles", "孙悟空", "--train_out", tmp_path / "t.jsonl",
               "--test_out", tmp_path / "s.jsonl")
    assert proc.returncode == 2
    assert_one_line_error(proc, "roles.json: role name", "U+000A, a control character")
    assert_name_not_printed_raw(proc)
    card_file = tmp_path / "card.json"
    card_file.write_text(json.dumps(card("阿绣\u202e"), ensure_ascii=False), encoding="utf-8")
    proc = run("data_helper.py", "--card", card_file, "--train_out", tmp_path / "t.jsonl", "--test_out",
               tmp_path / "s.jsonl")
    assert_one_line_error(proc, "card.json: the character's name", "U+202E RIGHT-TO-LEFT OVERRIDE")
    assert_name_not_printed_raw(proc)
    assert sorted(os.listdir(tmp_path)) == ["card.json", "roles.json"]  # nothing written


# ---------------------------------------------------------------- 9: linear card parsing


def test_a_png_card_reads_only_its_first_card_chunk(tmp_path):
    """The issue's file: 2,434 zTXt `chara` chunks that each inflate to 8 MiB, 19 MB in all, after
    the card. Each was inflated (46 s of CPU); only the first is the card. A damaged duplicate is
    not read either."""
    from utils.cards import MAX_CARD_BYTES, MAX_TEXT_BYTES, read_card

    bomb = chunk(b"zTXt", b"chara\0\0" + zlib.compress(b"A" * MAX_TEXT_BYTES, 9))
    damaged = chunk(b"zTXt", b"chara\0\0" + b"not zlib")
    path = png_with(tmp_path / "card.png", chara(card("阿绣")), damaged, bomb * 2434)
    assert 18e6 < path.stat().st_size <= MAX_CARD_BYTES
    start = time.perf_counter()
    assert read_card(str(path)).name == "阿绣"
    assert time.perf_counter() - start < 3  # 0.1 s here; the old code was minutes, or stopped at `damaged`


def test_the_first_ccv3_chunk_is_still_preferred_to_an_earlier_chara(tmp_path):
    from utils.cards import read_card

    ccv3 = chunk(b"tEXt", b"ccv3\0" + base64.b64encode(json.dumps(card("嫦娥"), ensure_ascii=False).encode()))
    path = png_with(tmp_path / "card.png", chara(card("阿绣")), ccv3, chara(card("张飞")))
    assert read_card(str(path)).name == "嫦娥"


@pytest.mark.parametrize("shape", ["200,000 lines of one speaker", "800,000 continuation lines"])
def test_mes_example_parsing_is_linear(shape):
    """The issue's mes_example sizes (7 MB and 13 MB of text): each line was added to its turn's
    string, which copied the turn each time (49 s and 16 s)."""
    from utils.cards import card_dialogues, parse_card

    if shape.startswith("200"):
        text = "<START>\n{{user}}: 你好\n" + "{{char}}: 嗯，慢慢来，好针脚急不得。\n" * 200_000
        expected = "\n".join(["嗯，慢慢来，好针脚急不得。"] * 200_000)
    else:
        text = "<START>\n{{user}}: 你好\n{{char}}: 好\n" + "接着说，慢慢来。\n" * 800_000
        expected = "\n".join(["好"] + ["接着说，慢慢来。"] * 800_000)
    parsed = parse_card(card(mes_example=text), "card.json")
    start = time.perf_counter()
    dialogues = card_dialogues(parsed)
    elapsed = time.perf_counter() - start
    assert dialogues == [[{"role": "user", "content": "你好"}, {"role": "assistant", "content": expected}]]
    assert elapsed < 8, elapsed  # about 1 s here


def test_the_summary_table_is_linear():
    """10,000 roles and 40,000 samples: a scan of every list per role (O(roles x samples))."""
    import data_helper

    names = [f"角色{i}" for i in range(10_000)]
    rows = {"train": [{"role": n} for n in names for _ in range(3)], "test": [{"role": n} for n in names]}
    samples = {"train": rows["train"] * 1, "test": []}
    start = time.perf_counter()
    table = data_helper.count_table(names, rows, samples)
    elapsed = time.perf_counter() - start
    assert table[1].split() == ["角色0", "3", "3", "1", "0"] and table[-1].split() == ["total", "30000", "30000",
                                                                                    "10000", "0"]
    assert len(table) == 10_002 and elapsed < 2, elapsed  # 0.1 s here


def test_a_folder_of_thousands_of_cards(tmp_path, capsys):
    """data_helper on the issue's folder of 10,000 cards: 1:56 in the issue, 47 s here, because the
    table and the check for roles without a sample scanned every sample per role, and each card
    compiled a regular expression of its names."""
    import data_helper

    folder = tmp_path / "cards"
    folder.mkdir()
    for i in range(10_000):
        (folder / f"{i:05d}.json").write_text(json.dumps(card(f"角色{i}", "<START>\n{{user}}: 你好\n{{char}}: 好\n"),
                                                         ensure_ascii=False), encoding="utf-8")
    start = time.perf_counter()
    data_helper.main(["--card", str(folder), "--train_out", str(tmp_path / "t.jsonl"),
                      "--test_out", str(tmp_path / "s.jsonl")])
    elapsed = time.perf_counter() - start
    assert capsys.readouterr().out.splitlines()[-3].split() == ["total", "10000", "10000", "0", "0"]
    assert elapsed < 12, elapsed  # about 2 s here


# ---------------------------------------------------------------- 10: a line over the bound


def write_rows(path: Path, *rows) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


SAMPLE = {"instruction": "你是孙悟空。", "input": "你好", "output": "俺老孙来也！"}


def test_a_training_line_over_the_bound_is_one_error_before_any_model_loads(tmp_path):
    """A 100 MB line trained at 10.8 GB peak. Now a line over 1 MB (the default) is refused by the
    reader train.py uses, before the model loads: the model directory here holds only an empty
    config.json, which would be the error were the model loaded first."""
    from utils.data import read_files

    huge = write_rows(tmp_path / "train.jsonl", SAMPLE, {**SAMPLE, "output": "长" * 400_000})  # 1.2 MB
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}", encoding="utf-8")
    proc = run("train.py", "--model_name_or_path", tmp_path / "model", "--train_path", huge,
               "--output_dir", tmp_path / "out")
    assert_one_line_error(proc, "train.jsonl:2: line longer than 1,000,000 bytes")
    assert not (tmp_path / "out").exists()
    assert len(read_files([str(huge)], max_line_bytes=2_000_000)) == 2  # the bound is the reader's parameter
    with pytest.raises(UserError, match=r"train.jsonl:2: line longer than 100,000 bytes"):
        read_files(str(huge), max_line_bytes=100_000)
    # train.py's --max_line_bytes sets it, for the samples and for --stage dpo's pairs alike
    small = write_rows(tmp_path / "small.jsonl", SAMPLE)
    proc = run("train.py", "--model_name_or_path", tmp_path / "model", "--train_path", small,
               "--output_dir", tmp_path / "out", "--max_line_bytes", "20")
    assert_one_line_error(proc, "small.jsonl:1: line longer than 20 bytes")
    from utils.pairs import read_pairs

    pair = {"messages": [{"role": "user", "content": "你好"}], "chosen": "俺老孙来也", "rejected": "我是AI助手"}
    with pytest.raises(UserError, match=r"pairs.jsonl:1: line longer than 20 bytes"):
        read_pairs(str(write_rows(tmp_path / "pairs.jsonl", pair)), max_line_bytes=20)


def test_data_helper_max_line_bytes(tmp_path, capsys):
    import data_helper

    card_file = tmp_path / "card.json"
    card_file.write_text(json.dumps(card(), ensure_ascii=False), encoding="utf-8")
    chat = {"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "客官好" * 100}]}
    dialogues = write_rows(tmp_path / "chats.jsonl", chat)
    outputs = ["--train_out", str(tmp_path / "t.jsonl"), "--test_out", str(tmp_path / "s.jsonl")]
    common = ["--card", str(card_file), "--dialogues", str(dialogues), *outputs]
    with pytest.raises(UserError, match=r"chats.jsonl:1: line longer than 500 bytes"):
        data_helper.main([*common, "--max_line_bytes", "500"])
    data_helper.main(common)  # 1 MB by default
    assert len((tmp_path / "t.jsonl").read_text(encoding="utf-8").splitlines()) == 1
    with pytest.raises(UserError, match=r"rolebench-zh_general_train.jsonl:\d+: line longer than 300 bytes"):
        data_helper.main(["--data_dir", str(SAMPLE_DIR), *outputs, "--max_line_bytes", "300"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        data_helper.main([*common, "--max_line_bytes", "0"])
    assert exit.value.code == 2
    assert capsys.readouterr().err == "error: --max_line_bytes: must be at least 1, got 0\n"


# ---------------------------------------------------------------- 11: two shapes in one row


@pytest.mark.parametrize("extra", ["instruction", "conversations", "input"])
def test_a_row_of_two_shapes_is_refused(tmp_path, extra):
    from utils.data import read_samples, row_messages

    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "嗯"}]
    other = {"instruction": SAMPLE["instruction"], "conversations": [{"from": "human", "value": "hi"}],
             "input": "别的问题"}[extra]
    row = {"messages": messages, extra: other}
    with pytest.raises(ValueError, match=f"two shapes: fields 'messages' and '{extra}'"):
        row_messages(row)
    path = write_rows(tmp_path / "train.jsonl", SAMPLE, row)
    with pytest.raises(UserError, match=r"train.jsonl:2: a row of two shapes"):
        read_samples(str(path))
    assert len(row_messages(SAMPLE)) == 3 and len(row_messages({"messages": messages, "role": "x"})) == 2


# ---------------------------------------------------------------- 16: modes


def test_the_quickstarts_data_and_tiny_model_follow_the_umask(tmp_path, tiny_model_dir):
    """The quickstart's first two steps (data_helper.py, then python -m baichuan.tiny) under umask
    027: model.safetensors came out 0600 (transformers' writer), the rest 0640. train.py's and
    merge_params.py's outputs are checked in test_prompt_contract.py."""
    import data_helper
    from baichuan import tiny

    out = tmp_path / "quickstart"
    out.mkdir()
    before = os.umask(0o027)
    try:
        data_helper.main(["--train_out", str(out / "train.jsonl"), "--test_out", str(out / "test.jsonl")])
        tiny.main(["--out", str(out / "tiny"), "--tokenizer", str(tiny_model_dir / "tokenizer.model"),
                   "--hidden_size", "16", "--num_heads", "2", "--intermediate_size", "32", "--num_layers", "1"])
    finally:
        os.umask(before)
    assert sorted(p.name for p in out.iterdir()) == ["prompts.json", "test.jsonl", "tiny", "train.jsonl"]
    modes = {p.relative_to(out).as_posix(): oct(p.stat().st_mode & 0o777) for p in out.rglob("*")}
    assert "tiny/model.safetensors" in modes and "tiny/config.json" in modes
    assert modes == {path: "0o750" if (out / path).is_dir() else "0o640" for path in modes}

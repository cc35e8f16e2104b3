"""Tests for data_helper.py: the CLI is run as a subprocess, the helpers are imported."""

import collections
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import assert_normal_permissions

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "data_helper.py"
SAMPLE = ROOT / "data" / "sample"
ROLES_FILE = ROOT / "data" / "roles.json"
REAL = ROOT.parent / "shared" / "rolebench"
BAD = Path(__file__).resolve().parent / "bad_inputs" / "data_helper"

sys.path.insert(0, str(ROOT))
import data_helper  # noqa: E402
from utils.cli import UserError  # noqa: E402
from utils.prompts import SYSTEM_TEMPLATE, build_system_prompt, roles_from_file  # noqa: E402
from utils.rolebench import strip_addressee  # noqa: E402

GT, GS = "rolebench-zh_general_train.jsonl", "rolebench-zh_role_specific_train.jsonl"
TG, TS = "rolebench-zh_general_test.jsonl", "rolebench-zh_role_specific_test.jsonl"
DEFAULT_ROLES = {"孙悟空", "张飞", "李白"}


def run(*args, env=None):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def table(stdout):
    """{role or 'total': (train_q, train_n, test_q, test_n)} from the printed table."""
    rows = {}
    for line in stdout.splitlines():
        cells = line.split()
        if len(cells) == 5 and all(c.isdigit() for c in cells[1:]):
            rows[cells[0]] = tuple(int(c) for c in cells[1:])
    return rows


@pytest.fixture
def data_dir(tmp_path):
    """A private copy of the sample data, so a test may break one file."""
    target = tmp_path / "data"
    shutil.copytree(SAMPLE, target)
    return target


@pytest.fixture
def out(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def outputs(out):
    return ["--train_out", out / "train.jsonl", "--test_out", out / "test.jsonl"]


# ---------------------------------------------------------------- sample data

def test_sample_counts_and_fields(out):
    result = run("--data_dir", SAMPLE, "--roles_file", ROLES_FILE, *outputs(out))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    counts = table(result.stdout)
    assert counts["total"] == (90, 121, 24, 32)
    assert counts["孙悟空"] == (30, 42, 8, 11)
    assert counts["张飞"] == (30, 37, 8, 10)
    assert counts["李白"] == (30, 42, 8, 11)
    train, test = read_jsonl(out / "train.jsonl"), read_jsonl(out / "test.jsonl")
    assert (len(train), len(test)) == (121, 32)
    roles = descriptions()
    for sample in train + test:
        assert set(sample) == {"instruction", "input", "output", "role"}
        assert sample["role"] in DEFAULT_ROLES
        assert sample["instruction"] == build_system_prompt(
            sample["role"], roles[sample["role"]])
        assert sample["input"] and sample["output"]
    assert sorted(os.listdir(out)) == ["prompts.json", "test.jsonl", "train.jsonl"]
    side = json.loads((out / "prompts.json").read_text(encoding="utf-8"))
    assert side["system_template"] == SYSTEM_TEMPLATE
    assert side == {"system_template": SYSTEM_TEMPLATE, "prompt_style": "project",  # the prompts are in the samples
                    "user_name": "你"}
    assert_normal_permissions(out)


def test_default_paths_are_documented_defaults():
    args = data_helper.parse_args([])
    assert (args.data_dir, args.roles_file) == ("data/sample", "data/roles.json")
    assert (args.train_out, args.test_out) == ("data/train.jsonl", "data/test.jsonl")
    assert (args.max_replies, args.seed, args.roles, args.card, args.dialogues) == (2, 1234, None, [], [])
    # no --roles: the book's three roles, unless characters of one's own are given
    assert data_helper.validate_args(args)[1] == ["孙悟空", "张飞", "李白"]


def test_prefix_stripped_other_commas_kept(out):
    assert run(*outputs(out), "--data_dir", SAMPLE).returncode == 0
    inputs = {s["input"] for s in read_jsonl(out / "train.jsonl") + read_jsonl(out / "test.jsonl")}
    assert not [q for q in inputs if q.startswith(("孙悟空，", "张飞，", "李白，"))]
    assert "长坂桥上那一声吼，你当时怕不怕？" in inputs  # prefix gone, inner comma kept
    assert "你当年为什么要大闹天宫？" in inputs
    assert "大圣，取经路上哪一难最难过？" in inputs  # not the role name: untouched
    assert "李白先生，您年轻时练过剑吗？" in inputs
    assert "李白先生，您怎样看待功名？" in inputs


def test_strip_addressee_only_touches_the_leading_role_name():
    assert strip_addressee("张飞，你好，张飞，再见", "张飞") == "你好，张飞，再见"
    assert strip_addressee("张将军，你好", "张飞") == "张将军，你好"
    assert strip_addressee("你好，张飞", "张飞") == "你好，张飞"


def test_same_seed_same_output_other_seed_differs(tmp_path):
    def build(name, seed):
        folder = tmp_path / name
        folder.mkdir()
        result = run("--data_dir", SAMPLE, *outputs(folder), "--seed", seed)
        assert result.returncode == 0, result.stderr
        return (folder / "train.jsonl").read_bytes() + (folder / "test.jsonl").read_bytes()

    first = build("a", 1234)
    assert build("b", 1234) == first
    assert build("c", 7) != first


@pytest.mark.parametrize("max_replies,train_n,test_n", [(1, 90, 24), (2, 121, 32), (3, 126, 34)])
def test_at_most_n_replies_per_question(out, max_replies, train_n, test_n):
    result = run("--data_dir", SAMPLE, *outputs(out), "--max_replies", max_replies)
    assert result.returncode == 0, result.stderr
    assert table(result.stdout)["total"] == (90, train_n, 24, test_n)
    for split, name in (("train", GT), ("test", TG)):
        source = {(r["role"], r["question"]): r["generated"] for r in read_jsonl(SAMPLE / name)}
        kept = collections.defaultdict(list)
        for s in read_jsonl(out / f"{split}.jsonl"):
            kept[(s["role"], s["input"])].append(s["output"])
        for key, replies in kept.items():
            assert 1 <= len(replies) <= max_replies
            if key in source:  # a chosen subset, in the original order
                original = source[key]
                assert replies == [r for r in original if r in replies]
                assert len(replies) == min(max_replies, len(original))


def test_other_roles_are_skipped_and_selectable(out, tmp_path):
    default = run("--data_dir", SAMPLE, *outputs(out))
    assert default.returncode == 0
    assert {s["role"] for s in read_jsonl(out / "train.jsonl")} == DEFAULT_ROLES
    assert set(table(default.stdout)) == DEFAULT_ROLES | {"total"}

    result = run("--data_dir", SAMPLE, *outputs(out), "--roles", "皇帝，华妃")
    assert result.returncode == 0, result.stderr
    assert table(result.stdout)["total"] == (4, 5, 2, 2)
    assert {s["role"] for s in read_jsonl(out / "train.jsonl")} == {"皇帝", "华妃"}

    # a roles file without 皇帝/华妃: their rows are skipped, not an error
    three = tmp_path / "three.json"
    roles = descriptions()
    three.write_text(json.dumps({k: roles[k] for k in DEFAULT_ROLES}, ensure_ascii=False),
                     encoding="utf-8")
    result = run("--data_dir", SAMPLE, "--roles_file", three, *outputs(out))
    assert result.returncode == 0, result.stderr
    assert table(result.stdout)["total"] == (90, 121, 24, 32)


def test_system_template_option(out):
    result = run("--data_dir", SAMPLE, *outputs(out), "--system_template", "扮演{role}：{description}")
    assert result.returncode == 0, result.stderr
    sample = read_jsonl(out / "test.jsonl")[0]
    roles = descriptions()
    assert sample["instruction"] == f"扮演{sample['role']}：{roles[sample['role']]}"


def test_inputs_never_modified_and_existing_output_kept_on_error(data_dir, out):
    # data/sample also holds folders (SillyTavern logs, scenes): every file under it counts
    before = {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in data_dir.rglob("*") if p.is_file()}
    assert run("--data_dir", data_dir, *outputs(out)).returncode == 0
    after = {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in data_dir.rglob("*") if p.is_file()}
    assert after == before

    (out / "train.jsonl").write_text("old\n", encoding="utf-8")
    shutil.copy(BAD / "malformed_json.jsonl", data_dir / TS)  # the last file read
    result = run("--data_dir", data_dir, *outputs(out))
    assert result.returncode == 1
    assert (out / "train.jsonl").read_text(encoding="utf-8") == "old\n"
    assert sorted(os.listdir(out)) == ["prompts.json", "test.jsonl", "train.jsonl"]


def test_output_may_not_overwrite_an_input(data_dir, out):
    result = run("--data_dir", data_dir, "--train_out", data_dir / GT, "--test_out", out / "t.jsonl")
    assert result.returncode == 2
    assert "overwrite an input" in result.stderr
    assert (data_dir / GT).read_bytes() == (SAMPLE / GT).read_bytes()


def test_all_argument_problems_reported_at_once(out):
    result = run("--data_dir", SAMPLE, *outputs(out), "--max_replies", "0", "--roles", "猪八戒",
                 "--system_template", "{role}")
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 3, result.stderr
    assert all(line.startswith("error: ") for line in lines)
    assert "猪八戒" in lines[0] and "--max_replies" in lines[1] and "{description}" in lines[2]
    assert os.listdir(out) == []


def test_each_input_file_is_read_once(tmp_path, out, monkeypatch, capsys):
    """Validation and the run share what they load: the roles file, a card and each data file are
    opened once (issue 16: they were loaded to be checked, then again to be used)."""
    import builtins

    card = tmp_path / "card.json"
    card.write_text(json.dumps({"name": "阿绣", "description": "绣娘", "first_mes": "你好",
                                "mes_example": "<START>\n{{user}}: 你好\n{{char}}: 好"}, ensure_ascii=False),
                    encoding="utf-8")
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"role": "阿绣", "messages": [{"role": "user", "content": "hi"},
                                                             {"role": "assistant", "content": "嗯"}]}) + "\n",
                     encoding="utf-8")
    opened = collections.Counter()
    real_open = builtins.open

    def counting_open(file, *args, **kwargs):
        opened[os.path.abspath(file) if isinstance(file, (str, Path)) else file] += 1
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    data_helper.main(["--data_dir", str(SAMPLE), "--roles_file", str(ROLES_FILE), "--roles", "张飞", "--card", str(card),
                      "--dialogues", str(chats), "--train_out", str(out / "train.jsonl"),
                      "--test_out", str(out / "test.jsonl")])
    inputs = [ROLES_FILE, card, chats, *(SAMPLE / name for name in (GT, GS, TG, TS))]
    assert {str(p): opened[os.path.abspath(p)] for p in inputs} == {str(p): 1 for p in inputs}
    assert table(capsys.readouterr().out)["total"] == (32, 39, 8, 10)


# ---------------------------------------------------------------- helpers

def descriptions() -> dict[str, str]:
    """data/roles.json as it is: role name -> description."""
    return json.loads(Path(ROLES_FILE).read_text(encoding="utf-8"))


def test_roles_file_and_build_system_prompt():
    roles = descriptions()
    assert list(roles) == ["孙悟空", "张飞", "李白", "皇帝", "华妃"]
    assert all(len(d) > 50 for d in roles.values())
    prompt = build_system_prompt("张飞", roles["张飞"])
    assert prompt.startswith("你现在要扮演张飞。")
    assert roles["张飞"] in prompt
    assert "人工智能" in prompt and "简洁" in prompt
    assert "{role}" in SYSTEM_TEMPLATE and "{description}" in SYSTEM_TEMPLATE
    assert build_system_prompt("甲", " 乙 ", "{role}/{description}") == "甲/乙"


def test_roles_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "none.json"
    with pytest.raises(UserError, match="none.json: roles file not found"):
        roles_from_file(str(missing))
    with pytest.raises(UserError, match=r"roles_bad_json.json:4: not valid JSON"):
        roles_from_file(str(BAD / "roles_bad_json.json"))


# ---------------------------------------------------------------- real RoleBench-zh files

@pytest.mark.skipif(not REAL.is_dir(), reason="../shared/rolebench not present")
@pytest.mark.parametrize("roles_file", [REAL / "profiles-zh_desc.json", ROLES_FILE],
                         ids=["profiles-zh_desc", "roles.json"])
def test_real_rolebench_counts(out, roles_file):
    result = run("--data_dir", REAL, "--roles_file", roles_file, *outputs(out))
    assert result.returncode == 0, result.stderr
    assert table(result.stdout)["total"] == (4557, 8020, 1013, 1885)
    train, test = read_jsonl(out / "train.jsonl"), read_jsonl(out / "test.jsonl")
    assert (len(train), len(test)) == (8020, 1885)
    assert {s["role"] for s in train} == {s["role"] for s in test} == DEFAULT_ROLES
    assert len({(s["role"], s["input"]) for s in train}) <= 4557
    assert not [s for s in train + test if s["input"].startswith((s["role"] + "，"))]
    assert sum("，" in s["input"] for s in train) > 1000
    description = json.loads(Path(roles_file).read_text(encoding="utf-8"))["李白"]
    assert description.strip() in next(s["instruction"] for s in test if s["role"] == "李白")


# ---------------------------------------------------------------- bad input

# corpus file -> (the input it replaces, expected line or None, words in the message)
BAD_FILES = {
    "empty_file.jsonl": (TS, None, "file is empty"),
    "non_utf8.jsonl": (GT, 2, "not valid UTF-8"),
    "truncated_last_line.jsonl": (TG, 3, "truncated last line"),
    "malformed_json.jsonl": (GT, 2, "not valid JSON"),
    "question_not_string.jsonl": (GS, 2, "field 'question' must be a string"),
    "generated_not_list.jsonl": (GT, 3, "field 'generated' must be a list"),
    "missing_field_generated.jsonl": (TG, 2, "missing field 'generated'"),
    "missing_field_role.jsonl": (TS, 1, "missing field 'role'"),
    "empty_reply_list.jsonl": (GT, 2, "'generated' is an empty list"),
    "reply_not_string.jsonl": (GT, 3, "generated[1] must be a non-empty string"),
    "role_not_string.jsonl": (GS, 1, "field 'role' must be a string"),
    "not_an_object.jsonl": (GS, 2, "expected a JSON object"),
    "question_only_prefix.jsonl": (GS, 2, "question is empty"),
    "type_wrong.jsonl": (TS, 1, "field 'type'"),
    "skip_bad_mixed.jsonl": (TS, 2, "not valid JSON"),
}
BAD_ROLES_FILES = {
    "roles_not_object.json": (None, "expected a non-empty JSON object"),
    "roles_bad_json.json": (4, "not valid JSON"),
    "roles_empty_description.json": (None, "description of '张飞'"),
}


def test_every_corpus_file_is_used():
    assert sorted(os.listdir(BAD)) == sorted([*BAD_FILES, *BAD_ROLES_FILES])


def assert_clean_failure(result, out, status, *needles):
    assert result.returncode == status, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr + result.stdout
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    assert os.listdir(out) == []  # neither outputs nor temp files


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_input_file(name, data_dir, out):
    target, line, words = BAD_FILES[name]
    shutil.copy(BAD / name, data_dir / target)
    where = f"{data_dir / target}:{line}: " if line else f"{data_dir / target}: "
    assert_clean_failure(run("--data_dir", data_dir, *outputs(out)), out, 1, where, words)


@pytest.mark.parametrize("name", BAD_ROLES_FILES)
def test_bad_roles_file(name, out):
    line, words = BAD_ROLES_FILES[name]
    path = BAD / name
    where = f"{path}:{line}: " if line else f"{path}: "
    result = run("--data_dir", SAMPLE, "--roles_file", path, *outputs(out))
    assert_clean_failure(result, out, 2, where, words)


def test_huge_line_refused(data_dir, out):
    ok = json.dumps({"role": "张飞", "question": "你好？", "generated": ["好！"]}, ensure_ascii=False)
    huge = json.dumps({"role": "张飞", "question": "啊" * 400_000, "generated": ["好！"]},
                      ensure_ascii=False)
    (data_dir / GT).write_text(f"{ok}\n{huge}\n{ok}\n", encoding="utf-8")
    result = run("--data_dir", data_dir, *outputs(out))
    assert_clean_failure(result, out, 1, f"{data_dir / GT}:2: ", "longer than 1,000,000 bytes")


def test_unknown_role_in_roles_option(out):
    result = run("--data_dir", SAMPLE, *outputs(out), "--roles", "张飞,猪八戒")
    assert_clean_failure(result, out, 2, "--roles: 猪八戒 not in", "roles.json")


def test_max_replies_zero(out):
    result = run("--data_dir", SAMPLE, *outputs(out), "--max_replies", "0")
    assert_clean_failure(result, out, 2, "--max_replies: must be at least 1")


def test_missing_input_file(data_dir, out):
    (data_dir / TS).unlink()
    result = run("--data_dir", data_dir, *outputs(out))
    assert_clean_failure(result, out, 2, f"{data_dir / TS}: input file not found")


def test_missing_data_dir(tmp_path, out):
    result = run("--data_dir", tmp_path / "nowhere", *outputs(out))
    assert_clean_failure(result, out, 2, f"{tmp_path / 'nowhere'}: data folder not found")


def test_missing_roles_file(tmp_path, out):
    result = run("--data_dir", SAMPLE, "--roles_file", tmp_path / "r.json", *outputs(out))
    assert_clean_failure(result, out, 2, f"{tmp_path / 'r.json'}: roles file not found")


def test_output_inside_missing_folder(out):
    train_out = out / "missing" / "train.jsonl"
    result = run("--data_dir", SAMPLE, "--train_out", train_out, "--test_out", out / "test.jsonl")
    assert_clean_failure(result, out, 2, f"{train_out}: output folder", "does not exist")


def test_skip_bad_skips_and_counts(data_dir, out):
    shutil.copy(BAD / "skip_bad_mixed.jsonl", data_dir / TS)
    result = run("--data_dir", data_dir, *outputs(out), "--skip_bad")
    assert result.returncode == 0, result.stderr
    assert "skipped 2 bad lines" in result.stdout
    warnings = result.stderr.splitlines()
    assert len(warnings) == 2
    assert f"{data_dir / TS}:2: not valid JSON" in warnings[0]
    assert f"{data_dir / TS}:4: field 'generated' is an empty list" in warnings[1]
    # general test: 15 questions / 23 samples, plus the two good role-specific rows
    assert table(result.stdout)["total"] == (90, 121, 17, 25)
    inputs = {s["input"] for s in read_jsonl(out / "test.jsonl")}
    assert {"你敢不敢夜袭敌营？", "你怎么看离别？"} <= inputs


def test_skip_bad_does_not_hide_an_empty_file(data_dir, out):
    (data_dir / GS).write_bytes(b"")
    result = run("--data_dir", data_dir, *outputs(out), "--skip_bad")
    assert_clean_failure(result, out, 1, f"{data_dir / GS}: file is empty")


def test_download_offline_fails_cleanly(tmp_path, out):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    target = tmp_path / "rolebench"
    result = run("--download", "--data_dir", target, *outputs(out), env=env)
    assert_clean_failure(result, out, 1, "could not download", str(target), GT, TS,
                         "rolebench-zh/role_specific/test.jsonl")
    assert not target.exists() or os.listdir(target) == []


def test_download_keeps_existing_files(data_dir, out):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = run("--download", "--data_dir", data_dir, *outputs(out), env=env)
    assert result.returncode == 0, result.stderr
    assert "nothing fetched" in result.stdout
    assert table(result.stdout)["total"] == (90, 121, 24, 32)

"""data_helper.py --pairs_out: preference pairs from SillyTavern swipes and from a model's replies out
of character (--rejected_from, on the tiny model), read back with train.py's pair reader."""

import json
import subprocess
import sys
from collections import Counter

from conftest import REPO_ROOT, SAMPLE_DIR

sys.path.insert(0, str(REPO_ROOT))
import data_helper  # noqa: E402

ROLES_FILE = REPO_ROOT / "data" / "roles.json"
META = {"user_name": "阿明", "character_name": "孙悟空", "chat_metadata": {}}


def message(name, text, swipes=None, swipe_id=0, user=False):
    row = {"name": name, "is_user": user, "is_system": False, "mes": text, "extra": {}}
    return {**row, "swipes": swipes, "swipe_id": swipe_id} if swipes else row


def write_log(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def plain(messages):
    """A sample's messages without its training marks, as a pair's prompt holds them."""
    return [{k: v for k, v in m.items() if k in ("role", "content")} for m in messages]


def test_swipes_become_pairs_with_the_prompt_of_their_sample_split_as_their_samples(tmp_path):
    from utils.pairs import pair_of, read_pairs
    from utils.prompts import roles_from_file

    logs = tmp_path / "logs"
    logs.mkdir()
    write_log(logs / "one.jsonl", [
        META, message("孙悟空", "俺老孙来也！"), message("阿明", "大圣，你会几种变化？", user=True),
        message("孙悟空", "七十二变，样样精通！", ["俺会三十六变。", "七十二变，样样精通！", "作为一个AI助手，我不会变化。"], 1),
        message("阿明", "那你最爱吃什么？", user=True), message("孙悟空", "蟠桃！")])
    write_log(logs / "group.jsonl", [
        META, message("阿明", "两位喝什么？", user=True), message("孙悟空", "猴儿酒！", ["猴儿酒！", "桃子酒！"]),
        message("张飞", "烧刀子！", ["俺喝茶。", "烧刀子！"], 1), message("阿明", "干杯！", user=True),
        message("孙悟空", "干！"), message("张飞", "干了！")])
    out = {name: tmp_path / f"{name}.jsonl" for name in ("train", "test", "pairs", "pairs_test")}
    data_helper.main(["--roles", "孙悟空,张飞", "--st_chats", str(logs), "--test_ratio", "0.5",
                      "--train_out", str(out["train"]), "--test_out", str(out["test"]), "--pairs_out", str(out["pairs"])])

    system = roles_from_file(str(ROLES_FILE))["孙悟空"].system
    prompt = [{"role": "system", "content": system}, {"role": "assistant", "content": "俺老孙来也！"},
              {"role": "user", "content": "大圣，你会几种变化？"}]
    one_on_one = [{"messages": prompt, "chosen": "七十二变，样样精通！", "rejected": rejected, "role": "孙悟空"}
                  for rejected in ("俺会三十六变。", "作为一个AI助手，我不会变化。")]
    pairs = {split: read_pairs(str(out[name])) for split, name in (("train", "pairs"), ("test", "pairs_test"))}
    everything = pairs["train"] + pairs["test"]
    assert [p for p in everything if p["messages"] == prompt] == one_on_one
    group = sorted((p["role"], p["chosen"], p["rejected"]) for p in everything if p not in one_on_one)
    assert group == [("孙悟空", "猴儿酒！", "桃子酒！"), ("张飞", "烧刀子！", "俺喝茶。")]
    # each pair's prompt is its sample's, up to the reply (a group reply's from that character's seat),
    # and it lies in its sample's split: 孙悟空's two samples (round(2 x 0.5) = 1 held out) both have pairs
    assert pairs["test"] and pairs["train"]
    for split in ("train", "test"):
        samples = read_jsonl(out[split])
        for pair in pairs[split]:
            messages, chosen, rejected = pair_of(pair)
            assert any(s["role"] == pair["role"] and plain(s.get("messages", [])[: len(messages) + 1])
                       == plain(messages) + [{"role": "assistant", "content": chosen}] for s in samples), pair
    seat = next(p for p in everything if p["role"] == "张飞")["messages"]
    assert seat[0]["content"].startswith(roles_from_file(str(ROLES_FILE))["张飞"].system)
    assert seat[-1] == {"role": "user", "content": "你: 两位喝什么？\n孙悟空: 猴儿酒！"}


def test_a_bad_swipe_or_pair_flags_are_one_error_line_and_nothing_is_written(tmp_path):
    log = tmp_path / "bad.jsonl"
    write_log(log, [META, message("阿明", "你好", user=True), message("孙悟空", "好", ["好"], 3)])
    outputs = ["--train_out", tmp_path / "t.jsonl", "--test_out", tmp_path / "e.jsonl", "--pairs_out", tmp_path / "p.jsonl"]
    bad = subprocess.run([sys.executable, "data_helper.py", "--roles", "孙悟空", "--st_chats", log, *outputs],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert (bad.returncode, bad.stderr) == (1, f"error: {log}:3: field 'swipe_id' must index 'swipes' (0 to 0), got 3\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]
    flags = subprocess.run([sys.executable, "data_helper.py", "--adapter", "a", "--max_pairs", "0", "--rejected_from",
                            "m", "--temperature", "3"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert flags.returncode == 2
    assert flags.stderr.splitlines() == ["error: --rejected_from: needs --pairs_out",
                                         "error: --max_pairs: must be at least 1, got 0",
                                         "error: temperature must be in [0, 2] (0 = greedy), got 3.0",
                                         "error: --rejected_from: model directory 'm' has no config.json",
                                         "error: --adapter: adapter directory 'a' has no adapter_config.json"]
    nothing = subprocess.run([sys.executable, "data_helper.py", "--pairs_out", tmp_path / "p.jsonl"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=60)
    assert (nothing.returncode, nothing.stderr) == (2, "error: --pairs_out: needs a source of pairs: --st_chats logs "
                                                       "with swipes, or --rejected_from\n")


def test_rejected_from_is_the_models_greedy_reply_without_the_system_prompt(tmp_path, tiny_model_dir, loaded):
    from utils.chat import Sampling
    from utils.engine import ChatEngine
    from utils.pair_sources import generated_pairs
    from utils.pairs import read_pairs

    data = tmp_path / "rolebench"
    data.mkdir()
    for path in SAMPLE_DIR.glob("rolebench-zh_*.jsonl"):  # one question of one reply per file
        row = next(r for r in read_jsonl(path) if r["role"] == "孙悟空")
        (data / path.name).write_text(json.dumps({**row, "generated": row["generated"][:1]}, ensure_ascii=False) + "\n",
                                      encoding="utf-8")
    out = {name: tmp_path / f"{name}.jsonl" for name in ("train", "test", "pairs", "pairs_test")}
    data_helper.main(["--data_dir", str(data), "--roles", "孙悟空", "--test_ratio", "0",
                      "--st_chats", str(SAMPLE_DIR / "st_chats" / "孙悟空 - 2026-12-01@10h00m00s.jsonl"),
                      "--train_out", str(out["train"]), "--test_out", str(out["test"]), "--pairs_out", str(out["pairs"]),
                      "--rejected_from", str(tiny_model_dir), "--max_new_tokens", "8", "--device", "cpu"])

    engine = ChatEngine(*loaded, {})

    def greedy(history):  # the engine's reply to the history alone: no system message at all
        reply = ""
        for reply in engine.start_reply(history, Sampling(max_new_tokens=8, temperature=0)):
            pass
        return reply

    checked = 0
    for split, name in (("train", "pairs"), ("test", "pairs_test")):
        samples = read_jsonl(out[split])
        generated = [p for p in read_pairs(str(out[name])) if p["rejected"] not in
                     {r for s in samples for m in s.get("messages", []) for r in m.get("swipes_rejected", [])}]
        assert len(generated) == len(samples) == {"train": 3, "test": 2}[split]
        for pair, sample in zip(generated, samples):
            if "messages" in sample:  # the SillyTavern log: its last reply against the history's reply
                assert pair["messages"] == plain(sample["messages"][:-1]) and pair["role"] == sample["role"]
                assert pair["chosen"] == sample["messages"][-1]["content"]
                assert pair["rejected"] == greedy(plain(sample["messages"][1:-1]))
            else:
                assert {k: v for k, v in pair.items() if k not in ("chosen", "rejected")} == \
                    {k: v for k, v in sample.items() if k != "output"}
                assert pair["chosen"] == sample["output"]
                assert pair["rejected"] == greedy([{"role": "user", "content": sample["input"]}])
            checked += 1
    assert checked == 5
    # a generated reply that is empty or the sample's own is no pair: counted instead
    sample = {"instruction": "s", "input": "q", "output": "俺老孙！", "role": "孙悟空"}
    skipped, replies = Counter(), iter([" ", " 俺老孙！", "我是AI"])
    assert generated_pairs([sample] * 3, lambda history: next(replies), skipped) == \
        [{"instruction": "s", "input": "q", "role": "孙悟空", "chosen": "俺老孙！", "rejected": "我是AI"}]
    assert skipped == {"empty": 1, "the same as the chosen reply": 1}
    # the character's own notes, folded into the row's user turn, are not shown to the generic assistant
    noted = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q\n\n回答别超过两句。"},
                          {"role": "assistant", "content": "俺老孙！"}], "role": "孙悟空"}
    asked = []
    made = generated_pairs([noted], lambda history: asked.append(history) or "我是AI", Counter(),
                           {"孙悟空": ["回答别超过两句。"]})
    assert asked == [[{"role": "user", "content": "q"}]] and made[0]["messages"] == noted["messages"][:2]

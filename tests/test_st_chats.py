"""SillyTavern chat logs (utils.st_chats) and group scenes (utils.scenes) as training data: the
sample logs read with their swipes, persona and greeting; a scene seen from each seat; speaker
bleed; bad logs and scenes as one error line with nothing written; and data_helper.py -> train.py
(plain and --packing) on a card with a lorebook, greeting and post-history instructions, a World
Info file, a one-on-one and a group log and the sample scenes; and train = serve for them, to the
token: the ids train.py's data step (plain and packed) puts before each reply are the ids the chat
engine serves for that conversation up to the reply, one-on-one and from a speaker's seat."""

import json
import os
import re
import subprocess
import sys
from collections import Counter

import pytest

from conftest import REPO_ROOT, SAMPLE_DIR
from utils.cli import UserError
from utils.data import read_samples
from utils.scenes import group_note, seat, speaker_bleed
from utils.st_chats import log_files, read_log

LOGS = SAMPLE_DIR / "st_chats"
SCENES = SAMPLE_DIR / "scenes" / "three_at_a_table.jsonl"


def test_a_one_on_one_log_keeps_the_chosen_swipe_maps_the_persona_and_drops_what_st_hides():
    dropped = Counter()
    (path,) = [p for p in log_files(str(LOGS)) if "孙悟空 -" in p]
    messages = read_log(path, "你", dropped)
    assert dropped == Counter({"narrator": 1, "hidden or system": 1})
    assert messages[0] == {"role": "assistant", "name": "孙悟空", "train": False,
                           "content": "嘿，你！俺老孙刚从花果山回来，桃子还热乎着呢，要不要尝一个？"}  # {{user}} and greeting
    assert [m["role"] for m in messages] == ["assistant", "user", "assistant", "user", "assistant", "user", "assistant"]
    changed = messages[4]  # swipe_id 1 is the reply; the others, persona name mapped, are kept as rejected
    assert changed["content"].startswith("变你？小菜一碟。")
    assert changed["swipes_rejected"] == ["这有何难！你看好了——变！嘿嘿，现在屋里有两个你，你猜哪个是真的？",
                                          "你，俺变了你，谁来陪俺说话？还是别变了。"]
    assert not any("小明" in m["content"] for m in messages)
    zhang = read_log(next(p for p in log_files(str(LOGS)) if "张飞 -" in p), "你", dropped)
    assert zhang[3]["content"] == "张飞，你觉得你我酒量怎么样？"  # {{char}} in the user's message: the character
    assert dropped["comment"] == 1


def test_a_scene_from_each_seat_and_speaker_bleed():
    scene = [{"role": "user", "content": "{{char}}来喝酒"}, {"role": "assistant", "name": "李白", "content": "好！"},
             {"role": "assistant", "name": "张飞", "content": "俺先干！"}, {"role": "user", "content": "慢点"},
             {"role": "assistant", "name": "李白", "content": "一杯一杯复一杯。"}]
    assert seat(scene, "张飞", "你") == [{"role": "user", "content": "你: 张飞来喝酒\n李白: 好！"},
                                        {"role": "assistant", "content": "俺先干！"},
                                        {"role": "user", "content": "你: 慢点\n李白: 一杯一杯复一杯。"}]
    assert seat(scene, "李白", "你") == [{"role": "user", "content": "你: 李白来喝酒"}, {"role": "assistant", "content": "好！"},
                                        {"role": "user", "content": "张飞: 俺先干！\n你: 慢点"},
                                        {"role": "assistant", "content": "一杯一杯复一杯。"}]
    assert group_note("李白") == "[Write the next reply only as 李白.]"
    assert speaker_bleed("好酒！\n张飞：俺也要", ["张飞", "孙悟空"])
    assert speaker_bleed("  孙悟空 : 嘿", ["张飞", "孙悟空"])
    assert not speaker_bleed("张飞说得对：喝！", ["张飞"]) and not speaker_bleed("好酒", ["张飞"])


def test_train_py_refuses_an_unexpanded_scene(tmp_path):
    path = tmp_path / "scene.jsonl"
    path.write_text(SCENES.read_text(encoding="utf-8").splitlines()[0] + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r":1: field 'messages': a group scene .* from its own seat$"):
        read_samples(str(path))


def helper(tmp_path, *args):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "data_helper.py", *map(str, args), "--train_out", str(out / "train.jsonl"),
                           "--test_out", str(out / "test.jsonl")], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120), out


META = {"user_name": "小明", "character_name": "孙悟空", "chat_metadata": {}}


@pytest.mark.parametrize("lines, message", [
    ([META, {"name": "孙悟空", "is_user": False, "mes": 3}], "{path}:2: field 'mes' must be a string"),
    ([META, {"name": "孙悟空", "is_user": False, "mes": "a", "swipes": ["a"], "swipe_id": 2}],
     "{path}:2: field 'swipe_id' must index 'swipes' (0 to 0), got 2"),
    ([{"hello": 1}, {"name": "孙悟空", "mes": "a"}], "{path}:1: not a SillyTavern chat log"),
    ([META, {"name": "小明", "is_user": True, "mes": "a"}], "{path}: a chat log without a character's message"),
])
def test_bad_logs_are_one_line_and_nothing_is_written(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    proc, out = helper(tmp_path, "--roles", "孙悟空", "--st_chats", path)
    assert proc.returncode == 1 and proc.stderr.startswith("error: " + message.format(path=path))
    assert proc.stderr.count("\n") == 1 and list(out.iterdir()) == []


def test_a_log_of_other_characters_is_left_out_and_counted(tmp_path):
    other = tmp_path / "logs"
    other.mkdir()
    (other / "猪八戒.jsonl").write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in [
        META, {"name": "小明", "is_user": True, "mes": "b"}, {"name": "猪八戒", "is_user": False, "mes": "c"}]),
        encoding="utf-8")
    proc, out = helper(tmp_path, "--roles", "孙悟空", "--st_chats", other, "--st_chats", LOGS)
    assert proc.returncode == 0, proc.stderr
    assert "SillyTavern chats: 1 one-on-one and 1 group logs, 2 samples; left out: 1 comment, 1 hidden or system, " \
           "2 logs of characters not given, 1 narrator" in proc.stdout
    assert "note: SillyTavern logs of 张飞, 猪八戒 left out: not among the characters given (孙悟空)" in proc.stderr


def test_a_scene_without_a_character_given_is_refused(tmp_path):
    proc, out = helper(tmp_path, "--roles", "皇帝", "--dialogues", SCENES)
    assert proc.returncode == 1 and proc.stderr == (
        f"error: {SCENES}:1: none of the scene's characters (李白, 张飞, 孙悟空) is among the characters given (皇帝)\n")
    assert list(out.iterdir()) == []


CARD = {"spec": "chara_card_v2", "data": {
    "name": "孙悟空", "description": "花果山的美猴王，齐天大圣。", "first_mes": "{{user}}，俺老孙在此！",
    "mes_example": "<START>\n{{user}}: 大圣，你会几种变化？\n{{char}}: 七十二变，样样精通！\n"
                   "<START>\n{{user}}: 师父在哪？\n{{char}}: 在前面化斋呢。",
    "post_history_instructions": "{{original}}回答别超过两句。",
    "character_book": {"entries": [{"id": 1, "keys": ["师父"], "content": "{{char}}的师父是唐僧。",
                                    "position": "after_char"}]}}}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("st")
    card = tmp / "孙悟空.json"
    card.write_text(json.dumps(CARD, ensure_ascii=False), encoding="utf-8")
    proc, out = helper(tmp, "--card", card, "--roles", "张飞,李白", "--lorebook", SAMPLE_DIR / "world_info.json",
                       "--st_chats", LOGS, "--dialogues", SCENES, "--test_ratio", "0.2")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, out


def test_data_helper_writes_what_trains(built):
    stdout, out = built
    # a row per reply: with a lorebook (every character here has world_info.json) each reply's prompt is its own
    assert "SillyTavern chats: 2 one-on-one and 1 group logs, 12 samples; left out: 1 comment, 1 hidden or system, " \
           "1 narrator" in stdout
    rows = [json.loads(line) for name in ("train.jsonl", "test.jsonl")
            for line in (out / name).read_text(encoding="utf-8").splitlines()]
    own = [r for r in rows if "messages" in r]
    card_rows = [r for r in own if r["role"] == "孙悟空" and r["messages"][1].get("content") == "你，俺老孙在此！"]
    assert len(card_rows) == 2  # the two card dialogues, each opened by the card's greeting as context
    assert all(r["messages"][1]["train"] is False for r in card_rows)
    # the one-on-one log opens with the greeting it was shown, as context; the card's notes follow its history
    assert all([m.get("train", True) for m in r["messages"] if m["role"] == "assistant"][-1:] == [True]
               and sum(m.get("train", True) for m in r["messages"] if m["role"] == "assistant") == 1 for r in own)
    logs = [r for r in own if r["role"] == "孙悟空" and r["messages"][1]["content"].startswith("嘿，你！")]
    assert len(logs) == 3  # its three replies, each after the notes as served at that point
    log = max(logs, key=lambda r: len(r["messages"]))
    assert all(r["messages"][-2]["content"].endswith("\n\n回答别超过两句。") for r in logs)
    assert log["messages"][1]["train"] is False and log["messages"][-2]["content"].endswith("\n\n回答别超过两句。")
    master = next(r for r in card_rows if r["messages"][-1]["content"] == "在前面化斋呢。")
    assert master["messages"][0]["content"].endswith("\n孙悟空的师父是唐僧。") and master["lore"][0].endswith("#1")
    assert master["messages"][-2]["content"] == "师父在哪？\n\n回答别超过两句。"
    seats = [r for r in own if r["messages"][0]["content"].endswith(".]")]
    assert Counter(r["role"] for r in seats) == {"孙悟空": 7, "张飞": 6, "李白": 7}  # each reply of 3 scenes + the group log
    assert all(r["messages"][0]["content"].endswith(f"[Write the next reply only as {r['role']}.]") for r in seats)
    assert all(r["base_system"] + "\n" in r["messages"][0]["content"] for r in seats)
    assert not any(speaker_bleed(m["content"], ["孙悟空", "张飞", "李白", "你"]) for r in seats
                   for m in r["messages"] if m["role"] == "assistant")


def test_a_scene_goes_to_one_split_whole(tmp_path):
    """A character's seat holds the others' replies as its lines: were the seats of one scene split apart,
    a test reply would be in the training rows. Each scene and group log goes to train or test whole."""
    for seed in ("1", "2", "3"):
        proc, out = helper(tmp_path, "--roles", "孙悟空,张飞,李白", "--dialogues", SCENES,
                           "--st_chats", LOGS, "--test_ratio", "0.5", "--seed", seed)
        assert proc.returncode == 0, proc.stderr
        rows = {split: [json.loads(line) for line in (out / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]
                for split in ("train", "test")}
        trained = "\n".join(m["content"] for row in rows["train"] for m in row.get("messages", []))
        seats = [row for row in rows["test"] if "[Write the next reply" in row.get("messages", [{}])[0].get("content", "")]
        tested = [row["messages"][-1]["content"] for row in seats]
        assert tested and not [reply for reply in tested if reply in trained], seed


def test_rolebench_rows_train_on_the_prompt_their_lorebook_gives():
    """RoleBench questions with --lorebook: each that fires an entry is written as the conversation row of
    the prompt served for it (Context.apply on the role's prompt and the question); the rest stay
    instruction rows, whose prompt the lorebook leaves as it is."""
    import data_helper
    from utils.lorebook import Context, read_lorebook
    from utils.prompts import roles_from_file

    roles = roles_from_file(str(REPO_ROOT / "data" / "roles.json"))
    contexts = {name: Context(name, "你", (read_lorebook(str(SAMPLE_DIR / "world_info.json")),)) for name in roles}
    rows = data_helper.read_split(str(SAMPLE_DIR), "train", ["孙悟空", "张飞", "李白"], None, 1 << 20)
    plain = data_helper.make_samples(rows, roles, 2, 1234)
    samples = data_helper.with_context(plain, roles, contexts)
    fired = [s for s in samples if "messages" in s]
    assert len(fired) == 3 and all(s["lore"] for s in fired)
    for before, sample in zip(plain, samples):
        served, _ = contexts[before["role"]].apply([{"role": "system", "content": before["instruction"]},
                                                    {"role": "user", "content": before["input"]}])
        if "messages" in sample:
            assert sample["messages"] == [*served, {"role": "assistant", "content": before["output"]}]
            # the character's own prompt: kept beside a system prompt that entries changed
            assert sample.get("base_system", sample["messages"][0]["content"]) == roles[before["role"]].system
        else:
            assert sample == before and served == [{"role": "system", "content": before["instruction"]},
                                                   {"role": "user", "content": before["input"]}]


@pytest.mark.parametrize("packing", [False, True])
def test_train_py_trains_them(built, tiny_model_dir, tmp_path, packing):
    _, out = built
    command = [sys.executable, "train.py", "--model_name_or_path", str(tiny_model_dir),
               "--train_path", str(out / "train.jsonl"), "--output_dir", str(tmp_path / "run"),
               "--max_len", "512", "--max_src_len", "256", "--per_device_train_batch_size", "4",
               "--show_loss_step", "1", "--save_model_step", "2", "--max_steps", "2",
               *(["--packing"] if packing else [])]
    proc = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                          env={"OMP_NUM_THREADS": "1", **os.environ})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(int(s) for s in re.findall(r"^step=(\d+) loss=[0-9.]+", proc.stdout + proc.stderr, re.M)) == [1, 2]
    record = json.loads((tmp_path / "run" / "epoch-1-step-2" / "roleplay.json").read_text(encoding="utf-8"))
    # the recorded prompt is the character's own, without the lorebook entries or the group note
    assert set(record["roles"]) >= {"孙悟空", "张飞", "李白"}
    assert all("[Write the next reply" not in r["system"] and "唐僧" not in r["system"] for r in record["roles"].values())


def test_a_seat_serves_the_prompt_it_trained_on(built, tiny_model_dir):
    """A scene's row for 张飞, as data_helper.py wrote it, encodes to the prompt that serving builds for
    张飞's turn: the seat of the scene so far, through the Context with the group note."""
    from transformers import GenerationConfig

    from baichuan import BaichuanTokenizer
    from baichuan.generation_utils import build_chat_input, encode_conversation
    from utils.data import row_messages
    from utils.lorebook import Context, read_lorebook
    from utils.prompts import roles_from_file

    tokenizer = BaichuanTokenizer.from_pretrained(tiny_model_dir)
    config = GenerationConfig.from_pretrained(tiny_model_dir)
    scene = json.loads(SCENES.read_text(encoding="utf-8").splitlines()[2])["messages"]
    turn = max(i for i, m in enumerate(scene) if m.get("name") == "张飞")
    _, out = built
    rows = [json.loads(line) for name in ("train.jsonl", "test.jsonl")
            for line in (out / name).read_text(encoding="utf-8").splitlines()]
    (row,) = [r for r in rows if r["role"] == "张飞" and "messages" in r
              and r["messages"][-1]["content"] == scene[turn]["content"]]
    system = roles_from_file(str(REPO_ROOT / "data" / "roles.json"))["张飞"].system
    context = Context("张飞", "你", (read_lorebook(str(SAMPLE_DIR / "world_info.json")),), extra_system=group_note("张飞"))
    served, _ = context.apply([{"role": "system", "content": system}, *seat(scene[:turn], "张飞", "你")])
    prompt = build_chat_input(tokenizer, served, config, 4096, 64)
    ids, _, _ = encode_conversation(tokenizer, row_messages(row), config.user_token_id, config.assistant_token_id,
                                    4096, 4096)
    assert ids[: len(prompt)] == prompt and tokenizer.decode(ids[len(prompt):-1]) == scene[turn]["content"]


# ---------------------------------------------------------------- train = serve, to the token, plain and --packing


@pytest.fixture(scope="module")
def card_lorebook_notes(built):
    return built[1]


@pytest.fixture(scope="module")
def roles_only(tmp_path_factory):
    """data_helper.py on the sample logs and scenes for the three RoleBench roles, no lorebook or
    notes: a row's earlier replies then see nothing that only its last reply's prompt holds."""
    import data_helper

    out = tmp_path_factory.mktemp("roles_only")
    data_helper.main(["--roles", "孙悟空,张飞,李白", "--st_chats", str(LOGS), "--dialogues", str(SCENES),
                      "--test_ratio", "0", "--train_out", str(out / "train.jsonl"), "--test_out", str(out / "test.jsonl")])
    return out


def conversations(user_name="你"):
    """The sample conversations: the SillyTavern logs (two one-on-one, one group) and the scenes."""
    logs = [read_log(path, user_name, Counter()) for path in log_files(str(LOGS))]
    return logs + [json.loads(line)["messages"] for line in SCENES.read_text(encoding="utf-8").splitlines()]


def served_replies(engine):
    """(prompt ids, reply ids) of each character's trained replies, the prompt as serving builds it for the conversation up to the reply:
    the page's turn one-on-one, ChatEngine.scene_prompt for the speaker in a group; then laid out
    by the ChatStream that would generate the reply."""
    from baichuan.generation_utils import encode_text
    from utils.chat import Sampling
    from utils.scenes import speakers

    served = Counter()
    for scene in conversations(engine.user_name):
        group = len(speakers(scene)) > 1
        for t, message in enumerate(scene):
            if message["role"] != "assistant" or not message.get("train", True):
                continue
            name = message["name"]
            sampling = Sampling(max_new_tokens=16)
            if group:
                messages = engine.scene_prompt(name, scene[:t])
            else:
                messages = engine.turn(scene[t - 1]["content"], scene[: t - 1], name, sampling)
            ids = engine.start_reply(messages, sampling).ids
            served[(tuple(ids), tuple(encode_text(engine.tokenizer, message["content"])))] += 1
    return served


def trained_replies(samples, ends):
    """(prompt ids, reply ids) of each labelled reply of (input_ids, labels) samples: the ids
    before a run of labels, and the run up to the turn's end (a user token, or eos)."""
    found = Counter()
    for ids, labels in samples:
        for start in range(1, len(labels)):
            if labels[start] != -100 and labels[start - 1] == -100:
                end = start
                while ids[end] not in ends:
                    end += 1
                found[(ids[:start], ids[start:end])] += 1
    return found


def packed_samples(rows, pad_id):
    """Each sample of packed rows as train.py's batch gives it to the model: the shared prompt,
    then the sample's own segment (collate's attention mask numbers it), at positions that go on
    from the prompt, as the sample's own would."""
    from utils.data import collate

    samples = []
    for row in rows:
        batch = collate([row], pad_id)
        ids, labels, mask, positions = (batch[k][0] for k in ("input_ids", "labels", "attention_mask", "position_ids"))
        for segment in range(1, int(mask.max()) + 1):
            seen = (mask == -1) | (mask == segment)
            assert positions[seen].tolist() == list(range(int(seen.sum())))
            samples.append((tuple(ids[seen].tolist()), tuple(labels[seen].tolist())))
    return samples


@pytest.mark.parametrize("packing", [False, True], ids=["plain", "packing"])
@pytest.mark.parametrize("inputs", ["card_lorebook_notes", "roles_only"])
def test_each_reply_trains_on_the_prompt_the_engine_serves(request, inputs, packing, loaded, tiny_model_dir, tmp_path):
    """The rows of the sample one-on-one and group logs and the scenes, turned into ids by train.py's
    own data step (plain, or --packing and the batch the model sees), hold each reply after the
    very ids that serving builds for that conversation up to the reply: ChatEngine.prompt one-on-one,
    ChatEngine.scene_prompt from the speaker's seat in a group, the roles from the record train.py
    writes: every reply, the card's lorebook and notes and a World Info file included (there each
    reply has a row of its own, data_helper.conversation_samples)."""
    import train
    from utils.engine import ChatEngine
    from utils.prompts import load_prompts, write_record
    from utils.training.config import TrainConfig

    out = request.getfixturevalue(inputs)
    paths = [str(p) for p in (out / "train.jsonl", out / "test.jsonl") if p.stat().st_size]
    flags = ["--model_name_or_path", str(tiny_model_dir), "--train_path", *paths, "--output_dir", str(tmp_path / "run")]
    config = TrainConfig.from_args(train.build_parser().parse_args(flags))
    tokenizer, user_id, assistant_id = train.chat_tokenizer(config.model)
    rows = train.read_rows(config.data, dpo=False)
    dataset, roles, _ = train.load_data(config, rows, tokenizer, user_id, assistant_id, rank=0, world_size=1)
    assert dataset.dropped == dataset.truncated == 0 and len(dataset) == len(rows["train"])
    samples = [(tuple(e["input_ids"]), tuple(e["labels"])) for e in dataset.examples]
    if packing:
        packing_config = TrainConfig.from_args(train.build_parser().parse_args([*flags, "--packing"]))
        packed, _, _ = train.load_data(packing_config, rows, tokenizer, user_id, assistant_id, rank=0, world_size=1)
        assert len(packed) < len(samples)  # several samples do share a row
        # a packed sample is the unpacked one, id for id and label for label
        assert Counter(packed_samples(packed.rows, tokenizer.pad_token_id)) == Counter(samples)
    write_record(str(tmp_path), train.prompt_record(config.data, roles, tokenizer, user_id, assistant_id))
    model, serving_tokenizer = loaded
    engine = ChatEngine(model, serving_tokenizer, load_prompts(str(tmp_path)).roles)

    served = served_replies(engine)
    assert sum(served.values()) == 26  # 6 one-on-one replies, 6 in the group log, 14 in the scenes
    ends = {user_id, tokenizer.eos_token_id}
    missing = served - trained_replies(samples, ends)
    assert not missing, [(tokenizer.decode(p[-60:]), tokenizer.decode(r)) for p, r in missing]
    if inputs == "roles_only":  # and the conversation rows train nothing else (the card's dialogues are more)
        conversation_samples = [s for row, s in zip(rows["train"], dataset.examples) if "messages" in row]
        assert trained_replies([(tuple(s["input_ids"]), tuple(s["labels"])) for s in conversation_samples],
                               ends) == served

"""Tests for evaluate.py: ROUGE-L by hand, the CLI end to end on a tiny random model, resume,
the RoleGPT baseline row and the TensorBoard curves. CPU only, well under a minute."""

import json
import math
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "evaluate.py"
SAMPLE = ROOT / "data" / "sample"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

sys.path.insert(0, str(ROOT))
import evaluate  # noqa: E402
from utils.report import (ResultStore, markdown_report, read_curves, report_meta, score_answer,  # noqa: E402
                          table_columns, word_tokens)
from helpers import RecordingModel, card_png, serve  # noqa: E402


def run(*args):
    """The CLI in a subprocess, as a user runs it."""
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def run_here(capsys, *args):
    """evaluate.main in this process (saves the imports of a subprocess); returns its stdout."""
    capsys.readouterr()
    evaluate.main([str(a) for a in args])
    return capsys.readouterr().out


def assert_png(path):
    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 10_000  # a drawn figure, not an empty canvas


def table_rows(markdown, section="## Results"):
    """{first cell: [other cells]} of the first table after `section`."""
    rows = {}
    for line in markdown.split(section, 1)[1].split("\n## ", 1)[0].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] not in ("model", "model / role") and not cells[0].startswith("---"):
            rows[cells[0]] = cells[1:]
    return rows


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    """conftest's tiny random Baichuan2 (read-only), with a tokenizer trained on the sample texts."""
    return tiny_model_dir


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model, tmp_path_factory):
    """A LoRA adapter with random (non-zero) weights on the tiny model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import baichuan  # noqa: F401

    folder = tmp_path_factory.mktemp("adapter")
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["W_pack"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(str(folder))
    return folder


# ---------------------------------------------------------------- ROUGE-L


def char_f1(answer, reference):
    return score_answer(answer, {"references": [reference]})["char_first"]


def test_rouge_l_hand_checked_chinese():
    assert char_f1("俺老孙来也", "俺老孙来也") == 1.0
    assert char_f1("俺老孙来也", "喝酒吟诗") == 0.0
    # "我爱北京天安门" (7 chars) vs "我爱上海" (4): LCS = "我爱" = 2, P = 2/7, R = 2/4,
    # F1 = 2PR / (P + R) = (2/7) / (11/14) = 4/11 = 0.3636...
    assert char_f1("我爱北京天安门", "我爱上海") == pytest.approx(4 / 11)
    # "俺老孙去也" (5) vs "俺去了" (3): LCS = "俺去" = 2, F1 = 2 * 2 / (5 + 3) = 0.5
    assert char_f1("俺老孙去也", "俺去了") == pytest.approx(0.5)
    # whitespace does not count, punctuation does: "你 好！" vs "你好" -> 3 vs 2 chars, LCS 2 -> 0.8
    assert char_f1("你 好！", "你好") == pytest.approx(0.8)
    assert char_f1("", "你好") == 0.0
    assert char_f1("你好", "") == 0.0


def test_rouge_l_is_the_beta_1_f1_of_the_textbook_lcs():
    """rouge-score's F-measure equals 2 LCS / (len(answer) + len(reference)) on random strings, and
    score_multi keeps the best reference by it (the `rouge` package's beta = P / R would not)."""
    def lcs_dp(a, b):
        table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
        for i, x in enumerate(a):
            for j, y in enumerate(b):
                table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
        return table[-1][-1]

    rng = random.Random(0)
    for _ in range(100):
        answer = "".join(rng.choice("俺老孙来也酒") for _ in range(rng.randint(1, 120)))
        references = ["".join(rng.choice("俺老孙去了酒") for _ in range(rng.randint(1, 120))) for _ in range(3)]
        f1 = [2 * lcs_dp(answer, r) / (len(answer) + len(r)) for r in references]
        scores = score_answer(answer, {"references": references})
        assert scores["char_first"] == pytest.approx(f1[0])
        assert scores["char_best"] == pytest.approx(max(f1))


def test_word_variant_uses_jieba_words():
    # jieba: "我爱北京天安门" -> 我/爱/北京/天安门, "我爱上海" -> 我/爱/上海: LCS 2 words,
    # F1 = 2 * 2 / (4 + 3) = 4/7, while on characters it is 4/11 (previous test).
    assert word_tokens("我爱北京天安门") == ["我", "爱", "北京", "天安门"]
    assert score_answer("我爱北京天安门", {"references": ["我爱上海"]})["word_first"] == pytest.approx(4 / 7)
    # "北京大学" is one jieba word, "北京的大学" three: no common word, but 4 common characters.
    scores = score_answer("北京大学", {"references": ["北京的大学", "北京大学"]})
    assert scores["word_first"] == 0.0
    assert scores["char_first"] == pytest.approx(8 / 9)
    assert scores["word_best"] == scores["char_best"] == 1.0  # the second reference is identical


# ---------------------------------------------------------------- questions


def test_questions_keep_split_and_all_references():
    questions = evaluate.questions_from_data_dir(str(SAMPLE), ["孙悟空", "张飞", "李白"])
    first = questions[0]
    assert (first["split"], first["role"], first["question"]) == ("general", "孙悟空", "你觉得什么样的人值得信任？")
    assert len(first["references"]) == 3  # every reply kept, not data_helper's two
    specific = [q for q in questions if q["split"] == "role_specific"]
    assert specific and all(not q["question"].startswith(q["role"] + "，") for q in specific)
    assert first["instruction"] is None  # each model brings its own system prompt

    picked = evaluate.limit_questions(questions, 2)
    assert [(q["split"], q["role"]) for q in picked] == [
        ("general", "孙悟空"), ("general", "张飞"), ("role_specific", "孙悟空"), ("role_specific", "张飞")]


def test_test_file_rows_are_grouped_into_questions(tmp_path):
    rows = [{"instruction": "扮演张飞", "input": "你喝酒吗？", "output": reply, "role": "张飞"}
            for reply in ("喝！", "天天喝！")]
    rows.append({"instruction": "扮演李白", "input": "你喝酒吗？", "output": "但愿长醉不复醒。", "role": "李白",
                 "split": "general"})
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    questions = evaluate.questions_from_test_file(str(path), None)
    assert [(q["split"], q["role"], q["references"], q["instruction"]) for q in questions] == [
        ("unknown", "张飞", ["喝！", "天天喝！"], "扮演张飞"), ("general", "李白", ["但愿长醉不复醒。"], "扮演李白")]


def test_conversation_rows_ask_their_last_message_after_the_turns_before_it(tmp_path):
    turns = [{"role": "user", "content": "在吗？"}, {"role": "assistant", "content": "在呢。"},
             {"role": "user", "content": "绣一幅要多久？"}, {"role": "assistant", "content": "慢慢来。"}]
    rows = [{"role": "阿绣", "messages": [{"role": "system", "content": "扮演阿绣"}, *turns]},
            {"role": "阿绣", "system": "扮演阿绣", "conversations": [{"from": "human", "value": "绣一幅要多久？"},
                                                                  {"from": "gpt", "value": "三天。"}]},
            {"role": "阿绣", "messages": [{"role": "assistant", "content": "客官请进。"}]}]
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[:2]), encoding="utf-8")
    with_history, alone = evaluate.questions_from_test_file(str(path), None)
    assert with_history["references"] == ["慢慢来。"] and alone["references"] == ["三天。"]
    assert evaluate.question_messages(with_history["instruction"], with_history) == [
        {"role": "system", "content": "扮演阿绣"}, *turns[:3]]
    assert evaluate.question_messages(alone["instruction"], alone) == [{"role": "system", "content": "扮演阿绣"}, turns[2]]
    path.write_text(json.dumps(rows[2], ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(evaluate.UserError, match=r"test.jsonl:1: the conversation has no user message"):
        evaluate.questions_from_test_file(str(path), None)


def test_role_contexts_apply_as_served_and_written_rows_are_not_applied_twice(loaded, tmp_path):
    """A question gets its role's lorebook and notes as ChatEngine.prompt gives them; a conversation row that
    data_helper.py wrote with them already is asked as written."""
    import data_helper
    from utils.engine import ChatEngine
    from utils.lorebook import Context, read_lorebook
    from utils.prompts import Prompts, Role

    note = "[只以孙悟空的身份回答。]"
    context = Context("孙悟空", "你", (read_lorebook(str(SAMPLE / "world_info.json")),), post_history=note)
    role = Role("孙悟空", "你现在要扮演孙悟空。", context=context)
    spec, prompts = evaluate.ModelSpec("m", "some/model"), Prompts({"孙悟空": role})
    question = {"split": "general", "role": "孙悟空", "question": "你的金箍棒是哪来的？", "references": ["借的。"],
                "instruction": None, "history": [], "ask": "你的金箍棒是哪来的？", "written": None}
    asked = evaluate.question_prompt(spec, prompts, question)
    # the 金箍棒 entry goes before the character's prompt, the note after the question (SEPARATOR-joined)
    assert asked[0]["content"].startswith("如意金箍棒原是东海龙宫的定海神针")
    assert asked[0]["content"].endswith("你现在要扮演孙悟空。")
    assert asked[-1] == {"role": "user", "content": f"你的金箍棒是哪来的？\n\n{note}"}
    engine = ChatEngine(*loaded, {"孙悟空": role})
    assert asked == engine.prompt(role, [{"role": "user", "content": "你的金箍棒是哪来的？"}])

    turns = [{"role": "user", "content": "大圣在吗？"}, {"role": "assistant", "content": "俺老孙在此！"},
             {"role": "user", "content": "金箍棒借我玩玩？"}, {"role": "assistant", "content": "休想！"}]
    row = data_helper.conversation_samples(role, turns, context)[-1]  # the last reply's row
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    (written,) = evaluate.questions_from_test_file(str(path), None)
    asked = evaluate.question_prompt(spec, prompts, written)
    assert asked == row["messages"][:-1]
    assert sum(m["content"].count(note) for m in asked) == 1 and asked[0]["content"].count("如意金箍棒") == 1
    # another prompt for the role (--roles_file): its system prompt, the row's turns as written
    other = Prompts({"孙悟空": Role("孙悟空", "你是齐天大圣。", context=context)})
    asked = evaluate.question_prompt(spec, other, written)
    assert asked == [{"role": "system", "content": "你是齐天大圣。"}, *row["messages"][1:-1]]


def test_scene_questions_are_asked_from_each_seat_and_scored_for_scene_speaker_bleed(loaded, roles, tmp_path):
    import data_helper
    from utils.engine import ChatEngine
    from utils.lorebook import Context
    from utils.prompts import Prompts
    from utils.report import aggregate

    spec, prompts, engine = evaluate.ModelSpec("m", "some/model"), Prompts(roles), ChatEngine(*loaded, roles)
    scenes = SAMPLE / "scenes" / "three_at_a_table.jsonl"
    questions = evaluate.questions_from_test_file(str(scenes), None)
    assert len(questions) == 9  # three scenes, each character's last reply from its own seat
    first = json.loads(scenes.read_text(encoding="utf-8").splitlines()[0])["messages"]
    wukong = next(q for q in questions if q["role"] == "孙悟空")
    assert wukong["references"] == [first[5]["content"]] and wukong["ask"] == "你: 大圣，月亮上真有嫦娥吗？"
    assert wukong["others"] == ["李白", "张飞"]
    # the prompt is the one the page and the API serve for that seat
    assert evaluate.question_prompt(spec, prompts, wukong) == engine.scene_prompt("孙悟空", first[:5])
    # a model that trained with another user name is asked with it, as it is served
    named = ChatEngine(*loaded, roles, user_name="User")
    asked = evaluate.question_prompt(spec, Prompts(roles, user_name="User"), wukong)
    assert asked == named.scene_prompt("孙悟空", first[:5]) and asked[-1]["content"].startswith("User: ")

    # SillyTavern's group log through data_helper.py: rows of a seat each, asked as written, same speakers
    contexts = {name: Context(name, "你") for name in roles}
    rows = [row for conversation in data_helper.st_chat_samples([str(SAMPLE / "st_chats")], roles, contexts, "你",
                                                               1 << 20) for row in conversation]
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    written = evaluate.questions_from_test_file(str(path), None)
    seats = [q for q in written if q["others"] is not None]
    assert len(seats) == 3 and len(written) == 5  # the group log's three characters, and two one-on-one logs
    assert all(sorted(q["others"]) == sorted({"孙悟空", "张飞", "李白", "你"} - {q["role"]}) for q in seats)
    def plain(messages):  # the layout's fields; swipes and flags aside
        return [(m["role"], m["content"]) for m in messages]

    for question, row in zip(written, rows):
        assert plain(evaluate.question_prompt(spec, prompts, question)) == plain(row["messages"][:-1])

    # scene speaker bleed: a line in another's name, over the scene's questions only
    phrases = evaluate.disclosure_phrases(evaluate.parse_args([]))
    answers = {"孙悟空": "张飞：俺也要去！", "张飞": "你: 好啊。", "李白": "举杯邀明月。\n诸位：干了！"}
    records = [evaluate.with_consistency({"split": q["split"], "role": q["role"], "answer": answers[q["role"]],
                                          "scores": score_answer(answers[q["role"]], q)}, q, ["孙悟空"], phrases)
               for q in questions[:3] + [written[0] if written[0]["others"] is None else written[-1]]]
    assert [r["consistency"]["scene_speaker_bleed"] for r in records] == [
        1.0 if q["role"] != "李白" else 0.0 for q in questions[:3]] + [None]
    assert aggregate(records, ["孙悟空", "张飞", "李白"])["overall"]["consistency"]["scene_speaker_bleed"] == \
        pytest.approx(2 / 3)

    # the report's consistency table has it as a column of its own
    results = {"m": {"kind": "model", **aggregate(records, ["孙悟空", "张飞", "李白"])}}
    meta = report_meta(str(scenes), None, questions, ["孙悟空", "张飞", "李白"], vars(evaluate.parse_args([])), {})
    table = table_rows(markdown_report(results, meta), "## Character consistency")
    assert table["m / all"][:4] == ["4", "0.0000", "0.2500", "0.6667"]  # answers, disclosure, bleed, scene bleed


def test_saved_results_are_reused_only_with_the_same_settings_and_prompt(tmp_path):
    question = {"split": "general", "role": "张飞", "question": "你喝酒吗？", "references": ["喝！"]}
    spec, args = evaluate.ModelSpec("m", "some/model"), evaluate.parse_args([])
    settings = evaluate.run_settings(spec, args, ["扮演张飞", question["references"]])
    store = ResultStore(str(tmp_path / "samples.jsonl"))
    store.add({"model": "m", "split": "general", "role": "张飞", "question": "你喝酒吗？", "answer": "喝！",
               "settings": settings})
    store.close()
    store = ResultStore(str(tmp_path / "samples.jsonl"))
    assert store.get("m", question, settings)["answer"] == "喝！"
    assert store.get("other", question, settings) is None
    assert store.get("m", question, {**settings, "max_new_tokens": 7}) is None
    assert store.get("m", question, evaluate.run_settings(spec, args, ["扮演张飞", ["不喝。"]])) is None
    assert store.get("m", question, evaluate.run_settings(spec, args, ["你是张飞", question["references"]])) is None
    store.close()


# ---------------------------------------------------------------- models


def test_left_padded_batches_match_single_prompts_and_ppl_is_token_weighted(tiny_model):
    from utils.models import load_for_inference

    from baichuan.generation_utils import build_chat_input

    model, tokenizer = load_for_inference(str(tiny_model), device="cpu")
    args = evaluate.parse_args(["--max_new_tokens", "6"])
    config = evaluate.generation_config_for(model, args)
    # very different prompt lengths, so the batch really is padded
    questions = [{"instruction": instruction, "question": question, "references": references}
                 for instruction, question, references in (
                     ("", "你好", ["好啊。"]),
                     ("扮演李白。", "月亮", ["举杯邀明月，对影成三人。", "床前明月光。"]),
                     ("你现在要扮演孙悟空。" * 5, "你的金箍棒是从哪里得来的？", ["东海龙宫里借的。"] * 3))]
    messages = [[{"role": "system", "content": q["instruction"]}, {"role": "user", "content": q["question"]}]
                for q in questions]
    prompts = [build_chat_input(tokenizer, m, model.generation_config, model.config.model_max_length, 6)
               for m in messages]
    batched = evaluate.generate_answers(model, tokenizer, prompts, config)
    single = [evaluate.generate_answers(model, tokenizer, [p], config)[0] for p in prompts]
    assert batched == single
    assert len(set(single)) > 1  # the prompts matter, so the comparison means something

    for question, m in zip(questions, messages):
        total_1, count_1 = evaluate.reference_nll(model, tokenizer, m, question["references"], batch_size=1)
        total_n, count_n = evaluate.reference_nll(model, tokenizer, m, question["references"], batch_size=8)
        assert count_1 == count_n == sum(len(tokenizer.encode(r, add_special_tokens=False)) + 1
                                         for r in question["references"])
        assert total_n == pytest.approx(total_1, rel=1e-4)
        assert total_1 / count_1 > 0


def test_bad_input_gives_one_line_errors(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"instruction": "扮演张飞", "input": "喝吗？", "chosen": "喝！", "rejected": "喝！"},
                                ensure_ascii=False) + "\n", encoding="utf-8")
    result = run("--model", "broken", "--model", f"gone={tmp_path / 'nope'}",
                 "--model", f"lora={tmp_path}::{tmp_path / 'no-adapter'}", "--pairs_file", pairs,
                 "--judge_base_url", "localhost:8000", "--judge_model", "j", "--judge_retries", "-1",
                 "--test_file", tmp_path / "missing.jsonl", "--batch_size", "0", "--out_dir", tmp_path / "out")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert all(line.startswith("error: ") for line in lines)
    for expected in ("'broken': expected NAME=PATH", "nope' has no config.json", "no-adapter' has no adapter_config",
                     "missing.jsonl: test file not found", "--batch_size: must be at least 1",
                     "pairs.jsonl:1: 'chosen' and 'rejected' are the same reply",
                     "--judge_base_url 'localhost:8000': expected an http(s) URL", "--judge_retries: must be 0 or more"):
        assert sum(expected in line for line in lines) == 1, expected
    assert not (tmp_path / "out").exists()


PAIRS = [{"instruction": "你现在要扮演张飞。", "input": "你喝酒吗？", "chosen": "喝！俺老张天天喝！",
          "rejected": "作为一个人工智能助手，我不喝酒。", "role": "张飞"},
         {"messages": [{"role": "system", "content": "你现在要扮演李白。"}, {"role": "user", "content": "月亮"},
                       {"role": "assistant", "content": "举杯邀明月。"}, {"role": "user", "content": "再来一句"}],
          "chosen": "对影成三人。", "rejected": "好的，以下是一句诗。", "role": "李白"},
         {"instruction": "你现在要扮演孙悟空。", "input": "你是谁？", "chosen": "俺老孙是齐天大圣！",
          "rejected": "我是一个AI语言模型。", "role": "孙悟空"}]


def test_preference_summary_by_hand():
    import torch

    summary = evaluate.preference_summary(torch.tensor([[-1.0, -2.0], [-3.0, -1.0], [-2.0, -2.0]]), too_long=1)
    # margins 1, -2, 0: one pair of three prefers the chosen reply (a tie does not count)
    assert summary == {"pairs": 3, "too_long": 1, "pref_accuracy": pytest.approx(1 / 3),
                       "pref_margin": pytest.approx(-1 / 3), "logp_chosen": pytest.approx(-2.0),
                       "logp_rejected": pytest.approx(-5 / 3)}


def test_two_models_report_and_resume(tiny_model, tiny_adapter, tmp_path, capsys):
    out = tmp_path / "eval"
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in PAIRS), encoding="utf-8")
    command = ["--data_dir", SAMPLE, "--limit", "2", "--max_new_tokens", "8", "--batch_size", "3", "--no_baseline",
               "--model", f"base={tiny_model}", "--model", f"finetuned={tiny_model}::{tiny_adapter}",
               "--pairs_file", pairs, "--out_dir", out]
    stdout = run_here(capsys, *command)
    assert "base: 0 of 4 questions already done, generating 4, scoring the pairs" in stdout

    report = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert list(report["models"]) == ["base", "finetuned"]
    base = report["models"]["base"]
    assert base["general"]["questions"] == base["role_specific"]["questions"] == 2
    assert base["overall"]["ppl"] > 1 and base["general"]["ref_tokens"] > 0
    assert set(base["roles"]) == {"孙悟空", "张飞"}
    markdown = (out / "results.md").read_text(encoding="utf-8")
    for figure in ("0.5049", "0.5255", "0.3406", "0.3938", "0.5060", "0.3099", "0.5368", "0.5748", "0.2478"):
        assert figure in markdown
    assert "RAW is not measured" in markdown
    rows = table_rows(markdown)
    assert list(rows) == ["base", "finetuned"]
    assert all(len(cells) == 13 for cells in rows.values())
    assert float(rows["base"][-1]) == pytest.approx(base["overall"]["ppl"], abs=0.01)
    # a model's answers get the consistency scores too (each metric is pinned in test_consistency.py)
    assert set(base["overall"]["consistency"]) == {"disclosure", "speaker_bleed", "scene_speaker_bleed", "distinct_1",
                                                   "distinct_2", "repeat_4gram", "length_ratio"}
    assert base["overall"]["consistency"]["scene_speaker_bleed"] is None  # no scene among RoleBench's questions
    assert 0 <= base["overall"]["consistency"]["disclosure"] <= 1
    assert "| base / all | 4 |" in markdown and "| finetuned / all | 4 |" in markdown
    assert_png(out / "results.png")

    # preference accuracy and margin: pinned to each reply's log-probability as reference_nll (the model's own
    # loss, not utils.preference's kernel) computes it, after the pair's prompt
    from utils.models import load_for_inference
    from utils.pairs import pair_of

    for name, adapter in (("base", None), ("finetuned", tiny_adapter)):
        model, tokenizer = load_for_inference(str(tiny_model), adapter and str(adapter), device="cpu")
        margins = []
        for row in PAIRS:
            messages, chosen, rejected = pair_of(row)
            nll = [evaluate.reference_nll(model, tokenizer, messages, [reply], 1)[0] for reply in (chosen, rejected)]
            margins.append(nll[1] - nll[0])
        preference = report["models"][name]["preference"]
        assert preference["pairs"] == 3 and preference["too_long"] == 0
        assert preference["pref_margin"] == pytest.approx(sum(margins) / 3, abs=1e-3)
        assert preference["pref_accuracy"] == pytest.approx(sum(m > 0 for m in margins) / 3)
        assert f"{name}: pref_accuracy {preference['pref_accuracy']:.4f}, pref_margin" in stdout
    assert report["models"]["base"]["preference"] != report["models"]["finetuned"]["preference"]
    assert table_rows(markdown, "## Preference pairs")["base"][:2] == [
        "3", f"{report['models']['base']['preference']['pref_accuracy']:.4f}"]

    samples = out / "samples.jsonl"
    lines = samples.read_text(encoding="utf-8").splitlines(keepends=True)
    assert len(lines) == 10  # 4 answers and the pairs' line, per model
    assert {(r["model"], r["split"], r["role"]) for r in map(json.loads, lines)} == {
        (m, s, r) for m in ("base", "finetuned") for s in ("general", "role_specific") for r in ("孙悟空", "张飞")} | {
        ("base", "pairs", ""), ("finetuned", "pairs", "")}

    # the same command again: everything is done, nothing is generated
    stdout = run_here(capsys, *command)
    assert "base: 4 of 4 questions already done, generating 0\n" in stdout
    assert "finetuned: 4 of 4 questions already done, generating 0\n" in stdout
    assert "finetuned: pref_accuracy" in stdout  # from the saved line
    assert samples.read_text(encoding="utf-8").splitlines(keepends=True) == lines

    # a crash while writing the last line: it is lost and cut short; exactly that one is redone
    samples.write_text("".join(lines[:-1]) + lines[-1][:25], encoding="utf-8")
    stdout = run_here(capsys, *command)
    assert "base: 4 of 4 questions already done, generating 0" in stdout
    assert "finetuned: 3 of 4 questions already done, generating 1" in stdout
    again = samples.read_text(encoding="utf-8").splitlines(keepends=True)
    assert len(again) == 10 and again[:-1] == lines[:-1]
    redone, lost = json.loads(again[-1]), json.loads(lines[-1])
    assert [redone[k] for k in ("model", "split", "role", "question", "answer")] == [
        lost[k] for k in ("model", "split", "role", "question", "answer")]  # greedy: the same answer


def test_judge_answers_parse_strictly():
    from utils.judge import judge_messages, parse_scores
    from utils.report import judge_summary

    good = '{"character_consistency": 4, "knowledge": 3, "personality": 5, "conversational_ability": 1}'
    assert parse_scores(f"\n {good} \n") == {"character_consistency": 4, "knowledge": 3, "personality": 5,
                                              "conversational_ability": 1}
    bad = {good.replace(": 4", ": 6"): "character_consistency must be an integer from 1 to 5, got 6",
           good.replace(": 1}", ": 0}"): "conversational_ability must be an integer from 1 to 5, got 0",
           good.replace(": 3", ": 3.0"): "knowledge must be an integer from 1 to 5, got 3.0",
           good.replace(": 5", ": true"): "personality must be an integer from 1 to 5, got True",
           good.replace(": 5", ': "5"'): "personality must be an integer from 1 to 5, got '5'",
           f"评分如下：{good}": "not one JSON object", f"{good} 以上。": "not one JSON object",
           f"```json\n{good}\n```": "not one JSON object", "[4, 3, 5, 1]": "not a JSON object but list",
           good.replace('"knowledge": 3, ', ""): "missing knowledge",
           good.replace("}", ', "overall": 4}'): "unknown overall",
           good.replace("}", ', "knowledge": 2}'): "knowledge given twice", "": "not one JSON object"}
    for text, problem in bad.items():
        with pytest.raises(ValueError, match=re.escape(problem)):
            parse_scores(text)

    messages = judge_messages("张飞", "你现在要扮演张飞。", [{"role": "user", "content": "喝酒吗？"}], "喝！", "你")
    assert messages[0]["role"] == "system" and all(d in messages[0]["content"] for d in (
        "character_consistency", "knowledge", "personality", "conversational_ability"))
    assert messages[1]["content"].endswith("你现在要扮演张飞。\n\n对话：\n你: 喝酒吗？\n\n张飞的回复：\n喝！")
    summary = judge_summary([{"scores": parse_scores(good), "calls": 2, "unparsed": 1},
                             {"scores": {**parse_scores(good), "knowledge": 4}, "calls": 1, "unparsed": 0},
                             {"scores": None, "calls": 3, "unparsed": 3}])
    assert summary == {"answers": 3, "judged": 2, "judge_unparsed": 4, "judge_calls": 6, "character_consistency": 4,
                       "knowledge": 3.5, "personality": 5, "conversational_ability": 1}


@pytest.fixture(scope="module")
def judge_server(loaded, roles):
    """Our own API serving the tiny model, with a key, as the judge; every generate() call recorded."""
    from utils.api import api_app
    from utils.engine import ChatEngine

    model = RecordingModel(loaded[0])
    with serve(api_app(ChatEngine(model, loaded[1], roles), "judge-key-0123456789")) as url:
        yield url + "/v1", model, loaded[1]


def test_the_judge_tries_a_busy_endpoint_again_within_its_bound():
    """A 503 or 429 is tried again, within 1 + retries calls; an answer without a choice counts as unparsed;
    past the bound, one line. A scripted endpoint over real HTTP, through the openai client."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    from utils.judge import Judge

    answers = []
    app = FastAPI()

    @app.post("/v1/chat/completions")
    def completions():
        status, content = answers.pop(0)
        choices = [] if content is None else [{"index": 0, "finish_reason": "stop",
                                                "message": {"role": "assistant", "content": content}}]
        return JSONResponse({"id": "x", "object": "chat.completion", "created": 0, "model": "judge",
                             "choices": choices} if status == 200 else {"error": {"message": "busy"}}, status)

    good = '{"character_consistency": 4, "knowledge": 3, "personality": 5, "conversational_ability": 2}'
    with serve(app) as url:
        judge = Judge(url + "/v1", "judge", None, retries=2)
        answers[:] = [(503, ""), (200, None), (200, good)]
        assert judge.score([{"role": "user", "content": "?"}]) == {
            "scores": {"character_consistency": 4, "knowledge": 3, "personality": 5, "conversational_ability": 2},
            "calls": 3, "unparsed": 1}
        answers[:] = [(429, ""), (503, ""), (503, "")]
        with pytest.raises(evaluate.UserError, match=r"^--judge_base_url .*: the judge failed: .*busy"):
            judge.score([{"role": "user", "content": "?"}])
        assert answers == []


def test_llm_judge_mechanics_against_our_api(judge_server, tiny_model, tmp_path, capsys, monkeypatch):
    """The tiny model is no judge: its answers do not parse. An answer gets 1 + --judge_retries (default 2)
    calls, every unparsed one counted, and no scores; a verdict once saved is not asked for again."""
    url, model, tokenizer = judge_server
    out, test_file = tmp_path / "eval", tmp_path / "test.jsonl"
    test_file.write_text(json.dumps({"instruction": "你现在要扮演张飞。", "input": "你喝酒吗？", "output": "喝！",
                                     "role": "张飞"}, ensure_ascii=False) + "\n", encoding="utf-8")
    command = ["--test_file", test_file, "--max_new_tokens", "4", "--no_baseline", "--model", f"base={tiny_model}",
               "--judge_model", "judge", "--judge_max_tokens", "12", "--out_dir", out]
    with pytest.raises(evaluate.UserError, match=r"^--judge_base_url .*: the judge failed: .*401"):
        evaluate.main([str(a) for a in [*command, "--judge_base_url", url]])  # no JUDGE_API_KEY: refused, early
    with pytest.raises(evaluate.UserError, match=r"^--judge_base_url http://127.0.0.1:9/v1: the judge failed: "
                                                 r"Connection error\.$"):
        evaluate.main([str(a) for a in [*command, "--judge_base_url", "http://127.0.0.1:9/v1"]])
    assert not (out / "samples.jsonl").exists() and not model.calls  # both before any model loaded

    monkeypatch.setenv("JUDGE_API_KEY", "judge-key-0123456789")
    stdout = run_here(capsys, *command, "--judge_base_url", url)
    assert "base: judging 1 answers with judge" in stdout
    assert len(model.calls) == 3 and all(call["do_sample"] is False and call["max_new_tokens"] == 12
                                         for call in model.calls)  # temperature 0
    # a retry carries the unparsable answer and the note on it, at the end of its prompt
    assert "不要有别的文字。" in tokenizer.decode(model.calls[1]["inputs"][0, -40:].tolist())
    assert "不要有别的文字。" in tokenizer.decode(model.calls[2]["inputs"][0, -40:].tolist())
    assert "不要有别的文字。" not in tokenizer.decode(model.calls[0]["inputs"][0, -40:].tolist())
    report = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert report["models"]["base"]["overall"]["judge"] == {
        "answers": 1, "judged": 0, "judge_unparsed": 3, "judge_calls": 3, "character_consistency": None,
        "knowledge": None, "personality": None, "conversational_ability": None}
    assert report["meta"]["judge"]["model"] == "judge"
    assert table_rows((out / "results.md").read_text(encoding="utf-8"), "## LLM judge")["base"][:4] == [
        "1", "0", "3", "3"]

    # the verdict is on the answer's line: the same judge asks nothing again
    from utils.judge import Judge

    args = evaluate.parse_args([str(a) for a in [*command, "--judge_base_url", url]])
    questions, _ = evaluate.load_questions(args)
    store = ResultStore(str(out / "samples.jsonl"))
    capsys.readouterr()
    evaluate.judge_answers(evaluate.ModelSpec("base", str(tiny_model)), questions, None, store,
                           Judge(url, "judge", "judge-key-0123456789", 2))
    store.close()
    assert "base: judging 0 answers with judge" in capsys.readouterr().out and len(model.calls) == 3


def test_a_character_card_as_roles_file_gives_the_system_prompt(tmp_path):
    card = card_png(tmp_path / "zhangfei.png", {"spec": "chara_card_v2", "spec_version": "2.0", "data": {
        "name": "张飞", "description": "{{char}}是燕人，嗓门大。", "personality": "急脾气"}})
    from utils.prompts import load_prompts

    args = evaluate.parse_args(["--model", "m=some/model", "--roles_file", str(card), "--roles", "张飞"])
    assert evaluate.validate_args(args)[1] == []
    prompts = load_prompts("some/model", None, str(card))  # --roles_file wins over any record
    questions = evaluate.questions_from_data_dir(str(SAMPLE), ["张飞"])
    systems = {evaluate.question_prompt(evaluate.ModelSpec("m", "some/model"), prompts, q)[0]["content"]
               for q in questions}
    assert questions and systems == {prompts.roles["张飞"].system}
    assert "张飞是燕人，嗓门大。\n性格：急脾气" in prompts.roles["张飞"].system


def test_baseline_row_from_rolegpt_shaped_file(tmp_path, capsys):
    # RoleGPT shape: role, question (role-specific ones still addressed "<role>，..."), generated: [answer].
    # The answers copy the first reference, so every first-reference score of the row must be 1.
    questions = evaluate.limit_questions(
        evaluate.questions_from_data_dir(str(SAMPLE), ["孙悟空", "张飞", "李白"]), 2)
    baseline = tmp_path / "rolegpt_baseline.jsonl"
    with open(baseline, "w", encoding="utf-8") as f:
        for q in questions:
            asked = q["question"] if q["split"] == "general" else f"{q['role']}，{q['question']}"
            f.write(json.dumps({"role": q["role"], "question": asked, "generated": [q["references"][0]]},
                               ensure_ascii=False) + "\n")
        f.write(json.dumps({"role": "李白", "question": "不在测试集里的问题", "generated": ["无"]}, ensure_ascii=False) + "\n")
    out = tmp_path / "eval"
    run_here(capsys, "--data_dir", SAMPLE, "--limit", "2", "--baseline_only", "--baseline_file", baseline,
             "--out_dir", out)
    rows = table_rows((out / "results.md").read_text(encoding="utf-8"))
    assert list(rows) == ["RoleGPT"]
    columns = [c[2] for c in table_columns(["general", "role_specific"])]
    for column, cell in zip(columns, rows["RoleGPT"]):
        assert cell == ("–" if column == "ppl" else "1.0000"), column
    report = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert report["models"]["RoleGPT"]["overall"]["questions"] == 4
    assert "found for 4 of 4 questions" in report["meta"]["notes"]["RoleGPT"]
    assert not (out / "samples.jsonl").exists()
    assert_png(out / "results.png")


def test_training_curves_from_tensorboard_events(tmp_path, capsys):
    from torch.utils.tensorboard import SummaryWriter

    run_dir = tmp_path / "run"
    writer = SummaryWriter(str(run_dir / "tb"))
    for step in range(1, 21):
        writer.add_scalar("train_loss", 6.0 / step ** 0.5, step)
        writer.add_scalar("lr", 2e-4, step)
        if step % 5 == 0:
            writer.add_scalar("ppl", 400.0 / step, step)
            writer.add_scalar("eval_loss", math.log(400.0 / step), step)
    writer.close()
    series = read_curves([str(run_dir)])
    assert list(series) == ["run/tb"]
    assert [s for s, _ in series["run/tb"]["ppl"]] == [5, 10, 15, 20]
    assert series["run/tb"]["train_loss"][0] == (1, pytest.approx(6.0))

    out = tmp_path / "curves"
    run_here(capsys, "--plot_run", run_dir, "--out_dir", out)
    assert_png(out / "training_curves.png")
    assert not (out / "results.json").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--plot_run", str(empty), "--out_dir", str(out)])
    assert exit_info.value.code == 2 and "no TensorBoard event files" in capsys.readouterr().err

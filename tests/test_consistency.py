"""The character-consistency metrics of evaluate.py (utils/consistency.py), each against a case counted
by hand, and a --baseline_only run whose report carries them. CPU only, a few seconds."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
sys.path.insert(0, str(ROOT))
import evaluate  # noqa: E402
from utils.consistency import (DISCLOSURE_PHRASES, consistency_scores, discloses, distinct, length_ratio,  # noqa: E402
                               repeated_ngram_rate)
from utils.report import METRICS, summarize  # noqa: E402

ROLES = ["孙悟空", "张飞", "李白"]


def test_self_disclosure_phrases():
    assert discloses("作为一个人工智能，我没有喜好。", DISCLOSURE_PHRASES)
    assert discloses("Sorry, as an ai I cannot drink wine.", DISCLOSURE_PHRASES)  # Latin script: any case
    assert not discloses("人工智能在医疗中的应用很广。", DISCLOSURE_PHRASES)  # the topic, not a disclosure
    assert not discloses("俺是机器做的金箍棒！", DISCLOSURE_PHRASES)
    assert discloses("俺是机器做的金箍棒！", (*DISCLOSURE_PHRASES, "俺是机器"))


def test_distinct_counts_characters():
    # 哈哈哈哈: 1 distinct of 4 characters, 1 distinct of 3 bigrams
    assert distinct("哈哈哈哈", 1) == pytest.approx(1 / 4)
    assert distinct("哈哈哈哈", 2) == pytest.approx(1 / 3)
    # 你好 你好 -> 你好你好 (whitespace dropped): 2 of 4 characters; bigrams 你好, 好你, 你好: 2 of 3
    assert distinct("你好 你好", 1) == pytest.approx(2 / 4)
    assert distinct("你好 你好", 2) == pytest.approx(2 / 3)
    assert distinct("", 1) is None and distinct("好", 2) is None


def test_repeated_4gram_rate():
    # 春眠不觉春眠不觉: 4-grams 春眠不觉, 眠不觉春, 不觉春眠, 觉春眠不, 春眠不觉 -> the last repeats the first: 1 of 5
    assert repeated_ngram_rate("春眠不觉春眠不觉", 4) == pytest.approx(1 / 5)
    assert repeated_ngram_rate("春眠不觉晓", 4) == 0.0
    assert repeated_ngram_rate("春眠不", 4) is None  # shorter than one 4-gram


def test_length_ratio_in_characters():
    assert length_ratio("一二三", "一二三四五六") == pytest.approx(0.5)
    assert length_ratio("一 二\n三！", "一二") == pytest.approx(2.0)  # whitespace dropped, punctuation kept
    assert length_ratio("一二", " ") is None


def test_scores_of_one_answer_and_their_means():
    bleed = consistency_scores("俺来也！\n张飞：哥哥等我", "俺老孙来也", ["张飞", "你"], DISCLOSURE_PHRASES)
    assert bleed["speaker_bleed"] == 1.0 and bleed["disclosure"] == 0.0
    assert bleed["length_ratio"] == pytest.approx(11 / 5)
    clean = consistency_scores("俺说：张飞来了", "好", ["张飞"], DISCLOSURE_PHRASES)  # a name mid-line is no bleed
    assert clean["speaker_bleed"] == 0.0
    # means over answers; an answer with no 4-gram (None) is left out of that mean only
    short = consistency_scores("好", "好", [], DISCLOSURE_PHRASES)
    summary = summarize([{"scores": dict.fromkeys(METRICS, 0.0), "consistency": c}
                         for c in (bleed, clean, short)])["consistency"]
    assert summary["speaker_bleed"] == pytest.approx(1 / 3)
    assert summary["length_ratio"] == pytest.approx((11 / 5 + 7 / 1 + 1) / 3)
    assert summary["repeat_4gram"] == pytest.approx(0.0)  # bleed and clean have none repeated; short has no 4-gram


def test_baseline_only_report_carries_consistency(tmp_path, capsys):
    # Four RoleGPT-shaped answers: one self-discloses by the list, one by --disclosure_phrase, one speaks for
    # another role, one is the first reference itself.
    questions = evaluate.limit_questions(evaluate.questions_from_data_dir(str(SAMPLE), ROLES), 2)
    assert len(questions) == 4
    other = next(r for r in ROLES if r != questions[1]["role"])
    answers = ["作为一个人工智能，我没有喜好。", f"好！\n{other}：我也去", "俺是机器，" + questions[2]["references"][0],
               questions[3]["references"][0]]
    baseline = tmp_path / "rolegpt_baseline.jsonl"
    with open(baseline, "w", encoding="utf-8") as f:
        for q, answer in zip(questions, answers):
            asked = q["question"] if q["split"] == "general" else f"{q['role']}，{q['question']}"
            f.write(json.dumps({"role": q["role"], "question": asked, "generated": [answer]}, ensure_ascii=False) + "\n")
    out = tmp_path / "eval"
    capsys.readouterr()
    evaluate.main(["--data_dir", str(SAMPLE), "--limit", "2", "--baseline_only", "--baseline_file", str(baseline),
                   "--disclosure_phrase", "俺是机器", "--out_dir", str(out)])
    report = json.loads((out / "results.json").read_text(encoding="utf-8"))
    overall = report["models"]["RoleGPT"]["overall"]["consistency"]
    assert overall["disclosure"] == pytest.approx(2 / 4)
    assert overall["speaker_bleed"] == pytest.approx(1 / 4)
    assert set(overall) == {"disclosure", "speaker_bleed", "scene_speaker_bleed", "distinct_1", "distinct_2",
                            "repeat_4gram", "length_ratio"}
    assert overall["scene_speaker_bleed"] is None  # RoleBench has no group scenes
    assert report["models"]["RoleGPT"]["general"]["consistency"]["disclosure"] == pytest.approx(1 / 2)
    markdown = (out / "results.md").read_text(encoding="utf-8")
    assert "## Character consistency" in markdown
    assert "| RoleGPT / all | 4 | 0.5000 | 0.2500 |" in markdown


def test_empty_disclosure_phrase_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        evaluate.main(["--baseline_only", "--data_dir", str(SAMPLE), "--disclosure_phrase", " ",
                       "--out_dir", str(tmp_path / "eval")])
    assert stop.value.code != 0
    assert "--disclosure_phrase: must not be empty" in capsys.readouterr().err
    assert not (tmp_path / "eval").exists()

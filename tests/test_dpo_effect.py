"""SFT followed by DPO stays in character better than SFT alone, on the tiny model, as evaluate.py
measures it: fewer greedy replies that self-disclose as an AI, and a higher preference accuracy and
margin on held-out pairs (data/sample/pairs/, written by scripts/sample_pairs.py).

Making the measurement mean something on a tiny model takes two choices, both stated here:
- A random-init tiny model learns nothing in a few LoRA steps, so its base first reads the
  train-split texts (baichuan.tiny's pretraining, as the quickstart does, but shorter), and its
  tokenizer knows the generic replies' words, as Baichuan2's knows them.
- Trained on the characters' replies alone, the tiny model never says "作为一个人工智能": it has
  never seen such text, so there is no self-disclosure for DPO to remove, and SFT followed by DPO
  against it would show nothing. Real Baichuan2-Chat was tuned as an assistant and does drop out of
  character after role-play SFT; the tiny model stands in for that by having a generic assistant's
  reply as a third of its SFT replies (each train pair's chosen reply, and every second pair's
  rejected one). SFT alone then discloses on most test questions, and the test checks that it does,
  so that a lower rate after DPO is a real drop.
The test questions and the held-out pairs' questions and generic replies are none that either stage
trained on. Greedy decoding, one thread and fixed seeds: the same machine gives the same numbers.
What it shows is the direction, not fluency: after DPO this tiny model's greedy answers are short
("俺！"), so the test also checks that none is empty and that the reference replies' perplexity did
not rise (the numbers and the controls that make it fail: docs/preference.md).
"""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, SAMPLE_DIR, TINY_VOCAB_SIZE, sample_texts

PAIRS = SAMPLE_DIR / "pairs"


def read_rows(path):
    return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]


def train_texts() -> list[str]:
    """The questions and replies of the train split of the sample data."""
    texts = []
    for kind in ("general", "role_specific"):
        for row in read_rows(SAMPLE_DIR / f"rolebench-zh_{kind}_train.jsonl"):
            texts += [row["question"], *row["generated"]]
    return texts


def test_the_pairs_are_the_generators_output_and_held_out(tmp_path):
    """data/sample/pairs/ is what scripts/sample_pairs.py writes; train and test pairs share no
    question and no rejected reply; every prompt is the SFT prompt of its role."""
    from utils.consistency import DISCLOSURE_PHRASES, discloses
    from utils.prompts import DEFAULT_ROLES_FILE, roles_from_file

    proc = subprocess.run([sys.executable, "scripts/sample_pairs.py", "--out_dir", tmp_path], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for name in ("train.jsonl", "test.jsonl"):
        assert (tmp_path / name).read_bytes() == (PAIRS / name).read_bytes(), f"run scripts/sample_pairs.py ({name})"
    train, test = read_rows(PAIRS / "train.jsonl"), read_rows(PAIRS / "test.jsonl")
    assert not {r["messages"][-1]["content"] for r in train} & {r["messages"][-1]["content"] for r in test}
    assert not {r["rejected"] for r in train} & {r["rejected"] for r in test}
    roles = roles_from_file(DEFAULT_ROLES_FILE)
    for row in train + test:
        assert row["messages"][0] == {"role": "system", "content": roles[row["role"]].system}
    for rows in (train, test):
        generic = {r["rejected"] for r in rows}
        assert 0.5 < sum(discloses(g, DISCLOSURE_PHRASES) for g in generic) / len(generic) < 1  # some only the tone


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A tiny Baichuan2 that has read the train split and the generic replies (100 short steps)."""
    import torch

    from baichuan import BaichuanForCausalLM, BaichuanTokenizer
    from baichuan.tiny import make_tiny, pretrain, train_sentencepiece

    folder = tmp_path_factory.mktemp("dpo_effect")
    generic = sorted({r["rejected"] for name in ("train.jsonl", "test.jsonl") for r in read_rows(PAIRS / name)})
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(sample_texts() + generic) + "\n", encoding="utf-8")
    out = folder / "tiny"
    make_tiny(str(out), train_sentencepiece(str(corpus), TINY_VOCAB_SIZE))
    train_generic = sorted({r["rejected"] for r in read_rows(PAIRS / "train.jsonl")})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as train.py runs here, and seeded: the same base on every run
    try:
        model = BaichuanForCausalLM.from_pretrained(str(out))
        pretrain(model, BaichuanTokenizer.from_pretrained(str(out)), train_texts() + train_generic, steps=100,
                 block_size=64, batch_size=8)
        model.save_pretrained(str(out))
    finally:
        torch.set_num_threads(threads)
    return out


def run_train(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "train.py", *map(str, args)], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def last_checkpoint(run_dir):
    return max(run_dir.glob("epoch-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))


def test_dpo_after_sft_lowers_self_disclosure_and_raises_held_out_preference(tiny_lm, tmp_path, capsys):
    import evaluate

    sft_rows = []
    for i, pair in enumerate(read_rows(PAIRS / "train.jsonl")):
        replies = [pair["chosen"], pair["rejected"]] if i % 2 == 0 else [pair["chosen"]]
        sft_rows += [{"role": pair["role"], "messages": [*pair["messages"], {"role": "assistant", "content": reply}]}
                     for reply in replies]
    sft_file = tmp_path / "sft.jsonl"
    sft_file.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in sft_rows), "utf-8")
    common = ["--model_name_or_path", tiny_lm, "--quantization_bit", "16", "--max_len", "384",
              "--per_device_train_batch_size", "8", "--lora_dropout", "0", "--show_loss_step", "8"]
    # one epoch of each (24 and 15 steps); --pref_packing puts a role's system prompt, most of a pair's
    # tokens, once in a row, so DPO costs little more than starting train.py
    run_train(*common, "--train_path", sft_file, "--output_dir", tmp_path / "sft", "--learning_rate", "5e-3")
    sft = last_checkpoint(tmp_path / "sft")
    run_train(*common, "--stage", "dpo", "--adapter", sft, "--train_path", PAIRS / "train.jsonl",
              "--output_dir", tmp_path / "dpo", "--learning_rate", "2e-3", "--pref_beta", "0.1", "--pref_packing")
    dpo = last_checkpoint(tmp_path / "dpo")

    out = tmp_path / "eval"
    evaluate.main([str(arg) for arg in ("--model", f"sft={tiny_lm}::{sft}", "--model", f"dpo={tiny_lm}::{dpo}",
                                        "--data_dir", SAMPLE_DIR, "--limit", 6, "--max_new_tokens", 16, "--no_baseline",
                                        "--device", "cpu", "--pairs_file", PAIRS / "test.jsonl", "--out_dir", out)])
    capsys.readouterr()
    models = json.loads((out / "results.json").read_text("utf-8"))["models"]
    numbers = {name: {"disclosure": models[name]["overall"]["consistency"]["disclosure"],
                      "pref_accuracy": models[name]["preference"]["pref_accuracy"],
                      "pref_margin": models[name]["preference"]["pref_margin"],
                      "ppl": models[name]["overall"]["ppl"], "questions": models[name]["overall"]["questions"]}
               for name in ("sft", "dpo")}
    with capsys.disabled():  # the numbers docs/preference.md records
        print(f"\non {numbers['sft']['questions']} test questions and {models['sft']['preference']['pairs']} "
              "held-out pairs:")
        for name, label in (("sft", "SFT alone"), ("dpo", "SFT + DPO")):
            print(f"  {label}: " + ", ".join(f"{key} {value:.3f}" for key, value in numbers[name].items()
                                            if key != "questions"))
    before, after = numbers["sft"], numbers["dpo"]
    assert before["questions"] == after["questions"] == 12
    assert all(models[name]["preference"]["pairs"] == 34 and models[name]["preference"]["too_long"] == 0
               for name in ("sft", "dpo"))
    assert before["disclosure"] >= 0.5  # SFT alone does drop out of character: there is something to remove
    assert after["disclosure"] < before["disclosure"] / 2
    answers = [row for row in read_rows(out / "samples.jsonl") if "answer" in row]
    assert len(answers) == 24 and all(row["answer"].strip() for row in answers)  # not quiet by saying nothing
    assert after["pref_accuracy"] > before["pref_accuracy"] and after["pref_margin"] > before["pref_margin"]
    # not bought by wrecking the model: the reference replies stay about as likely
    assert after["ppl"] < 1.2 * before["ppl"]

"""scripts/quickstart.sh as a user runs it (only the pip install skipped): its last line is 孙悟空
answering in his own voice, checked the way a person would check it."""

import json
import os
import re
import subprocess

from conftest import REPO_ROOT, SAMPLE_DIR, sample_texts

CJK = re.compile(r"[\u4e00-\u9fff]")


def own_phrases(role: str) -> set[str]:
    """Three-character runs of Chinese in the role's replies in data/sample that no other role's
    replies have: "俺老孙" is 孙悟空's, "丈八蛇" 张飞's."""
    runs: dict[str, set[str]] = {}
    for path in SAMPLE_DIR.glob("*.jsonl"):
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            for reply in row["generated"]:
                for chunk in re.findall(r"[\u4e00-\u9fff]{3,}", reply):
                    runs.setdefault(row["role"], set()).update(chunk[i : i + 3] for i in range(len(chunk) - 2))
    others = set().union(*(phrases for name, phrases in runs.items() if name != role))
    return runs[role] - others


def test_quickstart_ends_with_an_in_character_reply(tmp_path):
    env = dict(os.environ, QUICKSTART_SKIP_INSTALL="1", QUICKSTART_OUT=str(tmp_path / "quickstart"))
    proc = subprocess.run(["bash", "scripts/quickstart.sh"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    *_, summary, reply = proc.stdout.strip().splitlines()
    assert re.match(r"trained: a tiny Baichuan2 .* \d+ full-parameter steps .* QLoRA for \d+ epochs on the 121 "
                    r"samples .* \d+ s in all\. 孙悟空, asked", summary), summary
    assert len(set(CJK.findall(reply))) >= 10, reply  # Chinese text, not one character over and over
    phrases = own_phrases("孙悟空")
    assert "俺老孙" in phrases and "丈八蛇" not in phrases
    assert [p for p in phrases if p in reply], reply  # in his voice, as the sample data has it


def test_tiny_pretraining_is_seeded_and_learns_the_corpus(tiny_model_dir):
    import torch

    from baichuan import BaichuanForCausalLM, BaichuanTokenizer
    from baichuan.tiny import pretrain

    tokenizer = BaichuanTokenizer.from_pretrained(tiny_model_dir)

    def run(seed):
        model = BaichuanForCausalLM.from_pretrained(tiny_model_dir)
        losses = pretrain(model, tokenizer, sample_texts(), steps=30, block_size=32, batch_size=4, seed=seed)
        return losses, torch.cat([p.detach().flatten() for p in model.parameters()])

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the quickstart runs it; two threads on a busy machine are 10-40x slower here
    try:
        losses, weights = run(0)
        again_losses, again = run(0)
        other = run(1)[1]
    finally:
        torch.set_num_threads(threads)
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < losses[0] - 1, losses
    assert again_losses == losses and torch.equal(again, weights)
    assert not torch.equal(other, weights)

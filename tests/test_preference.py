"""Preference tuning's pieces (utils/pairs.py, utils/preference.py) on the tiny model.

Pinned to TRL (the version in requirements.txt): its DPOTrainer's loss, gradients and metrics for
the loss types it has (sigmoid, ipo), on the same model, adapter and token ids. ORPO and SimPO are
not in TRL's DPOTrainer (only in trl.experimental: ORPOTrainer, CPOTrainer with loss_type="simpo"),
so they are pinned to their papers' formulas with a case computed by hand, and cross-checked with
those experimental loss functions. Packed pairs give the loss and gradients of unpacked ones; the
reference is the base with the adapter off, and its cache is used only when it fits.
"""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from conftest import REPO_ROOT, SAMPLE_DIR

BETA = 0.1
# Replies of a generic assistant that steps out of character: written for this project
GENERIC = ["作为一个人工智能助手，我没有个人的喜好。", "我是一个语言模型，无法回答这个问题。", "抱歉，我只是一个AI，可以帮你查一些资料。"]


def sample_rows(roles) -> list[dict]:
    """Pairs of every row shape: chosen from the sample data, rejected a generic assistant's reply."""
    rows = []
    with open(SAMPLE_DIR / "rolebench-zh_general_train.jsonl", encoding="utf-8") as f:
        samples = [json.loads(line) for line in f if line.strip()][:6]
    for i, sample in enumerate(samples):
        role, question, reply = sample["role"], sample["question"], sample["generated"][0]
        system, rejected = roles[role].system, GENERIC[i % len(GENERIC)]
        shape = i % 4
        if shape == 0:
            row = {"instruction": system, "input": question}
        elif shape == 1:
            row = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": "你是谁？"},
                                {"role": "assistant", "content": f"我是{role}。"}, {"role": "user", "content": question}]}
        elif shape == 2:
            row = {"conversations": [{"from": "human", "value": question}], "system": system}
        else:  # TRL's implicit prompt: whole conversations in chosen and rejected
            prompt = [{"role": "system", "content": system}, {"role": "user", "content": question}]
            rows.append({"role": role, "chosen": prompt + [{"role": "assistant", "content": reply}],
                         "rejected": prompt + [{"role": "assistant", "content": rejected}]})
            continue
        rows.append({**row, "role": role, "chosen": reply, "rejected": rejected})
    return rows


@pytest.fixture(scope="module")
def tokenizer_and_config(tiny_model_dir):
    from transformers import GenerationConfig

    from utils.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir)), GenerationConfig.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="module")
def pairs(roles, tokenizer_and_config):
    from utils.pairs import PairDataset

    tokenizer, generation_config = tokenizer_and_config
    return PairDataset(sample_rows(roles), tokenizer, generation_config, max_len=1024)


def load_policy(model_dir):
    """The tiny base in fp32 with a LoRA adapter whose B matrices are seeded noise (PEFT starts them
    at zero, where policy and reference would agree and every log-ratio be 0).

    The head's rows are scaled to unit norm first: Baichuan2's NormHead normalises them in every
    forward, but TRL's fused head multiplies by lm_head.weight as a plain linear layer (and reads
    lm_head.bias, which NormHead lacks). With unit rows the two compute the same function, so the
    comparison is of the losses, not of that difference."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with torch.no_grad():
        base.lm_head.weight.div_(base.lm_head.weight.norm(dim=-1, keepdim=True))
    base.lm_head.bias = None
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model.train()


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    return load_policy(tiny_model_dir)


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def our_step(model, batch, kind, reference_table, gamma=0.5):
    """Our loss and metrics (means over the pairs) for one batch that is a whole step, and the grads."""
    from utils.preference import batch_loss, sequence_logps

    n = len(batch["pair_index"])
    model.zero_grad()
    logps, counts = sequence_logps(model, batch, 2 * n)
    reference = reference_table[batch["pair_index"]].T.reshape(-1)  # chosen ones, then rejected ones
    loss, sums = batch_loss(kind, BETA, logps, counts, reference, n, int(counts[:n].sum()), gamma)
    loss.backward()
    return loss.item(), {name: value.item() / n for name, value in sums.items()}, lora_grads(model)


# ---------------------------------------------------------------- data


def test_row_shapes_give_the_same_pair(roles):
    from utils.pairs import pair_of

    system = roles["李白"].system
    expected = ([{"role": "system", "content": system}, {"role": "user", "content": "喝酒吗？"}], "对影成三人。", "我不能喝酒。")
    prompt = [{"role": "system", "content": system}, {"role": "user", "content": "喝酒吗？"}]
    shapes = [
        {"instruction": system, "input": "喝酒吗？", "chosen": "对影成三人。", "rejected": "我不能喝酒。"},
        {"messages": prompt, "chosen": "对影成三人。", "rejected": "我不能喝酒。"},
        {"conversations": [{"from": "human", "value": "喝酒吗？"}], "system": system, "chosen": "对影成三人。",
         "rejected": "我不能喝酒。"},
        {"chosen": prompt + [{"role": "assistant", "content": "对影成三人。"}],
         "rejected": prompt + [{"role": "assistant", "content": "我不能喝酒。"}]},
        {"messages": prompt[:1], "chosen": prompt[1:] + [{"role": "assistant", "content": "对影成三人。"}],
         "rejected": prompt[1:] + [{"role": "assistant", "content": "我不能喝酒。"}]},
    ]
    for row in shapes:
        assert pair_of(row) == expected, row


BAD_ROWS = [
    ({"instruction": "s", "input": "q", "chosen": "  ", "rejected": "b"}, "field 'chosen': the reply is empty"),
    ({"instruction": "s", "input": "q", "chosen": "a"}, "field 'rejected' must be the reply"),
    ({"instruction": "s", "input": "q", "chosen": "同一句", "rejected": "同一句 "}, "are the same reply"),
    ({"chosen": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}]},
     "do not share their history"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chosen": "b",
      "rejected": "c"}, "the prompt must end with the user's turn"),
    ({"instruction": "s", "input": "q", "output": "a"}, "a training sample, not a pair"),
    ({"messages": [{"role": "user", "content": ""}], "chosen": "b", "rejected": "c"}, "messages[0].content is empty"),
]


@pytest.mark.parametrize("row,message", BAD_ROWS, ids=[m.split()[0] + str(i) for i, (_, m) in enumerate(BAD_ROWS)])
def test_a_bad_pair_is_one_error_naming_file_and_line(tmp_path, row, message):
    from utils import UserError
    from utils.pairs import read_pairs

    path = tmp_path / "pairs.jsonl"
    good = {"instruction": "s", "input": "q", "chosen": "a", "rejected": "b"}
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(UserError) as caught:
        read_pairs(str(path))
    assert str(caught.value).startswith(f"{path}:3: ") and message in str(caught.value), str(caught.value)
    assert "\n" not in str(caught.value)


def test_pair_layout_is_the_chat_layout(pairs, roles, tokenizer_and_config):
    """The prompt is build_chat_input's and each sequence is encode_reply's, whatever the shape."""
    from baichuan.generation_utils import build_chat_input, encode_reply
    from utils.pairs import pair_of

    tokenizer, generation_config = tokenizer_and_config
    for row, pair in zip(sample_rows(roles), pairs.examples, strict=True):
        messages, chosen, rejected = pair_of(row)
        assert list(pair["prompt"]) == build_chat_input(tokenizer, messages, generation_config, 10**6, 0)
        for reply, key in ((chosen, "chosen"), (rejected, "rejected")):
            ids, labels = encode_reply(tokenizer, messages, reply, generation_config, 1024)
            assert list(pair["prompt"]) + list(pair[key]) == ids
            assert [-100] * len(pair["prompt"]) + list(pair[key]) == labels
            assert pair[key][-1] == tokenizer.eos_token_id


def test_a_pair_too_long_keeps_the_system_prompt_and_the_newest_round(tokenizer_and_config):
    from utils.pairs import encode_pair

    tokenizer, generation_config = tokenizer_and_config
    messages = [{"role": "system", "content": "你是李白。"}]
    for i in range(20):
        messages += [{"role": "user", "content": f"第{i}个问题，说说你的诗吧"}, {"role": "assistant", "content": "好的，听我道来。"}]
    messages += [{"role": "user", "content": "最后一问"}]
    pair = encode_pair(tokenizer, messages, "床前明月光，疑是地上霜。" * 3, "不知道。", generation_config, 96)
    assert len(pair["prompt"]) + len(pair["chosen"]) <= 96
    assert tokenizer.decode(pair["prompt"]).startswith("你是李白。")
    assert "最后一问" in tokenizer.decode(pair["prompt"]) and "第0个问题" not in tokenizer.decode(pair["prompt"])
    assert encode_pair(tokenizer, [{"role": "system", "content": "长" * 200}, {"role": "user", "content": "q"}],
                       "a", "b", generation_config, 32) is None

"""Preference tuning's pieces (utils/pairs.py, utils/preference.py) on the tiny model.

Pinned to TRL (the version in requirements.txt): its DPOTrainer's loss, gradients and metrics for
the loss types it has (sigmoid, ipo), on the same model, adapter and token ids. ORPO and SimPO are
not in TRL's DPOTrainer (only in trl.experimental: ORPOTrainer, CPOTrainer with loss_type="simpo"),
so they are pinned to their papers' formulas with a case computed by hand, and cross-checked with
those experimental loss functions. Packed pairs give the loss and gradients of unpacked ones; the
reference is the base with the adapter off, and its cache is used only when it fits.

train.py --stage dpo as a subprocess: a SIGTERM stop and its resume give the uninterrupted run's
losses; two processes with accumulation give one process's; an SFT adapter is the reference; bad
pairs and misplaced flags are one error line each.
"""

import json
import math
import os
import re
import signal
import subprocess
import sys
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


LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")


def load_base(model_dir):
    """The tiny base in fp32, its head's rows scaled to unit norm: Baichuan2's NormHead normalises
    them in every forward, but TRL's fused head multiplies by lm_head.weight as a plain linear layer
    (and reads lm_head.bias, which NormHead lacks). With unit rows the two compute the same
    function, so the comparison is of the losses, not of that difference."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with torch.no_grad():
        base.lm_head.weight.div_(base.lm_head.weight.norm(dim=-1, keepdim=True))
    base.lm_head.bias = None
    return base


def perturb_adapter(model):
    """Seeded noise in the LoRA B matrices: PEFT starts them at zero, where the policy equals the
    reference and every log-ratio is 0."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model.train()


def load_policy(model_dir):
    from peft import LoraConfig, get_peft_model

    return perturb_adapter(get_peft_model(load_base(model_dir), LoraConfig(**LORA)))


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
    from utils.cli import UserError
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


# ---------------------------------------------------------------- pinned to TRL


def trl_trainer(model_dir, tokenizer, kind, output_dir):
    """TRL's DPOTrainer putting a new LoRA adapter on the base (its reference: the adapter switched
    off, as ours), the adapter then perturbed. Its own dataset is a placeholder; the batches it
    scores are collated from our token ids."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    config = DPOConfig(output_dir=str(output_dir), beta=BETA, loss_type=[kind], bf16=False, use_cpu=True,
                       report_to=[], gradient_checkpointing=False, disable_dropout=True, max_length=None)
    placeholder = Dataset.from_list([{"prompt": "问", "chosen": "好", "rejected": "坏"}])
    trainer = DPOTrainer(model=load_base(model_dir), args=config, train_dataset=placeholder,
                         processing_class=tokenizer, peft_config=LoraConfig(**LORA))
    perturb_adapter(trainer.model)
    return trainer


@pytest.mark.parametrize("kind", ["sigmoid", "ipo"])
def test_loss_gradients_and_metrics_equal_trl_dpo_trainer(kind, pairs, tokenizer_and_config, tiny_model_dir, tmp_path):
    from utils.pairs import collate_pairs
    from utils.preference import reference_logps

    tokenizer = tokenizer_and_config[0]
    trainer = trl_trainer(tiny_model_dir, tokenizer, kind, tmp_path)
    model = trainer.model  # ours runs on the very same PEFT model
    items = [pairs[i] for i in range(len(pairs))]
    batch = collate_pairs(items, tokenizer.pad_token_id)
    reference = reference_logps(model, [batch], len(pairs), "cpu")
    loss, metrics, grads = our_step(model, batch, kind, reference)

    trl_batch = trainer.data_collator([{"prompt_ids": list(e["prompt"]), "chosen_ids": list(e["chosen"]),
                                        "rejected_ids": list(e["rejected"])} for e in items])
    model.zero_grad()
    trl_loss = trainer.compute_loss(trainer.model, trl_batch)
    trl_loss.backward()
    trl_metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}

    assert trl_loss.item() == pytest.approx(loss, abs=1e-5, rel=1e-5)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                 "logps/rejected"):
        assert trl_metrics[name] == pytest.approx(metrics[name], abs=1e-5, rel=1e-5), name
    assert 0 < metrics["rewards/accuracies"] < 1 and metrics["rewards/margins"] != 0  # a case that can tell
    trl_grads = lora_grads(model)
    for name, grad in grads.items():
        torch.testing.assert_close(trl_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    assert any(g.abs().max() > 1e-4 for g in grads.values())


# ---------------------------------------------------------------- ORPO and SimPO: the papers' formulas

# Two pairs as (summed log-probability, tokens): A chosen (-6, 3) rejected (-12, 4); B chosen (-1, 2)
# rejected (-10, 5). Mean per-token log-probabilities: A -2 and -3, B -0.5 and -2.
HAND_LOGPS = torch.tensor([-6.0, -1.0, -12.0, -10.0])  # chosen A, chosen B, rejected A, rejected B
HAND_COUNTS = torch.tensor([3.0, 2.0, 4.0, 5.0])
# ORPO (Hong et al. 2024, eq. 6-7), p = exp(mean log-probability), log odds(p) = log(p / (1 - p)):
#   A: log odds(e^-2) = log(0.135335 / 0.864665) = -1.854587, log odds(e^-3) = -2.948931, difference 1.094344,
#      log σ(1.094344) = -0.288751
#   B: log odds(e^-0.5) = log(0.606531 / 0.393469) = 0.432752, log odds(e^-2) = -1.854587, difference 2.287339,
#      log σ(2.287339) = -0.096706
#   NLL of the chosen replies, over their 5 tokens: (6 + 1) / 5 = 1.4
#   loss = 1.4 - 0.1 x (-0.288751 - 0.096706) / 2 = 1.419273
HAND_ORPO = {"loss": 1.4192728, "log_odds_chosen": (1.0943443 + 2.2873387) / 2,
             "log_odds_ratio": (-0.2887508 - 0.0967059) / 2, "nll_loss": 1.4,
             "rewards/chosen": 0.1 * (-2 - 0.5) / 2, "rewards/rejected": 0.1 * (-3 - 2) / 2,
             "rewards/margins": 0.1 * (1 + 1.5) / 2, "rewards/accuracies": 1.0,
             "logps/chosen": (-2 - 0.5) / 2, "logps/rejected": (-3 - 2) / 2}
# SimPO (Meng et al. 2024, eq. 6), β = 0.1, γ = 0.5:
#   A: -log σ(0.1 x (-2 + 3) - 0.5) = -log σ(-0.4) = 0.913015
#   B: -log σ(0.1 x (-0.5 + 2) - 0.5) = -log σ(-0.35) = 0.883382
HAND_SIMPO = {"loss": (0.9130153 + 0.8833822) / 2, "rewards/margins": 0.1 * (1 + 1.5) / 2}


@pytest.mark.parametrize("kind,expected", [("orpo", HAND_ORPO), ("simpo", HAND_SIMPO)])
def test_orpo_and_simpo_follow_their_papers(kind, expected):
    from utils.preference import batch_loss

    loss, sums = batch_loss(kind, BETA, HAND_LOGPS, HAND_COUNTS, None, step_pairs=2, step_chosen_tokens=5, gamma=0.5)
    assert loss.item() == pytest.approx(expected["loss"], abs=1e-6)
    for name, value in expected.items():
        if name != "loss":
            assert sums[name].item() / 2 == pytest.approx(value, abs=1e-6), name


def test_orpo_and_simpo_agree_with_trl_experimental_trainers():
    """The same hand case through the loss functions of trl.experimental's ORPOTrainer and CPOTrainer
    (loss_type="simpo"), called on a stand-in for the trainer that holds only what they read."""
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    from utils.preference import batch_loss

    means = HAND_LOGPS / HAND_COUNTS
    chosen, rejected = means.chunk(2)
    accelerator = SimpleNamespace(device=torch.device("cpu"))
    losses, chosen_rewards, rejected_rewards, _, _ = ORPOTrainer.odds_ratio_loss(
        SimpleNamespace(beta=BETA, accelerator=accelerator), chosen, rejected)
    trl_orpo = HAND_ORPO["nll_loss"] - losses.mean().item()  # ORPOTrainer: the NLL minus the mean of these
    ours, sums = batch_loss("orpo", BETA, HAND_LOGPS, HAND_COUNTS, None, 2, 5)
    assert ours.item() == pytest.approx(trl_orpo, abs=1e-6)
    assert sums["rewards/chosen"].item() == pytest.approx(chosen_rewards.sum().item(), abs=1e-6)

    cpo = SimpleNamespace(beta=BETA, accelerator=accelerator, loss_type="simpo", simpo_gamma=0.5,
                          label_smoothing=0.0, alpha=0.0)
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(cpo, chosen, rejected)
    ours, sums = batch_loss("simpo", BETA, HAND_LOGPS, HAND_COUNTS, None, 2, 5, gamma=0.5)
    assert ours.item() == pytest.approx(losses.mean().item(), abs=1e-6)
    assert sums["rewards/rejected"].item() == pytest.approx(rejected_rewards.sum().item(), abs=1e-6)


@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "orpo", "simpo"])
def test_micro_batches_sum_to_the_step_loss(kind):
    """Pairs split over micro-batches weigh as in one batch: the preference term by pairs, orpo's NLL
    by the chosen replies' tokens."""
    from utils.preference import batch_loss

    reference = torch.tensor([-7.0, -1.5, -11.0, -9.0])
    whole, _ = batch_loss(kind, BETA, HAND_LOGPS, HAND_COUNTS, reference, 2, 5)
    parts = sum(batch_loss(kind, BETA, HAND_LOGPS[[i, 2 + i]], HAND_COUNTS[[i, 2 + i]], reference[[i, 2 + i]], 2, 5)[0]
                for i in range(2))
    assert parts.item() == pytest.approx(whole.item(), abs=1e-6)


# ---------------------------------------------------------------- packing and the reference


def test_packed_pairs_share_their_heads(pairs):
    from utils.pairs import PackedPairs, pair_counts

    by_pair, by_role = PackedPairs(pairs, 160), PackedPairs(pairs, 1024)
    assert all(len(row["pairs"]) == 1 for row in by_pair.rows)  # rows too short for two pairs
    for row in by_pair.rows:  # one pair: its prompt but the final <assistant>
        assert row["prefix"] == list(row["pairs"][0]["prompt"][:-1])
    several = [row for row in by_role.rows if len(row["pairs"]) > 1]
    assert several, "no row of the sample pairs holds two pairs of one role"
    for row in several:  # several: the role's system prompt
        assert all(row["prefix"] == list(p["prompt"][: p["system_len"]]) for p in row["pairs"])
    unpacked_tokens = pair_counts(list(pairs))[1]
    assert sum(by_role.lengths()) < sum(by_pair.lengths()) < unpacked_tokens
    assert sorted(p["index"] for row in by_role.rows for p in row["pairs"]) == list(range(len(pairs)))


@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "orpo", "simpo"])
def test_packed_pairs_give_the_loss_and_gradients_of_unpacked_ones(kind, policy, pairs, tokenizer_and_config):
    from utils.pairs import PackedPairs, collate_pairs
    from utils.preference import reference_logps

    pad = tokenizer_and_config[0].pad_token_id
    unpacked = collate_pairs(list(pairs), pad)
    reference = reference_logps(policy, [unpacked], len(pairs), "cpu")
    loss, metrics, grads = our_step(policy, unpacked, kind, reference)
    for max_len in (160, 1024):  # one pair a row (the prompt shared), and several (the system prompt shared)
        packed = collate_pairs(PackedPairs(pairs, max_len).rows, pad)
        assert packed["input_ids"].numel() < unpacked["input_ids"].numel()
        torch.testing.assert_close(reference_logps(policy, [packed], len(pairs), "cpu"), reference, atol=1e-4,
                                   rtol=1e-6)
        packed_loss, packed_metrics, packed_grads = our_step(policy, packed, kind, reference)
        assert packed_loss == pytest.approx(loss, abs=1e-5, rel=1e-5)
        for name, value in metrics.items():
            assert packed_metrics[name] == pytest.approx(value, abs=1e-5, rel=1e-5), name
        for name, grad in grads.items():
            torch.testing.assert_close(packed_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_the_reference_is_the_base_and_its_cache_is_used_only_when_it_fits(policy, pairs, tokenizer_and_config,
                                                                          tiny_model_dir, tmp_path):
    from utils.pairs import collate_pairs
    from utils.preference import cached_reference, reference_fingerprint, reference_logps, sequence_logps

    batch = collate_pairs(list(pairs), tokenizer_and_config[0].pad_token_id)
    n = len(pairs)
    reference = reference_logps(policy, [batch], n, "cpu")
    with torch.no_grad():
        base = sequence_logps(load_base(tiny_model_dir), batch, 2 * n)[0]
        with_adapter = sequence_logps(policy, batch, 2 * n)[0]
    torch.testing.assert_close(reference.T.reshape(-1).float(), base, atol=1e-4, rtol=1e-6)
    assert (with_adapter - base).abs().min() > 1e-3  # the adapter was on again after the pass
    assert policy.training

    path = str(tmp_path / "reference.safetensors")
    fingerprint = reference_fingerprint(pairs.examples, "model", None)
    tables, cached = cached_reference(path, fingerprint, lambda: {"train": reference})
    assert not cached and torch.equal(tables["train"], reference)

    def must_not_run():
        raise AssertionError("computed again although the cache fits")

    tables, cached = cached_reference(path, fingerprint, must_not_run)
    assert cached and torch.equal(tables["train"], reference)
    other = reference_fingerprint(pairs.examples[:-1], "model", None)
    assert other != fingerprint != reference_fingerprint(pairs.examples, "model", "adapter")
    tables, cached = cached_reference(path, other, lambda: {"train": reference[:-1]})
    assert not cached and tables["train"].shape == (n - 1, 2)
    (tmp_path / "reference.safetensors").write_bytes(b"damaged")
    tables, cached = cached_reference(path, other, lambda: {"train": reference[:-1]})
    assert not cached


# ---------------------------------------------------------------- train.py --stage dpo

STEP_LINE = re.compile(r"^step=(\d+) loss=([0-9.]+) .*rewards/margins=(-?[0-9.]+)", re.M)


def run_train(*args, env=None, timeout=300):
    env = {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "train.py", *map(str, args)], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def stop_at_step(args, step: int, timeout=300):
    """Run train.py, SIGTERM it when its `step`-th micro-batch has been backpropagated (the stall
    point of utils.signals); returns (exit status, output)."""
    env = {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONUNBUFFERED": "1", "ROLEPLAY_STALL_AT": f"step:{step}"}
    proc = subprocess.Popen([sys.executable, "train.py", *map(str, args)], cwd=REPO_ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = []
    try:
        for line in proc.stdout:
            output.append(line)
            if "stalled at" in line:
                proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout=timeout), "".join(output)
    finally:
        if proc.poll() is None:
            proc.kill()


def step_losses(output: str) -> dict[int, tuple[float, float]]:
    return {int(step): (float(loss), float(margin)) for step, loss, margin in STEP_LINE.findall(output)}


@pytest.fixture(scope="module")
def pairs_files(tmp_path_factory, roles):
    """Pairs of the sample data's first answers against generic assistant replies (GENERIC)."""
    out = tmp_path_factory.mktemp("pairs")
    rows = []
    with open(SAMPLE_DIR / "rolebench-zh_general_train.jsonl", encoding="utf-8") as f:
        for line in f:
            sample = json.loads(line)
            rows.append({"role": sample["role"], "instruction": roles[sample["role"]].system,
                         "input": sample["question"], "chosen": sample["generated"][0],
                         "rejected": GENERIC[len(rows) % len(GENERIC)]})
    (out / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[:24]), "utf-8")
    (out / "test.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[24:32]), "utf-8")
    return out


def dpo_args(model_dir, pairs_files, output_dir, *extra):
    return ["--stage", "dpo", "--model_name_or_path", model_dir, "--quantization_bit", "16",
            "--train_path", pairs_files / "train.jsonl", "--test_path", pairs_files / "test.jsonl",
            "--output_dir", output_dir, "--max_len", "512", "--per_device_train_batch_size", "4",
            "--learning_rate", "5e-3", "--show_loss_step", "1", "--save_model_step", "2", "--max_steps", "6", *extra]


def test_dpo_stage_stops_cleanly_and_resumes_exactly(tiny_model_dir, pairs_files, tmp_path):
    """An uninterrupted run; a run stopped by SIGTERM after step 3 and resumed goes on with the same
    losses and TRL's metrics, reading the reference back from its cache; --save_total_limit keeps
    the newest checkpoint and the best; the checkpoints carry the prompt record."""
    whole = run_train(*dpo_args(tiny_model_dir, pairs_files, tmp_path / "whole", "--save_total_limit", "1"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    text = whole.stdout + whole.stderr
    expected = step_losses(text)
    assert sorted(expected) == [1, 2, 3, 4, 5, 6] and expected[6][0] < expected[1][0] and expected[6][1] > 0
    assert re.search(r"^eval step=6 loss=[0-9.]+ .*eval_rewards/accuracies=", text, re.M), text[-3000:]
    kept = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert kept == ["best", "epoch-1-step-6", "reference_logps.safetensors", "tensorboard"], kept
    record = json.loads((tmp_path / "whole" / "epoch-1-step-6" / "roleplay.json").read_text("utf-8"))
    assert set(record["roles"]) == {json.loads(line)["role"] for line in open(pairs_files / "train.jsonl")}

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "whole" / "tensorboard")).Reload()
    for tag in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected", "eval_rewards/margins"):
        assert tag in events.Tags()["scalars"], tag

    out = tmp_path / "stopped"
    code, output = stop_at_step(dpo_args(tiny_model_dir, pairs_files, out), 3)
    assert code == 128 + signal.SIGTERM, output[-3000:]
    assert "stopped by SIGTERM: the checkpoint" in output and (out / "epoch-1-step-3" / "trainer_state.json").is_file()
    resumed = run_train(*dpo_args(tiny_model_dir, pairs_files, out, "--resume_from_checkpoint", "latest"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"reference log-probabilities read from {out / 'reference_logps.safetensors'}" in resumed.stdout
    got = {**step_losses(output), **step_losses(resumed.stdout + resumed.stderr)}
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step, (loss, margin) in expected.items():
        assert got[step][0] == pytest.approx(loss, abs=1e-6) and got[step][1] == pytest.approx(margin, abs=1e-6), step


def test_dpo_stage_on_an_sft_adapter_takes_it_as_the_reference(tiny_model_dir, pairs_files, tmp_path):
    """With --adapter the run trains on from the SFT adapter (its rank, not --lora_dim's), and the
    reference is that adapter: before the first update the policy equals it, so the first step's
    margin is 0 and its loss log 2 (were the reference the base, they would not be)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    sft = tmp_path / "sft"
    model = perturb_adapter(get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)),
                                           LoraConfig(**LORA, task_type="CAUSAL_LM")))
    model.save_pretrained(str(sft))
    args = dpo_args(tiny_model_dir, pairs_files, tmp_path / "out", "--adapter", sft, "--pref_packing",
                    "--per_device_train_batch_size", "2", "--max_steps", "2", "--lora_dim", "8")
    proc = run_train(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = step_losses(proc.stdout + proc.stderr)[1]
    assert first[0] == pytest.approx(math.log(2), abs=1e-6) and first[1] == pytest.approx(0, abs=1e-6)
    saved = json.loads((tmp_path / "out" / "epoch-1-step-2" / "adapter_config.json").read_text())
    assert saved["r"] == LORA["r"]



def test_dpo_bad_input_is_one_error_line(tiny_model_dir, pairs_files, tmp_path):
    from helpers import assert_one_line_error

    bad = tmp_path / "bad.jsonl"
    good = (pairs_files / "train.jsonl").read_text("utf-8").splitlines()[0]
    bad.write_text(good + "\n" + json.dumps({"instruction": "s", "input": "q", "chosen": "同", "rejected": "同"}) + "\n")
    proc = run_train("--stage", "dpo", "--model_name_or_path", tiny_model_dir, "--train_path", bad,
                     "--output_dir", tmp_path / "out")
    assert_one_line_error(proc, f"{bad}:2: 'chosen' and 'rejected' are the same reply")
    assert not (tmp_path / "out").exists()

    proc = run_train("--model_name_or_path", tiny_model_dir, "--train_path", pairs_files / "train.jsonl",
                     "--output_dir", tmp_path / "out", "--pref_packing", "--adapter", tmp_path)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: --pref_packing is for --stage dpo", "error: --adapter is for --stage dpo"], proc.stderr


def test_two_processes_and_accumulation_give_the_one_process_losses(tiny_model_dir, pairs_files, tmp_path):
    """orpo weighs its preference term by pairs and its NLL by the chosen replies' tokens over the whole
    step: 2 processes x 2 micro-batches of 1 pair give the losses and metrics of 1 process x 2
    micro-batches of 2 (the same 4 pairs a step: the schedule depends on batch x processes)."""
    args = ["--pref_loss", "orpo", "--max_steps", "3", "--save_model_step", "3", "--gradient_accumulation_steps", "2"]
    one = run_train(*dpo_args(tiny_model_dir, pairs_files, tmp_path / "one", *args, "--per_device_train_batch_size",
                              "2"))
    assert one.returncode == 0, one.stderr[-3000:]
    env = {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONUNBUFFERED": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "train.py",
                          *map(str, dpo_args(tiny_model_dir, pairs_files, tmp_path / "two", *args,
                                             "--per_device_train_batch_size", "1"))],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    metric = re.compile(r"^step=(\d+) loss=([0-9.]+) .*nll_loss=([0-9.]+) .*rewards/margins=(-?[0-9.]+)", re.M)
    expected, got = metric.findall(one.stdout), metric.findall(two.stdout)
    assert len(expected) == 3 and len(got) == 3, two.stdout[-3000:]
    assert not (tmp_path / "one" / "reference_logps.safetensors").exists()  # orpo has no reference
    for (step, *values), (other_step, *other_values) in zip(expected, got, strict=True):
        assert step == other_step and [float(v) for v in other_values] == pytest.approx(
            [float(v) for v in values], abs=2e-6), step

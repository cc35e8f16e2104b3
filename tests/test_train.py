"""The training pipeline on the tiny model: data_helper -> train.py -> merge_params.py.

Whole-script runs as subprocesses (one process and the deepspeed launcher with two), plus the
pieces whose numbers matter: the trained-on token ids, gradients after an eval pass, resume.
"""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT

STEP_LINE = re.compile(r"^step=(\d+) loss=([0-9.]+)", re.M)


def run(args, env_extra=None, timeout=600, check=True):
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
    proc = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def losses(output: str) -> dict[int, float]:
    return {int(step): float(loss) for step, loss in STEP_LINE.findall(output)}


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    out = tmp_path_factory.mktemp("samples")
    run([sys.executable, "data_helper.py", "--train_out", str(out / "train.jsonl"), "--test_out", str(out / "test.jsonl")])
    return out


def train_command(model_dir, samples, output_dir, *extra):
    return [
        sys.executable, "train.py",
        "--model_name_or_path", str(model_dir),
        "--train_path", str(samples / "train.jsonl"),
        "--test_path", str(samples / "test.jsonl"),
        "--output_dir", str(output_dir),
        "--max_len", "384", "--max_src_len", "64",
        "--per_device_train_batch_size", "8",
        "--learning_rate", "5e-3",
        "--show_loss_step", "1",
        "--save_model_step", "4",
        "--max_steps", "12",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tiny_model_dir, samples, tmp_path_factory):
    """One uninterrupted single-process run: 12 steps, checkpoints at 4, 8 and 12."""
    out = tmp_path_factory.mktemp("run") / "out"
    proc = run(train_command(tiny_model_dir, samples, out))
    return out, proc.stdout + proc.stderr


def test_table_6_3_arguments_keep_their_names_and_defaults():
    import train

    args = train.parse_args([])
    expected = {
        "model_name_or_path": None, "train_path": None, "test_path": None, "max_len": 1024, "max_src_len": 256,
        "is_skip": False, "per_device_train_batch_size": 16, "learning_rate": 1e-3, "weight_decay": 0.1,
        "num_train_epochs": 1, "gradient_accumulation_steps": 1, "warmup_ratio": 0.1, "output_dir": None,
        "seed": 1234, "local_rank": -1, "show_loss_step": 10, "gradient_checkpointing": False,
        "save_model_step": None, "ds_file": "ds_config.json", "lora_dim": 8, "lora_alpha": 30, "lora_dropout": 0.1,
    }  # fmt: skip
    assert {name: getattr(args, name) for name in expected} == expected


def test_every_flag_has_help():
    import train

    actions = [a for a in train.build_parser()._actions if a.dest != "help"]
    assert len(actions) > 25
    assert [a.dest for a in actions if len(a.help or "") < 10] == []
    assert "--resume_from_checkpoint" in run([sys.executable, "train.py", "--help"]).stdout


def test_trained_tokens_are_exactly_reply_and_eos(tiny_model_dir):
    from transformers import GenerationConfig

    from utils.data import encode_sample
    from utils.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    config = GenerationConfig.from_pretrained(tiny_model_dir)
    row = {"instruction": "你是张飞。", "input": "张飞，你的兵器是什么？", "output": "丈八蛇矛！"}
    ids, labels, cut = encode_sample(tokenizer, row, config.user_token_id, config.assistant_token_id, 64, 32)
    reply = tokenizer.encode(row["output"], add_special_tokens=False)
    trained = [label for label in labels if label != -100]
    assert trained == reply + [tokenizer.eos_token_id]
    assert ids[-len(trained) :] == trained and not cut
    prompt = ids[: len(ids) - len(trained)]
    system = tokenizer.encode(row["instruction"], add_special_tokens=False)
    question = tokenizer.encode(row["input"], add_special_tokens=False)
    assert prompt == system + [config.user_token_id] + question + [config.assistant_token_id]


def test_truncation_cuts_question_then_reply(tiny_model_dir):
    from utils.data import encode_sample
    from utils.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    row = {"instruction": "系统", "input": "问题" * 40, "output": "回答" * 40}
    ids, labels, cut = encode_sample(tokenizer, row, 5, 6, max_len=48, max_src_len=10)
    assert cut and len(ids) == 48 and labels[-1] == tokenizer.eos_token_id
    system = tokenizer.encode("系统", add_special_tokens=False)
    assert ids.index(6) == len(system) + 1 + 10  # system, <user>, 10 question tokens, <assistant>


def test_packing_keeps_every_sample_and_fits():
    from utils.data import PackedDataset, collate, sample_counts

    # Two system prompts (ids 90.. and 80..), six samples: prompt + own tokens.
    examples = [
        {"input_ids": [90 + k for k in range(p)] + list(range(n)), "labels": [-100] * (p + n - 2) + [1, 2], "prefix_len": p}
        for p, n in ((5, 30), (5, 20), (5, 40), (3, 10), (3, 50), (5, 15))
    ]
    for e in examples[3:5]:
        e["input_ids"][:3] = [80, 81, 82]
    dataset = type("D", (), {"examples": examples})()
    rows = PackedDataset(dataset, 64).rows
    assert sorted(len(e["input_ids"]) for row in rows for e in row["samples"]) == [13, 20, 25, 35, 45, 53]
    assert all(len({tuple(e["input_ids"][: len(row["prefix"])]) for e in row["samples"]}) == 1 for row in rows)
    # First fit, longest first, under a budget of 64 - prompt: 40+15 and 30+20 after prompt 90..,
    # 50+10 after prompt 80..
    assert PackedDataset(dataset, 64).lengths() == [5 + 40 + 15, 5 + 30 + 20, 3 + 50 + 10]
    batch = collate(rows[:1], pad_id=0)
    prefix, samples = rows[0]["prefix"], rows[0]["samples"]
    mask, positions = batch["attention_mask"][0], batch["position_ids"][0]
    assert mask[: len(prefix)].tolist() == [-1] * len(prefix) and mask.max().item() == len(samples)
    own = len(samples[0]["input_ids"]) - len(prefix)
    assert positions[len(prefix)].item() == len(prefix) and positions[len(prefix) + own].item() == len(prefix)

    # throughput counts the samples' own lengths, the shared prompt once per sample, as unpacked
    assert sample_counts(rows) == (6, 13 + 20 + 25 + 35 + 45 + 53)
    plain = collate(examples[:2], pad_id=0)
    assert sample_counts(examples[:2]) == (2, int((plain["attention_mask"] != 0).sum()))


@pytest.mark.parametrize("position_embedding", ["rope", "alibi"])
def test_packed_rows_give_the_same_loss_and_gradients(tiny_model_dir, position_embedding):
    """A shared-prompt packed batch trains exactly as the samples one by one."""
    from transformers import GenerationConfig

    from baichuan import BaichuanForCausalLM
    from helpers import assert_packing_is_exact
    from utils.data import PackedDataset, encode_sample
    from utils.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    config = GenerationConfig.from_pretrained(tiny_model_dir)
    rows = [("你是孙悟空。", "你好", "俺老孙来也！"), ("你是孙悟空。", "你怕谁？", "谁也不怕！"),
            ("你是张飞。", "喝酒吗？", "喝！"), ("你是孙悟空。", "师父呢？", "在后头。")]  # fmt: skip
    examples = []
    for system, question, reply in rows:
        row = {"instruction": system, "input": question, "output": reply}
        ids, labels, _ = encode_sample(tokenizer, row, config.user_token_id, config.assistant_token_id, 128, 32)
        examples.append({"input_ids": ids, "labels": labels, "prefix_len": len(tokenizer.encode(system, add_special_tokens=False))})
    packed = PackedDataset(type("D", (), {"examples": examples})(), 128).rows
    assert len(packed) == 2  # one row per system prompt

    torch.manual_seed(0)
    model = BaichuanForCausalLM.from_pretrained(tiny_model_dir)
    if position_embedding == "alibi":
        model.config.position_embedding = "alibi"  # same weights, 13B-style positions
    assert_packing_is_exact(model, examples, packed, tokenizer.pad_token_id)


def test_length_grouped_batches_are_reproducible_and_disjoint():
    from utils.data import length_grouped_batches

    lengths = [(i * 37) % 101 for i in range(200)]
    a = length_grouped_batches(lengths, 4, seed=1, epoch=0, world_size=2, rank=0)
    b = length_grouped_batches(lengths, 4, seed=1, epoch=0, world_size=2, rank=1)
    assert a == length_grouped_batches(lengths, 4, seed=1, epoch=0, world_size=2, rank=0)
    assert a != length_grouped_batches(lengths, 4, seed=1, epoch=1, world_size=2, rank=0)
    seen = [i for batch in a + b for i in batch]
    assert len(seen) == len(set(seen)) == 200
    spread = sum(max(lengths[i] for i in batch) - min(lengths[i] for i in batch) for batch in a) / len(a)
    assert spread < 25  # sorted within mega-batches of 48; random batches of 4 would spread about 60


def test_gradients_after_an_eval_pass_equal_gradients_without(tiny_model_dir):
    """bitsandbytes repacks 4-bit weights after a no-grad eval forward on AVX512-BF16 CPUs;
    load_for_training must keep the LoRA gradients right all the same."""
    import train
    from utils.models import load_for_training

    args = train.parse_args(["--model_name_or_path", str(tiny_model_dir), "--lora_dropout", "0"])
    torch.manual_seed(0)
    model = load_for_training(args, torch.device("cpu"), torch.float32)
    ids = torch.randint(3, 1000, (2, 24))
    labels = ids.clone()
    labels[:, :8] = -100

    def lora_grads():
        model.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before = lora_grads()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    after = lora_grads()
    assert before.keys() == after.keys() and before
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=1e-5, atol=1e-7)


def test_training_run_writes_checkpoints_logs_and_loss_falls(trained):
    out, output = trained
    steps = losses(output)
    assert sorted(steps) == list(range(1, 13))
    first, last = sum(steps[s] for s in (1, 2, 3)) / 3, sum(steps[s] for s in (10, 11, 12)) / 3
    assert last < first - 0.2, steps
    assert re.search(r"\d+%\|", output), "no tqdm progress bar"
    names = sorted(p.name for p in out.iterdir())
    assert names == ["epoch-1-step-12", "epoch-1-step-4", "epoch-1-step-8", "tensorboard"]
    checkpoint = out / "epoch-1-step-12"
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.model", "tokenizer_config.json",
                 "train_args.json", "roleplay.json", "trainer_state.json", "optimizer-rank0.safetensors"):
        assert (checkpoint / name).is_file(), name  # fmt: skip
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["global_step"] == 12 and math.isclose(state["ppl"], math.exp(state["eval_loss"]), rel_tol=1e-6)
    assert json.loads((checkpoint / "train_args.json").read_text())["lora_dim"] == 8

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert {"train_loss", "lr", "ppl", "tokens_per_s", "samples_per_s"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train_loss")] == list(range(1, 13))
    assert math.isclose(events.Scalars("train_loss")[-1].value, steps[12], rel_tol=1e-6)
    # lr 5e-3, warm-up ceil(0.1 x 12) = 2 steps from 0, then cosine down to 0.1 x lr at the last step;
    # the second step already trains (DeepSpeed's schedulers alone would give it lr 0 too)
    lrs = [e.value for e in events.Scalars("lr")]
    assert lrs[:2] == pytest.approx([0.0, 2.5e-3]) and lrs[-1] == pytest.approx(5e-4)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:])) and max(lrs) <= 5e-3


def test_checkpoint_loads_on_its_own_and_merge_matches_base_plus_adapter(trained, tiny_model_dir, tmp_path):
    from utils.models import load_for_inference

    out, _ = trained
    adapter = out / "epoch-1-step-12"
    merged_dir = tmp_path / "merged"
    run([sys.executable, "merge_params.py", "--ori_model_dir", str(tiny_model_dir), "--model_dir", str(adapter),
         "--save_model_dir", str(merged_dir), "--device", "-1"])  # fmt: skip
    assert (merged_dir / "model.safetensors").is_file() and (merged_dir / "modeling_baichuan.py").is_file()
    assert not list(merged_dir.glob("*.bin"))

    with_adapter, tokenizer = load_for_inference(str(tiny_model_dir), str(adapter), device="cpu")
    merged, _ = load_for_inference(str(merged_dir), device="cpu")
    base, _ = load_for_inference(str(tiny_model_dir), device="cpu")
    ids = torch.tensor([tokenizer.encode("俺老孙来也！你是谁？", add_special_tokens=False)])
    with torch.no_grad():
        expected = with_adapter(input_ids=ids).logits
        got = merged(input_ids=ids).logits
        untouched = base(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - untouched).abs().max() > 1e-3  # the adapter did change the model


def test_deepspeed_launcher_with_two_processes(tiny_model_dir, samples, tmp_path):
    out = tmp_path / "out"
    proc = run(
        ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "train.py",
         *train_command(tiny_model_dir, samples, out, "--max_steps", "3")[2:]]
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert "world size 2" in output
    assert sorted(losses(output)) == [1, 2, 3]
    checkpoint = out / "epoch-1-step-3"
    assert (checkpoint / "optimizer-rank0.safetensors").is_file()
    assert (checkpoint / "optimizer-rank1.safetensors").is_file()
    assert json.loads((checkpoint / "trainer_state.json").read_text())["world_size"] == 2


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_at(command, point: str, timeout=300) -> str:
    """Run until the stall point is reached, then SIGKILL the process."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", ROLEPLAY_STALL_AT=point)
    proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, deadline = [], time.monotonic() + timeout
    for line in proc.stdout:
        output.append(line)
        if "stalled at" in line:
            break
        assert time.monotonic() < deadline, "the stall point was never reached"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "".join(output)[-2000:]
    return "".join(output)


@pytest.mark.parametrize(
    "point, newest_complete",
    [("step:7", "epoch-1-step-4"), ("eval:5", "epoch-1-step-4"), ("save:2", "epoch-1-step-4")],
    ids=["during-a-step", "during-evaluation", "while-writing-a-checkpoint"],
)
def test_sigkill_then_resume_reaches_the_same_losses(trained, tiny_model_dir, samples, tmp_path, point, newest_complete):
    from utils.training import list_checkpoints

    _, reference_output = trained
    reference = losses(reference_output)
    out = tmp_path / "out"
    command = train_command(tiny_model_dir, samples, out)
    kill_at(command, point)
    complete = [Path(p).name for p in list_checkpoints(str(out))]
    assert complete[-1] == newest_complete
    if point.startswith("save"):
        assert (out / ".tmp-epoch-1-step-8").is_dir()  # the half-written one is there, and never picked
    resumed = losses(run(command + ["--resume_from_checkpoint", "latest"]).stdout)
    assert sorted(resumed) == list(range(5, 13))
    for step, loss in resumed.items():
        assert abs(loss - reference[step]) <= 1e-6, (step, loss, reference[step])


def test_dry_run_counts_the_books_trainable_parameters(tmp_path):
    official = {
        "architectures": ["BaichuanForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_baichuan.BaichuanConfig",
                     "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"},
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "hidden_act": "silu", "hidden_size": 4096,
        "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 4096,
        "model_max_length": 4096, "model_type": "baichuan", "num_attention_heads": 32, "num_hidden_layers": 32,
        "rms_norm_eps": 1e-06, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.29.2", "use_cache": True, "vocab_size": 125696, "z_loss_weight": 0,
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(official))
    proc = run([sys.executable, "train.py", "--model_name_or_path", str(tmp_path), "--dry_run", "--lora_dim", "16",
                "--per_device_train_batch_size", "2", "--max_len", "512", "--gradient_checkpointing"])  # fmt: skip
    assert "trainable params: 35,782,656" in proc.stdout
    assert "trainable%: 0.8314" in proc.stdout
    estimate = float(re.search(r"estimated GPU memory per device: ([0-9.]+) GiB", proc.stdout)[1])
    assert 5 < estimate < 8


def test_torchrun_with_two_processes(tiny_model_dir, samples, tmp_path):
    out = tmp_path / "out"
    proc = run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "train.py", *train_command(tiny_model_dir, samples, out, "--max_steps", "2", "--gradient_checkpointing")[2:]]
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert "world size 2" in output and sorted(losses(output)) == [1, 2]
    assert json.loads((out / "epoch-1-step-2" / "trainer_state.json").read_text())["world_size"] == 2


def test_training_curves_plot_from_a_real_run(trained, tmp_path):
    out, _ = trained
    run([sys.executable, "evaluate.py", "--plot_run", str(out), "--out_dir", str(tmp_path / "report")])
    png = tmp_path / "report" / "training_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_training_with_packing(tiny_model_dir, samples, tmp_path):
    out = tmp_path / "out"
    proc = run(train_command(tiny_model_dir, samples, out, "--packing", "--per_device_train_batch_size", "2",
                             "--max_steps", "4"))  # fmt: skip
    output = proc.stdout + proc.stderr
    rows = int(re.search(r"packed into (\d+) rows", output)[1])
    assert 0 < rows < 121 / 2  # samples share rows (and their system prompt)
    assert sorted(losses(output)) == [1, 2, 3, 4]
    state = json.loads((out / "epoch-1-step-4" / "trainer_state.json").read_text())
    assert math.isfinite(state["eval_loss"])

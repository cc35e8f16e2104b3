"""The training pipeline on the tiny model: data_helper -> train.py -> merge_params.py.

Whole-script runs as subprocesses (one process, and two under the deepspeed launcher and torchrun),
stopped by real signals and resumed; plus the pieces whose numbers matter: the trained-on token ids,
gradients after an eval pass, the token weighting of a step (tests/engine_checks.py, one and two
processes), fp16 loss scaling and its resume.
"""

import contextlib
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT

STEP_LINE = re.compile(r"^step=(\d+) loss=([0-9.]+)", re.M)
EVAL_LINE = re.compile(r"eval step=(\d+) loss=([0-9.]+)", re.M)
TOKENS_PER_S = re.compile(r"^step=(\d+) .*tokens/s=([0-9.]+)", re.M)


def child_env(**extra) -> dict:
    # One OpenMP thread a process: on the 2 shared cores, OpenMP's spinning threads made every run
    # several times slower and its tokens/s swing from step to step (torchrun sets the same).
    return {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONUNBUFFERED": "1", **extra}


def run(args, env_extra=None, timeout=600, check=True):
    env = child_env(**(env_extra or {}))
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
    """One uninterrupted single-process run: 12 steps, checkpoints at 4, 8 and 12, of which the
    newest 2 and the best are kept."""
    out = tmp_path_factory.mktemp("run") / "out"
    proc = run(train_command(tiny_model_dir, samples, out, "--save_total_limit", "2"))
    return out, proc.stdout + proc.stderr


def test_table_6_3_arguments_keep_their_names_and_defaults():
    import train
    from utils.training.config import TrainConfig

    config = TrainConfig.from_args(train.build_parser().parse_args([]))
    expected = {
        "model_name_or_path": None, "train_path": [], "test_path": [], "max_len": 1024, "max_src_len": 256,
        "is_skip": False, "per_device_train_batch_size": 16, "learning_rate": 1e-3, "weight_decay": 0.1,
        "num_train_epochs": 1, "gradient_accumulation_steps": 1, "warmup_ratio": 0.1, "output_dir": None,
        "seed": 1234, "local_rank": -1, "show_loss_step": 10, "gradient_checkpointing": False,
        "save_model_step": None, "ds_file": "ds_config.json", "lora_dim": 8, "lora_alpha": 30, "lora_dropout": 0.1,
    }  # fmt: skip
    assert {name: config.flat()[name] for name in expected} == expected
    # the flags take their defaults from the config's classes, and name every field
    assert config == TrainConfig()
    assert {a.dest for a in train.build_parser()._actions} - {"help"} == set(TrainConfig().flat())


def test_max_src_len_follows_max_len_unless_given():
    """`--max_len 256` alone was refused: "--max_src_len (256) must be smaller than --max_len (256)"."""
    import train
    from utils.training.config import TrainConfig

    def config(*argv):
        return TrainConfig.from_args(train.build_parser().parse_args(["--dry_run", *argv]))

    assert config("--max_len", "256").data.max_src_len == 64
    assert [p for p in config("--max_len", "256").problems() if "max_" in p] == []
    assert config("--max_len", "256", "--max_src_len", "200").data.max_src_len == 200
    assert "--max_src_len (256) must be smaller than --max_len (256)" in config("--max_len", "256", "--max_src_len",
                                                                                 "256").problems()
    assert "--max_len must be at least 2, got 1" in config("--max_len", "1").problems()


def test_every_flag_has_help():
    import train

    actions = [a for a in train.build_parser()._actions if a.dest != "help"]
    assert len(actions) > 25
    assert [a.dest for a in actions if len(a.help or "") < 10] == []
    assert "--resume_from_checkpoint" in run([sys.executable, "train.py", "--help"]).stdout


def test_no_bench_or_library_module_imports_train_py():
    """The benches and tests/engine_checks.py build a TrainConfig and call utils; none imports the script."""
    import ast

    paths = [*REPO_ROOT.glob("bench/*.py"), *REPO_ROOT.glob("utils/**/*.py"), REPO_ROOT / "tests" / "engine_checks.py"]
    importers = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            importers += [f"{path.name}: {name}" for name in names if name == "train"]
    assert len(paths) > 20 and importers == []


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
    from utils.models import load_for_training
    from utils.training.config import LoraConfig, ModelConfig

    torch.manual_seed(0)
    model = load_for_training(ModelConfig(model_name_or_path=str(tiny_model_dir)), LoraConfig(lora_dropout=0.0),
                              torch.device("cpu"), torch.float32)
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
    assert re.search(r"eval: +\d+%\|", output), "no progress bar for the evaluation"
    # transformers' per-weight bar is off; the load is one line with its time
    assert "Loading weights" not in output
    assert len(re.findall(r"^loaded \S+ \(4-bit, cpu\) in [0-9.]+ s$", output, re.M)) == 1
    # the config, printed at start, one line a section
    assert "\nlora: lora_dim=8, lora_alpha=30.0, lora_dropout=0.1\n" in output
    assert re.search(r"^data: train_path=\S+train.jsonl, test_path=\S+test.jsonl, .*max_len=384, max_src_len=64,", output,
                     re.M)
    # --save_total_limit 2: the newest two, and the best by eval loss, which `best` points to
    evals = {int(step): float(loss) for step, loss in EVAL_LINE.findall(output)}
    assert sorted(evals) == [4, 8, 12]
    best = f"epoch-1-step-{min(evals, key=evals.get)}"
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted({"best", "epoch-1-step-12", "epoch-1-step-8", best, "tensorboard"})  # no lock left
    assert os.readlink(out / "best") == best
    checkpoint = out / "epoch-1-step-12"
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.model", "tokenizer_config.json",
                 "train_args.json", "roleplay.json", "trainer_state.json", "optimizer-rank0.safetensors",
                 "manifest.json"):
        assert (checkpoint / name).is_file(), name  # fmt: skip
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["global_step"] == 12 and math.isclose(state["ppl"], math.exp(state["eval_loss"]), rel_tol=1e-6)
    assert json.loads((out / "epoch-1-step-8" / "trainer_state.json").read_text())["saved_at"] < state["saved_at"]
    assert state["best_model_checkpoint"] == best
    assert state["best_metric"] == pytest.approx(min(evals.values()), abs=1e-8)
    assert json.loads((checkpoint / "train_args.json").read_text())["lora_dim"] == 8

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert {"train_loss", "lr", "ppl", "tokens_per_s", "samples_per_s", "eval_seconds"} <= set(events.Tags()["scalars"])
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
    adapter = out / "best"  # the pointer, as a user would pass it
    merged_dir = tmp_path / "merged"
    proc = run([sys.executable, "merge_params.py", "--ori_model_dir", str(tiny_model_dir), "--model_dir", str(adapter),
                "--save_model_dir", str(merged_dir), "--device", "-1"])  # fmt: skip
    assert "Loading weights" not in proc.stderr
    assert re.search(r"^loaded \S+ \(float32, cpu\) in [0-9.]+ s$", proc.stdout, re.M), proc.stdout
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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun starts its workers in sessions of their own)."""
    import psutil

    parent = psutil.Process(pid)
    for process in [*parent.children(recursive=True), parent]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def signal_at(command, points: str, signals: list, stalls: int = 1, group: bool = False, timeout=300):
    """Run `command` with ROLEPLAY_STALL_AT=points; each time `stalls` processes have reported a
    stall point, send the next of `signals`, to the process group with `group` (what a terminal
    does on Ctrl-C). Returns (exit status, output)."""
    proc = subprocess.Popen(command, cwd=REPO_ROOT, env=child_env(ROLEPLAY_STALL_AT=points), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    watchdog = threading.Timer(timeout, kill_tree, (proc.pid,))
    watchdog.start()
    output, pending, stalled = [], list(signals), 0
    try:
        for line in proc.stdout:
            output.append(line)
            stalled += line.count("stalled at")
            if pending and stalled == stalls:
                os.killpg(proc.pid, pending[0]) if group else proc.send_signal(pending[0])
                pending, stalled = pending[1:], 0
        returncode = proc.wait(timeout=60)
    finally:
        timed_out = not watchdog.is_alive()
        watchdog.cancel()
    assert not timed_out and not pending, "".join(output)[-3000:]
    return returncode, "".join(output)


STOP_LINE = re.compile(r"^stopped by (SIGINT|SIGTERM): the checkpoint (\S+) is complete; resume with: (.+)$", re.M)


@pytest.mark.parametrize(
    "point, sent, newest_complete",
    [("eval:5", signal.SIGTERM, "epoch-1-step-8"), ("save:2", signal.SIGKILL, "epoch-1-step-4")],
    ids=["sigterm-during-evaluation", "sigkill-while-writing-a-checkpoint"],
)  # fmt: skip
def test_stop_or_kill_then_resume_reaches_the_same_losses(trained, tiny_model_dir, samples, tmp_path, point, sent,
                                                         newest_complete):
    """SIGTERM (as SIGINT: test_ctrl_c_with_two_processes...) finishes what is under way, here the
    checkpoint of step 8, and prints the command that resumes; SIGKILL loses what was not saved.
    Either way the resumed run trains on exactly as the uninterrupted one."""
    from utils.training.checkpoints import list_checkpoints

    reference = losses(trained[1])
    out = tmp_path / "out"
    command = train_command(tiny_model_dir, samples, out)
    returncode, output = signal_at(command, point, [sent])
    complete = [Path(p).name for p in list_checkpoints(str(out))]
    assert complete[-1] == newest_complete
    if sent == signal.SIGKILL:
        assert returncode == -signal.SIGKILL
        if point.startswith("save"):
            assert list(out.glob(".tmp-epoch-1-step-8.*"))  # the half-written one is there, and never picked
        resume_command = command + ["--resume_from_checkpoint", "latest"]
    else:
        assert returncode == 128 + sent and "Traceback" not in output, output[-3000:]
        (name, where, resume_line), = STOP_LINE.findall(output)
        assert name == signal.Signals(sent).name and Path(where).name == newest_complete
        assert output.count(f"saved {out / newest_complete} ") == 1  # a stop after a checkpoint saves no other
        resume_command = shlex.split(resume_line)
        assert resume_command == [*command, "--resume_from_checkpoint", "latest"]
    resumed = losses(run(resume_command).stdout)
    first = int(newest_complete.rsplit("-", 1)[1]) + 1
    assert sorted(resumed) == list(range(first, 13))
    for step, loss in resumed.items():
        assert abs(loss - reference[step]) <= 1e-6, (step, loss, reference[step])


def test_second_ctrl_c_stops_at_once_without_a_traceback(tiny_model_dir, samples, tmp_path):
    from utils.training.checkpoints import list_checkpoints

    out = tmp_path / "out"
    command = train_command(tiny_model_dir, samples, out, "--save_model_step", "100")
    # the first Ctrl-C during step 2; the second while its checkpoint is being written
    returncode, output = signal_at(command, "step:2,save:1", [signal.SIGINT, signal.SIGINT])
    assert returncode == 130 and "Traceback" not in output, output[-3000:]
    assert "stopped at once" in output and not STOP_LINE.search(output)
    assert list_checkpoints(str(out)) == [] and list(out.glob(".tmp-epoch-1-step-2.*"))


def test_resuming_a_finished_run_says_so_and_trains_nothing(trained, tiny_model_dir, samples):
    out, _ = trained
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*"))
    proc = run(train_command(tiny_model_dir, samples, out, "--resume_from_checkpoint", "latest"))
    assert "the run is complete:" in proc.stdout and "epoch-1-step-12 is at step 12 of 12" in proc.stdout
    assert losses(proc.stdout) == {} and "%|" not in proc.stderr  # no step, not even a progress bar
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*")) == before


def test_a_run_is_complete_at_max_steps_or_after_its_last_epoch():
    from utils.training.config import OptimConfig
    from utils.training.schedule import Schedule

    def schedule(**optim):  # 10 rows in batches of 1: 10 steps an epoch
        return Schedule([5] * 10, OptimConfig(per_device_train_batch_size=1, **optim), 1, 0, "train.jsonl")

    state = lambda epoch, step_in_epoch, global_step: {"epoch": epoch, "step_in_epoch": step_in_epoch,  # noqa: E731
                                                       "global_step": global_step}
    two_epochs = schedule(num_train_epochs=2)
    assert (two_epochs.steps_per_epoch, two_epochs.total_steps) == (10, 20)
    assert two_epochs.is_complete(state(1, 10, 20))
    assert not two_epochs.is_complete(state(0, 10, 10))
    assert not two_epochs.is_complete(state(1, 9, 19))
    assert [step[:2] for step in two_epochs.steps(state(1, 8, 18))] == [(1, 8), (1, 9)]
    assert schedule(num_train_epochs=2, max_steps=15).is_complete(state(1, 5, 15))
    # fewer epochs than the checkpoint was trained for
    assert schedule(num_train_epochs=1).is_complete(state(1, 10, 20))


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


def two_process_arguments(model_dir, samples, out):
    """2 accumulation steps of 4 rows each, 6 steps, a checkpoint every 3."""
    return train_command(model_dir, samples, out, "--max_steps", "6", "--save_model_step", "3",
                         "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
                         "--gradient_checkpointing")[2:]  # fmt: skip


def torchrun_command(model_dir, samples, out):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
            "train.py", *two_process_arguments(model_dir, samples, out)]  # fmt: skip


@pytest.fixture(scope="module")
def trained_two(tiny_model_dir, samples, tmp_path_factory):
    """The reference run with two processes, under the deepspeed launcher."""
    out = tmp_path_factory.mktemp("run2") / "out"
    proc = run(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "train.py",
                *two_process_arguments(tiny_model_dir, samples, out)])  # fmt: skip
    return out, proc.stdout + proc.stderr


def test_deepspeed_launcher_with_two_processes(trained_two):
    out, output = trained_two
    assert "world size 2" in output and sorted(losses(output)) == [1, 2, 3, 4, 5, 6]
    checkpoint = out / "epoch-1-step-6"
    assert (checkpoint / "optimizer-rank0.safetensors").is_file()
    assert (checkpoint / "optimizer-rank1.safetensors").is_file()
    assert json.loads((checkpoint / "trainer_state.json").read_text())["world_size"] == 2


def test_ctrl_c_with_two_processes_saves_both_and_resumes_exactly(trained_two, tiny_model_dir, samples, tmp_path):
    """A terminal's Ctrl-C reaches torchrun and both workers, and torchrun forwards it to them
    again: that is still one Ctrl-C, so both finish step 4 and write their partitions. The resumed
    run (torchrun) reaches the losses of the uninterrupted one (the deepspeed launcher)."""
    reference = losses(trained_two[1])
    out = tmp_path / "out"
    # both ranks park in the first micro-batch of step 4 (micro-batch 7), then the whole group gets SIGINT
    returncode, output = signal_at(torchrun_command(tiny_model_dir, samples, out), "step:7", [signal.SIGINT],
                                   stalls=2, group=True)
    assert returncode != 0 and "stopped at once" not in output
    (name, where, resume_line), = STOP_LINE.findall(output)
    assert name == "SIGINT" and where == str(out / "epoch-1-step-4")
    assert shlex.split(resume_line)[:3] == ["torchrun", "--nproc_per_node", "2"]
    assert "--resume_from_checkpoint latest" in resume_line and "[rank" not in output  # no worker traceback
    for rank in (0, 1):
        assert (out / "epoch-1-step-4" / f"optimizer-rank{rank}.safetensors").is_file()
    resumed = losses(run(torchrun_command(tiny_model_dir, samples, out) + ["--resume_from_checkpoint", "latest"]).stdout)
    assert sorted(resumed) == [5, 6]
    for step, loss in resumed.items():
        assert abs(loss - reference[step]) <= 1e-6, (step, loss, reference[step])


@pytest.fixture(scope="module")
def engine_checks(tiny_model_dir, tmp_path_factory):
    """tests/engine_checks.py: (results of one process, of two processes: directories of JSON files)."""
    one, two = tmp_path_factory.mktemp("engine1"), tmp_path_factory.mktemp("engine2")
    run([sys.executable, "tests/engine_checks.py", str(tiny_model_dir), str(one), "step_gradient", "fp16_resume"])
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "tests/engine_checks.py", str(tiny_model_dir), str(two), "step_gradient"])  # fmt: skip
    return one, two


@pytest.mark.parametrize("processes", [1, 2])
def test_a_step_weighs_micro_batches_and_ranks_by_their_labelled_tokens(engine_checks, processes):
    """train_step's gradient over 2 micro-batches of 5 and 60 labelled tokens (and 55 and 5 on the
    second rank) is that of the whole step as one batch; the book's mean of micro-batch means is far off."""
    results = [json.loads(p.read_text()) for p in sorted(engine_checks[processes - 1].glob("step_gradient-rank*.json"))]
    assert len(results) == processes
    for result in results:
        assert result["world_size"] == processes and result["step_tokens"] == (65, 125)[processes - 1]
        assert result["error"] < 1e-5, result  # relative to the gradient's norm; measured 1.5e-7 and 2.7e-7
        assert result["book_error"] > 0.5, result  # measured 0.93 and 0.78
        assert result["loss"] == pytest.approx(result["reference_loss"], rel=1e-6)  # the logged loss: per token


def test_fp16_resume_restores_the_dynamic_loss_scale(engine_checks):
    result = json.loads((engine_checks[0] / "fp16_resume.json").read_text())
    assert result["saved"] != result["initial"]  # the scale had moved: a fresh one would not do
    uninterrupted_losses, uninterrupted_scales = result["uninterrupted"]
    resumed_losses, resumed_scales = result["resumed"]
    assert resumed_scales == uninterrupted_scales
    assert resumed_losses == pytest.approx(uninterrupted_losses, abs=1e-6)
    assert result["skipped_steps"][0] == result["skipped_steps"][1] < 6  # some steps overflowed, not all


def test_fp16_gradients_of_lora_weights_match_fp32_at_loss_scale_2_16():
    """The model's loss in fp16 with DeepSpeed's initial loss scale, 2**16: the LoRA gradients of a
    2-layer model with the real 125,696-token vocabulary stay within 1e-2 of fp32 (measured 1.4e-3,
    no entry underflowing)."""
    import copy

    from peft import LoraConfig, get_peft_model

    from baichuan import BaichuanConfig, BaichuanForCausalLM

    torch.manual_seed(0)
    config = BaichuanConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4)
    model = get_peft_model(BaichuanForCausalLM(config), LoraConfig(r=8, lora_alpha=30, target_modules="all-linear"))
    for name, weight in model.named_parameters():
        if "lora_B" in name:
            weight.data.normal_(0.0, 0.02)  # as after some training (PEFT starts B at zero)
    half = copy.deepcopy(model).half()
    input_ids = torch.randint(3, config.vocab_size, (2, 128), generator=torch.Generator().manual_seed(1))
    labels = input_ids.clone()
    labels[:, :96] = -100

    def lora_grads(m, scale):
        m.train()
        m.zero_grad()
        (m(input_ids=input_ids, labels=labels).loss * scale).backward()
        return {n: w.grad.float() / scale for n, w in m.named_parameters() if w.requires_grad}

    full, scaled = lora_grads(model, 1.0), lora_grads(half, 2.0**16)
    error = sum(float((scaled[n] - full[n]).pow(2).sum()) for n in full) ** 0.5
    error /= sum(float(full[n].pow(2).sum()) for n in full) ** 0.5
    underflow = sum(int(((scaled[n] == 0) & (full[n] != 0)).sum()) for n in full) / sum(g.numel() for g in full.values())
    assert error < 1e-2 and underflow < 0.01, (error, underflow)
    assert all(torch.isfinite(g).all() for g in scaled.values())


def test_tokens_per_s_right_after_a_checkpoint_is_like_before(tiny_model_dir, samples, tmp_path):
    """Throughput windows leave out evaluation and saving: no dip after a checkpoint. Windows of 3
    steps (about 0.1 s here), since one tiny step is short enough for a neighbouring test's process
    to halve its rate now and then; the training set as the test set, so that evaluating takes as
    long as a window (counting it in gave 0.37x here, the fix 1.1-1.3x)."""
    proc = run(train_command(tiny_model_dir, samples, tmp_path / "out", "--show_loss_step", "3",
                             "--save_model_step", "6", "--max_steps", "15",
                             "--test_path", str(samples / "train.jsonl")))  # fmt: skip
    speeds = {int(step): float(rate) for step, rate in TOKENS_PER_S.findall(proc.stdout + proc.stderr)}
    assert sorted(speeds) == [3, 6, 9, 12, 15]
    for saved in (6, 12):
        assert 0.5 < speeds[saved + 3] / speeds[saved] < 2, speeds


def fake_checkpoint(folder: Path, step: int, saved_at: float = 0.0) -> None:
    """A complete checkpoint as far as its trainer state and manifest go, at `step` of epoch 1."""
    from utils.training.manifest import write_manifest

    checkpoint = folder / f"epoch-1-step-{step}"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text(json.dumps(
        {"global_step": step, "epoch": 0, "step_in_epoch": step, "steps_per_epoch": 100, "world_size": 1,
         "scheduler": None, "saved_at": saved_at}))
    write_manifest(str(checkpoint), [0], 1)


def test_keep_checkpoints_keeps_the_newest_and_the_best(tmp_path):
    from utils.training.checkpoints import keep_checkpoints, list_checkpoints

    for step in (2, 4, 6, 8, 10):
        fake_checkpoint(tmp_path, step)
    (tmp_path / ".tmp-epoch-1-step-12").mkdir()  # being written
    deleted = keep_checkpoints(str(tmp_path), "epoch-1-step-10", "epoch-1-step-4", limit=2)
    assert deleted == ["epoch-1-step-2", "epoch-1-step-6"]
    assert [Path(p).name for p in list_checkpoints(str(tmp_path))] == ["epoch-1-step-4", "epoch-1-step-8",
                                                                        "epoch-1-step-10"]
    assert (tmp_path / ".tmp-epoch-1-step-12").is_dir()
    assert os.readlink(tmp_path / "best") == "epoch-1-step-4" and (tmp_path / "best" / "trainer_state.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")) == [".tmp-epoch-1-step-12"]
    # limit 1 keeps the newest even when the best is another; no limit deletes nothing
    assert keep_checkpoints(str(tmp_path), "epoch-1-step-10", "epoch-1-step-4", limit=1) == ["epoch-1-step-8"]
    assert keep_checkpoints(str(tmp_path), "epoch-1-step-10", "epoch-1-step-10", limit=None) == []
    assert os.readlink(tmp_path / "best") == "epoch-1-step-10"


def test_keep_checkpoints_keeps_the_one_just_saved_after_resuming_from_an_older_one(tmp_path):
    """An abandoned run wrote steps 4, 8 and 12; a run resumed from 4 has just written its own 8 over
    the abandoned one. That 8 is kept and is what `latest` resumes from; the abandoned 12 goes."""
    from utils.training.checkpoints import keep_checkpoints, list_checkpoints

    for step, saved_at in ((4, 100.0), (12, 300.0), (8, 400.0)):
        fake_checkpoint(tmp_path, step, saved_at)
    assert keep_checkpoints(str(tmp_path), "epoch-1-step-8", "epoch-1-step-4", limit=1) == ["epoch-1-step-12"]
    assert [Path(p).name for p in list_checkpoints(str(tmp_path))] == ["epoch-1-step-4", "epoch-1-step-8"]
    # an old checkpoint's damaged state must not stop the run that saves beside it
    (tmp_path / "epoch-1-step-4" / "trainer_state.json").write_text('{"saved_at": ')
    assert keep_checkpoints(str(tmp_path), "epoch-1-step-8", None, limit=1) == ["epoch-1-step-4"]


def test_a_resume_with_another_batch_size_is_refused_before_the_model_loads(trained, tiny_model_dir, samples,
                                                                              tmp_path):
    import shutil

    from helpers import assert_one_line_error

    out = tmp_path / "out"
    shutil.copytree(trained[0], out, symlinks=True)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*"))
    proc = run(train_command(tiny_model_dir, samples, out, "--per_device_train_batch_size", "4",
                             "--resume_from_checkpoint", "latest"), check=False)  # fmt: skip
    assert_one_line_error(proc, "epoch-1-step-12", "optimizer steps per epoch", "same processes, batch size")
    assert "trainable params" not in proc.stdout  # refused before the model was loaded
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*")) == before


def test_no_warmup_still_gives_deepspeed_a_schedule_it_accepts():
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    from utils.training.config import OptimConfig
    from utils.training.deepspeed_config import fill_ds_config, read_ds_config

    optim = OptimConfig(warmup_ratio=0.0)
    config = fill_ds_config(read_ds_config(str(REPO_ROOT / "ds_config.json")), optim, 1, torch.float32, total_steps=12)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=optim.learning_rate)
    # 0 warm-up steps raised "warmup_num_steps must be a positive integer" here, after the model load
    scheduler = WarmupCosineLR(optimizer, **config["scheduler"]["params"])
    assert config["scheduler"]["params"]["warmup_num_steps"] == 1 and scheduler.total_num_steps == 12


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

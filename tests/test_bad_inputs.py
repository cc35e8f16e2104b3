"""Bad input to train.py, merge_params.py and evaluate.py's models: one `error:` line naming the
culprit, a non-zero exit, no traceback, and nothing half-written. (data_helper.py's corpus is in
test_data_helper.py, the web demo's and predict.py's in their own test files.)"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from helpers import assert_one_line_error

BAD = REPO_ROOT / "tests" / "bad_inputs" / "train"


def run(args, timeout=300):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def good_samples(tmp_path_factory):
    out = tmp_path_factory.mktemp("good")
    row = {"instruction": "你是李白。", "input": "你好", "output": "幸会幸会！"}
    (out / "train.jsonl").write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    return out / "train.jsonl"


def train_args(model, train, out, *extra):
    return [sys.executable, "train.py", "--model_name_or_path", str(model), "--train_path", str(train),
            "--output_dir", str(out), "--max_len", "256", "--max_src_len", "32", *extra]  # fmt: skip


# (name, how to change the good arguments, what the error must name)
TRAIN_CASES = [
    ("missing model dir", {"model": "/nonexistent/model"}, ["--model_name_or_path", "/nonexistent/model"]),
    ("missing train file", {"train": "/nonexistent/train.jsonl"}, ["--train_path", "/nonexistent/train.jsonl"]),
    ("missing test file", {"extra": ["--test_path", "/nonexistent/test.jsonl"]}, ["--test_path"]),
    ("max_src_len not below max_len", {"extra": ["--max_src_len", "256"]}, ["--max_src_len", "--max_len"]),
    ("zero LoRA rank", {"extra": ["--lora_dim", "0"]}, ["--lora_dim"]),
    ("negative learning rate", {"extra": ["--learning_rate", "-1"]}, ["--learning_rate"]),
    ("warmup ratio of 1", {"extra": ["--warmup_ratio", "1"]}, ["--warmup_ratio"]),
    ("zero checkpoints to keep", {"extra": ["--save_total_limit", "0"]}, ["--save_total_limit"]),
    ("unreadable DeepSpeed config", {"extra": ["--ds_file", str(BAD)]}, ["--ds_file", "is a directory"]),
    ("missing DeepSpeed config", {"extra": ["--ds_file", "/nonexistent/ds.json"]}, ["--ds_file", "/nonexistent"]),
    ("truncated DeepSpeed config", {"extra": ["--ds_file", str(BAD / "ds_truncated.json")]}, ["ds_truncated.json", "JSON"]),
    ("DeepSpeed config not an object", {"extra": ["--ds_file", str(BAD / "ds_not_an_object.json")]}, ["ds_not_an_object.json"]),
    ("DeepSpeed bf16 not an object", {"extra": ["--ds_file", str(BAD / "ds_bf16_not_object.json")]}, ["ds_bf16_not_object.json", "bf16", "true"]),
    ("DeepSpeed optimizer a string", {"extra": ["--ds_file", str(BAD / "ds_optimizer_string.json")]}, ["ds_optimizer_string.json", "optimizer"]),
    ("foreign files in output_dir", {"out": "foreign"}, ["--output_dir", "notes.txt"]),
    ("output_dir is a file", {"out": "file"}, ["--output_dir", "is a file"]),
    ("resume latest without checkpoints", {"extra": ["--resume_from_checkpoint", "latest"]}, ["--resume_from_checkpoint"]),
]  # fmt: skip


@pytest.mark.parametrize("name, change, needles", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_train_rejects_bad_arguments(tiny_model_dir, good_samples, tmp_path, name, change, needles):
    out = tmp_path / "out"
    if change.get("out") == "foreign":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif change.get("out") == "file":
        out.write_text("not a directory")
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = run(train_args(change.get("model", tiny_model_dir), change.get("train", good_samples), out,
                          *change.get("extra", [])))  # fmt: skip
    assert_one_line_error(proc, *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_train_reports_every_argument_problem_at_once(tiny_model_dir, tmp_path):
    proc = run(train_args("/nonexistent/model", "/nonexistent/train.jsonl", tmp_path / "out", "--max_src_len", "999"))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 3 and all(line.startswith("error: ") for line in errors), proc.stderr


def test_train_refuses_output_dir_with_checkpoints_unless_resuming(tiny_model_dir, good_samples, tmp_path):
    checkpoint = tmp_path / "out" / "epoch-1-step-4"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    proc = run(train_args(tiny_model_dir, good_samples, tmp_path / "out"))
    assert_one_line_error(proc, "--output_dir", "--resume_from_checkpoint latest")


# Bad training data is found after the tokenizer is loaded; each case is still one line.
DATA_CASES = [
    ("truncated last line", "train_truncated_line.jsonl", ":2:", []),
    ("missing output field", "train_missing_output.jsonl", ":1:", []),
    ("input not a string", "train_input_not_string.jsonl", ":1:", []),
    ("non-UTF-8 bytes", "train_not_utf8.jsonl", ":1:", []),
    ("empty after filtering", None, "no sample left", ["--max_len", "8", "--max_src_len", "2"]),
    ("bf16 forced on the CPU", None, "bf16", ["--ds_file", str(BAD / "ds_bf16_forced.json")]),
]


@pytest.mark.parametrize("name, data, needle, extra", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_train_rejects_bad_data(tiny_model_dir, good_samples, tmp_path, name, data, needle, extra):
    train = BAD / data if data else good_samples
    out = tmp_path / "out"
    args = train_args(tiny_model_dir, train, out)
    if extra:
        args = args[: args.index("--max_len")] + extra + (["--max_len", "256", "--max_src_len", "32"] if "--max_len" not in extra else [])
    proc = run(args)
    assert_one_line_error(proc, needle, *([train.name] if data else []))
    assert not list(out.glob("epoch-*")) and not list(out.glob(".tmp-*"))


@pytest.fixture(scope="module")
def foreign_adapter(tmp_path_factory, tiny_tokenizer_model):
    """A LoRA adapter made for a 32-wide model, which cannot fit the 64-wide tiny model."""
    import torch
    from peft import LoraConfig, get_peft_model

    from baichuan import BaichuanForCausalLM
    from baichuan.tiny import make_tiny

    root = tmp_path_factory.mktemp("foreign")
    make_tiny(str(root / "base"), tiny_tokenizer_model, hidden_size=32, intermediate_size=86, num_heads=2)
    model = BaichuanForCausalLM.from_pretrained(root / "base")
    lora = LoraConfig(r=4, target_modules=["W_pack", "o_proj", "gate_proj", "up_proj", "down_proj"])
    torch.manual_seed(0)
    get_peft_model(model, lora).save_pretrained(root / "adapter")
    return root / "adapter"


def merge_args(base, adapter, out, *extra):
    return [sys.executable, "merge_params.py", "--ori_model_dir", str(base), "--model_dir", str(adapter),
            "--save_model_dir", str(out), *extra]  # fmt: skip


def test_merge_rejects_adapter_of_another_base(tiny_model_dir, foreign_adapter, tmp_path):
    proc = run(merge_args(tiny_model_dir, foreign_adapter, tmp_path / "merged"))
    assert_one_line_error(proc, "does not fit", "size mismatch")
    assert list(tmp_path.iterdir()) == []


def test_merge_rejects_a_4bit_base(tiny_model_dir, foreign_adapter, tmp_path):
    base = tmp_path / "base4bit"
    shutil.copytree(tiny_model_dir, base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(config))
    proc = run(merge_args(base, foreign_adapter, tmp_path / "merged"))
    assert_one_line_error(proc, "--ori_model_dir", "quantized")
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize(
    "case, needles",
    [("missing adapter", ["--model_dir", "adapter_config.json"]), ("existing output", ["--save_model_dir", "exists"]),
     ("missing base", ["--ori_model_dir"]), ("cuda without a GPU", ["--device"])],
)  # fmt: skip
def test_merge_rejects_bad_arguments(tiny_model_dir, foreign_adapter, tmp_path, case, needles):
    base, adapter, out, extra = tiny_model_dir, foreign_adapter, tmp_path / "merged", []
    if case == "missing adapter":
        adapter = tmp_path / "no-adapter"
    elif case == "existing output":
        out.mkdir()
    elif case == "missing base":
        base = tmp_path / "no-base"
    else:
        extra = ["--device", "0"]
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
    proc = run(merge_args(base, adapter, out, *extra))
    assert_one_line_error(proc, *needles)
    assert not list(Path(tmp_path).glob(".tmp-*"))


def truncate(path: Path) -> None:
    """Cut a file to half its size, as a copy or a download stopped halfway leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# trainer_state.json of a checkpoint of the one-row `good_samples` in batches of 1: one step per epoch,
# after the first (of 2, so that the run is not complete)
GOOD_STATE = {"global_step": 1, "epoch": 0, "step_in_epoch": 1, "steps_per_epoch": 1, "world_size": 1,
              "scheduler": None}
# (name, trainer_state.json's text, whether the adapter is cut short, what the error must name)
RESUME_CASES = [
    ("trainer state without its keys", "{}", False, ["trainer_state.json", "global_step", "steps_per_epoch"]),
    ("trainer state not an object", "[]", False, ["trainer_state.json", "object"]),
    ("truncated adapter", json.dumps(GOOD_STATE), True, ["epoch-1-step-1", "deserializing header"]),
]  # fmt: skip


@pytest.mark.parametrize("name, state, cut, needles", RESUME_CASES, ids=[c[0] for c in RESUME_CASES])
def test_train_rejects_a_broken_checkpoint_to_resume_from(tiny_model_dir, good_samples, foreign_adapter, tmp_path,
                                                         name, state, cut, needles):
    import torch
    from safetensors.torch import save_file

    from utils.training.manifest import write_manifest

    checkpoint = tmp_path / "out" / "epoch-1-step-1"
    shutil.copytree(foreign_adapter, checkpoint)
    if cut:
        truncate(checkpoint / "adapter_model.safetensors")
    (checkpoint / "trainer_state.json").write_text(state)
    save_file({"rng.cpu": torch.get_rng_state()}, checkpoint / "optimizer-rank0.safetensors")  # read last
    write_manifest(str(checkpoint), [0], 1)  # as if saved so: only the checks of what is in it can tell
    before = sorted(p.name for p in (tmp_path / "out").rglob("*"))
    proc = run(train_args(tiny_model_dir, good_samples, tmp_path / "out", "--per_device_train_batch_size", "1",
                          "--num_train_epochs", "2", "--resume_from_checkpoint", "latest"))  # fmt: skip
    assert_one_line_error(proc, *needles)
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == before


def broken_copy(source: Path, tmp_path: Path, case: str) -> Path:
    """A copy of a model or adapter directory with one file broken as `case` says."""
    copy = tmp_path / f"{source.name}-broken"
    shutil.copytree(source, copy)
    if case.endswith("safetensors"):
        truncate(copy / case)
    elif case == "config.json truncated":
        truncate(copy / "config.json")
    elif case == "config.json a list":
        (copy / "config.json").write_text("[1, 2]")
    elif case == "adapter_config.json not JSON":
        (copy / "adapter_config.json").write_text("{\"r\": 4,")
    return copy


MERGE_CASES = [
    ("adapter_model.safetensors", "adapter", ["with adapter", "adapter-broken", "deserializing header"]),
    ("adapter_config.json not JSON", "adapter", ["with adapter", "adapter-broken"]),
    ("model.safetensors", "base", ["model-broken", "deserializing header"]),
    ("config.json truncated", "base", ["--ori_model_dir", "config.json", "not valid JSON"]),
    ("config.json a list", "base", ["--ori_model_dir", "config.json", "JSON object"]),
]  # fmt: skip


@pytest.mark.parametrize("case, which, needles", MERGE_CASES, ids=[c[0] for c in MERGE_CASES])
def test_merge_rejects_corrupt_files(tiny_model_dir, foreign_adapter, tmp_path, case, which, needles):
    base, adapter = tiny_model_dir, foreign_adapter
    if which == "base":
        base = broken_copy(tiny_model_dir, tmp_path, case)
    else:
        adapter = broken_copy(foreign_adapter, tmp_path, case)
    proc = run(merge_args(base, adapter, tmp_path / "merged"))
    assert_one_line_error(proc, *needles)
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob(".tmp-*"))


def test_evaluate_rejects_a_truncated_adapter(tiny_model_dir, foreign_adapter, tmp_path):
    adapter = broken_copy(foreign_adapter, tmp_path, "adapter_model.safetensors")
    proc = run([sys.executable, "evaluate.py", "--data_dir", str(REPO_ROOT / "data" / "sample"), "--limit", "1",
                "--no_baseline", "--device", "cpu", "--roles_file", str(REPO_ROOT / "data" / "roles.json"),
                "--model", f"m={tiny_model_dir}::{adapter}",
                "--out_dir", str(tmp_path / "eval")])  # fmt: skip
    assert_one_line_error(proc, "adapter-broken", "deserializing header")
    assert not (tmp_path / "eval" / "results.json").exists()

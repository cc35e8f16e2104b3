"""Command-line conventions every script keeps: an instant --help that shows defaults and marks what is
required, and one line (no traceback) for a hub id that cannot be fetched. That the launch examples keep
their line breaks and are shown in the docs is checked in test_docs.py."""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

SCRIPTS = ["data_helper.py", "train.py", "merge_params.py", "predict.py", "web_demo.py", "evaluate.py"]
HEAVY = ("torch", "transformers", "gradio", "deepspeed", "peft", "bitsandbytes")


def run(*args, env=None):
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300, env=env)


def test_help_imports_nothing_heavy():
    """--help must come back at once: no script imports torch, transformers or gradio before parsing."""
    code = (
        "import runpy, sys\n"
        f"heavy = {HEAVY!r}\n"
        f"for script in {SCRIPTS!r}:\n"
        "    sys.argv = [script, '--help']\n"
        "    try:\n"
        "        runpy.run_path(script, run_name='__main__')\n"
        "    except SystemExit:\n"
        "        pass\n"
        "    print(script, *sorted(m for m in heavy if m in sys.modules), file=sys.stderr)\n"
    )
    proc = run("-c", code)
    loaded = [line.split() for line in proc.stderr.splitlines() if line.endswith(".py") or ".py " in line]
    assert [line[0] for line in loaded] == SCRIPTS, proc.stderr[-2000:]
    assert [line for line in loaded if len(line) > 1] == []


def help_text(script) -> str:
    proc = run(script, "--help")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def flag_help(text, flag) -> str:
    """The help of one flag: from its name to the next flag's line."""
    options = text.split("\noptions:\n", 1)[1]  # not the docstring above, whose examples use the flags too
    match = re.search(rf"^\s+{re.escape(flag)}\b.*?(?=^\s+-|\Z)", options, re.S | re.M)
    assert match, f"{flag} is not in the help"
    return " ".join(match[0].split())


@pytest.mark.parametrize(("script", "flag", "shown"), [
    ("train.py", "--max_len", "(default: 1024)"),
    ("train.py", "--ds_file", "(default: ds_config.json)"),
    ("train.py", "--model_name_or_path", "(required)"),
    ("merge_params.py", "--ori_model_dir", "(required)"),
    ("merge_params.py", "--max_shard_size", "(default: 2GB)"),
    ("predict.py", "--model_path", "(required)"),
    ("predict.py", "--temperature", "0 = greedy (default: 0.8)"),
    ("web_demo.py", "--host", "(default: 127.0.0.1)"),
    ("web_demo.py", "--max_queue", "(default: 16)"),
    ("data_helper.py", "--max_replies", "(default: 2)"),
    ("evaluate.py", "--batch_size", "(default: 8)"),
])
def test_help_shows_defaults_and_marks_required_flags(script, flag, shown):
    assert shown in flag_help(help_text(script), flag)


@pytest.mark.parametrize("script, args", [
    ("train.py", ["--model_name_or_path", "baichuan-inc/Baichuan2-7B-Chat", "--train_path", "{tmp}/train.jsonl",
                  "--output_dir", "{tmp}/out"]),
    ("predict.py", ["--model_path", "baichuan-inc/Baichuan2-7B-Chat", "你好"]),
    ("merge_params.py", ["--ori_model_dir", "baichuan-inc/Baichuan2-7B-Chat", "--model_dir", "{adapter}",
                         "--save_model_dir", "{tmp}/merged"]),
])
def test_a_hub_id_that_cannot_be_fetched_is_one_line(script, args, tmp_path, tiny_adapter_dir):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    row = {"instruction": "你是张飞。", "input": "你好", "output": "俺老张在此！", "role": "张飞"}
    (tmp_path / "train.jsonl").write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    args = [a.format(tmp=tmp_path, adapter=tiny_adapter_dir) for a in args]
    proc = run(script, *args, env=env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot fetch 'baichuan-inc/Baichuan2-7B-Chat'" in errors[0], proc.stderr[-3000:]
    assert "--local-dir" in errors[0]  # says what to do
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob("out/epoch-*"))


@pytest.fixture(scope="module")
def tiny_adapter_dir(tiny_model_dir, tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    from baichuan import BaichuanForCausalLM

    folder = tmp_path_factory.mktemp("adapter")
    model = BaichuanForCausalLM.from_pretrained(tiny_model_dir)
    get_peft_model(model, LoraConfig(r=2, target_modules=["W_pack"])).save_pretrained(str(folder))
    return folder

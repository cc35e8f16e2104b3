"""Safe defaults: loopback only, no share links, safetensors only, no pickle, no remote code
unless asked. (The browser test that chat text cannot inject HTML is in test_web_demo.py.)"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT

# The project's own code: the scripts at the top and the packages beside them. Not a recursive
# search, which would also read run outputs (runs/ holds copies of baichuan/) or a virtualenv.
SOURCES = sorted(p for folder in ("", "utils", "baichuan", "bench", "scripts") for p in (REPO_ROOT / folder).glob("*.py"))


def calls(tree: ast.AST, name: str):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called == name:
                yield node


def test_the_scans_cover_the_project():
    names = {str(p.relative_to(REPO_ROOT)) for p in SOURCES}
    assert {"train.py", "utils/__init__.py", "utils/models.py", "web_demo.py", "baichuan/modeling_baichuan.py", "bench/bench_train.py"} <= names


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(REPO_ROOT)) for p in SOURCES])
def test_no_pickle_loading(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in calls(tree, "load"):
        if isinstance(node.func, ast.Attribute) and getattr(node.func.value, "id", None) == "torch":
            keywords = {k.arg: k.value for k in node.keywords}
            assert isinstance(keywords.get("weights_only"), ast.Constant) and keywords["weights_only"].value is True, (
                f"{path.name}:{node.lineno}: torch.load without weights_only=True"
            )
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names} | {getattr(node, "module", None) for node in ast.walk(tree)
                                            if isinstance(node, ast.ImportFrom)}  # fmt: skip
    assert not imported & {"pickle", "dill", "cloudpickle"}, path.name


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(REPO_ROOT)) for p in SOURCES])
def test_remote_code_only_when_asked(path):
    """No script hard-codes trust_remote_code=True; it is always the user's flag."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
            assert not (isinstance(node.value, ast.Constant) and node.value.value is True), (
                f"{path.name}:{node.value.lineno}: trust_remote_code=True is hard-coded"
            )
        if isinstance(node, ast.keyword) and node.arg == "share":
            assert not (isinstance(node.value, ast.Constant) and node.value.value is True), path.name


MINIMAL_ARGS = {
    "train": [],
    "merge_params": ["--ori_model_dir", "base", "--model_dir", "adapter", "--save_model_dir", "out"],
    "web_demo": ["--model_path", "model"],
    "predict": ["--model_path", "model"],
    "evaluate": [],
}


@pytest.mark.parametrize("script", sorted(MINIMAL_ARGS))
def test_trust_remote_code_flag_is_off_by_default(script):
    module = __import__(script)
    assert module.parse_args(MINIMAL_ARGS[script]).trust_remote_code is False
    assert module.parse_args(MINIMAL_ARGS[script] + ["--trust_remote_code"]).trust_remote_code is True


def test_saved_directories_hold_safetensors_and_load_without_remote_code(tiny_model_dir, tmp_path):
    """What the project writes loads through registration alone, and holds no pickle files."""
    from utils.models import load_for_inference

    assert list(Path(tiny_model_dir).glob("*.safetensors"))
    for pattern in ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt"):
        assert not list(Path(tiny_model_dir).glob(pattern))
    code = (
        "import baichuan, sys\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tiny_model_dir)!r}, trust_remote_code=False)\n"
        f"t = AutoTokenizer.from_pretrained({str(tiny_model_dir)!r}, trust_remote_code=False)\n"
        "print(type(m).__module__, type(t).__module__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["baichuan.modeling_baichuan", "baichuan.tokenization_baichuan"]
    model, tokenizer = load_for_inference(str(tiny_model_dir), device="cpu")
    assert type(model).__module__ == "baichuan.modeling_baichuan"


def test_web_demo_listens_on_loopback_without_share_by_default():
    import web_demo

    args = web_demo.parse_args(["--model_path", "some/model"])
    assert (args.host, args.port, args.share) == ("127.0.0.1", 9090, False)
    assert web_demo.parse_args(["--model_path", "m", "--host", "0.0.0.0", "--share"]).share is True

"""The prompt contract end to end: a custom system template and custom role descriptions go from
data_helper.py through train.py's checkpoint and merge_params.py's merged directory to predict.py,
the web demo and evaluate.py, to the token."""

import json
import os
import subprocess
import sys

import pytest

import evaluate
import predict
import web_demo
from conftest import REPO_ROOT, assert_normal_permissions
from helpers import RecordingModel
from utils.engine import ChatEngine
from utils.prompts import RECORD_FILE, load_prompts

TEMPLATE = "现在由你来演{role}。人物小传：{description}\n记住，别出戏。"
DESCRIPTIONS = {"孙悟空": "一只从石头里蹦出来的猴子，爱吃桃，最烦念经。", "张飞": "卖过猪肉的黑脸将军，嗓门比雷还响。"}


def run(args, **kwargs):
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, PYTHONUNBUFFERED="1"), **kwargs)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir, tmp_path_factory):
    """data_helper.py -> train.py (2 steps) -> merge_params.py with a custom template and roles."""
    work = tmp_path_factory.mktemp("contract")
    roles_file = work / "roles.json"
    roles_file.write_text(json.dumps(DESCRIPTIONS, ensure_ascii=False), encoding="utf-8")
    data = work / "data"
    data.mkdir()
    run(["data_helper.py", "--roles_file", roles_file, "--roles", "孙悟空,张飞", "--system_template", TEMPLATE,
         "--train_out", data / "train.jsonl", "--test_out", data / "test.jsonl"])
    training = run(["train.py", "--model_name_or_path", tiny_model_dir, "--train_path", data / "train.jsonl",
                    "--output_dir", work / "run", "--max_len", "256", "--max_src_len", "32",
                    "--per_device_train_batch_size", "8", "--max_steps", "2"])
    checkpoint = work / "run" / "epoch-1-step-2"
    run(["merge_params.py", "--ori_model_dir", tiny_model_dir, "--model_dir", checkpoint,
         "--save_model_dir", work / "merged", "--device", "-1"])
    return {"work": work, "checkpoint": checkpoint, "merged": work / "merged", "train_output": training}


def expected_system(role):
    return TEMPLATE.format(role=role, description=DESCRIPTIONS[role])


def test_the_checkpoint_and_the_merge_record_the_prompts_trained_on(pipeline):
    for directory in (pipeline["checkpoint"], pipeline["merged"]):
        record = json.loads((directory / RECORD_FILE).read_text(encoding="utf-8"))
        assert record["system_template"] == TEMPLATE
        assert record["roles"] == {role: {"system": expected_system(role), "greeting": None} for role in DESCRIPTIONS}
        assert "{% for message in messages %}" in record["chat_template"]
        assert_normal_permissions(directory)  # 0644 under umask 022: readable by the other users of a server
    output = pipeline["train_output"].stdout + pipeline["train_output"].stderr
    assert "Setting accelerator to CPU" not in output and "built successfully" not in output


def test_predict_uses_the_recorded_prompt_to_the_token(pipeline, monkeypatch, capsys):
    import utils.models

    real = utils.models.load_for_inference
    recorded = {}

    def load_and_record(*args, **kwargs):
        model, tokenizer = real(*args, **kwargs)
        recorded["model"], recorded["tokenizer"] = RecordingModel(model), tokenizer
        return recorded["model"], tokenizer

    monkeypatch.setattr(utils.models, "load_for_inference", load_and_record)
    predict.main(["--model_path", str(pipeline["merged"]), "--role", "张飞", "--greedy", "--max_new_tokens", "3",
                  "你是谁？"])
    tokenizer = recorded["tokenizer"]
    ids = recorded["model"].calls[-1]["inputs"][0].tolist()
    system = tokenizer.encode(expected_system("张飞"), add_special_tokens=False)
    question = tokenizer.encode("你是谁？", add_special_tokens=False)
    assert ids == system + [tokenizer.convert_tokens_to_ids("<reserved_106>")] + question + [
        tokenizer.convert_tokens_to_ids("<reserved_107>")]
    assert "note:" not in capsys.readouterr().err  # the record was found: no fallback

    capsys.readouterr()
    with pytest.raises(SystemExit):  # a role the model was not trained on is not offered
        from utils.cli import exit_on_user_error

        exit_on_user_error(predict.main, ["--model_path", str(pipeline["merged"]), "--role", "李白", "你好"])
    assert "unknown role '李白'; choose one of: 孙悟空, 张飞" in capsys.readouterr().err


def test_the_web_demo_offers_the_trained_roles_with_their_prompts(pipeline):
    from utils.models import load_for_inference

    prompts = load_prompts(str(pipeline["merged"]))
    assert list(prompts.roles) == ["孙悟空", "张飞"]
    model, tokenizer = load_for_inference(str(pipeline["merged"]), device="cpu")
    recording = RecordingModel(model)
    chat = web_demo.RolePlayChat(ChatEngine(recording, tokenizer, prompts.roles))
    list(chat.chat("俺老孙来也", [], "孙悟空", 3, 0.8, 0))
    ids = recording.calls[-1]["inputs"][0].tolist()
    system = tokenizer.encode(expected_system("孙悟空"), add_special_tokens=False)
    assert ids[: len(system)] == system and ids[len(system)] == tokenizer.convert_tokens_to_ids("<reserved_106>")
    # an adapter checkpoint on its base model carries the same record
    assert load_prompts(str(pipeline["merged"])).roles == load_prompts("unused", str(pipeline["checkpoint"])).roles


def test_evaluate_answers_with_each_models_own_prompts(pipeline, tiny_model_dir, capsys):
    out = pipeline["work"] / "eval"
    evaluate.main(["--data_dir", str(REPO_ROOT / "data" / "sample"), "--roles", "孙悟空,张飞", "--limit", "2",
                   "--max_new_tokens", "3", "--no_baseline", "--model", f"tuned={pipeline['merged']}",
                   "--model", f"base={tiny_model_dir}", "--out_dir", str(out)])
    question = {"role": "张飞", "instruction": None}
    tuned = load_prompts(str(pipeline["merged"]))
    question = {**question, "history": [], "ask": "喝酒吗？"}
    asked = evaluate.question_prompt(evaluate.ModelSpec("tuned", "x"), tuned, question)
    assert asked == [{"role": "system", "content": expected_system("张飞")}, {"role": "user", "content": "喝酒吗？"}]
    base = load_prompts(str(tiny_model_dir))  # no record: data/roles.json and the default template
    assert evaluate.question_prompt(evaluate.ModelSpec("base", "x"), base, question)[0]["content"].startswith(
        "你现在要扮演张飞")
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    digests = {r["model"]: r["settings"]["digest"] for r in records if r["role"] == "张飞"}
    assert digests["tuned"] != digests["base"]  # the two models were asked with different prompts
    assert_normal_permissions(out)

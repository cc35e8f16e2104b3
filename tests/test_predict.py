"""Tests of predict.py with the tiny random model: one-shot and interactive chat as a subprocess,
the multi-turn prompt in-process, and the one-line errors. Nothing depends on what the model says."""

import io
import subprocess
import sys
from pathlib import Path

import pytest

import predict
from baichuan.generation_utils import build_chat_input
from utils.cli import UserError, exit_on_user_error
from utils.chat import Sampling, role_messages
from utils.engine import ChatEngine
from utils.models import load_for_inference
from utils.prompts import roles_from_file

ROOT = Path(__file__).resolve().parents[1]
ROLES = roles_from_file(str(ROOT / "data" / "roles.json"))


def run(*args, stdin=None):
    return subprocess.run([sys.executable, "predict.py", *map(str, args)], cwd=ROOT, input=stdin,
                          capture_output=True, text=True, timeout=180)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ")
    for fragment in fragments:
        assert fragment in last


def test_one_question_prints_an_answer(tiny_model_dir):
    result = run("--model_path", tiny_model_dir, "--role", "李白", "--greedy", "--max_new_tokens", "8", "你好，你是谁？")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), "no answer printed"
    assert result.stdout.endswith("\n") and "Traceback" not in result.stderr


def test_interactive_session_two_turns_role_switch_and_exit(tiny_model_dir):
    stdin = "你好\n\n再说一句\n/role 关羽\n/role 张飞\n你是谁\n/clear\n/exit\n这一行不会被读到\n"
    result = run("--model_path", tiny_model_dir, "--role", "李白", "--greedy", "--max_new_tokens", "6", stdin=stdin)
    assert result.returncode == 0, result.stderr
    answers = result.stdout.splitlines()
    assert [line.split("> ", 1)[0] for line in answers] == ["李白", "李白", "张飞"]
    assert "error: unknown role '关羽'" in result.stderr  # reported, and the session goes on
    assert "Traceback" not in result.stderr


def test_interactive_ends_at_end_of_input(tiny_model_dir):
    result = run("--model_path", tiny_model_dir, "--greedy", "--max_new_tokens", "4", stdin="你好\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("孙悟空> ")
    # the tiny model records no prompts: the page says so in one line and plays data/roles.json
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "carries no roleplay.json" in notes[0] and "data/roles.json" in notes[0]


def test_missing_model_dir_is_a_one_line_error(tmp_path):
    assert_one_line_error(run("--model_path", tmp_path / "nope", "你好"), "has no config.json")


class Recording:
    """The real model, with each generate() call's kwargs kept."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def generate(self, **kwargs):
        self.calls.append(kwargs)
        return self.model.generate(**kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


def test_interactive_prompt_holds_earlier_turns_and_settings(tiny_model_dir, monkeypatch, capsys):
    import torch

    torch.manual_seed(0)  # sampled replies, but the same ones every run
    model, tokenizer = load_for_inference(str(tiny_model_dir), device="cpu")
    recording = Recording(model)
    monkeypatch.setattr(sys, "stdin", io.StringIO("第一问\n第二问\n/role 张飞\n第三问\n"))
    predict.interactive(ChatEngine(recording, tokenizer, ROLES), ROLES["李白"], Sampling(5, 0.7, 0.9))

    first, second, third = recording.calls
    assert (second["max_new_tokens"], second["top_p"], second["temperature"], second["do_sample"]) == (5, 0.7, 0.9, True)
    # the second prompt is the first one, then the first reply, then the new question
    user_id, assistant_id = model.generation_config.user_token_id, model.generation_config.assistant_token_id
    first_ids, second_ids = first["inputs"][0].tolist(), second["inputs"][0].tolist()
    question = [user_id, *tokenizer.encode("第二问", add_special_tokens=False), assistant_id]
    assert second_ids[:len(first_ids)] == first_ids
    assert second_ids[-len(question):] == question
    assert len(second_ids) > len(first_ids) + len(question)  # the reply sits in between
    assert capsys.readouterr().out.count("李白> ") == 2
    # a new role starts a new conversation
    alone = role_messages(ROLES["张飞"], [{"role": "user", "content": "第三问"}])
    assert third["inputs"][0].tolist() == build_chat_input(tokenizer, alone, model.generation_config,
                                                           model.config.model_max_length, 5)


def test_a_cards_greeting_opens_the_chat_and_stays_in_the_prompt(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from helpers import card_png
    from utils.prompts import load_prompts

    card = {"spec": "chara_card_v2", "spec_version": "2.0",
            "data": {"name": "阿绣", "description": "{{char}}是江南绣坊的绣娘。", "first_mes": "客官，{{user}}想绣点什么？"}}
    prompts = load_prompts(str(tiny_model_dir), None, str(card_png(tmp_path / "card.png", card)))
    role = prompts.roles["阿绣"]
    model, tokenizer = load_for_inference(str(tiny_model_dir), device="cpu")
    recording = Recording(model)
    monkeypatch.setattr(sys, "stdin", io.StringIO("绣一朵荷花\n/clear\n"))
    predict.interactive(ChatEngine(recording, tokenizer, prompts.roles), role, Sampling(4, 0.8, 0))
    out = capsys.readouterr().out
    assert out.startswith("阿绣> 客官，你想绣点什么？\n") and out.count("阿绣> 客官，你想绣点什么？\n") == 2  # and after /clear
    expected = role_messages(role, [{"role": "assistant", "content": "客官，你想绣点什么？"},
                                    {"role": "user", "content": "绣一朵荷花"}])
    assert recording.calls[0]["inputs"][0].tolist() == build_chat_input(
        tokenizer, expected, model.generation_config, model.config.model_max_length, 4)


def test_temperature_zero_is_greedy():
    assert Sampling(8, 0.8, 0).generate_kwargs() == {"do_sample": False}
    assert Sampling(8, 0.5, 0.7).generate_kwargs() == {"do_sample": True, "top_p": 0.5, "temperature": 0.7}
    assert predict.parse_args(["--model_path", "m", "--greedy"]).greedy is True


@pytest.mark.parametrize(
    ("extra", "code", "fragments"),
    [
        (["--role", "关羽", "你好"], 1, ["unknown role '关羽'", "李白"]),
        (["--adapter", ".", "你好"], 1, ["adapter directory", "adapter_config.json"]),
        (["--roles_file", "no-such-roles.json", "你好"], 1, ["roles file not found"]),
        (["--roles_file", "predict.py", "你好"], 1, ["predict.py:1: not valid JSON"]),
        (["--top_p", "0", "你好"], 2, ["top_p"]),
        (["--max_new_tokens", "1000", "你好"], 1, ["leaves no room"]),
        (["   "], 2, ["the question is empty"]),
    ],
)
def test_bad_input_is_a_one_line_error(tiny_model_dir, capsys, extra, code, fragments):
    # in-process, exactly as `python predict.py` runs main (saves a subprocess per case)
    with pytest.raises(SystemExit) as exit_info:
        exit_on_user_error(predict.main, ["--model_path", str(tiny_model_dir), "--greedy", *extra])
    assert exit_info.value.code == code
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ")
    for fragment in fragments:
        assert fragment in err[-1]


def test_broken_checkpoint_is_a_one_line_error(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((Path(tiny_model_dir) / "config.json").read_text())
    with pytest.raises(UserError, match="cannot load the model"):
        load_for_inference(str(broken), None, "cpu", False)

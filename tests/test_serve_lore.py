"""Train = serve for lorebooks and notes: a card with a character_book, a depth prompt and
post_history_instructions, plus a World Info file, go through data_helper.py -> train.py ->
merge_params.py; the record carries each character's context and prompt style, and the page,
predict.py and the API (model = the role) serve the same conversation with the prompt ids that
the training row was encoded with, from the record or from --roles_file CARD --lorebook FILE."""

import json
from dataclasses import replace

import httpx
import pytest

import predict
import web_demo
from baichuan.generation_utils import build_chat_input, encode_conversation
from helpers import RecordingModel, serve
from test_prompt_contract import run
from utils.api import api_app
from utils.cards import read_card
from utils.engine import ChatEngine
from utils.lorebook import read_lorebook
from utils.prompts import RECORD_FILE, load_prompts

CARD = {"spec": "chara_card_v2", "data": {
    "name": "孙悟空", "description": "齐天大圣", "first_mes": "俺老孙来也！", "alternate_greetings": ["{{user}}，又见面了！"],
    "mes_example": "<START>\n{{user}}: 师父呢？\n{{char}}: 在前面化斋。\n"
                   "<START>\n{{user}}: 你的金箍棒多重？\n{{char}}: 一万三千五百斤！\n{{user}}: 师父呢？\n{{char}}: 化斋去了。",
    "post_history_instructions": "{{original}}只用短句。",
    "extensions": {"depth_prompt": {"prompt": "（{{char}}爱吃桃）", "depth": 1, "role": "system"}},
    "character_book": {"entries": [{"id": 1, "keys": ["师父"], "content": "唐僧是{{char}}的师父。",
                                    "position": "after_char"}]}}}
WORLD = {"entries": {"0": {"uid": 0, "key": ["金箍棒"], "content": "金箍棒是定海神针。", "position": 0, "scanDepth": 4},
                     "1": {"uid": 1, "key": ["师父"], "content": "师父是个和尚。", "position": 4, "depth": 2}}}
GREETING = {"role": "assistant", "content": "俺老孙来也！"}
SHORT = [GREETING, {"role": "user", "content": "师父呢？"}]  # the first dialogue, before its reply 在前面化斋。
LONG = [GREETING, {"role": "user", "content": "你的金箍棒多重？"}, {"role": "assistant", "content": "一万三千五百斤！"},
        {"role": "user", "content": "师父呢？"}]  # the second, before 化斋去了。


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("serve_lore")
    card, world = work / "card.json", work / "world.json"
    card.write_text(json.dumps(CARD, ensure_ascii=False), encoding="utf-8")
    world.write_text(json.dumps(WORLD, ensure_ascii=False), encoding="utf-8")
    data = work / "data"
    data.mkdir()
    run(["data_helper.py", "--card", card, "--lorebook", world, "--test_ratio", "0",
         "--train_out", data / "train.jsonl", "--test_out", data / "test.jsonl"])
    run(["train.py", "--model_name_or_path", tiny_model_dir, "--train_path", data / "train.jsonl",
         "--output_dir", work / "run", "--max_len", "256", "--max_src_len", "64",
         "--per_device_train_batch_size", "2", "--max_steps", "1"])
    (checkpoint,) = (work / "run").glob("epoch-*-step-1")
    run(["merge_params.py", "--ori_model_dir", tiny_model_dir, "--model_dir", checkpoint,
         "--save_model_dir", work / "merged", "--device", "-1"])
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    return {"card": card, "world": world, "prompts": data / "prompts.json", "checkpoint": checkpoint,
            "merged": work / "merged", "rows": {r["messages"][-1]["content"]: r for r in rows}}


def training_prompt(tokenizer, row):
    """The ids the row trains its last reply after: all of them before its last run of labels."""
    user_id, assistant_id = (tokenizer.convert_tokens_to_ids(t) for t in ("<reserved_106>", "<reserved_107>"))
    ids, labels, _ = encode_conversation(tokenizer, row["messages"], user_id, assistant_id, 4096, 4096)
    start = len(labels)
    while labels[start - 1] != -100:
        start -= 1
    assert start < len(labels) and tokenizer.decode(ids[start:-1]) == row["messages"][-1]["content"]
    return ids[:start]


def recording_engine(model_dir, roles, **options):
    from utils.models import load_for_inference

    model, tokenizer = load_for_inference(str(model_dir), device="cpu")
    recording = RecordingModel(model)
    return ChatEngine(recording, tokenizer, roles, **options), recording, tokenizer


def test_the_record_carries_contexts_and_prompt_style_through_checkpoint_and_merge(pipeline):
    side = json.loads(pipeline["prompts"].read_text(encoding="utf-8"))
    assert set(side["contexts"]) == {"孙悟空"}
    for directory in (pipeline["checkpoint"], pipeline["merged"]):
        record = json.loads((directory / RECORD_FILE).read_text(encoding="utf-8"))
        assert record["contexts"] == side["contexts"] and record["prompt_style"] == "project"
        assert record["roles"]["孙悟空"]["alternate_greetings"] == ["你，又见面了！"]
    expected = read_card(str(pipeline["card"])).context(books=(read_lorebook(str(pipeline["world"])),))
    assert load_prompts(str(pipeline["merged"])).roles["孙悟空"].context == expected
    assert load_prompts(str(pipeline["merged"])).roles["孙悟空"].alternates == ("你，又见面了！",)
    assert load_prompts("unused", str(pipeline["checkpoint"])).roles == load_prompts(str(pipeline["merged"])).roles
    # at serve time, a --roles_file card with --lorebook gives the same role as the record
    served = load_prompts(str(pipeline["merged"]), roles_file=str(pipeline["card"]),
                          lorebooks=[str(pipeline["world"])]).roles["孙悟空"]
    assert served == load_prompts(str(pipeline["merged"])).roles["孙悟空"]


def text_of(message) -> str:
    """A chat message's text as Gradio hands it back: a string, or a list of text blocks."""
    content = message["content"] if isinstance(message, dict) else message.content
    return content if isinstance(content, str) else "".join(b["text"] for b in content if b.get("type") == "text")


def test_the_page_serves_the_training_prompt(pipeline):
    row = pipeline["rows"]["化斋去了。"]
    world, card = str(pipeline["world"]), str(pipeline["card"])
    assert sorted(row["lore"]) == sorted([f"{world}#0", f"{world}#1", f"{card}#1"])  # every kind of place fires
    engine, recording, tokenizer = recording_engine(pipeline["merged"], load_prompts(str(pipeline["merged"])).roles)
    updates = list(web_demo.RolePlayChat(engine).chat(LONG[-1]["content"], LONG[:-1], "孙悟空", 3, 0.8, 0))
    assert recording.calls[-1]["inputs"][0].tolist() == training_prompt(tokenizer, row)
    # the chat shown is the conversation as typed: the notes and entries folded into the prompt's
    # turns stay out of it, so that sent back as the next turn's history they are not applied twice
    shown = updates[-1][1]
    assert [text_of(m) for m in shown[:len(LONG)]] == [m["content"] for m in LONG]


@pytest.mark.parametrize("source", ["record", "card"])
def test_predict_serves_the_training_prompt(pipeline, tiny_model_dir, source, monkeypatch):
    import utils.models

    real, recorded = utils.models.load_for_inference, {}

    def load_and_record(*args, **kwargs):
        model, tokenizer = real(*args, **kwargs)
        recorded["model"], recorded["tokenizer"] = RecordingModel(model), tokenizer
        return recorded["model"], tokenizer

    monkeypatch.setattr(utils.models, "load_for_inference", load_and_record)
    # from the merged model's record, or on the base model from the card and the World Info file
    model = ["--model_path", str(pipeline["merged"])] if source == "record" else [
        "--model_path", str(tiny_model_dir), "--roles_file", str(pipeline["card"]), "--lorebook",
        str(pipeline["world"])]
    predict.main([*model, "--role", "孙悟空", "--greedy", "--max_new_tokens", "3", SHORT[-1]["content"]])
    row = pipeline["rows"]["在前面化斋。"]
    assert recorded["model"].calls[-1]["inputs"][0].tolist() == training_prompt(recorded["tokenizer"], row)


def test_the_api_serves_the_training_prompt_for_model_the_role(pipeline):
    engine, recording, tokenizer = recording_engine(pipeline["merged"], load_prompts(str(pipeline["merged"])).roles)
    row = pipeline["rows"]["化斋去了。"]
    with serve(api_app(engine)) as url:
        body = {"model": "孙悟空", "messages": LONG, "max_tokens": 3, "temperature": 0}
        response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        assert recording.calls[-1]["inputs"][0].tolist() == training_prompt(tokenizer, row)
        # a prefill continues after the notes: they stay in the user turn, the prefill last
        body["messages"] = [*LONG, {"role": "assistant", "content": "化斋"}]
        assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).status_code == 200
        ids = recording.calls[-1]["inputs"][0].tolist()
        prefill = tokenizer.encode("化斋", add_special_tokens=False)
        assert ids == training_prompt(tokenizer, row) + prefill


def write_record_dir(directory, **record_fields):
    from utils.prompts import Role, make_record, write_record

    directory.mkdir()
    record = make_record({"孙悟空": Role("孙悟空", "齐天大圣")}, "{role}：{description}", 195, 196, "", **record_fields)
    write_record(str(directory), record)
    return directory


def test_a_roles_file_at_serve_time_gets_the_recorded_prompt_style(tmp_path):
    """A model trained in SillyTavern's style, given a card at serve time, builds the card's prompt
    as SillyTavern sends it (and the {{user}} it trained with), not in the project's template."""
    from utils.prompts import default_user_name, sillytavern_system

    card = tmp_path / "card.json"
    card.write_text(json.dumps(CARD, ensure_ascii=False), encoding="utf-8")
    styled = write_record_dir(tmp_path / "st", prompt_style="sillytavern")
    role = load_prompts(str(styled), roles_file=str(card)).roles["孙悟空"]
    data = CARD["data"]
    assert role.system == sillytavern_system("孙悟空", default_user_name("sillytavern"), description=data["description"],
                                             mes_example=data["mes_example"])
    assert role.context.user_name == default_user_name("sillytavern") and role.context.post_history
    plain = load_prompts(str(write_record_dir(tmp_path / "plain")), roles_file=str(card)).roles["孙悟空"]
    assert plain.system == "孙悟空：齐天大圣" and plain.context.user_name == default_user_name("project")


def test_a_bad_recorded_context_is_one_error_naming_the_record(tmp_path):
    from utils.cli import UserError

    bad = write_record_dir(tmp_path / "bad", contexts={"孙悟空": {"char_name": "孙悟空", "user_name": "你",
                                                                 "lorebooks": [{"entries": {"0": {"key": "/a+/"}}}]}})
    with pytest.raises(UserError, match=r"roleplay.json: contexts\['孙悟空'\]: .*regular-expression key"):
        load_prompts(str(bad))
    odd = write_record_dir(tmp_path / "odd", prompt_style="kobold")
    with pytest.raises(UserError, match="roleplay.json: prompt_style must be one of project, sillytavern"):
        load_prompts(str(odd))


@pytest.mark.parametrize("policy", ["role", "append", "client"])
def test_the_client_system_policy_decides_whether_the_roles_context_applies(loaded, tmp_path, policy):
    """Where the role's trained prompt is served ("role", "append"), its context is applied after the
    client's folded notes; the client's own prompt ("client") gets none of it: the client places its
    lorebook and notes itself."""
    from utils.prompts import card_role

    card = tmp_path / "card.json"
    card.write_text(json.dumps(CARD, ensure_ascii=False), encoding="utf-8")
    parsed = read_card(str(card))
    role = card_role(parsed)
    context = parsed.context(books=(read_lorebook(write_world(tmp_path)),))
    model, tokenizer = loaded
    engine = ChatEngine(model, tokenizer, {"孙悟空": replace(role, context=context)}, client_system=policy)
    note = {"role": "system", "content": "[Author's note: 下雨了]"}
    prompt = engine.request_prompt("孙悟空", [{"role": "system", "content": "Be 孙悟空."}, *LONG, note])
    folded = [*LONG[:-1], {"role": "user", "content": "师父呢？\n\n[Author's note: 下雨了]"}]
    if policy == "client":
        assert prompt.messages == [{"role": "system", "content": "Be 孙悟空."}, *folded]
    else:
        system = role.system + ("\n\nBe 孙悟空." if policy == "append" else "")
        expected, _ = context.apply([{"role": "system", "content": system}, *folded])
        assert prompt.messages == expected and expected[-1]["content"].endswith("[Author's note: 下雨了]\n\n只用短句。")


def write_world(tmp_path):
    path = tmp_path / "world.json"
    path.write_text(json.dumps(WORLD, ensure_ascii=False), encoding="utf-8")
    return str(path)


def test_the_page_offers_another_greeting(loaded, browser):
    """A card's alternate_greetings: the page's "another greeting" button swaps the opening greeting
    in turn, the chosen one goes into the prompt, and once the user has spoken the chat stays."""
    from test_web_demo import bot_texts, open_page, send, wait_for_reply
    from utils.chat import Sampling
    from utils.prompts import Role

    greetings = ["你好呀。", "又见面了。", "今天下雨。"]
    roles = {"阿绣": Role("阿绣", "你是阿绣。", greetings[0], alternates=tuple(greetings[1:])),
             "张飞": Role("张飞", "你是张飞。", "俺乃燕人张翼德！")}
    model, tokenizer = loaded
    recording = RecordingModel(model)
    chat = web_demo.RolePlayChat(ChatEngine(recording, tokenizer, roles, defaults=Sampling(3, 0.8, 0)))
    with serve(web_demo.build_app(web_demo.build_demo(chat, "阿绣"), chat.engine)) as url:
        page = open_page(browser, url)
        button = page.locator("#another_greeting")
        for expected in [greetings[1], greetings[2], greetings[0], greetings[1]]:
            button.click()
            page.wait_for_function("t => { const b = document.querySelectorAll('#chatbot [data-testid=bot]');"
                                   " return b.length === 1 && b[0].innerText.trim() === t; }", arg=expected)
        send(page, "在吗？")
        wait_for_reply(page, 2)
        prompt = recording.calls[-1]["inputs"][0].tolist()
        assert prompt == build_chat_input(tokenizer, [{"role": "system", "content": "你是阿绣。"},
                                                      {"role": "assistant", "content": greetings[1]},
                                                      {"role": "user", "content": "在吗？"}],
                                          model.generation_config, model.config.model_max_length, 3)
        button.click()  # the user has spoken: the chat stays as it is, and goes on
        send(page, "下雨了吗？")
        wait_for_reply(page, 3)
        assert bot_texts(page)[0] == greetings[1]
        assert tokenizer.decode(recording.calls[-1]["inputs"][0].tolist()).count(greetings[1]) == 1
        page.locator("#clear").click()  # a new chat opens with the first greeting again
        page.wait_for_function("t => { const b = document.querySelectorAll('#chatbot [data-testid=bot]');"
                               " return b.length === 1 && b[0].innerText.trim() === t; }", arg=greetings[0])
        page.get_by_role("radio", name="张飞").check()  # a role with one greeting: no button
        button.wait_for(state="hidden")
        page.close()

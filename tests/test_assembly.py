"""Tests of the one prompt assembly (utils/assembly.py) and of what it makes of SillyTavern's requests: the
request bodies SillyTavern 1.19.0 sent (tests/data/sillytavern, recorded by bench/sillytavern.sh with its
post-processing "None" and "Semi-strict"), served by a real server to the real `openai` client and to raw
HTTP, under each --client_system policy, and compared to the token with what data_helper.py
--prompt_style sillytavern trains on.

The model is the tiny random one: what reached `model.generate` is checked (RecordingModel), never its text.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from baichuan.generation_utils import build_chat_input, chat_token_ids, encode_conversation, encode_text
from helpers import RecordingModel, serve
from utils.api import api_app
from utils.assembly import AssemblyError, Names, assemble, leading, names_of
from utils.cards import sillytavern_examples
from utils.chat import GenerationSlots, Sampling
from utils.engine import ChatEngine, InputError
from utils.prompts import Role, load_prompts, make_record, read_record, sillytavern_messages, write_record
from utils.scenes import group_note

pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")

ROOT = Path(__file__).resolve().parents[1]
BODIES = ROOT / "tests" / "data" / "sillytavern"
CARDS = BODIES / "cards"
CLIENT_ID = "roleplay-merged"  # what web_demo.py lists for a model directory of that name
MAX_TOKENS = 4


def body(name: str) -> dict:
    return json.loads((BODIES / f"{name}.json").read_text(encoding="utf-8"))["body"]


def after_leading(messages: list[dict]) -> list[dict]:
    """The messages after the leading system ones: the conversation as SillyTavern sent it."""
    return messages[len(leading(messages)):]


ALL = sorted(path.stem for path in BODIES.glob("*.json"))
SEMISTRICT = [name for name in ALL if name.startswith("semistrict-")]
# one-on-one chats (group scenes are issue 19's); those whose later system messages SillyTavern
# itself folded ("Semi-strict"), or that have none, give the conversation as it is trained
ONE_ON_ONE = [name for name in ALL if "-group-" not in name]
AS_TRAINED = [name for name in ONE_ON_ONE if name.startswith("semistrict-")
              or all(m["role"] != "system" for m in after_leading(body(name)["messages"]))]
# the group chat's requests, one per member (each sent with model 孙悟空), and whose turn each is
GROUP = [name for name in ALL if "-group-" in name]
MEMBER = {"sunwukong": "孙悟空", "zhangfei": "张飞", "libai": "李白"}
USER_LINE = "三位英雄，今晚咱们喝什么酒？"  # what was typed in the group chat


def user(text):
    return {"role": "user", "content": text}


def plain(messages):
    return [{"role": m["role"], "content": m["content"]} for m in messages]


# ---------------------------------------------------------------- the assembly on its own


def test_recorded_bodies_are_there():
    """Both post-processing modes, for each chat state; one-on-one bodies without later system messages."""
    assert len(ALL) >= 20 and {name.removeprefix("none-") for name in ALL if name.startswith("none-")} == \
        {name.removeprefix("semistrict-") for name in SEMISTRICT}
    assert len(AS_TRAINED) > len(SEMISTRICT) // 2 and any(name.startswith("none-") for name in AS_TRAINED)
    assert {m.get("name") for m in body("none-send")["messages"]} >= {"example_user", "example_assistant"}


@pytest.mark.parametrize("name", SEMISTRICT)
def test_semistrict_bodies_are_already_assembled(name):
    """SillyTavern's Semi-strict output (one system message, later ones folded, examples named) is what the
    assembly makes of it again: the two rules are one."""
    messages = body(name)["messages"]
    assembly = assemble(messages, names_of(messages))
    assert assembly.system_parts == [messages[0]["content"]]
    assert assembly.conversation == plain(messages[1:])


@pytest.mark.parametrize("chat", ["send", "group-sunwukong"])
def test_a_none_body_assembles_as_semistrict_sent_the_same_chat(chat):
    """The same chat state sent with post-processing "None" (13 or more messages, names on the examples, the
    group nudge a system message) and "Semi-strict" gives the same prompt."""
    none, semi = body(f"none-{chat}")["messages"], body(f"semistrict-{chat}")["messages"]
    assert len(none) > len(semi)
    ours, theirs = assemble(none, names_of(none)), assemble(semi, names_of(semi))
    assert (ours.system, ours.conversation) == (theirs.system, theirs.conversation)


def test_later_system_messages_fold_into_the_user_turn_beside_them():
    messages = body("none-authors-note")["messages"]
    note = next(i for i, m in enumerate(messages) if m["role"] == "system" and i >= len(leading(messages)))
    assert [m["role"] for m in messages[note - 1:note + 2]] == ["user", "system", "assistant"]
    assembly = assemble(messages, names_of(messages))
    turn = assembly.origin.index(note)
    assert assembly.conversation[turn] == user(messages[note - 1]["content"] + "\n\n" + messages[note]["content"])
    assert len(assembly.conversation) == len(after_leading(messages)) - 1
    continued = body("none-continue")["messages"]
    assembly = assemble(continued, names_of(continued))
    assert assembly.conversation[-1] == user("[Continue your last message without repeating its original content.]")
    assert not assembly.prefill


def test_names_examples_merges_and_prefill():
    messages = [{"role": "system", "content": "卡片"},
                {"role": "system", "content": "问", "name": "example_user"},
                {"role": "system", "content": "老王: 已有名字", "name": "example_user"},
                {"role": "system", "content": "答", "name": "example_assistant"},
                {"role": "user", "content": "一"}, {"role": "user", "content": ""}, {"role": "user", "content": "二"},
                {"role": "assistant", "content": "好", "name": "阿绣"}, {"role": "developer", "content": "注"},
                {"role": "assistant", "content": "我想"}]
    assembly = assemble(messages, Names("老王", "阿绣"))
    assert assembly.system == "卡片\n\n老王: 问\n\n老王: 已有名字\n\n阿绣: 答"
    assert assembly.conversation == [user("一\n\n二"), {"role": "assistant", "content": "阿绣: 好"}, user("注"),
                                     {"role": "assistant", "content": "我想"}]
    assert assembly.prefill and assembly.origin == [6, 7, 8, 9]


def test_names_come_from_sillytavern_main_prompt_else_the_callers():
    assert names_of(body("none-group-libai")["messages"], "孙悟空") == Names("User", "李白")
    assert names_of(body("semistrict-send")["messages"]) == Names("User", "孙悟空")
    assert names_of([{"role": "system", "content": "你是嫦娥"}, user("你好")], "嫦娥", "后羿") == Names("后羿", "嫦娥")


@pytest.mark.parametrize("messages, param, words", [
    ([user("你好"), {"role": "assistant", "content": " "}], "messages[1].content", "empty assistant message"),
    ([user("你好"), {"role": "assistant", "content": "a"}, {"role": "assistant", "content": ""}],
     "messages[2].content", "nothing to continue"),
    ([{"role": "system", "content": "卡片"}], "messages", "no user message"),
])
def test_what_cannot_be_a_prompt_names_the_message(messages, param, words):
    with pytest.raises(AssemblyError, match=words) as error:
        assemble(messages, Names())
    assert error.value.param == param


# ---------------------------------------------------------------- trained as served


def reply_of(name: str) -> str:
    return f"（{name}的回话）"


def scene_row(name: str) -> dict:
    """A --dialogues scene row of the group chat that body `name` asks the next reply of: the greetings (not
    trained on), the user's line, the members' replies before, then that member's reply, each message with its
    speaker's name, read from the body as SillyTavern sent it ("Name: text", one or several a message)."""
    after = [m for m in after_leading(body(name)["messages"]) if m["role"] != "system"]
    typed = next(i for i, m in enumerate(after) if m["role"] == "user")
    assert after[typed]["content"].startswith(USER_LINE)

    def said(messages, **extra):
        text = "\n\n".join(m["content"] for m in messages if m["role"] == "assistant")
        parts = [part.split(": ", 1) for part in re.split(r"\n\n(?=(?:孙悟空|张飞|李白): )", text) if part]
        return [{"role": "assistant", "name": speaker, "content": words, **extra} for speaker, words in parts]

    active = MEMBER[name.rsplit("-", 1)[1]]
    return {"messages": [*said(after[:typed], train=False), user(USER_LINE), *said(after[typed + 1:]),
                         {"role": "assistant", "name": active, "content": reply_of(name)}]}


@pytest.fixture(scope="module")
def helper(tmp_path_factory):
    """data_helper.py --prompt_style sillytavern on the cards SillyTavern chatted with, and the group chat of
    each recorded group request as a --dialogues scene: its rows (train and test) and its prompts.json."""
    out = tmp_path_factory.mktemp("sillytavern")
    (out / "scenes.jsonl").write_text("".join(json.dumps(scene_row(name), ensure_ascii=False) + "\n"
                                              for name in GROUP), encoding="utf-8")
    result = subprocess.run([sys.executable, "data_helper.py", "--card", str(CARDS), "--prompt_style", "sillytavern",
                             "--dialogues", str(out / "scenes.jsonl"),
                             "--train_out", str(out / "train.jsonl"), "--test_out", str(out / "test.jsonl")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for part in ("train", "test")
            for line in (out / f"{part}.jsonl").read_text(encoding="utf-8").splitlines()]
    return rows, json.loads((out / "prompts.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def trained(helper):
    """Each character's trained system prompt (one-on-one, not a scene's seat)."""
    rows, side = helper
    assert side["prompt_style"] == "sillytavern" and side["user_name"] == "User"
    return {row["role"]: row["messages"][0]["content"] for row in rows
            if not row["messages"][0]["content"].endswith(group_note(row["role"]))}


@pytest.fixture(scope="module")
def card_prompts(helper, trained, tmp_path_factory):
    """The roles that a model trained on those rows serves with --roles_file of the cards: the record that
    train.py writes from prompts.json (its user name included), read back by load_prompts."""
    side = helper[1]
    model_dir = tmp_path_factory.mktemp("record")
    roles = {name: Role(name, system) for name, system in trained.items()}
    write_record(str(model_dir), make_record(roles, side["system_template"], 195, 196, "", side["prompt_style"],
                                             side.get("contexts"), user_name=side["user_name"]))
    return load_prompts(str(model_dir), roles_file=str(CARDS))


@pytest.fixture(scope="module")
def group_server(loaded, card_prompts):
    """The API (--client_system role) with the cards' roles, as a SillyTavern user would serve the model."""
    model = RecordingModel(loaded[0])
    engine = ChatEngine(model, loaded[1], card_prompts.roles, GenerationSlots(1, 4),
                        defaults=Sampling(MAX_TOKENS, 0.8, 0), user_name=card_prompts.user_name)
    with serve(api_app(engine)) as url:
        yield url, model, engine


@pytest.fixture(scope="module")
def server(loaded, roles):
    """The API as web_demo.py serves it by default (--client_system role), its roles those of data/roles.json,
    with the client's-own-prompt id."""
    model = RecordingModel(loaded[0])
    engine = ChatEngine(model, loaded[1], roles, GenerationSlots(1, 4), defaults=Sampling(MAX_TOKENS, 0.8, 0),
                        client_model=CLIENT_ID)
    with serve(api_app(engine)) as url:
        yield url, model, engine


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0, timeout=60)


def served_ids(model) -> list[int]:
    return model.calls[-1]["inputs"][0].tolist()


def training_prompt_ids(tokenizer, generation_config, system: str, conversation: list[dict]) -> list[int]:
    """The ids a training row [system, *conversation, a reply] has before its reply: what the model learns
    to answer from (baichuan.generation_utils.encode_conversation)."""
    user_id, assistant_id = chat_token_ids(generation_config)
    row = [{"role": "system", "content": system}, *conversation, {"role": "assistant", "content": "好"}]
    input_ids, _, cut = encode_conversation(tokenizer, row, user_id, assistant_id, 1024, 1024)
    prompt = input_ids[: len(input_ids) - len(encode_text(tokenizer, "好")) - 1]  # less the reply and its eos
    assert not cut and prompt[-1] == assistant_id
    return prompt


def test_trained_prompt_is_the_cards_in_sillytavern_order(trained):
    semi = body("semistrict-send")["messages"][0]["content"]
    assert trained["孙悟空"] == semi
    assert semi.startswith("Write 孙悟空's next reply in a fictional chat between 孙悟空 and User.\n\n孙悟空是花果山")
    assert semi.endswith("\n\n孙悟空: 一万三千五百斤，你拿得动么？哈哈，俺拿着它跟拿根绣花针似的。\n\n[Start a new Chat]")


@pytest.mark.parametrize("name", AS_TRAINED)
def test_the_clients_own_prompt_is_the_trained_one_to_the_token(name, trained, client, server):
    """model = the client's-own-prompt id: SillyTavern's body gives the very ids data_helper.py --prompt_style
    sillytavern trains on, for its card and conversation (the conversation as SillyTavern sent it)."""
    _, model, engine = server
    request = body(name)
    messages = request["messages"]
    conversation = plain(after_leading(messages))
    character = names_of(messages).char
    answer = client.chat.completions.create(model=CLIENT_ID, messages=messages, max_tokens=MAX_TOKENS)
    expected = training_prompt_ids(engine.tokenizer, engine.model.generation_config, trained[character], conversation)
    assert served_ids(model) == expected
    assert answer.usage.prompt_tokens == len(expected)


@pytest.mark.parametrize("name", ONE_ON_ONE)
def test_a_role_gets_its_trained_prompt_and_the_conversation_by_default(name, roles, client, server):
    """--client_system role: model = 孙悟空 is its trained prompt (data/roles.json's) plus the conversation as
    assembled (later system messages folded in), to the token; SillyTavern's own prompt is dropped."""
    _, model, engine = server
    messages = body(name)["messages"]
    answer = client.chat.completions.create(model="孙悟空", messages=messages, max_tokens=MAX_TOKENS)
    conversation = assemble(messages, names_of(messages)).conversation
    expected = training_prompt_ids(engine.tokenizer, engine.model.generation_config, roles["孙悟空"].system,
                                   conversation)
    assert served_ids(model) == expected and answer.usage.prompt_tokens == len(expected)
    assert "Write 孙悟空" not in engine.tokenizer.decode(expected)


@pytest.mark.parametrize("name", ALL)
def test_every_recorded_body_gets_a_200_as_sent(name, server):
    """Raw HTTP, each body as SillyTavern sent it (only max_tokens shortened), streamed where it was."""
    url, model, _ = server
    request = {**body(name), "max_tokens": MAX_TOKENS}
    calls = len(model.calls)
    response = httpx.post(url + "/v1/chat/completions", json=request, timeout=60)
    assert response.status_code == 200, response.text
    if request["stream"]:
        assert response.text.rstrip().endswith("data: [DONE]") and '"error"' not in response.text
    else:
        assert response.json()["choices"][0]["message"]["role"] == "assistant"
    assert len(model.calls) == calls + 1


def test_each_policy_sends_what_it_says(roles, loaded):
    """The same SillyTavern body to model 孙悟空 under each --client_system policy."""
    messages = body("none-authors-note")["messages"]
    client_system = assemble(messages, names_of(messages)).system
    trained = roles["孙悟空"].system
    systems = {}
    for policy in ("role", "client", "append"):
        engine = ChatEngine(RecordingModel(loaded[0]), loaded[1], roles, client_system=policy, client_model=CLIENT_ID)
        prompt = engine.request_prompt("孙悟空", messages)
        systems[policy] = (prompt.system, prompt.source)
        assert prompt.messages[1:] == assemble(messages, names_of(messages)).conversation
        assert engine.request_prompt(CLIENT_ID, messages).system == client_system  # the client id: always its own
        without = engine.request_prompt("孙悟空", after_leading(messages))  # a client that sends no system prompt
        assert (without.system, without.source) == (trained, "role 孙悟空")
    assert systems == {"role": (trained, "role 孙悟空"), "client": (client_system, "client"),
                       "append": (trained + "\n\n" + client_system, "role 孙悟空 + client")}


@pytest.mark.parametrize("name", GROUP)
def test_a_group_request_is_served_from_the_members_trained_seat(name, group_server, helper):
    """Each member's request of SillyTavern's group chat, sent as recorded (model 孙悟空): the model gets the ids
    that data_helper.py trains that member's reply of the same scene on, to the token: its seat, with the group
    note for the nudge, and 张飞's post-history instructions placed once, by its own context."""
    url, model, engine = group_server
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    request = body(name)
    assert request["model"] == "孙悟空"
    answer = client.chat.completions.create(model="孙悟空", messages=request["messages"], max_tokens=MAX_TOKENS)
    row = next(row for row in helper[0] if row["messages"][-1]["content"] == reply_of(name))
    active = MEMBER[name.rsplit("-", 1)[1]]
    assert row["role"] == active and row["messages"][0]["content"].endswith(group_note(active))
    expected = training_prompt_ids(engine.tokenizer, engine.model.generation_config, row["messages"][0]["content"],
                                   row["messages"][1:-1])
    assert served_ids(model) == expected and answer.usage.prompt_tokens == len(expected)
    assert engine.request_prompt("孙悟空", request["messages"]).source == f"role {active} (group seat)"


def test_a_group_request_under_client_stays_the_clients_and_a_member_that_is_no_role_falls_back(card_prompts,
                                                                                                 loaded):
    messages = body("none-group-zhangfei")["messages"]
    assembly = assemble(messages, names_of(messages))
    roles = card_prompts.roles
    prompt = ChatEngine(loaded[0], loaded[1], roles, client_system="client").request_prompt("孙悟空", messages)
    assert (prompt.system, prompt.messages[1:], prompt.source) == (assembly.system, assembly.conversation, "client")
    appended = ChatEngine(loaded[0], loaded[1], roles, client_system="append", user_name="User")
    prompt = appended.request_prompt("孙悟空", messages)
    assert prompt.source == "role 张飞 + client (group seat)"
    assert prompt.system == roles["张飞"].system + "\n\n" + assembly.system + "\n" + group_note("张飞")
    without = {name: role for name, role in roles.items() if name != "张飞"}  # 张飞 is no role of this server
    prompt = ChatEngine(loaded[0], loaded[1], without).request_prompt("孙悟空", messages)
    assert (prompt.system, prompt.messages[1:], prompt.source) == (roles["孙悟空"].system, assembly.conversation,
                                                                   "role 孙悟空")


def test_a_clients_copy_of_a_roles_own_note_is_placed_once_and_a_members_own_last_message_goes_on(card_prompts,
                                                                                                   loaded):
    """One-on-one with 张飞's card: SillyTavern's copy of its post-history instructions is taken out, the role's
    context places them. In a group, a member whose own message is last gets a new line of it, as the seat
    joins its messages in a row."""
    engine = ChatEngine(loaded[0], loaded[1], card_prompts.roles, user_name="User")
    group = body("none-group-zhangfei")["messages"]
    note = group[-1]["content"]
    assert note == "\n回话时只说张飞自己的话，保持他的粗豪口气。"
    prompt = engine.request_prompt("张飞", [user("你好"), {"role": "system", "content": note}])
    assert prompt.messages == engine.prompt(card_prompts.roles["张飞"], [user("你好")]) and prompt.source == "role 张飞"
    assert prompt.messages[-1]["content"].count(note.strip()) == 1
    again = engine.request_prompt("孙悟空", [*group[:-2], {"role": "system", "content": group_note("孙悟空")}])
    assert again.prefill and again.source == "role 孙悟空 (group seat)"
    assert again.messages[-1] == {"role": "assistant", "content": group[-3]["content"].removeprefix("孙悟空: ") + "\n"}


def test_a_nudge_typed_by_a_user_is_text_and_an_unseatable_group_still_plays_the_active_member(card_prompts,
                                                                                                loaded):
    """A nudge counts only in a system message, or beside SillyTavern's group marker: typed into a one-on-one
    chat it is the user's text. A group request whose assistant turn names no member cannot be seated: it
    plays the member whose turn it is all the same (not `model`, which SillyTavern sends for every member),
    one-on-one, with the nudge as the user's last turn."""
    roles = card_prompts.roles
    engine = ChatEngine(loaded[0], loaded[1], roles, user_name="User")
    typed = "你好\n\n" + group_note("张飞")
    prompt = engine.request_prompt("李白", [user(typed)])
    assert prompt.source == "role 李白" and prompt.messages == engine.prompt(roles["李白"], [user(typed)])
    messages = [dict(m) for m in body("none-group-zhangfei")["messages"]]
    first = next(m for m in messages if m["role"] == "assistant")
    first["content"] = first["content"].removeprefix("孙悟空: ")  # who said it is no longer known
    prompt = engine.request_prompt("孙悟空", messages)
    assert prompt.source == "role 张飞" and prompt.system == roles["张飞"].system
    assert prompt.messages[-1]["content"].startswith(group_note("张飞"))


def test_the_record_keeps_the_user_name(tmp_path, roles):
    """data_helper.py's --user_name travels through the record to the engine; an older record without it gets
    its prompt style's default."""
    record = make_record(roles, "{role}{description}", 195, 196, "", "sillytavern", user_name="老王")
    write_record(str(tmp_path), record)
    assert read_record(str(tmp_path))["user_name"] == "老王" and load_prompts(str(tmp_path)).user_name == "老王"
    for style, default in (("sillytavern", "User"), ("project", "你")):
        write_record(str(tmp_path), {k: v for k, v in {**record, "prompt_style": style}.items() if k != "user_name"})
        assert load_prompts(str(tmp_path)).user_name == default


def test_a_name_that_is_no_role_plays_the_clients_prompt_or_is_a_404(client, server, roles):
    _, model, engine = server
    card = [{"role": "system", "content": "你是嫦娥。"}, user("你好")]
    client.chat.completions.create(model="随便起的名字", messages=card, max_tokens=MAX_TOKENS)
    assert served_ids(model) == build_chat_input(engine.tokenizer, plain(card), model.generation_config,
                                                 model.config.model_max_length, MAX_TOKENS)
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(model="随便起的名字", messages=[user("你好")])
    assert error.value.body["code"] == "model_not_found"
    assert [m.id for m in client.models.list()] == [*roles, CLIENT_ID]
    assert client.models.retrieve(CLIENT_ID).id == CLIENT_ID
    client.chat.completions.create(model=CLIENT_ID, messages=[user("你好")], max_tokens=MAX_TOKENS)
    assert served_ids(model) == build_chat_input(engine.tokenizer, [user("你好")], model.generation_config,
                                                 model.config.model_max_length, MAX_TOKENS)


# ---------------------------------------------------------------- prefill and its edges


def test_a_trailing_assistant_message_is_continued_and_only_the_new_text_returned(client, server, roles):
    """As OpenAI-compatible servers do with a prefill: the prompt ends inside the assistant's turn (no new
    <assistant> token), and the reply, whole or streamed, is the new text alone."""
    _, model, engine = server
    prefill = [user("你的金箍棒有多重？"), {"role": "assistant", "content": "俺老孙的金箍棒"}]
    answer = client.chat.completions.create(model="孙悟空", messages=prefill, max_tokens=MAX_TOKENS, temperature=0)
    prompt = served_ids(model)
    _, assistant_id = chat_token_ids(model.generation_config)
    assert prompt[-len(encode_text(engine.tokenizer, "俺老孙的金箍棒")) - 1] == assistant_id
    assert prompt[-1] != assistant_id and answer.usage.prompt_tokens == len(prompt)
    new_ids = model.outputs[-1][0, len(prompt):].tolist()
    new_ids = new_ids[:-1] if new_ids[-1] == engine.tokenizer.eos_token_id else new_ids
    text = answer.choices[0].message.content
    assert text == engine.tokenizer.decode(new_ids, skip_special_tokens=True) and answer.usage.completion_tokens \
        == len(new_ids)
    chunks = list(client.chat.completions.create(model="孙悟空", messages=prefill, max_tokens=MAX_TOKENS,
                                                 temperature=0, stream=True))
    assert served_ids(model) == prompt
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text


def test_an_empty_trailing_assistant_message_is_a_clear_400(server):
    url = server[0]
    response = httpx.post(url + "/v1/chat/completions", timeout=60, json={
        "model": "孙悟空", "messages": [user("你好"), {"role": "assistant", "content": ""}]})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "messages[1].content" and "empty assistant message" in error["message"]


def test_a_folded_turn_is_checked_as_a_message(loaded, roles):
    engine = ChatEngine(RecordingModel(loaded[0]), loaded[1], roles, max_message_chars=10)
    with pytest.raises(InputError) as error:
        engine.request_prompt("孙悟空", [user("你好"), {"role": "system", "content": "作者注：" * 5}])
    assert list(error.value.problems) == ["messages[1].content"] and "too long" in str(error.value)


def test_outside_v1_a_404_says_where_the_api_is(server):
    url = server[0]
    for method, path in (("POST", "/chat/completions"), ("GET", "/models"), ("GET", "/no/such/page")):
        response = httpx.request(method, url + path, timeout=60)
        assert response.status_code == 404
        assert f"use the base URL {url}/v1" in response.json()["error"]["message"], (path, response.text)
    inside = httpx.get(url + "/v1/no/such", timeout=60)
    assert inside.status_code == 404 and "under /v1" not in inside.json()["error"]["message"]



def test_example_dialogues_are_read_as_sillytavern_reads_them():
    """Pinned to what SillyTavern 1.19.0's own parseMesExamples and parseExampleIntoIndividual (run in node)
    made of this mes_example: a line before the first speaker joins the first message, only the first
    "Name:" is taken out, a speaker's second line in a row stays in its message, an empty block is an empty
    dialogue."""
    mes_example = ("前言一行\n{{user}}: 你好\n还有一行\n{{char}}: 客官请坐\n{{char}}: 要喝茶么\n老王:好\n<START>\n"
                   "{{char}}: 只有我\n<START>\n\n<START>\n无人说话")
    user_line, char_line = {"role": "system", "name": "example_user"}, {"role": "system", "name": "example_assistant"}
    assert sillytavern_examples(mes_example, "阿绣", "老王") == [
        [{**user_line, "content": "前言一行\n 你好\n还有一行"}, {**char_line, "content": "客官请坐\n阿绣: 要喝茶么"},
         {**user_line, "content": "好"}],
        [{**char_line, "content": "只有我"}], [], []]
    messages = sillytavern_messages("阿绣", "绣娘", mes_example="{{char}}: 只有我\n<START>", user_name="老王")
    assert [m["content"] for m in messages] == [
        "Write 阿绣's next reply in a fictional chat between 阿绣 and 老王.", "绣娘", "[Example Chat]", "只有我",
        "[Example Chat]", "[Start a new Chat]"]

"""The request bodies SillyTavern 1.19.0 sent to our API in bench/sillytavern.sh's live run
(tests/data/sillytavern/, README.md there): every file is a request our API's request model
parses, and each shows the SillyTavern dialect that the server must take as it comes (issue 18):
the leading system messages (Main Prompt, the card's fields, "[Example Chat]" with
`name: example_user`/`example_assistant`, "[Start a new Chat]"), the later system messages that
Continue, Impersonate, the Author's Note and a group's nudge append, and Semi-strict's single
system prompt and alternating turns. The texts are pinned to the cards the run imported.
"""

import itertools
import json
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent / "data" / "sillytavern"
CARDS = {stem: json.loads((DATA / "cards" / f"{stem}.json").read_text(encoding="utf-8"))["data"]
         for stem in ("sunwukong", "zhangfei", "libai")}
USER = "User"  # SillyTavern's default persona name, kept at its first-run prompt
MEMBERS = [card["name"] for card in CARDS.values()]  # the group, in list order
MODES = ("none", "semistrict")
SCENARIOS = ("send", "stream", "stop", "swipe", "continue", "impersonate", "authors-note",
             "group-sunwukong", "group-zhangfei", "group-libai")
AUTHORS_NOTE = "（作者注：此刻山神庙外忽然下起了大雨。）"  # what bench/sillytavern_drive.py typed
CONTINUE = "[Continue your last message without repeating its original content.]"
IMPERSONATE = ("[Write your next reply from the point of view of User, using the chat history so far as a "
               "guideline for the writing style of User. Write 1 reply only in internet RP style. Don't write "
               "as 孙悟空 or system. Don't describe actions of 孙悟空.]")  # the Default preset's text
GROUP_START = f"[Start a new group chat. Group members: {', '.join(MEMBERS)}]"


def load(name: str) -> dict:
    return json.loads((DATA / f"{name}.json").read_text(encoding="utf-8"))


def messages(name: str) -> list[dict]:
    return load(name)["body"]["messages"]


def leading_systems(msgs: list[dict]) -> list[dict]:
    lead = []
    for message in msgs:
        if message["role"] != "system":
            break
        lead.append(message)
    return lead


def fill(text: str, char: str) -> str:
    return text.replace("{{char}}", char).replace("{{user}}", USER)


def card_prompt(stem: str, group: bool) -> list[tuple[str, str | None]]:
    """(content, name) of the leading system messages SillyTavern's default Chat Completion preset
    builds from a card: Main Prompt, description, personality, scenario, then each <START> block
    of mes_example as "[Example Chat]" and its named lines, then the new-chat marker. In a group,
    example lines keep their "Name: " (SillyTavern's default names behaviour for groups)."""
    card = CARDS[stem]
    char = card["name"]
    out = [(f"Write {char}'s next reply in a fictional chat between {char} and {USER}.", None)]
    out += [(fill(card[field], char), None) for field in ("description", "personality", "scenario")]
    for block in card["mes_example"].split("<START>")[1:]:
        out.append(("[Example Chat]", None))
        for line in filter(None, fill(block, char).strip().split("\n")):
            speaker, text = line.split(": ", 1)
            name = "example_user" if speaker == USER else "example_assistant"
            out.append((line if group else text, name))
    out.append((GROUP_START if group else "[Start a new Chat]", None))
    return out


def semistrict_system(lead: list[tuple[str, str | None]], char: str) -> str:
    """Semi-strict's one system message: the leading ones joined by blank lines, each example line
    with its speaker's name in front (once)."""
    speakers = {"example_user": USER, "example_assistant": char}
    parts = []
    for content, name in lead:
        prefix = f"{speakers[name]}: " if name else ""
        parts.append(content if not name or content.startswith(prefix) else prefix + content)
    return "\n\n".join(parts)


# ---------------------------------------------------------------- every file


def test_every_scenario_was_recorded_in_both_modes():
    expected = {f"{mode}-{scenario}.json" for mode in MODES for scenario in SCENARIOS}
    assert {p.name for p in DATA.glob("*.json")} == expected


@pytest.mark.parametrize("path", sorted(DATA.glob("*.json")), ids=lambda p: p.stem)
def test_body_is_a_chat_request_our_api_parses(path):
    from utils.api import ChatRequest

    record = json.loads(path.read_text(encoding="utf-8"))
    assert record["path"] == "/v1/chat/completions"
    assert record["status_today"] == 200, record.get("error_today")  # every one is served (issue 18)
    body = record["body"]
    assert not {"api_key", "key"} & body.keys()
    assert body["model"] == "孙悟空"  # the role picked from /v1/models, sent for every character
    assert body["stream"] is (not path.stem.endswith("-send"))  # the run streamed after its first send
    for message in body["messages"]:
        assert message["role"] in ("system", "user", "assistant")
        assert isinstance(message["content"], str) and message["content"]
        assert set(message) <= {"role", "content", "name"}
        if "name" in message:
            assert message["role"] == "system" and message["name"] in ("example_user", "example_assistant")
    request = ChatRequest.model_validate(body)
    assert [m.role for m in request.messages] == [m["role"] for m in body["messages"]]


# ---------------------------------------------------------------- Prompt Post-Processing "None"


@pytest.mark.parametrize("scenario", [s for s in SCENARIOS if not s.startswith("group")])
def test_none_card_chat_opens_with_the_cards_system_messages_then_the_greeting(scenario):
    msgs = messages(f"none-{scenario}")
    lead = leading_systems(msgs)
    assert [(m["content"], m.get("name")) for m in lead] == card_prompt("sunwukong", group=False)
    assert msgs[len(lead)] == {"role": "assistant", "content": CARDS["sunwukong"]["first_mes"]}


@pytest.mark.parametrize("stem", CARDS)
def test_none_group_prompts_each_member_with_its_own_card_and_the_nudge(stem):
    msgs = messages(f"none-group-{stem}")
    char = CARDS[stem]["name"]
    lead = leading_systems(msgs)
    assert [(m["content"], m.get("name")) for m in lead] == card_prompt(stem, group=True)
    # the greetings of all three, each "Name: " prefixed on an assistant turn, then the user's line
    greetings = [f"{c['name']}: {c['first_mes']}" for c in CARDS.values()]
    assert [m["content"] for m in msgs[len(lead):len(lead) + 3]] == greetings
    assert [m["role"] for m in msgs[len(lead):len(lead) + 4]] == ["assistant"] * 3 + ["user"]
    # then the replies of the members before this one, in the group's order, each "Name: " prefixed
    tail = msgs[len(lead) + 4:]
    before = [c["name"] for c in CARDS.values()][:list(CARDS).index(stem)]
    assert [(m["role"], m["content"].split(": ")[0]) for m in tail[:len(before)]] == [("assistant", n) for n in before]
    tail = tail[len(before):]
    assert tail[0] == {"role": "system", "content": f"[Write the next reply only as {char}.]"}
    # post_history_instructions ({{original}}: the preset's empty one) come last, as a system message
    post = CARDS[stem]["post_history_instructions"]
    assert [m["content"] for m in tail[1:]] == ([fill(post.replace("{{original}}", ""), char)] if post else [])


@pytest.mark.parametrize("scenario, last", [("continue", CONTINUE), ("impersonate", IMPERSONATE)])
def test_none_continue_and_impersonate_append_a_system_message(scenario, last):
    msgs = messages(f"none-{scenario}")
    assert msgs[-1] == {"role": "system", "content": last}
    assert msgs[-2]["role"] == "assistant"  # the reply Continue extends / Impersonate answers
    # recorded against the server with the prompt assembly, which folds it into the user turn (it
    # answered 400 before, issue 18)
    assert load(f"none-{scenario}")["status_today"] == 200


def test_none_authors_note_is_a_system_message_four_turns_deep():
    msgs = messages("none-authors-note")
    notes = [i for i, m in enumerate(msgs) if m == {"role": "system", "content": AUTHORS_NOTE}]
    assert len(notes) == 1 and len(msgs) - 1 - notes[0] == 4  # SillyTavern's default depth
    assert notes[0] > len(leading_systems(msgs))


# ---------------------------------------------------------------- Prompt Post-Processing "Semi-strict"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_semistrict_sends_one_system_message_then_alternating_turns(scenario):
    msgs = messages(f"semistrict-{scenario}")
    assert msgs[0]["role"] == "system" and all(m["role"] != "system" for m in msgs[1:])
    roles = [m["role"] for m in msgs[1:]]
    assert all(a != b for a, b in itertools.pairwise(roles)), roles
    assert all("name" not in m for m in msgs)
    stem = scenario.removeprefix("group-") if scenario.startswith("group") else "sunwukong"
    expected = semistrict_system(card_prompt(stem, scenario.startswith("group")), CARDS[stem]["name"])
    assert msgs[0]["content"] == expected


@pytest.mark.parametrize("scenario, folded", [
    ("continue", CONTINUE), ("impersonate", IMPERSONATE), ("group-libai", "[Write the next reply only as 李白.]")])
def test_semistrict_folds_the_later_system_message_into_the_last_user_turn(scenario, folded):
    msgs = messages(f"semistrict-{scenario}")
    assert msgs[-1]["role"] == "user" and msgs[-1]["content"].endswith(folded)


def test_semistrict_authors_note_lands_inside_a_user_turn():
    msgs = messages("semistrict-authors-note")
    holders = [m for m in msgs if AUTHORS_NOTE in m["content"]]
    assert len(holders) == 1 and holders[0]["role"] == "user" and holders[0]["content"] != AUTHORS_NOTE

"""Prompt assembly: any OpenAI message list as the messages of the model's one layout (a system text,
then user and assistant turns; baichuan/generation_utils.py lays those out as ids). One function,
`assemble`, for serving (utils/engine.py, behind the page and the API) and, through `system_text`,
for training prompts rendered the way a front end sends them (utils/prompts.py's sillytavern style).

Baichuan2's layout has one system text, before the conversation; front ends send more. What
becomes of each message, in order (SillyTavern's "Semi-strict" post-processing does the same,
src/prompt-converters.js mergeMessages, so a body sent with post-processing "None" and the same
body after "Semi-strict" assemble alike):

    leading system/developer messages   the system text, one paragraph each, joined by JOIN
    a later system message              a user turn (Author's Note, Continue/Impersonate nudges,
                                        post-history instructions), merged into its neighbour
    name "example_user"/"example_assistant"   "{user}: text" / "{char}: text" (SillyTavern's
                                        example dialogues), unless the text already starts so
    a user/assistant message with a name      "{name}: text" (a group chat's speakers)
    consecutive messages of one role    one turn, joined by JOIN (an empty one adds nothing)
    a trailing assistant message        a prefill: the reply continues its text
    a trailing empty assistant message  refused (it asks to continue nothing)

Names: SillyTavern does not send its user's and character's names with a request, but its
default Main Prompt says them ("Write X's next reply in a fictional chat between X and Y.");
`names_of` reads them from there, else the caller's (the role's name, DEFAULT_USER).

Group chats: SillyTavern prompts each member of a group with its own card, and marks the request
(`group_of`): "[Start a new group chat. Group members: A, B]" before the chat, and its nudge
"[Write the next reply only as B.]" after it, both its defaults. Every member's message arrives as
an assistant one, "A: text". `scene_of` turns such an assembled conversation back into a scene
(utils/scenes.py), so that the engine can serve the member from its own trained seat, and
`without_notes` takes out the notes the server places itself (the nudge, a card's own notes).

The steps are small functions over plain message dicts, so that more can join them (lorebook
entries, post-history notes, group scenes) without another copy of the layout.
"""

import re
from dataclasses import dataclass, field

from utils.scenes import GROUP_NUDGE

SYSTEM_ROLES = ("system", "developer")  # "developer" is the newer OpenAI name of the system message
JOIN = "\n\n"  # SillyTavern's join of squashed messages
DEFAULT_USER = "User"  # SillyTavern's default persona name
EXAMPLE_NAMES = ("example_user", "example_assistant")
# SillyTavern 1.19.0's default Main Prompt, once its macros are filled in
_MAIN_PROMPT = re.compile(r"Write (?P<char>.+?)'s next reply in a fictional chat between .+? and (?P<user>.+?)\.")
# and its group chat marker and nudge (with "Semi-strict" the nudge is folded into the last user turn);
# bounded, with no "[" inside, so that a scan of a long message stays linear
_GROUP_MEMBERS = re.compile(r"\[Start a new group chat\. Group members: (?P<members>[^\[\]\n]{1,4000})\]")
_NUDGE = re.compile(re.escape(GROUP_NUDGE).replace(re.escape("{char}"), r"(?P<char>[^\[\]\n]{1,200})"))
MAX_MEMBERS = 64  # a longer member list is no group the engine seats: the server's roles name the speakers


class AssemblyError(ValueError):
    """A message list that cannot be a prompt; `param` names the request field (messages[i]...)."""

    def __init__(self, message: str, param: str = "messages"):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Names:
    user: str = DEFAULT_USER
    char: str = ""


@dataclass
class Assembly:
    """What `assemble` makes of a message list: the client's system paragraphs (their join is
    `system`), the conversation as user/assistant turns, and whether its last turn is a prefill.
    `origin[i]` is the index, in the list given, of the last message merged into turn i."""

    system_parts: list[str]
    conversation: list[dict]
    origin: list[int] = field(default_factory=list)

    @property
    def system(self) -> str:
        return JOIN.join(self.system_parts)

    @property
    def prefill(self) -> bool:
        return bool(self.conversation) and self.conversation[-1]["role"] == "assistant"


def names_of(messages: list[dict], char: str = "", user: str = DEFAULT_USER) -> Names:
    """The user's and character's names for rendering examples: those the leading Main Prompt
    says (SillyTavern's default), else `char` and `user`."""
    for message in leading(messages):
        found = _MAIN_PROMPT.match(message["content"])
        if found:
            return Names(found["user"], found["char"])
    return Names(user, char)


def leading(messages: list[dict]) -> list[dict]:
    """The system messages before the conversation."""
    count = 0
    while count < len(messages) and messages[count]["role"] in SYSTEM_ROLES:
        count += 1
    return messages[:count]


def rendered(message: dict, names: Names) -> str:
    """A message's text with its speaker written out, as SillyTavern's mergeMessages writes it."""
    text, name = message["content"], message.get("name")
    if message["role"] in SYSTEM_ROLES:
        speaker = {"example_user": names.user, "example_assistant": names.char}.get(name)
    else:
        speaker = name
    if speaker and not text.startswith(f"{speaker}: "):
        return f"{speaker}: {text}"
    return text


def system_text(messages: list[dict], names: Names) -> str:
    """The system text that a list of leading system messages makes (its empty ones add nothing)."""
    return JOIN.join(text for text in (rendered(m, names) for m in messages) if text)


def assemble(messages: list[dict], names: Names) -> Assembly:
    """The prompt of `messages` (dicts with role, content as text, optionally name); the module
    docstring says what becomes of each. An AssemblyError names the message at fault."""
    head = leading(messages)
    parts = [text for text in (rendered(m, names) for m in head) if text]
    conversation, origin = [], []
    for index in range(len(head), len(messages)):
        message = messages[index]
        role = "user" if message["role"] in SYSTEM_ROLES else message["role"]
        text = rendered(message, names)
        if conversation and conversation[-1]["role"] == role:
            if text:
                previous = conversation[-1]["content"]
                conversation[-1]["content"] = previous + JOIN + text if previous else text
            origin[-1] = index
        else:
            conversation.append({"role": role, "content": text})
            origin.append(index)
    if not conversation:
        raise AssemblyError("messages: there is no user message to answer (only system messages)")
    if messages[-1]["role"] == "assistant" and not messages[-1]["content"].strip():
        last = len(messages) - 1
        raise AssemblyError(f"messages[{last}]: the conversation ends with an empty assistant message: there is "
                            f"nothing to continue (leave it out to get a new reply, or give it the text the reply "
                            f"should start with)", f"messages[{last}].content")
    return Assembly(parts, conversation, origin)


# ---------------------------------------------------------------- group chats


@dataclass(frozen=True)
class Group:
    """A group chat request: the member whose reply it asks for ("" when it does not say), and the
    members its marker lists (empty without the marker)."""

    active: str
    members: tuple[str, ...] = ()


def group_of(messages: list[dict]) -> Group | None:
    """The group chat that `messages` are a request of (the marker in the leading system messages,
    or a nudge in a later system message), None for a one-on-one chat. Its active member is the last
    nudge's, else the Main Prompt's. A nudge in a user message counts only beside the marker (where
    Semi-strict folded it): typed by a user into a one-on-one chat, it is the user's text."""
    head = leading(messages)
    marked = [found for m in head for found in _GROUP_MEMBERS.finditer(m["content"])]
    nudges = [found["char"].strip() for m in messages[len(head):]
              if m["role"] in SYSTEM_ROLES or (marked and m["role"] == "user")
              for found in _NUDGE.finditer(m["content"])]
    if not marked and not nudges:
        return None
    members = tuple(name.strip() for name in marked[-1]["members"].split(",") if name.strip()) if marked else ()
    return Group(nudges[-1] if nudges else names_of(messages).char, members if len(members) <= MAX_MEMBERS else ())


def _drop_run(paragraphs: list[str], note: list[str]) -> list[str]:
    """`paragraphs` less every run of them that is `note`'s paragraphs (blanks around each ignored)."""
    size, wanted, kept, index = len(note), [p.strip() for p in note], [], 0
    while index < len(paragraphs):
        if [p.strip() for p in paragraphs[index:index + size]] == wanted:
            index += size
        else:
            kept.append(paragraphs[index])
            index += 1
    return kept


def without_notes(conversation: list[dict], notes: list[str], drop_empty: bool) -> list[dict]:
    """`conversation` less the notes in its user turns (a later system message, folded in as one or
    more JOIN-separated paragraphs) that the server places itself. A user turn left empty is left
    out with `drop_empty` (a group's nudge, which the seat's group note stands for), else kept as it
    was (one-on-one: taking it out would make the assistant turn before it a prefill)."""
    out = []
    for turn in conversation:
        if turn["role"] != "user":
            out.append(turn)
            continue
        paragraphs = turn["content"].split(JOIN)
        for note in notes:
            paragraphs = _drop_run(paragraphs, note.split(JOIN))
        if paragraphs:
            out.append({**turn, "content": JOIN.join(paragraphs)})
        elif not drop_empty:
            out.append(turn)
    return out


def scene_of(conversation: list[dict], members) -> list[dict] | None:
    """The scene (utils/scenes.py) of a group chat's assembled conversation: each paragraph of an
    assistant turn that starts "Member: " is that member's message (the paragraphs after it, up to
    the next such one, are its own), each user turn an unnamed user message (the seat names it as
    the model was trained). None when an assistant turn does not start with a member's name: who
    spoke is not known. Linear in the conversation's length."""
    names = set(members)
    scene, parts = [], []  # parts: the paragraphs of the newest assistant message, joined once

    def close():
        if parts:
            scene[-1]["content"] = JOIN.join(parts)
            parts.clear()

    for turn in conversation:
        if turn["role"] == "user":
            close()
            scene.append({"role": "user", "content": turn["content"]})
            continue
        for index, paragraph in enumerate(turn["content"].split(JOIN)):
            speaker, colon, text = paragraph.partition(": ")
            if colon and speaker in names:
                close()
                scene.append({"role": "assistant", "name": speaker, "content": text})
                parts.append(text)
            elif index:
                parts.append(paragraph)
            else:
                return None
    close()
    return scene

"""The prompt contract: how a role becomes a system prompt, and the record a model carries of it.

A role is a name and a description (a roles file: a JSON object name -> description, as
data/roles.json and RoleBench's profiles-zh_desc.json; or a character card, utils.cards, whose
description, personality and scenario make the description). `build_system_prompt` puts them
into SYSTEM_TEMPLATE (or the template given to data_helper.py), and every training sample of the
role starts with that exact text. A role may have a greeting (a card's first_mes): the first
assistant turn of every chat with it.

What a model was trained on travels with it. `train.py` writes `roleplay.json` into every
checkpoint and `merge_params.py` copies it into the merged directory:

    {"format": 1,
     "system_template": "... {role} ... {description} ...",   # how new roles get their prompt
     "layout": LAYOUT,                                          # the chat layout, in words
     "user_token_id": 195, "assistant_token_id": 196,
     "chat_template": "...",                                    # the same layout as Jinja
     "roles": {"李白": {"system": "<the exact system prompt trained on>", "greeting": null}, ...},
                                               # (a card's: its "alternate_greetings" too, if any)
     "prompt_style": "project",                                 # how --roles_file roles get their prompt
     "user_name": "你",                    # who the user is in the rows ({{user}}, a scene's "Name: " lines)
     "contexts": {"阿绣": {<utils.lorebook.Context.to_json()>}}}  # lorebooks and notes, where trained with

A role's context (its lorebooks, depth note and post-history instructions) is applied on the live
conversation by the engine, with the same function that wrote the training rows (Context.apply).

`predict.py`, `web_demo.py` and `evaluate.py` read it back (`load_prompts`), so a model is served
with exactly the prompts it saw, and only the roles it was trained on. `--roles_file` overrides
the record; a directory without a record falls back to data/roles.json, and says so.
"""

import os
import sys
from dataclasses import dataclass, replace

from utils.assembly import DEFAULT_USER, Names, system_text
from utils.cards import USER_NAME, Card, card_description, read_roles_source, sillytavern_examples, substitute
from utils.cli import UserError, unsafe_character
from utils.files import read_json, write_json
from utils.lorebook import Context, Lorebook

SYSTEM_TEMPLATE = (
    "你现在要扮演{role}。以下是{role}的人物设定：{description}\n"
    "请始终以{role}的身份、性格和口吻说话，不要跳出角色，"
    "也绝不要透露自己是人工智能、语言模型或助手。"
    "回答要简洁、口语化，像平常聊天一样随意自然。"
)
# How a role's system prompt is written: the project's template, or as SillyTavern sends it
PROMPT_STYLES = ("project", "sillytavern")
# SillyTavern 1.19.0's default Chat Completion preset (public/scripts/openai.js): its Main Prompt
# ({{charIfNotGroup}} is the character outside group chats), and the markers it puts before each
# example dialogue and before the chat
SILLYTAVERN_MAIN_PROMPT = "Write {{char}}'s next reply in a fictional chat between {{char}} and {{user}}."
SILLYTAVERN_EXAMPLE_CHAT = "[Example Chat]"
SILLYTAVERN_NEW_CHAT = "[Start a new Chat]"
# The record names the layout; baichuan/generation_utils.py defines it (its docstring, in words)
LAYOUT = "Baichuan2-Chat, as baichuan/generation_utils.py lays it out (system, then <user> q <assistant> a per round)"
RECORD_FILE = "roleplay.json"
PROMPTS_FILE = "prompts.json"  # data_helper.py's side file of the template of its samples
RECORD_FORMAT = 1
# next to the scripts, so that they work from any directory
DEFAULT_ROLES_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "roles.json")


@dataclass(frozen=True)
class Role:
    name: str
    system: str
    greeting: str | None = None
    context: Context | None = None  # lorebooks and notes beyond the system prompt (utils.lorebook)
    alternates: tuple[str, ...] = ()  # a card's alternate_greetings, which the page offers

    def opening(self) -> list[dict]:
        """The chat this role starts with: its greeting as the first assistant turn, if it has one."""
        return [{"role": "assistant", "content": self.greeting}] if self.greeting else []

    def greetings(self) -> list[str]:
        """Every greeting the chat may open with: the greeting, then the alternates."""
        return [g for g in (self.greeting, *self.alternates) if g]


def check_template(template: str) -> str | None:
    """The problem with a system template, or None."""
    try:
        template.format(role="x", description="y")
    except (KeyError, IndexError, ValueError) as error:
        return f"not a valid template ({type(error).__name__}: {error})"
    missing = [field for field in ("{role}", "{description}") if field not in template]
    return f"missing the {' and '.join(missing)} placeholder" if missing else None


def build_system_prompt(role: str, description: str, template: str = SYSTEM_TEMPLATE) -> str:
    """The system prompt of one role."""
    return template.format(role=role, description=description.strip())


def default_user_name(style: str) -> str:
    """What {{user}} stands for by default: the project's second person, or SillyTavern's default persona."""
    return DEFAULT_USER if style == "sillytavern" else USER_NAME


def sillytavern_messages(name: str, description: str, personality: str = "", scenario: str = "",
                         mes_example: str = "", system_prompt: str = "", user_name: str = DEFAULT_USER) -> list[dict]:
    """The system messages SillyTavern 1.19.0's default Chat Completion preset sends before a chat
    with a character, in its order: the Main Prompt (a card's own system_prompt instead, its
    {{original}} the Main Prompt, as "Prefer Char. Prompt" does by default), the description,
    personality and scenario (the preset's formats are the bare fields), "[Example Chat]" and the
    examples of each example dialogue, then "[Start a new Chat]". Empty fields send nothing."""
    main = SILLYTAVERN_MAIN_PROMPT
    if system_prompt.strip():
        main = system_prompt.strip().replace("{{original}}", main)
    fields = [substitute(text, name, user_name) for text in (main, description, personality, scenario)]
    messages = [{"role": "system", "content": text} for text in fields if text]
    for block in sillytavern_examples(mes_example, name, user_name):
        messages += [{"role": "system", "content": SILLYTAVERN_EXAMPLE_CHAT}, *block]
    return [*messages, {"role": "system", "content": SILLYTAVERN_NEW_CHAT}]


def sillytavern_system(name: str, user_name: str = DEFAULT_USER, **fields) -> str:
    """The system text that utils.assembly makes of sillytavern_messages: what a model served with
    --client_system client (or under the client's own model id) gets from SillyTavern."""
    return system_text(sillytavern_messages(name, user_name=user_name, **fields), Names(user_name, name))


def name_problem(name: str) -> str | None:
    """What is wrong with a role name, or None. A name is printed in messages, in the page's role
    list and in the API's model list, so a control or bidi character in it could forge an `error:`
    line, clear the terminal or reverse the text around it."""
    if not name.strip():
        return "empty role name"
    char = unsafe_character(name)
    return f"role name {name!r} contains {char}, refused" if char else None


def check_roles(roles, path: str) -> dict[str, str]:
    """A roles file's value (a JSON object role name -> description), checked."""
    if not isinstance(roles, dict) or not roles:
        raise UserError(f"{path}: expected a non-empty JSON object of role name -> description")
    for name, description in roles.items():
        if name_problem(name):
            raise UserError(f"{path}: {name_problem(name)}")
        if not isinstance(description, str) or not description.strip():
            raise UserError(f"{path}: description of {name!r} must be a non-empty string")
    return roles


def roles_from_file(path: str, template: str = SYSTEM_TEMPLATE, card_system_prompt: bool = False,
                    user_name: str | None = None, style: str = "project") -> dict[str, Role]:
    """The roles of a roles file, of a character card (JSON or PNG, utils.cards) or of a folder of
    cards, their prompts in `style` (PROMPT_STYLES); a card's own system_prompt is used with
    `card_system_prompt` (always, in SillyTavern's style, as SillyTavern does), and its {{user}}
    becomes `user_name` (default: default_user_name(style))."""
    user_name = user_name or default_user_name(style)
    found, roles_file = read_roles_source(path)
    if found:
        return {card.name: replace(card_role(card, template, card_system_prompt, user_name, style),
                                   context=useful(card.context(user_name)))
                for card in found}
    if style == "sillytavern":
        return {name: Role(name, sillytavern_system(name, user_name, description=description.strip()))
                for name, description in check_roles(roles_file, path).items()}
    return {name: Role(name, build_system_prompt(name, description, template))
            for name, description in check_roles(roles_file, path).items()}


def card_role(card: Card, template: str = SYSTEM_TEMPLATE, card_system_prompt: bool = False,
              user_name: str = USER_NAME, style: str = "project") -> Role:
    """The role a card plays (utils.cards' docstring says how): its system prompt and greeting."""
    greeting = substitute(card.first_mes, card.name, user_name) or None
    alternates = tuple(text for text in (substitute(g, card.name, user_name) for g in card.alternate_greetings) if text)
    if style == "sillytavern":
        system = sillytavern_system(card.name, user_name, description=card.description, personality=card.personality,
                                    scenario=card.scenario, mes_example=card.mes_example,
                                    system_prompt=card.system_prompt)
        return Role(card.name, system, greeting, alternates=alternates)
    description = card_description(card, user_name)
    built = build_system_prompt(card.name, description, template) if description else ""
    system = built
    if card_system_prompt and card.system_prompt.strip():
        system = substitute(card.system_prompt.replace("{{original}}", built), card.name, user_name)
    if not system:
        raise UserError(f"{card.path}: the card has no description, personality or scenario to build "
                        f"{card.name}'s system prompt from")
    return Role(card.name, system, greeting, alternates=alternates)


# ---------------------------------------------------------------- the record a model carries


def useful(context: Context) -> Context | None:
    """The context, or None when it adds nothing to the prompt."""
    return context if context.by_conversation or context.extra_system else None


def make_record(roles: dict[str, Role], template: str, user_id: int, assistant_id: int, chat_template: str,
                prompt_style: str = "project", contexts: dict | None = None, alternates: dict | None = None,
                user_name: str | None = None) -> dict:
    """The record; `contexts` (name -> Context.to_json()), `alternates` (name -> a card's alternate
    greetings) and `user_name` (None: the prompt style's default) as data_helper.py's prompts.json
    has them."""
    alternates = alternates or {}
    return {
        "format": RECORD_FORMAT,
        "system_template": template,
        "layout": LAYOUT,
        "user_token_id": user_id,
        "assistant_token_id": assistant_id,
        "chat_template": chat_template,
        "roles": {name: {"system": role.system, "greeting": role.greeting,
                         **({"alternate_greetings": alternates[name]} if alternates.get(name) else {})}
                  for name, role in roles.items()},
        "prompt_style": prompt_style,
        "user_name": user_name or default_user_name(prompt_style),
        "contexts": {name: context for name, context in (contexts or {}).items() if name in roles},
    }


def write_record(directory: str, record: dict) -> None:
    write_json(os.path.join(directory, RECORD_FILE), record)


def read_record(directory: str) -> dict | None:
    """The prompt record of a model or checkpoint directory, None when it has none."""
    path = os.path.join(directory, RECORD_FILE)
    if not os.path.isfile(path):
        return None
    record = read_json(path, "prompt record")
    roles = record.get("roles") if isinstance(record, dict) else None
    if not isinstance(roles, dict) or not roles or record.get("format") != RECORD_FORMAT:
        raise UserError(f"{path}: not a prompt record of format {RECORD_FORMAT} with at least one role")
    for name, role in roles.items():
        if name_problem(name):
            raise UserError(f"{path}: {name_problem(name)}")
        if not isinstance(role, dict) or not isinstance(role.get("system"), str):
            raise UserError(f"{path}: role {name!r} has no system prompt")
        greetings = role.get("alternate_greetings", [])
        if not isinstance(greetings, list) or not all(isinstance(g, str) for g in greetings):
            raise UserError(f"{path}: role {name!r}: alternate_greetings must be a list of strings")
    if record.get("prompt_style", "project") not in PROMPT_STYLES:
        raise UserError(f"{path}: prompt_style must be one of {', '.join(PROMPT_STYLES)}, got "
                        f"{record['prompt_style']!r}")
    user_name = record.get("user_name", "")
    if not isinstance(user_name, str) or (user_name and name_problem(user_name)):
        raise UserError(f"{path}: user_name must be a name, got {user_name!r}")
    contexts = record.get("contexts", {})
    if not isinstance(contexts, dict) or not all(isinstance(c, dict) for c in contexts.values()):
        raise UserError(f"{path}: contexts must be an object of role name -> prompt context")
    for name, value in contexts.items():  # checked as a lorebook file is, before any model loads
        Context.from_json(value, f"{path}: contexts[{name!r}]")
    return record


def record_roles(record: dict) -> dict[str, Role]:
    """The roles of a record read by read_record, each with its prompt context."""
    contexts = record.get("contexts", {})
    return {name: Role(name, role["system"], role.get("greeting"),
                       Context.from_json(contexts[name], f"{RECORD_FILE}: contexts[{name!r}]")
                       if name in contexts else None, tuple(role.get("alternate_greetings", [])))
            for name, role in record["roles"].items()}


def with_books(roles: dict[str, Role], books: tuple[Lorebook, ...], user_name: str) -> dict[str, Role]:
    """The roles with the lorebooks `books` (--lorebook files) after each role's own, as
    data_helper.py --lorebook adds them to every character."""
    if not books:
        return roles
    return {name: replace(role, context=replace(role.context, books=role.context.books + books) if role.context
                          else Context(name, user_name, books))
            for name, role in roles.items()}


@dataclass(frozen=True)
class Prompts:
    """The roles a front end offers, and who the user is in their prompts (ChatEngine's user_name)."""

    roles: dict[str, Role]
    user_name: str = USER_NAME


def load_prompts(model_path: str, adapter_path: str | None = None, roles_file: str | None = None,
                 card_system_prompt: bool = False, lorebooks: list[str] | None = None) -> Prompts:
    """The roles to serve a model with: `roles_file` (a roles file, a card or a folder of cards, a
    card with its own lorebook and notes) when given, its prompts built with the model's own
    template and prompt style; else the model's record (the adapter's first), with the contexts it
    trained with; else data/roles.json with a note. `lorebooks` (World Info files) go to every role."""
    from utils.lorebook import read_lorebook

    books = tuple(read_lorebook(path) for path in lorebooks or [])
    record = None
    for directory in (adapter_path, model_path):
        if directory and os.path.isdir(directory):
            record = read_record(directory)
            if record is not None:
                break
    template = record["system_template"] if record and record.get("system_template") else SYSTEM_TEMPLATE
    style = record.get("prompt_style", "project") if record else "project"
    # a record from before user_name was recorded: its style's default, which data_helper.py used then
    user_name = (record.get("user_name") if record else None) or default_user_name(style)
    if roles_file is not None:
        roles = roles_from_file(roles_file, template, card_system_prompt, user_name, style)
        return Prompts(with_books(roles, books, user_name), user_name)
    if record is not None:
        return Prompts(with_books(record_roles(record), books, user_name), user_name)
    print(f"note: {adapter_path or model_path} carries no {RECORD_FILE} (a base model, or one trained before "
          f"prompt records): using the roles of {os.path.relpath(DEFAULT_ROLES_FILE)}", file=sys.stderr)
    return Prompts(with_books(roles_from_file(DEFAULT_ROLES_FILE), books, user_name), user_name)


def check_role(roles: dict[str, Role], name) -> Role:
    if not isinstance(name, str) or name not in roles:
        raise UserError(f"unknown role {name!r}; choose one of: {', '.join(roles)}")
    return roles[name]

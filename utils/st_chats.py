"""SillyTavern chat logs (its chats/*.jsonl files) as conversations to train on.

A log's first line is its metadata ({"user_name", "character_name", "chat_metadata", ...}); every
other line a message: {"name", "is_user", "is_system", "mes", "send_date", "swipes", "swipe_id",
"extra"}. One-on-one and group logs have the same shape; a log whose characters' messages carry
more than one name is a group scene (utils.scenes).

What a message becomes:
    the shown text (`mes`, which is swipes[swipe_id]) is the message; the other non-empty swipes of
        a character's message are kept beside it as "swipes_rejected" (for preference training);
    {{user}} becomes `user_name`, {{char}} the character (in a group log, the speaker), and the
        user's persona name (the metadata's user_name and the name on the user's messages) becomes
        `user_name` in every text, so that a model learns to address the user as it is served;
    the character's messages before the user's first are its greeting(s): kept as context,
        "train": false (ST wrote them from the card, the model did not);
    consecutive messages of one speaker are one turn (joined by a line break).
Dropped, and counted by reason: hidden and system messages (is_system: ST leaves them out of the
prompt), narrator and comment messages (extra.type, from /sys and /comment: they are not a
character's lines, and our layout has no place for a mid-chat system note), empty ones.

A problem is a UserError naming the file and line.
"""

import os
from collections import Counter

from utils.cli import UserError
from utils.files import MAX_LINE_BYTES

LOG_SUFFIX = ".jsonl"


def log_files(path: str) -> list[str]:
    """A log file, or the .jsonl files of a folder and its subfolders (ST keeps one folder per
    character), in name order."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise UserError(f"{path}: chat log not found")
    files = sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names
                   if name.endswith(LOG_SUFFIX) and not name.startswith("."))
    if not files:
        raise UserError(f"{path}: a folder without SillyTavern chat logs (no .jsonl file)")
    return files


def _replace_names(text: str, char: str, persona: set[str], user_name: str) -> str:
    text = text.replace("{{char}}", char).replace("{{user}}", user_name)
    for name in persona:
        text = text.replace(name, user_name)
    return text


def _message(value, where: str):
    """(name, is_user, text, swipes, swipe_id, reason to drop or None) of a message line, checked."""
    if not isinstance(value, dict):
        raise ValueError(f"{where}: a message must be a JSON object")
    name, mes = value.get("name"), value.get("mes")
    if not isinstance(mes, str):
        raise ValueError(f"{where}: field 'mes' must be a string")
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{where}: field 'name' must be a non-empty string")
    for flag in ("is_user", "is_system"):
        if not isinstance(value.get(flag, False), bool):
            raise ValueError(f"{where}: field {flag!r} must be true or false")
    extra = value.get("extra") or {}
    if not isinstance(extra, dict):
        raise ValueError(f"{where}: field 'extra' must be an object")
    swipes, swipe_id = value.get("swipes"), value.get("swipe_id", 0)
    if swipes is not None:
        if not isinstance(swipes, list) or not all(isinstance(s, str) for s in swipes):
            raise ValueError(f"{where}: field 'swipes' must be a list of strings")
        if isinstance(swipe_id, bool) or not isinstance(swipe_id, int) or not 0 <= swipe_id < max(len(swipes), 1):
            raise ValueError(f"{where}: field 'swipe_id' must index 'swipes' (0 to {len(swipes) - 1}), "
                             f"got {swipe_id!r}")
    reason = None
    if value.get("is_system"):
        reason = "hidden or system"
    elif extra.get("type") in ("narrator", "comment"):
        reason = extra["type"]
    elif not mes.strip():
        reason = "empty"
    return name.strip(), bool(value.get("is_user")), mes, swipes or [], swipe_id, reason


def read_log(path: str, user_name: str, dropped: Counter, max_line_bytes: int = MAX_LINE_BYTES) -> list[dict]:
    """The conversation of one log (module docstring): user messages and named assistant messages;
    what was left out is counted in `dropped` by reason."""
    from utils.files import read_jsonl

    messages, persona, seen_user = [], set(), False
    lines = iter(read_jsonl(path, max_line_bytes))
    first = next(lines, None)
    if first is None:
        raise UserError(f"{path}: an empty chat log")
    line_no, meta = first
    if not isinstance(meta, dict) or not ("chat_metadata" in meta or "user_name" in meta):
        raise UserError(f"{path}:{line_no}: not a SillyTavern chat log (its first line has no user_name or "
                        f"chat_metadata)")
    if isinstance(meta.get("user_name"), str) and meta["user_name"].strip():
        persona.add(meta["user_name"].strip())
    raw = []
    for line_no, value in lines:
        try:
            name, is_user, text, swipes, swipe_id, reason = _message(value, f"{path}:{line_no}")
        except ValueError as error:
            raise UserError(str(error)) from None
        if reason:
            dropped[reason] += 1
            continue
        if is_user:
            persona.add(name)
        raw.append((name, is_user, text, swipes, swipe_id))
    persona = {p for p in persona if p != user_name}
    characters = list(dict.fromkeys(name for name, is_user, *_ in raw if not is_user))
    for name, is_user, text, swipes, swipe_id in raw:
        # in the user's message {{char}} is the chat's character (a group's: left as it is)
        char = (characters[0] if len(characters) == 1 else "{{char}}") if is_user else name
        content = _replace_names(text, char, persona, user_name).strip()
        if is_user:
            seen_user = True
            if messages and messages[-1]["role"] == "user":
                messages[-1]["content"] += "\n" + content
            else:
                messages.append({"role": "user", "content": content})
            continue
        rejected = [_replace_names(s, name, persona, user_name).strip() for i, s in enumerate(swipes) if i != swipe_id]
        rejected = list(dict.fromkeys(s for s in rejected if s and s != content))
        if messages and messages[-1]["role"] == "assistant" and messages[-1]["name"] == name:
            messages[-1]["content"] += "\n" + content
            continue
        message = {"role": "assistant", "name": name, "content": content}
        if not seen_user:
            message["train"] = False
        if rejected:
            message["swipes_rejected"] = rejected
        messages.append(message)
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{path}: a chat log without a character's message")
    return messages

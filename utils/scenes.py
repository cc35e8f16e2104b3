"""Group scenes: one conversation with several characters, trained from each character's own seat
as SillyTavern prompts a group chat, and the speaker-bleed metric.

A scene is a list of user and assistant messages; every assistant message has a "name" (the
character speaking), a user message may have one (several users). A character's seat of it:
    its system prompt, plus GROUP_NUDGE (SillyTavern's default group nudge, "[Write the next reply
        only as {{char}}.]") at its end: ST sends the nudge after the history, but our layout
        trains every reply of a row with one prompt, so it goes where each reply sees it;
    everyone else's messages (the user's and the other characters') user-side, one line each,
        "Name: text", those in a row joined into one user turn ({{char}} in them: this character);
    its own messages as the assistant's replies, each trained on (unless marked "train": false).
Serving a group builds the same seat for the character whose turn it is (`seat`, then the
character's Context.apply), so the prompt is the one trained on.
"""

GROUP_NUDGE = "[Write the next reply only as {char}.]"


def group_note(name: str) -> str:
    return GROUP_NUDGE.format(char=name)


def is_scene(messages: list[dict]) -> bool:
    """Whether a conversation is a group scene: its assistant turns carry several names."""
    return len({m.get("name") for m in messages if m["role"] == "assistant"}) > 1


def speakers(scene: list[dict]) -> list[str]:
    """The characters of a scene, in the order they first speak."""
    return list(dict.fromkeys(m["name"] for m in scene if m["role"] == "assistant"))


def seat(scene: list[dict], name: str, user_name: str) -> list[dict]:
    """The scene as `name` sees it (module docstring), without the system prompt."""
    turns = []
    for message in scene:
        own = message["role"] == "assistant" and message["name"] == name
        if own:
            turn = {"role": "assistant", "content": message["content"]}
            for key in ("train", "swipes_rejected"):
                if key in message:
                    turn[key] = message[key]
            if turns and turns[-1]["role"] == "assistant":  # two messages of its own in a row: one turn
                turns[-1] = {**turns[-1], "content": turns[-1]["content"] + "\n" + turn["content"]}
            else:
                turns.append(turn)
            continue
        speaker = message.get("name") or (user_name if message["role"] == "user" else "")
        text = message["content"].replace("{{char}}", name)  # as ST fills it in for the one whose turn it is
        line = f"{speaker}: {text}" if speaker else text
        if turns and turns[-1]["role"] == "user":
            turns[-1] = {"role": "user", "content": turns[-1]["content"] + "\n" + line}
        else:
            turns.append({"role": "user", "content": line})
    return turns


def speaker_bleed(reply: str, other_names) -> bool:
    """Whether `reply` writes someone else's lines: a line that starts with another speaker's name
    and a colon (":" or the full-width "：")."""
    for line in reply.splitlines():
        line = line.lstrip()
        for name in other_names:
            if name and line.startswith(name) and line[len(name):].lstrip()[:1] in (":", "："):
                return True
    return False

"""Preference pairs made from data_helper.py's training samples, as rows that utils/pairs.py reads.

Two sources, each giving rows of the sample's own shape without its reply, plus "chosen" and
"rejected" (and the sample's "role", "greeting", "base_system" and "lore"):
    swipe_pairs       a SillyTavern reply's other swipes (utils.st_chats keeps them on the message as
                      "swipes_rejected"), each rejected against the swipe that was kept. The prompt is
                      the one the sample trains that reply on: the sample's system prompt, with its
                      lore and notes, and its messages before the reply (a group log's from the
                      character's seat, as utils.scenes wrote the sample).
    OutOfCharacter    the reply that a model gives to a sample's history without the character's
                      system prompt, as a generic assistant would, rejected against the sample's own
                      last reply (generated_pairs). A reply that is empty or the sample's own is no
                      pair: it is counted instead.

Nothing heavy is imported here: the model comes in through utils.engine.ChatEngine.
"""

from collections import Counter

from utils.prompts import Role

# what a sample carries beside its conversation that a pair keeps (utils.data reads the first
# two; the lore record and base prompt tell where the prompt came from, as in the samples)
SAMPLE_FIELDS = ("role", "greeting", "base_system", "lore")
# a role with no system prompt: the model answers as whatever it is without a character
NO_CHARACTER = Role("assistant", "")


def _prompt_message(message: dict) -> dict:
    """A sample's message as a pair's prompt holds it: without the training marks ("train",
    "swipes_rejected"), which mean nothing before the reply."""
    return {key: message[key] for key in ("role", "content", "name") if key in message}


def _fields(sample: dict) -> dict:
    return {key: sample[key] for key in SAMPLE_FIELDS if key in sample}


def swipe_pairs(sample: dict) -> list[dict]:
    """One pair per rejected swipe of each trained reply of a conversation sample, in order."""
    messages = sample.get("messages", [])
    pairs = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or not message.get("train", True):
            continue
        prompt = [_prompt_message(m) for m in messages[:i]]
        pairs += [{"messages": prompt, "chosen": message["content"], "rejected": rejected, **_fields(sample)}
                  for rejected in message.get("swipes_rejected", ())]
    return pairs


def split_sample(sample: dict) -> tuple[dict, str, list[dict]]:
    """(a pair's prompt fields, the sample's reply, the history before that reply without the system
    prompt) of a sample: a RoleBench row ({"instruction", "input", "output"}) or a conversation."""
    if "messages" in sample:
        *before, reply = sample["messages"]
        prompt = [_prompt_message(m) for m in before]
        history = [{"role": m["role"], "content": m["content"]} for m in prompt if m["role"] != "system"]
        return {"messages": prompt, **_fields(sample)}, reply["content"], history
    prompt = {key: value for key, value in sample.items() if key != "output"}
    return prompt, sample["output"], [{"role": "user", "content": sample["input"]}]


class OutOfCharacter:
    """A model's replies as a generic assistant: the history with no system prompt, through the
    chat engine (its newest rounds that fit, as served), with the given sampling."""

    def __init__(self, engine, sampling):
        self.engine, self.sampling = engine, sampling

    def __call__(self, history: list[dict]) -> str:
        messages = self.engine.prompt(NO_CHARACTER, history)
        reply = ""
        # clamp: a long history's reply is cut to the room left, not refused (one sample must not
        # stop the whole run)
        for reply in self.engine.start_reply(messages, self.sampling, clamp=True):
            pass
        return reply


def generated_pairs(samples: list[dict], reply_of, skipped: Counter, notes: dict | None = None) -> list[dict]:
    """A pair per sample, its reply chosen and `reply_of(history)` rejected; a generated reply that
    is empty or the sample's own is counted in `skipped` by reason instead. `notes` (role -> texts)
    are taken out of the history first: a character's own notes that the row's turns hold."""
    from utils.assembly import without_notes

    pairs = []
    for sample in samples:
        prompt, chosen, history = split_sample(sample)
        history = without_notes(history, (notes or {}).get(sample["role"], []), drop_empty=False)
        rejected = reply_of(history)
        if not rejected.strip():
            skipped["empty"] += 1
        elif rejected.strip() == chosen.strip():
            skipped["the same as the chosen reply"] += 1
        else:
            pairs.append({**prompt, "chosen": chosen, "rejected": rejected})
    return pairs

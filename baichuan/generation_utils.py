"""Chat prompts in the Baichuan2-Chat layout, and a streaming reply helper.

Layout of one prompt, as token ids:

    system text
    <user> question 1 <assistant> reply 1
    ...
    <user> question n <assistant>            <- the model writes reply n from here

`<user>` and `<assistant>` are single tokens whose ids come from the model's generation config
(`user_token_id` / `assistant_token_id`: 195 and 196 for Baichuan2).
"""

from collections.abc import Iterator
from threading import Thread

import torch
from transformers import GenerationConfig, TextIteratorStreamer


def chat_token_ids(generation_config: GenerationConfig) -> tuple[int, int]:
    user = getattr(generation_config, "user_token_id", None)
    assistant = getattr(generation_config, "assistant_token_id", None)
    if user is None or assistant is None:
        raise ValueError("the generation config has no user_token_id / assistant_token_id: not a Baichuan2 chat model")
    return user, assistant


def _split_rounds(messages: list[dict]) -> tuple[str, list[list[dict]]]:
    """System text, and the conversation cut into rounds that each start with a user turn."""
    system, rounds = "", []
    for i, message in enumerate(messages):
        role = message["role"]
        if role == "system":
            if i != 0:
                raise ValueError("a system message may only come first")
            system = message["content"]
        elif role not in ("user", "assistant"):
            raise ValueError(f"unknown message role {role!r}")
        elif role == "user" or not rounds:
            rounds.append([message])
        else:
            rounds[-1].append(message)
    return system, rounds


def build_chat_input(
    tokenizer,
    messages: list[dict],
    generation_config: GenerationConfig,
    model_max_length: int,
    max_new_tokens: int,
) -> list[int]:
    """Prompt ids for `messages` (dicts with `role` and `content`).

    The system text is always kept. Of the rounds, the newest whole ones that fit in
    `model_max_length - max_new_tokens` are kept; if even the newest round alone is too long,
    its oldest tokens are cut so that the question's end and the assistant token remain.
    """
    user_id, assistant_id = chat_token_ids(generation_config)
    system, rounds = _split_rounds(messages)
    system_ids = tokenizer.encode(system, add_special_tokens=False) if system else []
    budget = model_max_length - max_new_tokens - len(system_ids)
    if budget <= 1:
        raise ValueError(
            f"the system prompt ({len(system_ids)} tokens) leaves no room in model_max_length={model_max_length} "
            f"with max_new_tokens={max_new_tokens}"
        )
    # The assistant token that opens the reply counts against the budget too, or the oldest
    # kept round would lose its first tokens to the final cut.
    closing = [assistant_id] if not messages or messages[-1]["role"] != "assistant" else []
    history: list[int] = []
    for round_messages in reversed(rounds):
        round_ids = []
        for message in round_messages:
            round_ids.append(user_id if message["role"] == "user" else assistant_id)
            round_ids.extend(tokenizer.encode(message["content"], add_special_tokens=False))
        if history and len(history) + len(round_ids) + len(closing) > budget:
            break
        history = round_ids + history
    history += closing
    return system_ids + history[-budget:]


def chat_template(tokenizer, generation_config: GenerationConfig) -> str:
    """A Jinja chat template giving the same ids as `build_chat_input` (without truncation).

    The assistant token closes a prompt that ends with a user turn even without
    `add_generation_prompt`, as `build_chat_input` does.
    """
    user_id, assistant_id = chat_token_ids(generation_config)
    user, assistant = tokenizer.convert_ids_to_tokens([user_id, assistant_id])
    return (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] }}"
        f"{{% elif message['role'] == 'user' %}}{{{{ '{user}' + message['content'] }}}}"
        f"{{% else %}}{{{{ '{assistant}' + message['content'] }}}}"
        "{% endif %}{% endfor %}"
        f"{{% if messages and messages[-1]['role'] != 'assistant' %}}{{{{ '{assistant}' }}}}{{% endif %}}"
    )


def stream_chat(
    model,
    tokenizer,
    messages: list[dict],
    max_new_tokens: int | None = None,
    timeout: float | None = None,
    **generate_kwargs,
) -> Iterator[str]:
    """Yield the reply to `messages` as it grows, one decoded piece at a time.

    Generation runs in a thread; an error there is raised here once the stream stops.
    `generate_kwargs` (temperature, top_p, do_sample, ...) override the generation config.
    """
    generation_config = model.generation_config
    max_new_tokens = max_new_tokens or generation_config.max_new_tokens
    ids = build_chat_input(tokenizer, messages, generation_config, model.config.model_max_length, max_new_tokens)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=timeout)
    failure: list[BaseException] = []

    def generate():
        try:
            model.generate(
                inputs=torch.tensor([ids], device=model.device),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=model.device),
                streamer=streamer,
                max_new_tokens=max_new_tokens,
                **generate_kwargs,
            )
        except BaseException as error:  # noqa: BLE001 - handed to the consumer thread
            failure.append(error)
            streamer.end()

    thread = Thread(target=generate, daemon=True)
    thread.start()
    reply = ""
    for piece in streamer:
        if piece:  # the streamer ends with an empty flush: do not repeat the last reply
            reply += piece
            yield reply
    thread.join()
    if failure:
        raise failure[0]

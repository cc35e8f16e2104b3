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
from threading import Event, Thread

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer


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


class _CountingStreamer(TextIteratorStreamer):
    """A text streamer that also keeps the generated ids (the first `put` is the prompt)."""

    def __init__(self, tokenizer, **kwargs):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True, **kwargs)
        self.generated: list[int] = []
        self._prompt_seen = False

    def put(self, value):
        if self._prompt_seen:
            self.generated.extend(value.reshape(-1).tolist())
        self._prompt_seen = True
        super().put(value)


class _StopOnEvent(StoppingCriteria):
    """Ends generation at the next token once `event` is set (Stop, Clear, a closed request)."""

    def __init__(self, event: Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class ChatStream:
    """The reply to `messages`, generated in a thread: iterating yields the whole reply so far,
    each time it grows. Generation stops early when `stop` is set; an error in the thread is raised
    here once the stream ends. After the stream, `prompt_tokens`, `completion_tokens` and
    `finish_reason` ("stop": eos, or stopped by `stop`; "length": max_new_tokens reached) are set.
    A `seed` is set on torch's global generator as generation starts, which makes the reply
    reproducible when one reply is generated at a time. `generate_kwargs` (temperature, top_p, do_sample, ...) override the generation config.
    """

    def __init__(self, model, tokenizer, messages: list[dict], max_new_tokens: int | None = None,
                 stop: Event | None = None, timeout: float | None = None, seed: int | None = None,
                 **generate_kwargs):
        generation_config = model.generation_config
        self.max_new_tokens = max_new_tokens or generation_config.max_new_tokens
        self.ids = build_chat_input(tokenizer, messages, generation_config, model.config.model_max_length,
                                    self.max_new_tokens)
        self.prompt_tokens = len(self.ids)
        self.stop = stop if stop is not None else Event()
        self.completion_tokens = 0
        self.finish_reason = None
        self._seed = seed
        self._model, self._streamer = model, _CountingStreamer(tokenizer, timeout=timeout)
        criteria = StoppingCriteriaList([*generate_kwargs.pop("stopping_criteria", []), _StopOnEvent(self.stop)])
        self._generate_kwargs = {**generate_kwargs, "stopping_criteria": criteria}
        eos = generation_config.eos_token_id
        self._eos = set(eos if isinstance(eos, list) else [eos if eos is not None else tokenizer.eos_token_id])

    def _generate(self, failure: list):
        device = self._model.device
        try:
            if self._seed is not None:
                torch.manual_seed(self._seed)
            self._model.generate(
                inputs=torch.tensor([self.ids], device=device),
                attention_mask=torch.ones(1, len(self.ids), dtype=torch.long, device=device),
                streamer=self._streamer,
                max_new_tokens=self.max_new_tokens,
                **self._generate_kwargs,
            )
        except BaseException as error:  # noqa: BLE001 - handed to the consumer thread
            failure.append(error)
            self._streamer.end()

    def __iter__(self) -> Iterator[str]:
        failure: list[BaseException] = []
        thread = Thread(target=self._generate, args=(failure,), daemon=True)
        thread.start()
        reply = ""
        try:
            for piece in self._streamer:
                if piece:  # the streamer ends with an empty flush: do not repeat the last reply
                    reply += piece
                    yield reply
        except BaseException:  # the consumer went away (a closed request): do not leave the model generating
            self.stop.set()
            thread.join()
            raise
        thread.join()
        if failure:
            raise failure[0]
        generated = self._streamer.generated
        self.completion_tokens = len(generated)
        ended = bool(generated) and generated[-1] in self._eos
        self.completion_tokens -= ended  # the eos is not part of the reply
        self.finish_reason = "stop" if ended or self.stop.is_set() or len(generated) < self.max_new_tokens \
            else "length"


def stream_chat(model, tokenizer, messages: list[dict], max_new_tokens: int | None = None, timeout: float | None = None,
                **generate_kwargs) -> ChatStream:
    """The reply to `messages` as it grows (a ChatStream), like the official `model.chat(stream=True)`."""
    return ChatStream(model, tokenizer, messages, max_new_tokens, timeout=timeout, **generate_kwargs)

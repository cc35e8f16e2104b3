"""The Baichuan2-Chat layout, in one place: a conversation as token ids for serving
(build_chat_input), for training with its labels (encode_conversation) and for scoring a reply
(encode_reply), and as a Jinja chat template (chat_template); and a streaming reply (ChatStream).

Layout of one prompt, as token ids:

    system text
    <user> question 1 <assistant> reply 1
    ...
    <user> question n <assistant>            <- the model writes reply n from here

`<user>` and `<assistant>` are single tokens whose ids come from the model's generation config
(`user_token_id` / `assistant_token_id`: 195 and 196 for Baichuan2). A round starts at a user
message; a first round may start with the assistant's (a role's greeting). History rounds carry
no eos; the reply being written ends with eos.

Message text is only text (encode_text): a `</s>` or `<reserved_107>` typed by a user, written
in a card or a training row is spelled in ordinary pieces, so only this module writes chat tokens.

Training labels each reply as Baichuan2's own fine-tune script does: the reply's tokens and its
end, which is the eos after the last reply and, for a reply in the history, eos as the label of
the <user> token that follows it (the input there stays <user>, so the ids are build_chat_input's).
Everything else is labelled -100, and so is an assistant message marked `"train": false` (a
greeting, or a turn kept as context only), with its end.

Too long a conversation keeps its system text and, of the rounds, the newest whole ones that fit
(newest_whole_rounds); the newest round alone too long is cut (build_chat_input: its oldest
tokens; encode_conversation: its last reply's end).

A reply's sampling (ChatStream) goes through transformers' logits processors; two that OpenAI's
API defines and transformers lacks are here (OpenAIPenalties, and the log-probabilities that
LogprobCapture records).
"""

import re
from collections.abc import Iterator, Sequence
from threading import Event, Thread

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)


def chat_token_ids(generation_config: GenerationConfig) -> tuple[int, int]:
    user = getattr(generation_config, "user_token_id", None)
    assistant = getattr(generation_config, "assistant_token_id", None)
    if user is None or assistant is None:
        raise ValueError("the generation config has no user_token_id / assistant_token_id: not a Baichuan2 chat model")
    return user, assistant


def encode_text(tokenizer, text: str) -> list[int]:
    """Ids of message text (a user's, a card's, a training row's) as plain text: special-token
    strings in it are spelled in ordinary pieces (transformers' split_special_tokens, which
    BaichuanTokenizer extends to its reserved pieces), never read as eos or a chat token."""
    return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)


def split_rounds(messages: list[dict]) -> tuple[str, list[list[dict]]]:
    """System text, and the conversation cut into rounds that each start with a user turn (a
    first round may start with the assistant's)."""
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


def newest_whole_rounds(sizes: Sequence[int], budget: int) -> int:
    """How many of the newest rounds to keep (`sizes` oldest first, in any unit): as many whole
    ones as fit in `budget` together, and always the newest, which the caller cuts if it alone is
    over. Linear in the number of rounds."""
    return _keep_newest(reversed(sizes), budget)


def _keep_newest(sizes_newest_first, budget: int) -> int:
    # reads sizes only until the first round that does not fit: build_chat_input tokenises lazily
    used, kept = 0, 0
    for size in sizes_newest_first:
        if kept and used + size > budget:
            break
        used, kept = used + size, kept + 1
    return kept


def _encode_rounds(tokenizer, messages: list[dict], user_id: int, assistant_id: int):
    """Ids of the system text, and per round [speaker token id, text ids] per message."""
    system, rounds = split_rounds(messages)
    encoded = [_encode_round(tokenizer, round_messages, user_id, assistant_id) for round_messages in rounds]
    return encode_text(tokenizer, system) if system else [], encoded


def _encode_round(tokenizer, round_messages: list[dict], user_id: int, assistant_id: int):
    """[speaker token id, text ids] per message of one round."""
    speaker = {"user": user_id, "assistant": assistant_id}
    return [[speaker[m["role"]], encode_text(tokenizer, m["content"])] for m in round_messages]


def _size(round_ids) -> int:
    return sum(1 + len(ids) for _, ids in round_ids)


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
    system, rounds = split_rounds(messages)
    system_ids = encode_text(tokenizer, system) if system else []
    budget = model_max_length - max_new_tokens - len(system_ids)
    if budget <= 1:
        raise ValueError(
            f"the system prompt ({len(system_ids)} tokens) leaves no room in model_max_length={model_max_length} "
            f"with max_new_tokens={max_new_tokens}"
        )
    # The assistant token that opens the reply counts against the budget too, or the oldest
    # kept round would lose its first tokens to the final cut.
    closing = [assistant_id] if not messages or messages[-1]["role"] != "assistant" else []
    # rounds are tokenised newest first, and only until one does not fit: a long chat's older
    # rounds cost nothing (the page and the API send the whole history every turn)
    encoded = []

    def sizes():
        for round_messages in reversed(rounds):
            encoded.append(_encode_round(tokenizer, round_messages, user_id, assistant_id))
            yield _size(encoded[-1])

    kept = _keep_newest(sizes(), budget - len(closing))
    history = [i for r in reversed(encoded[:kept]) for speaker, ids in r for i in (speaker, *ids)] + closing
    return system_ids + history[-budget:]


def encode_conversation(tokenizer, messages: list[dict], user_id: int, assistant_id: int, max_len: int,
                        max_src_len: int):
    """input_ids and labels of one training conversation (module docstring), and whether anything
    was cut; (None, None, cut) when nothing can be trained on: no reply, or a prompt that fills max_len.

    Messages after the last reply are left out; a reply marked `"train": false` is context, not a
    reply. The system text is always kept, and of the rounds
    the newest whole ones that fit in max_len with it; a user message is cut to its first
    max_src_len tokens, and when the newest round alone is too long its last reply is cut to fit.
    A single-turn sample is the case of one round.
    """
    replies = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("train", True)]
    if not replies:
        return None, None, False
    messages = messages[: replies[-1] + 1]
    system_ids, rounds = _encode_rounds(tokenizer, messages, user_id, assistant_id)
    trained = [m.get("train", True) for m in messages if m["role"] != "system"]
    cut = False
    for message in (m for r in rounds for m in r if m[0] == user_id):
        cut = cut or len(message[1]) > max_src_len
        message[1] = message[1][:max_src_len]
    budget = max_len - len(system_ids) - 1  # one place for the final eos
    sizes = [_size(r) for r in rounds]
    kept = newest_whole_rounds(sizes, budget)
    cut = cut or kept < len(rounds)
    rounds, used = rounds[len(rounds) - kept:], sum(sizes[len(sizes) - kept:])
    if used > budget:  # the newest round alone: cut its last reply
        last = rounds[-1][-1]
        room = len(last[1]) - (used - budget)
        if room < 1:
            return None, None, True
        last[1], cut = last[1][:room], True
    eos = tokenizer.eos_token_id
    input_ids, labels, previous = list(system_ids), [-100] * len(system_ids), False
    kept_messages = [message for r in rounds for message in r]
    for (speaker, ids), train in zip(kept_messages, trained[len(trained) - len(kept_messages):]):
        input_ids += [speaker] + ids
        if speaker == user_id:
            labels += [eos if previous else -100] + [-100] * len(ids)
        else:
            labels += [-100] + (ids if train else [-100] * len(ids))
        previous = speaker == assistant_id and train  # a masked reply's end is not learnt either
    return input_ids + [eos], labels + [eos], cut


def encode_reply(tokenizer, messages: list[dict], reply: str, generation_config: GenerationConfig,
                 model_max_length: int) -> tuple[list[int], list[int]]:
    """input_ids and labels for how likely `reply` (then eos) is as the answer to `messages`:
    build_chat_input's prompt, labelled -100, then the reply and eos, labelled. The reply is cut
    to half the context; the prompt fits in the rest."""
    reply_ids = (encode_text(tokenizer, reply) + [tokenizer.eos_token_id])[: model_max_length // 2]
    prompt = build_chat_input(tokenizer, messages, generation_config, model_max_length, len(reply_ids))
    return prompt + reply_ids, [-100] * len(prompt) + reply_ids


def chat_template(tokenizer, generation_config: GenerationConfig) -> str:
    """A Jinja chat template giving the same ids as `build_chat_input` (without truncation), for
    tools that apply the tokenizer's template; the chat tokens are spelled from the same generation
    config. Only for text without special-token strings: a template renders one string, which is
    then tokenized whole, so a `</s>` or `<reserved_107>` inside a message becomes a token there.
    Our training and serving encode through build_chat_input / encode_conversation instead.

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


class ContextFull(ValueError):
    """The prompt and max_new_tokens together do not fit in the model's context."""

    def __init__(self, prompt_tokens: int, max_new_tokens: int, model_max_length: int):
        super().__init__(f"the prompt takes {prompt_tokens} of the model's {model_max_length} tokens of context, "
                         f"which leaves no room for a reply of {max_new_tokens} tokens (at most "
                         f"{max(model_max_length - prompt_tokens, 0)})")
        self.prompt_tokens, self.max_new_tokens, self.model_max_length = prompt_tokens, max_new_tokens, model_max_length


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's frequency and presence penalties: logit[j] -= c[j] * frequency + (c[j] > 0) * presence,
    where c[j] counts token j in what has been generated so far (the prompt does not count).
    transformers has only the multiplicative repetition penalty, which is another thing."""

    def __init__(self, prompt_tokens: int, frequency: float, presence: float):
        self.prompt_tokens, self.frequency, self.presence = prompt_tokens, frequency, presence

    def __call__(self, input_ids, scores):
        generated = input_ids[:, self.prompt_tokens:]
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - counts * self.frequency - (counts > 0).to(scores.dtype) * self.presence


class LogprobCapture(LogitsProcessor):
    """Records, for each generated token, its log-probability and the `top` likeliest tokens' under
    the model's raw distribution: log_softmax of the logits before any penalty, bias, temperature or
    truncation (vLLM's default, "raw_logprobs"). It must come first among the processors; each
    step's row waits in `pending` until `take` hears which token was picked."""

    def __init__(self, top: int):
        self.top = top
        self.pending = None
        self.entries: list[tuple[int, float, list[tuple[int, float]]]] = []  # (id, logprob, [(id, logprob)])

    def __call__(self, input_ids, scores):
        self.pending = torch.log_softmax(scores[0].float(), dim=-1)
        return scores

    def take(self, token_id: int) -> None:
        row, top = self.pending, []
        if self.top:
            values, ids = row.topk(self.top)
            top = list(zip(ids.tolist(), values.tolist()))
        self.entries.append((token_id, row[token_id].item(), top))


BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The bytes that one token stands for: a byte-fallback piece `<0xE4>` is that one byte (part of
    a character), a sentencepiece word boundary `▁` a space; a special token its own spelling."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    byte = BYTE_PIECE.fullmatch(piece)
    return bytes([int(byte[1], 16)]) if byte else piece.replace("\u2581", " ").encode("utf-8")


class _CountingStreamer(TextIteratorStreamer):
    """A text streamer that also keeps the generated ids (the first `put` is the prompt), and tells
    a LogprobCapture each picked token (put runs in the generating thread, right after the pick)."""

    def __init__(self, tokenizer, capture: LogprobCapture | None = None, **kwargs):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True, **kwargs)
        self.generated: list[int] = []
        self.capture = capture
        self._prompt_seen = False

    def put(self, value):
        if self._prompt_seen:
            ids = value.reshape(-1).tolist()
            if self.capture is not None:
                for token_id in ids:
                    self.capture.take(token_id)
            self.generated.extend(ids)
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
    reproducible when one reply is generated at a time. `generate_kwargs` (temperature, top_p,
    top_k, min_p, do_sample, ...) override the generation config.

    The prompt: `messages` laid out by build_chat_input, keeping the newest rounds that leave
    `reserve` tokens of the context (default max_new_tokens) for the reply; or `prompt_ids` as
    they are (a raw text completion). Either way, the prompt plus max_new_tokens must fit in the
    context (vLLM's rule): else ContextFull, or, with `clamp`, max_new_tokens is what is left.

    Beside transformers' own settings: `repetition_penalty` (transformers'; None: the generation
    config's), OpenAI's `frequency_penalty` and `presence_penalty`, `logit_bias` (token id ->
    added to its logit) and `logprobs` (None, or how many likeliest tokens to record beside each
    picked one: `logprobs_so_far` lists (id, logprob, [(id, logprob), ...]) per generated token).
    """

    def __init__(self, model, tokenizer, messages: list[dict] | None, max_new_tokens: int | None = None,
                 stop: Event | None = None, timeout: float | None = None, seed: int | None = None, *,
                 prompt_ids: list[int] | None = None, reserve: int | None = None, clamp: bool = False,
                 repetition_penalty: float | None = None, frequency_penalty: float = 0.0,
                 presence_penalty: float = 0.0, logit_bias: dict[int, float] | None = None,
                 logprobs: int | None = None, **generate_kwargs):
        generation_config = model.generation_config
        context = model.config.model_max_length
        self.max_new_tokens = max_new_tokens or generation_config.max_new_tokens
        if prompt_ids is None:
            prompt_ids = build_chat_input(tokenizer, messages, generation_config, context,
                                          reserve or self.max_new_tokens)
        self.ids = list(prompt_ids)
        self.prompt_tokens = len(self.ids)
        if self.prompt_tokens + self.max_new_tokens > context:
            if not clamp or self.prompt_tokens >= context:
                raise ContextFull(self.prompt_tokens, self.max_new_tokens, context)
            self.max_new_tokens = context - self.prompt_tokens
        self.stop = stop if stop is not None else Event()
        self.completion_tokens = 0
        self.finish_reason = None
        self._seed = seed
        self._capture = LogprobCapture(logprobs) if logprobs is not None else None
        self._model = model
        self._streamer = _CountingStreamer(tokenizer, self._capture, timeout=timeout)
        criteria = StoppingCriteriaList([*generate_kwargs.pop("stopping_criteria", []), _StopOnEvent(self.stop)])
        self._generate_kwargs = {**generate_kwargs, "stopping_criteria": criteria,
                                 **self._processors(generation_config, repetition_penalty, frequency_penalty,
                                                    presence_penalty, logit_bias, generate_kwargs)}
        eos = generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos if eos is not None else tokenizer.eos_token_id])

    def _processors(self, generation_config, repetition_penalty, frequency_penalty, presence_penalty, logit_bias,
                    generate_kwargs) -> dict:
        """generate()'s logits_processor, and the settings it takes over. generate() puts the
        processors it builds itself (repetition penalty, sequence bias) before those it is given, so
        the raw logits that LogprobCapture records would already be penalised: these two are built
        here instead, transformers' own processors, after the capture, and turned off in generate()."""
        if repetition_penalty is None:
            repetition_penalty = generation_config.repetition_penalty
        processors = LogitsProcessorList([self._capture] if self._capture is not None else [])
        if repetition_penalty not in (None, 1.0):
            processors.append(RepetitionPenaltyLogitsProcessor(float(repetition_penalty)))
        if frequency_penalty or presence_penalty:
            processors.append(OpenAIPenalties(self.prompt_tokens, float(frequency_penalty), float(presence_penalty)))
        if logit_bias:
            biases = [[[int(token)], float(bias)] for token, bias in logit_bias.items()]
            processors.append(SequenceBiasLogitsProcessor(biases))
        processors.extend(generate_kwargs.get("logits_processor", []))
        return {"logits_processor": processors, "repetition_penalty": 1.0, "sequence_bias": None}

    @property
    def generated_ids(self) -> list[int]:
        """The ids generated so far (an eos at the end included)."""
        return self._streamer.generated

    @property
    def logprobs_so_far(self) -> list[tuple[int, float, list[tuple[int, float]]]] | None:
        """With `logprobs`: (id, logprob, top [(id, logprob)]) of each generated token so far; else None."""
        return self._capture.entries if self._capture is not None else None

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
        ended = bool(generated) and generated[-1] in self.eos_ids
        self.completion_tokens -= ended  # the eos is not part of the reply
        self.finish_reason = "stop" if ended or self.stop.is_set() or len(generated) < self.max_new_tokens \
            else "length"

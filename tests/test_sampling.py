"""The sampling parameters of the OpenAI-compatible API (utils/api.py) and its text completions
endpoint, with the real `openai` client and raw HTTP against a real uvicorn server on loopback,
on the tiny random model.

What the random model says is noise, so every number is pinned to a reference computed here by
hand: a greedy decode written out step by step (one forward pass a token, the penalties applied
by their textbook definitions), and the model's own log_softmax.
"""

import json
import math
import os
from collections import Counter

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry calls from tests

import httpx  # noqa: E402
import openai  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from baichuan.generation_utils import OpenAIPenalties, build_chat_input, token_bytes  # noqa: E402
from conftest import requires_real_tokenizer  # noqa: E402
from helpers import RecordingModel, serve  # noqa: E402
from utils.api import api_app  # noqa: E402
from utils.chat import GenerationSlots, Sampling  # noqa: E402
from utils.engine import ChatEngine  # noqa: E402

MAX_TOKENS = 10  # the server's default reply length here
CHARACTER = [{"role": "system", "content": "你是李白，唐代诗人。"}]
QUESTION = "你最喜欢喝什么酒？"
MESSAGES = [*CHARACTER, {"role": "user", "content": QUESTION}]
NO_PENALTY = {"repetition_penalty": 1.0}  # the tiny model's generation config has 1.05, as Baichuan2's


@pytest.fixture(scope="module")
def server(loaded):
    """The API on the tiny model, greedy by default, 1 generating + 4 waiting, no key."""
    model = RecordingModel(loaded[0])
    engine = ChatEngine(model, loaded[1], {}, GenerationSlots(1, 4), defaults=Sampling(MAX_TOKENS, 0.8, 0))
    with serve(api_app(engine)) as url:
        yield url, model, engine


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="none needed", max_retries=0, timeout=60)


# vLLM's and SillyTavern's fields beyond OpenAI's: the `openai` client sends them in extra_body
EXTRA = ("top_k", "min_p", "repetition_penalty")


def chat(client, messages=MESSAGES, **kwargs):
    extra = {name: kwargs.pop(name) for name in EXTRA if name in kwargs}
    return client.chat.completions.create(model="李白", messages=messages, extra_body=extra, **kwargs)


def eos_of(engine) -> int:
    return engine.tokenizer.eos_token_id


def prompt_of(engine, messages=MESSAGES, max_new_tokens=MAX_TOKENS) -> list[int]:
    model = engine.model
    return build_chat_input(engine.tokenizer, messages, model.generation_config, model.config.model_max_length,
                            min(max_new_tokens, model.config.model_max_length // 2))


def raw_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of the model's next-token logits at every position of `ids`: one forward pass."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def reference_greedy(model, prompt: list[int], steps: int, eos: int, repetition=1.0, frequency=0.0, presence=0.0,
                     bias=None) -> list[int]:
    """Greedy decoding written out: a forward pass over everything so far for each token, then the
    penalties by their definitions, token by token: CTRL's repetition penalty over the prompt and
    the reply (a positive logit divided by it, a negative one multiplied), OpenAI's frequency and
    presence penalties over the reply, logit_bias added."""
    ids = list(prompt)
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float().clone()
        for token in set(ids):
            logits[token] = logits[token] / repetition if logits[token] > 0 else logits[token] * repetition
        for token, count in Counter(ids[len(prompt):]).items():
            logits[token] -= count * frequency + presence
        for token, value in (bias or {}).items():
            logits[token] += value
        ids.append(int(logits.argmax()))
        if ids[-1] == eos:
            break
    return ids[len(prompt):]


def reply_ids(model, eos: int, call: int = -1) -> list[int]:
    """The ids that model.generate produced in a call, eos excluded."""
    prompt = model.calls[call]["inputs"].shape[1]
    ids = model.outputs[call][0, prompt:].tolist()
    return ids[:-1] if ids and ids[-1] == eos else ids


def post(url, path, body):
    return httpx.post(url + path, json=body, timeout=60)


# ---------------------------------------------------------------- the penalties, by hand


def test_frequency_and_presence_penalties_on_a_hand_made_distribution():
    """OpenAI's definition, logit[j] -= c[j] * frequency + (c[j] > 0) * presence, over the reply only."""
    scores = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]])
    ids = torch.tensor([[5, 5, 7, 1, 1, 2]])  # a prompt of 3 tokens (5, 5, 7), then the reply 1, 1, 2
    out = OpenAIPenalties(3, frequency=0.5, presence=1.0)(ids, scores)
    # token 1 twice: 1 - 2 * 0.5 - 1 = -1; token 2 once: 2 - 0.5 - 1 = 0.5; 5 and 7 only in the prompt
    assert out.tolist() == [[0.0, -1.0, 0.5, 3.0, 4.0, 5.0, 6.0, 7.0]]
    # negative penalties encourage repeats: token 1 gains 2 * 0.5 + 1 = 2
    assert OpenAIPenalties(3, -0.5, -1.0)(ids, scores).tolist() == [[0.0, 3.0, 3.5, 3.0, 4.0, 5.0, 6.0, 7.0]]
    # the effect on the distribution: token 1's probability, before and after, by hand
    before, after = torch.softmax(scores, -1)[0, 1].item(), torch.softmax(out, -1)[0, 1].item()
    total = sum(math.exp(x) for x in [0.0, -1.0, 0.5, 3.0, 4.0, 5.0, 6.0, 7.0])
    assert after == pytest.approx(math.exp(-1.0) / total, rel=1e-6) and after < before / 7


@pytest.mark.parametrize("penalties", [{"frequency_penalty": 2.0}, {"presence_penalty": 2.0},
                                       {"frequency_penalty": 1.0, "presence_penalty": -0.5},
                                       {"repetition_penalty": 1.8}])
def test_penalties_give_the_hand_computed_greedy_reply(client, server, penalties):
    _, model, engine = server
    eos, steps = eos_of(engine), 24  # the random model's greedy reply repeats a token within 24 (at 15 and 23)
    prompt = prompt_of(engine, max_new_tokens=steps)
    plain = reference_greedy(model.model, prompt, steps, eos)
    assert len(set(plain)) < len(plain), f"the plain greedy reply repeats no token: {plain}"  # the test can tell
    settings = {**NO_PENALTY, **penalties}
    want = reference_greedy(model.model, prompt, steps, eos, repetition=settings["repetition_penalty"],
                            frequency=settings.get("frequency_penalty", 0.0),
                            presence=settings.get("presence_penalty", 0.0))
    assert want != plain, "these penalties change nothing on this prompt"
    answer = chat(client, temperature=0, max_tokens=steps, **settings)
    assert reply_ids(model, eos) == [t for t in want if t != eos]
    assert answer.choices[0].message.content == engine.tokenizer.decode(want, skip_special_tokens=True)


def test_logit_bias_is_added_to_the_logits(client, server):
    _, model, engine = server
    eos, prompt = eos_of(engine), prompt_of(engine)
    plain = reference_greedy(model.model, prompt, MAX_TOKENS, eos)
    # -100 on the greedy first token: the reply starts with what came second
    bias = {plain[0]: -100.0, eos: -5.0}
    want = reference_greedy(model.model, prompt, MAX_TOKENS, eos, bias=bias)
    chat(client, temperature=0, logit_bias={str(k): v for k, v in bias.items()}, **NO_PENALTY)
    assert want[0] != plain[0] and reply_ids(model, eos) == [t for t in want if t != eos]
    # +100 on one token: nothing else is ever picked
    token = engine.tokenizer.convert_tokens_to_ids("酒")
    answer = chat(client, temperature=0, logit_bias={str(token): 100}, max_tokens=5)
    assert reply_ids(model, eos) == [token] * 5 and answer.choices[0].message.content == "酒" * 5


def test_top_k_and_min_p_reach_generate_and_cut(client, server):
    """top_k 1 and min_p 1 leave only the likeliest token: a sampled reply is then the greedy one,
    whatever the seed; without them, the same seeds give other replies."""
    model = server[1]
    greedy = chat(client, temperature=0, **NO_PENALTY).choices[0].message.content
    for cut in ({"top_k": 1}, {"min_p": 1.0}):
        for seed in (1, 2):
            answer = chat(client, temperature=1.5, top_p=1.0, seed=seed, **NO_PENALTY, **cut)
            assert answer.choices[0].message.content == greedy
            key, value = next(iter(cut.items()))
            assert model.calls[-1][key] == value and model.calls[-1]["do_sample"] is True
    free = {chat(client, temperature=1.5, top_p=1.0, top_k=0, seed=seed, **NO_PENALTY).choices[0].message.content
            for seed in (1, 2)}
    assert model.calls[-1]["top_k"] == 0  # 0: no cut, overriding the generation config's top_k of 5
    assert free != {greedy}


# ---------------------------------------------------------------- logprobs


def check_logprobs(model, prompt: list[int], ids: list[int], content: list, top: int) -> None:
    """Each token's logprob is the model's log_softmax at that step (raw: before penalties, bias or
    temperature); its top_logprobs are the `top` likeliest in order, and sum to at most 1."""
    assert len(content) == len(ids)
    reference = raw_logprobs(model, prompt + ids)
    for step, (token, entry) in enumerate(zip(ids, content)):
        row = reference[len(prompt) + step - 1]
        assert entry.logprob == pytest.approx(row[token].item(), abs=1e-4)
        assert len(entry.top_logprobs) == top
        values = [candidate.logprob for candidate in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        if top:
            assert values[0] == pytest.approx(row.max().item(), abs=1e-4)
            assert values[-1] == pytest.approx(row.topk(top).values[-1].item(), abs=1e-4)
        assert sum(math.exp(v) for v in values) <= 1 + 1e-6


@requires_real_tokenizer
def test_token_bytes_spell_the_text_with_the_real_tokenizer(real_tokenizer_path):
    """Each token's `bytes` (a byte-fallback piece its one byte, \u2581 a space), joined, are the
    text's UTF-8: the emoji and the rare character go through byte pieces."""
    from baichuan.tokenization_baichuan import BaichuanTokenizer

    tokenizer = BaichuanTokenizer(str(real_tokenizer_path))
    text = "李白举杯 said: hello  world\n😀𠀀，</s> end"
    ids = tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
    pieces = [token_bytes(tokenizer, i) for i in ids]
    assert b"".join(pieces) == text.encode("utf-8")
    assert any(len(piece) == 1 and piece[0] >= 0x80 for piece in pieces)  # a byte piece was among them
    assert token_bytes(tokenizer, tokenizer.eos_token_id) == b"</s>"


def test_logprobs_of_a_greedy_reply_are_the_models_log_softmax(client, server):
    _, model, engine = server
    eos, prompt = eos_of(engine), prompt_of(engine)
    answer = chat(client, temperature=0, logprobs=True, top_logprobs=5, logit_bias={str(eos): -100}, **NO_PENALTY)
    ids = reply_ids(model, eos)
    content = answer.choices[0].logprobs.content
    check_logprobs(model.model, prompt, ids, content, 5)
    # greedy, no penalty: the picked token is the likeliest, and its bytes spell the reply
    assert [entry.logprob for entry in content] == [entry.top_logprobs[0].logprob for entry in content]
    # (the random model writes stray bytes: each is one U+FFFD in the text, as Python replaces it)
    spelled = bytes(b for entry in content for b in entry.bytes).decode(errors="replace")
    assert spelled == answer.choices[0].message.content

    chunks = list(chat(client, temperature=0, logprobs=True, top_logprobs=5, logit_bias={str(eos): -100},
                       stream=True, **NO_PENALTY))
    streamed = [entry for c in chunks if c.choices and c.choices[0].logprobs for entry in c.choices[0].logprobs.content]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == answer.choices[0].message.content
    assert sum(1 for c in chunks if c.choices and c.choices[0].logprobs) >= 2, "the logprobs did not stream"


def test_logprobs_are_of_the_raw_distribution(client, server):
    """A sampled reply at temperature 0.5 with penalties: the logprobs are still the model's own
    (vLLM's default), which the processed distribution's would not be."""
    _, model, engine = server
    eos, prompt = eos_of(engine), prompt_of(engine)
    answer = chat(client, temperature=0.5, top_p=1.0, seed=3, logprobs=True, top_logprobs=0, presence_penalty=1.5,
                  repetition_penalty=1.3)
    ids = reply_ids(model, eos)
    content = answer.choices[0].logprobs.content
    check_logprobs(model.model, prompt, ids, content, 0)
    processed = torch.log_softmax(raw_logprobs(model.model, prompt + ids)[len(prompt) - 1] / 0.5, -1)
    assert abs(processed[ids[0]].item() - content[0].logprob) > 1e-3


def test_a_stop_string_cuts_the_logprobs_with_the_text(client, server):
    engine = server[2]
    eos = eos_of(engine)
    whole = chat(client, temperature=0, logit_bias={str(eos): -100}, **NO_PENALTY).choices[0].message.content
    stop = whole[len(whole) // 2:len(whole) // 2 + 1]
    cut = whole[:whole.index(stop)]
    answer = chat(client, temperature=0, logit_bias={str(eos): -100}, logprobs=True, stop=[stop], **NO_PENALTY)
    content = answer.choices[0].logprobs.content
    assert answer.choices[0].message.content == cut
    assert bytes(b for entry in content for b in entry.bytes).decode(errors="replace") == cut


# ---------------------------------------------------------------- n


def test_n_replies_with_usage_summed(client, server):
    _, model, engine = server
    eos = eos_of(engine)
    calls = len(model.calls)
    answer = chat(client, n=3, temperature=1.0, top_p=1.0, seed=7, max_tokens=8)
    assert [c.index for c in answer.choices] == [0, 1, 2] and len(model.calls) == calls + 3
    counts = [len(reply_ids(model, eos, calls + i)) for i in range(3)]
    texts = [engine.tokenizer.decode(reply_ids(model, eos, calls + i), skip_special_tokens=True) for i in range(3)]
    assert [c.message.content for c in answer.choices] == texts
    assert len(set(texts)) > 1, "three sampled replies were all the same"
    assert answer.usage.completion_tokens == sum(counts)
    assert answer.usage.prompt_tokens == len(prompt_of(engine, max_new_tokens=8))  # counted once
    # every reply to the one prompt (tokenised once, ChatEngine.start_again)
    assert all(model.calls[calls + i]["inputs"][0].tolist() == prompt_of(engine, max_new_tokens=8) for i in range(3))
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + sum(counts)

    # streamed: each chunk's index says whose piece it is; the same seed gives the same replies
    chunks = list(chat(client, n=3, temperature=1.0, top_p=1.0, seed=7, max_tokens=8, stream=True,
                       stream_options={"include_usage": True}))
    joined = ["", "", ""]
    for c in chunks:
        for choice in c.choices:
            joined[choice.index] += choice.delta.content or ""
    assert joined == texts
    finishes = [(choice.index, choice.finish_reason) for c in chunks for choice in c.choices if choice.finish_reason]
    assert finishes == [(i, answer.choices[i].finish_reason) for i in range(3)]
    assert chunks[-1].usage == answer.usage


# ---------------------------------------------------------------- max_tokens


def test_max_tokens_follows_vllms_rule(client, server):
    """Up to half the context, the oldest rounds make room (as ever); beyond, the prompt plus
    max_tokens must fit the context: SillyTavern's 600 on a 1,024 model is served."""
    _, model, engine = server
    eos, context = eos_of(engine), engine.model_max_length
    quick = {"logit_bias": {str(eos): 100}}  # the reply ends at once: only the limits are under test
    prompt = prompt_of(engine, max_new_tokens=600)
    answer = chat(client, max_tokens=600, **quick)
    assert model.calls[-1]["max_new_tokens"] == 600 and answer.choices[0].finish_reason == "stop"
    chat(client, max_completion_tokens=context - len(prompt), **quick)  # exactly fits
    assert model.calls[-1]["max_new_tokens"] == context - len(prompt)
    calls = len(model.calls)
    for field in ("max_tokens", "max_completion_tokens"):
        with pytest.raises(openai.BadRequestError) as error:
            chat(client, **{field: context - len(prompt) + 1}, **quick)
        body = error.value.body
        assert body["param"] == field and body["type"] == "invalid_request_error"
        for number in (len(prompt), context, context - len(prompt) + 1, context - len(prompt)):
            assert str(number) in body["message"], body["message"]
    assert len(model.calls) == calls


def test_clamp_max_tokens_cuts_to_what_fits(client, server):
    url, model, engine = server
    eos, context = eos_of(engine), engine.model_max_length
    engine.clamp_max_tokens = True  # web_demo.py --clamp_max_tokens
    try:
        prompt = prompt_of(engine, max_new_tokens=5000)
        chat(client, max_tokens=5000, logit_bias={str(eos): 100})
        assert model.calls[-1]["max_new_tokens"] == context - len(prompt)
        # a raw prompt that leaves 6 tokens: the reply is cut there, finish_reason "length"
        text = "月" * 2000
        ids = engine.tokenizer.encode(text, add_special_tokens=False)
        text = engine.tokenizer.decode(ids[:context - 6])
        assert len(engine.tokenizer.encode(text, add_special_tokens=False)) == context - 6
        response = post(url, "/v1/completions", {"model": "x", "prompt": text, "max_tokens": 600,
                                                 "temperature": 0, "logit_bias": {str(eos): -100}})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 6
    finally:
        engine.clamp_max_tokens = False
    response = post(url, "/v1/completions", {"model": "x", "prompt": text, "max_tokens": 600})
    assert response.status_code == 400 and response.json()["error"]["param"] == "max_tokens"
    assert f"{context - 6} of the model's {context}" in response.json()["error"]["message"]


# ---------------------------------------------------------------- /v1/completions


def layout(engine, messages) -> str:
    """The chat layout written as a Text Completion client writes it: SillyTavern's instruct template
    for Baichuan2 (docs/serving.md): the system text, then <reserved_106> and <reserved_107> before
    each user and assistant turn."""
    user, assistant = engine.tokenizer.convert_ids_to_tokens(
        [engine.model.generation_config.user_token_id, engine.model.generation_config.assistant_token_id])
    speaker = {"system": "", "user": user, "assistant": assistant}
    return "".join(speaker[m["role"]] + m["content"] for m in messages) + assistant


def test_completions_continue_a_raw_prompt_whose_special_tokens_count(client, server):
    _, model, engine = server
    text = layout(engine, MESSAGES)
    assert text == "你是李白，唐代诗人。<reserved_106>你最喜欢喝什么酒？<reserved_107>"
    whole = client.completions.create(model="李白", prompt=text, temperature=0, max_tokens=8, extra_body=NO_PENALTY)
    # the chat tokens in the text became the chat tokens: the very prompt of the chat endpoint
    assert model.calls[-1]["inputs"][0].tolist() == prompt_of(engine, max_new_tokens=8)
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    assert whole.choices[0].text == chat(client, temperature=0, max_tokens=8).choices[0].message.content
    assert whole.usage.prompt_tokens == len(prompt_of(engine, max_new_tokens=8))
    # the chat endpoint keeps the same strings as text: no chat token beyond the layout's own
    chat(client, [*CHARACTER, {"role": "user", "content": text}], max_tokens=1)
    ids = model.calls[-1]["inputs"][0].tolist()
    assert ids.count(engine.model.generation_config.user_token_id) == 1

    streamed = list(client.completions.create(model="李白", prompt=[text], temperature=0, max_tokens=8, stream=True,
                                              stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == whole.choices[0].text
    # (how many pieces 8 tiny-model tokens arrive in depends on the machine's load; the chat endpoint's
    # test in test_api.py, on the same streaming code, asks for pieces)
    assert sum(1 for c in streamed if c.choices and c.choices[0].text) >= 1
    assert [c.choices[0].finish_reason for c in streamed if c.choices][-1] == whole.choices[0].finish_reason
    assert streamed[-1].usage == whole.usage and {c.object for c in streamed} == {"text_completion"}

    # stop strings end it, as in the chat
    stop = whole.choices[0].text[3:5]
    cut = client.completions.create(model="李白", prompt=text, temperature=0, max_tokens=8, stop=stop)
    assert cut.choices[0].text == whole.choices[0].text[:whole.choices[0].text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_completions_logprobs_in_the_legacy_shape(server):
    url, model, engine = server
    eos = eos_of(engine)
    text = layout(engine, MESSAGES)
    request = {"model": "x", "prompt": text, "temperature": 0, "max_tokens": 8, "logprobs": 3,
               "logit_bias": {str(eos): -100}, **NO_PENALTY}
    body = post(url, "/v1/completions", request).json()
    choice = body["choices"][0]
    ids = reply_ids(model, eos)
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == len(ids)
    reference = raw_logprobs(model.model, prompt_of(engine, max_new_tokens=8) + ids)
    start = len(prompt_of(engine, max_new_tokens=8)) - 1
    for step, (token, value, top) in enumerate(zip(ids, logprobs["token_logprobs"], logprobs["top_logprobs"])):
        assert value == pytest.approx(reference[start + step][token].item(), abs=1e-4)
        assert len(top) <= 3 and sum(math.exp(v) for v in top.values()) <= 1 + 1e-6
        assert max(top.values()) == pytest.approx(value, abs=1e-6)  # greedy, unpenalised: the likeliest
    offsets = logprobs["text_offset"]
    assert offsets[0] == 0 and offsets == sorted(offsets) and offsets[-1] < len(choice["text"])
    for step, offset in enumerate(offsets):  # each token's text starts where it says
        token_text = engine.tokenizer.decode(ids[step:step + 1])
        if "\ufffd" not in token_text:
            assert choice["text"][offset:].startswith(token_text), (step, offset)

    with httpx.stream("POST", url + "/v1/completions", json={**request, "stream": True}, timeout=60) as response:
        events = response.read().decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    chunks = [json.loads(event.removeprefix("data: "))["choices"][0] for event in events[:-2]]
    joined = {key: [x for c in chunks if c["logprobs"] for x in c["logprobs"][key]] for key in logprobs}
    assert joined == logprobs


# ---------------------------------------------------------------- bad values


CHAT_BAD = [
    ({"top_k": -2}, "top_k"), ({"min_p": 1.5}, "min_p"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"frequency_penalty": 2.5}, "frequency_penalty"), ({"presence_penalty": -3}, "presence_penalty"),
    ({"logit_bias": {"酒": 1}}, "logit_bias"), ({"logit_bias": {"999999": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"), ({"logit_bias": {"5": "x"}}, "logit_bias.5"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"), ({"top_logprobs": 2}, "top_logprobs"),
    ({"n": 0}, "n"), ({"n": 9}, "n"), ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": 5000}, "max_completion_tokens"), ({"top_k": 1.5}, "top_k"),
]
COMPLETION_BAD = [
    ({"logprobs": 21}, "logprobs"), ({"logprobs": True}, "logprobs"), ({"echo": True}, "echo"),
    ({"suffix": "后来"}, "suffix"), ({"best_of": 3}, "best_of"), ({"prompt": ["一", "二"]}, "prompt"),
    ({"prompt": ""}, "prompt"), ({"prompt": [1, 2]}, "prompt[0]"), ({"max_tokens": 5000}, "max_tokens"),
    ({"min_p": -0.1}, "min_p"), ({"logit_bias": {"-1": 1}}, "logit_bias"),
]


@pytest.mark.parametrize(("path", "change", "param"),
                         [("/v1/chat/completions", *case) for case in CHAT_BAD]
                         + [("/v1/completions", *case) for case in COMPLETION_BAD])
def test_bad_values_are_openai_400s_naming_the_field(server, path, change, param):
    url, model, _ = server
    base = {"model": "x", **({"messages": MESSAGES} if path.endswith("chat/completions") else {"prompt": "你好"})}
    calls = len(model.calls)
    response = post(url, path, {**base, **change})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"].strip()
    assert len(model.calls) == calls


@pytest.mark.parametrize("field", ["min_p", "repetition_penalty", "frequency_penalty", "presence_penalty",
                                   "temperature"])
@pytest.mark.parametrize("value", ["NaN", "Infinity"])
def test_nan_and_infinity_are_400s(server, field, value):
    """Python's JSON reads NaN and Infinity; no check may let them through to the logits."""
    url = server[0]
    raw = json.dumps({"model": "x", "messages": MESSAGES})[:-1] + f', "{field}": {value}}}'
    response = httpx.post(url + "/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["param"] == field, response.text


def test_the_openai_client_sees_the_400(client):
    with pytest.raises(openai.BadRequestError) as error:
        chat(client, frequency_penalty=3.0)
    assert error.value.body["param"] == "frequency_penalty" and "[-2, 2]" in error.value.body["message"]


# ---------------------------------------------------------------- seed


def test_a_seed_gives_the_same_sampled_replies(client):
    first = [chat(client, temperature=1.2, top_p=1.0, seed=seed).choices[0].message.content for seed in (11, 12)]
    again = [chat(client, temperature=1.2, top_p=1.0, seed=seed).choices[0].message.content for seed in (11, 12)]
    assert first == again and first[0] != first[1]
    text = client.completions.create(model="x", prompt="你好", temperature=1.2, seed=11, max_tokens=6).choices[0].text
    assert text == client.completions.create(model="x", prompt="你好", temperature=1.2, seed=11,
                                             max_tokens=6).choices[0].text

"""Tests of baichuan/generation_utils.py: the Baichuan2-Chat prompt layout, its truncation, the
Jinja chat template and the streaming reply (ChatStream)."""

import pytest
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from baichuan import BaichuanForCausalLM, BaichuanTokenizer
from baichuan.generation_utils import ChatStream, build_chat_input, chat_template
from conftest import REAL_TOKENIZER, requires_real_tokenizer

# Not Baichuan2's 195/196: proves the ids come from the generation config.
FAKE = GenerationConfig(user_token_id=7, assistant_token_id=9)
U, A = 7, 9

SYSTEM = "你是孙悟空，说话要有孙悟空的风格。"
CONVERSATION = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "你平时喜欢做什么来放松？"},
    {"role": "assistant", "content": "俺老孙最爱翻几个筋斗云！"},
    {"role": "user", "content": "你的金箍棒是从哪里得来的？"},
    {"role": "assistant", "content": "东海龙宫里借的，哈哈。"},
    {"role": "user", "content": "你觉得什么样的人值得信任？ Say it in English, too."},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return BaichuanTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return BaichuanForCausalLM.from_pretrained(tiny_model_dir).eval()


def encode(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def expected_rounds(tokenizer, messages):
    """Token ids of each round (user turn + assistant turn), built by hand."""
    rounds = []
    for message in messages:
        if message["role"] == "user":
            rounds.append([U] + encode(tokenizer, message["content"]))
        elif message["role"] == "assistant":
            rounds[-1] += [A] + encode(tokenizer, message["content"])
    return rounds


def test_layout(tokenizer):
    system = encode(tokenizer, SYSTEM)
    q1, r1, q2, r2, q3 = (encode(tokenizer, m["content"]) for m in CONVERSATION[1:])
    assert U not in system + q1 + r1 + q2 + r2 + q3 and A not in system + q1 + r1 + q2 + r2 + q3

    ids = build_chat_input(tokenizer, CONVERSATION, FAKE, 4096, 64)
    assert ids == system + [U] + q1 + [A] + r1 + [U] + q2 + [A] + r2 + [U] + q3 + [A]
    # Ending with the assistant's message: no assistant token to open another reply.
    ids = build_chat_input(tokenizer, CONVERSATION[:5], FAKE, 4096, 64)
    assert ids == system + [U] + q1 + [A] + r1 + [U] + q2 + [A] + r2
    # No system message.
    assert build_chat_input(tokenizer, CONVERSATION[1:2], FAKE, 4096, 64) == [U] + q1 + [A]
    # The real ids, from a Baichuan2 generation config.
    real = GenerationConfig(user_token_id=195, assistant_token_id=196)
    assert build_chat_input(tokenizer, CONVERSATION[1:2], real, 4096, 64) == [195] + q1 + [196]


def test_rejects_bad_input(tokenizer):
    with pytest.raises(ValueError, match="user_token_id"):
        build_chat_input(tokenizer, CONVERSATION, GenerationConfig(), 4096, 64)
    with pytest.raises(ValueError, match="system"):
        build_chat_input(tokenizer, CONVERSATION[1:2] + CONVERSATION[:1], FAKE, 4096, 64)
    with pytest.raises(ValueError, match="role"):
        build_chat_input(tokenizer, [{"role": "tool", "content": "x"}], FAKE, 4096, 64)
    system = encode(tokenizer, SYSTEM)
    with pytest.raises(ValueError, match="no room"):
        build_chat_input(tokenizer, CONVERSATION, FAKE, len(system) + 64 + 1, 64)


def test_truncation_keeps_system_and_newest_whole_rounds(tokenizer):
    system = encode(tokenizer, SYSTEM)
    rounds = expected_rounds(tokenizer, CONVERSATION)
    r1, r2, r3 = len(rounds[0]), len(rounds[1]), len(rounds[2]) + 1  # r3 with the closing assistant id
    new = 64

    def build(max_length):
        return build_chat_input(tokenizer, CONVERSATION, FAKE, len(system) + max_length + new, new)

    everything = system + rounds[0] + rounds[1] + rounds[2] + [A]
    assert build(r1 + r2 + r3) == everything
    assert build(r1 + r2 + r3 - 1) == system + rounds[1] + rounds[2] + [A]
    assert build(r2 + r3) == system + rounds[1] + rounds[2] + [A]
    assert build(r2 + r3 - 1) == system + rounds[2] + [A]
    assert build(r3) == system + rounds[2] + [A]
    # The newest round alone is too long: its oldest tokens go, the question's end stays.
    assert build(r3 - 2) == system + (rounds[2] + [A])[2:]

    # Every budget: within it, the system text first, then whole rounds only, as many as fit.
    for max_length in range(2, r1 + r2 + r3 + 3):
        ids = build(max_length)
        assert len(ids) <= len(system) + max_length
        assert ids[: len(system)] == system and ids[-1] == A
        fitting = [k for k in range(3) if sum(map(len, rounds[k:])) + 1 <= max_length]
        if fitting:
            kept = min(fitting)
            assert ids == system + sum(rounds[kept:], []) + [A], max_length


def check_template(tokenizer, generation_config, messages):
    expected = build_chat_input(tokenizer, messages, generation_config, 100000, 1)
    assert tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False) == expected
    if messages[-1]["role"] == "user":
        prompt = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, add_generation_prompt=True)
        assert prompt == expected


@pytest.mark.parametrize("end", [2, 3, 5, 6])
def test_chat_template_of_saved_checkpoint_equals_build_chat_input(tiny_model_dir, end):
    tokenizer = BaichuanTokenizer.from_pretrained(tiny_model_dir)
    generation_config = GenerationConfig.from_pretrained(tiny_model_dir)
    assert (generation_config.user_token_id, generation_config.assistant_token_id) == (3, 4)
    check_template(tokenizer, generation_config, CONVERSATION[:end])
    check_template(tokenizer, generation_config, CONVERSATION[1:end])


@requires_real_tokenizer
def test_chat_template_real_tokenizer():
    tokenizer = BaichuanTokenizer(vocab_file=str(REAL_TOKENIZER))
    generation_config = GenerationConfig(user_token_id=195, assistant_token_id=196)
    tokenizer.chat_template = chat_template(tokenizer, generation_config)
    for end in (2, 5, 6):
        check_template(tokenizer, generation_config, CONVERSATION[:end])
    ids = tokenizer.apply_chat_template(CONVERSATION[1:2], tokenize=True, return_dict=False)
    assert ids[0] == 195 and ids[-1] == 196


# --------------------------------------------------------------------------------------------
# ChatStream


def test_chat_stream_yields_growing_reply_equal_to_greedy_generate(model, tokenizer):
    messages = CONVERSATION[1:4]
    new = 24
    pieces = list(ChatStream(model, tokenizer, messages, max_new_tokens=new, do_sample=False, timeout=60))
    assert len(pieces) >= 2
    for shorter, longer in zip(pieces, pieces[1:]):
        assert longer.startswith(shorter) and len(longer) > len(shorter)

    prompt = build_chat_input(tokenizer, messages, model.generation_config, model.config.model_max_length, new)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False)
    reply_ids = out[0, len(prompt) :].tolist()
    assert len(reply_ids) > 1
    assert pieces[-1] == tokenizer.decode(reply_ids, skip_special_tokens=True)


class FailAt(LogitsProcessor):
    def __init__(self, step):
        self.step, self.calls = step, 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls > self.step:
            raise RuntimeError(f"boom at step {self.step}")
        return scores


@pytest.mark.parametrize("step", [0, 6])
def test_chat_stream_reraises_generation_error(model, tokenizer, step):
    processors = LogitsProcessorList([FailAt(step)])
    stream = ChatStream(
        model, tokenizer, CONVERSATION[1:2], max_new_tokens=20, do_sample=False, timeout=60, logits_processor=processors
    )
    received = []
    # With a hang, the streamer's timeout would raise queue.Empty instead.
    with pytest.raises(RuntimeError, match=f"boom at step {step}"):
        for text in stream:
            received.append(text)
    assert processors[0].calls == step + 1

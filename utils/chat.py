"""The parts of a chat that utils.engine.ChatEngine puts together for every front end (predict.py,
web_demo.py and its API): the model flags, the checks of what a user sends, the sampling
settings, the messages of a turn, and the one bound on concurrent generation.

Nothing heavy is imported here at module level, so that the scripts' `--help` stays instant.
"""

import argparse
import contextlib
import math
import threading
from dataclasses import dataclass

from utils.cli import UserError
from utils.prompts import Role

MAX_MESSAGE_CHARS = 2000
# A Baichuan2 token covers at most 16 characters: a history longer than 16 x the context is cut
# before tokenising, so a huge request costs no tokenising time.
CHARS_PER_TOKEN_BOUND = 16
# Below this a temperature is greedy, as vLLM's _SAMPLING_EPS: dividing the logits by, say, 1e-300
# overflows them to inf and sampling fails (inf/nan probabilities), while at 1e-5 the logits stay
# far below float32's range and a sample already is the argmax unless two logits tie within ~1e-4.
GREEDY_BELOW = 1e-5
MAX_TOP_LOGPROBS = 20  # as OpenAI
MAX_LOGIT_BIAS = 100  # as OpenAI: a bias of -100..100 is added to a token's logit


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The model flags of the scripts that chat with a model."""
    group = parser.add_argument_group("model")
    group.add_argument("--model_path", required=True,
                       help="merged model directory (or hub id), or the base model with --adapter")
    group.add_argument("--adapter", help="LoRA adapter directory (a training checkpoint) to put on --model_path")
    group.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda or cuda:N")
    group.add_argument("--trust_remote_code", action="store_true",
                       help="let transformers run code shipped in the model directory (off unless asked)")
    group.add_argument("--roles_file", help="JSON object role name -> description, a character card (.json or .png) "
                                            "or a folder of cards, to play other roles than the model's own "
                                            "(default: the roles recorded in the model)")
    group.add_argument("--lorebook", action="append", metavar="FILE",
                       help="a SillyTavern World Info file whose entries fire for every role, after the role's own "
                            "lorebook, as data_helper.py --lorebook trains them (repeatable)")
    group.add_argument("--card_system_prompt", action="store_true",
                       help="with cards in --roles_file: use a card's own system_prompt instead of the built one")
    group.add_argument("--quantization_bit", type=int, choices=(4, 8),
                       help="load the model's linear layers in 4 bits (NF4, double quantisation) or 8 bits "
                            "(bitsandbytes int8) to save memory; an --adapter stays unquantised on top "
                            "(default: unquantised, bf16 on a GPU and fp32 on the CPU)")


def add_generation_args(parser: argparse.ArgumentParser, title: str = "generation"):
    """The sampling flags; returns their group, for a script's own additions."""
    group = parser.add_argument_group(title)
    group.add_argument("--max_new_tokens", type=int, default=512, help="longest reply in tokens")
    group.add_argument("--top_p", type=float, default=0.8, help="nucleus sampling mass")
    group.add_argument("--temperature", type=float, default=0.8, help="sampling temperature, 0 = greedy")
    return group


# ---------------------------------------------------------------- checks of what a user sends


def check_max_new_tokens(max_new_tokens, limit: int | None = None) -> None:
    top = limit or float("inf")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int | float) \
            or not 1 <= max_new_tokens <= top or max_new_tokens % 1:
        bound = f" and {limit}" if limit else ""
        raise UserError(f"max_new_tokens must be a whole number between 1{bound}, got {max_new_tokens!r}")


def check_top_p(top_p) -> None:
    if isinstance(top_p, bool) or not isinstance(top_p, int | float) or not 0 < top_p <= 1:
        raise UserError(f"top_p must be in (0, 1], got {top_p!r}")


def check_temperature(temperature) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not 0 <= temperature <= 2:
        raise UserError(f"temperature must be in [0, 2] (0 = greedy), got {temperature!r}")


def check_settings(max_new_tokens, top_p, temperature, max_new_tokens_limit: int | None = None) -> None:
    """Refuse settings that generate() would reject with an obscure message, or misuse."""
    check_max_new_tokens(max_new_tokens, max_new_tokens_limit)
    check_top_p(top_p)
    check_temperature(temperature)


def _number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def check_top_k(top_k) -> None:
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < -1):
        raise UserError(f"top_k must be a whole number, at least 1 (0 or -1: no top-k cut), got {top_k!r}")


def check_min_p(min_p) -> None:
    if min_p is not None and not (_number(min_p) and 0 <= min_p <= 1):
        raise UserError(f"min_p must be in [0, 1] (0: no cut), got {min_p!r}")


def check_repetition_penalty(penalty) -> None:
    if penalty is not None and not (_number(penalty) and penalty > 0):
        raise UserError(f"repetition_penalty must be a number above 0 (1: none), got {penalty!r}")


def check_penalty(penalty, name: str) -> None:
    """OpenAI's frequency and presence penalties."""
    if not (_number(penalty) and -2 <= penalty <= 2):
        raise UserError(f"{name} must be in [-2, 2] (0: none), got {penalty!r}")


def check_logit_bias(logit_bias, vocab_size: int) -> None:
    """(token id, bias) pairs: ids of the vocabulary, biases in [-100, 100]."""
    for token, bias in logit_bias:
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
            raise UserError(f"logit_bias: {token!r} is no token id of this model (0 to {vocab_size - 1})")
        if not (_number(bias) and -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS):
            raise UserError(f"logit_bias: the bias of token {token} must be in [-{MAX_LOGIT_BIAS}, "
                            f"{MAX_LOGIT_BIAS}], got {bias!r}")


def check_logprobs(logprobs) -> None:
    if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                 or not 0 <= logprobs <= MAX_TOP_LOGPROBS):
        raise UserError(f"logprobs must be a whole number between 0 and {MAX_TOP_LOGPROBS}, got {logprobs!r}")


def check_message(text, max_chars: int = MAX_MESSAGE_CHARS) -> None:
    if not isinstance(text, str) or not text.strip():
        raise UserError("the message is empty: type something first")
    if len(text) > max_chars:
        raise UserError(f"the message is too long ({len(text)} characters; at most {max_chars}): shorten it")


def content_text(content) -> str:
    """Message content as plain text: a string, or a list of blocks {"type": "text", "text": ...}
    (Gradio's chat, OpenAI's content parts) joined by newlines, as vLLM joins text parts; files
    and other blocks carry no text for the prompt."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        content = [content]
    if isinstance(content, list):
        return "\n".join(b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text")
    return ""


def newest_history(messages: list[dict], model_max_length: int) -> list[dict]:
    """The newest messages that could fit in the context; when older ones are cut, starting on a
    whole round (a conversation that opens with the role's greeting keeps it while it fits).
    One pass from the newest message back, then one slice: linear in the messages kept."""
    budget = CHARS_PER_TOKEN_BOUND * model_max_length
    start, total = len(messages), 0
    while start > 0:
        total += len(messages[start - 1]["content"])
        if start < len(messages) and total > budget:
            break
        start -= 1
    # cut inside the conversation: start on a whole round. Uncut, a leading assistant turn (a
    # role's greeting) stays, as the first turn of the chat.
    while 0 < start < len(messages) - 1 and messages[start]["role"] != "user":
        start += 1
    return messages[start:]


# ---------------------------------------------------------------- one turn


@dataclass(frozen=True)
class Sampling:
    """How a reply is sampled, for every front end. Left at None, top_k, min_p and
    repetition_penalty are the model's generation config's (as vLLM takes a model's defaults);
    the page sets only the first three fields. Token-level settings apply to greedy replies too,
    the cuts (top_p, top_k, min_p) only to sampled ones."""

    max_new_tokens: int = 512
    top_p: float = 0.8
    temperature: float = 0.8  # 0 (or below GREEDY_BELOW) = greedy, as in most chat front ends
    seed: int | None = None
    top_k: int | None = None  # 0 or -1: no top-k cut (vLLM's -1)
    min_p: float | None = None  # 0: no min-p cut
    repetition_penalty: float | None = None  # transformers' (CTRL's): logits of seen tokens divided by it
    frequency_penalty: float = 0.0  # OpenAI's, over the tokens generated so far
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    logprobs: int | None = None  # None: no log-probabilities; k: the picked token's and the k likeliest

    def generate_kwargs(self) -> dict:
        """ChatStream's keyword arguments for these settings: only those set, so that the model's
        generation config decides the rest."""
        tokens = {"repetition_penalty": self.repetition_penalty, "logprobs": self.logprobs,
                  "frequency_penalty": self.frequency_penalty or None,
                  "presence_penalty": self.presence_penalty or None, "logit_bias": dict(self.logit_bias) or None}
        tokens = {name: value for name, value in tokens.items() if value is not None}
        if self.temperature < GREEDY_BELOW:
            return {"do_sample": False, **tokens}
        cuts = {"top_k": None if self.top_k is None else max(self.top_k, 0), "min_p": self.min_p or None}
        return {"do_sample": True, "top_p": float(self.top_p), "temperature": float(self.temperature),
                **{name: value for name, value in cuts.items() if value is not None}, **tokens}


def role_messages(role: Role, history: list[dict]) -> list[dict]:
    """The system prompt of `role` followed by the conversation (user/assistant dicts)."""
    return [{"role": "system", "content": role.system}, *history]


# ---------------------------------------------------------------- the bound on concurrent generation


class Busy(Exception):
    """Every generation slot and every waiting place is taken."""


class Cancelled(Exception):
    """The request was stopped while it waited for a slot."""


class GenerationSlots:
    """At most `running` replies are generated at once and `waiting` more wait for a slot; a request
    beyond that is turned away at once (Busy). The page and the API share one of these."""

    def __init__(self, running: int, waiting: int):
        self.running, self.waiting = running, waiting
        self._slots = threading.Semaphore(running)
        self._lock = threading.Lock()
        self._inside = 0

    @contextlib.contextmanager
    def place(self):
        """Claim a waiting place, or raise Busy. Yields `turn`, a context manager that waits for a
        generation slot and holds it; setting its `stop` event while waiting gives up (Cancelled)."""
        with self._lock:
            if self._inside >= self.running + self.waiting:
                raise Busy(f"all {self.running} generation slots and {self.waiting} waiting places are taken")
            self._inside += 1
        try:
            yield self._turn
        finally:
            with self._lock:
                self._inside -= 1

    @contextlib.contextmanager
    def _turn(self, stop: threading.Event | None = None):
        while not self._slots.acquire(timeout=0.05):
            if stop is not None and stop.is_set():
                raise Cancelled()
        try:
            yield
        finally:
            self._slots.release()

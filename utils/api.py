"""The OpenAI-compatible chat API that web_demo.py serves beside its page: the same model, the same
prompt contract and the same bound on generation: one utils.engine.ChatEngine answers both, so a
SillyTavern, Open WebUI or `openai` client and the page wait in one line.

    GET  /v1/models              the model's roles, one model each, and the client's-own-prompt id
    GET  /v1/models/{role}       one of them
    POST /v1/chat/completions    a reply, whole or streamed (server-sent events, then `data: [DONE]`)
    POST /v1/completions         a raw text continued (the client writes the chat layout), the same ways

The messages become a prompt through utils/assembly.py (its docstring: later system messages join
the user turn beside them, named example messages become "Name: text" lines, a trailing assistant
message is continued and the reply is only the new text; an empty one is a 400). `model` names a
role, whose trained system prompt opens the prompt; the client's leading system messages are then
dropped, used instead, or appended, as the engine's client_system policy says (web_demo.py
--client_system). A `model` that is no role plays the client's system prompt; without one it is a
404, except for the engine's client_model id, which the model list offers for just that.
Every request writes one line to the `web_demo.requests` logger at INFO (web_demo.py --log_requests).
A 404 outside /v1 (a base URL without /v1) says that the API is under /v1 (page_not_found does it
for the page's app, which web_demo.py mounts at the root).

A text completion's `prompt` is raw text that the client laid out itself (SillyTavern's Text
Completion with an instruct template, tools with their own template): special-token strings in
it are the tokens (`<reserved_106>` the user token, `<reserved_107>` the assistant's, `</s>` eos),
which the chat endpoint never lets message text become. Any `model` name is taken there.

Honoured: max_tokens (or max_completion_tokens; default the server's --max_new_tokens, at most
half the context; more must fit beside the prompt, as vLLM asks: else a 400 with the numbers, or
with --clamp_max_tokens it is cut to fit), temperature (0..2, 0 or below 1e-5 = greedy), top_p,
top_k, min_p, repetition_penalty, frequency_penalty and presence_penalty (OpenAI's), logit_bias,
logprobs and top_logprobs (0..20; the raw distribution's, as vLLM's), n (up to MAX_N replies, one
after another), stop (up to 16 strings of at most 256 characters, 1024 together: the reply ends
before the first, which is not included), seed (0 <= seed < 2**63), stream and
stream_options.include_usage. A string that is no valid Unicode (a lone surrogate such as
"\\ud800") is a 400.
Refused with a 400: tools and functions, a response_format other than text; for completions also
echo, suffix, best_of > n, and a prompt other than one string.
A conversation of more messages than the server's --max_messages is a 400 naming the limit.
Other fields (user, typical_p, ...) are ignored, as many local servers do.
`usage` counts the prompt's tokens once and every token generated (eos excluded) of every choice;
finish_reason is "length" when max_tokens ended the reply, else "stop".

Every error has OpenAI's shape {"error": {"message", "type", "param", "code"}}: 400 bad request,
401 no or wrong key, 404 unknown model or path, 429 every generation slot and waiting place
taken (with Retry-After), 500 generation failed (or any other server error; its traceback goes to
the log only). A client that goes away, mid-stream or while waiting, ends its generation at the
next token and frees its place.
"""

import asyncio
import functools
import json
import logging
import threading
import time
import uuid
from dataclasses import replace
from typing import Annotated, Any, Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
)
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from baichuan.generation_utils import token_bytes
from utils.cli import UserError
from utils.chat import Busy, Cancelled, Sampling, content_text
from utils.engine import ChatEngine, InputError, RequestPrompt, UnknownModel

logger = logging.getLogger("web_demo.api")
# one line per request, at INFO (web_demo.py --log_requests shows them)
requests_log = logging.getLogger("web_demo.requests")

RETRY_AFTER_S = 1
# OpenAI takes 4 stop strings, vLLM any number; SillyTavern's Text Completion sends its names and
# instruct sequences beside the user's own, often more than 4 (and its vLLM mode does not cut them).
MAX_STOP_STRINGS = 16
# cut_at_stop's hold-back costs the square of a stop string's length for each piece: bounding each
# string and their sum bounds that cost at 256 x 1024 character comparisons a piece
MAX_STOP_CHARS = 256
MAX_STOP_TOTAL = 1024
# Replies per request: n of them hold one generation slot, one after another, as long as n
# requests would; a bound keeps one request from holding it for many.
MAX_N = 8


class ApiError(Exception):
    """A request answered with an OpenAI-shaped error."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.param, self.code, self.kind, self.headers = status, param, code, kind, headers

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), self.status, self.headers)


# ---------------------------------------------------------------- the request


def encodable(text: str) -> str:
    """`text`, unless it holds a lone surrogate (JSON's "\\ud800"), which no tokenizer or response can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"a lone surrogate {text[error.start]!r} at position {error.start} is not text") from None
    return text


Text = Annotated[StrictStr, AfterValidator(encodable)]  # its ValueError is a 400 naming the field


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")  # front ends send many fields this API has no use for


class TextPart(_Lenient):
    type: Literal["text"]
    text: Text


class Message(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]
    name: Text | None = None  # a speaker: SillyTavern's example_user/example_assistant, a group's member

    def as_dict(self) -> dict:
        """The message as utils.assembly takes it: its content as text (the page's join of text parts)."""
        return {"role": self.role, "content": content_text(self.model_dump()["content"]),
                **({"name": self.name} if self.name else {})}


class StreamOptions(_Lenient):
    include_usage: StrictBool = False


class SamplingRequest(_Lenient):
    """The fields that the chat and the text completions share: the model and how to sample."""
    # the fields this API has no use for are kept, unread, for the request log's "ignored"
    model_config = ConfigDict(extra="allow")

    model: Text
    max_tokens: StrictInt | None = None
    temperature: StrictFloat | None = None
    top_p: StrictFloat | None = None
    top_k: StrictInt | None = None
    min_p: StrictFloat | None = None
    repetition_penalty: StrictFloat | None = None
    frequency_penalty: StrictFloat | None = None
    presence_penalty: StrictFloat | None = None
    logit_bias: dict[str, StrictFloat] | None = None  # token id (as a string) -> bias; checked in sampling_of
    n: StrictInt | None = None
    stop: Text | list[Text] | None = None
    seed: Annotated[StrictInt, Field(ge=0, lt=2**63)] | None = None  # torch.manual_seed's range
    stream: StrictBool = False
    stream_options: StreamOptions | None = None


class ChatRequest(SamplingRequest):
    messages: list[Message]
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None
    # refused unless they ask for nothing (see refuse_unsupported)
    tools: list | None = None
    functions: list | None = None
    tool_choice: Any = None
    function_call: Any = None
    response_format: dict | None = None


class CompletionRequest(SamplingRequest):
    prompt: Text | list[Text]
    logprobs: StrictInt | None = None  # the legacy shape: how many likeliest tokens beside each
    # refused unless they ask for nothing (see refuse_unsupported)
    echo: StrictBool | None = None
    suffix: Text | None = None
    best_of: StrictInt | None = None


def is_json(content_type: str | None) -> bool:
    """Whether a Content-Type names JSON; none at all is taken as JSON, as FastAPI takes it."""
    kind = (content_type or "application/json").partition(";")[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


def parse_request(engine: ChatEngine, raw: bytes, kind: type[SamplingRequest] = ChatRequest):
    """The request body as a `kind` (ChatRequest, CompletionRequest), or an OpenAI-shaped 400
    naming the field at fault. Parsed here rather than by FastAPI, which parses on the event loop,
    so that it can run off it; too many messages are refused before they are validated one by one
    (200,000 take seconds)."""
    try:
        data = json.loads(raw)
    except ValueError as error:  # JSONDecodeError, or bytes that are no UTF-8/16/32
        raise ApiError(400, f"the request body is not valid JSON: {error}") from None
    except RecursionError:
        raise ApiError(400, "the request body is not valid JSON: it is nested too deeply") from None
    if isinstance(data, dict) and isinstance(data.get("messages"), list):
        checked("messages", engine.check_length, data["messages"])
    try:
        return kind.model_validate(data)
    except ValidationError as error:
        raise invalid(error.errors()) from None


def refuse_unsupported(body: SamplingRequest) -> None:
    if isinstance(body, ChatRequest):
        asked = {
            "tools": bool(body.tools), "functions": bool(body.functions),
            "tool_choice": body.tool_choice not in (None, "none"),
            "function_call": body.function_call not in (None, "none"),
            "response_format": body.response_format not in (None, {"type": "text"}),
        }
        why = "no tools, no JSON mode"
    else:
        asked = {"echo": bool(body.echo), "suffix": bool(body.suffix),
                 "best_of": body.best_of is not None and body.best_of != (body.n or 1)}
        why = "the prompt is not repeated, nothing is inserted, and every reply generated is returned"
    for param, used in asked.items():
        if used:
            raise ApiError(400, f"{param} is not supported by this server ({why})", param, "unsupported_parameter")


def prompt_messages(engine: ChatEngine, body: ChatRequest) -> RequestPrompt:
    """The prompt of the request's messages, put together by the engine (utils.assembly, and the
    server's --client_system policy); each problem a 400 (404: no such role) naming the request field."""
    messages = [message.as_dict() for message in body.messages]
    try:
        return engine.request_prompt(body.model, messages)
    except UnknownModel as error:
        raise ApiError(404, str(error), "model", "model_not_found") from None
    except InputError as error:
        param, text = next(iter(error.problems.items()))
        param = "messages[0].content" if param == "system" else param  # the system prompt is too long
        raise ApiError(400, text if text.startswith("messages") else f"{param}: {text}", param) from None


def checked(param: str, check, *args):
    """Run a check (and return what it returns); its UserError becomes a 400 naming the request field."""
    try:
        return check(*args)
    except UserError as error:
        raise ApiError(400, renamed(str(error), check.__name__.removeprefix("check_"), param), param) from None


def renamed(message: str, name: str, param: str) -> str:
    """A check's message about `name` ("max_new_tokens must be ...") told about the request's field."""
    return param + message[len(name):] if message.startswith(name) else f"{param}: {message}"


def length_field(body: SamplingRequest) -> str:
    """The field that sets the reply's length: max_completion_tokens, OpenAI's newer name, when a chat
    request sets it, else max_tokens."""
    chat = isinstance(body, ChatRequest)
    return "max_completion_tokens" if chat and body.max_completion_tokens is not None else "max_tokens"


def sampling_of(engine: ChatEngine, body: SamplingRequest) -> tuple[Sampling, bool]:
    """The request's settings, the server's where it has none, checked by the engine; and whether
    max_tokens may be clamped to fit beside the prompt (when the client set none, or the server's
    --clamp_max_tokens says so)."""
    chat, length = isinstance(body, ChatRequest), length_field(body)
    max_tokens = getattr(body, length)
    defaults = engine.defaults
    if max_tokens is None:
        max_tokens = min(defaults.max_new_tokens, engine.max_new_tokens_limit)
    names = {"max_new_tokens": length, "logprobs": "top_logprobs" if chat else "logprobs"}
    if chat and body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs: it needs logprobs: true", "top_logprobs")
    logprobs = (body.top_logprobs or 0) if chat and body.logprobs else None if chat else body.logprobs
    sampling = Sampling(max_tokens, defaults.top_p if body.top_p is None else body.top_p,
                        defaults.temperature if body.temperature is None else body.temperature, body.seed,
                        top_k=body.top_k, min_p=body.min_p, repetition_penalty=body.repetition_penalty,
                        frequency_penalty=body.frequency_penalty or 0.0, presence_penalty=body.presence_penalty or 0.0,
                        logit_bias=token_biases(body.logit_bias), logprobs=logprobs)
    for field, problem in engine.check_sampling(sampling, any_length=True).items():
        name = names.get(field, field)
        raise ApiError(400, renamed(problem, field, name), name)
    return sampling, getattr(body, length) is None or engine.clamp_max_tokens


def token_biases(logit_bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias (token ids as JSON keys) as (id, bias) pairs; the engine checks the ids."""
    pairs = []
    for key, bias in (logit_bias or {}).items():
        if not key.isascii() or not key.strip().isdigit():
            raise ApiError(400, f"logit_bias: {key!r} is no token id (a whole number, as a string)", "logit_bias")
        pairs.append((int(key), bias))
    return tuple(pairs)


def choices_of(body: SamplingRequest) -> int:
    if body.n is not None and not 1 <= body.n <= MAX_N:
        raise ApiError(400, f"n must be a whole number between 1 and {MAX_N}, got {body.n}", "n")
    return body.n or 1


def stop_strings(body: SamplingRequest) -> tuple[str, ...]:
    stops = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if len(stops) > MAX_STOP_STRINGS:
        raise ApiError(400, f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}", "stop")
    if not all(stops):
        raise ApiError(400, "stop: a stop string must not be empty", "stop")
    if max(map(len, stops), default=0) > MAX_STOP_CHARS:
        raise ApiError(400, f"stop: a stop string may be at most {MAX_STOP_CHARS} characters long", "stop")
    if sum(map(len, stops)) > MAX_STOP_TOTAL:
        raise ApiError(400, f"stop: the stop strings may be at most {MAX_STOP_TOTAL} characters long together",
                       "stop")
    return stops


def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """What of `text` may be shown: up to the first stop string (True: one was found), else all but
    a tail that could be the start of one, held back until the next piece decides."""
    found = [at for stop in stops if (at := text.find(stop)) >= 0]
    if found:
        return text[:min(found)], True
    held = max((n for stop in stops for n in range(1, len(stop)) if text.endswith(stop[:n])), default=0)
    return text[:len(text) - held], False


# ---------------------------------------------------------------- one reply

# How far past the last shown token Choice looks for the text's end: the text lags the tokens by a
# partial word or a held-back stop string's start, a few tokens.
SHOWN_WINDOW = 64


def settle(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


class Choice:
    """One of a request's replies as its client sees it: `text`, cut at a stop string, and of the
    generated tokens the first `shown`, whose text lies within it (their log-probabilities go out
    with it; `starts`: where each begins in `text`). Followed in the reply's thread; `finished` is
    set last, once the rest is final."""

    def __init__(self, stream, stops: tuple[str, ...], tokenizer):
        self.stream, self.stops, self.tokenizer = stream, stops, tokenizer
        self.text, self.finished = "", False
        self.shown, self.starts, self._end = 0, [], 0

    def follow(self, changed) -> None:
        reply, hit = "", False
        for reply in self.stream:
            if not hit:
                self.text, hit = cut_at_stop(reply, self.stops)
                if hit:
                    self.stream.stop.set()  # the stream still ends normally, counting the tokens
                self._count_shown()
                changed()
        if not hit:
            self.text = reply  # the held-back tail began no stop string after all
        self._count_shown(everything=not hit)
        self.finished = True
        changed()

    def _count_shown(self, everything: bool = False) -> None:
        """Move `shown` on over the tokens whose text (decoded from the last shown one, as the
        streamer decodes) continues `text`: a token in the middle of a character (a byte of it)
        waits for the rest. Each pass looks at most SHOWN_WINDOW tokens ahead, so that text that
        never matches costs little. `everything`: the reply is whole and uncut, all its tokens are in."""
        entries, ids = self.stream.logprobs_so_far, self.stream.generated_ids
        if entries is None:
            return
        available = min(len(entries), len(ids))
        if available and ids[available - 1] in self.stream.eos_ids:  # the end of the reply, no text of its own
            available -= 1
        moved = True
        while moved:
            moved, pending = False, []
            for k in range(self.shown + 1, min(available, self.shown + SHOWN_WINDOW) + 1):
                pending.append(self._end)
                piece = self.tokenizer.decode(ids[self.shown:k], skip_special_tokens=True)
                if self.text.startswith(piece, self._end):
                    self.starts += pending
                    self.shown, self._end, moved = k, self._end + len(piece), True
                    break
        if everything:  # what still did not match (text the streamer decoded otherwise) starts at the end
            self.starts += [self._end] * (available - self.shown)
            self.shown = available


class Reply:
    """A request's replies (`choices`), generated one after another in a thread of their own: it
    takes a place in `slots` (or is turned away), waits for a generation slot and holds it for all
    of them. The event loop reads the choices each time `changed` is set; `cancel` ends them at the
    next token."""

    def __init__(self, slots, choices: list[Choice]):
        self.slots, self.choices = slots, choices
        self.done, self.error = False, None
        self.cancelled = threading.Event()
        self._loop = asyncio.get_running_loop()
        self.changed = asyncio.Event()
        self.admitted = self._loop.create_future()  # False: turned away
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        try:
            with self.slots.place() as turn:
                self._loop.call_soon_threadsafe(settle, self.admitted, True)
                with turn(self.cancelled):
                    for choice in self.choices:
                        if self.cancelled.is_set():
                            break
                        choice.follow(self._changed)
        except Busy:
            self._loop.call_soon_threadsafe(settle, self.admitted, False)
        except Cancelled:
            pass
        except Exception as error:  # noqa: BLE001 - reported to the client as a 500
            logger.exception("generation failed")
            self.error = error
        finally:
            self.done = True
            self._changed()

    def _changed(self) -> None:
        self._loop.call_soon_threadsafe(self.changed.set)

    def cancel(self) -> None:
        self.cancelled.set()
        for choice in self.choices:
            choice.stream.stop.set()

    async def updates(self):
        """Each time the replies change, until they are done."""
        while True:
            await self.changed.wait()
            self.changed.clear()
            done = self.done  # read first: once done, the choices are final
            yield
            if done:
                return

    def usage(self) -> dict:
        """The prompt once (every choice has the same), and every choice's tokens."""
        prompt = self.choices[0].stream.prompt_tokens
        completion = sum(choice.stream.completion_tokens for choice in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def failure(self) -> ApiError:
        return ApiError(500, f"generation failed: {type(self.error).__name__}: {self.error}", kind="server_error")


# ---------------------------------------------------------------- the shapes of a reply

# JSON has no -inf: a log-probability below this is sent as this, as vLLM does
MIN_LOGPROB = -9999.0


def token_entry(tokenizer, token_id: int, logprob: float) -> dict:
    raw = token_bytes(tokenizer, token_id)
    return {"token": raw.decode("utf-8", errors="replace"), "logprob": max(logprob, MIN_LOGPROB), "bytes": list(raw)}


class ChatShape:
    """The chat completion's objects (choices[].message, choices[].delta; logprobs.content[])."""

    object, chunk_object, prefix = "chat.completion", "chat.completion.chunk", "chatcmpl-"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def opening(self, index: int) -> dict | None:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def delta(self, index: int, text: str, logprobs, finish_reason=None) -> dict:
        return {"index": index, "delta": {"content": text} if text else {}, "logprobs": logprobs,
                "finish_reason": finish_reason}

    def whole(self, index: int, choice: Choice) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": choice.text},
                "logprobs": self.logprobs(choice, 0, choice.shown), "finish_reason": choice.stream.finish_reason}

    def logprobs(self, choice: Choice, start: int, end: int) -> dict | None:
        """OpenAI's logprobs of the tokens start..end of `choice`, None without logprobs."""
        entries = choice.stream.logprobs_so_far
        if entries is None:
            return None
        return {"content": [{**token_entry(self.tokenizer, token, logprob),
                             "top_logprobs": [token_entry(self.tokenizer, i, value) for i, value in top]}
                            for token, logprob, top in entries[start:end]]}


class TextShape(ChatShape):
    """The legacy text completion's objects (choices[].text; logprobs as tokens, token_logprobs,
    top_logprobs and text_offset lists)."""

    object, chunk_object, prefix = "text_completion", "text_completion", "cmpl-"

    def opening(self, index: int) -> dict | None:
        return None

    def delta(self, index: int, text: str, logprobs, finish_reason=None) -> dict:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    def whole(self, index: int, choice: Choice) -> dict:
        return self.delta(index, choice.text, self.logprobs(choice, 0, choice.shown), choice.stream.finish_reason)

    def logprobs(self, choice: Choice, start: int, end: int) -> dict | None:
        entries = choice.stream.logprobs_so_far
        if entries is None:
            return None
        picked = [token_entry(self.tokenizer, token, logprob) for token, logprob, _ in entries[start:end]]
        return {"tokens": [entry["token"] for entry in picked], "token_logprobs": [e["logprob"] for e in picked],
                "top_logprobs": [{e["token"]: e["logprob"] for e in (token_entry(self.tokenizer, i, value)
                                                                       for i, value in top)}
                                 for _, _, top in entries[start:end]],
                "text_offset": choice.starts[start:end]}


def sse(data) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def events(reply: Reply, head: dict, include_usage: bool, shape: ChatShape):
    """The streamed replies as server-sent events, OpenAI's chunk objects: each choice's pieces
    under its `index`, one choice after another."""
    def chunk(choices: list, **extra) -> str:
        return sse({**head, "object": shape.chunk_object, "choices": choices,
                    **({"usage": None} if include_usage else {}), **extra})

    count = len(reply.choices)
    try:
        for index in range(count):
            if (opening := shape.opening(index)) is not None:
                yield chunk([opening])
        sent, tokens, closed = [0] * count, [0] * count, [False] * count
        async for _ in reply.updates():
            for index, choice in enumerate(reply.choices):
                if closed[index]:
                    continue
                finished = choice.finished  # read first: once finished, its text and tokens are final
                text, shown = choice.text, choice.shown
                if len(text) > sent[index] or shown > tokens[index]:
                    yield chunk([shape.delta(index, text[sent[index]:], shape.logprobs(choice, tokens[index], shown))])
                    sent[index], tokens[index] = len(text), shown
                if finished:
                    yield chunk([shape.delta(index, "", None, choice.stream.finish_reason)])
                    closed[index] = True
        if reply.error is not None:
            yield sse(reply.failure().body())
        elif include_usage:
            yield chunk([], usage=reply.usage())
        yield "data: [DONE]\n\n"
    finally:  # also when the client went away (Starlette cancels the stream): end the generation now
        reply.cancel()


async def until_done(reply: Reply, request: Request) -> None:
    """Wait for whole replies; a client that disconnects meanwhile ends them."""
    async def watch():
        while (await request.receive())["type"] != "http.disconnect":
            pass
        reply.cancel()

    watcher = asyncio.create_task(watch())
    try:
        async for _ in reply.updates():
            pass
    finally:
        watcher.cancel()


# ---------------------------------------------------------------- the routes


def prompt_text(body: CompletionRequest) -> str:
    """The completion's prompt: a string, or a list of one (OpenAI's batch of prompts is not served)."""
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise ApiError(400, f"prompt: one prompt per request, got a list of {len(prompt)}", "prompt")
        prompt = prompt[0]
    if not prompt:
        raise ApiError(400, "prompt: the prompt is empty", "prompt")
    return prompt


def prepare(engine: ChatEngine, body: SamplingRequest, state=None) -> list[Choice]:
    """The choices of the reply to `body` (not started), once every check has passed. Linear in
    the request's size, and run off the event loop (tokenising too): a huge request delays no other.
    Only the first choice is seeded: the others go on from torch's generator, so that with a seed
    the n replies are reproducible, and differ. A chat's prompt is kept on `state` (the request's),
    for its log line."""
    refuse_unsupported(body)
    chat = isinstance(body, ChatRequest)
    if chat:
        request_prompt = prompt_messages(engine, body)
        prompt = request_prompt.messages
        if state is not None:
            state.prompt = request_prompt
            if requests_log.isEnabledFor(logging.INFO):  # counted here, off the event loop, for log_line
                from baichuan.generation_utils import encode_text

                state.system_tokens = len(encode_text(engine.tokenizer, request_prompt.system))
    else:
        prompt = prompt_text(body)
    (sampling, clamp), stops, count = sampling_of(engine, body), stop_strings(body), choices_of(body)
    length = length_field(body)
    start = engine.start_reply if chat else engine.start_completion
    choices = []
    for index in range(count):
        try:
            if index == 0:
                stream = start(prompt, sampling, threading.Event(), clamp)
            else:  # the first one's prompt ids, not the prompt tokenised again
                stream = engine.start_again(choices[0].stream, replace(sampling, seed=None), threading.Event(), clamp)
        except InputError as error:  # the prompt and max_tokens do not fit together, or the prompt alone
            field, problem = next(iter(error.problems.items()))
            param = length if field == "max_new_tokens" else field
            hint = ", or shorten the prompt" if engine.clamp_max_tokens else \
                f": lower {param} or shorten the prompt (this server does not clamp it: --clamp_max_tokens)"
            raise ApiError(400, f"{param}: {problem}{hint if param == length else ''}", param) from None
        except UserError as error:
            raise ApiError(400, str(error), "messages") from None
        choices.append(Choice(stream, stops, engine.tokenizer))
    return choices


def log_line(engine: ChatEngine, request: Request, status: str) -> str:
    """The request log's line: the client, the policy, where the system prompt came from and its
    tokens, the parameters used and ignored, the status."""
    client = f"{request.client.host}:{request.client.port}" if request.client else "-"
    body, prompt = getattr(request.state, "body", None), getattr(request.state, "prompt", None)
    fields = [client, f"{request.method} {request.url.path}", f"policy={engine.client_system}"]
    if body is not None:
        fields.append(f"model={body.model!r}")
    if prompt is not None:
        tokens = getattr(request.state, "system_tokens", "?")
        fields.append(f"system={prompt.source!r} ({tokens} tokens){' prefill' if prompt.prefill else ''}")
    if body is not None:
        used = sorted(body.model_fields_set & type(body).model_fields.keys() - {"model", "messages", "prompt"})
        fields += [f"used={','.join(used) or '-'}", f"ignored={','.join(sorted(body.model_extra or ())) or '-'}"]
    return " ".join([*fields, f"status={status}"])


def logged(engine: ChatEngine, route):
    """`route`, writing one requests_log line per request once its status is known."""
    @functools.wraps(route)
    async def answer(request: Request):
        if not requests_log.isEnabledFor(logging.INFO):
            return await route(request)
        try:
            response = await route(request)
        except ApiError as error:
            requests_log.info(log_line(engine, request, f"{error.status} {error.code or error.kind}"))
            raise
        except Exception:
            requests_log.info(log_line(engine, request, "500"))
            raise
        streamed = isinstance(response, StreamingResponse)
        requests_log.info(log_line(engine, request, "200 stream" if streamed else "200"))
        return response

    return answer


def router(engine: ChatEngine) -> APIRouter:
    """The routes; the key is checked before them, on the headers alone (utils.guard.RequestLimits)."""
    routes = APIRouter(prefix="/v1")
    created = int(time.time())

    names = [*engine.roles, *([engine.client_model] if engine.client_model else [])]

    def card(name: str) -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "roleplay"}

    @routes.get("/models")
    def models():
        return {"object": "list", "data": [card(name) for name in names]}

    @routes.get("/models/{name:path}")  # a role's name may hold a '/'
    def model(name: str):
        if name not in names:
            raise ApiError(404, f"The model `{name}` does not exist", "model", "model_not_found")
        return card(name)

    async def answer(request: Request, kind: type[SamplingRequest], shape: ChatShape):
        if not is_json(request.headers.get("content-type")):
            raise ApiError(400, "the request body must be a JSON object, sent as application/json")
        raw = await request.body()
        # reading the request and preparing its prompt are linear in its size, but a large one
        # still takes a while: off the event loop, where it would hold up every other request
        body = request.state.body = await run_in_threadpool(parse_request, engine, raw, kind)
        reply = Reply(engine.slots, await run_in_threadpool(prepare, engine, body, request.state))
        if not await reply.admitted:
            raise ApiError(429, "every generation slot and waiting place is taken; try again in a moment",
                           code="rate_limit_exceeded", kind="requests", headers={"Retry-After": str(RETRY_AFTER_S)})
        head = {"id": f"{shape.prefix}{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            # the stop also after the response, for a client gone before the stream even began
            return StreamingResponse(events(reply, head, include_usage, shape), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"}, background=BackgroundTask(reply.cancel))
        await until_done(reply, request)
        if reply.error is not None:
            raise reply.failure()
        return {**head, "object": shape.object, "choices": [shape.whole(i, c) for i, c in enumerate(reply.choices)],
                "usage": reply.usage()}

    async def chat_completions(request: Request):
        return await answer(request, ChatRequest, ChatShape(engine.tokenizer))

    async def completions(request: Request):
        return await answer(request, CompletionRequest, TextShape(engine.tokenizer))

    routes.add_api_route("/chat/completions", logged(engine, chat_completions), methods=["POST"])
    routes.add_api_route("/completions", logged(engine, completions), methods=["POST"])

    @routes.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    def unknown(path: str, request: Request):
        raise ApiError(404, f"Invalid URL ({request.method} /v1/{path})")

    return routes


def not_under_v1_message(request: Request) -> str:
    base = str(request.base_url).rstrip("/")
    return (f"Invalid URL ({request.method} {request.url.path}): this server's OpenAI-compatible API is under "
            f"/v1; use the base URL {base}/v1")


def field_path(loc) -> str:
    """`messages[0].content` from pydantic's ('messages', 0, 'content', 'str'): the names of failed
    union members ('str', 'list[TextPart]') are left out."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part not in ("str", "int", "float", "bool", "none") and "[" not in part:
            path += f".{part}" if path else part
    return path


def invalid(problems: list[dict]) -> ApiError:
    """pydantic's problems with a request body as OpenAI's 400: the most specific one, its field."""
    worst = max(problems, key=lambda problem: len(problem["loc"]))
    param = field_path(worst["loc"])
    if not param:
        return ApiError(400, "the request body must be a JSON object, sent as application/json")
    return ApiError(400, f"{param}: {worst['msg']}", param)


def http_error(request: Request, error: HTTPException) -> JSONResponse:
    """Starlette's errors in OpenAI's shape; a 404 outside /v1 says where the API is."""
    message = str(error.detail)
    path = request.url.path
    if error.status_code == 404 and not (path == "/v1" or path.startswith("/v1/")):
        message = not_under_v1_message(request)
    return ApiError(error.status_code, message, headers=error.headers).response()


async def page_not_found(request: Request, error: HTTPException):
    """For the page's app (web_demo.py mounts it at the root, which takes every path the API does
    not): a path it has no route for (Starlette's bare "Not Found") says where the API is; its own
    404s (a missing file, ...) stay as the page sends them."""
    if error.detail == "Not Found":
        return ApiError(404, not_under_v1_message(request)).response()
    from fastapi.exception_handlers import http_exception_handler

    return await http_exception_handler(request, error)


def server_error(request, error: Exception) -> JSONResponse:
    """Any other failure as OpenAI's 500, its traceback in the log only (Starlette logs it)."""
    return ApiError(500, f"internal server error ({type(error).__name__})", kind="server_error").response()


def api_app(engine: ChatEngine, api_key: str | None = None, limits=None) -> FastAPI:
    """The API alone, as an app (no docs pages: they would be one more thing to secure). web_demo.py
    mounts its page on it, after the API's routes, which then answer /v1/* first. The boundary
    (utils.guard: the key on the headers, `limits`, default Limits()) wraps the app, the page too."""
    from utils.guard import Limits, protect

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(router(engine))
    protect(app, api_key, limits or Limits())
    app.add_exception_handler(ApiError, lambda request, error: error.response())
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, server_error)
    return app

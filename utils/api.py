"""The OpenAI-compatible chat API that web_demo.py serves beside its page: the same model, the same
prompt contract (utils.chat, baichuan.generation_utils) and the same bound on generation
(chat.slots), so a SillyTavern, Open WebUI or `openai` client and the page wait in one line.

    GET  /v1/models              the model's roles, one model each
    GET  /v1/models/{role}       one of them
    POST /v1/chat/completions    a reply, whole or streamed (server-sent events, then `data: [DONE]`)

`model` names a role, whose trained system prompt opens the prompt. Leading `system` (or
`developer`) messages replace it, joined by blank lines: a card-driven front end plays its own
character. With such a message any `model` name is taken (a front end sends whatever name its
user picked); without one, a name that is no role is a 404. A system message after the
conversation has started is refused (the layout has one system prompt).

Honoured: max_tokens (or max_completion_tokens; default the server's --max_new_tokens, at most
half the context), temperature (0..2, 0 or below 1e-5 = greedy), top_p, stop (up to 4 strings of
at most 256 characters: the reply ends before the first, which is not included), seed (0 <= seed
< 2**63), stream and stream_options.include_usage. A string that is no valid Unicode (a lone
surrogate such as "\\ud800") is a 400.
Refused with a 400: n > 1, tools and functions, logprobs, a response_format other than text.
Other fields (frequency_penalty, logit_bias, user, ...) are ignored, as many local servers do.
`usage` counts the prompt's tokens and every token generated (eos excluded); finish_reason is
"length" when max_tokens ended the reply, else "stop".

Every error has OpenAI's shape {"error": {"message", "type", "param", "code"}}: 400 bad request,
401 no or wrong key, 404 unknown model or path, 429 every generation slot and waiting place
taken (with Retry-After), 500 generation failed (or any other server error; its traceback goes to
the log only). A client that goes away, mid-stream or while waiting, ends its generation at the
next token and frees its place.
"""

import asyncio
import json
import logging
import threading
import time
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from utils import UserError
from utils.chat import (
    CHARS_PER_TOKEN_BOUND,
    Busy,
    Cancelled,
    Sampling,
    check_max_new_tokens,
    check_message,
    check_temperature,
    check_top_p,
    content_text,
    newest_history,
    start_reply,
)

logger = logging.getLogger("web_demo.api")

RETRY_AFTER_S = 1
MAX_STOP_STRINGS = 4  # as OpenAI
MAX_STOP_CHARS = 256  # cut_at_stop's hold-back costs the square of a stop string's length, for each piece
SYSTEM_ROLES = ("system", "developer")  # "developer" is the newer OpenAI name of the system message


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

    def text(self) -> str:
        return content_text(self.model_dump()["content"])  # the page's join of text parts


class StreamOptions(_Lenient):
    include_usage: StrictBool = False


class ChatRequest(_Lenient):
    model: Text
    messages: list[Message]
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    temperature: StrictFloat | None = None
    top_p: StrictFloat | None = None
    stop: Text | list[Text] | None = None
    seed: Annotated[StrictInt, Field(ge=0, lt=2**63)] | None = None  # torch.manual_seed's range
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    # refused unless they ask for nothing (see refuse_unsupported)
    n: StrictInt | None = None
    tools: list | None = None
    functions: list | None = None
    tool_choice: Any = None
    function_call: Any = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None
    response_format: dict | None = None


def refuse_unsupported(body: ChatRequest) -> None:
    asked = {
        "n": body.n not in (None, 1),
        "tools": bool(body.tools), "functions": bool(body.functions),
        "tool_choice": body.tool_choice not in (None, "none"),
        "function_call": body.function_call not in (None, "none"),
        "logprobs": bool(body.logprobs), "top_logprobs": bool(body.top_logprobs),
        "response_format": body.response_format not in (None, {"type": "text"}),
    }
    for param, used in asked.items():
        if used:
            raise ApiError(400, f"{param} is not supported by this server (one text reply per request, "
                                f"no tools, no logprobs, no JSON mode)", param, "unsupported_parameter")


def checked(param: str, check, *args) -> None:
    """Run a utils.chat check; its UserError becomes a 400 naming the request field."""
    try:
        check(*args)
    except UserError as error:
        message, name = str(error), check.__name__.removeprefix("check_")
        message = param + message[len(name):] if message.startswith(name) else f"{param}: {message}"
        raise ApiError(400, message, param) from None


def prompt_messages(chat, body: ChatRequest) -> list[dict]:
    """The system prompt (the request's own, else the role's) and the conversation, checked."""
    systems = []
    while len(systems) < len(body.messages) and body.messages[len(systems)].role in SYSTEM_ROLES:
        systems.append(body.messages[len(systems)].text())
    conversation = []
    for i, message in enumerate(body.messages[len(systems):], start=len(systems)):
        if message.role in SYSTEM_ROLES:
            raise ApiError(400, f"messages[{i}]: a system message may only come before the conversation (the "
                                f"model has one system prompt; SillyTavern: Prompt Post-Processing 'Semi-strict')",
                           f"messages[{i}].role")
        conversation.append({"role": message.role, "content": message.text()})
    if not conversation:
        raise ApiError(400, "messages: there is no user message to answer", "messages")
    role = chat.roles.get(body.model)
    if not systems and role is None:
        raise ApiError(404, f"The model `{body.model}` does not exist: use one of this server's roles "
                            f"({', '.join(chat.roles)}), or send your own system message", "model", "model_not_found")
    system = "\n\n".join(systems) if systems else role.system
    if len(system) > CHARS_PER_TOKEN_BOUND * chat.model_max_length:
        raise ApiError(400, f"the system prompt is too long ({len(system)} characters)", "messages[0].content")
    checked(f"messages[{len(body.messages) - 1}].content", check_message, conversation[-1]["content"],
            chat.max_message_chars)
    return [{"role": "system", "content": system}, *newest_history(conversation, chat.model_max_length)]


def sampling_of(chat, body: ChatRequest, defaults: Sampling) -> Sampling:
    """The request's settings, the server's where it has none."""
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if max_tokens is None:
        max_tokens = min(defaults.max_new_tokens, chat.max_new_tokens_limit)
    checked(param, check_max_new_tokens, max_tokens, chat.max_new_tokens_limit)
    temperature = defaults.temperature if body.temperature is None else body.temperature
    top_p = defaults.top_p if body.top_p is None else body.top_p
    checked("temperature", check_temperature, temperature)
    checked("top_p", check_top_p, top_p)
    return Sampling(max_tokens, top_p, temperature, body.seed)


def stop_strings(body: ChatRequest) -> tuple[str, ...]:
    stops = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if len(stops) > MAX_STOP_STRINGS:
        raise ApiError(400, f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}", "stop")
    if not all(stops):
        raise ApiError(400, "stop: a stop string must not be empty", "stop")
    if max(map(len, stops), default=0) > MAX_STOP_CHARS:
        raise ApiError(400, f"stop: a stop string may be at most {MAX_STOP_CHARS} characters long", "stop")
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


def settle(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


class Reply:
    """One reply, generated in a thread of its own: it takes a place in `slots` (or is turned away),
    waits for a generation slot, and streams. The event loop reads `text` (cut at a stop string)
    and `done` each time `changed` is set; setting `stream.stop` ends it at the next token."""

    def __init__(self, slots, stream, stops: tuple[str, ...]):
        self.slots, self.stream, self.stops = slots, stream, stops
        self.text, self.done, self.error = "", False, None
        self._loop = asyncio.get_running_loop()
        self.changed = asyncio.Event()
        self.admitted = self._loop.create_future()  # False: turned away
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        try:
            with self.slots.place() as turn:
                self._loop.call_soon_threadsafe(settle, self.admitted, True)
                with turn(self.stream.stop):
                    self._follow()
        except Busy:
            self._loop.call_soon_threadsafe(settle, self.admitted, False)
        except Cancelled:
            pass
        except Exception as error:  # noqa: BLE001 - reported to the client as a 500
            logger.exception("generation failed")
            self.error = error
        finally:
            self.done = True
            self._loop.call_soon_threadsafe(self.changed.set)

    def _follow(self) -> None:
        reply, hit = "", False
        for reply in self.stream:
            if not hit:
                self.text, hit = cut_at_stop(reply, self.stops)
                if hit:
                    self.stream.stop.set()  # the stream still ends normally, counting the tokens
                self._loop.call_soon_threadsafe(self.changed.set)
        if not hit:
            self.text = reply  # the held-back tail began no stop string after all

    async def updates(self):
        """(text, done) each time the reply changes, until it is done."""
        while True:
            await self.changed.wait()
            self.changed.clear()
            done = self.done  # read first: once done, the text is final
            yield self.text, done
            if done:
                return

    def usage(self) -> dict:
        prompt, completion = self.stream.prompt_tokens, self.stream.completion_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def failure(self) -> ApiError:
        return ApiError(500, f"generation failed: {type(self.error).__name__}: {self.error}", kind="server_error")


def sse(data) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def events(reply: Reply, head: dict, include_usage: bool):
    """The streamed reply as server-sent events, OpenAI's chunk objects."""
    def chunk(delta: dict, finish_reason=None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return sse({**head, "object": "chat.completion.chunk", "choices": [choice],
                    **({"usage": None} if include_usage else {})})

    try:
        yield chunk({"role": "assistant", "content": ""})
        sent = 0
        async for text, _ in reply.updates():
            if len(text) > sent:
                yield chunk({"content": text[sent:]})
                sent = len(text)
        if reply.error is not None:
            yield sse(reply.failure().body())
        else:
            yield chunk({}, reply.stream.finish_reason)
            if include_usage:
                yield sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": reply.usage()})
        yield "data: [DONE]\n\n"
    finally:  # also when the client went away (Starlette cancels the stream): end the generation now
        reply.stream.stop.set()


async def until_done(reply: Reply, request: Request) -> None:
    """Wait for a whole reply; a client that disconnects meanwhile ends it."""
    async def watch():
        while (await request.receive())["type"] != "http.disconnect":
            pass
        reply.stream.stop.set()

    watcher = asyncio.create_task(watch())
    try:
        async for _ in reply.updates():
            pass
    finally:
        watcher.cancel()


# ---------------------------------------------------------------- the routes


def router(chat, defaults: Sampling) -> APIRouter:
    """The routes; the key is checked before them, on the headers alone (utils.guard.RequestLimits)."""
    routes = APIRouter(prefix="/v1")
    created = int(time.time())

    def card(name: str) -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "roleplay"}

    @routes.get("/models")
    def models():
        return {"object": "list", "data": [card(name) for name in chat.roles]}

    @routes.get("/models/{name:path}")  # a role's name may hold a '/'
    def model(name: str):
        if name not in chat.roles:
            raise ApiError(404, f"The model `{name}` does not exist", "model", "model_not_found")
        return card(name)

    @routes.post("/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        refuse_unsupported(body)
        messages, sampling, stops = prompt_messages(chat, body), sampling_of(chat, body, defaults), stop_strings(body)
        try:
            stream = await run_in_threadpool(start_reply, chat.model, chat.tokenizer, messages, sampling,
                                             threading.Event())
        except UserError as error:
            raise ApiError(400, str(error), "messages") from None
        reply = Reply(chat.slots, stream, stops)
        if not await reply.admitted:
            raise ApiError(429, "every generation slot and waiting place is taken; try again in a moment",
                           code="rate_limit_exceeded", kind="requests", headers={"Retry-After": str(RETRY_AFTER_S)})
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            # the stop also after the response, for a client gone before the stream even began
            return StreamingResponse(events(reply, head, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"}, background=BackgroundTask(stream.stop.set))
        await until_done(reply, request)
        if reply.error is not None:
            raise reply.failure()
        message = {"role": "assistant", "content": reply.text}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": stream.finish_reason}
        return {**head, "object": "chat.completion", "choices": [choice], "usage": reply.usage()}

    @routes.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    def unknown(path: str, request: Request):
        raise ApiError(404, f"Invalid URL ({request.method} /v1/{path})")

    return routes


def field_path(loc) -> str:
    """`messages[0].content` from pydantic's ('body', 'messages', 0, 'content', 'str'): the
    names of failed union members ('str', 'list[TextPart]') are left out."""
    path = ""
    for part in loc[1:]:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part not in ("str", "int", "float", "bool", "none") and "[" not in part:
            path += f".{part}" if path else part
    return path


def validation_error(request, error: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 for a malformed body, as OpenAI's 400: the most specific problem, its field."""
    problems = error.errors()
    worst = max(problems, key=lambda problem: len(problem["loc"]))
    if worst["type"] == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON: {worst['ctx']['error']}").response()
    param = field_path(worst["loc"])
    if not param:
        return ApiError(400, "the request body must be a JSON object, sent as application/json").response()
    return ApiError(400, f"{param}: {worst['msg']}", param).response()


def server_error(request, error: Exception) -> JSONResponse:
    """Any other failure as OpenAI's 500, its traceback in the log only (Starlette logs it)."""
    return ApiError(500, f"internal server error ({type(error).__name__})", kind="server_error").response()


def add_api(app: FastAPI, chat, defaults: Sampling) -> None:
    """Serve the API from `app`, before anything mounted at its root can answer /v1/* instead."""
    app.include_router(router(chat, defaults))
    app.add_exception_handler(ApiError, lambda request, error: error.response())
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, lambda request, error: ApiError(
        error.status_code, str(error.detail), headers=error.headers).response())
    app.add_exception_handler(Exception, server_error)

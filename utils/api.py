"""The OpenAI-compatible chat API that web_demo.py serves beside its page: the same model, the same
prompt contract and the same bound on generation: one utils.engine.ChatEngine answers both, so a
SillyTavern, Open WebUI or `openai` client and the page wait in one line.

    GET  /v1/models              the model's roles, one model each, and the client's-own-prompt id
    GET  /v1/models/{role}       one of them
    POST /v1/chat/completions    a reply, whole or streamed (server-sent events, then `data: [DONE]`)

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

Honoured: max_tokens (or max_completion_tokens; default the server's --max_new_tokens, at most
half the context), temperature (0..2, 0 or below 1e-5 = greedy), top_p, stop (up to 4 strings of
at most 256 characters: the reply ends before the first, which is not included), seed (0 <= seed
< 2**63), stream and stream_options.include_usage. A string that is no valid Unicode (a lone
surrogate such as "\\ud800") is a 400.
Refused with a 400: n > 1, tools and functions, logprobs, a response_format other than text.
A conversation of more messages than the server's --max_messages is a 400 naming the limit.
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
import functools
import json
import logging
import threading
import time
import uuid
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

from utils import UserError
from utils.chat import Busy, Cancelled, Sampling, content_text
from utils.engine import ChatEngine, InputError, RequestPrompt, UnknownModel

logger = logging.getLogger("web_demo.api")
# one line per request, at INFO (web_demo.py --log_requests shows them)
requests_log = logging.getLogger("web_demo.requests")

RETRY_AFTER_S = 1
MAX_STOP_STRINGS = 4  # as OpenAI
MAX_STOP_CHARS = 256  # cut_at_stop's hold-back costs the square of a stop string's length, for each piece


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


class ChatRequest(BaseModel):
    # the fields this API has no use for are kept, unread, for the request log's "ignored"
    model_config = ConfigDict(extra="allow")

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


def is_json(content_type: str | None) -> bool:
    """Whether a Content-Type names JSON; none at all is taken as JSON, as FastAPI takes it."""
    kind = (content_type or "application/json").partition(";")[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


def parse_request(engine: ChatEngine, raw: bytes) -> ChatRequest:
    """The request body as a ChatRequest, or an OpenAI-shaped 400 naming the field at fault. Parsed
    here rather than by FastAPI, which parses on the event loop, so that it can run off it; too
    many messages are refused before they are validated one by one (200,000 take seconds)."""
    try:
        data = json.loads(raw)
    except ValueError as error:  # JSONDecodeError, or bytes that are no UTF-8/16/32
        raise ApiError(400, f"the request body is not valid JSON: {error}") from None
    except RecursionError:
        raise ApiError(400, "the request body is not valid JSON: it is nested too deeply") from None
    if isinstance(data, dict) and isinstance(data.get("messages"), list):
        checked("messages", engine.check_length, data["messages"])
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as error:
        raise invalid(error.errors()) from None


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


def sampling_of(engine: ChatEngine, body: ChatRequest) -> Sampling:
    """The request's settings, the server's where it has none, checked by the engine."""
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    defaults = engine.defaults
    if max_tokens is None:
        max_tokens = min(defaults.max_new_tokens, engine.max_new_tokens_limit)
    sampling = Sampling(max_tokens, defaults.top_p if body.top_p is None else body.top_p,
                        defaults.temperature if body.temperature is None else body.temperature, body.seed)
    for field, problem in engine.check_sampling(sampling).items():
        name = param if field == "max_new_tokens" else field
        raise ApiError(400, renamed(problem, field, name), name)
    return sampling


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


def prepare(engine: ChatEngine, body: ChatRequest, state=None):
    """The stream of the reply to `body` (not started) and its stop strings, once every check has
    passed. Linear in the request's size, and run off the event loop (tokenising too): a huge
    request delays no other. The prompt is kept on `state` (the request's), for its log line."""
    refuse_unsupported(body)
    prompt, sampling, stops = prompt_messages(engine, body), sampling_of(engine, body), stop_strings(body)
    if state is not None:
        state.prompt = prompt
    try:
        return engine.start_reply(prompt.messages, sampling, threading.Event()), stops
    except UserError as error:
        raise ApiError(400, str(error), "messages") from None


def log_line(engine: ChatEngine, request: Request, status: str) -> str:
    """The request log's line: the client, the policy, where the system prompt came from and its
    tokens, the parameters used and ignored, the status."""
    client = f"{request.client.host}:{request.client.port}" if request.client else "-"
    body, prompt = getattr(request.state, "body", None), getattr(request.state, "prompt", None)
    fields = [client, f"{request.method} {request.url.path}", f"policy={engine.client_system}"]
    if body is not None:
        fields.append(f"model={body.model!r}")
    if prompt is not None:
        from baichuan.generation_utils import encode_text  # torch: loaded by then, the model is

        tokens = len(encode_text(engine.tokenizer, prompt.system))
        fields.append(f"system={prompt.source!r} ({tokens} tokens){' prefill' if prompt.prefill else ''}")
    if body is not None:
        used = sorted(body.model_fields_set & ChatRequest.model_fields.keys() - {"model", "messages"})
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

    async def chat_completions(request: Request):
        if not is_json(request.headers.get("content-type")):
            raise ApiError(400, "the request body must be a JSON object, sent as application/json")
        raw = await request.body()
        # reading the request and preparing its prompt are linear in its size, but a large one
        # still takes a while: off the event loop, where it would hold up every other request
        body = request.state.body = await run_in_threadpool(parse_request, engine, raw)
        stream, stops = await run_in_threadpool(prepare, engine, body, request.state)
        reply = Reply(engine.slots, stream, stops)
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

    routes.add_api_route("/chat/completions", logged(engine, chat_completions), methods=["POST"])

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

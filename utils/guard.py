"""The serving boundary of web_demo.py's app (the OpenAI-compatible API under /v1 and the page at /):
what is checked on a request's headers before its body is read, the bounds on how much and how
slowly a client may send, and what the page lets chat text become.

    protect(app, api_key, limits)  installs, outermost first: HostCheck, Starlette's CORSMiddleware,
                                   RequestLimits
    timed_h11(read_timeout)        uvicorn's h11 protocol with a deadline on a request's headers
    CHAT_TEXT_TAGS, PAGE_CSP       what the page's chat shows as text, and what the page may fetch

The checks, in order:
  1. HostCheck: the Host header must name this server (a loopback name, the --host it listens on,
     or an --allowed_host), else 400: a web page that rebinds its own DNS name to 127.0.0.1 reaches
     nothing. A wildcard --host (0.0.0.0, ::) takes any name, as Ollama does: such a server needs a
     key, and who may use it is the key's question. A CORS preflight is refused here (400, no
     CORS header) unless --cors_origin names an origin.
  2. CORSMiddleware, with the --cors_origin list (empty by default): it also turns Gradio's own
     CORS middleware off, which otherwise lets any localhost origin read the page's routes with
     credentials (gr.mount_gradio_app: "If it configures its own CORSMiddleware, Gradio will not
     add its own CORS headers").
  3. RequestLimits: an IP with too many failed keys or page logins in the last minute gets 429
     (with Retry-After) on /v1 and on the login; a /v1 request without the key gets 401 from its
     headers alone, so neither `Expect: 100-continue` nor a body is ever answered or read for it;
     a body over --max_body_bytes is a 413 (by its Content-Length, or as it arrives when chunked);
     a body that has not fully arrived --read_timeout seconds after its headers is a 408. An
     answer given before the body was read closes the connection, so the rest is never read.
"""

import asyncio
import hmac
import ipaddress
import re
import time
from collections import deque
from dataclasses import dataclass, field

MAX_BODY_BYTES = 4 * 1024 * 1024  # a chat request is kilobytes; a whole context of text is well under 1 MiB
READ_TIMEOUT_S = 30.0
AUTH_FAILURES_PER_MINUTE = 10
TRACKED_IPS = 4096  # the failure records kept; the oldest IP's goes first
LOGIN_PATHS = ("/login", "/login/")  # Gradio's login form posts here (400 on a wrong password)

# Tags that the page's chat shows as text (Gradio's Chatbot `allow_tags` escapes the tags listed):
# forms and their controls, frames, embedded objects and media, and what changes the page's head.
# Markdown's own tags (and the copy button Gradio puts on code blocks) still render, through
# Gradio's sanitiser, which drops scripts and event handlers. A markdown image becomes text too.
CHAT_TEXT_TAGS = [
    "form", "input", "textarea", "select", "option", "optgroup", "datalist", "label", "fieldset", "legend",
    "output", "keygen", "iframe", "frame", "frameset", "object", "embed", "applet", "portal", "img", "image",
    "picture", "source", "video", "audio", "track", "bgsound", "canvas", "map", "area", "link", "meta",
    "base", "style", "dialog", "marquee", "math",
]
# What the page may load: no image, media, frame, object or form target from elsewhere, so that what
# the sanitiser lets through (a style attribute's url(), an SVG image) reaches no other server.
# Scripts, styles and fonts are left to Gradio (its inline config script, its theme's fonts).
PAGE_CSP = ("img-src 'self' data: blob:; media-src 'self' data: blob:; frame-src 'none'; object-src 'none'; "
            "form-action 'self'; base-uri 'self'")

_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[^\[\]:/@\\\s]+)(:\d{1,5})?")


@dataclass
class Limits:
    """The boundary's settings (web_demo.py's --max_body_bytes, --read_timeout, --cors_origin,
    --host and --allowed_host)."""

    max_body_bytes: int = MAX_BODY_BYTES
    read_timeout: float = READ_TIMEOUT_S
    cors_origins: list[str] = field(default_factory=list)
    hosts: list[str] = field(default_factory=lambda: ["127.0.0.1"])  # the --host, then --allowed_host names
    auth_failures_per_minute: int = AUTH_FAILURES_PER_MINUTE


def protect(app, api_key: str | None, limits: Limits) -> None:
    """Install the boundary on a FastAPI app (before its first request)."""
    from starlette.middleware.cors import CORSMiddleware

    app.add_middleware(RequestLimits, api_key=api_key, limits=limits)  # innermost
    app.add_middleware(CORSMiddleware, allow_origins=list(limits.cors_origins), allow_methods=["GET", "POST"],
                       allow_headers=["Authorization", "Content-Type"], max_age=600)
    app.add_middleware(HostCheck, hosts=limits.hosts, cors=bool(limits.cors_origins))


# ---------------------------------------------------------------- answers


def _error(status: int, message: str, code: str, headers: dict | None = None, close: bool = False):
    """An OpenAI-shaped error (utils.api's), for the page's routes too; `close` ends the connection
    after it, so that a body not read is not read at all."""
    from utils.api import ApiError

    headers = {**(headers or {}), **({"Connection": "close"} if close else {})}
    kind = "requests" if status == 429 else "invalid_request_error"
    return ApiError(status, message, code=code, kind=kind, headers=headers).response()


def _has_body(headers) -> bool:
    return headers.get("content-length", "0") != "0" or "transfer-encoding" in headers


# ---------------------------------------------------------------- 1. the Host header


def _normal_host(name: str) -> str:
    name = name.strip().lower().removeprefix("[").removesuffix("]")
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return name.rstrip(".")


def host_allowed(value: str | None, allowed: frozenset[str]) -> bool:
    """Whether a Host header (name or address, with or without a port) names this server, whose
    names are `allowed` (normalised by _normal_host; a wildcard among them takes any)."""
    if allowed & {"*", "0.0.0.0", "::"}:
        return True
    match = _HOST.fullmatch(value or "")
    if match is None:
        return False
    name = _normal_host(match.group(1))
    if name == "localhost" or name.endswith(".localhost") or name in allowed:  # *.localhost is loopback (RFC 6761)
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class HostCheck:
    """Pure ASGI middleware: a request whose Host names another server is a 400, and so is a CORS
    preflight when no origin is allowed (no CORS header is sent then). Every answer carries PAGE_CSP."""

    def __init__(self, app, hosts, cors: bool):
        self.app, self.cors = app, cors
        self.hosts = frozenset(_normal_host(host) for host in hosts)  # once, not per request

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.datastructures import Headers

        headers = Headers(scope=scope)
        if not host_allowed(headers.get("host"), self.hosts):
            response = _error(400, f"the Host header {headers.get('host', '')[:100]!r} does not name this server "
                                   f"(web_demo.py --allowed_host NAME lets a name in)", "invalid_host",
                              close=_has_body(headers))
            return await response(scope, receive, send)
        if (not self.cors and scope["method"] == "OPTIONS" and "origin" in headers
                and "access-control-request-method" in headers):
            response = _error(400, "cross-origin requests are not allowed (web_demo.py --cors_origin ORIGIN allows "
                                   "one)", "cors_not_allowed", close=_has_body(headers))
            return await response(scope, receive, send)

        async def send_with_csp(message):
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"content-security-policy", PAGE_CSP.encode())]
            await send(message)

        await self.app(scope, receive, send_with_csp)


# ---------------------------------------------------------------- 3. keys, logins and bodies


class AuthFailures:
    """Failed keys and logins per client IP over the last minute. Only the event loop touches it."""

    def __init__(self, limit: int, window_s: float = 60.0):
        self.limit, self.window_s = limit, window_s
        self._times: dict[str, deque] = {}

    def _recent(self, ip: str, now: float) -> deque:
        times = self._times.get(ip, deque())
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if not times:
            self._times.pop(ip, None)
        return times

    def add(self, ip: str) -> None:
        now = time.monotonic()
        times = self._recent(ip, now)
        times.append(now)
        self._times.pop(ip, None)
        self._times[ip] = times  # the most recent IP last: the first one is the one to forget
        while len(self._times) > TRACKED_IPS:
            del self._times[next(iter(self._times))]

    def retry_after(self, ip: str) -> int:
        """Whole seconds until `ip` may try again (0: now)."""
        now = time.monotonic()
        times = self._recent(ip, now)
        if len(times) < self.limit:
            return 0
        return max(1, int(times[-self.limit] + self.window_s - now + 0.999))


def bearer_ok(headers, api_key: str) -> bool:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


class RequestLimits:
    """Pure ASGI middleware: the key (on the headers), the per-IP slowdown of failed keys and
    logins, and the body's size and read deadline. (FastAPI reads and parses the body before it
    runs a route's dependencies, so the key cannot be checked there.)"""

    def __init__(self, app, api_key: str | None, limits: Limits):
        self.app, self.api_key, self.limits = app, api_key, limits
        self.failures = AuthFailures(limits.auth_failures_per_minute)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.datastructures import Headers

        headers, path = Headers(scope=scope), scope["path"]
        ip = (scope.get("client") or ("unknown",))[0]
        keyed = self.api_key is not None and (path == "/v1" or path.startswith("/v1/"))
        login = scope["method"] == "POST" and path in LOGIN_PATHS
        close = _has_body(headers)
        if keyed or login:
            wait = self.failures.retry_after(ip)
            if wait:
                response = _error(429, f"too many failed keys or logins from {ip} in the last minute; try again in "
                                       f"{wait} s", "too_many_failures", {"Retry-After": str(wait)}, close)
                return await response(scope, receive, send)
        if keyed and not bearer_ok(headers, self.api_key):
            self.failures.add(ip)
            response = _error(401, "Incorrect or missing API key: send the header `Authorization: Bearer <key>`",
                              "invalid_api_key", {"WWW-Authenticate": "Bearer"}, close)
            return await response(scope, receive, send)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.limits.max_body_bytes:
            return await self._too_large()(scope, receive, send)
        await self._bounded(scope, receive, send, login, ip)

    def _too_large(self):
        return _error(413, f"the request body is larger than this server's limit of {self.limits.max_body_bytes} "
                           f"bytes (web_demo.py --max_body_bytes)", "request_too_large", close=True)

    async def _bounded(self, scope, receive, send, login: bool, ip: str) -> None:
        """Run the app, its body capped and due within the read timeout; once the boundary has
        answered instead (413, 408), the app's own answer is dropped and it reads a disconnect."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.read_timeout
        state = {"received": 0, "body_done": False, "started": False, "answered": False}

        async def answer(response) -> dict:
            if not state["started"]:
                state["answered"] = True
                await response(scope, receive, send)
            return {"type": "http.disconnect"}

        async def guarded_receive():
            if state["body_done"] or state["answered"]:
                return await receive()  # after the body: the app waits for a disconnect, with no deadline
            try:
                message = await asyncio.wait_for(receive(), deadline - loop.time())
            except TimeoutError:
                return await answer(_error(408, f"the request body did not arrive within {self.limits.read_timeout:g} "
                                                f"s (web_demo.py --read_timeout)", "request_timeout", close=True))
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.limits.max_body_bytes:
                    return await answer(self._too_large())
                state["body_done"] = not message.get("more_body", False)
            return message

        async def guarded_send(message):
            if state["answered"]:
                return
            if message["type"] == "http.response.start":
                state["started"] = True
                if login and message["status"] >= 400:
                    self.failures.add(ip)
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except Exception:
            if not state["answered"]:  # else: the app failed on the disconnect it was handed
                raise


# ---------------------------------------------------------------- the headers' deadline


def timed_h11(read_timeout: float):
    """uvicorn's h11 protocol, closing a connection whose request headers have not all arrived
    `read_timeout` seconds after it opened or after its previous response. uvicorn has no such
    deadline: its keep-alive timer ends at the first byte of the next request, and a new
    connection has none, so a client sending a header byte now and then held its connection
    for ever (slowloris). The headers' size is bounded by h11 (h11_max_incomplete_event_size, 16 KiB)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        _headers_due = None

        def _await_headers(self) -> None:
            if self._headers_due is not None:
                self._headers_due.cancel()
            self._headers_due = self.loop.call_later(read_timeout, self._headers_late)

        def _headers_late(self) -> None:
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():  # still no whole request
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._await_headers()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._await_headers()

        def connection_lost(self, exc) -> None:
            if self._headers_due is not None:
                self._headers_due.cancel()
            super().connection_lost(exc)

    return TimedH11Protocol

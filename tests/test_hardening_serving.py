"""The serving boundary of web_demo.py (utils/guard.py), case by case from issue 17: the key before
the body, bounded bodies, the Host check, no CORS unless asked, the slowdown of failed keys and
logins, slow clients, markup in the chat, and role names that hold control characters.

Every case runs against a real uvicorn server on loopback (web_demo.make_server), over raw
sockets where the case is about the wire (Expect: 100-continue, slow clients), and in headless
Chromium where it is about a browser (CORS, markup). Each test uses a loopback source address
of its own (127.0.0.N), because failed keys are counted per IP.
"""

import contextlib
import http.client
import http.server
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry calls from tests

import httpx  # noqa: E402
import pytest  # noqa: E402

import web_demo  # noqa: E402
from helpers import RecordingModel, wait_for  # noqa: E402
from utils.chat import GenerationSlots, Sampling  # noqa: E402
from utils.engine import ChatEngine  # noqa: E402
from utils.guard import Limits  # noqa: E402
from utils.prompts import Role  # noqa: E402

# Gradio 6.31's queue statistics use pandas options that pandas 3 deprecates; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")

ROOT = Path(__file__).resolve().parents[1]
KEY = "hardening-key-0123456789"
READ_TIMEOUT = 1.0  # the test servers' --read_timeout
MAX_BODY = 64 * 1024  # the test servers' --max_body_bytes
FAILURES = 5  # the test servers' failed keys or logins per IP and minute


@contextlib.contextmanager
def serve(app, read_timeout=READ_TIMEOUT):
    """web_demo's server for `app` on a free 127.0.0.1 port, as main() runs it; yields the port."""
    sock = web_demo.listen("127.0.0.1", 0)
    server = web_demo.make_server(app, read_timeout)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, timeout=60, what="the server to start")
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def make_app(loaded, roles, key=KEY, page=True, **limits):
    engine = ChatEngine(RecordingModel(loaded[0]), loaded[1], roles, GenerationSlots(1, 2),
                        defaults=Sampling(4, 0.8, 0))
    demo = web_demo.build_demo(web_demo.RolePlayChat(engine), next(iter(roles))) if page else None
    settings = {"read_timeout": READ_TIMEOUT, "max_body_bytes": MAX_BODY, "auth_failures_per_minute": FAILURES,
                **limits}
    return web_demo.build_app(demo, engine, key, Limits(**settings))


@pytest.fixture(scope="module")
def keyed(loaded, roles):
    """The page and the API with a key; yields the port."""
    with serve(make_app(loaded, roles)) as port:
        yield port


@pytest.fixture(scope="module")
def keyless(loaded, roles):
    """The page and the API without a key (the loopback default); yields the port."""
    with serve(make_app(loaded, roles, key=None)) as port:
        yield port


def client(port, source: str, host=None) -> httpx.Client:
    """An httpx client from loopback address `source`, optionally sending another Host header."""
    transport = httpx.HTTPTransport(local_address=source)
    return httpx.Client(base_url=f"http://127.0.0.1:{port}", transport=transport, timeout=30,
                        headers={"Host": host} if host else None)


def connect(port, source: str) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))


def raw_request(port, head: str, source: str) -> socket.socket:
    """A connection that has sent `head` (a request line and headers, one per line), then a blank line."""
    sock = connect(port, source)
    sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n")
    return sock


def read_response(sock) -> tuple[str, dict, bytes]:
    """The status line, headers and body of the next response on `sock` (Content-Length framed)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    while len(body) < int(headers.get("content-length", 0)):
        body += sock.recv(65536)
    return status, headers, body


def closed_by_server(sock, timeout=10.0) -> bool:
    """Whether the server closes `sock` (EOF or reset) within `timeout`, whatever it sent before."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([sock], [], [], deadline - time.monotonic())
        if ready:
            try:
                if not sock.recv(65536):
                    return True
            except ConnectionResetError:
                return True
    return False


def error_of(response) -> dict:
    return response.json()["error"]


# ---------------------------------------------------------------- 5. the key before the body


def test_the_key_is_checked_before_the_body_is_read(keyed):
    """Expect: 100-continue with a wrong key and a 1 GB length gets the 401, not 100 Continue; a
    non-JSON body without a key is a 401, not a 400; a 56 MB body without a key is answered
    before it is sent, and the connection is closed so that it is never read."""
    sock = raw_request(keyed, "POST /v1/chat/completions HTTP/1.1\nHost: 127.0.0.1\nAuthorization: Bearer wrong\n"
                              "Content-Type: application/json\nContent-Length: 1000000000\nExpect: 100-continue\n",
                       "127.0.0.11")
    status, headers, body = read_response(sock)
    assert status == "HTTP/1.1 401 Unauthorized" and json.loads(body)["error"]["code"] == "invalid_api_key"
    assert headers["connection"] == "close" and closed_by_server(sock)

    with client(keyed, "127.0.0.11") as http:
        response = http.post("/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 401 and error_of(response)["code"] == "invalid_api_key"

    size = 56 * 1024 * 1024
    sock = raw_request(keyed, f"POST /v1/chat/completions HTTP/1.1\nHost: 127.0.0.1\nContent-Type: application/json\n"
                              f"Content-Length: {size}\n", "127.0.0.11")
    sock.sendall(b'{"model": "' + b"x" * 65536)  # the body has begun; the answer does not wait for the rest
    started = time.monotonic()
    status, headers, _ = read_response(sock)
    assert status.endswith("401 Unauthorized") and headers["connection"] == "close"
    assert time.monotonic() - started < 5
    sent = 65547
    with pytest.raises(OSError):  # the server closed the connection: the rest of the 56 MB goes nowhere
        chunk = b"x" * (1024 * 1024)
        while sent < size:
            sock.sendall(chunk)
            sent += len(chunk)
    assert sent < size
    sock.close()


def test_a_body_over_the_limit_is_a_413_naming_it(keyed, keyless):
    """By its Content-Length before anything is read, and as it arrives when it is chunked; with
    a key, after the key. The server answers normal requests meanwhile."""
    auth = f"Authorization: Bearer {KEY}\n"
    for port, headers in ((keyed, auth), (keyless, "")):
        sock = raw_request(port, f"POST /v1/chat/completions HTTP/1.1\nHost: 127.0.0.1\n{headers}"
                                 f"Content-Type: application/json\nContent-Length: {MAX_BODY + 1}\n", "127.0.0.12")
        status, response_headers, body = read_response(sock)
        assert status.endswith("413 Request Entity Too Large") and response_headers["connection"] == "close"
        error = json.loads(body)["error"]
        assert error["code"] == "request_too_large" and f"{MAX_BODY} bytes" in error["message"]
        assert "--max_body_bytes" in error["message"] and closed_by_server(sock)

    def chunks():
        for _ in range(MAX_BODY // 4096 + 2):
            yield b" " * 4096

    with client(keyed, "127.0.0.12") as http:
        for path in ("/v1/chat/completions", "/gradio_api/queue/join"):  # the API's and the page's routes
            response = http.post(path, content=chunks(), headers={"Authorization": f"Bearer {KEY}",
                                                                   "Content-Type": "application/json"})
            assert response.status_code == 413 and error_of(response)["code"] == "request_too_large", path
        ok = http.post("/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                       json={"model": "李白", "messages": [{"role": "user", "content": "你好" * 1000}],
                             "max_tokens": 1})
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["role"] == "assistant"


# ---------------------------------------------------------------- 2. the Host header


def test_a_host_that_names_another_server_is_a_400(keyed, keyless, loaded, roles):
    """DNS rebinding: a page at evil.example that resolves to 127.0.0.1 sends `Host: evil.example`."""
    for port in (keyed, keyless):
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "localhost.evil.example"):
            with client(port, "127.0.0.13", host) as http:
                for path in ("/v1/models", "/config"):
                    response = http.get(path, headers={"Authorization": f"Bearer {KEY}"})
                    assert response.status_code == 400 and error_of(response)["code"] == "invalid_host", (host, path)
        for host in (f"127.0.0.1:{port}", "127.0.0.1", f"localhost:{port}", f"[::1]:{port}", "LOCALHOST",
                     "chat.localhost", "127.0.0.2"):
            with client(port, "127.0.0.13", host) as http:
                assert http.get("/config").status_code == (401 if port == keyed else 200), host  # 401: log in
                assert http.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200, host

    # a server on a wildcard address (which needs a key) answers any name, as Ollama's does; a
    # name given with --allowed_host is answered too
    for hosts, name in ((["0.0.0.0"], "my-server.lan"), (["127.0.0.1", "my-server.lan"], "my-server.lan:8080")):
        with serve(make_app(loaded, roles, page=False, hosts=hosts)) as port, client(port, "127.0.0.13", name) as http:
            assert http.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


# ---------------------------------------------------------------- 2. CORS


def test_no_cors_headers_unless_an_origin_is_given(keyed, loaded, roles):
    """A preflight from http://localhost:3000 (which Gradio's own middleware allowed, with
    credentials) gets no Access-Control-Allow-Origin, on the API and the page; --cors_origin lets
    exactly its origin in."""
    preflight = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    with client(keyed, "127.0.0.14") as http:
        for path in ("/v1/chat/completions", "/config", "/gradio_api/call/chat"):
            response = http.options(path, headers=preflight)
            assert not [h for h in response.headers if h.startswith("access-control-")], (path, response.headers)
            response = http.get(path, headers={"Origin": "http://localhost:3000", "Authorization": f"Bearer {KEY}"})
            assert "access-control-allow-origin" not in response.headers, path

    with serve(make_app(loaded, roles, cors_origins=["http://localhost:3000"])) as port, \
            client(port, "127.0.0.14") as http:
        response = http.options("/v1/chat/completions", headers=preflight)
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "http://localhost:3000"
        assert "access-control-allow-credentials" not in response.headers
        response = http.get("/v1/models", headers={"Origin": "http://localhost:3000",
                                                   "Authorization": f"Bearer {KEY}"})
        assert response.headers["access-control-allow-origin"] == "http://localhost:3000"
        response = http.options("/v1/chat/completions", headers={**preflight, "Origin": "http://localhost:3001"})
        assert "access-control-allow-origin" not in response.headers


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Serves `page` (class attribute) at / and records every other request's path."""

    page = ""
    seen: list

    def do_GET(self):  # noqa: N802 - http.server's name
        if self.path == "/":
            body = self.page.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self.seen.append(self.path)
            self.send_response(204)
            self.end_headers()

    do_POST = do_GET  # noqa: N815

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def recorder(page=""):
    """An HTTP listener on 127.0.0.1 serving `page` at /; yields (port, the paths requested)."""
    handler = type("Handler", (_Recorder,), {"page": page, "seen": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], handler.seen
    finally:
        server.shutdown()
        server.server_close()


def test_a_page_of_another_local_port_cannot_read_the_server(keyless, browser):
    """In Chromium, a page served from another loopback port cannot read /config nor start and read
    a chat through /gradio_api/call/chat; a same-origin read on the server itself works."""
    target = f"http://127.0.0.1:{keyless}"
    script = f"""<script>
    async function attempt(name, url, options) {{
        try {{ const r = await fetch(url, options); document.body.dataset[name] = 'read ' + (await r.text()).length; }}
        catch (e) {{ document.body.dataset[name] = 'blocked'; }}
    }}
    Promise.all([
        attempt('config', '{target}/config', {{credentials: 'include'}}),
        attempt('chat', '{target}/gradio_api/call/chat', {{method: 'POST', credentials: 'include',
            headers: {{'Content-Type': 'application/json'}},
            body: JSON.stringify({{data: ['hi', [], '李白', 4, 0.8, 0]}})}}),
    ]).then(() => document.body.dataset.done = '1');
    </script>"""
    with recorder(f"<html><body>{script}</body></html>") as (port, _):
        page = browser.new_page()
        try:
            page.goto(f"http://localhost:{port}/")  # localhost: the origin Gradio's own CORS let in
            page.wait_for_function("document.body.dataset.done === '1'", timeout=15_000)
            assert page.evaluate("[document.body.dataset.config, document.body.dataset.chat]") == ["blocked"] * 2
            page.goto(f"{target}/favicon.ico")  # the control: on its own origin the same read works
            assert page.evaluate(f"fetch('{target}/config').then(r => r.status)") == 200
        finally:
            page.close()


# ---------------------------------------------------------------- 7. failed keys and logins, slow clients


def test_failed_keys_and_logins_are_slowed_down_per_ip(keyed):
    """After FAILURES failed keys (or page logins) in a minute, an IP gets 429 with Retry-After on
    the API and the login, even with the right key; other IPs are not affected."""
    with client(keyed, "127.0.0.15") as http:
        statuses = [http.get("/v1/models", headers={"Authorization": f"Bearer wrong-{i}"}).status_code
                    for i in range(FAILURES)]
        assert statuses == [401] * FAILURES
        for key in ("wrong", KEY):
            response = http.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
            assert response.status_code == 429 and error_of(response)["code"] == "too_many_failures"
            assert 0 < int(response.headers["retry-after"]) <= 60
        response = http.post("/login", data={"username": "u", "password": KEY})
        assert response.status_code == 429  # the same IP's login is held back too
    with client(keyed, "127.0.0.16") as http:
        assert http.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        statuses = [http.post("/login", data={"username": "u", "password": f"guess-{i}"}).status_code
                    for i in range(FAILURES + 2)]
        assert statuses == [400] * FAILURES + [429] * 2
    with client(keyed, "127.0.0.17") as http:  # a right password from another IP still logs in
        response = http.post("/login", data={"username": "u", "password": KEY})
        assert response.status_code == 200 and response.json() == {"success": True}


def test_slow_headers_and_slow_bodies_are_cut_off(keyed):
    """20 connections sending their headers a byte at a time and 20 sending their body so are all
    closed within --read_timeout (plus slack), and the server answers others meanwhile."""
    slow_heads = [connect(keyed, "127.0.0.18") for _ in range(20)]
    for sock in slow_heads:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    slow_bodies = [raw_request(keyed, f"POST /v1/chat/completions HTTP/1.1\nHost: 127.0.0.1\nAuthorization: Bearer "
                                      f"{KEY}\nContent-Type: application/json\nContent-Length: 1000\n", "127.0.0.18")
                   for _ in range(20)]
    started = time.monotonic()
    open_ = {sock: "head" for sock in slow_heads} | {sock: "body" for sock in slow_bodies}
    closed_after = {}
    answered = {"head": [], "body": []}
    while open_ and time.monotonic() - started < READ_TIMEOUT + 4:
        for sock, kind in list(open_.items()):
            try:
                sock.sendall(b"X-Slow: 1\r\n" if kind == "head" else b" ")
            except OSError:
                pass  # closed: select() below sees the end
        ready, _, _ = select.select(list(open_), [], [], 0.2)
        for sock in ready:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if data:
                answered[open_[sock]].append(data.split(b"\r\n", 1)[0])
            else:
                closed_after[sock] = time.monotonic() - started
                del open_[sock]
        with client(keyed, "127.0.0.19") as http:
            assert http.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    for sock in slow_heads + slow_bodies:
        sock.close()
    assert not open_, f"{len(open_)} slow connections are still open after {time.monotonic() - started:.1f} s"
    assert max(closed_after.values()) < READ_TIMEOUT + 2
    assert answered["head"] == [] and answered["body"] == [b"HTTP/1.1 408 Request Timeout"] * 20


# ---------------------------------------------------------------- 3. markup in the chat


def markup(port) -> str:
    listener = f"http://127.0.0.1:{port}"
    return (f'<form action="{listener}/phish"><input name="pw" placeholder="密码"><button>登录</button></form>'
            f'<img src="{listener}/img.png"><iframe src="{listener}/frame"></iframe>'
            f'<p style="background-image:url({listener}/css.png)">样式</p>\n\n![md]({listener}/md.png)\n\n'
            f'<svg><image href="{listener}/svg.png"/></svg><video poster="{listener}/poster.png"></video>'
            f'<object data="{listener}/object"></object><textarea>框</textarea> 结束')


def test_markup_in_greetings_and_messages_is_text(browser, loaded):
    """A card greeting and a typed message with a form, an input, remote images (HTML, markdown,
    CSS, SVG), a frame and an object: none exists in the chat's DOM, they show as text, and not
    one request reaches the listener they point at (the CSS one is left to the page's CSP)."""
    model = RecordingModel(loaded[0])
    with recorder() as (port, seen):
        roles = {"绣娘": Role("绣娘", "你是绣娘。", "客官请看：" + markup(port))}
        engine = ChatEngine(model, loaded[1], roles, GenerationSlots(1, 2), defaults=Sampling(4, 0.8, 0))
        app = web_demo.build_app(web_demo.build_demo(web_demo.RolePlayChat(engine), "绣娘"), engine)
        with serve(app) as server_port:
            page = browser.new_page()
            finished = []  # requests that got an answer: a style attribute's url() is tried, and CSP stops it
            page.on("requestfinished", lambda request: finished.append(request.url))
            try:
                page.goto(f"http://127.0.0.1:{server_port}/")
                bot = page.locator("#chatbot [data-testid=bot]")
                bot.filter(has_text="结束").wait_for(timeout=30_000)
                page.locator("#message textarea").fill("看这个：" + markup(port))
                page.locator("#message textarea").press("Enter")
                page.wait_for_function("""() => {
                    const bots = document.querySelectorAll('#chatbot [data-testid=bot]');
                    const tracker = document.querySelector('#chatbot [data-testid=status-tracker]');
                    return document.querySelectorAll('#chatbot [data-testid=user]').length === 1 && bots.length === 2
                        && (!tracker || tracker.classList.contains('hide'));
                }""", timeout=30_000)
                user = page.locator("#chatbot [data-testid=user]")
                user.filter(has_text="结束").wait_for()
                for message in (bot.first, user):
                    text = message.inner_text()
                    assert "<form" in text and "<img" in text and "<iframe" in text, text
                tags = ("form", "input", "textarea", "iframe", "img", "image", "video", "object", "embed")
                assert page.locator(", ".join(f"#chatbot {tag}" for tag in tags)).count() == 0
            finally:
                page.close()
        # what is rendered is fetched as it is inserted, long before the reply to the message ended
        assert seen == [] and not [url for url in finished if f":{port}/" in url]


# ---------------------------------------------------------------- 8. role names with control characters


EVIL_NAMES = ["error: fake\nline", "清屏\x1b[2J", "\u202eevil", "nul\x00"]


def test_role_names_are_shown_escaped_in_the_role_list(loaded):
    roles = {name: Role(name, "你是一个角色。") for name in EVIL_NAMES}
    engine = ChatEngine(RecordingModel(loaded[0]), loaded[1], roles, GenerationSlots(1, 1))
    with serve(web_demo.build_app(web_demo.build_demo(web_demo.RolePlayChat(engine), EVIL_NAMES[0]), engine)) as port:
        config = httpx.get(f"http://127.0.0.1:{port}/config").json()
    radio = next(c for c in config["components"] if c.get("props", {}).get("elem_id") == "role")
    choices = radio["props"]["choices"]
    assert [value for _, value in choices] == EVIL_NAMES  # the value stays the name the server knows
    labels = [label for label, _ in choices]
    assert labels == ["error: fake\\nline", "清屏\\x1b[2J", "\\u202eevil", "nul\\x00"]


def test_role_names_in_an_error_line_are_escaped(tiny_model_dir, tmp_path):
    """A roles file whose names hold a newline, ESC, U+202E and CR: what reaches the terminal is one
    `error:` line with those characters escaped, whatever refuses the names."""
    roles = tmp_path / "roles.json"
    names = ["error: fake\nline", "清屏\x1b[2J", "\u202eevil\r"]
    roles.write_text(json.dumps({name: "一个角色。" for name in names}), encoding="utf-8")
    proc = subprocess.run([sys.executable, "web_demo.py", "--model_path", str(tiny_model_dir), "--roles_file",
                           str(roles), "--default_role", "nobody", "--port", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert not set(proc.stderr) & {"\x1b", "\u202e", "\r", "\x00"}, repr(proc.stderr)
    lines = proc.stderr.strip().split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr


# ---------------------------------------------------------------- the flags


def test_the_boundary_flags_and_their_defaults():
    args = web_demo.parse_args(["--model_path", "m"])
    assert (args.max_body_bytes, args.read_timeout, args.cors_origin, args.allowed_host) == (4 * 1024 * 1024, 30.0,
                                                                                            None, None)
    args = web_demo.parse_args(["--model_path", "m", "--cors_origin", "http://localhost:3000", "--cors_origin",
                                "https://chat.example", "--allowed_host", "box.lan", "--max_body_bytes", "0",
                                "--read_timeout", "0"])
    assert args.cors_origin == ["http://localhost:3000", "https://chat.example"] and args.allowed_host == ["box.lan"]
    problems = web_demo.validate_args(args)
    assert any("--max_body_bytes" in p for p in problems) and any("--read_timeout" in p for p in problems)
    args = web_demo.parse_args(["--model_path", "m", "--cors_origin", "localhost:3000/x"])
    assert any("--cors_origin 'localhost:3000/x'" in p for p in web_demo.validate_args(args))

"""Drive a running SillyTavern in headless Chromium against web_demo.py's API, and record every
request body SillyTavern sends. bench/sillytavern.sh installs and starts both servers, then runs this.

Between SillyTavern and the API sits a recording proxy on loopback (started here, in a thread):
it forwards each request unchanged, streams the answer back unchanged, and keeps the method, path,
JSON body and status code under the name of the scenario being driven at that moment. Only the
POST bodies are written out, one JSON file per request: {"path", "body", "status_today"} (plus
"error_today", the API's message, for a 4xx), named <mode>-<scenario>.json.

The scenarios, once for each Prompt Post-Processing mode ("None", SillyTavern's default, and
"Semi-strict"): a card chat with 孙悟空 (model 孙悟空 from /v1/models) sent unstreamed, then
streamed, Stop mid-stream, a swipe, Continue, Impersonate and an Author's Note; then a group chat
of 孙悟空, 张飞 and 李白 in list order, one request per member.

    python bench/sillytavern_drive.py --st_url http://127.0.0.1:8123 --api_url http://127.0.0.1:9191
"""

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic",
]
PINYIN = {"孙悟空": "sunwukong", "张飞": "zhangfei", "李白": "libai"}  # the group, in list order
CARDS = list(PINYIN.values())  # file stems of the cards under --cards
MODES = {"none": "", "semistrict": "semi"}  # file prefix -> #custom_prompt_post_processing value
MODEL = "孙悟空"
GROUP = "三人同席"
NUDGE = "Write the next reply only as"
AUTHORS_NOTE = "（作者注：此刻山神庙外忽然下起了大雨。）"

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--st_url", default="http://127.0.0.1:8123", help="the running SillyTavern (default: %(default)s)")
parser.add_argument("--api_url", default="http://127.0.0.1:9191",
                    help="the running web_demo.py --api_only, without /v1 (default: %(default)s)")
parser.add_argument("--proxy_port", type=int, default=9192,
                    help="loopback port of the recording proxy (default: %(default)s)")
parser.add_argument("--cards", default=str(ROOT / "tests/data/sillytavern/cards"),
                    help="folder with the V2 cards sunwukong.json, zhangfei.json, libai.json (default: %(default)s)")
parser.add_argument("--bodies_out", default=str(ROOT / "tests/data/sillytavern"),
                    help="folder to write the recorded bodies into (default: %(default)s)")
parser.add_argument("--shots_out", default=str(ROOT / "bench-out/sillytavern"),
                    help="folder for screenshots and the request log (default: %(default)s)")
parser.add_argument("--docs_image", help="also write the picture of SillyTavern connected and replying here "
                    "(sillytavern.sh: docs/img/sillytavern.png)")
parser.add_argument("--timeout_s", type=float, default=180,
                    help="longest wait for any one step (default: %(default)s)")
args = parser.parse_args()
problems = [f"error: --cards: {Path(args.cards) / (stem + '.json')} is missing"
            for stem in CARDS if not (Path(args.cards) / f"{stem}.json").is_file()]
if not Path(CHROMIUM).is_file():
    problems.append(f"error: {CHROMIUM} is missing (apt-get install chromium)")
if problems:
    sys.exit("\n".join(problems))

import httpx  # noqa: E402  heavy imports after parsing
import uvicorn  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.responses import StreamingResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

HOP_BY_HOP = {"host", "connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
              "proxy-authorization", "proxy-authenticate", "content-length"}
ERROR_BYTES = 4096  # enough of a 4xx answer to keep its message
# The tiny model answers in well under a second: a Stop scenario's stream is relayed a chunk per
# this many seconds, so that Stop lands while the reply is still streaming
SLOW_RELAY_S = 0.3


class Recorder:
    """What the proxy saw, each request under the scenario that was current when it arrived."""

    def __init__(self):
        self.scenario = "setup"
        self.requests = []
        self.lock = threading.Lock()

    def add(self, entry: dict) -> dict:
        with self.lock:
            entry["scenario"] = self.scenario
            self.requests.append(entry)
        return entry

    def posts(self, scenario: str) -> list[dict]:
        with self.lock:
            return [r for r in self.requests if r["scenario"] == scenario and r["method"] == "POST"]


def error_message(answer: bytes) -> str:
    try:
        return json.loads(answer)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return answer.decode("utf-8", "replace")


def proxy_app(upstream: str, recorder: Recorder) -> Starlette:
    # httpx's own timeouts would cut a long stream; the API and SillyTavern have theirs
    client = httpx.AsyncClient(base_url=upstream, timeout=None)

    async def forward(request):
        raw = await request.body()
        entry = recorder.add({"method": request.method, "path": request.url.path, "t": time.time(),
                              "body": json.loads(raw) if raw else None, "status": None, "done": False})
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        sent = client.build_request(request.method, request.url.path, params=request.query_params,
                                    headers=headers, content=raw)
        answer = await client.send(sent, stream=True)
        entry["status"] = answer.status_code
        kept = bytearray()

        async def relay():
            try:
                async for chunk in answer.aiter_raw():
                    if entry["scenario"].endswith("-stop"):
                        await asyncio.sleep(SLOW_RELAY_S)
                    if len(kept) < ERROR_BYTES:
                        kept.extend(chunk[:ERROR_BYTES - len(kept)])
                    yield chunk
                entry["done"] = True  # the whole answer went through (not cut by SillyTavern's Stop)
                if answer.status_code >= 400:
                    entry["error"] = error_message(bytes(kept))
            finally:  # also when SillyTavern hangs up: the API then stops generating
                await answer.aclose()

        out_headers = {k: v for k, v in answer.headers.items() if k.lower() not in HOP_BY_HOP}
        return StreamingResponse(relay(), status_code=answer.status_code, headers=out_headers)

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)])


def start_proxy(app, port: int) -> uvicorn.Server:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    wait_until(lambda: server.started, "the recording proxy to start", 30)
    return server


def wait_until(check, what: str, timeout_s: float | None = None):
    deadline = time.monotonic() + (timeout_s or args.timeout_s)
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.1)


# ---------------------------------------------------------------- setup: the proxy, the browser

recorder = Recorder()
proxy = start_proxy(proxy_app(args.api_url, recorder), args.proxy_port)
proxy_v1 = f"http://127.0.0.1:{args.proxy_port}/v1"
shots = Path(args.shots_out)
shots.mkdir(parents=True, exist_ok=True)
started = time.monotonic()
log = lambda message: print(f"[{time.monotonic() - started:6.1f}s] {message}", flush=True)  # noqa: E731

playwright = sync_playwright().start()
browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
page = browser.new_page(viewport={"width": 1280, "height": 900})
page.set_default_timeout(args.timeout_s * 1000)


def shot(name: str) -> None:
    page.screenshot(path=str(shots / f"{name}.png"))


def drawer(button_id: str, inside: str, want_open: bool = True) -> None:
    """Open or close one of the top bar's drawers (a click toggles it); `inside` is an element in it."""
    if page.locator(inside).is_visible() != want_open:
        page.locator(f"#{button_id} .drawer-toggle").first.click()
    page.locator(inside).wait_for(state="visible" if want_open else "hidden")


def idle() -> bool:
    """SillyTavern is not generating: its Stop button is hidden and it has cleared the flag that a
    send checks (body[data-generating], dropped a moment after the button hides)."""
    return not page.locator("#mes_stop").is_visible() and page.evaluate("() => !document.body.dataset.generating")


def run_scenario(name: str, action, requests: int = 1) -> list[dict]:
    """Do `action` with the proxy recording under `name`, until `requests` more POSTs have been
    answered (or one was refused, which ends a group's round) and SillyTavern is idle again."""
    before = len(recorder.posts(name))
    recorder.scenario = name

    def finished():
        new = recorder.posts(name)[before:]
        return (idle() and new and all(r["status"] for r in new)
                and (len(new) >= requests or new[-1]["status"] >= 400) and new)

    action()
    posts = wait_until(finished, f"{name}: {requests} request(s) answered")
    recorder.scenario = "between"
    log(f"{name}: " + ", ".join(f"{r['path']} {r['status']}{'' if r['done'] else ' (cut)'}" for r in posts))
    return posts


def click_until(target, check, what: str):
    """Click until `check` holds, for clicks SillyTavern may drop (see send and open_entity)."""
    deadline = time.monotonic() + args.timeout_s
    while True:
        target.click()
        try:
            return wait_until(check, what, timeout_s=min(5, max(deadline - time.monotonic(), 0.1)))
        except TimeoutError:
            if time.monotonic() > deadline:
                raise


def send(text: str) -> None:
    """Type and send, until SillyTavern takes the message (it empties the box). Its send button
    drops a click while the previous send is still winding up, a moment after the generation has
    ended; while one send runs, any further click is dropped, so a repeated click cannot send twice."""
    page.locator("#send_textarea").fill(text)
    click_until(page.locator("#send_but"), lambda: page.locator("#send_textarea").input_value() == "",
                f"SillyTavern to take {text!r}")


def option(item_id: str) -> None:
    page.locator("#options_button").click()
    page.locator(f"#{item_id}").click()


def character(name: str):
    return page.locator(f'#rm_print_characters_block .character_select:has(.ch_name:text-is("{name}"))')


def current_chat() -> dict:
    """What SillyTavern has open, from its context API (the one its extensions use)."""
    return page.evaluate("""() => {
        const c = SillyTavern.getContext();
        const group = c.groups.find(g => g.id === c.groupId);
        return {chat: c.chatId, name: group ? group.name : c.characters[c.characterId]?.name};
    }""")


def open_entity(entity, name: str, greetings: int) -> None:
    """Open a character's or the group's chat from the list, then start a new chat with it, which
    opens with the greetings (first_mes) of its `greetings` characters."""
    drawer("rightNavHolder", "#rm_button_characters")
    page.locator("#rm_button_characters").click()
    # a click on the list can be lost while the list is redrawn (seen after a refused request);
    # a second click on the entry already open does nothing
    opened = click_until(entity, lambda: current_chat()["name"] == name and current_chat(), f"the chat with {name}")
    send("/newchat")
    wait_until(lambda: current_chat()["chat"] != opened["chat"] and page.locator("#chat .mes").count() == greetings
               and page.locator("#chat .mes .mes_text").first.inner_text().strip(), f"a new chat with {name}")


def streaming(on: bool) -> None:
    drawer("ai-config-button", "#stream_toggle")
    page.locator("#stream_toggle").set_checked(on)
    drawer("ai-config-button", "#stream_toggle", want_open=False)


def post_processing(mode: str) -> None:
    """Set Prompt Post-Processing; the API panel's picture (toasts gone) goes into the docs image."""
    drawer("sys-settings-button", "#main_api")
    page.select_option("#custom_prompt_post_processing", MODES[mode])
    wait_until(lambda: page.locator("#toast-container .toast").count() == 0, "the toasts to fade")
    shot(f"{mode}-connection")
    drawer("sys-settings-button", "#main_api", want_open=False)


def stop(name: str) -> None:
    """Send, and press Stop once the first words of the reply show (the proxy relays this request
    slowly, so that the tiny model's reply is still streaming then; if it has ended all the same,
    the log says so: no "(cut)")."""
    send("给俺讲讲你大闹天宫的故事吧。")
    wait_until(lambda: recorder.posts(name), "the request to stop")
    reply = page.locator('#chat .last_mes[is_user="false"] .mes_text')
    wait_until(lambda: reply.count() and reply.inner_text().strip(), "the first words of the reply")
    if page.locator("#mes_stop").is_visible():
        page.locator("#mes_stop").click()


def swipe() -> None:
    """A swipe right on the last reply (its arrow shows while the pointer is on the message)."""
    page.locator("#chat .last_mes").hover()
    page.locator("#chat .last_mes .swipe_right").click()


def authors_note() -> None:
    option("option_toggle_AN")
    page.locator("#extension_floating_prompt").fill(AUTHORS_NOTE)
    page.locator("#ANClose").click()
    send("外面是不是下雨了？")


def file_stem(entry: dict, index: int, of: int) -> str:
    """<mode>-<scenario>; for a group request, the member it prompts, named in SillyTavern's group
    nudge "[Write the next reply only as 张飞.]" (a system message of its own, or, Semi-strict,
    folded into the last user message)."""
    if entry["scenario"].endswith("-group"):
        nudges = [m["content"] for m in entry["body"]["messages"] if NUDGE in str(m.get("content"))]
        speakers = [PINYIN[name] for name in PINYIN if nudges and f"{NUDGE} {name}." in nudges[-1]]
        return f"{entry['scenario']}-{speakers[0] if len(speakers) == 1 else index + 1}"
    return entry["scenario"] if of == 1 else f"{entry['scenario']}-{index + 1}"


def save() -> None:
    """Each POST's body as recorded, one file each (this run's replace the last run's); the log of
    every request, bodies left out."""
    out = Path(args.bodies_out)
    out.mkdir(parents=True, exist_ok=True)
    for mode in MODES:
        for old in out.glob(f"{mode}-*.json"):
            old.unlink()
    scenarios = list(dict.fromkeys(r["scenario"] for r in recorder.requests if r["method"] == "POST"))
    for scenario in scenarios:
        posts = recorder.posts(scenario)
        for index, entry in enumerate(posts):
            body = dict(entry["body"])
            for key in ("api_key", "key"):  # SillyTavern sends none today; never keep one
                body.pop(key, None)
            record = {"path": entry["path"], "body": body, "status_today": entry["status"]}
            if entry.get("error"):
                record["error_today"] = entry["error"]
            write_atomically(out / f"{file_stem(entry, index, len(posts))}.json",
                             json.dumps(record, ensure_ascii=False, indent=2) + "\n")
    write_atomically(shots / "requests.jsonl", "".join(
        json.dumps({k: v for k, v in entry.items() if k != "body"}, ensure_ascii=False) + "\n"
        for entry in recorder.requests))
    log(f"wrote {sum(len(recorder.posts(s)) for s in scenarios)} bodies to {out}")


def write_atomically(path: Path, text: str) -> None:
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(text, encoding="utf-8")
    os.replace(temp, path)


def docs_image(path: str) -> None:
    """SillyTavern's API panel, connected (Semi-strict), beside the group chat's replies: the middle
    column of two screenshots, side by side, in 128 colours to stay small (64 lose the green dot)."""
    from PIL import Image

    box = (320, 36, 960, 690)  # SillyTavern's centred 640-pixel column, below the top bar
    left = Image.open(shots / "semistrict-connection.png").convert("RGB").crop(box)
    right = Image.open(shots / "semistrict-group-chat.png").convert("RGB").crop(box)
    both = Image.new("RGB", (left.width + right.width, left.height))
    both.paste(left, (0, 0))
    both.paste(right, (left.width, 0))
    temp = Path(path).with_name(Path(path).name + ".tmp.png")
    both.quantize(128).save(temp, optimize=True)
    os.replace(temp, path)
    log(f"wrote {path} ({Path(path).stat().st_size // 1024} KiB)")


# ---------------------------------------------------------------- the run

try:
    page.goto(args.st_url)
    # First run (sillytavern.sh starts from an empty user folder): SillyTavern asks for a persona
    # name; keep its default ("User")
    page.locator(".popup:has(.onboarding) .popup-button-ok").click()
    page.locator(".popup:has(.onboarding)").wait_for(state="detached")
    log("SillyTavern loaded")

    drawer("sys-settings-button", "#main_api")
    page.select_option("#main_api", "openai")
    page.select_option("#chat_completion_source", "custom")
    page.locator("#custom_api_url_text").fill(proxy_v1)
    page.locator("#api_button_openai").click()
    wait_until(lambda: page.locator(f'#model_custom_select option[value="{MODEL}"]').count(), "the model list")
    page.select_option("#model_custom_select", MODEL)
    wait_until(lambda: "Valid" in page.locator("#rm_api_block .online_status_text:visible").all_inner_texts(),
               "SillyTavern to call the connection valid")
    log("connected; models: " + ", ".join(page.locator("#model_custom_select option").all_inner_texts()))
    drawer("sys-settings-button", "#main_api", want_open=False)

    drawer("rightNavHolder", "#rm_button_characters")
    page.set_input_files("#character_import_file", [str(Path(args.cards) / f"{stem}.json") for stem in CARDS])
    for name in PINYIN:
        character(name).wait_for()
    log("imported the cards: " + ", ".join(PINYIN))

    page.locator("#rm_button_group_chats").click()
    page.locator("#rm_group_chat_name").fill(GROUP)
    for name in reversed(PINYIN):  # each one added goes first: this gives list order 孙悟空, 张飞, 李白
        member = f'.group_member:has(.ch_name:text-is("{name}"))'
        page.locator(f'#rm_group_add_members {member} [data-action="add"]').click()
        page.locator(f"#rm_group_members {member}").wait_for()
    page.select_option("#rm_group_activation_strategy", "1")  # list order: every member answers, in turn
    page.locator("#rm_group_submit").click()
    group = page.locator(f'#rm_print_characters_block .group_select:has(.ch_name:text-is("{GROUP}"))')
    group.wait_for()
    log(f"created the group {GROUP} (list order)")

    for mode, processing in MODES.items():
        post_processing(mode)
        streaming(False)  # SillyTavern's default
        log(f"mode {mode}: Prompt Post-Processing {processing or 'None'!r}")

        open_entity(character(MODEL), MODEL, 1)
        run_scenario(f"{mode}-send", lambda: send("大圣，你好！这是什么地方？"))
        streaming(True)
        run_scenario(f"{mode}-stream", lambda: send("你的金箍棒能借我看看吗？"))
        run_scenario(f"{mode}-stop", lambda name=f"{mode}-stop": stop(name))
        run_scenario(f"{mode}-swipe", swipe)
        shot(f"{mode}-card-chat")
        run_scenario(f"{mode}-continue", lambda: option("option_continue"))
        run_scenario(f"{mode}-impersonate", lambda: option("option_impersonate"))
        page.locator("#send_textarea").fill("")  # Impersonate's text lands there
        run_scenario(f"{mode}-authors-note", authors_note)

        open_entity(group, GROUP, len(PINYIN))
        posts = run_scenario(f"{mode}-group", lambda: send("三位英雄，今晚咱们喝什么酒？"),
                             requests=len(PINYIN))
        # a refused request ends SillyTavern's round: have each member not yet prompted speak
        for name in list(PINYIN)[len(posts):]:
            run_scenario(f"{mode}-group", lambda name=name: send(f"/trigger {name}"))
        shot(f"{mode}-group-chat")
    if args.docs_image:
        docs_image(args.docs_image)
except BaseException:
    shot("failed")
    raise
finally:
    save()
    browser.close()
    playwright.stop()
    proxy.should_exit = True

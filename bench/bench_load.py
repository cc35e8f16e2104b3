"""Load check of web_demo.py: its page (gradio_client) and its OpenAI-compatible API (the `openai`
client) in one run against one server, each with concurrent two-turn chats, then bursts beyond the
one bound they share.

    python bench/bench_load.py                            # tiny random model, built in a temp dir
    python bench/bench_load.py --model_path output/merged --max_new_tokens 128

Starts `web_demo.py` as a subprocess on 127.0.0.1 (a free port), then:

1. `--clients` clients each stream a `--turns`-turn chat (the second turn sends the first back as
   history), first through the page's endpoint, then through /v1/chat/completions (stream=True);
   every conversation must be well formed (user/assistant alternating, non-empty replies).
2. A burst of `--burst` requests at once, through each: those beyond `--concurrency` running plus
   `--max_queue` waiting must be turned away at once (the page's "busy" error, the API's 429),
   the others complete; none may hang.
3. One more chat, to show the server still serves.

Prints for each side completed requests, time to first token and latency (p50, p95), and the
API's figures as ratios of the page's. Every wait is bounded (`--timeout` per request), and the
server only listens on 127.0.0.1. Exit status 1 if a check fails. tests/test_web_demo.py and
tests/test_api.py run smaller versions of steps 1 and 2 in-process.
"""

import argparse
import glob
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry from a benchmark


@dataclass
class Outcome:
    """One request: 'ok', 'busy' (turned away at the bound), or 'error'; times in seconds from submit."""

    status: str
    first_token_s: float | None = None
    latency_s: float | None = None
    history: list = field(default_factory=list)
    error: str = ""


def is_busy(error: BaseException) -> bool:
    """The page's error when every generation slot and waiting place is taken (web_demo.BUSY)."""
    return str(error).startswith("busy:")


def text_of(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    return "".join(block.get("text", "") for block in content or [] if isinstance(block, dict))


def well_formed(history, turns: int) -> bool:
    """2 * turns messages, alternating user/assistant, every reply non-empty."""
    if not isinstance(history, list) or len(history) != 2 * turns:
        return False
    for i, message in enumerate(history):
        if message.get("role") != ("user" if i % 2 == 0 else "assistant"):
            return False
        if message["role"] == "assistant" and not text_of(message).strip():
            return False
    return True


def chat_once(client, message: str, history: list, role: str, max_new_tokens: int, timeout: float) -> Outcome:
    """Submit one turn to /chat and follow its stream, polling so that a stuck request ends."""
    start = time.monotonic()
    job = client.submit(message, history, role, max_new_tokens, 0.8, 0.0, api_name="/chat")
    first = None
    while not job.done():
        if time.monotonic() - start > timeout:
            job.cancel()
            return Outcome("error", first, None, error=f"no answer within {timeout} s")
        outputs = job.outputs()
        if first is None and outputs and outputs[-1][1] and text_of(outputs[-1][1][-1]).strip():
            first = time.monotonic() - start
        time.sleep(0.005)
    try:
        _, new_history = job.result(timeout=1)
    except Exception as error:  # noqa: BLE001 - sorted into busy / error for the report
        return Outcome("busy" if is_busy(error) else "error", error=f"{type(error).__name__}: {error}")
    latency = time.monotonic() - start
    return Outcome("ok", first if first is not None else latency, latency, new_history)


def client_for(url: str):
    from gradio_client import Client

    return Client(url, verbose=False, analytics_enabled=False, download_files=False)


def run_sessions(new_client, chat, clients: int, turns: int, timeout: float,
                 roles=("孙悟空", "张飞", "李白")) -> list[list[Outcome]]:
    """`clients` threads, each with its own `new_client()`, each chatting `turns` turns through
    `chat(client, message, history, role)`; outcomes per client."""
    results: list[list[Outcome]] = [[] for _ in range(clients)]

    def session(i: int) -> None:
        client, history = new_client(), []
        for turn in range(turns):
            outcome = chat(client, f"第{turn + 1}个问题：你好，你是谁？", history, roles[i % len(roles)])
            results[i].append(outcome)
            if outcome.status != "ok":
                return
            history = outcome.history

    threads = [threading.Thread(target=session, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout * turns + 30)
    return results


def run_burst(url: str, requests: int, max_new_tokens: int, timeout: float) -> list[Outcome]:
    """`requests` single-turn chats submitted together from one client (its own thread pool)."""
    client = client_for(url)
    start = time.monotonic()
    jobs = [client.submit("一起来！", [], "张飞", max_new_tokens, 0.8, 0.0, api_name="/chat") for _ in range(requests)]
    outcomes = []
    for job in jobs:
        left = max(0.1, timeout - (time.monotonic() - start))
        try:
            _, history = job.result(timeout=left)
            outcomes.append(Outcome("ok", history=history))
        except TimeoutError:
            job.cancel()
            outcomes.append(Outcome("error", error=f"no answer within {timeout} s"))
        except Exception as error:  # noqa: BLE001
            outcomes.append(Outcome("busy" if is_busy(error) else "error", error=f"{type(error).__name__}: {error}"))
    return outcomes


def api_client(url: str, timeout: float):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=timeout)


def api_chat_once(client, message: str, history: list, role: str, max_new_tokens: int, stream: bool = True) -> Outcome:
    """One turn through /v1/chat/completions, streamed unless asked; first token = first non-empty delta."""
    import openai

    start, first, reply = time.monotonic(), None, ""
    messages = [*history, {"role": "user", "content": message}]
    try:
        answer = client.chat.completions.create(model=role, messages=messages, max_tokens=max_new_tokens,
                                                temperature=0, top_p=0.8, stream=stream)
        for chunk in answer if stream else ():
            piece = chunk.choices[0].delta.content if chunk.choices else None
            if piece:
                first = first if first is not None else time.monotonic() - start
                reply += piece
        reply = reply if stream else answer.choices[0].message.content
    except openai.RateLimitError as error:
        return Outcome("busy", error=f"429: {error.body.get('message') if error.body else error}")
    except openai.OpenAIError as error:
        return Outcome("error", error=f"{type(error).__name__}: {error}")
    latency = time.monotonic() - start
    return Outcome("ok", first if first is not None else latency, latency,
                   [*messages, {"role": "assistant", "content": reply}])


def run_api_burst(url: str, requests: int, max_new_tokens: int, timeout: float) -> list[Outcome]:
    """`requests` whole (unstreamed) single-turn chats sent together, one thread each."""
    from concurrent.futures import ThreadPoolExecutor

    client = api_client(url, timeout)
    with ThreadPoolExecutor(requests) as pool:
        return list(pool.map(lambda _: api_chat_once(client, "一起来！", [], "张飞", max_new_tokens, stream=False),
                             range(requests)))


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); enough for a handful of samples."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))]


# ---------------------------------------------------------------- the command


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_tiny(out_dir: str) -> str:
    sys.path.insert(0, ROOT)
    from baichuan.tiny import make_tiny, train_sentencepiece

    corpus = os.path.join(out_dir, "corpus.txt")
    with open(corpus, "w", encoding="utf-8") as out:
        for path in sorted(glob.glob(os.path.join(ROOT, "data", "sample", "*.jsonl"))):
            with open(path, encoding="utf-8") as f:
                out.write(f.read())
    model_dir = os.path.join(out_dir, "tiny")
    make_tiny(model_dir, train_sentencepiece(corpus, 1200))
    return model_dir


def wait_until_up(url: str, server: subprocess.Popen, timeout: float) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"web_demo.py exited with status {server.returncode}")
        try:
            with urllib.request.urlopen(url + "/", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"web_demo.py did not answer within {timeout} s")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("server")
    group.add_argument("--model_path", help="model directory for web_demo.py (default: a tiny random model)")
    group.add_argument("--adapter", help="LoRA adapter directory passed on to web_demo.py")
    group.add_argument("--concurrency", type=int, default=2, help="web_demo --concurrency (default: %(default)s)")
    group.add_argument("--max_queue", type=int, default=8, help="web_demo --max_queue (default: %(default)s)")
    group = parser.add_argument_group("load")
    group.add_argument("--clients", type=int, default=8, help="concurrent chatting clients (default: %(default)s)")
    group.add_argument("--turns", type=int, default=2, help="turns per client (default: %(default)s)")
    group.add_argument("--max_new_tokens", type=int, default=32, help="reply length in tokens (default: %(default)s)")
    group.add_argument("--burst", type=int, default=30,
                       help="requests sent at once to overflow the queue; 0 skips it (default: %(default)s)")
    group.add_argument("--burst_tokens", type=int, default=128,
                       help="reply length during the burst, long enough to keep the queue full (default: %(default)s)")
    group.add_argument("--timeout", type=float, default=120, help="seconds allowed per request (default: %(default)s)")
    return parser.parse_args(argv)


def report_sessions(side: str, sessions: list[list[Outcome]], args, wall_s: float) -> tuple[bool, dict]:
    """Print one side's chats; (all completed and well formed, its figures)."""
    flat = [o for s in sessions for o in s]
    ok = [o for o in flat if o.status == "ok"]
    expected = args.clients * args.turns
    print(f"{side} sessions: {args.clients} clients x {args.turns} turns, max_new_tokens={args.max_new_tokens}, "
          f"concurrency={args.concurrency}, max_queue={args.max_queue}")
    print(f"  completed requests: {len(ok)}/{expected} in {wall_s:.1f} s")
    figures = {"wall_s": wall_s}
    if ok:
        ttft, latency = [o.first_token_s for o in ok], [o.latency_s for o in ok]
        figures.update(ttft_p50=percentile(ttft, 50), ttft_p95=percentile(ttft, 95),
                       latency_p50=percentile(latency, 50), latency_p95=percentile(latency, 95))
        print(f"  time to first token: p50 {figures['ttft_p50']:.3f} s, p95 {figures['ttft_p95']:.3f} s")
        print(f"  latency:             p50 {figures['latency_p50']:.3f} s, p95 {figures['latency_p95']:.3f} s, "
              f"mean {statistics.mean(latency):.3f} s")
    formed = sum(1 for s in sessions if len(s) == args.turns and well_formed(s[-1].history, args.turns))
    print(f"  well-formed {args.turns}-turn conversations: {formed}/{args.clients}")
    for o in flat:
        if o.status != "ok":
            print(f"  failed: {o.status} {o.error}")
    return len(ok) == expected and formed == args.clients, figures


def report_burst(side: str, burst: list[Outcome], args) -> bool:
    counts = {status: sum(1 for o in burst if o.status == status) for status in ("ok", "busy", "error")}
    bound = args.concurrency + args.max_queue
    print(f"{side} burst: {args.burst} requests at once (bound {bound}): {counts['ok']} completed, "
          f"{counts['busy']} busy, {counts['error']} other errors")
    for o in burst:
        if o.status == "error":
            print(f"  error: {o.error}")
    busy_message = next((o.error for o in burst if o.status == "busy"), "")
    if busy_message:
        print(f"  busy message: {busy_message}")
    return counts["error"] == 0 and counts["ok"] >= 1 and (args.burst <= bound or counts["busy"] >= 1)


def report_ratios(page: dict, api: dict) -> None:
    """The API's figures over the page's (below 1: the API is faster)."""
    names = [name for name in ("ttft_p50", "ttft_p95", "latency_p50", "latency_p95", "wall_s")
             if name in page and name in api and page[name] > 0]
    print("api / page: " + ", ".join(f"{name} {api[name] / page[name]:.2f}x" for name in names))


def run_checks(url: str, args) -> bool:
    """Both sides' sessions, then both bursts, then one more chat; printed as they finish."""
    good, figures = True, {}
    sides = {  # (a new client, one turn with it)
        "page": (lambda: client_for(url),
                 lambda client, *turn: chat_once(client, *turn, args.max_new_tokens, args.timeout)),
        "api": (lambda: api_client(url, args.timeout),
                lambda client, *turn: api_chat_once(client, *turn, args.max_new_tokens)),
    }
    # one untimed turn on each side first, so that neither pays for the server's first generation
    warm = [chat(new_client(), "你好", [], "李白") for new_client, chat in sides.values()]
    if any(o.status != "ok" for o in warm):
        print(f"warm-up failed: {[o.error for o in warm]}")
        return False
    for side, (new_client, chat) in sides.items():
        start = time.monotonic()
        sessions = run_sessions(new_client, chat, args.clients, args.turns, args.timeout)
        passed, figures[side] = report_sessions(side, sessions, args, time.monotonic() - start)
        good &= passed
    report_ratios(figures["page"], figures["api"])
    if args.burst:
        good &= report_burst("page", run_burst(url, args.burst, args.burst_tokens, args.timeout), args)
        good &= report_burst("api", run_api_burst(url, args.burst, args.burst_tokens, args.timeout), args)
    after = chat_once(client_for(url), "还在吗？", [], "李白", args.max_new_tokens, args.timeout)
    print(f"after: one more chat {after.status}" + (f" ({after.error})" if after.error else ""))
    good &= after.status == "ok"
    print("PASS" if good else "FAIL")
    return good


def main(argv=None) -> int:
    args = parse_args(argv)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as scratch:
        model_path = args.model_path or build_tiny(scratch)
        command = [sys.executable, os.path.join(ROOT, "web_demo.py"), "--model_path", model_path,
                   "--host", "127.0.0.1", "--port", str(port), "--concurrency", str(args.concurrency),
                   "--max_queue", str(args.max_queue), "--temperature", "0"]
        if args.adapter:
            command += ["--adapter", args.adapter]
        log_path = os.path.join(scratch, "server.log")
        with open(log_path, "w") as log:
            server = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            try:
                wait_until_up(url, server, timeout=180)
                good = run_checks(url, args)
            finally:
                server.terminate()
                try:
                    server.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    server.kill()
        if not good:
            with open(log_path) as log:
                print("---- server log (last 40 lines)\n" + "".join(log.readlines()[-40:]), file=sys.stderr)
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())

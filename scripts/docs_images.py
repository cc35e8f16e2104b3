"""The chat page's screenshot, and small copies of evaluate.py's charts, for docs/img/.

Run by scripts/docs_images.sh after a quickstart run. The page is web_demo.py in its own process,
greedy, on a free loopback port; Chromium asks 孙悟空 two questions and the screenshot is taken
when the second reply has finished streaming. Each PNG is reduced to a 256-colour palette so it
stays small (no pngquant needed).
"""

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
QUESTIONS = ["大圣，你最喜欢吃什么？", "你师父是谁？"]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model_path", required=True, help="the quickstart's merged model")
    parser.add_argument("--chart", required=True, help="evaluate.py's results.png")
    parser.add_argument("--curves", required=True, help="evaluate.py's training_curves.png")
    parser.add_argument("--img_dir", default="docs/img", help="where the pictures go")
    parser.add_argument("--role", default="孙悟空", help="the role asked on the page")
    return parser.parse_args()


def small_png(source, target: Path, width=None):
    """Save a palette PNG, optionally scaled down to `width` pixels."""
    from PIL import Image

    image = Image.open(source).convert("RGB")
    if width and image.width > width:
        image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
    tmp = target.with_name(f".{target.name}.tmp")
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        tmp, format="PNG", optimize=True)
    tmp.replace(target)
    print(f"wrote {target} ({target.stat().st_size // 1024} KB)")


def start_server(model_path, role):
    proc = subprocess.Popen(
        [sys.executable, "web_demo.py", "--model_path", model_path, "--port", "0", "--temperature", "0",
         "--max_new_tokens", "40", "--default_role", role],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    for line in proc.stdout:  # the server prints its URL once it listens
        match = re.search(r"serving on (http://\S+) \(page\)", line)
        if match:
            return proc, match[1]
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise SystemExit(f"error: web_demo.py did not start (exit status {proc.wait()})")


def screenshot(url, target: Path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 760})
        page.set_default_timeout(120_000)
        page.goto(url)
        box = page.locator("#message textarea")
        box.wait_for()
        for turn, question in enumerate(QUESTIONS, 1):
            start = page.locator("#chatbot [data-testid=bot]").count()
            box.fill(question)
            box.press("Enter")
            # the reply has finished when a new bot message is non-empty and the status tracker is hidden
            page.wait_for_function(
                """n => {
                    const bots = document.querySelectorAll('#chatbot [data-testid=bot]');
                    const tracker = document.querySelector('#chatbot [data-testid=status-tracker]');
                    return bots.length > n && bots[bots.length - 1].innerText.trim() !== ''
                        && (!tracker || tracker.classList.contains('hide'));
                }""", arg=start)
        page.screenshot(path=str(target))
        browser.close()


def main():
    args = parse_args()
    img_dir = ROOT / args.img_dir
    img_dir.mkdir(parents=True, exist_ok=True)
    proc, url = start_server(args.model_path, args.role)
    try:
        raw = img_dir / ".chat-raw.png"
        screenshot(url, raw)
        small_png(raw, img_dir / "chat.png")
        raw.unlink()
    finally:
        proc.terminate()
        proc.wait(30)
    small_png(args.chart, img_dir / "evaluation.png", width=1200)
    small_png(args.curves, img_dir / "training_curves.png", width=1200)


if __name__ == "__main__":
    main()
